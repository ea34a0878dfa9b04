"""Request bodies as OpenAI accepts them: JSON, optionally gzip/deflate/zstd encoded.

Codex CLI compresses request bodies with zstd, so the simulator must undo
`Content-Encoding` before it can read the prompt, and reject what OpenAI rejects.
"""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import zstandard

JSON_ERROR = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON.)"
)


class BodyError(ValueError):
    """The body cannot be decoded; the message is what the client is told."""


def _decompress(encoding: str, data: bytes) -> bytes:
    if encoding in ("", "identity"):
        return data
    if encoding in ("gzip", "x-gzip"):
        return gzip.decompress(data)
    if encoding == "deflate":
        return zlib.decompress(data)
    if encoding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    raise BodyError(f"Unsupported Content-Encoding: {encoding!r}")


def decode_body(content_encoding: str, raw: bytes) -> bytes:
    """Undo the listed content codings, last applied first."""
    data = raw
    for encoding in reversed([e.strip().lower() for e in content_encoding.split(",")]):
        try:
            data = _decompress(encoding, data)
        except BodyError:
            raise
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            raise BodyError(f"Could not decode {encoding} request body.") from exc
    return data


def parse_json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(JSON_ERROR) from exc
    if not isinstance(value, dict):
        raise BodyError(JSON_ERROR)
    return value
