"""`POST /v1/completions`, the legacy text completion endpoint.

Its prompt may be text or token ids; token ids are already counted, so they add their
length instead of being tokenised again. Its stream has the chat shape with `text`
in place of `delta`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from extproc.wire.chat import ChoicesMeter, request_stream_usage, usage_and_model
from extproc.wire.common import (
    RequestFacts,
    check_prompt_like,
    choices_of,
    optional_bool,
    optional_count,
    optional_object,
    optional_str,
    require_model,
    token_array_length,
)
from extproc.wire.usage import Usage


def _text_delta(choice: dict[str, Any], out: list[str]) -> None:
    text = choice.get("text")
    if isinstance(text, str):
        out.append(text)


class Completions:
    def facts(self, body: dict[str, Any]) -> RequestFacts:
        model = require_model(body)
        stream = optional_bool(body, "stream")
        check_prompt_like(body, "prompt", required=False)
        optional_object(body, "stream_options")
        return RequestFacts(
            model=model,
            stream=stream,
            output_cap=optional_count(body, "max_tokens"),
            prompt_cache_key=optional_str(body.get("prompt_cache_key"), "prompt_cache_key"),
            previous_response_id=None,
            reasoning_effort=None,
            has_tools=False,
            # best_of candidates are generated (and billed) server-side; n are returned.
            choices=choices_of(body, "n", "best_of"),
        )

    def input_texts(self, body: dict[str, Any]) -> Iterator[str]:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            if prompt:
                yield prompt
        elif isinstance(prompt, list):
            yield from (p for p in prompt if isinstance(p, str) and p)
        suffix = body.get("suffix")
        if isinstance(suffix, str) and suffix:
            yield suffix

    def input_overhead(self, body: dict[str, Any]) -> int:
        return token_array_length(body.get("prompt"))

    def prepare_upstream(self, body: dict[str, Any], facts: RequestFacts) -> bool:
        return request_stream_usage(body, facts)

    def usage_from_json(self, body: bytes) -> tuple[Usage | None, str | None]:
        return usage_and_model(body)

    def stream_meter(self, *, strip_usage_chunk: bool) -> ChoicesMeter:
        return ChoicesMeter(strip_usage_chunk=strip_usage_chunk, read_delta=_text_delta)
