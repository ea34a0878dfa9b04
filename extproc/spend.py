"""`extproc spend`: where each workspace stands against its budget, and where it is heading.

The report reads only the per-period hashes the settle script already keeps (spent, held,
day), so it costs one pipelined round trip however long the ledger has grown. Everything
after that read is a pure function of the policy, those hashes and the clock: a report can
be recomputed for any instant (`--now`), and the arithmetic is tested without Redis.

The forecast is a straight line on purpose. Spend is lumpy (nightly batches, Friday
refactors), and anything cleverer would look precise without being right; a straight line
is easy to check by hand, and it already answers the question people ask: at this pace,
do we make it to the end of the period, and if not, on which day do calls start failing?
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

from extproc.budget import scaled_limit
from extproc.ledger import UNATTRIBUTED, prefix_for
from extproc.periods import Period, period_at, previous
from extproc.policy import Policy, Workspace
from extproc.prices import NANOS_PER_DOLLAR

SELECTIONS = ("current", "previous", "today")
GROUPS = {"team": "team:", "service": "svc:", "key": "key:", "model": "model:"}
REQUESTS_FIELD = "#requests"

Hashes = Mapping[str, Mapping[str, int]]
"""Redis hash contents by key name, as read: field -> integer."""


# --- the arithmetic ----------------------------------------------------------------------


def forecast(spent_nanos: int, elapsed_fraction: float | Fraction) -> int:
    """Spend at the end of the period if it goes on at its average pace so far.

    With no time elapsed there is no pace to extrapolate, so the spend itself is returned.
    """
    elapsed = Fraction(elapsed_fraction)
    if elapsed <= 0 or elapsed >= 1:
        return spent_nanos
    return round(Fraction(spent_nanos) / elapsed)


def runs_out_at(
    spent_nanos: int, limit_nanos: int, elapsed_fraction: float | Fraction, period: Period
) -> datetime | None:
    """When spend at its average pace so far reaches `limit_nanos`; None if not this period.

    Measured in the same wall-clock share of the period as `Period.elapsed_fraction`, so a
    forecast and its date always agree. A limit already passed gives the moment the average
    pace crossed it, which is no later than now.
    """
    elapsed = Fraction(elapsed_fraction)
    if spent_nanos <= 0 or elapsed <= 0:
        return None
    reached = elapsed * limit_nanos / spent_nanos
    if reached >= 1:
        return None
    span_us = (period.end - period.start) // timedelta(microseconds=1)
    return period.start + timedelta(microseconds=round(span_us * reached))


def select_period(kind: str, selection: str, now_ms: int, tz: ZoneInfo) -> Period:
    """The period a report covers: this one, the one before it, or today."""
    if selection == "today":
        return period_at("day", now_ms, tz)
    current = period_at(kind, now_ms, tz)
    if selection == "current":
        return current
    if selection == "previous":
        return previous(current)
    raise ValueError(f"unknown period {selection!r} (expected one of {', '.join(SELECTIONS)})")


def days_in(period: Period) -> int:
    return (period.end.date() - period.start.date()).days


def percent(part: int, whole: int | None) -> Decimal | None:
    if not whole:
        return None
    return Decimal(part * 100) / Decimal(whole)


# --- the report ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    workspace: str
    kind: str  # "workspace", "team", "service", "key", "model"
    name: str
    period: Period
    spent_nanos: int
    requests: int | None  # counted per workspace and period only
    budget_nanos: int | None  # the row's own budget (a day's share of it for "today")
    share_base_nanos: int | None  # own budget, else the workspace's
    hard_nanos: int | None  # the hard limit enforced on this scope for the whole period
    held_nanos: int | None  # None where reservations are not tracked (uncapped scopes)
    forecast_nanos: int | None
    runs_out: datetime | None

    @property
    def share_pct(self) -> Decimal | None:
        return percent(self.spent_nanos, self.share_base_nanos)

    @property
    def limit_reached(self) -> bool:
        return self.hard_nanos is not None and self.spent_nanos >= self.hard_nanos

    @property
    def over_budget(self) -> bool:
        return (
            self.forecast_nanos is not None
            and self.budget_nanos is not None
            and self.forecast_nanos > self.budget_nanos
        )

    def to_dict(self) -> dict[str, Any]:
        own = self.budget_nanos is not None
        return {
            "workspace": self.workspace,
            "kind": self.kind,
            "name": self.name,
            "period_id": self.period.id,
            "period_start": self.period.start.isoformat(),
            "period_end": self.period.end.isoformat(),
            "spent_usd": usd_exact(self.spent_nanos),
            "requests": self.requests,
            "budget_usd": _optional_usd(self.budget_nanos),
            "share_pct": _optional_pct(self.share_pct),
            "share_of": ("own" if own else "workspace") if self.share_base_nanos else None,
            "hard_limit_usd": _optional_usd(self.hard_nanos),
            "hard_limit_reached": self.limit_reached,
            "held_usd": _optional_usd(self.held_nanos),
            "forecast_usd": _optional_usd(self.forecast_nanos),
            "over_budget": self.over_budget,
            "runs_out_on": self.runs_out.date().isoformat() if self.runs_out else None,
        }


@dataclass(frozen=True, slots=True)
class Totals:
    spent_nanos: int
    requests: int | None
    budget_nanos: int
    held_nanos: int | None
    forecast_nanos: int | None

    @property
    def share_pct(self) -> Decimal | None:
        return percent(self.spent_nanos, self.budget_nanos)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spent_usd": usd_exact(self.spent_nanos),
            "requests": self.requests,
            "budget_usd": usd_exact(self.budget_nanos),
            "share_pct": _optional_pct(self.share_pct),
            "held_usd": _optional_usd(self.held_nanos),
            "forecast_usd": _optional_usd(self.forecast_nanos),
        }


@dataclass(frozen=True, slots=True)
class Report:
    selection: str
    by: str | None
    generated_at: datetime
    rows: tuple[Row, ...]
    totals: Totals

    def to_dict(self) -> dict[str, Any]:
        return {
            "period": self.selection,
            "generated_at": self.generated_at.isoformat(),
            "timezone": str(self.generated_at.tzinfo),
            "by": self.by,
            "rows": [r.to_dict() for r in self.rows],
            "totals": self.totals.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class _Book:
    """One workspace's set of hashes: a policy workspace, or the unattributed traffic."""

    name: str
    period_kind: str
    ws: Workspace | None

    @property
    def prefix(self) -> str:
        return prefix_for(self.name)


def _books(policy: Policy) -> list[_Book]:
    books = [_Book(ws.name, ws.period, ws) for ws in policy.workspaces.values()]
    return [*books, _Book(UNATTRIBUTED, "month", None)]


def _source_key(book: _Book, period: Period, selection: str) -> str:
    kind = "day" if selection == "today" else "spent"
    return f"{book.prefix}:{kind}:{period.id}"


def _held_key(book: _Book, now_ms: int, tz: ZoneInfo) -> str:
    return f"{book.prefix}:held:{period_at(book.period_kind, now_ms, tz).id}"


def _ms(now: datetime) -> int:
    return int(now.timestamp() * 1000)


def report_keys(policy: Policy, now: datetime, selection: str = "current") -> list[str]:
    """Every Redis hash `build_report` reads for this selection."""
    now_ms, tz = _ms(now), policy.timezone
    keys = []
    for book in _books(policy):
        period = select_period(book.period_kind, selection, now_ms, tz)
        keys.append(_source_key(book, period, selection))
        if selection != "previous" and book.ws is not None:
            keys.append(_held_key(book, now_ms, tz))
    return keys


@dataclass(frozen=True, slots=True)
class _Frame:
    """What every row of one workspace shares: its period, clock and budget scale."""

    period: Period
    elapsed: Fraction | None  # None for a finished period: nothing to forecast
    scale: Fraction  # 1, or 1/days for a day's share of a period budget
    current: bool  # the period still running, where a run-out date means something

    def budget(self, nanos: int | None) -> int | None:
        return None if nanos is None else int(nanos * self.scale)

    def row(
        self,
        book: _Book,
        kind: str,
        name: str,
        spent: int,
        *,
        requests: int | None = None,
        own_budget: int | None = None,
        hard: int | None = None,
        held: int | None = None,
    ) -> Row:
        budget = self.budget(own_budget)
        if budget is None and book.ws is not None:
            base = self.budget(book.ws.budget_nanos)
        else:
            base = budget
        # A day's share of a hard limit is enforced nowhere: only whole periods have one.
        hard = hard if self.scale == 1 else None
        projected = out = None
        if self.elapsed is not None:
            projected = forecast(spent, self.elapsed)
            heading_over = budget is not None and projected > budget
            if self.current and heading_over and hard is not None and spent < hard:
                out = runs_out_at(spent, hard, self.elapsed, self.period)
        return Row(
            workspace=book.name,
            kind=kind,
            name=name,
            period=self.period,
            spent_nanos=spent,
            requests=requests,
            budget_nanos=budget,
            share_base_nanos=base,
            hard_nanos=hard,
            held_nanos=held,
            forecast_nanos=projected,
            runs_out=out,
        )


def _frame(book: _Book, selection: str, now: datetime, tz: ZoneInfo) -> _Frame:
    now_ms = _ms(now)
    period = select_period(book.period_kind, selection, now_ms, tz)
    if selection == "previous":
        return _Frame(period, None, Fraction(1), False)
    elapsed = Fraction(period.elapsed_fraction(now))
    if selection == "today":
        days = days_in(period_at(book.period_kind, now_ms, tz))
        return _Frame(period, elapsed, Fraction(1, days), False)
    return _Frame(period, elapsed, Fraction(1), True)


def _group_rows(
    book: _Book, frame: _Frame, by: str, spent: Mapping[str, int], held: Mapping[str, int] | None
) -> list[Row]:
    ws = book.ws
    prefix = GROUPS[by]
    names = {field.removeprefix(prefix) for field in spent if field.startswith(prefix)}
    owned: dict[str, int | None] = {}
    if ws is not None and by == "team":
        owned = {t.name: t.budget_nanos for t in ws.teams.values()}
    elif ws is not None and by == "service":
        owned = {s.name: s.budget_nanos for s in ws.services.values()}
    names |= owned.keys()
    rows = []
    for name in names:
        scope = prefix + name
        own = owned.get(name)
        hard = scaled_limit(own, ws, ws.hard_nanos) if ws is not None and own else None
        # Only scopes with a budget hold reservations; for the rest in-flight is unknown.
        in_flight = held.get(scope, 0) if held is not None and own is not None else None
        rows.append(
            frame.row(
                book,
                by,
                name,
                spent.get(scope, 0),
                own_budget=own,
                hard=hard,
                held=in_flight,
            )
        )
    rows.sort(key=lambda r: (-r.spent_nanos, r.name))
    return rows


def build_report(
    policy: Policy,
    hashes: Hashes,
    now: datetime,
    *,
    selection: str = "current",
    by: str | None = None,
) -> Report:
    """The report as of `now`, from the hashes `report_keys` names (missing ones are empty)."""
    tz = policy.timezone
    now = now.astimezone(tz)
    now_ms = _ms(now)
    rows: list[Row] = []
    totals = {"spent": 0, "requests": 0, "budget": 0, "held": 0, "forecast": 0}
    for book in _books(policy):
        frame = _frame(book, selection, now, tz)
        spent = hashes.get(_source_key(book, frame.period, selection), {})
        ws = book.ws
        held = None
        if selection != "previous" and ws is not None:
            held = hashes.get(_held_key(book, now_ms, tz), {})
        if ws is None and not any(spent.values()):
            continue
        row = frame.row(
            book,
            "workspace",
            book.name,
            spent.get("ws", 0),
            requests=None if selection == "today" else spent.get(REQUESTS_FIELD, 0),
            own_budget=ws.budget_nanos if ws else None,
            hard=ws.hard_nanos if ws else None,
            held=None if held is None else held.get("ws", 0),
        )
        rows.append(row)
        totals["spent"] += row.spent_nanos
        totals["requests"] += row.requests or 0
        totals["budget"] += row.budget_nanos or 0
        totals["held"] += row.held_nanos or 0
        totals["forecast"] += row.forecast_nanos or 0
        if by is not None:
            rows += _group_rows(book, frame, by, spent, held)
    return Report(
        selection=selection,
        by=by,
        generated_at=now,
        rows=tuple(rows),
        totals=Totals(
            spent_nanos=totals["spent"],
            requests=None if selection == "today" else totals["requests"],
            budget_nanos=totals["budget"],
            held_nanos=None if selection == "previous" else totals["held"],
            forecast_nanos=None if selection == "previous" else totals["forecast"],
        ),
    )


# --- presentation --------------------------------------------------------------------------


def usd_exact(nanos: int) -> str:
    """Every nano-dollar, no trailing zeros: "0", "12.5", "0.000001234"."""
    return f"{(Decimal(nanos).scaleb(-9)).normalize():f}"


def _optional_usd(nanos: int | None) -> str | None:
    return None if nanos is None else usd_exact(nanos)


def _optional_pct(share: Decimal | None) -> str | None:
    return None if share is None else str(share.quantize(Decimal("0.01"), ROUND_HALF_UP))


def dollars(nanos: int | None) -> str:
    """For people: to the cent, with thousands separators."""
    if nanos is None:
        return "-"
    cents = (Decimal(nanos) / NANOS_PER_DOLLAR).quantize(Decimal("0.01"), ROUND_HALF_UP)
    return f"${cents:,}"


def _pct_text(share: Decimal | None) -> str:
    if share is None:
        return "-"
    return f"{share.quantize(Decimal('0.1'), ROUND_HALF_UP)}%"


def _outlook(row: Row) -> str:
    if row.limit_reached:
        return "hard limit reached"
    if row.runs_out is not None:
        return f"runs out {row.runs_out.date().isoformat()}"
    return "over budget" if row.over_budget else ""


_KIND_LABEL = {"team": "team", "service": "svc", "key": "key", "model": "model"}
_RIGHT = frozenset({2, 3, 4, 5, 6, 7})


def render_table(report: Report) -> str:
    header = ("WORKSPACE", "PERIOD", "SPENT", "REQUESTS", "BUDGET", "USED", "IN FLIGHT")
    header += ("FORECAST", "OUTLOOK")
    lines: list[tuple[str, ...]] = [header]
    for r in report.rows:
        if r.kind == "workspace":
            name, period = ("(unattributed)" if r.name == UNATTRIBUTED else r.name), r.period.id
        else:
            name, period = f"  {_KIND_LABEL[r.kind]} {r.name}", ""
        budget = dollars(r.budget_nanos) if r.budget_nanos is not None else "-"
        if r.kind != "workspace" and r.budget_nanos is None and r.share_base_nanos:
            budget = "(ws)"
        lines.append(
            (
                name,
                period,
                dollars(r.spent_nanos),
                "-" if r.requests is None else f"{r.requests:,}",
                budget,
                _pct_text(r.share_pct),
                dollars(r.held_nanos),
                dollars(r.forecast_nanos),
                _outlook(r),
            )
        )
    t = report.totals
    lines.append(
        (
            "TOTAL",
            "",
            dollars(t.spent_nanos),
            "-" if t.requests is None else f"{t.requests:,}",
            dollars(t.budget_nanos),
            _pct_text(t.share_pct),
            dollars(t.held_nanos),
            dollars(t.forecast_nanos),
            "",
        )
    )
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]

    def fmt(line: tuple[str, ...]) -> str:
        cells = (
            cell.rjust(w) if c in _RIGHT else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    when = report.generated_at.strftime("%Y-%m-%d %H:%M")
    title = {
        "current": "current period",
        "previous": "previous period",
        "today": "today (budgets are a day's share of each period's)",
    }[report.selection]
    out = [f"spend, {title}, as of {when} {report.generated_at.tzinfo}", ""]
    out += [fmt(line) for line in lines[:-1]]
    out += ["-" * len(fmt(lines[0])), fmt(lines[-1])]
    return "\n".join(out)


# --- the command ---------------------------------------------------------------------------


def parse_now(text: str, tz: ZoneInfo) -> datetime:
    """An ISO 8601 instant; without an offset it is wall-clock time in the policy's zone."""
    value = datetime.fromisoformat(text.strip())
    return value.replace(tzinfo=tz) if value.tzinfo is None else value.astimezone(tz)


def read_hashes(client: Any, keys: list[str]) -> dict[str, dict[str, int]]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    out: dict[str, dict[str, int]] = {}
    for key, raw in zip(keys, pipe.execute(), strict=True):
        out[key] = {_text(k): int(v) for k, v in raw.items()}
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def cmd_spend(args: argparse.Namespace) -> int:
    from extproc.cli_admin import policy_path, redacted, redis_url
    from extproc.policy import PolicyError, load_policy
    from extproc.redis_client import UNAVAILABLE, make_sync_client

    path = policy_path(args.policy)
    if path is None:
        return _fail("no policy file: pass --policy or set EXTPROC_POLICY", 2)
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        return _fail(f"the policy is invalid:\n{exc}", 2)
    try:
        now = parse_now(args.now, policy.timezone) if args.now else datetime.now(policy.timezone)
    except ValueError:
        return _fail(f"--now: not an ISO 8601 time: {args.now!r}", 2)
    url = redis_url(args.redis_url)
    try:
        client = make_sync_client(url, socket_connect_timeout=3, socket_timeout=10)
        try:
            hashes = read_hashes(client, report_keys(policy, now, args.period))
        finally:
            client.close()
    except UNAVAILABLE as exc:
        return _fail(f"Redis at {redacted(url)}: {exc}", 1)
    report = build_report(policy, hashes, now, selection=args.period, by=args.by)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render_table(report))
    return 0


def _fail(message: str, code: int) -> int:
    print(f"extproc: {message}", file=sys.stderr)
    return code


def register_spend(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `spend` to the `extproc` command line."""
    p = sub.add_parser("spend", help="spend per workspace against its budget, with a forecast")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--by", choices=tuple(GROUPS), help="also break each workspace down")
    p.add_argument("--period", choices=SELECTIONS, default="current")
    p.add_argument("--policy", help="else EXTPROC_POLICY, else examples/policy.yaml")
    p.add_argument("--redis-url", help="else EXTPROC_REDIS_URL, else .data/stack.json, else local")
    p.add_argument("--now", help="report as of this ISO 8601 time (for tests; default: the clock)")
    p.set_defaults(func=cmd_spend)
