"""Responses API answers (`POST /v1/responses`), whole or as an event stream.

Codex CLI and the SDK's typed stream both depend on the exact event sequence and
on every event carrying a running `sequence_number`, so the stream is rendered in
one place from the plan, in OpenAI's order.
"""

from __future__ import annotations

import time
from typing import Any

from extproc.simulator.faults import Faults
from extproc.simulator.plan import Plan, responses_usage
from extproc.simulator.sse import EventStream, event_frame, new_id

STREAM_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"


def _reasoning_item(body: dict[str, Any], item_id: str) -> dict[str, Any]:
    item: dict[str, Any] = {"id": item_id, "type": "reasoning", "summary": []}
    if "reasoning.encrypted_content" in (body.get("include") or []):
        item["encrypted_content"] = "gAAAAB" + item_id.encode().hex()
    return item


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _message(item_id: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "content": content,
        "role": "assistant",
    }


def response_object(
    body: dict[str, Any],
    plan: Plan,
    *,
    response_id: str,
    created_at: int,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
        "model": plan.model,
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": {
            "effort": reasoning.get("effort", "medium" if plan.reasoning_model else None),
            "summary": reasoning.get("summary"),
        },
        "safety_identifier": body.get("safety_identifier"),
        "service_tier": "default",
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_logprobs": body.get("top_logprobs", 0),
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": usage,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def _final_output(body: dict[str, Any], plan: Plan, ids: tuple[str, str]) -> list[dict[str, Any]]:
    output = [_reasoning_item(body, ids[0])] if plan.reasoning_model else []
    if plan.words:
        status = "incomplete" if plan.truncated else "completed"
        output.append(_message(ids[1], status, [_text_part(plan.text)]))
    return output


def build(body: dict[str, Any], plan: Plan, faults: Faults) -> dict[str, Any]:
    ids = (new_id("rs_"), new_id("msg_"))
    return response_object(
        body,
        plan,
        response_id=new_id("resp_"),
        created_at=int(time.time()),
        status="incomplete" if plan.truncated else "completed",
        output=_final_output(body, plan, ids),
        usage=None if faults.no_usage else responses_usage(plan),
    )


def _event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, **fields}


def stream(body: dict[str, Any], plan: Plan, faults: Faults) -> EventStream:
    response_id, created_at = new_id("resp_"), int(time.time())
    ids = (new_id("rs_"), new_id("msg_"))

    def snapshot(status: str, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {"usage": None, **extra}
        return response_object(
            body,
            plan,
            response_id=response_id,
            created_at=created_at,
            status=status,
            output=output,
            **fields,
        )

    events = [
        _event("response.created", response=snapshot("in_progress", [])),
        _event("response.in_progress", response=snapshot("in_progress", [])),
    ]
    index = 0
    if plan.reasoning_model:
        item = _reasoning_item(body, ids[0])
        events.append(_event("response.output_item.added", output_index=0, item=item))
        events.append(_event("response.output_item.done", output_index=0, item=item))
        index = 1
    where = {"item_id": ids[1], "output_index": index, "content_index": 0}
    words = plan.words[:2] if faults.error_event else plan.words
    if words:
        empty = _message(ids[1], "in_progress", [])
        events.append(_event("response.output_item.added", output_index=index, item=empty))
        events.append(_event("response.content_part.added", **where, part=_text_part("")))
        events.extend(
            _event("response.output_text.delta", **where, delta=word, logprobs=[]) for word in words
        )
    if faults.error_event:
        usage = None if faults.no_usage else responses_usage(plan.partial(len(words)))
        error = {"code": "server_error", "message": STREAM_ERROR_MESSAGE}
        terminal_at = len(events)
        events.append(_event("error", **error, param=None))
        failed = snapshot("failed", [], usage=usage, error=error)
        events.append(_event("response.failed", response=failed))
    else:
        final = _final_output(body, plan, ids)
        if words:
            text = plan.text
            events.append(_event("response.output_text.done", **where, text=text, logprobs=[]))
            events.append(_event("response.content_part.done", **where, part=_text_part(text)))
            events.append(_event("response.output_item.done", output_index=index, item=final[-1]))
        status = "incomplete" if plan.truncated else "completed"
        usage = None if faults.no_usage else responses_usage(plan)
        terminal_at = len(events)
        events.append(_event(f"response.{status}", response=snapshot(status, final, usage=usage)))
    frames = [event_frame({**event, "sequence_number": n}) for n, event in enumerate(events)]
    return EventStream(frames, terminal_at)
