"""`POST /v1/embeddings`: input only, never streamed, no output tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from extproc.wire.common import (
    NoStream,
    RequestFacts,
    check_prompt_like,
    load_json,
    model_of,
    read_usage,
    require_model,
    token_array_length,
)
from extproc.wire.usage import Usage


class Embeddings:
    def facts(self, body: dict[str, Any]) -> RequestFacts:
        model = require_model(body)
        check_prompt_like(body, "input", required=True)
        return RequestFacts(
            model=model,
            stream=False,
            output_cap=None,
            prompt_cache_key=None,
            previous_response_id=None,
            reasoning_effort=None,
            has_tools=False,
        )

    def input_texts(self, body: dict[str, Any]) -> Iterator[str]:
        value = body.get("input")
        if isinstance(value, str):
            if value:
                yield value
        elif isinstance(value, list):
            yield from (v for v in value if isinstance(v, str) and v)

    def input_overhead(self, body: dict[str, Any]) -> int:
        return token_array_length(body.get("input"))

    def prepare_upstream(self, body: dict[str, Any], facts: RequestFacts) -> bool:
        return False

    def usage_from_json(self, body: bytes) -> tuple[Usage | None, str | None]:
        obj = load_json(body)
        if not isinstance(obj, dict):
            return None, None
        usage = read_usage(
            obj.get("usage"),
            input_key="prompt_tokens",
            input_details="prompt_tokens_details",
            output_key=None,
            output_details=None,
        )
        return usage, model_of(obj)

    def stream_meter(self, *, strip_usage_chunk: bool) -> NoStream:
        return NoStream()
