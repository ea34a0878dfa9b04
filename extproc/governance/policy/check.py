"""The validator's toolkit: exact-decimal YAML and a checker that collects every problem.

A policy error must name the exact field path, and all problems are reported at once so
one edit fixes the file; `Checker` methods record a problem and return None instead of
raising.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Collection, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from extproc.governance.policy.model import (
    _FRACTION_HINT,
    _MODEL_NAME,
    _MONEY_HINT,
    _PLAIN_DECIMAL,
    _RATE_FIELDS,
    DEFAULT_MODEL,
    MAX_BUDGET_USD,
    MAX_LIMIT_FRACTION,
    NAME_PATTERN,
    model_key,
)
from extproc.metering.prices import NANOS_PER_DOLLAR, PriceTable, default_table


class _Loader(yaml.SafeLoader):
    """Safe YAML that keeps decimals exact (never float) and reports duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                if key_node.value in seen:
                    line = key_node.start_mark.line + 1
                    self.duplicates.append(f"line {line}: duplicate key {_shown(key_node.value)}")
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def _construct_decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    text = str(loader.construct_scalar(node)).replace("_", "")
    try:
        return Decimal(text)
    except InvalidOperation:
        return loader.construct_yaml_float(node)


_Loader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Decimal) and value.is_finite():
        return format(value, "f")
    return str(value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def node_lines(node: yaml.Node | None) -> dict[str, int]:
    """Each field path written in the file -> its 1-based line, with paths spelled the way
    the checker names them (`workspaces.dev.soft_limit`, `alerts.webhooks[0].url`)."""
    lines: dict[str, int] = {}

    def walk(n: yaml.Node, path: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                if isinstance(key, yaml.ScalarNode):
                    child = _join(path, str(key.value))
                    lines.setdefault(child, key.start_mark.line + 1)
                    walk(value, child)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                child = f"{path}[{i}]"
                lines.setdefault(child, item.start_mark.line + 1)
                walk(item, child)

    if node is not None:
        walk(node, "")
    return lines


def with_line(problem: str, lines: Mapping[str, int]) -> str:
    """`path: message (line N)`, N where the path (or its nearest written parent) is."""
    path, sep, _ = problem.partition(": ")
    if not sep:
        return problem
    while path:
        if path in lines:
            return f"{problem} (line {lines[path]})"
        cut = max(path.rfind("."), path.rfind("["))
        if cut <= 0:
            break
        path = path[:cut]
    return problem


def _pct(share: Decimal) -> str:
    return f"{share:%}"


def _did_you_mean(word: str, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


class _Checker:
    """Collects every problem and warning while the raw YAML is turned into dataclasses."""

    def __init__(self, base_dir: Path, prices: PriceTable | None = None) -> None:
        self.base_dir = base_dir
        self.prices = prices or default_table()
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self._unpriced: set[str] = set()

    def error(self, path: str, message: str) -> None:
        text = f"{path}: {message}"
        if text not in self.problems:
            self.problems.append(text)

    def mapping(
        self,
        path: str,
        value: Any,
        known: Collection[str],
        required: Collection[str] = (),
        features: Collection[str] = (),
    ) -> dict[str, Any]:
        """The mapping at `path` with only known string keys; a null counts as empty."""
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.error(path or "policy", f"must be a mapping, got {_shown(value)}")
            return {}
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.error(path or "policy", f"key {_shown(key)} must be a string (quote it)")
            elif key not in known and key not in features:
                hint = _did_you_mean(key, [*known, *features])
                if not hint:
                    hint = f" (known: {', '.join(known)})"
                    if features:
                        hint += f" (feature sections: {', '.join(features)})"
                self.error(_join(path, key), f"unknown field{hint}")
            else:
                out[key] = item
        for name in required:
            if name not in out:
                self.error(_join(path, name), "required")
        return out

    def named(self, path: str, value: Any) -> dict[str, Any]:
        """A mapping of user-chosen names (workspaces, teams, services) to their bodies."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping of names, got {_shown(value)}")
            return {}
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.error(path, f"name {_shown(key)} must be a string (quote it)")
            elif not NAME_PATTERN.fullmatch(key):
                self.error(
                    f"{path}.{key}",
                    "name must be 1-64 letters, digits, '-' or '_', "
                    "starting with a letter or digit",
                )
            else:
                out[key] = item
        return out

    def money(self, path: str, value: Any) -> int | None:
        amount: Decimal | None = None
        if isinstance(value, Decimal):
            amount = value
        elif isinstance(value, int) and not isinstance(value, bool):
            amount = Decimal(value)
        elif isinstance(value, str) and _PLAIN_DECIMAL.fullmatch(value.strip()):
            amount = Decimal(value.strip())
        if amount is None or not amount.is_finite() or amount <= 0:
            self.error(path, f"{_MONEY_HINT}, got {_shown(value)}")
            return None
        if amount > MAX_BUDGET_USD:
            self.error(path, f"must be at most {MAX_BUDGET_USD} per period, got {_shown(value)}")
            return None
        nanos = amount * NANOS_PER_DOLLAR
        if nanos != nanos.to_integral_value():
            self.error(path, f"has more than 9 decimal places, got {_shown(value)}")
            return None
        return int(nanos)

    def optional_money(self, path: str, raw: Mapping[str, Any]) -> int | None:
        return self.money(f"{path}.budget_usd", raw["budget_usd"]) if "budget_usd" in raw else None

    def fraction(self, path: str, value: Any) -> Decimal | None:
        share: Decimal | None = None
        percent = isinstance(value, str) and value.strip().endswith("%")
        if percent:
            digits = value.strip()[:-1].strip()
            if _PLAIN_DECIMAL.fullmatch(digits):
                share = Decimal(digits).scaleb(-2)
        elif isinstance(value, Decimal) and value.is_finite():
            share = value
        elif isinstance(value, str) and _PLAIN_DECIMAL.fullmatch(value.strip()):
            share = Decimal(value.strip())
        elif isinstance(value, int) and not isinstance(value, bool):
            share = Decimal(value)
        if share is None:
            self.error(path, f"{_FRACTION_HINT}, got {_shown(value)}")
            return None
        if share <= 0:
            self.error(path, f"must be greater than 0%, got {_shown(value)}")
            return None
        if share > MAX_LIMIT_FRACTION:
            hint = "" if percent else f' (did you mean "{str(value).strip()}%"?)'
            self.error(path, f"must be at most 500% (5), got {_shown(value)}{hint}")
            return None
        return share

    def positive_int(self, path: str, value: Any) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.error(path, f"must be a positive integer, got {_shown(value)}")
            return None
        return value

    def choice(self, path: str, value: Any, choices: Collection[str]) -> str | None:
        if value not in choices:
            self.error(path, f"must be one of {', '.join(choices)}, got {_shown(value)}")
            return None
        return str(value)

    def text(self, path: str, value: Any) -> str | None:
        if not isinstance(value, str) or not value.strip():
            self.error(path, f"must be a non-empty string, got {_shown(value)}")
            return None
        return value.strip()

    def url(self, path: str, value: Any) -> str | None:
        text = self.text(path, value)
        if text is None:
            return None
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.error(path, "must be an http:// or https:// URL with a host")
            return None
        return text

    def flag(self, path: str, value: Any) -> bool | None:
        if not isinstance(value, bool):
            self.error(path, f"must be true or false, got {_shown(value)}")
            return None
        return value

    def count(self, path: str, value: Any) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.error(path, f"must be a whole number >= 0, got {_shown(value)}")
            return None
        return value

    def model(self, path: str, value: Any, *, default_ok: bool = False) -> str | None:
        """A model id; warns (once per model) when the price table does not know it."""
        name = self.text(path, value)
        if name is None:
            return None
        if name == DEFAULT_MODEL:
            if default_ok:
                return name
            self.error(path, f'"{DEFAULT_MODEL}" is not a model here; name a model')
            return None
        if not _MODEL_NAME.fullmatch(name):
            self.error(path, f"not a model id: {_shown(name)}")
            return None
        if self.prices.family_of(name) is None and model_key(name) not in self._unpriced:
            self._unpriced.add(model_key(name))
            self.warnings.append(
                f"{path}: model {_shown(name)} is not in the price table "
                f"({self.prices.version}); it is billed at its class's provisional rate "
                "(or refused: pricing.unknown_models)"
            )
        return name

    def strings(
        self, path: str, value: Any, choices: Collection[str] | None = None
    ) -> tuple[str, ...] | None:
        """A non-empty list of non-empty strings, each one of `choices` when given."""
        if not isinstance(value, list) or not value:
            example = f"[{next(iter(choices))}]" if choices else "[a, b]"
            self.error(path, f"must be a non-empty list like {example}, got {_shown(value)}")
            return None
        out: list[str] = []
        for i, item in enumerate(value):
            text = self.text(f"{path}[{i}]", item)
            if text is None:
                continue
            if choices is not None and text not in choices:
                hint = _did_you_mean(text, choices) or f" (one of: {', '.join(choices)})"
                self.error(f"{path}[{i}]", f"unknown value {_shown(text)}{hint}")
                continue
            out.append(text)
        return tuple(out) if len(out) == len(value) else None

    def rate_fields(self, path: str, value: Any) -> dict[str, int | None]:
        """The limits set explicitly at `path`; an explicit null means "no limit"."""
        raw = self.mapping(path, value, _RATE_FIELDS)
        out: dict[str, int | None] = {}
        for name, item in raw.items():
            out[name] = None if item is None else self.positive_int(f"{path}.{name}", item)
        return out
