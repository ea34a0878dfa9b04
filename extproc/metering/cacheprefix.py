"""A request's cacheable prompt prefix, fingerprinted before it is forwarded.

Prompt-cache hygiene spots requests that re-send a known prefix but pay full price for it.

OpenAI caches prompt prefixes of 1,024 tokens and more; a CI job that re-sends the same
repository context, or an agent that re-sends its history each turn, should mostly be
billed at the cached rate. We fingerprint each request's prefix (everything but its last
input item) and its token count; the settle script remembers recent fingerprints in
Redis, and when a fingerprint repeats, the prefix tokens the provider did *not* bill as
cached are counted as a cache miss, with what the miss cost. The spend report turns that
into a hit rate and the dollars a better cache would have saved. This runs on every
request's path, so it lives with the settlement it feeds, not with the reports.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from extproc.metering.settlement import CachePrefix
from extproc.wire.spec import EndpointSpec

MIN_CACHEABLE_TOKENS = 1024


def prefix_of(
    spec: EndpointSpec, body: dict[str, Any], counted: int, count: Callable[[str], int]
) -> CachePrefix | None:
    """The request's prefix (all but the last input item), if long enough to be cached."""
    key, reader = spec.cache_prefix_key, spec.reader
    if key is None or reader is None or counted < MIN_CACHEABLE_TOKENS:
        return None
    items = body.get(key)
    if not isinstance(items, list) or len(items) < 2:
        return None
    last = {**body, key: items[-1:]}
    last.pop("instructions", None)
    last.pop("tools", None)
    tail_tokens = sum(count(text) for text in reader.input_texts(last))
    tokens = counted - tail_tokens
    if tokens < MIN_CACHEABLE_TOKENS:
        return None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(body.get("model", "")).encode())
    head = {**body, key: items[:-1]}
    for text in reader.input_texts(head):
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return CachePrefix(digest.hexdigest(), tokens)
