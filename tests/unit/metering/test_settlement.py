"""`settlement_for`: where a finished request's cost counts, as a plain function of data."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from extproc.metering.prices import PriceTable, nanos_per_token
from extproc.metering.settlement import UNGOVERNED, CachePrefix, Charged, settlement_for
from extproc.store.schema import model_scope, service_scope, session_scope, workspace_prefix
from extproc.v1.ledger_pb2 import UsageRecord

PRICES = PriceTable.load()
BERLIN = ZoneInfo("Europe/Berlin")
LATE = datetime(2026, 11, 30, 23, 30, tzinfo=BERLIN)


def record(**fields: object) -> UsageRecord:
    base: dict[str, object] = {
        "request_id": "r1",
        "workspace": "dev",
        "service": "cli",
        "model_requested": "gpt-4o-mini",
        "model_served": "gpt-4o-mini-2024-07-18",
        "session_id": "s" * 300,
        "input_tokens": 2000,
        "cost_nanos": 1234,
    }
    return UsageRecord(**(base | fields))  # type: ignore[arg-type]


def test_charges_the_given_scopes_then_model_and_session() -> None:
    s = settlement_for(
        record(),
        [Charged("ws", 75), Charged("key:k1")],
        prefix=workspace_prefix("dev"),
        period_id="2026-11",
        local_time=LATE,
        prices=PRICES,
        reservation_id="rid",
        attributed=True,
    )
    assert [(c.scope, c.soft_nanos) for c in s.scopes] == [
        ("ws", 75),
        ("key:k1", -1),
        (model_scope("gpt-4o-mini-2024-07-18"), -1),
        (session_scope("", "s" * 300), -1),
    ]
    assert (s.prefix, s.reservation_id, s.period) == (workspace_prefix("dev"), "rid", "2026-11")
    assert (s.day, s.hour) == ("2026-11-30", "2026-11-30T23")  # the policy's clock, not UTC
    assert s.hygiene_scope == service_scope("cli") and s.prefix_fingerprint == ""


def test_unattributed_traffic_has_no_session_or_cache_counters() -> None:
    s = settlement_for(
        record(workspace=""),
        UNGOVERNED,
        prefix=workspace_prefix(""),
        period_id="2026-11",
        local_time=LATE,
        prices=PRICES,
        cache_prefix=CachePrefix("fp", 1500),
    )
    assert [c.scope for c in s.scopes] == ["ws", model_scope("gpt-4o-mini-2024-07-18")]
    assert s.prefix == workspace_prefix("") and s.hygiene_scope == ""


def test_a_cacheable_prefix_is_priced_at_the_served_models_miss_rate() -> None:
    s = settlement_for(
        record(),
        UNGOVERNED,
        prefix=workspace_prefix("dev"),
        period_id="2026-11",
        local_time=LATE,
        prices=PRICES,
        attributed=True,
        cache_prefix=CachePrefix("fp", 1500),
    )
    price, known = PRICES.price_for("gpt-4o-mini-2024-07-18")
    assert known
    miss = nanos_per_token(price.input) - nanos_per_token(price.cached_input)
    assert (s.prefix_fingerprint, s.prefix_tokens, s.miss_nanos_per_token) == ("fp", 1500, miss)
    assert miss > 0
    estimated = settlement_for(
        record(estimated=True),
        UNGOVERNED,
        prefix=workspace_prefix("dev"),
        period_id="2026-11",
        local_time=LATE,
        prices=PRICES,
        attributed=True,
        cache_prefix=CachePrefix("fp", 1500),
    )
    assert estimated.prefix_fingerprint == ""  # estimated usage says nothing about the cache
