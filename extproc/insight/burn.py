"""Burn-rate watch: notice a runaway within the hour, not when the budget runs dry.

A soft limit speaks at 75% of the month's money; a CI script stuck in a retry loop on a
Tuesday morning can spend a week's budget before then. So every few minutes each replica
compares where today is heading with a usual day of the same scope, and alerts when today
is heading for several usual days at once.

Three choices keep this quiet on ordinary days and fast on bad ones:

* Today is projected from the *recent* rate (the last half hour to hour and a half, read
  from the hourly series), not from the day's average: a spike that began an hour ago
  barely moves the day's average, while the recent rate shows it at once. The window
  reaches back into the previous hour (yesterday's last hour just after midnight), so
  there is no blind stretch at the start of a day and no division by a few minutes.
* A usual day is the average of the same weekday over the last four weeks (weekends and
  Mondays differ), or of the last seven days while fewer than two such weekdays exist.
  Days without any traffic in the workspace count as "no history", not as free days, so a
  freshly deployed sidecar compares with what it has seen and stays silent without any.
* An alert needs real money: at least `burn_alert_min_usd` spent today, so a service
  going from 2 cents to 10 cents a day stays quiet.

The decision is a plain function of the policy, the hashes settle.lua keeps and the clock;
`BurnWatch` only reads those hashes (one pipeline), feeds the gauge, and marks each alert
in Redis with SET NX so the replicas together send it once per scope and day.

Lumpy days (a nightly batch, a morning stand-up burst) raise the recent rate for a while;
the multiple (3 by default) is what absorbs them. Hour buckets follow local wall-clock
hours, so on the night clocks go back the repeated hour is one bucket of two hours; the
window's length counts both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any, Protocol

from extproc.governance.budget import scaled_limit
from extproc.governance.periods import period_at
from extproc.governance.policy import Policy, Workspace
from extproc.insight.alerts import Alert
from extproc.insight.telemetry import Telemetry
from extproc.metering.prices import usd, usd_for_people
from extproc.store.clients import UNAVAILABLE, AsyncClient
from extproc.store.schema import (
    WORKSPACE_SCOPE,
    burn_alerted_key,
    day_key,
    hour_key,
    service_scope,
    spent_key,
    team_scope,
    workspace_prefix,
)

log = logging.getLogger("extproc.insight.burn")

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
MIN_WINDOW_MS = HOUR_MS // 2
SAME_WEEKDAYS = 4  # day hashes live 40 days: four weeks back is always there
MIN_SAME_WEEKDAYS = 2
TRAILING_DAYS = 7
ALERT_TTL_S = 172_800
CHECK_INTERVAL_S = 60.0

Hashes = Mapping[str, Mapping[str, int]]
"""Redis hash contents by key name (fields that exist only): field -> integer."""


# --- the clock: which buckets describe "now" -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Clock:
    """Today, the hour buckets of the recent-rate window, and how long each part lasts."""

    now: datetime
    today: date
    day_end_ms: int
    window_hours: tuple[str, ...]  # hour ids, oldest first
    window_ms: int

    @property
    def now_ms(self) -> int:
        return int(self.now.timestamp() * 1000)

    @property
    def remaining_ms(self) -> int:
        return max(self.day_end_ms - self.now_ms, 0)

    def history(self) -> tuple[date, ...]:
        """The days a baseline may use: the last week, then the same weekday further back."""
        trailing = [self.today - timedelta(days=k) for k in range(1, TRAILING_DAYS + 1)]
        weekly = [self.today - timedelta(weeks=k) for k in range(2, SAME_WEEKDAYS + 1)]
        return (*trailing, *weekly)


def _hour_id(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H")


def _bucket_start(hour_start: datetime) -> datetime:
    """Where the hour bucket of `hour_start` begins: an hour earlier for the hour that
    repeats when clocks go back, since both passes share one local label."""
    earlier = datetime.fromtimestamp(hour_start.timestamp() - 3600, hour_start.tzinfo)
    return earlier if _hour_id(earlier) == _hour_id(hour_start) else hour_start


def clock_at(now: datetime, policy: Policy) -> Clock:
    tz = policy.timezone
    now = now.astimezone(tz)
    now_ms = int(now.timestamp() * 1000)
    start = _bucket_start(now.replace(minute=0, second=0, microsecond=0))
    hours = (_hour_id(start),)
    if now_ms - int(start.timestamp() * 1000) < MIN_WINDOW_MS:
        start = _bucket_start(datetime.fromtimestamp(start.timestamp() - 3600, tz))
        hours = (_hour_id(start), *hours)
    day = period_at("day", now_ms, tz)
    window = now_ms - int(start.timestamp() * 1000)
    return Clock(now, now.date(), day.end_ms, hours, window)


# --- reads ---------------------------------------------------------------------------------


def scopes_of(ws: Workspace) -> list[tuple[str, str, int | None]]:
    """(scope field, service name or "" for the workspace, hard limit or None) to watch."""
    out: list[tuple[str, str, int | None]] = [(WORKSPACE_SCOPE, "", ws.hard_nanos)]
    for svc in ws.services.values():
        hard = scaled_limit(svc.budget_nanos, ws, ws.hard_nanos)
        out.append((service_scope(svc.name), svc.name, hard))
    return out


def budgeted_scopes(ws: Workspace) -> list[tuple[str, int]]:
    """(scope field, budget) of every scope with a budget of its own: the workspace, its
    teams and its services, as the settle script counts them in the period's hash."""
    out = [(WORKSPACE_SCOPE, ws.budget_nanos)] if ws.budget_nanos else []
    out += [(team_scope(t.name), t.budget_nanos) for t in ws.teams.values() if t.budget_nanos]
    out += [(service_scope(s.name), s.budget_nanos) for s in ws.services.values() if s.budget_nanos]
    return out


def _keys(ws: Workspace, clock: Clock, policy: Policy) -> dict[str, str]:
    p = workspace_prefix(ws.name)
    period = period_at(ws.period, clock.now_ms, policy.timezone)
    keys = {"today": day_key(p, clock.today.isoformat()), "spent": spent_key(p, period.id)}
    for hour in clock.window_hours:
        keys[f"hour:{hour}"] = hour_key(p, hour)
    for day in clock.history():
        keys[f"day:{day.isoformat()}"] = day_key(p, day.isoformat())
    return keys


def burn_reads(policy: Policy, now: datetime) -> dict[str, tuple[str, ...]]:
    """Every hash `burn_state` needs, with the fields to read from it (HMGET, not HGETALL:
    day hashes also count every session and key, which the watch has no use for)."""
    clock = clock_at(now, policy)
    reads: dict[str, tuple[str, ...]] = {}
    for ws in policy.workspaces.values():
        fields = tuple(scope for scope, _service, _hard in scopes_of(ws))
        keys = _keys(ws, clock, policy)
        for key in keys.values():
            reads[key] = fields
        budgeted = tuple(scope for scope, _budget in budgeted_scopes(ws))
        reads[keys["spent"]] = tuple(dict.fromkeys((*fields, *budgeted)))
    return reads


def utilization(policy: Policy, hashes: Hashes, now: datetime) -> list[tuple[str, str, float]]:
    """(workspace, scope, share of its budget spent this period) for every budgeted scope,
    from the `burn_reads` hashes: what `extproc_budget_utilization_ratio` reports."""
    clock = clock_at(now, policy)
    out = []
    for ws in policy.workspaces.values():
        spent = hashes.get(_keys(ws, clock, policy)["spent"], {})
        for scope, budget in budgeted_scopes(ws):
            out.append((ws.name, scope, spent.get(scope, 0) / budget))
    return out


# --- the decision --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Baseline:
    nanos: int
    days: tuple[date, ...]
    same_weekday: bool  # else the trailing days

    def describe(self) -> str:
        n = len(self.days)
        if self.same_weekday:
            weekday = self.days[0].strftime("%A")
            return f"the average of the last {n} {weekday}s"
        return "the day before" if n == 1 else f"the average of the last {n} days"


def choose_baseline(
    spent_by_day: Mapping[date, int], available: set[date], today: date
) -> Baseline | None:
    """A usual day: the same weekdays if at least two are known, else the last week."""
    same = [today - timedelta(weeks=k) for k in range(1, SAME_WEEKDAYS + 1)]
    days = [d for d in same if d in available]
    weekly = len(days) >= MIN_SAME_WEEKDAYS
    if not weekly:
        trailing = [today - timedelta(days=k) for k in range(1, TRAILING_DAYS + 1)]
        days = [d for d in trailing if d in available]
    if not days:
        return None
    total = sum(spent_by_day.get(d, 0) for d in days)
    return Baseline(round(Fraction(total, len(days))), tuple(days), weekly)


def project_day(today_nanos: int, recent_nanos: int, clock: Clock) -> int:
    """Today's spend at midnight if the rest of the day runs at the recent rate."""
    return today_nanos + round(Fraction(recent_nanos * clock.remaining_ms, clock.window_ms))


def run_out(
    clock: Clock,
    period_end_ms: int,
    spent_nanos: int,
    today_nanos: int,
    projected_nanos: int,
    recent_nanos: int,
    hard_nanos: int,
) -> datetime | None:
    """When spend reaches `hard_nanos` if today ends at the recent rate and every later day
    costs what today is projected to; None when the period ends first."""
    need = hard_nanos - spent_nanos
    if need <= 0:
        return clock.now
    rest_of_today = projected_nanos - today_nanos
    if need <= rest_of_today:
        at = clock.now_ms + round(Fraction(need * clock.window_ms, recent_nanos))
    elif projected_nanos > 0:
        at = clock.day_end_ms + round(Fraction((need - rest_of_today) * DAY_MS, projected_nanos))
    else:
        return None
    if at >= period_end_ms:
        return None
    return datetime.fromtimestamp(at / 1000, clock.now.tzinfo)


def period_forecast(
    clock: Clock, period_end_ms: int, spent_nanos: int, today_nanos: int, projected_nanos: int
) -> int:
    """Spend at the end of the period on the same assumption as `run_out`."""
    later_ms = max(period_end_ms - clock.day_end_ms, 0)
    later = round(Fraction(projected_nanos * later_ms, DAY_MS))
    return spent_nanos + (projected_nanos - today_nanos) + later


@dataclass(frozen=True, slots=True)
class Burn:
    workspace: str
    scope: str  # "ws" or "svc:<service>"
    service: str  # "" for the whole workspace
    day: date
    today_nanos: int  # spent today so far
    recent_nanos: int  # spent in the rate window
    window_ms: int
    projected_nanos: int  # today at midnight, at the recent rate
    baseline: Baseline | None  # None: no history to compare with
    multiple: Decimal
    min_nanos: int
    spent_nanos: int  # this budget period
    hard_nanos: int | None
    forecast_nanos: int  # this period at its end, at today's projected pace
    runs_out: datetime | None  # when the hard limit is reached at that pace

    @property
    def baseline_nanos(self) -> int | None:
        return None if self.baseline is None else self.baseline.nanos

    @property
    def ratio(self) -> Fraction | None:
        """Projected today over a usual day; None without history or a usual day of $0."""
        if not self.baseline_nanos:
            return None
        return Fraction(self.projected_nanos, self.baseline_nanos)

    @property
    def alert(self) -> bool:
        if self.baseline is None or self.today_nanos < max(self.min_nanos, 1):
            return False
        ratio = self.ratio
        return ratio is None or ratio >= self.multiple  # None here: a $0 scope woke up

    @property
    def label(self) -> str:
        where = f"workspace {self.workspace}"
        return f"service {self.service} in {where}" if self.service else where

    def to_dict(self) -> dict[str, Any]:
        ratio = self.ratio
        return {
            "workspace": self.workspace,
            "scope": self.scope,
            "service": self.service or None,
            "day": self.day.isoformat(),
            "today_usd": usd(self.today_nanos),
            "recent_usd_per_hour": usd(
                round(Fraction(self.recent_nanos * HOUR_MS, self.window_ms))
            ),
            "projected_usd": usd(self.projected_nanos),
            "baseline_usd": None if self.baseline is None else usd(self.baseline.nanos),
            "baseline_days": []
            if self.baseline is None
            else [d.isoformat() for d in self.baseline.days],
            "ratio": None if ratio is None else ratio_text(ratio),
            "alert_multiple": str(self.multiple),
            "alert": self.alert,
            "spent_usd": usd(self.spent_nanos),
            "hard_limit_usd": None if self.hard_nanos is None else usd(self.hard_nanos),
            "forecast_usd": usd(self.forecast_nanos),
            "runs_out_on": self.runs_out.date().isoformat() if self.runs_out else None,
        }


def burn_state(policy: Policy, hashes: Hashes, now: datetime) -> list[Burn]:
    """Every workspace and each of its services, as of `now`, from the `burn_reads` hashes."""
    clock = clock_at(now, policy)
    out: list[Burn] = []
    for ws in policy.workspaces.values():
        keys = _keys(ws, clock, policy)
        period = period_at(ws.period, clock.now_ms, policy.timezone)
        history = {d: hashes.get(keys[f"day:{d.isoformat()}"], {}) for d in clock.history()}
        available = {d for d, h in history.items() if WORKSPACE_SCOPE in h}
        today = hashes.get(keys["today"], {})
        spent = hashes.get(keys["spent"], {})
        window = [hashes.get(keys[f"hour:{h}"], {}) for h in clock.window_hours]
        for scope, service, hard in scopes_of(ws):
            today_nanos = today.get(scope, 0)
            recent = sum(h.get(scope, 0) for h in window)
            projected = project_day(today_nanos, recent, clock)
            baseline = choose_baseline(
                {d: h.get(scope, 0) for d, h in history.items()}, available, clock.today
            )
            spent_nanos = spent.get(scope, 0)
            out.append(
                Burn(
                    workspace=ws.name,
                    scope=scope,
                    service=service,
                    day=clock.today,
                    today_nanos=today_nanos,
                    recent_nanos=recent,
                    window_ms=clock.window_ms,
                    projected_nanos=projected,
                    baseline=baseline,
                    multiple=ws.burn_alert_multiple,
                    min_nanos=ws.burn_alert_min_nanos,
                    spent_nanos=spent_nanos,
                    hard_nanos=hard,
                    forecast_nanos=period_forecast(
                        clock, period.end_ms, spent_nanos, today_nanos, projected
                    ),
                    runs_out=None
                    if hard is None
                    else run_out(
                        clock, period.end_ms, spent_nanos, today_nanos, projected, recent, hard
                    ),
                )
            )
    return out


# --- words ---------------------------------------------------------------------------------


def ratio_text(ratio: Fraction) -> str:
    return str((Decimal(ratio.numerator) / ratio.denominator).quantize(Decimal("0.01")))


def alert_text(b: Burn) -> str:
    assert b.baseline is not None
    ratio = b.ratio
    pace = (
        f"{ratio_text(ratio)}x {b.baseline.describe()} ({_dollars(b.baseline.nanos)})"
        if ratio is not None
        else f"against {_dollars(0)} on {b.baseline.describe()}"
    )
    text = (
        f"extproc: burn rate alert for {b.label}: today is heading for "
        f"{_dollars(b.projected_nanos)}, {pace}. Spent so far today: {_dollars(b.today_nanos)}."
    )
    if b.hard_nanos is None:
        return text
    if b.runs_out is None:
        return f"{text} At this pace the {_dollars(b.hard_nanos)} hard limit holds this period."
    if b.spent_nanos >= b.hard_nanos:
        return f"{text} The {_dollars(b.hard_nanos)} hard limit is already reached."
    when = b.runs_out.strftime("%Y-%m-%d %H:%M %Z")
    return (
        f"{text} At this pace the {_dollars(b.hard_nanos)} hard limit is reached on {when} "
        "and calls will be refused."
    )


def _dollars(nanos: int) -> str:
    return usd_for_people(nanos)


def burn_alert(b: Burn) -> Alert:
    details = b.to_dict()
    for key in ("workspace", "scope"):
        details.pop(key)
    return Alert("burn_rate", b.workspace, b.scope, alert_text(b), details)


def alerted_key(b: Burn) -> str:
    return burn_alerted_key(b.workspace, b.day.isoformat(), b.scope)


# --- the watch -----------------------------------------------------------------------------


class Sender(Protocol):
    def send(self, alert: Alert) -> None: ...


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class BurnWatch:
    """Runs the burn check on a timer in every replica; Redis decides who sends each alert."""

    def __init__(
        self,
        client: AsyncClient,
        policy_getter: Callable[[], Policy | None],
        alerter: Sender,
        telemetry: Telemetry,
        *,
        now_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self._redis = client
        self._policy = policy_getter
        self._alerter = alerter
        self._telemetry = telemetry
        self._now_ms = now_ms
        self.sent = 0

    async def read(self, policy: Policy, now: datetime) -> dict[str, dict[str, int]]:
        reads = burn_reads(policy, now)
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, fields in reads.items():
                pipe.hmget(key, list(fields))
            results = await pipe.execute()
        hashes: dict[str, dict[str, int]] = {}
        for (key, fields), values in zip(reads.items(), results, strict=True):
            found = {f: int(v) for f, v in zip(fields, values, strict=True) if v is not None}
            if found:
                hashes[key] = found
        return hashes

    async def check_once(self) -> list[Burn]:
        """One look at every workspace; returns the states (alerts already sent)."""
        policy = self._policy()
        if policy is None:
            return []
        now = datetime.fromtimestamp(self._now_ms() / 1000, policy.timezone)
        hashes = await self.read(policy, now)
        states = burn_state(policy, hashes, now)
        for workspace, scope, ratio in utilization(policy, hashes, now):
            self._telemetry.budget_utilization(workspace, scope, ratio)
        for b in states:
            if b.ratio is not None:
                self._telemetry.burn_rate(b.workspace, b.service, float(b.ratio))
        alerting = [b for b in states if b.alert]
        if alerting:
            async with self._redis.pipeline(transaction=False) as pipe:
                for b in alerting:
                    pipe.set(alerted_key(b), "1", nx=True, ex=ALERT_TTL_S)
                first = await pipe.execute()
            for b, ours in zip(alerting, first, strict=True):
                if ours:
                    self._alerter.send(burn_alert(b))
                    self.sent += 1
        return states

    async def run(self, interval: float = CHECK_INTERVAL_S) -> None:
        while True:
            try:
                await self.check_once()
            except UNAVAILABLE as exc:
                log.warning("burn watch: redis unavailable (%s); next look in %ss", exc, interval)
            except Exception:
                log.exception("burn watch: unexpected error; next look in %ss", interval)
            await asyncio.sleep(interval)  # the check's period, not synchronisation
