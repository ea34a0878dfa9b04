"""The usage record of a passthrough call (an OpenAI endpoint other than the metered four).

A pure function of what was seen, like `decisions.settle`. Three pricing rules, chosen per
endpoint by its spec (`extproc.wire.spec`):

* free: the call costs nothing at the provider; recorded with cost 0, `price_family: free`.
* usage: the answer reports token usage (gpt-image-1 generations, Responses compaction);
  priced exactly from the price table when the model has a row there. Such a call was held
  against the budget before it was forwarded (see `dataplane.passthrough`); a streamed
  image generation's usage is read from its last event carrying one. When the answer carries
  no usage (cut, client gone) the call is billed like a metered call without usage: the
  input the sidecar counted, at the model's rate, marked `estimated`. An image request whose
  usage includes image input tokens (priced differently from text) is billed that way too;
  a model without a row falls back to the next rule: it is never guessed. An image model's
  output tokens are billed at its output-image rate.
* unpriced: the call may cost money the answer does not state; recorded with cost 0 and
  `price_family: unpriced`, so reports can show it and a reconciler can settle it later.

A call refused before it was forwarded (budget, rate limit, an unpriced model) costs
nothing and is recorded as `rejected`, like a refused metered call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from extproc.metering.bill import bill, stamp_versions
from extproc.metering.prices import PriceTable
from extproc.metering.worstcase import priced_charge
from extproc.v1.ledger_pb2 import UsageRecord
from extproc.wire.endpoints import load_json, model_of
from extproc.wire.errors import OpenAIError
from extproc.wire.paths import Target
from extproc.wire.priced import final_answer
from extproc.wire.responses import response_usage
from extproc.wire.spec import Pricing
from extproc.wire.usage import Usage

FREE_FAMILY = "free"
UNPRICED_FAMILY = "unpriced"


@dataclass(slots=True)
class PassthroughSeen:
    """What the sidecar saw of one passthrough call."""

    request_id: str
    time_ms: int
    target: Target
    envoy_request_id: str = ""
    session_id: str = ""
    status: int = 0
    request_model: str = ""
    response_body: bytes | None = None
    duration_ms: int = 0
    answered_locally: bool = False
    counted_input_tokens: int = 0  # priced calls: the request's input, counted before forwarding
    held: bool = False  # forwarded with a budget hold (so it may have cost money)
    rejected: OpenAIError | None = None  # refused by the sidecar, never forwarded

    @property
    def endpoint(self) -> str:
        """The ledger's name for the endpoint called."""
        return self.target.name


def usage_of(answer: Any) -> Usage | None:
    """Token usage in the Responses / Images shape (input_tokens, output_tokens)."""
    if not isinstance(answer, dict):
        return None
    usage = answer.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("input_tokens_details"), dict):
        image_tokens = usage["input_tokens_details"].get("image_tokens")
        if type(image_tokens) is int and image_tokens > 0:
            return None  # image input tokens have their own rate the table does not hold
    return response_usage(usage)


def settle_passthrough(seen: PassthroughSeen, prices: PriceTable) -> UsageRecord:
    target = seen.target
    record = UsageRecord(
        request_id=seen.request_id,
        time_ms=seen.time_ms,
        endpoint=seen.endpoint,
        status=seen.status,
        session_id=seen.session_id,
        envoy_request_id=seen.envoy_request_id,
        duration_ms=seen.duration_ms,
        model_requested=seen.request_model,
        counted_input_tokens=seen.counted_input_tokens,
        outcome=_outcome(seen),
    )
    stamp_versions(record, prices)
    spec = target.spec
    pricing = spec.pricing if spec is not None else Pricing.FREE
    if seen.rejected is not None:
        record.error_code = seen.rejected.code or seen.rejected.type
        pricing = Pricing.FREE
    elif seen.answered_locally or not (200 <= seen.status < 300 or _maybe_served(seen)):
        pricing = Pricing.FREE  # nothing was served (or the provider refused): no charge
    record.price_family = FREE_FAMILY if pricing is Pricing.FREE else UNPRICED_FAMILY
    if pricing is not Pricing.USAGE:
        return record
    answer = final_answer(seen.response_body) if seen.response_body is not None else None
    usage = usage_of(answer)
    image = spec is not None and spec.parts.output_is_image
    if usage is not None and image and not usage.output_image_tokens:
        # An image model's output is the image: its output tokens are image tokens.
        usage = replace(usage, output_image_tokens=usage.output_tokens)
    served = (model_of(answer) if isinstance(answer, dict) else None) or seen.request_model
    record.model_served = served
    if usage is None and seen.held:
        # Held and forwarded, but no usage came back: bill what was counted, as a floor.
        usage = Usage(input_tokens=seen.counted_input_tokens)
        record.estimated = True
        if record.outcome == "completed":
            record.outcome = "missing_usage"
    if usage is None:
        return record
    charge = priced_charge(prices, served, usage)
    if charge is None:
        return record
    bill(record, prices, served, usage)
    return record


def _maybe_served(seen: PassthroughSeen) -> bool:
    """No status seen, yet the call was held and forwarded: the provider may have run it."""
    return seen.status == 0 and seen.held


def orphaned_passthrough(seen: PassthroughSeen, prices: PriceTable) -> UsageRecord:
    """The record to write if this call's hold expires unsettled (its sidecar died): the
    input counted, at the model's rate, estimated; made when the hold is."""
    ghost = replace(seen, status=0, response_body=None, held=True, rejected=None)
    record = settle_passthrough(ghost, prices)
    record.outcome = "orphaned"
    return record


def _outcome(seen: PassthroughSeen) -> str:
    if seen.rejected is not None:
        return "rejected"
    if seen.answered_locally:
        return "answered"
    if seen.status == 0:
        return "client_gone"
    if seen.status >= 400:
        return "upstream_error"
    return "completed"


def request_model(body: bytes) -> str:
    """The `model` of a JSON request body, if it has one (images name theirs only there)."""
    parsed = load_json(body)
    model = parsed.get("model") if isinstance(parsed, dict) else None
    return model if isinstance(model, str) else ""
