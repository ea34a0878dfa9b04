"""Chat Completions answers (`POST /v1/chat/completions`), whole or as chunks.

Usage arrives in streams only on request (`stream_options.include_usage`), as a
last chunk with no choices; every earlier chunk then says `"usage": null`. Meters
rely on exactly that, so the simulator reproduces it.
"""

from __future__ import annotations

import time
from typing import Any

from extproc.simulator.faults import Faults, error_body
from extproc.simulator.plan import Plan, chat_usage
from extproc.simulator.sse import DONE, EventStream, data_frame, new_id

FINGERPRINT = "fp_simulator"
STREAM_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"


def finish_reason(plan: Plan) -> str:
    return "length" if plan.truncated else "stop"


def wants_stream_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def build(body: dict[str, Any], plan: Plan, faults: Faults) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": plan.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": plan.text,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": finish_reason(plan),
            }
        ],
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    }
    if not faults.no_usage:
        answer["usage"] = chat_usage(plan)
    return answer


def stream(body: dict[str, Any], plan: Plan, faults: Faults) -> EventStream:
    include_usage = wants_stream_usage(body)
    base: dict[str, Any] = {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": plan.model,
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    }
    tail = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return data_frame({**base, "choices": [choice], **tail})

    frames = [chunk({"role": "assistant", "content": "", "refusal": None})]
    words = plan.words[:2] if faults.error_event else plan.words
    frames.extend(chunk({"content": word}) for word in words)
    if faults.error_event:
        failure = error_body(500, "server_error", STREAM_ERROR_MESSAGE)
        return EventStream([*frames, data_frame(failure)], len(frames))
    frames.append(chunk({}, finish_reason(plan)))
    terminal_at = len(frames)
    if include_usage and not faults.no_usage:
        frames.append(data_frame({**base, "choices": [], "usage": chat_usage(plan)}))
    frames.append(DONE)
    return EventStream(frames, terminal_at)
