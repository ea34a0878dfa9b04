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

The same pass fingerprints the whole request (the prefix's digest carried on over the last
item): the runaway breaker (`governance.breaker`) counts a request sent again and again by
it. Both are made only for requests of 1,024 counted tokens and more.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from extproc.metering.settlement import CachePrefix
from extproc.wire.endpoints import Endpoint
from extproc.wire.spec import EndpointSpec

MIN_CACHEABLE_TOKENS = 1024


def _digest(reader: Endpoint, body: dict[str, Any], into: Any) -> Any:
    for text in reader.input_texts(body):
        into.update(text.encode("utf-8", "surrogatepass"))
        into.update(b"\x00")
    return into


def prefix_of(
    spec: EndpointSpec, body: dict[str, Any], counted: int, count: Callable[[str], int]
) -> CachePrefix | None:
    """The request's prefix (all but the last input item), if long enough to be cached, and
    the whole request's fingerprint; None under MIN_CACHEABLE_TOKENS."""
    reader = spec.reader
    if reader is None or counted < MIN_CACHEABLE_TOKENS:
        return None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(body.get("model", "")).encode())
    key = spec.cache_prefix_key
    items = body.get(key) if key else None
    if key is None or not isinstance(items, list) or len(items) < 2:
        return CachePrefix("", 0, _digest(reader, body, digest).hexdigest())
    last = {**body, key: items[-1:]}
    last.pop("instructions", None)
    last.pop("tools", None)
    _digest(reader, {**body, key: items[:-1]}, digest)
    fingerprint = digest.hexdigest()
    tail = list(reader.input_texts(last))
    whole = digest.copy()
    for text in tail:
        whole.update(text.encode("utf-8", "surrogatepass"))
        whole.update(b"\x00")
    tokens = counted - sum(count(text) for text in tail)
    if tokens < MIN_CACHEABLE_TOKENS:
        return CachePrefix("", 0, whole.hexdigest())
    return CachePrefix(fingerprint, tokens, whole.hexdigest())
