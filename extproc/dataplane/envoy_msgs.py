"""Builders for the ext_proc messages the sidecar sends back to Envoy.

Kept apart from the stream handler so the handler reads as a sequence of decisions.
Envoy reads only `HeaderValue.raw_value`, so every header we set goes there. Replies
that carry no change are built once and reused: they sit on every request's path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeAlias

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

ProcessingRequest: TypeAlias = pb.ProcessingRequest
ProcessingResponse: TypeAlias = pb.ProcessingResponse
ProcessingMode: TypeAlias = processing_mode_pb2.ProcessingMode

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

CONTINUE_REQUEST_HEADERS: ProcessingResponse = pb.ProcessingResponse(
    request_headers=pb.HeadersResponse()
)
CONTINUE_REQUEST_BODY: ProcessingResponse = pb.ProcessingResponse(request_body=pb.BodyResponse())
CONTINUE_RESPONSE_HEADERS: ProcessingResponse = pb.ProcessingResponse(
    response_headers=pb.HeadersResponse()
)
CONTINUE_RESPONSE_BODY: ProcessingResponse = pb.ProcessingResponse(response_body=pb.BodyResponse())

CONTINUE_METERED_REQUEST_HEADERS: ProcessingResponse = pb.ProcessingResponse(
    request_headers=pb.HeadersResponse(
        response=pb.CommonResponse(
            header_mutation=pb.HeaderMutation(remove_headers=["accept-encoding"])
        )
    )
)
"""Metered requests ask the upstream for an uncompressed answer: usage must be readable from
the bytes as they pass. (Envoy's compressor filter can still compress toward the client.)"""


def forward_request_headers(
    set_headers: Mapping[str, str], remove: Iterable[str]
) -> pb.ProcessingResponse:
    """Headers for the upstream: the workspace's real key in, the caller's own claims out."""
    reply = pb.ProcessingResponse()
    fill_mutation(reply.request_headers.response.header_mutation, set_headers, remove)
    return reply


SKIP_REST: ProcessingResponse = pb.ProcessingResponse(
    request_headers=pb.HeadersResponse(),
    mode_override=ProcessingMode(
        request_body_mode=ProcessingMode.NONE,
        response_header_mode=ProcessingMode.SKIP,
        response_body_mode=ProcessingMode.NONE,
    ),
)
"""Unmetered traffic: after its headers, the sidecar has nothing more to see."""

_STREAMED_BODY: ProcessingMode = ProcessingMode(response_body_mode=ProcessingMode.STREAMED)


def forward_passthrough(
    set_headers: Mapping[str, str],
    remove: Iterable[str],
    *,
    read_request: bool,
    read_response: bool,
) -> pb.ProcessingResponse:
    """Forward a passthrough call: key swapped, and only the phases its record needs.

    The response headers (its status) are always seen; bodies only when the call is priced
    from its answer. Uploads and downloads of any size stream through untouched otherwise.
    """
    reply = forward_request_headers(set_headers, remove)
    reply.mode_override.CopyFrom(
        ProcessingMode(
            request_body_mode=ProcessingMode.BUFFERED if read_request else ProcessingMode.NONE,
            response_header_mode=ProcessingMode.SEND,
            response_body_mode=ProcessingMode.BUFFERED if read_response else ProcessingMode.NONE,
        )
    )
    return reply


def header_map(headers: pb.HttpHeaders, wanted: frozenset[str]) -> dict[str, str]:
    """The wanted headers of an Envoy header map, as text (first value wins)."""
    found: dict[str, str] = {}
    for h in headers.headers.headers:
        key = h.key
        if key in wanted and key not in found:
            found[key] = h.raw_value.decode("latin-1") if h.raw_value else h.value
    return found


def request_header_map(
    headers: pb.HttpHeaders, wanted: frozenset[str], claimed_prefix: str
) -> tuple[dict[str, str], list[str]]:
    """`header_map`, plus the names of headers under `claimed_prefix`, in the same one pass:
    those are ours to write, so whatever a client sent under them is stripped."""
    found: dict[str, str] = {}
    claimed: list[str] = []
    for h in headers.headers.headers:
        key = h.key
        if key in wanted:
            if key not in found:
                found[key] = h.raw_value.decode("latin-1") if h.raw_value else h.value
        elif key.startswith(claimed_prefix):
            claimed.append(key)
    return found, claimed


MAX_HEADER_VALUE = 1024
"""Echoed values (model names, routing notes) longer than this are cut: a client-chosen
model name must not push a response past Envoy's header size limit."""


def header_value(value: str) -> bytes:
    """A header value Envoy accepts whatever text it carries.

    Visible ASCII passes unchanged (every value we write ourselves). Anything else (a
    client's full-width model name, a control character, a lone surrogate) is percent-encoded as
    UTF-8, the way RFC 8187 carries non-ASCII in headers: a mutation Envoy rejects would
    turn a served, billable response into an empty 500.
    """
    if len(value) > MAX_HEADER_VALUE:
        value = value[:MAX_HEADER_VALUE] + "..."
    if value.isascii() and value.isprintable():
        return value.encode("ascii")
    raw = value.encode("utf-8", "surrogatepass")
    return b"".join(bytes((b,)) if 0x20 <= b < 0x7F and b != 0x25 else b"%%%02X" % b for b in raw)


def header_mutation(
    set_headers: Mapping[str, str] | None = None, remove: Iterable[str] = ()
) -> pb.HeaderMutation:
    """Set (overwrite) and remove headers."""
    mutation = pb.HeaderMutation()
    fill_mutation(mutation, set_headers, remove)
    return mutation


def fill_mutation(
    mutation: pb.HeaderMutation,
    set_headers: Mapping[str, str] | None = None,
    remove: Iterable[str] = (),
) -> None:
    """Write the header changes into `mutation`, a field of the reply being built (and
    marked present even when empty).

    Built in place with `add()` and field assignment: about 3x less CPU than nested
    constructor calls, each of which copies its submessage in again; every reply with
    headers goes through here (a response's carries eight or so).
    """
    mutation.SetInParent()
    if set_headers:
        add = mutation.set_headers.add
        for key, value in set_headers.items():
            option = add()
            option.append_action = _OVERWRITE  # assigned: cheaper than add()'s keyword
            header = option.header
            header.key = key
            header.raw_value = header_value(value)
    if remove:
        mutation.remove_headers.extend(remove)


def replace_request_body(
    body: bytes | None,
    set_headers: Mapping[str, str],
    remove: Iterable[str] = (),
    *,
    clear_route_cache: bool = False,
) -> pb.ProcessingResponse:
    """Change the buffered request (body and/or headers, which Envoy still holds).

    `clear_route_cache` makes Envoy match the route again after our header change: that
    is how a routed model reaches a different upstream cluster.
    """
    reply = pb.ProcessingResponse()
    common = reply.request_body.response
    fill_mutation(common.header_mutation, set_headers, remove)
    common.clear_route_cache = clear_route_cache
    if body is not None:
        common.status = pb.CommonResponse.CONTINUE_AND_REPLACE
        common.body_mutation.body = body
    return reply


def response_headers(
    set_headers: Mapping[str, str], *, stream: bool, remove: Iterable[str] = ()
) -> pb.ProcessingResponse:
    """Add headers to the response; for SSE also switch its body to STREAMED, so every chunk
    reaches the client as soon as the sidecar has looked at it."""
    reply = pb.ProcessingResponse()
    fill_mutation(reply.response_headers.response.header_mutation, set_headers, remove)
    if stream:
        reply.mode_override.CopyFrom(_STREAMED_BODY)
    return reply


def replace_response_chunk(chunk: bytes) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        response_body=pb.BodyResponse(
            response=pb.CommonResponse(body_mutation=pb.BodyMutation(body=chunk))
        )
    )


def response_body_headers(set_headers: Mapping[str, str]) -> pb.ProcessingResponse:
    """Headers added while the buffered response body is held (they have not left Envoy yet)."""
    reply = pb.ProcessingResponse()
    fill_mutation(reply.response_body.response.header_mutation, set_headers)
    return reply


def immediate(
    status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> pb.ProcessingResponse:
    """Answer the client directly, in OpenAI's JSON error shape; the upstream is never called."""
    all_headers = {"content-type": "application/json", **(headers or {})}
    reply = pb.ProcessingResponse()
    answer = reply.immediate_response
    answer.status.code = status  # type: ignore[assignment]  # the enum field takes any int
    fill_mutation(answer.headers, all_headers)
    answer.body = body
    answer.details = "extproc"
    return reply
