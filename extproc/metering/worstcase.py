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
    """True when a row prices `model` exactly (the catalogue or the override file); a model
    billed at its class's provisional rate is not priced here."""
    return prices.row(model) is not None


def priced_charge(prices: PriceTable, model: str, usage: Usage) -> Charge | None:
    """What `usage` on `model` costs, or None when nothing prices the model."""
    if not model or not is_priced(prices, model):
        return None
    return prices.charge(model, usage)


def worst_case_nanos(prices: PriceTable, model: str, input_tokens: int, output_tokens: int) -> int:
    """The hold of a request: all its input uncached, every output token it may write
    (as `plan_request` prices it)."""
    return prices.reserve_nanos(model, input_tokens, output_tokens)


def token_rates(prices: PriceTable, model: str, input_tokens: int) -> tuple[int, int]:
    """(input, output) nano-dollars per MILLION tokens on `model`, as a hold prices them
    (rates need not be whole nano-dollars per token)."""
    return prices.hold_rates(model, input_tokens)
