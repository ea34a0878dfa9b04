"""What the ledger writes for one finished request: the record and where its cost counts.

A pure function of data, beside the ledger that ships it: the data plane decides *which*
scopes a request is charged to (the same ones its reservation checked, see
`governance.budget.charged_scopes`), this module adds the scopes every request carries
(its model, its session) and the clock-derived buckets (period, day, hour), and prices the
prompt-cache misses the settle script counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from extproc.metering.prices import PriceTable
from extproc.store.schema import (
    WORKSPACE_SCOPE,
    model_scope,
    service_scope,
    session_scope,
    workspace_prefix,
)
from extproc.v1.ledger_pb2 import Settlement, UsageRecord

NO_SOFT_LIMIT = -1
"""What the settle script reads as "this scope has no soft limit to alert on"."""


@dataclass(frozen=True, slots=True)
class Charged:
    """One scope a request's cost is added to, and its soft limit (None: no alert)."""

    scope: str
    soft_nanos: int | None = None


UNGOVERNED = (Charged(WORKSPACE_SCOPE),)
"""Traffic no key attributes is still counted, against the unattributed workspace."""


@dataclass(frozen=True, slots=True)
class CachePrefix:
    """The request's cacheable prompt prefix, as fingerprinted before forwarding."""

    fingerprint: str  # "" when too short to be cached
    tokens: int
    request: str = ""  # the whole request's fingerprint (for the runaway breaker)


_buckets: dict[tuple[int, int, int, int], tuple[str, str]] = {}


def _day_and_hour(local_time: datetime) -> tuple[str, str]:
    """The day and hour bucket names: formatted once per hour, not twice per settlement."""
    at = (local_time.year, local_time.month, local_time.day, local_time.hour)
    names = _buckets.get(at)
    if names is None:
        if len(_buckets) > 64:
            _buckets.clear()
        names = (local_time.strftime("%Y-%m-%d"), local_time.strftime("%Y-%m-%dT%H"))
        _buckets[at] = names
    return names


def settlement_for(
    record: UsageRecord,
    charged: Sequence[Charged],
    *,
    period_id: str,
    local_time: datetime,
    prices: PriceTable,
    reservation_id: str = "",
    attributed: bool = False,
    prefix: CachePrefix | None = None,
) -> Settlement:
    """The settlement of a finished request, its record already attributed and priced.

    `attributed`: a key named the caller, so its session and its service's prompt-cache
    counters are kept (unattributed traffic has no service to tell apart).
    """
    day, hour = _day_and_hour(local_time)
    # Filled in place (nested constructors copy each submessage once more); this runs
    # twice a request: the orphan carried by the hold, then the settlement itself.
    settlement = Settlement(
        prefix=workspace_prefix(record.workspace),
        reservation_id=reservation_id,
        period=period_id,
        day=day,
        hour=hour,
    )
    add = settlement.scopes.add
    for c in charged:
        add(scope=c.scope, soft_nanos=NO_SOFT_LIMIT if c.soft_nanos is None else c.soft_nanos)
    model = record.model_served or record.model_requested
    if model:
        add(scope=model_scope(model), soft_nanos=NO_SOFT_LIMIT)
    if record.session_id and attributed:
        add(scope=session_scope(record.key_id, record.session_id), soft_nanos=NO_SOFT_LIMIT)
    settlement.record.CopyFrom(record)
    if prefix is not None and attributed:
        # On the record: the runaway breaker reads repeats from the ledger it watches.
        settlement.record.request_fingerprint = prefix.request
    if attributed and record.input_tokens:
        settlement.hygiene_scope = service_scope(record.service)
        if prefix is not None and prefix.fingerprint and not record.estimated:
            settlement.prefix_fingerprint = prefix.fingerprint
            settlement.prefix_tokens = prefix.tokens
            settlement.miss_nanos_per_token = prices.miss_nanos_per_token(
                record.model_served or "unknown"
            )
    return settlement
