"""Prompt tokens as OpenAI bills them, one function per request shape.

Each function returns the prompt as a token sequence rather than a bare count,
because the prompt-cache emulation needs the tokens themselves. Chat framing
(about three tokens per message, plus three to prime the reply) appears as
negative pseudo-tokens that no vocabulary uses, so counts and cache prefixes stay
consistent with each other.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from extproc.metering.tokens import encoding_name_for_model, get_encoding

MESSAGE = (-1, -2, -3)
NAME = (-4,)
REPLY_PRIMING = 3
IMAGE_TOKENS = 85
_IMAGE = (-5,) * IMAGE_TOKENS


@lru_cache(maxsize=8192)
def _encode(encoding: str, text: str) -> tuple[int, ...]:
    return tuple(get_encoding(encoding).encode_ordinary(text))


def encode(text: str, model: str) -> tuple[int, ...]:
    if not text:
        return ()
    return _encode(encoding_name_for_model(model), text)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _content(content: Any, model: str) -> list[int]:
    if isinstance(content, str):
        return list(encode(content, model))
    ids: list[int] = []
    if not isinstance(content, list):
        return ids
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type", "")
        if "image" in kind:
            ids.extend(_IMAGE)
        elif isinstance(part.get("text"), str):
            ids.extend(encode(part["text"], model))
        elif kind not in ("input_file", "file"):
            ids.extend(encode(_as_text(part), model))
    return ids


def _tools(tools: Any, model: str) -> list[int]:
    if not tools:
        return []
    return [*MESSAGE, *encode(_as_text(tools), model)]


def chat_prompt(body: dict[str, Any], model: str) -> list[int]:
    """Chat Completions prompt tokens, framing included (reply priming excluded)."""
    ids = _tools(body.get("tools") or body.get("functions"), model)
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        ids.extend(MESSAGE)
        ids.extend(encode(str(message.get("role", "")), model))
        ids.extend(_content(message.get("content"), model))
        if message.get("name"):
            ids.extend(NAME)
            ids.extend(encode(str(message["name"]), model))
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                continue
            ids.extend(encode(_as_text(function.get("name")), model))
            ids.extend(encode(_as_text(function.get("arguments")), model))
    return ids


def _responses_item(item: Any, model: str) -> list[int]:
    if isinstance(item, str):
        return [*MESSAGE, *encode("user", model), *encode(item, model)]
    if not isinstance(item, dict):
        return []
    kind = item.get("type", "message")
    ids = list(MESSAGE)
    if kind == "message":
        ids.extend(encode(str(item.get("role", "user")), model))
        ids.extend(_content(item.get("content"), model))
    elif kind == "function_call":
        ids.extend(encode(_as_text(item.get("name")), model))
        ids.extend(encode(_as_text(item.get("arguments")), model))
    elif kind.endswith("_output"):
        ids.extend(_content(item.get("output"), model))
    elif kind == "reasoning":
        for part in item.get("summary") or []:
            if isinstance(part, dict):
                ids.extend(encode(_as_text(part.get("text")), model))
    else:
        ids.extend(encode(_as_text({k: v for k, v in item.items() if k != "id"}), model))
    return ids


def responses_prompt(body: dict[str, Any], model: str) -> list[int]:
    """Responses API prompt tokens: tools, instructions, then input items."""
    ids = _tools(body.get("tools"), model)
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        ids.extend([*MESSAGE, *encode("developer", model), *encode(instructions, model)])
    raw = body.get("input")
    items = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    for item in items:
        ids.extend(_responses_item(item, model))
    return ids


def _is_token_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) for t in value)


def plain_inputs(value: Any, model: str) -> list[list[int]]:
    """Completions prompts or embedding inputs: strings or token arrays, no framing."""
    if value is None:
        return []
    if isinstance(value, str) or _is_token_array(value):
        value = [value]
    if not isinstance(value, list):
        return [list(encode(_as_text(value), model))]
    out: list[list[int]] = []
    for entry in value:
        if isinstance(entry, str):
            out.append(list(encode(entry, model)))
        elif isinstance(entry, list):
            out.append([t for t in entry if isinstance(t, int)])
        else:
            out.append(list(encode(_as_text(entry), model)))
    return out
