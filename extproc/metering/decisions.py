"""Metering decisions as plain functions of data: what to forward, and what to bill.

Nothing here does I/O. `parse_request` turns a raw request body into the facts we bill by
and the parsed object routing may still rewrite; `finalize` says what body the upstream
receives; `settle` turns what was seen of the response into exactly one usage record. The
data plane moves bytes between Envoy and these functions (and builds the HTTP mutations
that go with a new body), which keeps the money logic testable without Envoy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from extproc.metering.bill import bill, stamp_versions
from extproc.metering.prices import PriceTable
from extproc.v1.ledger_pb2 import UsageRecord
from extproc.wire.billing import NO_TOOL_REQUEST
from extproc.wire.bodies import decode_body, encode_json, parse_json_object
from extproc.wire.endpoints import Endpoint, RequestFacts, StreamOutcome, count_input_tokens
from extproc.wire.errors import OpenAIError
from extproc.wire.spec import EndpointSpec
from extproc.wire.usage import ToolCalls, Usage

IDENTITY = ("", "identity")


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    facts: RequestFacts
    counted_input_tokens: int
    # True when we added stream_options.include_usage the client never asked for.
    injected_usage: bool = False
    # The parsed body, kept so routing can still rewrite it before it is serialised.
    parsed: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    encoded: bool = False  # the client compressed it (a new body goes up uncompressed)


def parse_request(
    endpoint: Endpoint,
    raw: bytes,
    content_encoding: str,
    *,
    max_body_bytes: int,
    count: Callable[[str, str], int],
) -> PreparedRequest:
    """Decode, parse, validate and count one request body; raise OpenAIError when it is bad.

    The body is parsed once and kept (`parsed`) for routing; `finalize` serialises it
    only if something changed.
    """
    if len(raw) > max_body_bytes:
        raise OpenAIError(
            413,
            f"Request body is {len(raw)} bytes; the limit is {max_body_bytes} bytes.",
            "invalid_request_error",
            None,
            "request_too_large",
        )
    encoded = content_encoding.strip().lower() not in IDENTITY
    data = decode_body(raw, content_encoding, max_decoded=max_body_bytes) if encoded else raw
    body = parse_json_object(data)
    facts = endpoint.facts(body)
    model = facts.model
    counted = count_input_tokens(endpoint, body, lambda text: count(text, model))
    injected = endpoint.prepare_upstream(body, facts)
    return PreparedRequest(facts, counted, injected_usage=injected, parsed=body, encoded=encoded)


def finalize(prepared: PreparedRequest, *, rewritten: bool = False) -> bytes | None:
    """The body the upstream gets, or None to forward the client's own.

    When the body changed (usage reporting switched on, routing rewrote it), it is
    re-serialised from the parsed object and sent uncompressed, so the upstream parses
    exactly the object we counted and priced.
    """
    if not (prepared.injected_usage or rewritten) or prepared.parsed is None:
        return None
    return encode_json(prepared.parsed)


@dataclass(slots=True)
class Observed:
    """Everything the sidecar saw of one exchange, filled in phase by phase."""

    request_id: str = ""
    envoy_request_id: str = ""
    time_ms: int = 0
    spec: EndpointSpec | None = None  # None: a path that is no endpoint we know
    session_id: str = ""
    facts: RequestFacts | None = None
    counted_input_tokens: int = 0
    status: int = 0
    response_finished: bool = False
    usage: Usage | None = None
    served_model: str | None = None
    routed_model: str | None = None  # what routing sent upstream (when the answer never said)
    stream: StreamOutcome | None = None
    rejected: OpenAIError | None = None
    duration_ms: int = 0

    @property
    def endpoint(self) -> str:
        """The ledger's name for the endpoint ("unknown" for a path that is none)."""
        spec = self.spec
        return spec.name if spec is not None else "unknown"


def _outcome(seen: Observed) -> tuple[str, bool]:
    """(outcome, bill_from_estimate) for an exchange."""
    if seen.rejected is not None:
        return "rejected", False
    stream = seen.stream
    if seen.usage is not None:
        if stream is not None and stream.terminal in ("incomplete", "failed", "error"):
            return stream.terminal, False
        return "completed", False
    if seen.status and not 200 <= seen.status < 300:
        return "upstream_error", False
    if not seen.response_finished:
        # Response headers seen means a stream was under way when it was cut (by the upstream
        # or by the client leaving); none seen means the client left before any answer.
        return ("cut" if seen.status else "client_gone"), True
    if stream is not None:
        if stream.terminal == "error":
            return "error", True
        if stream.terminal is None:
            return "cut", True
    return "missing_usage", True


# Lone surrogates, written as code points: mypyc cannot compile them as string literals.
_SURROGATES_FROM = chr(0xD800)
_SURROGATES_TO = chr(0xDFFF)


def utf8_text(value: str) -> str:
    """`value` as valid UTF-8 text: lone surrogates (a JSON "\\ud800" escape) become U+FFFD.

    Client-chosen strings (model names, cache keys) end up in the protobuf record and in
    Redis arguments, and both refuse text that is not valid UTF-8.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if _SURROGATES_FROM <= c <= _SURROGATES_TO else c for c in value)
    return value


def settle(
    seen: Observed,
    prices: PriceTable,
    count_output: Callable[[str, str], int],
) -> UsageRecord:
    """The one usage record for an exchange.

    Provider usage is billed as reported. Without it, a request the upstream may have
    processed is billed from our own counts (input counted before forwarding, output
    counted from the deltas seen) and marked estimated: never silently $0. Upstream
    errors without usage and requests we rejected ourselves cost nothing, visibly so.
    """
    facts = seen.facts
    requested = utf8_text(facts.model) if facts else ""
    served = utf8_text(seen.served_model or seen.routed_model or requested)
    outcome, estimate = _outcome(seen)
    usage = seen.usage
    if estimate:
        output_text = seen.stream.output_text if seen.stream else ""
        usage = Usage(
            input_tokens=seen.counted_input_tokens,
            output_tokens=count_output(output_text, served) if output_text else 0,
            tools=seen.stream.tools_seen if seen.stream else ToolCalls(),
        )
    usage = usage or Usage()
    if facts is not None and outcome == "completed" and _searches_per_request(seen.spec, facts):
        # A search model searches once per request; the answer never says so.
        usage = replace(usage, tools=replace(usage.tools, web_search=1))
    record = _record(seen, requested, served, outcome, estimate, seen.status, seen.duration_ms)
    stamp_versions(record, prices)
    error = seen.rejected or (seen.stream.error if seen.stream else None)
    if error is not None:
        record.error_code = error.code or error.type
    if usage.total_tokens or usage.tools:
        bill(record, prices, served or "unknown", usage, facts.tools if facts else NO_TOOL_REQUEST)
    return record


def _record(
    seen: Observed,
    requested: str,
    served: str,
    outcome: str,
    estimated: bool,
    status: int,
    duration_ms: int,
) -> UsageRecord:
    facts = seen.facts
    return UsageRecord(
        request_id=seen.request_id,
        time_ms=seen.time_ms,
        endpoint=seen.endpoint,
        model_requested=requested,
        model_served=served,
        stream=bool(facts and facts.stream),
        status=status,
        counted_input_tokens=seen.counted_input_tokens,
        estimated=estimated,
        outcome=outcome,
        session_id=utf8_text(seen.session_id),
        envoy_request_id=seen.envoy_request_id,
        duration_ms=duration_ms,
        output_cap=(facts.output_cap or 0) if facts else 0,
    )


def _searches_per_request(spec: EndpointSpec | None, facts: RequestFacts) -> bool:
    return (
        spec is not None
        and spec.parts.search_per_request
        and "web_search_preview" in facts.tools.kinds
    )


class Seen(Protocol):
    """What any exchange saw of its request, enough for a record when settling failed."""

    request_id: str
    time_ms: int
    status: int
    counted_input_tokens: int

    @property
    def endpoint(self) -> str: ...


def bare_record(seen: Seen) -> UsageRecord:
    """The record written when settling itself failed: one record must land whatever broke,
    marked as such and billed from what was counted."""
    return UsageRecord(
        request_id=seen.request_id,
        time_ms=seen.time_ms,
        endpoint=seen.endpoint,
        status=seen.status,
        input_tokens=seen.counted_input_tokens,
        counted_input_tokens=seen.counted_input_tokens,
        estimated=True,
        outcome="error",
        error_code="extproc_internal_error",
    )
