"""What the metered OpenAI endpoints have in common: the `Endpoint` protocol and helpers.

Each endpoint module (chat, completions, responses, embeddings) knows its own request
and response shapes and builds on the helpers here; `endpoints` holds the table of them,
and the stream handler only sees the `Endpoint` protocol, so adding an endpoint never
touches the request path.

Request validation is deliberately narrow: only the fields we meter on are checked,
with the same error shape OpenAI uses, because a request we cannot read correctly
must not be forwarded and billed on a guess. Response parsing is the opposite: a
provider's odd or partial output never raises, it just yields less information.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from extproc.wire.billing import NO_TOOL_REQUEST, ToolRequest
from extproc.wire.billing import read_usage as read_usage  # the endpoints read usage here
from extproc.wire.bodies import json_kind
from extproc.wire.errors import OpenAIError, invalid_request
from extproc.wire.sse import SSEEvent, SSEParser
from extproc.wire.usage import NO_TOOLS, ToolCalls, Usage


@dataclass(frozen=True, slots=True)
class RequestFacts:
    model: str
    stream: bool
    output_cap: int | None
    prompt_cache_key: str | None
    previous_response_id: str | None
    reasoning_effort: str | None
    has_tools: bool
    # How many outputs one request asks for (`n`, `best_of`): the output cap applies to
    # each, so the worst case the budget must hold is `output_cap * choices`.
    choices: int = 1
    # The service tier asked for ("auto", "default", "flex", "priority"; None: not set).
    service_tier: str | None = None
    # Built-in tools enabled (their calls are billed on top of tokens).
    tools: ToolRequest = NO_TOOL_REQUEST


@dataclass(slots=True)
class StreamOutcome:
    usage: Usage | None
    served_model: str | None
    output_text: str
    terminal: str | None
    error: OpenAIError | None
    # Tool calls whose completion events streamed by: what a stream cut before its
    # terminal event (which lists every call) is known to have run.
    tools_seen: ToolCalls = NO_TOOLS


class StreamMeter(Protocol):
    def feed(self, chunk: bytes, *, last: bool = False) -> bytes: ...

    def finish(self) -> StreamOutcome: ...


class Endpoint(Protocol):
    """How one endpoint's bodies are read: the endpoint's own module implements it, and its
    spec (`extproc.wire.spec`) holds everything else about it."""

    def facts(self, body: dict[str, Any]) -> RequestFacts: ...

    def input_texts(self, body: dict[str, Any]) -> Iterator[str]: ...

    def input_overhead(self, body: dict[str, Any]) -> int: ...

    def prepare_upstream(self, body: dict[str, Any], facts: RequestFacts) -> bool: ...

    def usage_from_json(self, body: bytes) -> tuple[Usage | None, str | None]: ...

    def stream_meter(self, *, strip_usage_chunk: bool) -> StreamMeter: ...


# --- request validation -------------------------------------------------------------


def missing(param: str) -> OpenAIError:
    return invalid_request(
        f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


def wrong_type(param: str, expected: str, value: Any) -> OpenAIError:
    return invalid_request(
        f"Invalid type for '{param}': expected {expected}, but got {json_kind(value)} instead.",
        param=param,
        code="invalid_type",
    )


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise missing("model")
    if not isinstance(model, str):
        raise wrong_type("model", "a string", model)
    if not model:
        raise invalid_request(
            "Invalid value for 'model': it must not be empty.", param="model", code="invalid_value"
        )
    return model


def optional_bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise wrong_type(key, "a boolean", value)
    return value


INT32_MAX = 2**31 - 1
"""The largest value OpenAI accepts for its integer parameters (they are int32 upstream)."""


def optional_count(
    body: dict[str, Any], key: str, *, minimum: int = 0, maximum: int = INT32_MAX
) -> int | None:
    """An optional integer parameter within [minimum, maximum]; a 400 naming it otherwise.

    Out-of-range values are refused here, before anything is reserved or recorded, with
    OpenAI's own wording: a value no provider would accept must not reach the budget
    arithmetic (or an int field of the usage record) at all.
    """
    value = body.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise wrong_type(key, "an integer", value)
    if value < minimum:
        raise invalid_request(
            f"Invalid '{key}': integer below minimum value. Expected a value >= {minimum}, "
            f"but got {value} instead.",
            param=key,
            code="integer_below_min_value",
        )
    if value > maximum:
        raise invalid_request(
            f"Invalid '{key}': integer above maximum value. Expected a value <= {maximum}, "
            f"but got {value} instead.",
            param=key,
            code="integer_above_max_value",
        )
    return value


MAX_CHOICES = 128
"""OpenAI's ceiling for `n` (and, far above its own limit of 20, for `best_of`)."""


def choices_of(body: dict[str, Any], *keys: str) -> int:
    """How many outputs the request asks for: the largest of `keys` (`n`, `best_of`)."""
    found = [optional_count(body, key, minimum=1, maximum=MAX_CHOICES) for key in keys]
    return max([c for c in found if c is not None], default=1)


def optional_object(body: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = body.get(key)
    if value is None or isinstance(value, dict):
        return value
    raise wrong_type(key, "an object", value)


def optional_str(value: Any, param: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise wrong_type(param, "a string", value)


def optional_list(body: dict[str, Any], key: str) -> list[Any] | None:
    value = body.get(key)
    if value is None or isinstance(value, list):
        return value
    raise wrong_type(key, "an array", value)


def check_prompt_like(body: dict[str, Any], key: str, *, required: bool) -> None:
    """Validate a completions `prompt` / embeddings `input`: text, or token arrays."""
    value = body.get(key)
    if value is None:
        if required:
            raise missing(key)
        return
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise wrong_type(key, "a string or an array", value)
    for element in value:
        if not isinstance(element, str | list) and type(element) is not int:
            raise wrong_type(key, "an array of strings, integers or integer arrays", element)


# --- request text -------------------------------------------------------------------

# Keys whose values the model never reads as text: identifiers, states, binary payloads.
_NOT_TEXT = frozenset(
    {
        "type",
        "id",
        "call_id",
        "tool_call_id",
        "item_id",
        "status",
        "encrypted_content",
        "image_url",
        "file_data",
        "file_id",
        "file_url",
        "input_audio",
        "audio",
        "detail",
        "caller",
        "annotations",
        "logprobs",
        "obfuscation",
    }
)


def texts_in(value: Any) -> Iterator[str]:
    """Every string the model reads in a message-like value, in document order.

    Iterative, because a body may nest as deep as the JSON parser allows.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if item:
                yield item
        elif isinstance(item, dict):
            stack.extend(reversed([v for k, v in item.items() if k not in _NOT_TEXT]))
        elif isinstance(item, list):
            stack.extend(reversed(item))


_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
"""Reused: `json.dumps` with options builds a new encoder per call (tools, schemas: many)."""


def compact_json(value: Any) -> str:
    return _COMPACT.encode(value)


def token_array_length(value: Any) -> int:
    """Tokens given as integer arrays (completions prompt, embeddings input)."""
    if not isinstance(value, list):
        return 0
    total = 0
    for element in value:
        if type(element) is int:
            total += 1
        elif isinstance(element, list):
            total += len(element)
    return total


# --- response usage -----------------------------------------------------------------


def load_json(body: bytes | str) -> Any:
    """Parse a provider's JSON leniently: None for anything unparsable."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def model_of(obj: dict[str, Any]) -> str | None:
    model = obj.get("model")
    return model if isinstance(model, str) and model else None


# --- streaming ----------------------------------------------------------------------


class SSEMeter:
    """Shared plumbing of the SSE stream meters.

    Subclasses read each event in `on_event` and return True for an event that must not
    reach the client (only honoured when stripping). When stripping, the bytes of the
    trailing, not yet terminated event are held back until it completes; everything
    before it is forwarded at once.
    """

    __slots__ = ("_held", "_held_start", "_lf_after_drop", "_parser", "_strip")

    def __init__(self, *, strip_usage_chunk: bool) -> None:
        self._parser = SSEParser()
        self._strip = strip_usage_chunk
        self._held = b""
        self._held_start = 0
        self._lf_after_drop = -1

    def on_event(self, event: SSEEvent) -> bool:
        raise NotImplementedError

    def outcome(self) -> StreamOutcome:
        raise NotImplementedError

    def feed(self, chunk: bytes, *, last: bool = False) -> bytes:
        """Meter a chunk and return the bytes to forward.

        `last=True` on the final chunk releases any held bytes of an unterminated event.
        """
        parser = self._parser
        if not self._strip:
            for event in parser.feed(chunk):
                self.on_event(event)
            return chunk
        drops: list[tuple[int, int]] = []
        if self._lf_after_drop == parser.consumed and chunk[:1] == b"\n":
            # The dropped event ended in CR and this LF completes that CRLF.
            drops.append((parser.consumed, parser.consumed + 1))
        self._lf_after_drop = -1
        drops.extend(
            (start, end) for event, start, end in parser.feed_spans(chunk) if self.on_event(event)
        )
        if drops and drops[-1][1] == parser.consumed and parser.awaiting_lf:
            self._lf_after_drop = parser.consumed
        cut = parser.consumed if last else parser.boundary
        if not drops and not self._held and cut == parser.consumed:
            self._held_start = cut
            return chunk
        data = self._held + chunk if self._held else chunk
        base = self._held_start
        pieces = []
        pos = base
        for start, end in drops:
            pieces.append(data[pos - base : start - base])
            pos = end
        pieces.append(data[pos - base : cut - base])
        self._held = data[cut - base :]
        self._held_start = cut
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def finish(self) -> StreamOutcome:
        self._parser.close()
        return self.outcome()


class NoStream:
    """Meter for endpoints that never stream: passes bytes through, reports nothing."""

    __slots__ = ()

    def feed(self, chunk: bytes, *, last: bool = False) -> bytes:
        return chunk

    def finish(self) -> StreamOutcome:
        return StreamOutcome(
            usage=None, served_model=None, output_text="", terminal=None, error=None
        )
