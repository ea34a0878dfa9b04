"""The price table: which model family a call belongs to and what it costs, exactly.

Money is integer nano-dollars end to end. A price of $X per 1M tokens is X * 1000 nanos
per token, so every price in the table must have at most 3 decimal places; the loader
rejects anything else rather than round. The table is data (`data/prices.toml`) with a
version stamped on every usage record, so a price change is a reviewed file edit and
old records stay explainable.

Model names map to a row only by exact name once a dated snapshot or "-latest" suffix is
dropped. Longest-prefix matching would price `gpt-5-pro` or `gpt-4o-realtime-preview` as
their much cheaper base models; an unknown name instead gets the fallback rate (by
default the highest listed rate) and is flagged on the record.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from extproc.wire.usage import Usage

NANOS_PER_DOLLAR = 1_000_000_000
NANOS_PER_TOKEN_PER_USD_PER_MILLION = NANOS_PER_DOLLAR // 1_000_000
FALLBACK_FAMILY = "fallback"


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


CENT_NANOS = NANOS_PER_DOLLAR // 100


def usd_for_people(nanos: int) -> str:
    """Money as people read it, the one rule for every screen, report and alert text:
    "$1,234.57" to the cent, and an amount under a cent exactly ("$0.001087"), so spend
    that is not zero never reads "$0.00". Machine output (JSON, headers, exports) keeps
    `usd`'s exact figures."""
    if nanos and abs(nanos) < CENT_NANOS:
        return usd(nanos, sign=True)
    return usd(nanos, cents=True, sign=True, grouped=True)


_RATE_FIELDS = ("input", "cached_input", "output")
_ROW_FIELDS = frozenset({*_RATE_FIELDS, "source", "as_of", "note"})
_TOP_LEVEL = frozenset({"version", "updated", "models", "fallback"})
_PLAIN_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")
_SNAPSHOT_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4}|latest|chat-latest)$")


class PriceTableError(ValueError):
    """The price file is malformed; the message names the file, row and field."""


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens for one model family."""

    family: str
    input: Decimal
    cached_input: Decimal
    output: Decimal
    source: str
    as_of: date
    # The three rates as integer nano-dollars per token (`nanos_per_token`), converted once:
    # every request is priced several times (its hold, its orphan, its settlement).
    nanos: tuple[int, int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rates = (self.input, self.cached_input, self.output)
        object.__setattr__(self, "nanos", tuple(nanos_per_token(r) for r in rates))


@dataclass(frozen=True, slots=True)
class Charge:
    nanos: int
    family: str
    fallback: bool

    @property
    def usd(self) -> Decimal:
        return Decimal(self.nanos).scaleb(-9)


def nanos_per_token(usd_per_million: Decimal) -> int:
    """Exact nano-dollars per token; the loader guarantees the product is integral."""
    return int(usd_per_million * NANOS_PER_TOKEN_PER_USD_PER_MILLION)


def cost_nanos(price: Price, usage: Usage) -> int:
    """Uncached input, cached input and output, each at its rate.

    Cached tokens are a subset of input tokens and reasoning tokens a subset of output
    tokens, as OpenAI reports them, so reasoning adds nothing here. A cached count above
    the input count is clamped so input is never billed twice.
    """
    total_input = max(usage.input_tokens, 0)
    cached = min(max(usage.cached_input_tokens, 0), total_input)
    output = max(usage.output_tokens, 0)
    per_input, per_cached, per_output = price.nanos
    return (total_input - cached) * per_input + cached * per_cached + output * per_output


def model_base_name(model: str) -> str:
    """Lower-cased model id with a fine-tuning wrapper removed (`ft:gpt-4o-mini:org::id`)."""
    name = model.strip().lower()
    if name.startswith("ft:"):
        name = name[3:].split(":", 1)[0]
    return name


_FAMILY_MEMO = 1024


class PriceTable:
    """Loaded once at start-up; lookups are a few dictionary probes."""

    def __init__(
        self, version: str, updated: date, prices: Mapping[str, Price], fallback: Price
    ) -> None:
        self.version = version
        self.updated = updated
        self._prices = dict(prices)
        self.fallback = fallback
        # model name -> family (None: no row). Names come from clients and upstreams, so
        # the memo is bounded; the table itself never changes once loaded.
        self._families: dict[str, str | None] = {}

    @classmethod
    def load(cls, path: str | Path | None = None, *, fallback: Price | None = None) -> PriceTable:
        """The bundled table by default; `fallback` overrides the file's [fallback] row."""
        if path is None:
            text = resources.files("extproc").joinpath("data", "prices.toml").read_text("utf-8")
            return cls.from_toml(text, origin="prices.toml", fallback=fallback)
        return cls.from_toml(Path(path).read_text("utf-8"), origin=str(path), fallback=fallback)

    @classmethod
    def from_toml(
        cls, text: str, *, origin: str = "prices.toml", fallback: Price | None = None
    ) -> PriceTable:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PriceTableError(f"{origin}: not valid TOML: {exc}") from exc
        return _parse(doc, origin, fallback)

    def families(self) -> tuple[str, ...]:
        return tuple(self._prices)

    def family_of(self, model: str) -> str | None:
        """The row for `model`, trying the exact name, then without snapshot suffixes.

        Every request asks two or three times for the same few names: answers are kept.
        """
        try:
            return self._families[model]
        except KeyError:
            pass
        if len(self._families) >= _FAMILY_MEMO:
            self._families.clear()
        family = self._families[model] = self._family_of(model)
        return family

    def _family_of(self, model: str) -> str | None:
        name = model_base_name(model)
        while True:
            if name in self._prices:
                return name
            shorter = _SNAPSHOT_SUFFIX.sub("", name)
            if shorter == name or not shorter:
                return None
            name = shorter

    def price_for(self, model: str) -> tuple[Price, bool]:
        family = self.family_of(model)
        if family is None:
            return self.fallback, False
        return self._prices[family], True

    def charge(self, model: str, usage: Usage) -> Charge:
        price, known = self.price_for(model)
        return Charge(nanos=cost_nanos(price, usage), family=price.family, fallback=not known)


@cache
def default_table() -> PriceTable:
    """The bundled table, parsed once per process."""
    return PriceTable.load()


# --- parsing --------------------------------------------------------------------------


def _parse(doc: dict[str, Any], origin: str, fallback: Price | None) -> PriceTable:
    for key in doc:
        if key not in _TOP_LEVEL:
            raise PriceTableError(f"{origin}: unknown top-level key {_quote(key)}")
    version = doc.get("version")
    if not isinstance(version, str) or not version.strip():
        raise PriceTableError(
            f"{origin}: version: must be a non-empty string, got {_describe(version)}"
        )
    updated = _date(doc.get("updated"), f"{origin}: updated")

    models = doc.get("models")
    if not isinstance(models, dict) or not models:
        raise PriceTableError(f"{origin}: models: must be a non-empty table of model families")
    prices: dict[str, Price] = {}
    for family, row in models.items():
        where = f"{origin}: models.{_quote(family)}"
        if family != model_base_name(family) or not family:
            raise PriceTableError(f"{where}: family names must be lower-case model ids")
        prices[family] = _price(family, row, where, default_as_of=None)

    if fallback is None:
        fallback = (
            _price(FALLBACK_FAMILY, doc["fallback"], f"{origin}: fallback", default_as_of=updated)
            if "fallback" in doc
            else _highest_rates(list(prices.values()), updated)
        )
    return PriceTable(version.strip(), updated, prices, fallback)


def _price(family: str, row: object, where: str, *, default_as_of: date | None) -> Price:
    if not isinstance(row, dict):
        raise PriceTableError(f"{where}: must be a table, got {_describe(row)}")
    for key in row:
        if key not in _ROW_FIELDS:
            raise PriceTableError(f"{where}.{key}: unknown field")
    for key in _RATE_FIELDS:
        if key not in row:
            raise PriceTableError(f"{where}.{key}: missing")
    rates = {key: _rate(row[key], f"{where}.{key}") for key in _RATE_FIELDS}
    if rates["cached_input"] > rates["input"]:
        raise PriceTableError(
            f"{where}.cached_input: must not exceed input "
            f"({rates['cached_input']} > {rates['input']})"
        )

    lenient = default_as_of is not None
    source = row.get("source", "" if lenient else None)
    if not isinstance(source, str) or not (source.startswith("https://") or lenient):
        raise PriceTableError(f"{where}.source: must be an https:// URL, got {_describe(source)}")
    if "note" in row and not isinstance(row["note"], str):
        raise PriceTableError(f"{where}.note: must be a string, got {_describe(row['note'])}")
    as_of = _date(row.get("as_of", default_as_of), f"{where}.as_of")
    return Price(family=family, source=source, as_of=as_of, **rates)


def _rate(value: object, where: str) -> Decimal:
    if not isinstance(value, str) or not _PLAIN_DECIMAL.fullmatch(value.strip()):
        if isinstance(value, str) and value.strip().startswith("-"):
            raise PriceTableError(f"{where}: must not be negative, got {_describe(value)}")
        raise PriceTableError(
            f'{where}: must be a decimal string like "10.00", got {_describe(value)}'
        )
    try:
        rate = Decimal(value.strip())
    except InvalidOperation as exc:  # pragma: no cover - the pattern admits only digits
        raise PriceTableError(f"{where}: not a decimal: {_describe(value)}") from exc
    if rate * NANOS_PER_TOKEN_PER_USD_PER_MILLION != int(
        rate * NANOS_PER_TOKEN_PER_USD_PER_MILLION
    ):
        raise PriceTableError(
            f"{where}: {_describe(value)} has more than 3 decimal places, which is not a whole "
            "number of nano-dollars per token"
        )
    return rate


def _date(value: object, where: str) -> date:
    if isinstance(value, datetime) or not isinstance(value, date):
        raise PriceTableError(f"{where}: must be a date like 2025-08-07, got {_describe(value)}")
    return value


def _highest_rates(rows: Collection[Price], as_of: date) -> Price:
    return Price(
        family=FALLBACK_FAMILY,
        input=max(p.input for p in rows),
        cached_input=max(p.cached_input for p in rows),
        output=max(p.output for p in rows),
        source="",
        as_of=as_of,
    )


def _quote(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)


def _describe(value: object) -> str:
    if value is None:
        return "nothing"
    shown = _quote(value) if isinstance(value, str) else str(value)
    return f"{shown} ({type(value).__name__})"
