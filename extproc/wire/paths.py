"""Which OpenAI API a request is for, however its path is spelled.

The gateway denies by default, so every request is classified here before anything else
happens: a metered endpoint (tokens counted, budget reserved), another OpenAI endpoint that
a workspace's policy may let through, or nothing we know, which is refused with 404 rather
than forwarded. What each endpoint is lives in its spec (`extproc.wire.spec`).

Spellings the provider treats as the same resource must land on the same endpoint, or a
trailing slash would be enough to skip metering. `canonical_path` therefore applies the
equivalences of RFC 3986 that a server may rely on (percent-encoded unreserved characters
decoded, dot segments removed) plus the two a web server commonly adds (duplicate slashes
merged, one trailing slash ignored). Envoy normalises dot segments and slashes before we
see the path (see envoy/envoy.yaml), but the sidecar does not depend on that. Anything else
that merely looks like an endpoint (other case, an encoded slash, a stray suffix) is not it.
The forwarded request carries the canonical path, so the provider sees exactly what was
metered.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from extproc.wire.spec import METERED_BY_PATH, PASSTHROUGH, EndpointSpec

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# What may appear in a path we forward: RFC 3986 pchar plus '/'. Anything else (spaces,
# control characters, non-ASCII, backslashes) is not a spelling of an API path.
_PATH_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@%/"
)


def canonical_path(raw: str) -> tuple[str, str] | None:
    """(path, query) in canonical form, or None when `raw` is not a usable origin-form path.

    The query string is kept as sent (OpenAI ignores it on the endpoints we meter; Azure
    needs `api-version`); a fragment is dropped, as HTTP clients never send one.
    """
    path, _, query = raw.partition("?")
    path = path.partition("#")[0]
    query = query.partition("#")[0]
    if not path.startswith("/") or not set(path) <= _PATH_CHARS:
        return None
    if "%" in path:
        decoded = _decode_unreserved(path)
        if decoded is None:
            return None
        path = decoded
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                return None
            segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments), query


def _decode_unreserved(path: str) -> str | None:
    """Decode %XX only where XX is an unreserved character; malformed escapes: None.

    Encoded reserved characters (%2F, %3F, ...) keep their meaning as data, so they stay
    encoded and such a path matches no endpoint.
    """
    out: list[str] = []
    i = 0
    while i < len(path):
        ch = path[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        pair = path[i + 1 : i + 3]
        if len(pair) != 2 or not set(pair) <= _HEX:
            return None
        decoded = chr(int(pair, 16))
        out.append(decoded if decoded in _UNRESERVED else "%" + pair.upper())
        i += 3
    return "".join(out)


class Kind(Enum):
    METERED = "metered"
    PASSTHROUGH = "passthrough"
    UNKNOWN = "unknown"


_METERED, _PASSTHROUGH, _UNKNOWN = Kind  # module globals: cheaper to read than Kind.X


@dataclass(frozen=True, slots=True)
class Target:
    """What a request is for: its kind, the path to forward, and the endpoint's spec."""

    kind: Kind
    method: str
    path: str  # canonical path, no query
    query: str = ""
    spec: EndpointSpec | None = None

    @property
    def forward_path(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def name(self) -> str:
        """The ledger's endpoint name: `chat.completions`, `files`, `images.generations`."""
        return self.spec.name if self.spec is not None else ""


_SEEN: dict[tuple[str, str], Target] = {}
_SEEN_MAX = 4096


def classify(method: str, raw_path: str) -> Target:
    """The one place that decides what a request is; no I/O, no policy.

    A pure function of its arguments, asked on every request with a handful of distinct
    paths: answers are kept (a bounded memo, emptied when full, so paths with ids or a
    flood of odd ones cost memory only up to the bound)."""
    key = (method, raw_path)
    target = _SEEN.get(key)
    if target is None:
        if len(_SEEN) >= _SEEN_MAX:
            _SEEN.clear()
        target = _SEEN[key] = _classify(method, raw_path)
    return target


def _classify(method: str, raw_path: str) -> Target:
    canonical = canonical_path(raw_path)
    if canonical is None:
        return Target(_UNKNOWN, method, raw_path.partition("?")[0][:200])
    path, query = canonical
    if method == "POST":
        spec = METERED_BY_PATH.get(path)
        if spec is not None:
            return Target(_METERED, method, path, query, spec)
    for spec in PASSTHROUGH:
        if spec.matches(method, path):
            return Target(_PASSTHROUGH, method, path, query, spec)
    return Target(_UNKNOWN, method, path, query)
