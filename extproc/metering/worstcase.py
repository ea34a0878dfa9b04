"""Prices as the caps see them: whether a model is priced, what a request may cost at most.

The passthrough holds and settlements, the refusal that says what a request could have
cost, and the self-service view's "typical request" all ask the price table through these
few functions and nowhere else, so a change of price source touches this module only.
(The hold of every request itself is priced by `governance.budget.plan_request`.)
"""

from __future__ import annotations

from extproc.metering.prices import Charge, PriceTable
from extproc.wire.usage import Usage


def is_priced(prices: PriceTable, model: str) -> bool:
    """True when the table has a row for `model`: its calls can be billed exactly."""
    return prices.family_of(model) is not None


def priced_charge(prices: PriceTable, model: str, usage: Usage) -> Charge | None:
    """What `usage` on `model` costs, or None when nothing prices the model."""
    if not model or not is_priced(prices, model):
        return None
    return prices.charge(model, usage)


def worst_case_nanos(prices: PriceTable, model: str, input_tokens: int, output_tokens: int) -> int:
    """The hold of a request: all its input uncached, every output token it may write
    (as `plan_request` prices it)."""
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    return prices.charge(model, usage).nanos


def token_rates(prices: PriceTable, model: str) -> tuple[int, int]:
    """(uncached input, output) nano-dollars per token on `model`, as a hold prices them."""
    price, _known = prices.price_for(model)
    per_input, _per_cached, per_output = price.nanos
    return per_input, per_output
