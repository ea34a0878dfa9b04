"""The readers of the metered endpoints by path, and the helpers every endpoint shares.

The shared protocol and helpers live in `common` (re-exported here for callers); the facts
about each endpoint, its reader included, live in its spec (`extproc.wire.spec`), and
`ENDPOINTS` is that table's view by path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
from extproc.wire.spec import METERED

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

ENDPOINTS: dict[str, Endpoint] = {s.path: s.reader for s in METERED if s.reader is not None}


def count_input_tokens(
    endpoint: Endpoint, body: dict[str, Any], count: Callable[[str], int]
) -> int:
    return sum(count(text) for text in endpoint.input_texts(body)) + endpoint.input_overhead(body)
