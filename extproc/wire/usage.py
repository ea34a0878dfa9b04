"""Token usage as the provider bills it.

One value type shared by the wire parsers (which read it off responses), the price
table (which turns it into money) and the ledger (which stores it). Cached tokens
are a subset of input tokens and reasoning tokens a subset of output tokens, exactly
as OpenAI reports them, so nothing is ever double counted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def uncached_input_tokens(self) -> int:
        return max(self.input_tokens - self.cached_input_tokens, 0)
