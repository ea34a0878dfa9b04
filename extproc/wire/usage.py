"""Everything the provider bills for one call, as its answer reports it.

One value type shared by the wire parsers (which read it off responses), the price
table (which turns it into money) and the ledger (which stores it). Token counts follow
OpenAI's accounting: cached, cache-write and audio input tokens are subsets of input
tokens, reasoning and audio output tokens subsets of output tokens, so nothing is ever
double counted. Beside the tokens: the service tier the answer says it was served at
(flex, priority, default...), which picks the rate card, and the built-in tool calls it
made (web and file searches, code-interpreter containers, generated images), billed per
call on top of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ImageCall:
    """One `image_generation_call`: priced by its image tokens, else by its size and quality."""

    size: str = ""
    quality: str = ""
    image_tokens: int = 0  # output image tokens the answer reported (0: not reported)
    model: str = ""  # the image model, when the answer names it


@dataclass(frozen=True, slots=True)
class ToolCalls:
    """Built-in tool calls an answer made: each is billed per call, on top of tokens."""

    web_search: int = 0
    file_search: int = 0
    code_interpreter: int = 0  # containers opened (calls sharing a container pay once)
    images: tuple[ImageCall, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.web_search or self.file_search or self.code_interpreter or self.images)


NO_TOOLS = ToolCalls()


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    output_image_tokens: int = 0
    # "" when the answer named no tier (billed as "default").
    service_tier: str = ""
    tools: ToolCalls = NO_TOOLS

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def uncached_input_tokens(self) -> int:
        return max(self.input_tokens - self.cached_input_tokens, 0)
