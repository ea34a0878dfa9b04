"""Legacy Completions answers (`POST /v1/completions`), whole or as chunks.

Still metered because gpt-3.5-turbo-instruct and fine-tunes are billed through
it; its usage object is the plain three-number form.
"""

from __future__ import annotations

import time
from typing import Any

from extproc.simulator.chat import (
    FINGERPRINT,
    STREAM_ERROR_MESSAGE,
    finish_reason,
    wants_stream_usage,
)
from extproc.simulator.faults import Faults, error_body
from extproc.simulator.plan import Plan
from extproc.simulator.sse import DONE, EventStream, data_frame, new_id


def usage(plan: Plan) -> dict[str, Any]:
    return {
        "prompt_tokens": plan.input_tokens,
        "completion_tokens": plan.output_tokens,
        "total_tokens": plan.input_tokens + plan.output_tokens,
    }


def _base(plan: Plan) -> dict[str, Any]:
    return {
        "id": new_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": plan.model,
        "system_fingerprint": FINGERPRINT,
    }


def build(body: dict[str, Any], plan: Plan, faults: Faults) -> dict[str, Any]:
    choice = {"text": plan.text, "index": 0, "logprobs": None, "finish_reason": finish_reason(plan)}
    answer = {**_base(plan), "choices": [choice]}
    if not faults.no_usage:
        answer["usage"] = usage(plan)
    return answer


def stream(body: dict[str, Any], plan: Plan, faults: Faults) -> EventStream:
    include_usage = wants_stream_usage(body)
    base = _base(plan)
    tail = {"usage": None} if include_usage else {}

    def chunk(text: str, finish: str | None = None) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return data_frame({**base, "choices": [choice], **tail})

    words = plan.words[:2] if faults.error_event else plan.words
    frames = [chunk(word) for word in words]
    if faults.error_event:
        failure = error_body(500, "server_error", STREAM_ERROR_MESSAGE)
        return EventStream([*frames, data_frame(failure)], len(frames))
    frames.append(chunk("", finish_reason(plan)))
    terminal_at = len(frames)
    if include_usage and not faults.no_usage:
        frames.append(data_frame({**base, "choices": [], "usage": usage(plan)}))
    frames.append(DONE)
    return EventStream(frames, terminal_at)
