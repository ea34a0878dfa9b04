"""Server-sent event framing and the compact JSON the simulator writes.

Builders render a whole stream up front as frames; the transport then decides
how many to send and how fast, which is where the stream faults live.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_ascii_encoder = json.JSONEncoder(separators=(",", ":"))
DONE = b"data: [DONE]\n\n"


def dumps(obj: Any) -> bytes:
    """Compact JSON as UTF-8, as the provider writes it.

    A lone surrogate a client sent as `"\\ud800"` (in `prompt_cache_key` or `user`, which
    answers echo) has no UTF-8 form: that answer is written with `\\u` escapes instead, which
    any JSON reader turns back into the same string. It used to raise, and the client got 500.
    """
    text = _encoder.encode(obj)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _ascii_encoder.encode(obj).encode()


def data_frame(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def event_frame(obj: dict[str, Any]) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + dumps(obj) + b"\n\n"


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


@dataclass(slots=True)
class EventStream:
    """All frames of one answer; frames from `terminal_at` on are its closing events."""

    frames: list[bytes]
    terminal_at: int
