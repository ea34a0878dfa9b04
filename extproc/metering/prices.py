"""The price table: which rates a call is billed at, and what it costs, exactly.

Built once at start (and on reload) from two sources: the maintained catalogue
(`catalogue`: pydantic's genai-prices) and the project's own price file on top of it
(`overrides`: models the catalogue lacks, corrections, negotiated rates). Every record is
stamped with both versions. The request path only looks names up in dictionaries and
multiplies integers (`rates`); it never calls the catalogue package.

Names resolve to a row by exact name: the file's rows first, then the catalogue's own
matching rules, each tried on the name and then with a dated snapshot or "-latest" suffix
dropped (`gpt-4o-mini-2024-07-18` is `gpt-4o-mini`, never `gpt-4o`). A name nothing prices
is never silently guessed: it gets the provisional rate of its class (the highest rates the
table lists for models whose names match the class, see the price file's `[[provisional]]`),
flagged on the record; the policy decides whether such a request is admitted at all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import cache
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from extproc.metering import rates as r
from extproc.metering.catalogue import Catalogue, compile_catalogue
from extproc.metering.overrides import (
    ClassSpec,
    PriceFile,
    PriceFileError,
    RateSpec,
    RowSpec,
    parse_price_file,
)
from extproc.metering.rates import (
    DEFAULT_TIER,
    MILLION,
    NANOS_PER_DOLLAR,
    Card,
    ImageTable,
    Part,
    Price,
    Rates,
    ToolFees,
)
from extproc.wire.billing import NO_TOOL_REQUEST, ToolRequest
from extproc.wire.usage import Usage

__all__ = [
    "NANOS_PER_DOLLAR",
    "Charge",
    "Part",
    "Price",
    "PriceFileError",
    "PriceTable",
    "PriceTableError",
    "default_table",
    "nanos_per_token",
    "usd",
]

PROVISIONAL = "provisional"
FALLBACK_FAMILY = "provisional:any"
PriceTableError = PriceFileError
_SNAPSHOT_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4}|latest|chat-latest)$")
# A reservation applies a long-context tier this close below its threshold: our own count
# of the input is a close estimate, not the provider's.
LONG_CONTEXT_MARGIN = 100  # 1/100 of the counted input


def usd(nanos: int, *, cents: bool = False, sign: bool = False, grouped: bool = False) -> str:
    """The one money formatter: nano-dollars as a dollar amount.

    Exact by default (every nano-dollar, no trailing zeros: "0", "12.5", "0.000001234"),
    for ledgers, JSON and headers; `cents` rounds half up to the cent for people. `sign`
    adds "$", `grouped` thousands separators. Never a float: money must not round by accident.
    """
    # Integer arithmetic, no Decimal: every response carries an amount or two, and Decimal
    # costs three times as much. A test holds the text to Decimal's on thousands of values.
    whole, frac = divmod(abs(nanos), NANOS_PER_DOLLAR)
    if cents:  # half up, away from zero (the sign is put back below)
        hundredths = (frac + NANOS_PER_DOLLAR // 200) // (NANOS_PER_DOLLAR // 100)
        whole, hundredths = whole + hundredths // 100, hundredths % 100
        fraction = f"{hundredths:02d}"
    else:
        fraction = f"{frac:09d}".rstrip("0")
    integral = f"{whole:,}" if grouped else str(whole)
    text = f"{integral}.{fraction}" if fraction else integral
    if nanos < 0:
        text = "-" + text
    return f"${text}" if sign else text


def nanos_per_token(usd_per_million: Decimal) -> int:
    """Whole nano-dollars per token of a $/1M rate (rounded down; for estimates only)."""
    return int(usd_per_million * NANOS_PER_DOLLAR) // MILLION


CENT_NANOS = NANOS_PER_DOLLAR // 100


def usd_for_people(nanos: int) -> str:
    """Money as people read it, the one rule for every screen, report and alert text:
    "$1,234.57" to the cent, and an amount under a cent exactly ("$0.001087"), so spend
    that is not zero never reads "$0.00". Machine output (JSON, headers, exports) keeps
    `usd`'s exact figures."""
    if nanos and abs(nanos) < CENT_NANOS:
        return usd(nanos, sign=True)
    return usd(nanos, cents=True, sign=True, grouped=True)


class Charge(NamedTuple):
    """What one call costs: its parts, their exact sum, and which rates billed it."""

    nanos: int
    family: str
    fallback: bool  # the model is unknown: billed at its class's provisional rate
    parts: tuple[Part, ...] = ()
    tier: str = DEFAULT_TIER  # the rate card: "default", "flex", "priority", "batch"...
    threshold: int = 0  # the long-context tier crossed (input tokens above it), 0: none
    origin: str = ""  # "genai-prices", "override" or "provisional"

    @property
    def provisional(self) -> bool:
        return self.fallback

    @property
    def usd(self) -> Decimal:
        return Decimal(self.nanos).scaleb(-9)


def model_base_name(model: str) -> str:
    return model.strip().lower()


def _names(model: str) -> list[str]:
    """The name, then with its dated snapshot / "-latest" suffixes dropped one by one."""
    name = model_base_name(model)
    out = [name]
    while True:
        shorter = _SNAPSHOT_SUFFIX.sub("", name)
        if shorter == name or not shorter:
            return out
        out.append(shorter)
        name = shorter


_FAMILY_MEMO = 1024


class PriceTable:
    """The compiled table; lookups are a few dictionary probes, remembered per name."""

    def __init__(
        self,
        catalogue: Catalogue,
        overrides: Mapping[str, Price],
        tools: ToolFees,
        classes: tuple[tuple[ClassSpec, Price], ...],
        *,
        override_version: str,
        updated: date,
        origin: str = "",
    ) -> None:
        self.catalogue = catalogue
        self.overrides = dict(overrides)
        self.tools = tools
        self.classes = classes
        self.catalogue_version = catalogue.version
        self.override_version = override_version
        self.version = f"{catalogue.version}+{override_version}"
        self.updated = updated
        self.origin = origin
        self.valid_until = catalogue.valid_until
        everything = [*catalogue.prices.values(), *self.overrides.values()]
        self.fallback = _highest(FALLBACK_FAMILY, everything, updated)
        self._memo: dict[str, Price | None] = {}
        self._provisional: dict[str, Price] = {}

    # -- building ------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None, *, now: datetime | None = None) -> PriceTable:
        """The catalogue with the bundled price file on top, or the file at `path`."""
        if path is None:
            text = resources.files("extproc").joinpath("data", "prices.toml").read_text("utf-8")
            return cls.from_toml(text, origin="prices.toml", now=now)
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise PriceFileError([f"{path}: cannot read: {exc.strerror}"]) from None
        except UnicodeDecodeError:
            raise PriceFileError([f"{path}: not UTF-8 text"]) from None
        return cls.from_toml(text, origin=str(path), now=now)

    @classmethod
    def from_toml(
        cls, text: str, *, origin: str = "prices.toml", now: datetime | None = None
    ) -> PriceTable:
        return cls.build(parse_price_file(text, origin), now=now)

    @classmethod
    def build(cls, spec: PriceFile, *, now: datetime | None = None) -> PriceTable:
        tools = spec.tools
        catalogue = _catalogue(now, (tools.web_search, tools.file_search))
        problems: list[str] = []
        rows: dict[str, Price] = {}
        for name, row in spec.rows.items():
            try:
                rows[name] = _override(row, catalogue, tools, rows)
            except ValueError as exc:
                problems.append(f"{spec.origin}: models.{name!r}: {exc}".replace("'", '"'))
        if problems:
            raise PriceFileError(problems)
        fees = ToolFees(
            web_search=tools.web_search,
            file_search=tools.file_search,
            code_interpreter=tools.code_interpreter,
            web_search_preview=tools.web_search_preview,
            preview_patterns=tuple(re.compile(p) for p, _n in tools.web_search_preview),
            image_model=tools.image_model,
            images={m: ImageTable(t) for m, t in tools.image_tokens.items()},
            source=tools.source,
            as_of=tools.as_of,
        )
        listed = {**catalogue.prices, **rows}
        classes = []
        earlier: list[re.Pattern[str]] = []
        for c in spec.classes:
            # A class's members are the rows it finds that no earlier class claimed: the
            # "gpt-5" class is the gpt-5 models that are not pro, mini, codex... ones.
            pattern = re.compile(c.match)
            members = [
                p
                for name, p in listed.items()
                if pattern.search(name) and not any(e.search(name) for e in earlier)
            ]
            earlier.append(pattern)
            if members:
                price = _highest(f"{PROVISIONAL}:{c.name}", members, spec.updated)
                classes.append((c, price))
        return cls(
            catalogue,
            rows,
            fees,
            tuple(classes),
            override_version=spec.version,
            updated=spec.updated,
            origin=spec.origin,
        )

    # -- looking up ------------------------------------------------------------------------

    def families(self) -> tuple[str, ...]:
        """The model names the table prices exactly by their own name (for /v1/models)."""
        exact = self.catalogue.matcher.exact
        rows = self.catalogue.matcher.rows
        named = {n for n, i in exact.items() if rows[i] == n and n in self.catalogue.prices}
        return tuple(sorted(named | self.overrides.keys()))

    def row(self, model: str) -> Price | None:
        """The row that prices `model` exactly, or None (remembered per name)."""
        try:
            return self._memo[model]
        except KeyError:
            pass
        if len(self._memo) >= _FAMILY_MEMO:
            self._memo.clear()
        found = self._memo[model] = self._find(model)
        return found

    def _find(self, model: str) -> Price | None:
        names = _names(model)
        for name in names:
            if name in self.overrides:
                return self.overrides[name]
        for name in names:
            price = self.catalogue.find(name)
            if price is not None:
                return price
        return None

    def family_of(self, model: str) -> str | None:
        price = self.row(model)
        return None if price is None else price.family

    def provisional(self, model: str) -> Price:
        """The rate an unknown model is provisionally billed at: its class's highest."""
        name = model_base_name(model)
        price = self._provisional.get(name)
        if price is None:
            price = next((p for c, p in self.classes if re.search(c.match, name)), self.fallback)
            if len(self._provisional) >= _FAMILY_MEMO:
                self._provisional.clear()
            self._provisional[name] = price
        return price

    def price_for(self, model: str) -> tuple[Price, bool]:
        """(row, True) for a priced model; (its provisional rate, False) otherwise."""
        price = self.row(model)
        if price is None:
            return self.provisional(model), False
        return price, True

    # -- pricing ---------------------------------------------------------------------------

    def _image_price(self, model: str) -> Price | None:
        return self.price_for(model)[0]

    def charge(self, model: str, usage: Usage, request: ToolRequest = NO_TOOL_REQUEST) -> Charge:
        """Every part of one call at its rates; the cost is their exact sum (rounded up)."""
        price, known = self.price_for(model)
        card, tier = price.card(usage.service_tier)
        rates, threshold = card.at(usage.input_tokens)
        parts = r.token_parts(rates, usage)
        if usage.tools:
            parts += r.tool_parts(price, self.tools, usage.tools, request, self._image_price)
        return Charge(
            nanos=r.total_nanos(parts),
            family=price.family,
            fallback=not known,
            parts=tuple(parts),
            tier=tier,
            threshold=threshold,
            origin=price.origin,
        )

    def reserve_nanos(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        *,
        service_tier: str | None = None,
        tools: ToolRequest = NO_TOOL_REQUEST,
        tool_calls: Mapping[str, int] | None = None,
    ) -> int:
        """The most a request can cost: its input and output caps at the dearest rates it
        may be billed at, plus its built-in tool calls (`max_tool_calls` of the dearest, else
        `tool_calls` of each: the policy's default per tool).

        A request asking for priority is held at priority rates; flex and "auto" at the
        standard ones (a flex request the provider cannot serve at flex is refused, never
        upgraded). Input is held at the dearest input kind (a cache write costs more than a
        plain read on newer models), output at the dearest output kind.
        """
        price = self.price_for(model)[0]
        per_input, per_output = self.hold_rates(model, input_tokens, service_tier=service_tier)
        femtos = input_tokens * per_input + output_tokens * per_output
        if tools.kinds:
            fees = [
                r.tool_call_fee(k, price, self.tools, tools, self._image_price) for k in tools.kinds
            ]
            if tools.max_tool_calls is not None:
                femtos += tools.max_tool_calls * max(fees)
            else:
                counts = tool_calls or {}
                femtos += sum(
                    counts.get(k, 1) * fee for k, fee in zip(tools.kinds, fees, strict=True)
                )
        return -(-femtos // MILLION)

    def hold_rates(
        self, model: str, input_tokens: int, *, service_tier: str | None = None
    ) -> tuple[int, int]:
        """(input, output) rates a hold prices tokens at, nano-dollars per million tokens:
        the dearest input kind and the dearest output kind of the card the request may be
        billed on (see `reserve_nanos`), at the long-context tier its input may reach."""
        price = self.price_for(model)[0]
        asked = service_tier or ""
        card = price.cards[DEFAULT_TIER]
        if asked not in r.STANDARD_TIERS and asked not in ("flex", "batch"):
            card = price.card(asked)[0]
        rates, _threshold = card.at(input_tokens + input_tokens // LONG_CONTEXT_MARGIN)
        return (
            max(rates.input, rates.cache_write, rates.input_audio),
            max(rates.output, rates.output_audio),
        )

    def miss_nanos_per_token(self, model: str) -> int:
        """What a prompt-cache miss costs per token, roughly (hygiene counters only)."""
        per_input, per_cached, _out = self.price_for(model)[0].per_token
        return per_input - per_cached

    def still_valid(self, now: datetime | None = None) -> bool:
        """False once a catalogue price compiled for later has come into force."""
        until = self.valid_until
        return until is None or (now or datetime.now(UTC)) < until


@cache
def _catalogue_at(day: date, fees: tuple[int, int]) -> Catalogue:
    return compile_catalogue(datetime(day.year, day.month, day.day, tzinfo=UTC), default_fees=fees)


def _catalogue(now: datetime | None, fees: tuple[int, int]) -> Catalogue:
    """The catalogue compiled as of today (UTC); the same day's compile is shared."""
    if now is not None:
        return compile_catalogue(now, default_fees=fees)
    return _catalogue_at(datetime.now(UTC).date(), fees)


def _apply(rates: Rates, spec: Mapping[str, int]) -> Rates:
    return replace(rates, **spec) if spec else rates


def _card_from(spec: RateSpec, start: Card | None) -> Card:
    if start is None:
        rates = spec.rates
        if "input" not in rates or "output" not in rates:
            raise ValueError("input and output are required for a model the catalogue lacks")
        base = Rates.of(
            rates["input"],
            rates.get("cached_input"),
            rates["output"],
            **{k: v for k, v in rates.items() if k not in ("input", "cached_input", "output")},
        )
        start = Card(base)
    else:
        start = Card(_apply(start.base, spec.rates), start.above)
    if spec.long_context is not None:
        above, more = spec.long_context
        start = Card(start.base, ((above, _apply(start.base, more)),))
    return start


def _override(
    row: RowSpec, catalogue: Catalogue, tools: object, done: Mapping[str, Price]
) -> Price:
    start: Price | None = None
    if row.like is not None:
        start = done.get(row.like) or catalogue.prices.get(row.like) or catalogue.find(row.like)
        if start is None:
            raise ValueError(f"like: {row.like!r} is priced by neither the file nor the catalogue")
    else:
        start = catalogue.find(row.name)  # a correction of the catalogue's own row
    default = _card_from(row.default, start.cards[DEFAULT_TIER] if start else None)
    cards: dict[str, Card] = dict(start.cards) if start else {}
    cards[DEFAULT_TIER] = default
    for tier, spec in row.tiers.items():
        cards[tier] = _card_from(spec, cards.get(tier, default))
    return Price(
        family=row.name,
        cards=cards,
        web_search=row.web_search if row.web_search is not None else (
            start.web_search if start else getattr(tools, "web_search", 0)),
        file_search=row.file_search if row.file_search is not None else (
            start.file_search if start else getattr(tools, "file_search", 0)),
        source=row.source,
        as_of=row.as_of,
        origin="override",
        note=row.note,
    )  # fmt: skip


def _highest(family: str, members: list[Price], as_of: date) -> Price:
    """Field by field and tier by tier, the highest rates any member lists (flagged use)."""
    tiers = {t for p in members for t in p.cards}
    cards = {}
    for tier in tiers:
        best: Rates | None = None
        for p in members:
            card = p.cards.get(tier, p.cards[DEFAULT_TIER]).highest()
            best = card if best is None else best.highest(card)
        assert best is not None
        cards[tier] = Card(best)
    return Price(
        family=family,
        cards=cards,
        web_search=max(p.web_search for p in members),
        file_search=max(p.file_search for p in members),
        source="",
        as_of=as_of,
        origin=PROVISIONAL,
        note=f"highest rates of {len(members)} listed models",
    )


@cache
def default_table() -> PriceTable:
    """The bundled table, compiled once per process."""
    return PriceTable.load()
