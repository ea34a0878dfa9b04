"""Writing a call's bill onto its usage record: every part, the tier, the versions.

One function both the metered endpoints (`decisions.settle`) and the priced passthrough
calls (`passthrough.settle_passthrough`) use, so a record always carries the same facts:
the token counts by kind, the tool calls by type, the rate card and long-context tier,
where the rates came from, and both price versions. The cost is the exact sum of the parts.
"""

from __future__ import annotations

from extproc.metering.prices import Charge, PriceTable
from extproc.v1.ledger_pb2 import UsageRecord
from extproc.wire.billing import NO_TOOL_REQUEST, ToolRequest
from extproc.wire.usage import Usage


def stamp_versions(record: UsageRecord, prices: PriceTable) -> None:
    record.price_version = prices.version
    record.catalogue_version = prices.catalogue_version
    record.override_version = prices.override_version


def bill(
    record: UsageRecord,
    prices: PriceTable,
    model: str,
    usage: Usage,
    request: ToolRequest = NO_TOOL_REQUEST,
) -> Charge:
    """Price `usage` for `model` and write the counts, parts and cost onto `record`."""
    record.input_tokens = usage.input_tokens
    record.cached_input_tokens = usage.cached_input_tokens
    record.output_tokens = usage.output_tokens
    record.reasoning_tokens = usage.reasoning_tokens
    # The rarer kinds only when present: unset protobuf fields read as 0 and cost nothing.
    if usage.cache_write_tokens or usage.input_audio_tokens:
        record.cache_write_tokens = usage.cache_write_tokens
        record.input_audio_tokens = usage.input_audio_tokens
    if usage.output_audio_tokens or usage.output_image_tokens:
        record.output_audio_tokens = usage.output_audio_tokens
        record.output_image_tokens = usage.output_image_tokens
    record.service_tier = usage.service_tier
    tools = usage.tools
    if tools:
        record.web_search_calls = tools.web_search
        record.file_search_calls = tools.file_search
        record.code_interpreter_containers = tools.code_interpreter
        record.image_generations = len(tools.images)
    charge = prices.charge(model or "unknown", usage, request)
    record.cost_nanos = charge.nanos
    record.price_family = charge.family
    if charge.fallback:
        record.price_fallback = record.price_provisional = True
    record.price_tier = charge.tier
    if charge.threshold:
        record.price_threshold = charge.threshold
    record.price_source = charge.origin
    add = record.parts.add
    for kind, quantity, rate, detail in charge.parts:
        part = add()
        part.kind, part.quantity, part.rate = kind, quantity, rate
        if detail:
            part.detail = detail
    return charge
