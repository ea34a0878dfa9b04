"""What an answer says it costs beyond its token totals, and what a request may add to it.

The provider bills a call by more than its input and output counts: the usage details
(cached reads, cache writes, audio), the service tier the answer reports (`flex` is half
price, `priority` about double) and the built-in tools the model called (web and file
searches per call, a code-interpreter container per container, each generated image).
This module reads those off the real response shapes, leniently (odd provider output never
raises, it only yields less), and reads off a request which built-in tools it enables and
how many calls it allows (`max_tool_calls`), which its reservation must cover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from extproc.wire.usage import NO_TOOLS, ImageCall, ToolCalls, Usage

# Built-in tool types a request can enable, by the name their fees are kept under.
WEB_SEARCH_TOOLS = {
    "web_search": "web_search",
    "web_search_2025_08_26": "web_search",
    "web_search_preview": "web_search_preview",
    "web_search_preview_2025_03_11": "web_search_preview",
}
BUILTIN_TOOLS = ("web_search", "web_search_preview", "file_search", "code_interpreter",
                 "image_generation")  # fmt: skip
_CALL_ITEMS = {
    "web_search_call": "web_search",
    "file_search_call": "file_search",
    "code_interpreter_call": "code_interpreter",
    "image_generation_call": "image_generation",
}
# Streaming events that announce a finished tool call: counted only when a stream is cut
# before its terminal event (the terminal response lists every call as an output item).
TOOL_DONE_EVENTS = {
    "response.web_search_call.completed": "web_search",
    "response.file_search_call.completed": "file_search",
    "response.code_interpreter_call.completed": "code_interpreter",
    "response.image_generation_call.completed": "image_generation",
}


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """The built-in tools a request enables, as its reservation must cover them."""

    kinds: tuple[str, ...] = ()  # from BUILTIN_TOOLS, in the request's order
    max_tool_calls: int | None = None
    image: ImageCall | None = None  # the image tool's model, size and quality, if set
    named_containers: frozenset[str] = frozenset()  # existing containers (already paid)


NO_TOOL_REQUEST = ToolRequest()


def _count(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def _detail(usage: dict[str, Any], details_key: str | None, key: str) -> int:
    details = usage.get(details_key) if details_key else None
    return _count(details.get(key)) if isinstance(details, dict) else 0


def read_usage(
    usage: Any,
    *,
    input_key: str,
    input_details: str,
    output_key: str | None,
    output_details: str | None,
    service_tier: str = "",
) -> Usage | None:
    """Usage from a provider usage object; None unless it holds at least one count.

    Every detail is a subset of its total, so each is clamped to it: a provider's odd
    report can never bill a token twice.
    """
    if not isinstance(usage, dict):
        return None
    raw_in = usage.get(input_key)
    raw_out = usage.get(output_key) if output_key else None
    if not (type(raw_in) is int and raw_in >= 0) and not (type(raw_out) is int and raw_out >= 0):
        return None
    inp, out = _count(raw_in), _count(raw_out)
    cached = min(_detail(usage, input_details, "cached_tokens"), inp)
    write = min(_detail(usage, input_details, "cache_write_tokens"), inp - cached)
    audio_in = min(_detail(usage, input_details, "audio_tokens"), inp)
    return Usage(
        input_tokens=inp,
        cached_input_tokens=cached,
        output_tokens=out,
        reasoning_tokens=min(_detail(usage, output_details, "reasoning_tokens"), out),
        cache_write_tokens=write,
        input_audio_tokens=audio_in,
        output_audio_tokens=min(_detail(usage, output_details, "audio_tokens"), out),
        output_image_tokens=min(_detail(usage, output_details, "image_tokens"), out),
        service_tier=service_tier,
    )


def service_tier_of(obj: dict[str, Any]) -> str:
    tier = obj.get("service_tier")
    return tier if isinstance(tier, str) and tier.isascii() and len(tier) <= 32 else ""


def _image(item: dict[str, Any]) -> ImageCall:
    usage = item.get("usage")
    tokens = 0
    if isinstance(usage, dict):
        tokens = _detail(usage, "output_tokens_details", "image_tokens") or _count(
            usage.get("output_tokens")
        )
    size, quality, model = item.get("size"), item.get("quality"), item.get("model")
    return ImageCall(
        size=size if isinstance(size, str) else "",
        quality=quality if isinstance(quality, str) else "",
        image_tokens=tokens,
        model=model if isinstance(model, str) else "",
    )


def tool_calls_in(output: Any) -> ToolCalls:
    """The built-in tool calls among a Responses answer's output items.

    Code-interpreter calls are counted by distinct container: calls that share one pay it
    once. A failed call is billed like any other: the provider ran it.
    """
    if not isinstance(output, list):
        return NO_TOOLS
    searches = files = 0
    containers: set[str] = set()
    anonymous = 0
    images: list[ImageCall] = []
    for item in output:
        if not isinstance(item, dict):
            continue
        kind = _CALL_ITEMS.get(item.get("type"))  # type: ignore[arg-type]
        if kind is None:
            continue
        if kind == "web_search":
            searches += 1
        elif kind == "file_search":
            files += 1
        elif kind == "code_interpreter":
            container = item.get("container_id")
            if isinstance(container, str) and container:
                containers.add(container)
            else:
                anonymous += 1
        else:
            images.append(_image(item))
    if not (searches or files or containers or anonymous or images):
        return NO_TOOLS
    return ToolCalls(
        web_search=searches,
        file_search=files,
        code_interpreter=len(containers) + anonymous,
        images=tuple(images),
    )


def with_tools(usage: Usage | None, tier: str, tools: ToolCalls) -> Usage | None:
    """`usage` with the answer's service tier and tool calls added (None stays None)."""
    if usage is None or (not tier and not tools):
        return usage
    return Usage(
        input_tokens=usage.input_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        output_tokens=usage.output_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        input_audio_tokens=usage.input_audio_tokens,
        output_audio_tokens=usage.output_audio_tokens,
        output_image_tokens=usage.output_image_tokens,
        service_tier=tier or usage.service_tier,
        tools=tools or usage.tools,
    )


def requested_tools(body: dict[str, Any], max_tool_calls: int | None) -> ToolRequest:
    """The built-in tools a Responses request enables (function tools cost only tokens)."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return NO_TOOL_REQUEST
    kinds: list[str] = []
    image: ImageCall | None = None
    named: set[str] = set()
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        kind = tool.get("type")
        if not isinstance(kind, str):
            continue
        kind = WEB_SEARCH_TOOLS.get(kind, kind)
        if kind not in BUILTIN_TOOLS:
            continue
        if kind not in kinds:
            kinds.append(kind)
        if kind == "image_generation":
            image = ImageCall(
                size=str(tool.get("size") or ""),
                quality=str(tool.get("quality") or ""),
                model=str(tool.get("model") or ""),
            )
        elif kind == "code_interpreter" and isinstance(tool.get("container"), str):
            named.add(tool["container"])
    if not kinds:
        return NO_TOOL_REQUEST
    return ToolRequest(tuple(kinds), max_tool_calls, image, frozenset(named))


def search_request(body: dict[str, Any], model: str) -> ToolRequest:
    """Chat Completions searches once per request on a search model or with
    `web_search_options` (billed as a web_search_preview call)."""
    if isinstance(body.get("web_search_options"), dict) or "-search" in model.lower():
        return ToolRequest(("web_search_preview",), 1)
    return NO_TOOL_REQUEST
