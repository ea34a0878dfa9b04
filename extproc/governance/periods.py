"""Budget periods: which calendar month, ISO week or day an instant falls in, in a time zone.

Budgets reset at local midnight of the workspace's time zone, not UTC: a Berlin team's
monthly budget must not roll over at 01:00 on the 1st. Everything takes the instant as
an argument so tests drive rollovers with an injected clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

PERIODS = ("month", "week", "day")


@dataclass(frozen=True, slots=True)
class Period:
    kind: str
    id: str  # "2026-11", "2026-W48", "2026-11-27": part of every Redis key of the period
    start: datetime
    end: datetime

    @property
    def end_ms(self) -> int:
        return int(self.end.timestamp() * 1000)

    def elapsed_fraction(self, now: datetime) -> float:
        total = (self.end - self.start).total_seconds()
        return min(max((now - self.start).total_seconds() / total, 0.0), 1.0)


def _midnight(dt: datetime) -> datetime:
    return dt.replace(hour=0, minute=0, second=0, microsecond=0)


def _local(naive: datetime, tz: ZoneInfo) -> datetime:
    """Attach a zone to a local wall-clock time (midnight exists in every zone we care about)."""
    return naive.replace(tzinfo=tz)


_recent: dict[tuple[str, ZoneInfo], tuple[int, int, Period]] = {}
"""The last period computed per (kind, zone) with its bounds in ms: every request asks."""


def period_at(kind: str, now_ms: int, tz: ZoneInfo) -> Period:
    """The period of `kind` that `now_ms` falls in, in zone `tz`.

    Every request asks (its plan, its settlement), nearly always for the same period as
    the request before: the last answer is reused while `now_ms` lies within its bounds,
    so the datetime arithmetic runs about once a period instead of twice a request.
    """
    recent = _recent.get((kind, tz))
    if recent is not None and recent[0] <= now_ms < recent[1]:
        return recent[2]
    period = _period_at(kind, now_ms, tz)
    _recent[(kind, tz)] = (int(period.start.timestamp() * 1000), period.end_ms, period)
    return period


def _period_at(kind: str, now_ms: int, tz: ZoneInfo) -> Period:
    now = datetime.fromtimestamp(now_ms / 1000, tz)
    day = _midnight(now).replace(tzinfo=None)
    if kind == "day":
        start, end = day, day + timedelta(days=1)
        pid = start.strftime("%Y-%m-%d")
    elif kind == "week":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
        iso = start.isocalendar()
        pid = f"{iso.year}-W{iso.week:02d}"
    elif kind == "month":
        start = day.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
        pid = start.strftime("%Y-%m")
    else:
        raise ValueError(f"unknown period {kind!r} (expected one of {', '.join(PERIODS)})")
    return Period(kind, pid, _local(start, tz), _local(end, tz))


def previous(period: Period) -> Period:
    before = int(period.start.timestamp() * 1000) - 1
    return period_at(period.kind, before, period.start.tzinfo)  # type: ignore[arg-type]
