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
DONE = b"data: [DONE]\n\n"


def dumps(obj: Any) -> bytes:
    return _encoder.encode(obj).encode()


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
