"""The usage record of a passthrough call (an OpenAI endpoint other than the metered four).

A pure function of what was seen, like `decisions.settle`. Three pricing rules, chosen per
endpoint in `extproc.wire.paths`:

* free: the call costs nothing at the provider; recorded with cost 0, `price_family: free`.
* usage: the answer reports token usage (gpt-image-1 generations, Responses compaction);
  priced exactly from the price table when the model has a row there (an image model's
  output tokens at its output-image rate). An image request whose usage includes image
  input tokens (priced differently from text), a model without a row, or an answer without
  usage falls back to the next rule: it is never guessed.
* unpriced: the call may cost money the answer does not state; recorded with cost 0 and
  `price_family: unpriced`, so reports can show it and a reconciler can settle it later.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from extproc.metering.bill import bill, stamp_versions
from extproc.metering.prices import PriceTable
from extproc.v1.ledger_pb2 import UsageRecord
from extproc.wire.endpoints import load_json, model_of
from extproc.wire.paths import Pricing, Target
from extproc.wire.responses import response_usage
from extproc.wire.usage import Usage

IMAGES_PATH = "/v1/images/"
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
        endpoint=target.name,
        status=seen.status,
        session_id=seen.session_id,
        envoy_request_id=seen.envoy_request_id,
        duration_ms=seen.duration_ms,
        model_requested=seen.request_model,
        outcome=_outcome(seen),
    )
    stamp_versions(record, prices)
    pricing = target.api.pricing if target.api is not None else Pricing.FREE
    if seen.answered_locally or not 200 <= seen.status < 300:
        pricing = Pricing.FREE  # nothing was served (or the provider refused): no charge
    record.price_family = FREE_FAMILY if pricing is Pricing.FREE else UNPRICED_FAMILY
    if pricing is not Pricing.USAGE or seen.response_body is None:
        return record
    answer = load_json(seen.response_body)
    usage = usage_of(answer)
    if usage is not None and target.path.startswith(IMAGES_PATH) and not usage.output_image_tokens:
        # An image model's output is the image: its output tokens are image tokens.
        usage = replace(usage, output_image_tokens=usage.output_tokens)
    served = (model_of(answer) if isinstance(answer, dict) else None) or seen.request_model
    record.model_served = served
    if usage is None or not served or prices.family_of(served) is None:
        return record
    bill(record, prices, served, usage)
    return record


def _outcome(seen: PassthroughSeen) -> str:
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
