"""Building the spend report: which hashes to read, and the report as data.

Everything after the one pipelined read (`read_hashes`) is a pure function of the
policy, those hashes and the clock, so a report can be recomputed for any instant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

from extproc.governance.budget import scaled_limit
from extproc.governance.periods import Period, period_at
from extproc.governance.policy import Policy, Workspace
from extproc.insight.burn import Burn, burn_reads, burn_state
from extproc.insight.spend.arithmetic import (
    GROUPS,
    TOP_SESSIONS,
    Hashes,
    days_in,
    forecast,
    percent,
    runs_out_at,
    select_period,
)
from extproc.insight.spend.halt import NO_HALT, Halt
from extproc.metering.prices import usd
from extproc.store.schema import (
    CACHE_FIELDS,
    REQUESTS_FIELD,
    UNATTRIBUTED,
    WORKSPACE_SCOPE,
    cache_field,
    day_key,
    held_key,
    spent_key,
    workspace_prefix,
)

# --- the report ----------------------------------------------------------------------------


def _optional_usd(nanos: int | None) -> str | None:
    return None if nanos is None else usd(nanos)


def _optional_pct(share: Decimal | None) -> str | None:
    return None if share is None else str(share.quantize(Decimal("0.01"), ROUND_HALF_UP))


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
    hard_nanos: int | None  # the hard limit enforced on this scope now, top-ups included
    held_nanos: int | None  # None where reservations are not tracked (uncapped scopes)
    forecast_nanos: int | None
    runs_out: datetime | None
    today_nanos: int | None = None  # sessions: what today added
    topup_nanos: int = 0  # of hard_nanos, what live top-up grants add

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
            "spent_usd": usd(self.spent_nanos),
            "requests": self.requests,
            "budget_usd": _optional_usd(self.budget_nanos),
            "share_pct": _optional_pct(self.share_pct),
            "share_of": ("own" if own else "workspace") if self.share_base_nanos else None,
            "hard_limit_usd": _optional_usd(self.hard_nanos),
            "topup_usd": usd(self.topup_nanos) if self.topup_nanos else None,
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
            "spent_usd": usd(self.spent_nanos),
            "requests": self.requests,
            "budget_usd": usd(self.budget_nanos),
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
            "missed_usd": usd(self.miss_nanos),
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
    halt: Halt = NO_HALT  # top-up grants and paused keys (insight.spend.halt)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.halt.to_dict(self.generated_at.tzinfo),  # type: ignore[arg-type]
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
        topup: int = 0,
    ) -> Row:
        budget = self.budget(own_budget)
        if budget is None and book.ws is not None:
            base = self.budget(book.ws.budget_nanos)
        else:
            base = budget
        # A day's share of a hard limit is enforced nowhere: only whole periods have one.
        hard = hard if self.scale == 1 else None
        topup = topup if hard is not None and self.current else 0
        hard = hard + topup if hard is not None else None
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
            topup_nanos=topup,
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
    book: _Book,
    frame: _Frame,
    by: str,
    spent: Mapping[str, int],
    held: Mapping[str, int] | None,
    topups: Mapping[str, int],
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
                topup=topups.get(scope, 0),
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
    halt: Halt = NO_HALT,
) -> Report:
    """The report as of `now`, from the hashes `report_keys` names (missing ones are empty);
    `halt` (`read_halt`) raises each hard limit by its live top-ups and lists paused keys."""
    tz = policy.timezone
    now = now.astimezone(tz)
    now_ms = _ms(now)
    rows: list[Row] = []
    totals = {"spent": 0, "requests": 0, "budget": 0, "held": 0, "forecast": 0}
    for book in _books(policy):
        frame = _frame(book, selection, now, tz)
        spent = hashes.get(_source_key(book, frame.period, selection), {})
        ws = book.ws
        topups = halt.topups(book.name)
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
            topup=topups.get(WORKSPACE_SCOPE, 0),
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
            rows += _group_rows(book, frame, by, spent, held, topups)
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
        halt=halt if selection != "previous" else NO_HALT,
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
