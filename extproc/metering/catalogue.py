"""The maintained price catalogue (pydantic's `genai-prices`), compiled into our rate cards.

`genai-prices` is a versioned package with every OpenAI model's standard, flex, priority and
batch rates, long-context tiers, cache reads and writes, audio and image tokens and per-call
search fees, as exact decimals. It is read once at start (and on reload): its OpenAI rows
become `Price` values of integer nano-dollars per million tokens, and its model-matching
rules become a `Matcher`; the request path never calls the package. Prices in force today
are compiled; a row with a price that starts later remembers when, so the table is
recompiled then (`Catalogue.valid_until`).

A catalogue row that prices units a metered call never reports (audio hours, characters)
is left out and listed in `skipped`, so `extproc prices` can say why a model is absent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from extproc.metering.rates import DEFAULT_TIER, MILLION, NANOS_PER_DOLLAR, Card, Price, Rates

PROVIDER = "openai"
SOURCE = "genai-prices"
# Price keys we bill by, and the Rates field each becomes.
_TOKEN_KEYS = {
    "input_mtok": "input",
    "cache_read_mtok": "cached_input",
    "cache_write_mtok": "cache_write",
    "output_mtok": "output",
    "input_audio_mtok": "input_audio",
    "output_audio_mtok": "output_audio",
    "output_image_mtok": "output_image",
}
_CALL_KEYS = {"web_searches_kcount": "web_search", "storage_searches_kcount": "file_search"}
# Keys priced for kinds a metered call never carries: harmless beside the ones we bill.
_IGNORED_KEYS = frozenset(
    {"input_image_mtok", "cache_image_read_mtok", "cache_audio_read_mtok", "cache_text_read_mtok"}
)
# Variants compiled per model, as (our tier name, genai-prices price context).
_SERVICE_TIERS = ("flex", "priority", "fast", "ultrafast", "scale")


class CatalogueError(ValueError):
    """A catalogue row cannot be represented exactly; the message names the row and key."""


def nanos_per_million(usd_per_million: Decimal, where: str) -> int:
    """$/1M tokens as integer nano-dollars per 1M tokens; exact or an error naming `where`."""
    value = usd_per_million * NANOS_PER_DOLLAR
    if value != value.to_integral_value() or value < 0:
        raise CatalogueError(f"{where}: {usd_per_million} is not a whole number of nano-dollars")
    return int(value)


def nanos_per_call(usd_per_thousand: Decimal, where: str) -> int:
    value = usd_per_thousand * NANOS_PER_DOLLAR / 1000
    if value != value.to_integral_value() or value < 0:
        raise CatalogueError(f"{where}: {usd_per_thousand} per 1k calls is not whole nano-dollars")
    return int(value)


# -- matching model names the way the catalogue defines it ------------------------------------


@dataclass(frozen=True, slots=True)
class Matcher:
    """Model name -> catalogue row, with the catalogue's own rules, compiled to plain data.

    The catalogue tries its rows in order and takes the first whose rule matches. Most rules
    are lists of exact names (a dictionary here); the others (prefixes, regular expressions)
    are kept as predicates and tried only up to the first exact hit's position.
    """

    exact: dict[str, int]  # name -> row position
    rules: tuple[tuple[int, Any], ...]  # (row position, predicate), ascending
    rows: tuple[str, ...]

    def find(self, name: str) -> str | None:
        hit = self.exact.get(name)
        for position, predicate in self.rules:
            if hit is not None and position >= hit:
                break
            if predicate(name):
                return self.rows[position]
        return None if hit is None else self.rows[hit]


def _predicate(clause: Any) -> tuple[list[str], Any | None]:
    """(exact names, predicate for the rest) of one genai-prices match clause."""
    kind = type(clause).__name__
    if kind == "ClauseEquals":
        return [clause.equals.lower()], None
    if kind == "ClauseOr":
        names: list[str] = []
        others = []
        for sub in clause.or_:
            sub_names, sub_pred = _predicate(sub)
            names += sub_names
            if sub_pred is not None:
                others.append(sub_pred)
        if not others:
            return names, None
        return names, lambda text: any(p(text) for p in others)
    if kind == "ClauseStartsWith":
        prefix = clause.starts_with.lower()
        return [], lambda text: text.startswith(prefix)
    if kind == "ClauseEndsWith":
        suffix = clause.ends_with.lower()
        return [], lambda text: text.endswith(suffix)
    if kind == "ClauseContains":
        part = clause.contains.lower()
        return [], lambda text: part in text
    if kind == "ClauseRegex":
        regex = re.compile(clause.regex)
        return [], lambda text: regex.search(text) is not None
    if kind == "ClauseAnd":
        subs = [_predicate(sub) for sub in clause.and_]

        def all_of(text: str) -> bool:
            return all((text in names) or (pred is not None and pred(text)) for names, pred in subs)

        return [], all_of
    raise CatalogueError(f"unknown match clause {kind}")


def build_matcher(models: Iterable[Any], rows: Iterable[str]) -> Matcher:
    names = tuple(rows)
    exact: dict[str, int] = {}
    rules: list[tuple[int, Any]] = []
    for position, model in enumerate(models):
        listed, predicate = _predicate(model.match)
        for name in listed:
            exact.setdefault(name, position)
        if predicate is not None:
            rules.append((position, predicate))
    return Matcher(exact, tuple(rules), names)


# -- compiling prices -----------------------------------------------------------------------


def _tiered(value: Any) -> tuple[Decimal, tuple[tuple[int, Decimal], ...]]:
    if type(value).__name__ == "TieredPrices":
        return value.base, tuple((t.start, t.price) for t in value.tiers)
    return value, ()


def _card(model_price: Any, where: str) -> tuple[Card, dict[str, int]]:
    """One resolved genai-prices ModelPrice as a Card, plus its per-call fees."""
    values = {k: v for k, v in vars(model_price).items() if v is not None and not k.startswith("_")}
    unknown = set(values) - _TOKEN_KEYS.keys() - _CALL_KEYS.keys() - _IGNORED_KEYS
    if unknown:
        raise CatalogueError(
            f"{where}: prices units a metered call never reports: {sorted(unknown)}"
        )
    if "input_mtok" not in values and "output_mtok" not in values:
        raise CatalogueError(f"{where}: no token prices")
    thresholds: set[int] = set()
    for key in _TOKEN_KEYS:
        if key in values:
            thresholds.update(start for start, _ in _tiered(values[key])[1])

    def rates_above(threshold: int | None) -> Rates:
        fields: dict[str, int | None] = {}
        for key, name in _TOKEN_KEYS.items():
            if key not in values:
                continue
            base, tiers = _tiered(values[key])
            price = base
            for start, tier_price in tiers:
                if threshold is not None and threshold >= start:
                    price = tier_price
            fields[name] = nanos_per_million(price, f"{where}.{key}")
        return Rates.of(
            fields.pop("input", 0) or 0,
            fields.pop("cached_input", None),
            fields.pop("output", 0) or 0,
            **fields,
        )

    card = Card(rates_above(None), tuple((t, rates_above(t)) for t in sorted(thresholds)))
    fees = {
        name: nanos_per_call(values[key], f"{where}.{key}")
        for key, name in _CALL_KEYS.items()
        if key in values
    }
    return card, fees


@dataclass(frozen=True, slots=True)
class Catalogue:
    version: str  # e.g. "genai-prices 0.2.5"
    prices: dict[str, Price]
    matcher: Matcher
    skipped: dict[str, str] = field(default_factory=dict)  # row -> why it is left out
    valid_until: datetime | None = None  # a catalogue price changes then: recompile

    def find(self, name: str) -> Price | None:
        row = self.matcher.find(name)
        return None if row is None else self.prices.get(row)


def _next_change(model: Any, now: datetime) -> date | None:
    """The next day one of the row's prices changes (a price that starts later), if any."""
    if not isinstance(model.prices, list):
        return None
    starts = [getattr(c.constraint, "start_date", None) for c in model.prices]
    return min((d for d in starts if d is not None and d > now.date()), default=None)


def compile_catalogue(
    now: datetime | None = None, *, default_fees: tuple[int, int] = (0, 0)
) -> Catalogue:
    """The bundled genai-prices data for OpenAI, as of `now` (UTC), compiled once.

    `default_fees`: nanos per web search and file search call for rows that list none.
    """
    import genai_prices
    from genai_prices import data_snapshot

    now = now or datetime.now(UTC)
    provider = next(p for p in data_snapshot.get_snapshot().providers if p.id == PROVIDER)
    as_of = now.date()
    prices: dict[str, Price] = {}
    skipped: dict[str, str] = {}
    changes: list[date] = []
    for model in provider.models:
        row = model.id.lower()
        where = f"genai-prices {PROVIDER}.{model.id}"
        try:
            standard = model.get_prices(now)
            card, fees = _card(standard, where)
            cards = {DEFAULT_TIER: card}
            for tier in _SERVICE_TIERS:
                variant = model.get_prices(now, {"service_tier": tier})
                if variant != standard:
                    cards[tier] = _card(variant, f"{where}[{tier}]")[0]
            batch = model.get_prices(now, {"processing": "batch"})
            if batch != standard:
                cards["batch"] = _card(batch, f"{where}[batch]")[0]
        except CatalogueError as exc:
            skipped[row] = str(exc).removeprefix(f"{where}: ")
            continue
        next_change = _next_change(model, now)
        if next_change is not None:
            changes.append(next_change)
        prices[row] = Price(
            family=row,
            cards=cards,
            web_search=fees.get("web_search", default_fees[0]),
            file_search=fees.get("file_search", default_fees[1]),
            source=(provider.pricing_urls or [""])[0],
            as_of=as_of,
            origin=SOURCE,
            note=model.price_comments or "",
        )
    matcher = build_matcher(provider.models, (m.id.lower() for m in provider.models))
    until = min(changes, default=None)
    return Catalogue(
        version=f"{SOURCE} {genai_prices.__version__}",
        prices=prices,
        matcher=matcher,
        skipped=skipped,
        valid_until=datetime(until.year, until.month, until.day, tzinfo=UTC) if until else None,
    )


def row_for(prices: dict[str, Price], name: str) -> Price | None:
    """A compiled row by its exact catalogue id (overrides that say `like = ...`)."""
    return prices.get(name.lower())


__all__ = [
    "MILLION",
    "SOURCE",
    "Catalogue",
    "CatalogueError",
    "Matcher",
    "compile_catalogue",
    "nanos_per_call",
    "nanos_per_million",
    "row_for",
]
