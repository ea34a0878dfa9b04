"""The table of metered OpenAI endpoints: which module answers which path.

The shared protocol and helpers live in `common` (re-exported here for callers), so the
endpoint modules never import this table and it can import them plainly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from extproc.wire.chat import ChatCompletions
from extproc.wire.common import (
    INT32_MAX,
    MAX_CHOICES,
    Endpoint,
    NoStream,
    RequestFacts,
    SSEMeter,
    StreamMeter,
    StreamOutcome,
    check_prompt_like,
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
    token_array_length,
    wrong_type,
)
from extproc.wire.completions import Completions
from extproc.wire.embeddings import Embeddings
from extproc.wire.responses import Responses

__all__ = [
    "ENDPOINTS",
    "INT32_MAX",
    "MAX_CHOICES",
    "Endpoint",
    "NoStream",
    "RequestFacts",
    "SSEMeter",
    "StreamMeter",
    "StreamOutcome",
    "check_prompt_like",
    "choices_of",
    "compact_json",
    "count_input_tokens",
    "endpoint_for",
    "load_json",
    "missing",
    "model_of",
    "optional_bool",
    "optional_count",
    "optional_list",
    "optional_object",
    "optional_str",
    "read_usage",
    "require_model",
    "texts_in",
    "token_array_length",
    "wrong_type",
]

ENDPOINTS: dict[str, Endpoint] = {
    e.path: e for e in (Responses(), ChatCompletions(), Completions(), Embeddings())
}


def endpoint_for(method: str, path: str) -> Endpoint | None:
    if method != "POST":
        return None
    query = path.find("?")
    return ENDPOINTS.get(path if query < 0 else path[:query])


def count_input_tokens(
    endpoint: Endpoint, body: dict[str, Any], count: Callable[[str], int]
) -> int:
    return sum(count(text) for text in endpoint.input_texts(body)) + endpoint.input_overhead(body)
