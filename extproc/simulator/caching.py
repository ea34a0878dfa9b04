"""Emulation of OpenAI's automatic prompt caching.

OpenAI caches prompts of 1024 tokens or more and reports hits in 128-token
increments of the shared prefix. Hashing the prompt in 128-token blocks, each
hash chained to the one before, makes "this prefix was seen" a set lookup per
block; a bounded LRU forgets old prefixes the way the real cache evicts them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

BLOCK = 128
MIN_CACHED = 1024


def block_hashes(tokens: Sequence[int]) -> list[int]:
    hashes: list[int] = []
    previous = 0
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        previous = hash((previous, tuple(tokens[start : start + BLOCK])))
        hashes.append(previous)
    return hashes


def cached_length(matched_blocks: int) -> int:
    tokens = matched_blocks * BLOCK
    return tokens if tokens >= MIN_CACHED else 0


class PromptCache:
    """Remembers prompt prefixes per scope (model and prompt_cache_key)."""

    def __init__(self, max_blocks: int = 200_000) -> None:
        self._blocks: OrderedDict[tuple[Hashable, int], None] = OrderedDict()
        self._max_blocks = max_blocks

    def lookup_and_store(self, scope: Hashable, tokens: Sequence[int]) -> int:
        """Cached tokens for this prompt; then remember it for later requests."""
        if len(tokens) < MIN_CACHED:
            return 0
        hashes = block_hashes(tokens)
        matched = 0
        for h in hashes:
            if (scope, h) not in self._blocks:
                break
            matched += 1
        for h in hashes:
            key = (scope, h)
            if key in self._blocks:
                self._blocks.move_to_end(key)
            else:
                self._blocks[key] = None
        while len(self._blocks) > self._max_blocks:
            self._blocks.popitem(last=False)
        return cached_length(matched)
