"""OpenAI wire formats: request bodies, SSE streams, and the metered endpoints.

Pure functions and small stateful parsers, no I/O: the ext_proc stream handler calls
them for each phase of a request. `common` is what every endpoint shares, one module
per endpoint reads its bodies, `spec` holds every fact about every endpoint (the only
place their names and paths are spelled), and `paths` says which one a request is for.

Imports nothing else of extproc: every other package builds on it.
"""

from __future__ import annotations

from extproc.wire.bodies import SUPPORTED_ENCODINGS, decode_body, encode_json, parse_json_object
from extproc.wire.endpoints import (
    ENDPOINTS,
    Endpoint,
    RequestFacts,
    StreamMeter,
    StreamOutcome,
    count_input_tokens,
)
from extproc.wire.errors import OpenAIError
from extproc.wire.sse import SSEEvent, SSEParser

__all__ = [
    "ENDPOINTS",
    "SUPPORTED_ENCODINGS",
    "Endpoint",
    "OpenAIError",
    "RequestFacts",
    "SSEEvent",
    "SSEParser",
    "StreamMeter",
    "StreamOutcome",
    "count_input_tokens",
    "decode_body",
    "encode_json",
    "parse_json_object",
]
