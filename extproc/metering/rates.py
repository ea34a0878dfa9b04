"""Rates and the arithmetic of a charge: exact integers, one rounding point.

Every token rate is an integer number of nano-dollars per million tokens: $2.50 per 1M
tokens is 2_500_000_000, and a rate that is not a whole nano-dollar per token, like
$0.0375 per 1M (flex cached input), is still exact: 37_500_000. Per-call fees (a web search,
a code-interpreter container) are whole nano-dollars per call.

A part of a charge is quantity x rate, an exact integer in units of a millionth of a
nano-dollar (1e-15 USD). The cost of a call is the exact sum of its parts, rounded up to
the next whole nano-dollar: that is the one rounding point, so no part ever rounds on its
own and the cost is never below what the published prices give (it exceeds it by less
than one nano-dollar). Reservations use the same arithmetic.

Nothing here looks anything up or parses anything: `prices` builds these values once, when
the catalogue and the override file are compiled, and every request only multiplies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import NamedTuple

from extproc.wire.billing import ToolRequest
from extproc.wire.usage import ImageCall, ToolCalls, Usage

NANOS_PER_DOLLAR = 1_000_000_000
MILLION = 1_000_000
DEFAULT_TIER = "default"
# Tiers a response may report that bill at standard rates.
STANDARD_TIERS = frozenset({"", "auto", "default", "scale", "standard"})
TOKEN_FIELDS = (
    "input",
    "cached_input",
    "cache_write",
    "output",
    "input_audio",
    "output_audio",
    "output_image",
)


@dataclass(frozen=True, slots=True)
class Rates:
    """One rate card's token rates, nano-dollars per million tokens.

    A kind a model does not price separately costs what its parent kind costs (cache writes
    and audio input as input, audio and image output as output), as the provider bills it.
    """

    input: int
    cached_input: int
    output: int
    cache_write: int
    input_audio: int
    output_audio: int
    output_image: int

    @classmethod
    def of(cls, input: int, cached_input: int | None, output: int, **more: int | None) -> Rates:
        """Rates with every kind the model does not price falling back to its parent kind."""
        return cls(
            input=input,
            cached_input=input if cached_input is None else cached_input,
            output=output,
            cache_write=more.get("cache_write") or input,
            input_audio=more.get("input_audio") or input,
            output_audio=more.get("output_audio") or output,
            output_image=more.get("output_image") or output,
        )

    def highest(self, other: Rates) -> Rates:
        """Field by field, the higher of two rate cards."""
        pairs = zip(self.values(), other.values(), strict=True)
        return Rates(**dict(zip(TOKEN_FIELDS, (max(a, b) for a, b in pairs), strict=True)))

    def values(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in TOKEN_FIELDS)


@dataclass(frozen=True, slots=True)
class Card:
    """One service tier's rates, with long-context tiers.

    Above a threshold of input tokens the tier's rates apply to every token of the call
    (the provider's "cliff"), exactly as the catalogue defines it.
    """

    base: Rates
    above: tuple[tuple[int, Rates], ...] = ()  # (input-token threshold, rates), ascending

    def at(self, input_tokens: int) -> tuple[Rates, int]:
        """The rates for a call with this many input tokens, and the threshold crossed (0)."""
        for threshold, rates in reversed(self.above):
            if input_tokens > threshold:
                return rates, threshold
        return self.base, 0

    def highest(self) -> Rates:
        rates = self.base
        for _threshold, more in self.above:
            rates = rates.highest(more)
        return rates


@dataclass(frozen=True, slots=True)
class Price:
    """What one model costs: a card per service tier ("default" always), per-call tool fees."""

    family: str
    cards: Mapping[str, Card]
    web_search: int  # nanos per call
    file_search: int  # nanos per call
    source: str
    as_of: date
    origin: str  # "genai-prices", "override" or "provisional"
    note: str = ""
    # The per-token rates of the default card, nanos per token rounded down: what a missed
    # prompt-cache read is estimated to cost (hygiene counters, never a bill).
    per_token: tuple[int, int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        base = self.cards[DEFAULT_TIER].base
        rates = (base.input, base.cached_input, base.output)
        object.__setattr__(self, "per_token", tuple(r // MILLION for r in rates))

    def card(self, tier: str) -> tuple[Card, str]:
        """The card for the tier a response reported, and the name it is billed under."""
        if tier in STANDARD_TIERS:
            return self.cards[DEFAULT_TIER], DEFAULT_TIER
        card = self.cards.get(tier)
        if card is None:
            return self.cards[DEFAULT_TIER], DEFAULT_TIER
        return card, tier

    # $ per 1M tokens of the standard card, for people and reports.
    @property
    def input(self) -> Decimal:
        return per_million_usd(self.cards[DEFAULT_TIER].base.input)

    @property
    def cached_input(self) -> Decimal:
        return per_million_usd(self.cards[DEFAULT_TIER].base.cached_input)

    @property
    def output(self) -> Decimal:
        return per_million_usd(self.cards[DEFAULT_TIER].base.output)


def per_million_usd(nanos_per_million: int) -> Decimal:
    """Nano-dollars per 1M units as dollars per 1M, written plainly ("30", "0.0375")."""
    value = Decimal(nanos_per_million).scaleb(-9).normalize()
    exponent = value.as_tuple().exponent  # an int for a finite number
    return value.quantize(Decimal(1)) if isinstance(exponent, int) and exponent > 0 else value


@dataclass(frozen=True, slots=True)
class ImageTable:
    """Image tokens of one generated image by size and quality (how images are billed)."""

    tokens: Mapping[str, Mapping[str, int]]  # size -> quality -> image tokens

    def tokens_for(self, size: str, quality: str) -> int:
        """Unknown or "auto" size or quality: the largest the table lists (never less)."""
        sizes = [self.tokens[size]] if size in self.tokens else list(self.tokens.values())
        counts = [q[quality] if quality in q else max(q.values()) for q in sizes]
        return max(counts, default=0)


@dataclass(frozen=True, slots=True)
class ToolFees:
    """Built-in tool fees that are not per model, and the defaults for those that are."""

    web_search: int  # nanos per call, for models whose row names none
    file_search: int
    code_interpreter: int  # nanos per container
    web_search_preview: tuple[tuple[str, int], ...] = ()  # (model-name regex, nanos per call)
    preview_patterns: tuple[object, ...] = ()  # compiled regexes, same order
    image_model: str = "gpt-image-1"  # the image tool's model when the request names none
    images: Mapping[str, ImageTable] = field(default_factory=dict)  # model (or "*") -> table
    source: str = ""
    as_of: date | None = None

    def preview_rate(self, model: str, default: int) -> int:
        for (_pattern, nanos), regex in zip(
            self.web_search_preview, self.preview_patterns, strict=True
        ):
            if regex.search(model):  # type: ignore[attr-defined]
                return nanos
        return default

    def image_table(self, model: str) -> ImageTable | None:
        return self.images.get(model) or self.images.get("*")


class Part(NamedTuple):
    """One billed part: quantity x rate (nano-dollars per million units) = femtos.

    A tuple, not a dataclass: two or three are made per request, each pricing."""

    kind: str
    quantity: int
    rate: int  # nano-dollars per million units (tokens, calls, containers, image tokens)
    detail: str = ""

    @property
    def femtos(self) -> int:
        """The part's exact amount, in millionths of a nano-dollar."""
        return self.quantity * self.rate


def total_nanos(parts: tuple[Part, ...] | list[Part]) -> int:
    """The one rounding point: the exact sum of the parts, up to a whole nano-dollar."""
    femtos = sum(p.quantity * p.rate for p in parts)
    return -(-femtos // MILLION)


def token_parts(rates: Rates, usage: Usage) -> list[Part]:
    """Every token kind of a call at its rate; each count is a subset clamped to its total.

    Cached, cache-write and audio input tokens are carved out of input tokens, audio and
    image output out of output tokens (reasoning tokens are output tokens and cost the
    output rate).
    """
    inp = max(usage.input_tokens, 0)
    out = max(usage.output_tokens, 0)
    cached = min(max(usage.cached_input_tokens, 0), inp)
    parts = []
    if usage.cache_write_tokens or usage.input_audio_tokens:
        write = min(max(usage.cache_write_tokens, 0), inp - cached)
        audio_in = min(max(usage.input_audio_tokens, 0), inp - cached - write)
    else:
        write = audio_in = 0
    if inp - cached - write - audio_in:
        parts.append(Part("input", inp - cached - write - audio_in, rates.input))
    if cached:
        parts.append(Part("cached_input", cached, rates.cached_input))
    if write:
        parts.append(Part("cache_write", write, rates.cache_write))
    if audio_in:
        parts.append(Part("input_audio", audio_in, rates.input_audio))
    audio_out = min(max(usage.output_audio_tokens, 0), out) if usage.output_audio_tokens else 0
    image_out = 0
    if usage.output_image_tokens:
        image_out = min(max(usage.output_image_tokens, 0), out - audio_out)
    if out - audio_out - image_out:
        parts.append(Part("output", out - audio_out - image_out, rates.output))
    if audio_out:
        parts.append(Part("output_audio", audio_out, rates.output_audio))
    if image_out:
        parts.append(Part("output_image", image_out, rates.output_image))
    return parts


def web_search_rate(price: Price, fees: ToolFees, request: ToolRequest) -> tuple[int, str]:
    """Nanos per web search call: the preview tool has its own rate per model group."""
    preview = "web_search_preview" in request.kinds and "web_search" not in request.kinds
    if preview:
        return fees.preview_rate(price.family, price.web_search), "web_search_preview"
    return price.web_search, "web_search"


PriceOf = Callable[[str], "Price | None"]
"""The price of a model by name (the image tool's model is priced by its own row)."""


def image_part(call: ImageCall, request: ToolRequest, fees: ToolFees, price_of: PriceOf) -> Part:
    """One generated image: its image tokens (reported, else by size and quality) at its
    image model's output-image rate."""
    asked = request.image or ImageCall()
    model = call.model or asked.model or fees.image_model
    size, quality = call.size or asked.size, call.quality or asked.quality
    tokens = call.image_tokens
    if not tokens:
        table = fees.image_table(model)
        tokens = table.tokens_for(size, quality) if table else 0
    image_price = price_of(model)
    rate = image_price.cards[DEFAULT_TIER].base.output_image if image_price else 0
    return Part("image_generation", tokens, rate, f"{model} {size or 'auto'} {quality or 'auto'}")


def tool_parts(
    price: Price,
    fees: ToolFees,
    calls: ToolCalls,
    request: ToolRequest,
    price_of: PriceOf,
) -> list[Part]:
    parts: list[Part] = []
    if calls.web_search:
        nanos, kind = web_search_rate(price, fees, request)
        parts.append(Part("web_search", calls.web_search, nanos * MILLION, kind))
    if calls.file_search:
        parts.append(Part("file_search", calls.file_search, price.file_search * MILLION))
    if calls.code_interpreter:
        rate = fees.code_interpreter * MILLION
        parts.append(Part("code_interpreter", calls.code_interpreter, rate, "container"))
    parts.extend(image_part(call, request, fees, price_of) for call in calls.images)
    return parts


def tool_call_fee(
    kind: str, price: Price, fees: ToolFees, request: ToolRequest, price_of: PriceOf
) -> int:
    """The most one call of a built-in tool can cost, in femtos (for reservations)."""
    if kind in ("web_search", "web_search_preview"):
        return web_search_rate(price, fees, request)[0] * MILLION
    if kind == "file_search":
        return price.file_search * MILLION
    if kind == "code_interpreter":
        return fees.code_interpreter * MILLION
    if kind == "image_generation":
        return image_part(ImageCall(), request, fees, price_of).femtos
    return 0
