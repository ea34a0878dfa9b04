"""`POST /v1/chat/completions`, and the choices-style stream it shares with completions.

Chat streams carry usage only when the client asks for `stream_options.include_usage`;
we ask on the client's behalf so metering is exact, and then hide the extra usage-only
chunk from a client that did not ask for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from extproc.wire.billing import NO_TOOLS, search_request, service_tier_of, with_tools
from extproc.wire.common import (
    RequestFacts,
    SSEMeter,
    StreamOutcome,
    choices_of,
    compact_json,
    load_json,
    missing,
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


def choices_usage(usage: Any, service_tier: str = "") -> Usage | None:
    return read_usage(
        usage,
        input_key="prompt_tokens",
        input_details="prompt_tokens_details",
        output_key="completion_tokens",
        output_details="completion_tokens_details",
        service_tier=service_tier,
    )


def usage_and_model(body: bytes) -> tuple[Usage | None, str | None]:
    obj = load_json(body)
    if not isinstance(obj, dict):
        return None, None
    return choices_usage(obj.get("usage"), service_tier_of(obj)), model_of(obj)


def request_stream_usage(body: dict[str, Any], facts: RequestFacts) -> bool:
    """Ask for the final usage chunk of a stream; True if the body had to change."""
    if not facts.stream:
        return False
    options = body.get("stream_options")
    if options is None:
        body["stream_options"] = {"include_usage": True}
        return True
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return False
    options["include_usage"] = True
    return True


def _chat_delta(choice: dict[str, Any], out: list[str]) -> None:
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return
    _append_strings(delta, ("content", "refusal"), out)
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                _append_strings(call["function"], ("name", "arguments"), out)
    legacy = delta.get("function_call")
    if isinstance(legacy, dict):
        _append_strings(legacy, ("name", "arguments"), out)


def _append_strings(obj: dict[str, Any], keys: tuple[str, ...], out: list[str]) -> None:
    for key in keys:
        text = obj.get(key)
        if isinstance(text, str):
            out.append(text)


class ChoicesMeter(SSEMeter):
    """Meter for `data: {chunk}` streams ended by `data: [DONE]`."""

    __slots__ = (
        "_deltas",
        "_done",
        "_error",
        "_finished",
        "_model",
        "_read_delta",
        "_tier",
        "_usage",
    )

    def __init__(
        self,
        *,
        strip_usage_chunk: bool,
        read_delta: Callable[[dict[str, Any], list[str]], None],
    ) -> None:
        super().__init__(strip_usage_chunk=strip_usage_chunk)
        self._read_delta = read_delta
        self._deltas: list[str] = []
        self._usage: Usage | None = None
        self._model: str | None = None
        self._error: OpenAIError | None = None
        self._done = False
        self._finished = False
        self._tier = ""

    def on_event(self, event: SSEEvent) -> bool:
        data = event.data
        if data.startswith("[DONE]"):
            self._done = True
            return False
        obj = load_json(data)
        if not isinstance(obj, dict):
            return False
        error = obj.get("error")
        if error or event.event == "error":
            self._error = error_from_payload(error or obj)
            return False
        model = model_of(obj)
        if model:
            self._model = model
        tier = obj.get("service_tier")
        if tier is not None:
            self._tier = service_tier_of(obj)
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self._read_delta(choice, self._deltas)
                    if choice.get("finish_reason"):
                        self._finished = True
        usage = obj.get("usage")
        if usage is None:
            return False
        self._usage = choices_usage(usage) or self._usage
        return not choices

    def outcome(self) -> StreamOutcome:
        if self._error is not None:
            terminal: str | None = "error"
        elif self._done:
            terminal = "completed" if self._finished else "incomplete"
        else:
            terminal = None
        return StreamOutcome(
            usage=with_tools(self._usage, self._tier, NO_TOOLS),
            served_model=self._model,
            output_text="".join(self._deltas),
            terminal=terminal,
            error=self._error,
        )


class ChatCompletions:
    def facts(self, body: dict[str, Any]) -> RequestFacts:
        model = require_model(body)
        stream = optional_bool(body, "stream")
        if "messages" not in body or body["messages"] is None:
            raise missing("messages")
        if not isinstance(body["messages"], list):
            raise wrong_type("messages", "an array", body["messages"])
        cap = optional_count(body, "max_completion_tokens")
        legacy_cap = optional_count(body, "max_tokens")
        tools = optional_list(body, "tools")
        functions = optional_list(body, "functions")
        # Not an object: the upstream would ignore include_usage and we would bill a guess.
        optional_object(body, "stream_options")
        return RequestFacts(
            model=model,
            stream=stream,
            output_cap=cap if cap is not None else legacy_cap,
            prompt_cache_key=optional_str(body.get("prompt_cache_key"), "prompt_cache_key"),
            previous_response_id=None,
            reasoning_effort=optional_str(body.get("reasoning_effort"), "reasoning_effort"),
            has_tools=bool(tools or functions),
            choices=choices_of(body, "n"),
            service_tier=optional_str(body.get("service_tier"), "service_tier"),
            tools=search_request(body, model),
        )

    def input_texts(self, body: dict[str, Any]) -> Iterator[str]:
        messages = body.get("messages")
        if isinstance(messages, list):
            yield from texts_in(messages)
        for key in ("tools", "functions"):
            tools = body.get(key)
            if isinstance(tools, list):
                for tool in tools:
                    yield compact_json(tool)
        response_format = body.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
            yield compact_json(response_format.get("json_schema"))

    def input_overhead(self, body: dict[str, Any]) -> int:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return 3
        total = 3
        for message in messages:
            if isinstance(message, dict):
                total += 4 if message.get("name") else 3
        return total

    def prepare_upstream(self, body: dict[str, Any], facts: RequestFacts) -> bool:
        return request_stream_usage(body, facts)

    def usage_from_json(self, body: bytes) -> tuple[Usage | None, str | None]:
        return usage_and_model(body)

    def stream_meter(self, *, strip_usage_chunk: bool) -> ChoicesMeter:
        return ChoicesMeter(strip_usage_chunk=strip_usage_chunk, read_delta=_chat_delta)
