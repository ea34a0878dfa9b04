"""Prompt-cache hygiene: spot requests that re-send a known prefix but pay full price for it.

OpenAI caches prompt prefixes of 1,024 tokens and more; a CI job that re-sends the same
repository context, or an agent that re-sends its history each turn, should mostly be
billed at the cached rate. We fingerprint each request's prefix (everything but its last
input item) and its token count; the settle script remembers recent fingerprints in
Redis, and when a fingerprint repeats, the prefix tokens the provider did *not* bill as
cached are counted as a cache miss, with what the miss cost. The spend report turns that
into a hit rate and the dollars a better cache would have saved.

The same pass fingerprints the whole request (the prefix's digest carried on over the last
item): the runaway breaker (`governance.breaker`) counts a request sent again and again by
it. Both are made only for requests of 1,024 counted tokens and more.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from extproc.wire.endpoints import Endpoint

MIN_CACHEABLE_TOKENS = 1024
_PREFIX_KEY = {"responses": "input", "chat.completions": "messages"}


@dataclass(frozen=True, slots=True)
class Prefix:
    fingerprint: str  # the cacheable prefix's; "" when it is too short to be cached
    tokens: int
    request: str = ""  # the whole request's


def _digest(endpoint: Endpoint, body: dict[str, Any], into: Any) -> Any:
    for text in endpoint.input_texts(body):
        into.update(text.encode("utf-8", "surrogatepass"))
        into.update(b"\x00")
    return into


def prefix_of(
    endpoint: Endpoint, body: dict[str, Any], counted: int, count: Callable[[str], int]
) -> Prefix | None:
    """The request's prefix (all but the last input item), if long enough to be cached, and
    the whole request's fingerprint; None under MIN_CACHEABLE_TOKENS."""
    if counted < MIN_CACHEABLE_TOKENS:
        return None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(body.get("model", "")).encode())
    key = _PREFIX_KEY.get(endpoint.name)
    items = body.get(key) if key else None
    if not isinstance(items, list) or len(items) < 2:
        return Prefix("", 0, _digest(endpoint, body, digest).hexdigest())
    last = {**body, key: items[-1:]}
    last.pop("instructions", None)
    last.pop("tools", None)
    _digest(endpoint, {**body, key: items[:-1]}, digest)
    fingerprint = digest.hexdigest()
    tail = list(endpoint.input_texts(last))
    whole = digest.copy()
    for text in tail:
        whole.update(text.encode("utf-8", "surrogatepass"))
        whole.update(b"\x00")
    tokens = counted - sum(count(text) for text in tail)
    if tokens < MIN_CACHEABLE_TOKENS:
        return Prefix("", 0, whole.hexdigest())
    return Prefix(fingerprint, tokens, whole.hexdigest())
