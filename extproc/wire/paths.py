"""Which OpenAI API a request is for, however its path is spelled.

The gateway denies by default, so every request is classified here before anything else
happens: a metered endpoint (tokens counted, budget reserved), another OpenAI endpoint that
a workspace's policy may let through (`Passthrough`), the per-key model list the sidecar
answers itself, or nothing we know, which is refused with 404 rather than forwarded.

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

import re
from dataclasses import dataclass
from enum import Enum

from extproc.wire.endpoints import ENDPOINTS, Endpoint
from extproc.wire.priced import PRICED

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


class Pricing(Enum):
    """How a passthrough call is priced, decided by what the provider's answer says."""

    FREE = "free"  # costs nothing at the provider (reads, deletes, moderation, uploads)
    USAGE = "usage"  # the answer carries token usage we can price from the table
    UNPRICED = "unpriced"  # costs money the answer does not tell us: recorded, not priced


@dataclass(frozen=True, slots=True)
class Passthrough:
    """One OpenAI API besides the metered four, in one of the groups a policy allows."""

    group: str
    methods: frozenset[str]
    pattern: re.Pattern[str]
    pricing: Pricing
    # For calls priced from their usage: how their requests are read, counted and held
    # (`extproc.wire.priced`); None for the others.
    spec: Endpoint | None = None

    def matches(self, method: str, path: str) -> bool:
        return method in self.methods and self.pattern.fullmatch(path) is not None


def _api(
    group: str, methods: str, pattern: str, pricing: Pricing, spec: Endpoint | None = None
) -> Passthrough:
    return Passthrough(group, frozenset(methods.split()), re.compile(pattern), pricing, spec)


_ID = r"[A-Za-z0-9_.:-]+"
FREE, USAGE, UNPRICED = Pricing.FREE, Pricing.USAGE, Pricing.UNPRICED
PASSTHROUGH: tuple[Passthrough, ...] = (
    _api("models", "GET", rf"/v1/models(/{_ID})?", FREE),
    _api("files", "GET POST", r"/v1/files", FREE),
    _api("files", "GET DELETE", rf"/v1/files/{_ID}", FREE),
    _api("files", "GET", rf"/v1/files/{_ID}/content", FREE),
    _api("uploads", "POST", rf"/v1/uploads(/{_ID}(/parts|/complete|/cancel))?", FREE),
    _api("batches", "POST", r"/v1/batches", UNPRICED),
    _api("batches", "GET", rf"/v1/batches(/{_ID})?", FREE),
    _api("batches", "POST", rf"/v1/batches/{_ID}/cancel", FREE),
    _api("responses", "POST", r"/v1/responses/input_tokens", FREE),
    _api("responses", "POST", r"/v1/responses/compact", USAGE, PRICED["responses.compact"]),
    _api("responses", "GET DELETE", rf"/v1/responses/{_ID}", FREE),
    _api("responses", "GET", rf"/v1/responses/{_ID}/input_items", FREE),
    _api("responses", "POST", rf"/v1/responses/{_ID}/cancel", FREE),
    _api("chat.completions", "GET", rf"/v1/chat/completions(/{_ID}(/messages)?)?", FREE),
    _api("chat.completions", "POST DELETE", rf"/v1/chat/completions/{_ID}", FREE),
    _api("conversations", "GET POST DELETE", rf"/v1/conversations(/{_ID})*", FREE),
    _api("images", "POST", r"/v1/images/generations", USAGE, PRICED["images.generations"]),
    _api("images", "POST", r"/v1/images/(edits|variations)", UNPRICED),
    _api("audio", "POST", r"/v1/audio/(speech|transcriptions|translations)", UNPRICED),
    _api("moderations", "POST", r"/v1/moderations", FREE),
    _api("vector_stores", "GET DELETE", rf"/v1/vector_stores(/{_ID})*", FREE),
    _api("vector_stores", "POST", rf"/v1/vector_stores(/{_ID})*", UNPRICED),
)
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(api.group for api in PASSTHROUGH))
MODELS_PATH = "/v1/models"


class Kind(Enum):
    METERED = "metered"
    PASSTHROUGH = "passthrough"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Target:
    """What a request is for: its kind, the path to forward, and the API behind it."""

    kind: Kind
    method: str
    path: str  # canonical path, no query
    query: str = ""
    endpoint: Endpoint | None = None
    api: Passthrough | None = None

    @property
    def forward_path(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def name(self) -> str:
        """The ledger's endpoint name: `chat.completions`, `files`, `images.generations`."""
        if self.endpoint is not None:
            return self.endpoint.name
        if self.api is None:
            return ""
        parts = self.path.split("/")[2:]
        if self.api.group in ("images", "audio") and len(parts) > 1:
            return f"{self.api.group}.{parts[1]}"
        if parts[-1:] == ["compact"] and self.api.group == "responses":
            return "responses.compact"
        return self.api.group


def classify(method: str, raw_path: str) -> Target:
    """The one place that decides what a request is; no I/O, no policy."""
    canonical = canonical_path(raw_path)
    if canonical is None:
        return Target(Kind.UNKNOWN, method, raw_path.partition("?")[0][:200])
    path, query = canonical
    if method == "POST":
        endpoint = ENDPOINTS.get(path)
        if endpoint is not None:
            return Target(Kind.METERED, method, path, query, endpoint=endpoint)
    for api in PASSTHROUGH:
        if api.matches(method, path):
            return Target(Kind.PASSTHROUGH, method, path, query, api=api)
    return Target(Kind.UNKNOWN, method, path, query)
