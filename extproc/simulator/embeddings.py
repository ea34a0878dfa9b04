"""Embeddings answers (`POST /v1/embeddings`) in float or base64 encoding.

The SDK asks for base64 by default and decodes little-endian float32, so vector
values are chosen to be exact in float32: both encodings then carry the same
numbers and tests can compare them.
"""

from __future__ import annotations

import base64
import struct
from functools import lru_cache
from typing import Any

from extproc.simulator.faults import Faults

DEFAULT_DIMENSIONS = 1536
_DIMENSIONS = {"text-embedding-3-large": 3072}


@lru_cache(maxsize=8)
def _base_vector(dims: int) -> tuple[list[float], bytes]:
    values = [((i * 7919) % 2001 - 1000) / 1024 for i in range(dims)]
    return values, struct.pack(f"<{dims}f", *values)


def dimensions(body: dict[str, Any]) -> int:
    requested = body.get("dimensions")
    if isinstance(requested, int) and not isinstance(requested, bool) and requested > 0:
        return requested
    return _DIMENSIONS.get(str(body.get("model", "")), DEFAULT_DIMENSIONS)


def vector(tokens: list[int], dims: int, encoding: str) -> list[float] | str:
    """A deterministic vector per input: the base vector rotated by the input's hash."""
    values, packed = _base_vector(dims)
    shift = hash(tuple(tokens)) % dims
    if encoding == "base64":
        return base64.b64encode(packed[4 * shift :] + packed[: 4 * shift]).decode()
    return values[shift:] + values[:shift]


def build(
    body: dict[str, Any], inputs: list[list[int]], served_model: str, faults: Faults
) -> dict[str, Any]:
    dims = dimensions(body)
    encoding = "base64" if body.get("encoding_format") == "base64" else "float"
    answer: dict[str, Any] = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": vector(tokens, dims, encoding)}
            for i, tokens in enumerate(inputs)
        ],
        "model": served_model,
    }
    if not faults.no_usage:
        total = sum(len(tokens) for tokens in inputs)
        answer["usage"] = {"prompt_tokens": total, "total_tokens": total}
    return answer
