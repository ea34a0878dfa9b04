"""`extproc spend`: where each workspace stands against its budget, and where it is heading.

The report reads only the hashes the settle script already keeps (spent, held, day, hour),
so it costs one pipelined round trip however long the ledger has grown. Everything
after that read is a pure function of the policy, those hashes and the clock: a report can
be recomputed for any instant (`--now`), and the arithmetic is tested without Redis.

Beside the budget table the report shows today's burn against a usual day (the same
numbers the sidecar's burn watch alerts on, see `extproc.insight.burn`), the sessions that cost the
most, and per service how well prompt caching works: the hit rate, and the dollars that
prefixes re-sent within 15 minutes but billed at the full input price cost on top. `--html`
draws each workspace's period as a chart (see `extproc.insight.spend_html`).

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
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from extproc.governance.budget import scaled_limit
from extproc.governance.periods import Period, period_at, previous
from extproc.governance.policy import Policy, Workspace
from extproc.insight.burn import Burn, burn_reads, burn_state, ratio_text
from extproc.metering.prices import NANOS_PER_DOLLAR
from extproc.store.schema import (
    CACHE_FIELDS,
    GROUP_PREFIXES,
    REQUESTS_FIELD,
    UNATTRIBUTED,
    WORKSPACE_SCOPE,
    cache_field,
    day_key,
    held_key,
    spent_key,
    workspace_prefix,
)

SELECTIONS = ("current", "previous", "today")
GROUPS = GROUP_PREFIXES
TOP_SESSIONS = 10

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
    today_nanos: int | None = None  # sessions: what today added

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
            "today_usd": _optional_usd(self.today_nanos),
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
class CacheRow:
    """Prompt caching of one service over a period, as settle.lua counts it."""

    workspace: str
    service: str
    period: Period
    input_tokens: int
    cached_tokens: int
    repeat_tokens: int  # prefix tokens of requests whose prefix was sent in the last 15 min
    miss_tokens: int  # of those, the tokens not billed as cached
    miss_nanos: int  # what those cost over the cached rate: what a better cache saves

    @property
    def hit_pct(self) -> Decimal | None:
        return percent(self.cached_tokens, self.input_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {
            "workspace": self.workspace,
            "service": self.service,
            "period_id": self.period.id,
            "input_tokens": self.input_tokens,
            "cached_tokens": self.cached_tokens,
            "hit_rate_pct": _optional_pct(self.hit_pct),
            "repeat_prefix_tokens": self.repeat_tokens,
            "missed_tokens": self.miss_tokens,
            "missed_usd": usd_exact(self.miss_nanos),
        }


@dataclass(frozen=True, slots=True)
class Chart:
    """One workspace's period as a burn chart: spend by day against its limits."""

    workspace: str
    period: Period
    budget_nanos: int
    soft_nanos: int
    hard_nanos: int
    daily: tuple[tuple[date, int], ...]  # spend per day, period start to today
    now: datetime | None  # None for a finished period
    forecast_nanos: int | None  # at the period's average pace so far
    burn_forecast_nanos: int | None  # at today's projected pace (see extproc.insight.burn)

    @property
    def spent_nanos(self) -> int:
        return sum(nanos for _day, nanos in self.daily)


@dataclass(frozen=True, slots=True)
class Report:
    selection: str
    by: str | None
    generated_at: datetime
    rows: tuple[Row, ...]
    totals: Totals
    burn: tuple[Burn, ...] | None = None  # None for a finished period
    cache: tuple[CacheRow, ...] = ()
    charts: tuple[Chart, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "period": self.selection,
            "generated_at": self.generated_at.isoformat(),
            "timezone": str(self.generated_at.tzinfo),
            "by": self.by,
            "rows": [r.to_dict() for r in self.rows],
            "totals": self.totals.to_dict(),
            "burn": None if self.burn is None else [b.to_dict() for b in self.burn],
            "cache": [c.to_dict() for c in self.cache],
        }


@dataclass(frozen=True, slots=True)
class _Book:
    """One workspace's set of hashes: a policy workspace, or the unattributed traffic."""

    name: str
    period_kind: str
    ws: Workspace | None

    @property
    def prefix(self) -> str:
        return workspace_prefix(self.name)


def _books(policy: Policy) -> list[_Book]:
    books = [_Book(ws.name, ws.period, ws) for ws in policy.workspaces.values()]
    return [*books, _Book(UNATTRIBUTED, "month", None)]


def _source_key(book: _Book, period: Period, selection: str) -> str:
    key = day_key if selection == "today" else spent_key
    return key(book.prefix, period.id)


def _held_key(book: _Book, now_ms: int, tz: ZoneInfo) -> str:
    return held_key(book.prefix, period_at(book.period_kind, now_ms, tz).id)


def _ms(now: datetime) -> int:
    return int(now.timestamp() * 1000)


def report_keys(
    policy: Policy, now: datetime, selection: str = "current", by: str | None = None
) -> list[str]:
    """Every Redis hash `build_report` reads whole (HGETALL) for this selection."""
    now_ms, tz = _ms(now), policy.timezone
    keys = []
    for book in _books(policy):
        period = select_period(book.period_kind, selection, now_ms, tz)
        keys.append(_source_key(book, period, selection))
        if selection != "previous" and book.ws is not None:
            keys.append(_held_key(book, now_ms, tz))
        if by == "session" and selection == "current":
            keys.append(_today_key(book, now_ms, tz))
    return keys


def _today_key(book: _Book, now_ms: int, tz: ZoneInfo) -> str:
    return day_key(book.prefix, period_at("day", now_ms, tz).id)


def _chart_period(book: _Book, selection: str, now_ms: int, tz: ZoneInfo) -> Period:
    return select_period(
        book.period_kind, "previous" if selection == "previous" else "current", now_ms, tz
    )


def _chart_days(period: Period, now: datetime) -> list[date]:
    last = min(now.date(), (period.end - timedelta(days=1)).date())
    count = (last - period.start.date()).days + 1
    return [period.start.date() + timedelta(days=k) for k in range(max(count, 0))]


def _cache_fields(ws: Workspace) -> tuple[str, ...]:
    return tuple(cache_field(kind, svc) for svc in ws.services for kind in CACHE_FIELDS)


def report_reads(
    policy: Policy, now: datetime, selection: str = "current"
) -> dict[str, tuple[str, ...]]:
    """The hashes `build_report` reads only some fields of (HMGET): the burn series, each
    day of the charted period and, for `today`, the period's prompt-cache counters."""
    now = now.astimezone(policy.timezone)
    now_ms, tz = _ms(now), policy.timezone
    reads: dict[str, tuple[str, ...]] = {}

    def want(key: str, fields: tuple[str, ...]) -> None:
        reads[key] = tuple(dict.fromkeys((*reads.get(key, ()), *fields)))

    if selection != "previous":
        for key, fields in burn_reads(policy, now).items():
            want(key, fields)
    for book in _books(policy):
        if book.ws is None:
            continue
        period = _chart_period(book, selection, now_ms, tz)
        for day in _chart_days(period, now):
            want(day_key(book.prefix, day.isoformat()), (WORKSPACE_SCOPE,))
        if selection == "today":
            want(spent_key(book.prefix, period.id), _cache_fields(book.ws))
    return reads


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
        project: bool = True,
        today: int | None = None,
    ) -> Row:
        budget = self.budget(own_budget)
        if budget is None and book.ws is not None:
            base = self.budget(book.ws.budget_nanos)
        else:
            base = budget
        # A day's share of a hard limit is enforced nowhere: only whole periods have one.
        hard = hard if self.scale == 1 else None
        projected = out = None
        if self.elapsed is not None and project:
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
            today_nanos=today,
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


def _session_rows(
    book: _Book, frame: _Frame, spent: Mapping[str, int], today: Mapping[str, int] | None
) -> list[Row]:
    """The costliest sessions of the period: a runaway agent loop shows up here first."""
    prefix = GROUPS["session"]
    found = [(f.removeprefix(prefix), n) for f, n in spent.items() if f.startswith(prefix)]
    found.sort(key=lambda item: (-item[1], item[0]))
    return [
        frame.row(
            book,
            "session",
            name,
            nanos,
            project=False,  # a session is not a period: its pace says nothing about the end
            today=None if today is None else today.get(prefix + name, 0),
        )
        for name, nanos in found[:TOP_SESSIONS]
    ]


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
            spent.get(WORKSPACE_SCOPE, 0),
            requests=None if selection == "today" else spent.get(REQUESTS_FIELD, 0),
            own_budget=ws.budget_nanos if ws else None,
            hard=ws.hard_nanos if ws else None,
            held=None if held is None else held.get(WORKSPACE_SCOPE, 0),
        )
        rows.append(row)
        totals["spent"] += row.spent_nanos
        totals["requests"] += row.requests or 0
        totals["budget"] += row.budget_nanos or 0
        totals["held"] += row.held_nanos or 0
        totals["forecast"] += row.forecast_nanos or 0
        if by == "session":
            today = None
            if selection == "current":
                today = hashes.get(_today_key(book, now_ms, tz), {})
            rows += _session_rows(book, frame, spent, today)
        elif by is not None:
            rows += _group_rows(book, frame, by, spent, held)
    burn = None if selection == "previous" else tuple(burn_state(policy, hashes, now))
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
        burn=burn,
        cache=tuple(_cache_rows(policy, hashes, now, selection)),
        charts=tuple(_charts(policy, hashes, now, selection, rows, burn or ())),
    )


def _cache_rows(policy: Policy, hashes: Hashes, now: datetime, selection: str) -> list[CacheRow]:
    """Per service that sent input this period, worst cache first (most dollars missed)."""
    out: list[CacheRow] = []
    for book in _books(policy):
        period = _chart_period(book, selection, _ms(now), policy.timezone)
        spent = hashes.get(spent_key(book.prefix, period.id), {})
        marker = cache_field(CACHE_FIELDS[0], "")
        services = sorted(f.removeprefix(marker) for f in spent if f.startswith(marker))
        rows = []
        for svc in services:
            counts = [spent.get(cache_field(kind, svc), 0) for kind in CACHE_FIELDS]
            rows.append(CacheRow(book.name, svc, period, *counts))
        rows.sort(key=lambda r: (-r.miss_nanos, r.service))
        out += rows
    return out


def _charts(
    policy: Policy,
    hashes: Hashes,
    now: datetime,
    selection: str,
    rows: list[Row],
    burn: tuple[Burn, ...],
) -> list[Chart]:
    now_ms, tz = _ms(now), policy.timezone
    charts = []
    for book in _books(policy):
        ws = book.ws
        if ws is None:
            continue
        period = _chart_period(book, selection, now_ms, tz)
        daily = tuple(
            (day, hashes.get(day_key(book.prefix, day.isoformat()), {}).get(WORKSPACE_SCOPE, 0))
            for day in _chart_days(period, now)
        )
        current = selection != "previous"
        ws_row = next((r for r in rows if r.kind == "workspace" and r.workspace == book.name), None)
        average = None
        if current and ws_row is not None and ws_row.period.id == period.id:
            average = ws_row.forecast_nanos
        elif current:
            elapsed = Fraction(period.elapsed_fraction(now))
            average = forecast(sum(n for _d, n in daily), elapsed)
        at_pace = next(
            (
                b.forecast_nanos
                for b in burn
                if b.workspace == book.name and b.scope == WORKSPACE_SCOPE
            ),
            None,
        )
        charts.append(
            Chart(
                workspace=book.name,
                period=period,
                budget_nanos=ws.budget_nanos,
                soft_nanos=ws.soft_nanos,
                hard_nanos=ws.hard_nanos,
                daily=daily,
                now=now if current else None,
                forecast_nanos=average,
                burn_forecast_nanos=at_pace if current else None,
            )
        )
    return charts


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
    if row.today_nanos is not None:
        return f"today {dollars(row.today_nanos)}"
    if row.limit_reached:
        return "hard limit reached"
    if row.runs_out is not None:
        return f"runs out {row.runs_out.date().isoformat()}"
    return "over budget" if row.over_budget else ""


_KIND_LABEL = {"team": "team", "service": "svc", "key": "key", "model": "model", "session": "sess"}
_RIGHT = frozenset({2, 3, 4, 5, 6, 7})
SHOWN_SESSION_CHARS = 40


def _layout(lines: list[tuple[str, ...]], right: frozenset[int]) -> list[str]:
    """Columns padded to their widest cell; numbers right-aligned."""
    widths = [max(len(line[c]) for line in lines) for c in range(len(lines[0]))]
    return [
        "  ".join(
            cell.rjust(w) if c in right else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]


def _row_name(r: Row) -> str:
    if r.kind == "workspace":
        return "(unattributed)" if r.name == UNATTRIBUTED else r.name
    name = r.name
    if r.kind == "session" and len(name) > SHOWN_SESSION_CHARS:
        name = name[: SHOWN_SESSION_CHARS - 1] + "…"
    return f"  {_KIND_LABEL[r.kind]} {name}"


ROW_HEADER = ("WORKSPACE", "PERIOD", "SPENT", "REQUESTS", "BUDGET", "USED", "IN FLIGHT")
ROW_HEADER += ("FORECAST", "OUTLOOK")


def row_cells(r: Row) -> tuple[str, ...]:
    budget = dollars(r.budget_nanos) if r.budget_nanos is not None else "-"
    if r.kind != "workspace" and r.budget_nanos is None and r.share_base_nanos:
        budget = "(ws)"
    return (
        _row_name(r),
        r.period.id if r.kind == "workspace" else "",
        dollars(r.spent_nanos),
        "-" if r.requests is None else f"{r.requests:,}",
        budget,
        _pct_text(r.share_pct),
        dollars(r.held_nanos),
        dollars(r.forecast_nanos),
        _outlook(r),
    )


def render_table(report: Report) -> str:
    lines: list[tuple[str, ...]] = [ROW_HEADER]
    lines += [row_cells(r) for r in report.rows]
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
    laid = _layout(lines, _RIGHT)
    when = report.generated_at.strftime("%Y-%m-%d %H:%M")
    title = {
        "current": "current period",
        "previous": "previous period",
        "today": "today (budgets are a day's share of each period's)",
    }[report.selection]
    out = [f"spend, {title}, as of {when} {report.generated_at.tzinfo}", ""]
    out += laid[:-1]
    out += ["-" * len(laid[0]), laid[-1]]
    return "\n".join(out)


def burn_cells(b: Burn) -> tuple[str, ...]:
    """Today so far, projected, usual day, ratio, alert flag, run-out date: for people."""
    ratio = b.ratio
    if ratio is not None:
        pace = f"{ratio_text(ratio)}x"
    else:
        pace = "-" if b.baseline is None or not b.projected_nanos else "new"
    return (
        dollars(b.today_nanos),
        dollars(b.projected_nanos),
        "-" if b.baseline is None else dollars(b.baseline.nanos),
        pace,
        "ALERT" if b.alert else "",
        _runs_out_text(b),
    )


def _runs_out_text(b: Burn) -> str:
    if b.hard_nanos is None:
        return "-"
    if b.spent_nanos >= b.hard_nanos:
        return "hard limit reached"
    return b.runs_out.strftime("%Y-%m-%d %H:%M") if b.runs_out else "holds"


BURN_HEADER = ("TODAY", "PROJECTED", "USUAL DAY", "RATIO", "", "HARD LIMIT AT THIS PACE")


def render_burn(report: Report) -> str:
    if report.burn is None:
        return ""
    lines: list[tuple[str, ...]] = [("WORKSPACE", *BURN_HEADER)]
    for b in report.burn:
        name = f"  svc {b.service}" if b.service else b.workspace
        lines.append((name, *burn_cells(b)))
    when = report.generated_at.strftime("%H:%M")
    title = [
        f"burn today, as of {when}: today projected to midnight at the recent rate (the last",
        "30 to 90 minutes), against a usual day (the same weekday, else the last 7 days)",
    ]
    return "\n".join([*title, "", *_layout(lines, frozenset({1, 2, 3, 4}))])


CACHE_HEADER = ("INPUT TOKENS", "CACHED", "HIT RATE", "REPEATED PREFIX", "MISSED", "MISSED $")


def cache_cells(c: CacheRow) -> tuple[str, ...]:
    return (
        f"{c.input_tokens:,}",
        f"{c.cached_tokens:,}",
        _pct_text(c.hit_pct),
        f"{c.repeat_tokens:,}",
        f"{c.miss_tokens:,}",
        dollars(c.miss_nanos),
    )


def render_cache(report: Report) -> str:
    if not report.cache:
        return ""
    lines: list[tuple[str, ...]] = [("WORKSPACE", "SERVICE", "PERIOD", *CACHE_HEADER)]
    for c in report.cache:
        lines.append((c.workspace, c.service, c.period.id, *cache_cells(c)))
    title = [
        "prompt cache: MISSED counts prefix tokens re-sent within 15 minutes but billed at",
        "the full input price; MISSED $ is what a better cache would have saved",
    ]
    return "\n".join([*title, "", *_layout(lines, frozenset(range(3, 9)))])


def render_text(report: Report) -> str:
    """The budget table, then today's burn and the prompt-cache section when there is one."""
    parts = [render_table(report), render_burn(report), render_cache(report)]
    return "\n\n".join(part for part in parts if part)


# --- the command ---------------------------------------------------------------------------


def parse_now(text: str, tz: ZoneInfo) -> datetime:
    """An ISO 8601 instant; without an offset it is wall-clock time in the policy's zone."""
    value = datetime.fromisoformat(text.strip())
    return value.replace(tzinfo=tz) if value.tzinfo is None else value.astimezone(tz)


def read_hashes(
    client: Any, keys: list[str], fields: Mapping[str, tuple[str, ...]] | None = None
) -> dict[str, dict[str, int]]:
    """Whole hashes for `keys`, some fields of the `fields` ones, in one pipeline.

    A key in both is read whole. Missing hashes and fields are simply absent."""
    partial = {k: f for k, f in (fields or {}).items() if k not in set(keys)}
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    for key, names in partial.items():
        pipe.hmget(key, list(names))
    results = pipe.execute()
    out: dict[str, dict[str, int]] = {}
    for key, raw in zip(keys, results[: len(keys)], strict=True):
        out[key] = {_text(k): int(v) for k, v in raw.items()}
    for (key, names), values in zip(partial.items(), results[len(keys) :], strict=True):
        found = {f: int(v) for f, v in zip(names, values, strict=True) if v is not None}
        if found:
            out[key] = found
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def cmd_spend(args: argparse.Namespace) -> int:
    from extproc.cli.admin import policy_path, redacted, redis_url
    from extproc.governance.policy import PolicyError, load_policy
    from extproc.insight.spend_html import render_html
    from extproc.store.clients import UNAVAILABLE, make_sync_client

    path = policy_path(args.policy, args.stack)
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
    url = redis_url(args.redis_url, args.stack)
    keys = report_keys(policy, now, args.period, args.by)
    try:
        client = make_sync_client(url, socket_connect_timeout=3, socket_timeout=10)
        try:
            hashes = read_hashes(client, keys, report_reads(policy, now, args.period))
        finally:
            client.close()
    except UNAVAILABLE as exc:
        return _fail(f"Redis at {redacted(url)}: {exc}", 1)
    report = build_report(policy, hashes, now, selection=args.period, by=args.by)
    if args.html:
        try:
            Path(args.html).write_text(render_html(report), "utf-8")
        except OSError as exc:
            return _fail(f"--html: cannot write {args.html}: {exc.strerror}", 1)
        print(f"extproc: wrote {args.html}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render_text(report))
    return 0


def _fail(message: str, code: int) -> int:
    print(f"extproc: {message}", file=sys.stderr)
    return code


def register_spend(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `spend` to the `extproc` command line."""
    p = sub.add_parser("spend", help="spend per workspace against its budget, with a forecast")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--by",
        choices=tuple(GROUPS),
        help=f"also break each workspace down (session: the {TOP_SESSIONS} costliest)",
    )
    p.add_argument(
        "--period",
        choices=SELECTIONS,
        default="current",
        help="which budget period (default: current)",
    )
    p.add_argument(
        "--policy", help="else EXTPROC_POLICY, else the stack's, else examples/policy.yaml"
    )
    from extproc.cli.admin import add_stack_options

    add_stack_options(p)
    p.add_argument("--now", help="report as of this ISO 8601 time (for tests; default: the clock)")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page here")
    p.set_defaults(func=cmd_spend)
