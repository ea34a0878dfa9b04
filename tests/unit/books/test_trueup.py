"""The true-up: effective rates from the provider's bill, override rows that would have priced
the day right, and adjustment records that bring the ledger to the invoice exactly once."""

from __future__ import annotations

from datetime import date

from extproc.books.reconcile import ProviderDay, Tokens, reconcile
from extproc.books.trueup import (
    adjustment_counts,
    adjustments,
    effective_rates,
    mispriced,
    override_rows,
)
from extproc.metering.prices import PriceTable
from extproc.v1.ledger_pb2 import UsageRecord
from extproc.wire.usage import Usage

DAY = date(2026, 12, 6)
TABLE = PriceTable.load()


def ledger(n: int, model: str, usage: Usage) -> list[UsageRecord]:
    cost = TABLE.charge(model, usage).nanos
    return [
        UsageRecord(
            request_id=f"r{model}{i}",
            workspace="fin",
            model_served=model,
            outcome="completed",
            input_tokens=usage.input_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            output_tokens=usage.output_tokens,
            cost_nanos=cost,
        )
        for i in range(n)
    ]


def provider_day(model: str, n: int, usage: Usage, rates: tuple[int, int, int]) -> ProviderDay:
    """The provider billed n calls of `usage` at `rates` (nanos per 1M: input, cached, output)."""
    day = ProviderDay()
    uncached = usage.input_tokens - usage.cached_input_tokens
    day.tokens[("proj_fin", model)] = Tokens(
        n * usage.input_tokens, n * usage.cached_input_tokens, n * usage.output_tokens, n
    )
    for kind, tokens, rate in (
        ("input", uncached, rates[0]),
        ("cached input", usage.cached_input_tokens, rates[1]),
        ("output", usage.output_tokens, rates[2]),
    ):
        nanos = round(n * tokens * rate / 1_000_000)
        day.lines[("proj_fin", model, kind)] += nanos
        day.cost[("proj_fin", model)] += nanos
    return day


def test_a_provider_charging_other_rates_gets_rows_that_price_the_day_right() -> None:
    usage = Usage(1_000, 400, 200)
    # The provider charged $2.75 / $1.375 / $11 per 1M instead of $2.50 / $1.25 / $10.
    provider = provider_day("gpt-4o", 5, usage, (2_750_000_000, 1_375_000_000, 11_000_000_000))
    rates = {(r.model, r.kind): r for r in effective_rates(provider)}
    assert str(rates[("gpt-4o", "input")].usd_per_million) == "2.75"
    assert str(rates[("gpt-4o", "cached_input")].usd_per_million) == "1.375"
    wrong = mispriced(rates.values(), TABLE)
    assert set(wrong) == {"gpt-4o"}
    rows = override_rows(DAY, wrong)
    assert '[models."gpt-4o"]' in rows and 'output = "11"' in rows
    # The rows are valid price-file rows, and with them the day is priced as billed.
    fixed = PriceTable.from_toml(f'version = "t"\nupdated = 2026-12-07\n{rows}\n')
    assert 5 * fixed.charge("gpt-4o", usage).nanos == provider.cost[("proj_fin", "gpt-4o")]
    # A model billed at the table's rates is not listed.
    agreed = provider_day("gpt-4o", 5, usage, (2_500_000_000, 1_250_000_000, 10_000_000_000))
    assert mispriced(effective_rates(agreed), TABLE) == {}


def test_adjustments_bring_the_ledger_to_the_bill_once() -> None:
    usage = Usage(1_000, 400, 200)
    records = ledger(5, "gpt-4o", usage)
    provider = provider_day("gpt-4o", 5, usage, (2_750_000_000, 1_375_000_000, 11_000_000_000))
    rec = reconcile(DAY, {"fin": "proj_fin"}, provider, records)
    planned = adjustments(rec, TABLE.version, adjustment_counts(records))
    (adj,) = planned
    assert adj.outcome == "adjustment" and adj.price_source == "true-up"
    assert adj.cost_nanos == provider.cost[("proj_fin", "gpt-4o")] - sum(
        r.cost_nanos for r in records
    )
    assert adj.request_id == "true-up:2026-12-06:fin:gpt-4o:1"
    assert "gpt-4o" in adj.adjustment and adj.time_ms % 86_400_000 == 86_399_999
    # Once written, the ledger agrees with the bill: nothing more to adjust.
    again = reconcile(DAY, {"fin": "proj_fin"}, provider, [*records, adj])
    assert again.drift_nanos == 0
    assert adjustments(again, TABLE.version, adjustment_counts([*records, adj])) == []
    # The adjustment moved money, not tokens: the token comparison is unchanged.
    assert again.rows[0].lines[0].ledger.requests == 5


def test_rounding_alone_is_not_adjusted() -> None:
    """Each record rounds up to a whole nano-dollar; the provider's line rounds once."""
    usage = Usage(3, 3, 1, service_tier="flex")  # 37.5 nanos per cached token on flex
    records = ledger(4, "gpt-5.4-mini", usage)
    provider = ProviderDay()
    provider.tokens[("proj_fin", "gpt-5.4-mini")] = Tokens(12, 12, 4, 4)
    exact = sum(p.femtos for p in TABLE.charge("gpt-5.4-mini", usage).parts) * 4
    provider.cost[("proj_fin", "gpt-5.4-mini")] = round(exact / 1_000_000)
    rec = reconcile(DAY, {"fin": "proj_fin"}, provider, records)
    assert 0 < abs(rec.drift_nanos) <= 4
    assert adjustments(rec, TABLE.version, {}) == []
