"""Every fact about an OpenAI endpoint, in one table: `SPECS`.

An `EndpointSpec` is one route (methods and path) and all that the rest of extproc needs to
know about it: its ledger name, how it is priced, how its bodies are read (the endpoint's
own module), which request field caps its output and which sets its reasoning effort, which
list holds its cacheable prompt prefix, its name in telemetry and in exports, and what it
may cost beyond tokens. Routing, admission, metering, telemetry and the books ask the spec;
none of them spells an endpoint's name or path (tests/unit/wire/test_spec.py checks that).
Adding an endpoint touches this table and the endpoint's own module.

The four metered endpoints are read, counted, reserved and billed from their usage. The
others pass through when a workspace's policy lets their group through (`group`), and are
recorded free, priced from their answer's usage (held like a metered call, with
`output_ceiling` output tokens per output), or unpriced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from extproc.wire.chat import ChatCompletions
from extproc.wire.common import Endpoint
from extproc.wire.completions import Completions
from extproc.wire.embeddings import Embeddings
from extproc.wire.priced import Compact, ImageGenerations
from extproc.wire.responses import Responses


class Pricing(Enum):
    """How a call is priced, decided by what the provider's answer says."""

    FREE = "free"  # costs nothing at the provider (reads, deletes, moderation, uploads)
    USAGE = "usage"  # the answer carries token usage we can price from the table
    UNPRICED = "unpriced"  # costs money the answer does not tell us: recorded, not priced


@dataclass(frozen=True, slots=True)
class PriceParts:
    """What a call may be billed for beyond the token counts its answer reports."""

    # A search model searches once per request and the answer never says so: a completed
    # call is billed one web search (Chat Completions with `web_search_options`).
    search_per_request: bool = False
    # The output is an image: output tokens are billed at the model's image-output rate.
    output_is_image: bool = False


TOKENS = PriceParts()


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One OpenAI API route and every fact extproc knows about it."""

    name: str  # the ledger's name: "chat.completions", "files", "images.generations"
    methods: frozenset[str]
    path: str  # the canonical path, or for an id-bearing route the pattern it matches
    display: str  # for people and FOCUS exports: "OpenAI Chat Completions API"
    operation: str  # telemetry's gen_ai.operation.name: "chat", "embeddings", "files"
    pricing: Pricing
    metered: bool = False  # read, counted, routed, reserved and billed like a model call
    group: str = ""  # the policy's passthrough group it belongs to ("" for metered ones)
    # How its request and response bodies are read (metered and usage-priced routes).
    reader: Endpoint | None = None
    output_cap_field: str | None = None  # the request field that caps output; None: none
    # An older field meaning the same, kept when the client sent it (never both).
    legacy_output_cap_field: str | None = None
    effort_field: tuple[str, ...] = ()  # where reasoning effort is set: ("reasoning", "effort")
    cache_prefix_key: str | None = None  # the list whose head is the cacheable prefix
    prompt_cache_key: bool = False  # takes `prompt_cache_key`
    stand_in: bool = True  # a chat model may stand in for the one asked (default, overdraft)
    parts: PriceParts = TOKENS
    # Usage-priced passthrough: output tokens held per output when the request states no
    # cap (the policy's `passthrough.output_ceiling` overrides).
    output_ceiling: int | None = None
    pattern: re.Pattern[str] | None = None  # None: the path must equal `path`

    def matches(self, method: str, path: str) -> bool:
        if method not in self.methods:
            return False
        if self.pattern is None:
            return path == self.path
        return self.pattern.fullmatch(path) is not None

    @property
    def takes_output_cap(self) -> bool:
        return self.output_cap_field is not None

    @property
    def takes_effort(self) -> bool:
        return bool(self.effort_field)


_POST = frozenset({"POST"})
RESPONSES = EndpointSpec(
    "responses",
    _POST,
    "/v1/responses",
    "OpenAI Responses API",
    "chat",
    Pricing.USAGE,
    metered=True,
    reader=Responses(),
    output_cap_field="max_output_tokens",
    effort_field=("reasoning", "effort"),
    cache_prefix_key="input",
    prompt_cache_key=True,
)
CHAT = EndpointSpec(
    "chat.completions",
    _POST,
    "/v1/chat/completions",
    "OpenAI Chat Completions API",
    "chat",
    Pricing.USAGE,
    metered=True,
    reader=ChatCompletions(),
    output_cap_field="max_completion_tokens",
    legacy_output_cap_field="max_tokens",
    effort_field=("reasoning_effort",),
    cache_prefix_key="messages",
    prompt_cache_key=True,
    parts=PriceParts(search_per_request=True),
)
COMPLETIONS = EndpointSpec(
    "completions",
    _POST,
    "/v1/completions",
    "OpenAI Completions API",
    "text_completion",
    Pricing.USAGE,
    metered=True,
    reader=Completions(),
    output_cap_field="max_tokens",
)
EMBEDDINGS = EndpointSpec(
    "embeddings",
    _POST,
    "/v1/embeddings",
    "OpenAI Embeddings API",
    "embeddings",
    Pricing.USAGE,
    metered=True,
    reader=Embeddings(),
    stand_in=False,
)
METERED: tuple[EndpointSpec, ...] = (RESPONSES, CHAT, COMPLETIONS, EMBEDDINGS)

_ID = r"[A-Za-z0-9_.:-]+"
FREE, USAGE, UNPRICED = Pricing.FREE, Pricing.USAGE, Pricing.UNPRICED


def _api(
    name: str,
    methods: str,
    pattern: str,
    pricing: Pricing,
    display: str,
    *,
    group: str = "",
    operation: str = "",
    reader: Endpoint | None = None,
    parts: PriceParts = TOKENS,
    output_ceiling: int | None = None,
) -> EndpointSpec:
    """A passthrough route; its group is the first part of its name unless given."""
    return EndpointSpec(
        name,
        frozenset(methods.split()),
        pattern,
        display,
        operation or name,
        pricing,
        group=group or name.split(".", 1)[0],
        reader=reader,
        parts=parts,
        output_ceiling=output_ceiling,
        pattern=re.compile(pattern),
    )


MODELS_PATH = "/v1/models"
_FILES, _BATCH = "OpenAI Files API", "OpenAI Batch API"
_RESPONSES, _CHAT = RESPONSES.display, CHAT.display
_IMAGES, _AUDIO = "OpenAI Images API", "OpenAI Audio API"
_VECTOR_STORES = "OpenAI Vector Stores API"
PASSTHROUGH: tuple[EndpointSpec, ...] = (
    _api("models", "GET", rf"{MODELS_PATH}(/{_ID})?", FREE, "OpenAI Models API"),
    _api("files", "GET POST", r"/v1/files", FREE, _FILES),
    _api("files", "GET DELETE", rf"/v1/files/{_ID}", FREE, _FILES),
    _api("files", "GET", rf"/v1/files/{_ID}/content", FREE, _FILES),
    _api(
        "uploads",
        "POST",
        rf"/v1/uploads(/{_ID}(/parts|/complete|/cancel))?",
        FREE,
        "OpenAI Uploads API",
    ),
    _api("batches", "POST", r"/v1/batches", UNPRICED, _BATCH),
    _api("batches", "GET", rf"/v1/batches(/{_ID})?", FREE, _BATCH),
    _api("batches", "POST", rf"/v1/batches/{_ID}/cancel", FREE, _BATCH),
    _api("responses", "POST", r"/v1/responses/input_tokens", FREE, _RESPONSES),
    # A compaction's output (its summary, reasoning included) is not capped by the request:
    # this holds for a long one, at the output rate of the model named.
    _api(
        "responses.compact",
        "POST",
        r"/v1/responses/compact",
        USAGE,
        _RESPONSES,
        operation="chat",
        reader=Compact(),
        output_ceiling=16_384,
    ),
    _api("responses", "GET DELETE", rf"/v1/responses/{_ID}", FREE, _RESPONSES),
    _api("responses", "GET", rf"/v1/responses/{_ID}/input_items", FREE, _RESPONSES),
    _api("responses", "POST", rf"/v1/responses/{_ID}/cancel", FREE, _RESPONSES),
    _api("chat.completions", "GET", rf"/v1/chat/completions(/{_ID}(/messages)?)?", FREE, _CHAT),
    _api("chat.completions", "POST DELETE", rf"/v1/chat/completions/{_ID}", FREE, _CHAT),
    _api(
        "conversations",
        "GET POST DELETE",
        rf"/v1/conversations(/{_ID})*",
        FREE,
        "OpenAI Conversations API",
    ),
    # gpt-image-1's largest image (1024x1536 or 1536x1024 at high quality) in image output
    # tokens: no image of that model costs more.
    _api(
        "images.generations",
        "POST",
        r"/v1/images/generations",
        USAGE,
        _IMAGES,
        operation="generate_content",
        reader=ImageGenerations(),
        parts=PriceParts(output_is_image=True),
        output_ceiling=6_240,
    ),
    _api("images.edits", "POST", r"/v1/images/edits", UNPRICED, _IMAGES),
    _api("images.variations", "POST", r"/v1/images/variations", UNPRICED, _IMAGES),
    _api("audio.speech", "POST", r"/v1/audio/speech", UNPRICED, _AUDIO),
    _api("audio.transcriptions", "POST", r"/v1/audio/transcriptions", UNPRICED, _AUDIO),
    _api("audio.translations", "POST", r"/v1/audio/translations", UNPRICED, _AUDIO),
    _api("moderations", "POST", r"/v1/moderations", FREE, "OpenAI Moderations API"),
    _api("vector_stores", "GET DELETE", rf"/v1/vector_stores(/{_ID})*", FREE, _VECTOR_STORES),
    _api("vector_stores", "POST", rf"/v1/vector_stores(/{_ID})*", UNPRICED, _VECTOR_STORES),
)
SPECS: tuple[EndpointSpec, ...] = METERED + PASSTHROUGH

METERED_BY_PATH: dict[str, EndpointSpec] = {s.path: s for s in METERED}
METERED_BY_NAME: dict[str, EndpointSpec] = {s.name: s for s in METERED}
METERED_NAMES: tuple[str, ...] = tuple(METERED_BY_NAME)
"""What a routing rule's `endpoint` condition may name."""
DEFAULT_METERED = RESPONSES.name
"""The endpoint a question about routing is asked for when it names none."""
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(s.group for s in PASSTHROUGH))
"""The passthrough groups a workspace's policy may let through."""
PRICED: dict[str, EndpointSpec] = {s.name: s for s in PASSTHROUGH if s.pricing is USAGE}
"""The passthrough endpoints priced from their answer's usage, by name."""
MODELS = PASSTHROUGH[0]
"""`GET /v1/models[/id]`: answered by the sidecar itself for a governed caller (the list at
`MODELS_PATH`, one model below it)."""
_DISPLAY = {s.name: s.display for s in SPECS}


def metered(name: str) -> EndpointSpec:
    """The metered endpoint called `name` (one of `METERED_NAMES`)."""
    return METERED_BY_NAME[name]


def display_name(name: str) -> str:
    """What people call the API behind a ledger endpoint name."""
    return _DISPLAY.get(name, "OpenAI API")
