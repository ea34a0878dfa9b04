"""Deterministic model output whose token count is known in advance.

Every word below is a single token, with or without a leading space, in both
o200k_base and cl100k_base, so n words are n tokens and a test can check the
usage the simulator reports against tiktoken on the text it returned.
"""

from __future__ import annotations

from functools import lru_cache

WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "every",
    "request",
    "with",
    "plain",
    "words",
    "that",
    "count",
    "exactly",
    "one",
    "token",
    "each",
    "so",
    "usage",
    "numbers",
    "stay",
    "easy",
    "to",
    "check",
    "and",
    "compare",
    "across",
    "runs",
)


@lru_cache(maxsize=256)
def output_words(n: int) -> tuple[str, ...]:
    """The first n output tokens as stream deltas; joined they form the answer text."""
    if n <= 0:
        return ()
    first = WORDS[0].capitalize()
    return (first, *(" " + WORDS[i % len(WORDS)] for i in range(1, n)))


@lru_cache(maxsize=256)
def output_text(n: int) -> str:
    return "".join(output_words(n))
