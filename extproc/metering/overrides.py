"""The project's own price file, on top of the catalogue: reading and validating it.

The catalogue (`catalogue`) lags the newest models by weeks and knows nothing of a
negotiated discount, so a TOML file of our own sits on top of it (`extproc/data/prices.toml`
by default, `EXTPROC_PRICES` to use another). Each row is a model: either a new one (its
rates in full) or one the catalogue has, whose listed fields replace the catalogue's
(`like = "<model>"` starts from another row instead). Every row names its `source` (an
https URL) and `as_of` date. The file also holds the built-in tool fees that are not per
model and the classes unknown models are provisionally priced by (see `prices`).

Rates are decimal strings in dollars, per 1M tokens for tokens and per 1,000 calls for
searches, so they parse exactly; one that is not a whole number of nano-dollars per
1M tokens (or per call) is refused. Every problem names the row and field; all of them are
reported at once, so one edit fixes the file.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from extproc.metering.rates import NANOS_PER_DOLLAR, TOKEN_FIELDS

_TOP = frozenset({"version", "updated", "models", "tools", "provisional"})
_ROW = frozenset(
    {*TOKEN_FIELDS, "like", "web_search_per_1k", "file_search_per_1k", "long_context", "tiers",
     "source", "as_of", "note"}
)  # fmt: skip
_RATES = frozenset(TOKEN_FIELDS)
_LONG = frozenset({*TOKEN_FIELDS, "above"})
_TIER_FIELDS = frozenset({*TOKEN_FIELDS, "long_context"})
_TOOLS = frozenset(
    {"web_search_per_1k", "file_search_per_1k", "code_interpreter_per_container", "image_model",
     "web_search_preview", "image_tokens", "source", "as_of"}
)  # fmt: skip
_CLASS = frozenset({"class", "match", "note"})
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")
_MODEL = re.compile(r"[a-z0-9][a-z0-9._:/-]{0,127}")
TIER_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class PriceFileError(ValueError):
    """The price file is unusable; one problem per line, each naming the row and field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(problems))


@dataclass(frozen=True, slots=True)
class RateSpec:
    """Rates a row sets (nanos per 1M tokens); a field not set keeps what it starts from."""

    rates: dict[str, int] = field(default_factory=dict)
    long_context: tuple[int, dict[str, int]] | None = None  # (above, rates)


@dataclass(frozen=True, slots=True)
class RowSpec:
    name: str
    like: str | None
    default: RateSpec
    tiers: dict[str, RateSpec]
    web_search: int | None  # nanos per call
    file_search: int | None
    source: str
    as_of: date
    note: str


@dataclass(frozen=True, slots=True)
class ToolSpec:
    web_search: int = 0  # nanos per call
    file_search: int = 0
    code_interpreter: int = 0  # nanos per container
    image_model: str = "gpt-image-1"
    web_search_preview: tuple[tuple[str, int], ...] = ()
    image_tokens: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    source: str = ""
    as_of: date | None = None


@dataclass(frozen=True, slots=True)
class ClassSpec:
    name: str
    match: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class PriceFile:
    version: str
    updated: date
    rows: dict[str, RowSpec]
    tools: ToolSpec
    classes: tuple[ClassSpec, ...]
    origin: str


def _shown(value: object) -> str:
    if value is None:
        return "nothing"
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)
    return f"{text} ({type(value).__name__})"


class _Reader:
    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.problems: list[str] = []

    def error(self, where: str, message: str) -> None:
        self.problems.append(f"{self.origin}: {where}: {message}")

    def table(self, where: str, value: Any, allowed: frozenset[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.error(where, f"must be a table, got {_shown(value)}")
            return {}
        for key in value:
            if key not in allowed:
                self.error(f"{where}.{key}", f"unknown field (known: {', '.join(sorted(allowed))})")
        return value

    def decimal(self, where: str, value: Any) -> Decimal | None:
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            return Decimal(value.strip())
        if isinstance(value, str) and value.strip().startswith("-"):
            self.error(where, f"must not be negative, got {_shown(value)}")
        else:
            self.error(where, f'must be a decimal string like "1.25", got {_shown(value)}')
        return None

    def per_million(self, where: str, value: Any) -> int | None:
        usd = self.decimal(where, value)
        if usd is None:
            return None
        nanos = usd * NANOS_PER_DOLLAR
        if nanos != nanos.to_integral_value():
            self.error(where, f"{value} per 1M tokens is not a whole number of nano-dollars")
            return None
        return int(nanos)

    def per_call(self, where: str, value: Any, per: int) -> int | None:
        usd = self.decimal(where, value)
        if usd is None:
            return None
        nanos = usd * NANOS_PER_DOLLAR / per
        if nanos != nanos.to_integral_value():
            self.error(where, f"{value} is not a whole number of nano-dollars per call")
            return None
        return int(nanos)

    def day(self, where: str, value: Any) -> date | None:
        if isinstance(value, datetime) or not isinstance(value, date):
            self.error(where, f"must be a date like 2026-12-07, got {_shown(value)}")
            return None
        return value

    def url(self, where: str, value: Any) -> str:
        if not isinstance(value, str) or not value.startswith("https://"):
            self.error(where, f"must be an https:// URL, got {_shown(value)}")
            return ""
        return value

    def text(self, where: str, value: Any) -> str:
        if not isinstance(value, str):
            self.error(where, f"must be a string, got {_shown(value)}")
            return ""
        return value

    def rates(self, where: str, raw: dict[str, Any]) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in TOKEN_FIELDS:
            if name in raw:
                nanos = self.per_million(f"{where}.{name}", raw[name])
                if nanos is not None:
                    out[name] = nanos
        return out

    def rate_spec(self, where: str, raw: dict[str, Any]) -> RateSpec:
        rates = self.rates(where, raw)
        if "cached_input" in rates and "input" in rates and rates["cached_input"] > rates["input"]:
            self.error(f"{where}.cached_input", "must not exceed input")
        long_context = None
        if "long_context" in raw:
            lwhere = f"{where}.long_context"
            lraw = self.table(lwhere, raw["long_context"], _LONG)
            above = lraw.get("above")
            if type(above) is not int or above <= 0:
                self.error(
                    f"{lwhere}.above", f"must be a positive token count, got {_shown(above)}"
                )
            else:
                long_context = (above, self.rates(lwhere, lraw))
        return RateSpec(rates, long_context)


def _row(rd: _Reader, name: str, value: Any) -> RowSpec | None:
    where = f"models.{json.dumps(name)}"
    if not _MODEL.fullmatch(name):
        rd.error(where, "row names must be lower-case model ids")
    raw = rd.table(where, value, _ROW)
    like = None
    if "like" in raw:
        like = rd.text(f"{where}.like", raw["like"]).lower() or None
    default = rd.rate_spec(where, raw)
    tiers: dict[str, RateSpec] = {}
    for tier, body in rd.table(f"{where}.tiers", raw.get("tiers", {}), _ANY).items():
        twhere = f"{where}.tiers.{tier}"
        if not TIER_NAME.fullmatch(tier):
            rd.error(twhere, "tier names are lower-case words like flex, priority, batch")
        tiers[tier] = rd.rate_spec(twhere, rd.table(twhere, body, _TIER_FIELDS))
    searches = {
        key: rd.per_call(f"{where}.{key}", raw[key], 1000) if key in raw else None
        for key in ("web_search_per_1k", "file_search_per_1k")
    }
    source = rd.url(f"{where}.source", raw.get("source"))
    as_of = rd.day(f"{where}.as_of", raw.get("as_of"))
    note = rd.text(f"{where}.note", raw["note"]) if "note" in raw else ""
    if as_of is None:
        return None
    return RowSpec(
        name, like, default, tiers, searches["web_search_per_1k"], searches["file_search_per_1k"],
        source, as_of, note,
    )  # fmt: skip


class _Any(frozenset[str]):
    """Admits every key: tier, model and size names are free (each is checked on its own)."""

    def __contains__(self, item: object) -> bool:
        return True


_ANY = _Any()


def _tools(rd: _Reader, value: Any) -> ToolSpec:
    raw = rd.table("tools", value, _TOOLS)
    calls = {
        "web_search_per_1k": 1000,
        "file_search_per_1k": 1000,
        "code_interpreter_per_container": 1,
    }
    fees = {
        k: rd.per_call(f"tools.{k}", raw[k], per) if k in raw else 0 for k, per in calls.items()
    }
    previews: list[tuple[str, int]] = []
    listed = raw.get("web_search_preview", [])
    if not isinstance(listed, list):
        rd.error("tools.web_search_preview", "must be a list of {models, per_1k} tables")
        listed = []
    for i, body in enumerate(listed):
        where = f"tools.web_search_preview[{i}]"
        item = rd.table(where, body, frozenset({"models", "per_1k"}))
        pattern = rd.text(f"{where}.models", item.get("models"))
        try:
            re.compile(pattern)
        except re.error as exc:
            rd.error(f"{where}.models", f"not a regular expression: {exc}")
        nanos = rd.per_call(f"{where}.per_1k", item.get("per_1k"), 1000)
        if nanos is not None:
            previews.append((pattern, nanos))
    images: dict[str, dict[str, dict[str, int]]] = {}
    for model, sizes in rd.table("tools.image_tokens", raw.get("image_tokens", {}), _ANY).items():
        mwhere = f"tools.image_tokens.{json.dumps(model)}"
        for size, qualities in rd.table(mwhere, sizes, _ANY).items():
            swhere = f"{mwhere}.{json.dumps(size)}"
            for quality, tokens in rd.table(swhere, qualities, _ANY).items():
                if type(tokens) is not int or tokens <= 0:
                    rd.error(f"{swhere}.{quality}", f"must be a token count, got {_shown(tokens)}")
                    continue
                images.setdefault(model, {}).setdefault(size, {})[quality] = tokens
    return ToolSpec(
        web_search=fees["web_search_per_1k"] or 0,
        file_search=fees["file_search_per_1k"] or 0,
        code_interpreter=fees["code_interpreter_per_container"] or 0,
        image_model=rd.text("tools.image_model", raw.get("image_model", "gpt-image-1")),
        web_search_preview=tuple(previews),
        image_tokens=images,
        source=rd.url("tools.source", raw.get("source")) if raw else "",
        as_of=rd.day("tools.as_of", raw.get("as_of")) if raw else None,
    )


def _classes(rd: _Reader, value: Any) -> tuple[ClassSpec, ...]:
    if not isinstance(value, list):
        rd.error("provisional", "must be a list of [[provisional]] tables")
        return ()
    out = []
    for i, body in enumerate(value):
        where = f"provisional[{i}]"
        raw = rd.table(where, body, _CLASS)
        name = rd.text(f"{where}.class", raw.get("class"))
        pattern = rd.text(f"{where}.match", raw.get("match"))
        try:
            re.compile(pattern)
        except re.error as exc:
            rd.error(f"{where}.match", f"not a regular expression: {exc}")
        out.append(ClassSpec(name, pattern, raw.get("note", "") if raw else ""))
    return tuple(out)


def parse_price_file(text: str, origin: str = "prices.toml") -> PriceFile:
    """Read and validate a price file; PriceFileError lists every problem found."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PriceFileError([f"{origin}: not valid TOML: {exc}"]) from None
    rd = _Reader(origin)
    for key in doc:
        if key not in _TOP:
            rd.error(key, f"unknown top-level key (known: {', '.join(sorted(_TOP))})")
    version = doc.get("version")
    if not isinstance(version, str) or not version.strip():
        rd.error("version", f"must be a non-empty string, got {_shown(version)}")
        version = ""
    updated = rd.day("updated", doc.get("updated"))
    rows: dict[str, RowSpec] = {}
    for name, body in rd.table("models", doc.get("models", {}), _ANY).items():
        row = _row(rd, name, body)
        if row is not None:
            rows[name] = row
    tools = _tools(rd, doc["tools"]) if "tools" in doc else ToolSpec()
    classes = _classes(rd, doc["provisional"]) if "provisional" in doc else ()
    if rd.problems or updated is None:
        raise PriceFileError(rd.problems)
    return PriceFile(version.strip(), updated, rows, tools, classes, origin)
