"""`POST /v1/responses`, the endpoint Codex uses.

Its stream always ends with a terminal event carrying the whole response, usage
included, so nothing needs rewriting; but a stream can also be cut or end in an
`error` event, and then the deltas seen so far are all we have to count.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from extproc.wire.billing import (
    TOOL_DONE_EVENTS,
    ImageCall,
    ToolCalls,
    requested_tools,
    service_tier_of,
    tool_calls_in,
    with_tools,
)
from extproc.wire.common import (
    RequestFacts,
    SSEMeter,
    StreamOutcome,
    compact_json,
    load_json,
    model_of,
    optional_bool,
    optional_count,
    optional_list,
    optional_object,
    optional_str,
    read_usage,
    require_model,
    texts_in,
    wrong_type,
)
from extproc.wire.errors import OpenAIError, error_from_payload
from extproc.wire.sse import SSEEvent
from extproc.wire.usage import Usage

# Deltas of everything the model writes that a client can see.
_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
        "response.code_interpreter_call_code.delta",
        "response.mcp_call_arguments.delta",
        "response.shell_call_command.delta",
    }
)
_TERMINAL = {
    "response.completed": "completed",
    "response.incomplete": "incomplete",
    "response.failed": "failed",
}
_STARTED = frozenset({"response.created", "response.in_progress"})
# Built by union(): `frozenset | dict.keys()` is a set at run time but typed frozenset, which
# compiled code trusts and then refuses.
_READ = _DELTAS.union(_TERMINAL, _STARTED, TOOL_DONE_EVENTS, {"error"})

# Tokens the prompt format adds around each message and to prime the reply.
_PER_ITEM = 3
_IMPLIED_ROLE = 1
_REPLY = 3


def response_usage(usage: Any) -> Usage | None:
    return read_usage(
        usage,
        input_key="input_tokens",
        input_details="input_tokens_details",
        output_key="output_tokens",
        output_details="output_tokens_details",
    )


def billed_usage(response: dict[str, Any]) -> Usage | None:
    """A whole Responses object's bill: its usage, service tier and built-in tool calls."""
    usage = response_usage(response.get("usage"))
    return with_tools(usage, service_tier_of(response), tool_calls_in(response.get("output")))


class ResponsesMeter(SSEMeter):
    __slots__ = ("_deltas", "_done_tools", "_error", "_model", "_terminal", "_usage")

    def __init__(self, *, strip_usage_chunk: bool) -> None:
        super().__init__(strip_usage_chunk=strip_usage_chunk)
        self._deltas: list[str] = []
        self._usage: Usage | None = None
        self._model: str | None = None
        self._terminal: str | None = None
        self._error: OpenAIError | None = None
        self._done_tools: list[str] = []

    def on_event(self, event: SSEEvent) -> bool:
        # The event name repeats the payload's type: skip parsing the (large) events
        # we have no use for, such as `*.done` and `response.output_item.*`.
        if event.event is not None and event.event not in _READ:
            return False
        obj = load_json(event.data)
        if not isinstance(obj, dict):
            return False
        kind = obj.get("type")
        if not isinstance(kind, str):
            kind = event.event or ""
        if kind in _DELTAS:
            delta = obj.get("delta")
            if isinstance(delta, str):
                self._deltas.append(delta)
        elif kind in _TERMINAL:
            self._terminal = _TERMINAL[kind]
            self._read_response(obj.get("response"), final=True)
        elif kind in _STARTED:
            self._read_response(obj.get("response"), final=False)
        elif kind in TOOL_DONE_EVENTS:
            self._done_tools.append(TOOL_DONE_EVENTS[kind])
        elif kind == "error":
            self._terminal = "error"
            nested = obj.get("error")
            self._error = error_from_payload(
                nested
                if isinstance(nested, dict)
                else {k: obj.get(k) for k in ("message", "code", "param")}
            )
        return False

    def _read_response(self, response: Any, *, final: bool) -> None:
        if not isinstance(response, dict):
            return
        model = model_of(response)
        if model:
            self._model = model
        if not final:
            return
        self._usage = billed_usage(response) or self._usage
        if self._terminal == "failed" and self._error is None:
            failure = response.get("error")
            if isinstance(failure, dict):
                self._error = error_from_payload(failure)

    def outcome(self) -> StreamOutcome:
        return StreamOutcome(
            usage=self._usage,
            tools_seen=self._tools_seen(),
            served_model=self._model,
            output_text="".join(self._deltas),
            terminal=self._terminal,
            error=self._error,
        )

    def _tools_seen(self) -> ToolCalls:
        """Tool calls announced by their completion events (for a stream cut short)."""
        done = self._done_tools
        if not done:
            return ToolCalls()
        return ToolCalls(
            web_search=done.count("web_search"),
            file_search=done.count("file_search"),
            code_interpreter=min(done.count("code_interpreter"), 1),
            images=tuple(ImageCall() for _ in range(done.count("image_generation"))),
        )


class Responses:
    def facts(self, body: dict[str, Any]) -> RequestFacts:
        model = require_model(body)
        stream = optional_bool(body, "stream")
        value = body.get("input")
        if value is not None and not isinstance(value, str | list):
            raise wrong_type("input", "a string or an array", value)
        reasoning = body.get("reasoning")
        if reasoning is not None and not isinstance(reasoning, dict):
            raise wrong_type("reasoning", "an object", reasoning)
        effort = optional_str((reasoning or {}).get("effort"), "reasoning.effort")
        optional_object(body, "stream_options")
        max_calls = optional_count(body, "max_tool_calls")
        return RequestFacts(
            model=model,
            stream=stream,
            output_cap=optional_count(body, "max_output_tokens"),
            prompt_cache_key=optional_str(body.get("prompt_cache_key"), "prompt_cache_key"),
            previous_response_id=optional_str(
                body.get("previous_response_id"), "previous_response_id"
            ),
            reasoning_effort=effort,
            has_tools=bool(optional_list(body, "tools")),
            service_tier=optional_str(body.get("service_tier"), "service_tier"),
            tools=requested_tools(body, max_calls),
        )

    def input_texts(self, body: dict[str, Any]) -> Iterator[str]:
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            yield instructions
        value = body.get("input")
        if isinstance(value, str):
            if value:
                yield value
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict) and item.get("type") == "additional_tools":
                    # Tool definitions sent as an input item (Codex does for newer models)
                    # are read like the top-level `tools`: as their JSON, schemas included.
                    tools = item.get("tools")
                    if isinstance(tools, list):
                        yield from (compact_json(tool) for tool in tools)
                else:
                    yield from texts_in(item)
        tools = body.get("tools")
        if isinstance(tools, list):
            for tool in tools:
                yield compact_json(tool)
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            yield compact_json(fmt)

    def input_overhead(self, body: dict[str, Any]) -> int:
        total = _REPLY
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            total += _PER_ITEM + _IMPLIED_ROLE
        value = body.get("input")
        if isinstance(value, str):
            total += _PER_ITEM + _IMPLIED_ROLE
        elif isinstance(value, list):
            total += _PER_ITEM * sum(1 for item in value if isinstance(item, dict))
        return total

    def prepare_upstream(self, body: dict[str, Any], facts: RequestFacts) -> bool:
        return False

    def usage_from_json(self, body: bytes) -> tuple[Usage | None, str | None]:
        obj = load_json(body)
        if not isinstance(obj, dict):
            return None, None
        return billed_usage(obj), model_of(obj)

    def stream_meter(self, *, strip_usage_chunk: bool) -> ResponsesMeter:
        return ResponsesMeter(strip_usage_chunk=strip_usage_chunk)
