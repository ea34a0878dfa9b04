"""The spend report's arithmetic: straight-line forecasts, periods, shares.

Plain functions of integers and dates, so each figure can be checked by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from zoneinfo import ZoneInfo

from extproc.governance.periods import Period, period_at, previous
from extproc.store.schema import (
    GROUP_PREFIXES,
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
