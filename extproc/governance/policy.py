"""The budget policy: workspaces, their money, teams, services and rate limits, from YAML.

The policy decides who may spend how much, so a mistake in it must never be guessed
around: every unknown field, ill-typed value or dangling reference is an error naming the
exact field path, and all of them are reported at once so one edit fixes the file. Money
is parsed with Decimal and kept in integer nano-dollars; soft and hard limits are exact
fractions of the budget, rounded down, so the enforced figure is the one on paper.

Built-in defaults (overridable under `defaults:` and per workspace): period month, soft
limit 75%, hard limit 110% of the budget, 4096 output tokens reserved when a request sets
no cap, and failing closed when Redis is down.

Rate limits under `key_rate_limits` are inherited field by field (defaults -> workspace ->
service), so a service that only sets `rpm` keeps the inherited `tpm`; an explicit `null`
lifts an inherited limit. Workspace, team and service `rate_limits` are shared by everyone
inside them and are not inherited.

The optional `routing:` section holds the cost-shaping vocabulary (model aliases, price
tiers, the step-down ladder, ordered rules, upstream route names); per-level `routing:`
settings (allowed models, ceiling, default model, degrading, overdraft, context caps) are
inherited like `key_rate_limits`. Names a rule refers to must exist, because a typo would
silently switch a rule off; a model the price table does not know is only a warning, since
new models appear before the price table is updated. `extproc.routing.decide` applies all of it.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import json
import logging
import os
import re
import zoneinfo
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from decimal import ROUND_FLOOR, Decimal, InvalidOperation, localcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from extproc.metering.prices import NANOS_PER_DOLLAR, PriceTable, default_table

log = logging.getLogger("extproc.governance.policy")

VERSION = 1
PERIODS = ("month", "week", "day")
ON_REDIS_DOWN = ("closed", "open")
ALERT_EVENTS = frozenset({"soft_limit", "hard_limit", "burn_rate", "reconcile_drift"})
# Budgets live in Redis and are compared inside Lua, whose numbers are doubles: exact only
# up to 2**53 nano-dollars (about $9M). These caps keep budget x hard limit below that.
MAX_BUDGET_USD = Decimal(1_000_000)
MAX_LIMIT_FRACTION = Decimal(5)
# burn_alert_multiple: past 100x the usual day an alert would only come once the money is gone.
MAX_BURN_MULTIPLE = Decimal(100)

_DEFAULTS: dict[str, Any] = {
    "period": "month",
    "soft_limit": Decimal("0.75"),
    "hard_limit": Decimal("1.1"),
    "default_output_cap": 4096,
    "enforce_output_cap": False,
    "on_redis_down": "closed",
    "burn_alert_multiple": Decimal(3),
    "burn_alert_min_usd": Decimal(1),
}
_TOP = ("version", "timezone", "defaults", "workspaces", "alerts")
# Feature sections come after the core ones and are named apart in "unknown field" hints.
_FEATURE_SECTIONS = ("routing",)
_DEFAULT_FIELDS = (*_DEFAULTS, "key_rate_limits", "routing")
_WORKSPACE_FIELDS = (
    "budget_usd",
    *_DEFAULT_FIELDS,
    "upstream",
    "rate_limits",
    "teams",
    "services",
    "contact",
)
_TEAM_FIELDS = ("budget_usd", "rate_limits", "contact")
_SERVICE_FIELDS = ("team", "budget_usd", "rate_limits", "key_rate_limits", "routing")
_UPSTREAM_FIELDS = ("key_env", "key_file", "base_url", "project_id")
_RATE_FIELDS = ("rpm", "tpm")
# Names end up in Redis keys and hash tags: no braces, spaces, dots or colons.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLAIN_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")
_DATED_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")
# Model ids as OpenAI spells them, fine-tunes included ("ft:gpt-4.1-mini:acme::abc123").
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")  # cheapest first
ENDPOINT_NAMES = ("responses", "chat.completions", "completions", "embeddings")
CONTEXT_ACTIONS = ("reject", "downgrade")
DEFAULT_MODEL = "default"  # the model name that means "this caller's default_model"
_ROUTING_FIELDS = ("aliases", "tiers", "ladder", "rules", "upstream_routes")
_RULE_FIELDS = ("name", "when", "set")
_MATCH_LISTS = ("endpoint", "workspace", "service", "team", "model", "task", "reasoning_effort")
_MATCH_FLAGS = ("tools", "stream")
_MATCH_COUNTS = ("input_tokens_over", "input_tokens_under")
_MATCH_FIELDS = (*_MATCH_LISTS, *_MATCH_FLAGS, *_MATCH_COUNTS)
_SET_FIELDS = ("model", "reasoning_effort", "max_output_tokens", "route")
_SCOPE_ROUTING_FIELDS = (
    "allowed_models",
    "ceiling_tier",
    "default_model",
    "degrade_past_soft",
    "overdraft",
    "max_input_tokens",
    "max_session_input_tokens",
    "on_context_exceeded",
    "inject_prompt_cache_key",
)
_LIFTABLE = frozenset(
    {
        "allowed_models",
        "ceiling_tier",
        "default_model",
        "overdraft",
        "max_input_tokens",
        "max_session_input_tokens",
    }
)
_MONEY_HINT = 'must be a positive decimal string or number like "1000" or 1000'
_FRACTION_HINT = 'must be a percentage like "75%" or a fraction like 0.75'


class PolicyError(ValueError):
    """The policy is unusable; one problem per line, each naming the file and field path."""

    def __init__(self, problems: Collection[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True, slots=True)
class RateLimits:
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class Upstream:
    key_env: str | None
    key_file: str | None
    base_url: str | None
    # The provider's project the key belongs to (OpenAI "proj_..."): how `extproc reconcile`
    # finds this workspace in the organization's Usage and Costs APIs.
    project_id: str | None = None

    def read_key(self, env: Mapping[str, str] | None = None) -> str:
        """The real provider key. Errors name where it was looked for, never its value."""
        if self.key_env:
            value = (os.environ if env is None else env).get(self.key_env)
            where = f"environment variable {self.key_env}"
            if value is None:
                raise PolicyError([f"upstream key: {where} is not set"])
        else:
            where = f"key file {self.key_file}"
            try:
                value = Path(str(self.key_file)).read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or type(exc).__name__
                raise PolicyError([f"upstream key: cannot read {where}: {reason}"]) from None
        value = value.strip()
        if not value:
            raise PolicyError([f"upstream key: {where} is empty"])
        if not value.isprintable() or any(c.isspace() for c in value):
            raise PolicyError([f"upstream key: {where} contains whitespace or control characters"])
        return value


@dataclass(frozen=True, slots=True)
class Team:
    name: str
    budget_nanos: int | None
    rate_limits: RateLimits | None
    # Whom a refused developer should ask (a channel, an email): shown in every refusal.
    contact: str | None = None


def model_key(model: str) -> str:
    """How routing compares model names: case-insensitively, a dated snapshot as its model."""
    return _DATED_SNAPSHOT.sub("", model.strip().lower())


@dataclass(frozen=True, slots=True)
class Overdraft:
    """At the hard limit, this one cheap model stays open until `nanos` more are spent."""

    model: str
    nanos: int


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    """The model limits one caller is held to: defaults, then workspace, then service.

    Every field is inherited field by field like `key_rate_limits`; an explicit null lifts an
    inherited limit. The empty value (all defaults) changes nothing.
    """

    allowed_models: tuple[str, ...] | None = None
    ceiling_tier: int | None = None
    default_model: str | None = None
    degrade_past_soft: bool = False
    overdraft: Overdraft | None = None
    max_input_tokens: int | None = None
    max_session_input_tokens: int | None = None
    on_context_exceeded: str = "reject"
    inject_prompt_cache_key: bool = False
    _allowed: frozenset[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        allowed = self.allowed_models
        keys = None if allowed is None else frozenset(model_key(m) for m in allowed)
        object.__setattr__(self, "_allowed", keys)

    def allows(self, model: str) -> bool:
        return self._allowed is None or model_key(model) in self._allowed


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """Conditions of one rule, all of which must hold; a list matches any of its values.

    `model` holds model keys (see `model_key`) and `task` is lower-cased: both are compared
    that way. None means "any".
    """

    endpoint: tuple[str, ...] | None = None
    workspace: tuple[str, ...] | None = None
    service: tuple[str, ...] | None = None
    team: tuple[str, ...] | None = None
    model: tuple[str, ...] | None = None
    task: tuple[str, ...] | None = None
    reasoning_effort: tuple[str, ...] | None = None
    tools: bool | None = None
    stream: bool | None = None
    input_tokens_over: int | None = None
    input_tokens_under: int | None = None


@dataclass(frozen=True, slots=True)
class RuleChanges:
    """What a matching rule does. Effort and output limits are caps: they only ever lower."""

    model: str | None = None
    reasoning_effort: str | None = None
    max_output_tokens: int | None = None
    route: str | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    when: RuleMatch
    changes: RuleChanges


@dataclass(frozen=True, slots=True)
class UpstreamRoute:
    """A name the sidecar may put in `x-extproc-route`; Envoy's route table gives it meaning."""

    name: str
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Routing:
    """The policy-wide routing vocabulary: aliases, the price ladder, rules and routes."""

    aliases: dict[str, str] = field(default_factory=dict)
    tiers: tuple[tuple[str, ...], ...] = ()
    ladder: dict[str, str] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    upstream_routes: dict[str, UpstreamRoute] = field(default_factory=dict)
    _tier_of: dict[str, int] = field(init=False, repr=False, compare=False)
    _down: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tier_of = {model_key(m): i for i, tier in enumerate(self.tiers) for m in tier}
        down = {model_key(k): v for k, v in self.ladder.items()}
        object.__setattr__(self, "_tier_of", tier_of)
        object.__setattr__(self, "_down", down)

    def tier_of(self, model: str) -> int | None:
        """0 is the most capable (priciest) tier; None for a model in no tier."""
        return self._tier_of.get(model_key(model))

    def step_down(self, model: str) -> str | None:
        """The next cheaper model on the ladder, if the ladder names one."""
        return self._down.get(model_key(model))


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    team: str | None
    budget_nanos: int | None
    rate_limits: RateLimits | None
    # Effective per-key limits: defaults, then workspace, then this service, field by field.
    key_rate_limits: RateLimits | None
    # Effective model limits, merged the same way.
    routing: RoutingSettings = RoutingSettings()


@dataclass(frozen=True, slots=True)
class Workspace:
    name: str
    budget_nanos: int
    period: str
    soft_nanos: int
    hard_nanos: int
    default_output_cap: int
    on_redis_down: str
    upstream: Upstream
    rate_limits: RateLimits | None
    key_rate_limits: RateLimits | None
    teams: dict[str, Team]
    services: dict[str, Service]
    routing: RoutingSettings = RoutingSettings()
    # Burn-rate alerts: today heading for >= multiple x a usual day, >= min spent (no pennies).
    burn_alert_multiple: Decimal = Decimal(3)
    burn_alert_min_nanos: int = NANOS_PER_DOLLAR
    # Write default_output_cap into requests that set no output cap: the reservation then
    # bounds the actual cost, so settled spend cannot pass the hard cap even for reasoning
    # models (whose hidden reasoning tokens count as output).
    enforce_output_cap: bool = False
    # Whom a refused developer should ask, when their team names no contact of its own.
    contact: str | None = None

    def contact_for(self, team: str | None) -> str | None:
        """The team's contact, else the workspace's."""
        own = self.teams[team].contact if team and team in self.teams else None
        return own or self.contact


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    events: frozenset[str]


@dataclass(frozen=True, slots=True)
class Policy:
    version: int
    timezone: zoneinfo.ZoneInfo
    workspaces: dict[str, Workspace]
    webhooks: tuple[Webhook, ...]
    source: str
    warnings: tuple[str, ...] = ()
    routing: Routing = field(default_factory=Routing)

    def service(self, workspace: str, service: str) -> Service | None:
        ws = self.workspaces.get(workspace)
        return ws.services.get(service) if ws else None

    def routing_for(self, workspace: str, service: str) -> RoutingSettings:
        """The service's model limits, else its workspace's, else none."""
        svc = self.service(workspace, service)
        if svc is not None:
            return svc.routing
        ws = self.workspaces.get(workspace)
        return ws.routing if ws else RoutingSettings()


# --- loading ---------------------------------------------------------------------------


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
                f"(version {self.prices.version}); it is billed at the fallback rate"
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


def _merge_limits(base: RateLimits | None, override: Mapping[str, int | None]) -> RateLimits | None:
    merged = {"rpm": base.rpm if base else None, "tpm": base.tpm if base else None}
    merged.update(override)
    limits = RateLimits(**merged)
    return None if limits == RateLimits() else limits


def _scaled(budget_nanos: int, share: Decimal) -> int:
    with localcontext() as ctx:
        ctx.prec = 80
        return int((budget_nanos * share).to_integral_value(rounding=ROUND_FLOOR))


def _upstream(chk: _Checker, path: str, value: Any) -> Upstream | None:
    raw = chk.mapping(path, value, _UPSTREAM_FIELDS)
    if isinstance(value, dict) and ("key_env" in raw) == ("key_file" in raw):
        chk.error(path, "set exactly one of key_env or key_file")
        return None
    key_env = key_file = base_url = None
    if "key_env" in raw:
        key_env = chk.text(f"{path}.key_env", raw["key_env"])
        if key_env is not None and not _ENV_NAME.fullmatch(key_env):
            chk.error(f"{path}.key_env", f"not an environment variable name: {_shown(key_env)}")
    if "key_file" in raw:
        key_file = chk.text(f"{path}.key_file", raw["key_file"])
        if key_file is not None:
            key_file = str(chk.base_dir / Path(key_file).expanduser())
    if raw.get("base_url") is not None:
        base_url = chk.url(f"{path}.base_url", raw["base_url"])
    project_id = None
    if raw.get("project_id") is not None:
        project_id = chk.text(f"{path}.project_id", raw["project_id"])
    if not isinstance(value, dict):
        return None
    return Upstream(key_env=key_env, key_file=key_file, base_url=base_url, project_id=project_id)


def _settings(chk: _Checker, path: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The period / limit / cap / failure-mode fields present in `raw`, validated."""
    out: dict[str, Any] = {}
    if "period" in raw:
        out["period"] = chk.choice(f"{path}.period", raw["period"], PERIODS)
    for name in ("soft_limit", "hard_limit"):
        if name in raw:
            out[name] = chk.fraction(f"{path}.{name}", raw[name])
    if "default_output_cap" in raw:
        out["default_output_cap"] = chk.positive_int(
            f"{path}.default_output_cap", raw["default_output_cap"]
        )
    if "enforce_output_cap" in raw:
        out["enforce_output_cap"] = chk.flag(
            f"{path}.enforce_output_cap", raw["enforce_output_cap"]
        )
    if "on_redis_down" in raw:
        out["on_redis_down"] = chk.choice(
            f"{path}.on_redis_down", raw["on_redis_down"], ON_REDIS_DOWN
        )
    if "burn_alert_multiple" in raw:
        out["burn_alert_multiple"] = _burn_multiple(
            chk, f"{path}.burn_alert_multiple", raw["burn_alert_multiple"]
        )
    if "burn_alert_min_usd" in raw:
        out["burn_alert_min_usd"] = _burn_floor(
            chk, f"{path}.burn_alert_min_usd", raw["burn_alert_min_usd"]
        )
    return out


def _burn_multiple(chk: _Checker, path: str, value: Any) -> Decimal | None:
    """How many usual days today may be heading for before it alerts: above 1, at most 100."""
    multiple: Decimal | None = None
    if isinstance(value, Decimal) and value.is_finite():
        multiple = value
    elif isinstance(value, int) and not isinstance(value, bool):
        multiple = Decimal(value)
    elif isinstance(value, str) and _PLAIN_DECIMAL.fullmatch(value.strip()):
        multiple = Decimal(value.strip())
    if multiple is None or not 1 < multiple <= MAX_BURN_MULTIPLE:
        chk.error(
            path,
            f"must be a number above 1 and at most {MAX_BURN_MULTIPLE} (3 alerts at three "
            f"times the usual daily spend), got {_shown(value)}",
        )
        return None
    return multiple


def _burn_floor(chk: _Checker, path: str, value: Any) -> Decimal | None:
    """While less than this is spent today, nothing alerts; 0 means any amount."""
    if isinstance(value, str) and _PLAIN_DECIMAL.fullmatch(value.strip()):
        number: Any = Decimal(value.strip())
    else:
        number = None if isinstance(value, bool) else value
    if isinstance(number, int | Decimal) and number == 0:
        return Decimal(0)
    nanos = chk.money(path, value)
    return None if nanos is None else Decimal(nanos) / NANOS_PER_DOLLAR


def _check_order(
    chk: _Checker, path: str, own: Mapping[str, Any], soft: Decimal | None, hard: Decimal | None
) -> None:
    """hard >= soft, reported at the field this level set (hard_limit if it set both)."""
    if soft is None or hard is None or hard >= soft:
        return
    where = "hard_limit" if "hard_limit" in own else "soft_limit"
    chk.error(f"{path}.{where}", f"hard_limit ({_pct(hard)}) must be >= soft_limit ({_pct(soft)})")


def _timezone(chk: _Checker, value: Any) -> zoneinfo.ZoneInfo:
    utc = zoneinfo.ZoneInfo("UTC")
    if value is None:
        return utc
    if not isinstance(value, str) or not value.strip():
        chk.error(
            "timezone", f'must be an IANA time zone name like "Europe/Berlin", got {_shown(value)}'
        )
        return utc
    try:
        return zoneinfo.ZoneInfo(value.strip())
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        hint = _did_you_mean(value.strip(), zoneinfo.available_timezones())
        chk.error("timezone", f"unknown IANA time zone {_shown(value)}{hint}")
        return utc


def _teams(chk: _Checker, ws: str, value: Any, budget: int | None) -> dict[str, Team]:
    teams: dict[str, Team] = {}
    for name, body in chk.named(f"workspaces.{ws}.teams", value).items():
        path = f"workspaces.{ws}.teams.{name}"
        raw = chk.mapping(path, body, _TEAM_FIELDS)
        own_budget = chk.optional_money(path, raw)
        limits = _merge_limits(None, chk.rate_fields(f"{path}.rate_limits", raw.get("rate_limits")))
        contact = chk.text(f"{path}.contact", raw["contact"]) if "contact" in raw else None
        teams[name] = Team(name, own_budget, limits, contact)
        if budget and own_budget and own_budget > budget:
            chk.warnings.append(f"{path}.budget_usd: larger than the budget of workspace {ws}")
    return teams


def _services(
    chk: _Checker,
    ws: str,
    value: Any,
    budget: int | None,
    teams: Mapping[str, Team],
    key_limits: RateLimits | None,
    routing: Routing,
    ws_routing: RoutingSettings,
) -> dict[str, Service]:
    services: dict[str, Service] = {}
    for name, body in chk.named(f"workspaces.{ws}.services", value).items():
        path = f"workspaces.{ws}.services.{name}"
        raw = chk.mapping(path, body, _SERVICE_FIELDS)
        team = None
        if raw.get("team") is not None:
            team = chk.text(f"{path}.team", raw["team"])
            if team is not None and team not in teams:
                known = f"teams in {ws}: {', '.join(teams)}" if teams else f"{ws} has no teams"
                chk.error(f"{path}.team", f'unknown team "{team}" ({known})')
        own_budget = chk.optional_money(path, raw)
        limits = _merge_limits(None, chk.rate_fields(f"{path}.rate_limits", raw.get("rate_limits")))
        own_keys = chk.rate_fields(f"{path}.key_rate_limits", raw.get("key_rate_limits"))
        own_routing = _scope_routing(chk, f"{path}.routing", raw.get("routing"), routing)
        services[name] = Service(
            name,
            team,
            own_budget,
            limits,
            _merge_limits(key_limits, own_keys),
            _merged_routing(chk, f"{path}.routing", own_routing, ws_routing, routing),
        )
        if budget and own_budget and own_budget > budget:
            chk.warnings.append(f"{path}.budget_usd: larger than the budget of workspace {ws}")
        team_budget = teams[team].budget_nanos if team in teams else None
        if team_budget and own_budget and own_budget > team_budget:
            chk.warnings.append(f"{path}.budget_usd: larger than the budget of team {team}")
    return services


def _workspace(
    chk: _Checker,
    name: str,
    value: Any,
    defaults: Mapping[str, Any],
    default_key_limits: RateLimits | None,
    routing: Routing,
    default_routing: RoutingSettings,
) -> Workspace | None:
    path = f"workspaces.{name}"
    before = len(chk.problems)
    raw = chk.mapping(path, value, _WORKSPACE_FIELDS, required=("budget_usd", "upstream"))
    budget = chk.optional_money(path, raw)
    own = _settings(chk, path, raw)
    merged = {**_DEFAULTS, **defaults, **own}
    soft, hard = merged["soft_limit"], merged["hard_limit"]
    if {"soft_limit", "hard_limit"} & own.keys():
        _check_order(chk, path, own, soft, hard)
    upstream = _upstream(chk, f"{path}.upstream", raw["upstream"]) if "upstream" in raw else None
    rate_limits = _merge_limits(
        None, chk.rate_fields(f"{path}.rate_limits", raw.get("rate_limits"))
    )
    own_keys = chk.rate_fields(f"{path}.key_rate_limits", raw.get("key_rate_limits"))
    key_limits = _merge_limits(default_key_limits, own_keys)
    own_routing = _scope_routing(chk, f"{path}.routing", raw.get("routing"), routing)
    ws_routing = _merged_routing(chk, f"{path}.routing", own_routing, default_routing, routing)
    teams = _teams(chk, name, raw.get("teams"), budget)
    services = _services(
        chk, name, raw.get("services"), budget, teams, key_limits, routing, ws_routing
    )
    if isinstance(value, dict) and not services:
        chk.warnings.append(f"{path}.services: none defined, so no keys can be issued here")
    if len(chk.problems) > before or budget is None or upstream is None:
        return None
    return Workspace(
        name=name,
        budget_nanos=budget,
        period=merged["period"],
        soft_nanos=_scaled(budget, soft),
        hard_nanos=_scaled(budget, hard),
        default_output_cap=merged["default_output_cap"],
        enforce_output_cap=bool(merged["enforce_output_cap"]),
        on_redis_down=merged["on_redis_down"],
        upstream=upstream,
        rate_limits=rate_limits,
        key_rate_limits=key_limits,
        teams=teams,
        services=services,
        routing=ws_routing,
        burn_alert_multiple=merged["burn_alert_multiple"],
        burn_alert_min_nanos=int(merged["burn_alert_min_usd"] * NANOS_PER_DOLLAR),
        contact=chk.text(f"{path}.contact", raw["contact"]) if "contact" in raw else None,
    )


def _webhooks(chk: _Checker, value: Any) -> tuple[Webhook, ...]:
    raw = chk.mapping("alerts", value, ("webhooks",))
    hooks = raw.get("webhooks")
    if hooks is None:
        return ()
    if not isinstance(hooks, list):
        chk.error("alerts.webhooks", f"must be a list of webhooks, got {_shown(hooks)}")
        return ()
    out = []
    for i, body in enumerate(hooks):
        path = f"alerts.webhooks[{i}]"
        hraw = chk.mapping(path, body, ("url", "events"), required=("url",))
        url = chk.url(f"{path}.url", hraw["url"]) if "url" in hraw else None
        events = ALERT_EVENTS
        if "events" in hraw:
            listed = hraw["events"]
            if not isinstance(listed, list) or not listed:
                chk.error(
                    f"{path}.events",
                    f"must be a non-empty list of {', '.join(sorted(ALERT_EVENTS))} "
                    f"(omit it for all), got {_shown(listed)}",
                )
            else:
                for event in listed:
                    if event not in ALERT_EVENTS:
                        hint = _did_you_mean(str(event), ALERT_EVENTS)
                        chk.error(
                            f"{path}.events",
                            f"unknown event {_shown(event)}{hint} "
                            f"(events: {', '.join(sorted(ALERT_EVENTS))})",
                        )
                events = frozenset(e for e in listed if e in ALERT_EVENTS)
        if url is not None:
            out.append(Webhook(url, events))
    return tuple(out)


# --- routing -----------------------------------------------------------------------------


def _routing(chk: _Checker, value: Any, scopes: _Scopes) -> Routing:
    raw = chk.mapping("routing", value, _ROUTING_FIELDS)
    routes = _upstream_routes(chk, raw.get("upstream_routes"))
    tiers = _tiers(chk, raw.get("tiers"))
    aliases = _aliases(chk, raw.get("aliases"))
    tier_of = {model_key(m): i for i, tier in enumerate(tiers) for m in tier}
    ladder = _ladder(chk, raw.get("ladder"), tier_of)
    rules = _rules(chk, raw.get("rules"), aliases, routes, scopes)
    return Routing(aliases, tiers, ladder, rules, routes)


def _upstream_routes(chk: _Checker, value: Any) -> dict[str, UpstreamRoute]:
    routes = {}
    for name, body in chk.named("routing.upstream_routes", value).items():
        path = f"routing.upstream_routes.{name}"
        raw = chk.mapping(path, body, ("description",))
        description = None
        if raw.get("description") is not None:
            description = chk.text(f"{path}.description", raw["description"])
        routes[name] = UpstreamRoute(name, description)
    return routes


def _tiers(chk: _Checker, value: Any) -> tuple[tuple[str, ...], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        chk.error("routing.tiers", f"must be a list of model lists, got {_shown(value)}")
        return ()
    seen: dict[str, int] = {}
    tiers = []
    for i, tier in enumerate(value):
        path = f"routing.tiers[{i}]"
        if not isinstance(tier, list) or not tier:
            chk.error(path, f"must be a non-empty list of models, got {_shown(tier)}")
            continue
        names = []
        for j, item in enumerate(tier):
            name = chk.model(f"{path}[{j}]", item)
            if name is None:
                continue
            if model_key(name) in seen:
                chk.error(
                    f"{path}[{j}]",
                    f"model {_shown(name)} is already in tier {seen[model_key(name)]}",
                )
                continue
            seen[model_key(name)] = i
            names.append(name)
        tiers.append(tuple(names))
    return tuple(tiers)


def _model_keys(chk: _Checker, path: str, value: Any) -> dict[str, Any]:
    """A mapping keyed by model ids (aliases, ladder), with each key checked."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        chk.error(path, f"must be a mapping of model names, got {_shown(value)}")
        return {}
    out: dict[str, Any] = {}
    keys: set[str] = set()
    for key, item in value.items():
        if not isinstance(key, str) or not _MODEL_NAME.fullmatch(key):
            chk.error(path, f"not a model name: {_shown(key)} (quote it if it is)")
        elif model_key(key) in keys:
            chk.error(f"{path}.{key}", "listed twice (names compare case-insensitively)")
        else:
            keys.add(model_key(key))
            out[key] = item
    return out


def _aliases(chk: _Checker, value: Any) -> dict[str, str]:
    raw = _model_keys(chk, "routing.aliases", value)
    aliases = {}
    for alias, target in raw.items():
        path = f"routing.aliases.{alias}"
        if alias == DEFAULT_MODEL:
            chk.error(path, f'"{DEFAULT_MODEL}" is built in: it means the caller\'s default_model')
            continue
        name = chk.model(path, target, default_ok=True)
        if name is not None:
            aliases[alias] = name
    for alias, target in aliases.items():
        if target in aliases:
            chk.error(
                f"routing.aliases.{alias}",
                f"points at another alias ({_shown(target)}); aliases resolve once, so name "
                f"the model ({_shown(aliases[target])})",
            )
    return aliases


def _ladder(chk: _Checker, value: Any, tier_of: Mapping[str, int]) -> dict[str, str]:
    raw = _model_keys(chk, "routing.ladder", value)
    ladder: dict[str, str] = {}
    for model, target in raw.items():
        path = f"routing.ladder.{model}"
        chk.model(path, model)
        cheaper = chk.model(path, target)
        if cheaper is None:
            continue
        if model_key(cheaper) == model_key(model):
            chk.error(path, "steps down to itself")
            continue
        here, there = tier_of.get(model_key(model)), tier_of.get(model_key(cheaper))
        if here is not None and there is not None and there < here:
            chk.error(path, f"climbs from tier {here} to tier {there}; a ladder only steps down")
            continue
        ladder[model] = cheaper
    down = {model_key(k): model_key(v) for k, v in ladder.items()}
    reported: set[frozenset[str]] = set()
    for start in ladder:
        path, node = [model_key(start)], down.get(model_key(start))
        while node is not None and node not in path:
            path.append(node)
            node = down.get(node)
        if node == model_key(start) and frozenset(path) not in reported:
            reported.add(frozenset(path))
            chk.error(f"routing.ladder.{start}", f"loops: {' -> '.join([*path, node])}")
    return ladder


def _rules(
    chk: _Checker,
    value: Any,
    aliases: Mapping[str, str],
    routes: Mapping[str, UpstreamRoute],
    scopes: _Scopes,
) -> tuple[Rule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        chk.error("routing.rules", f"must be a list of rules, got {_shown(value)}")
        return ()
    rules: list[Rule] = []
    names: dict[str, int] = {}
    catch_all: tuple[int, str] | None = None
    for i, body in enumerate(value):
        path = f"routing.rules[{i}]"
        raw = chk.mapping(path, body, _RULE_FIELDS, required=("name", "set"))
        name = None
        if "name" in raw:
            name = chk.text(f"{path}.name", raw["name"])
            if name is not None and not NAME_PATTERN.fullmatch(name):
                chk.error(f"{path}.name", "must be 1-64 letters, digits, '-' or '_'")
                name = None
            elif name is not None and name in names:
                chk.error(f"{path}.name", f'"{name}" is already the name of rules[{names[name]}]')
                name = None
        when = _rule_match(chk, f"{path}.when", raw.get("when"), aliases, scopes)
        changes = _rule_changes(chk, f"{path}.set", raw.get("set"), aliases, routes)
        if catch_all is not None and isinstance(body, dict):
            chk.warnings.append(
                f"{path}: never reached: rules[{catch_all[0]}] ({catch_all[1]}) matches every "
                "request"
            )
        if name is None or when is None or changes is None:
            continue
        names[name] = i
        if when == RuleMatch() and catch_all is None:
            catch_all = (i, name)
        rules.append(Rule(name, when, changes))
    return tuple(rules)


def _rule_match(
    chk: _Checker, path: str, value: Any, aliases: Mapping[str, str], scopes: _Scopes
) -> RuleMatch | None:
    before = len(chk.problems)
    raw = chk.mapping(path, value, _MATCH_FIELDS)
    found: dict[str, Any] = {}
    choices = {"endpoint": ENDPOINT_NAMES, "reasoning_effort": EFFORTS}
    for key in _MATCH_LISTS:
        if key in raw:
            found[key] = chk.strings(f"{path}.{key}", raw[key], choices.get(key))
    for key in _MATCH_FLAGS:
        if key in raw:
            found[key] = chk.flag(f"{path}.{key}", raw[key])
    for key in _MATCH_COUNTS:
        if key in raw:
            found[key] = chk.count(f"{path}.{key}", raw[key])
    _check_scope_names(chk, path, found, scopes)
    if found.get("model"):
        for j, model in enumerate(found["model"]):
            if model in aliases:
                chk.error(
                    f"{path}.model[{j}]",
                    f"{_shown(model)} is an alias and rules see models after aliases are "
                    f"resolved; match {_shown(aliases[model])}",
                )
            else:
                chk.model(f"{path}.model[{j}]", model)
        found["model"] = tuple(dict.fromkeys(model_key(m) for m in found["model"]))
    if found.get("task"):
        found["task"] = tuple(t.lower() for t in found["task"])
    over, under = found.get("input_tokens_over"), found.get("input_tokens_under")
    if over is not None and under is not None and under - over < 2:
        chk.error(
            f"{path}.input_tokens_under",
            f"no token count is over {over} and under {under}: the rule never matches",
        )
    if len(chk.problems) > before:
        return None
    return RuleMatch(**found)


def _rule_changes(
    chk: _Checker,
    path: str,
    value: Any,
    aliases: Mapping[str, str],
    routes: Mapping[str, UpstreamRoute],
) -> RuleChanges | None:
    before = len(chk.problems)
    raw = chk.mapping(path, value, _SET_FIELDS)
    found: dict[str, Any] = {}
    if "model" in raw:
        model = chk.model(f"{path}.model", raw["model"])
        if model is not None and model in aliases:
            chk.error(
                f"{path}.model",
                f"{_shown(model)} is an alias; name the model ({_shown(aliases[model])})",
            )
        found["model"] = model
    if "reasoning_effort" in raw:
        found["reasoning_effort"] = chk.choice(
            f"{path}.reasoning_effort", raw["reasoning_effort"], EFFORTS
        )
    if "max_output_tokens" in raw:
        found["max_output_tokens"] = chk.positive_int(
            f"{path}.max_output_tokens", raw["max_output_tokens"]
        )
    if "route" in raw:
        route = chk.text(f"{path}.route", raw["route"])
        if route is not None and route not in routes:
            known = ", ".join(routes) or "none defined"
            hint = _did_you_mean(route, routes)
            chk.error(
                f"{path}.route",
                f"unknown route {_shown(route)}{hint} (routing.upstream_routes: {known})",
            )
        found["route"] = route
    if len(chk.problems) > before:
        return None
    return RuleChanges(**found)


_Scopes = Mapping[str, tuple[set[str], set[str]]]  # workspace -> (teams, services)


def _scopes(chk: _Checker, raw_workspaces: Any) -> dict[str, tuple[set[str], set[str]]]:
    """Workspace, team and service names as written, for checking the names rules use."""
    known: dict[str, tuple[set[str], set[str]]] = {}
    for name, body in chk.named("workspaces", raw_workspaces).items():
        body = body if isinstance(body, dict) else {}
        teams, services = body.get("teams"), body.get("services")
        known[name] = (
            {k for k in teams if isinstance(k, str)} if isinstance(teams, dict) else set(),
            {k for k in services if isinstance(k, str)} if isinstance(services, dict) else set(),
        )
    return known


def _check_scope_names(chk: _Checker, path: str, found: Mapping[str, Any], known: _Scopes) -> None:
    """Names in rules must exist: a typo would silently switch a rule off."""
    for j, ws in enumerate(found.get("workspace") or ()):
        if ws not in known:
            hint = _did_you_mean(ws, known) or f" (workspaces: {', '.join(known)})"
            chk.error(f"{path}.workspace[{j}]", f"unknown workspace {_shown(ws)}{hint}")
    scope = [w for w in found.get("workspace") or known if w in known]
    if not scope:
        return
    where = ", ".join(scope)
    for kind, index in (("team", 0), ("service", 1)):
        names: set[str] = set().union(*(known[w][index] for w in scope))
        for j, name in enumerate(found.get(kind) or ()):
            if name not in names:
                hint = _did_you_mean(name, names)
                chk.error(f"{path}.{kind}[{j}]", f"unknown {kind} {_shown(name)}{hint} in {where}")


def _scope_routing(chk: _Checker, path: str, value: Any, routing: Routing) -> dict[str, Any]:
    """The routing settings this level sets explicitly (None: lift an inherited limit)."""
    raw = chk.mapping(path, value, _SCOPE_ROUTING_FIELDS)
    own: dict[str, Any] = {}
    for name, item in raw.items():
        where = f"{path}.{name}"
        if item is None and name in _LIFTABLE:
            own[name] = None
            continue
        parsed: Any
        if name == "allowed_models":
            listed = chk.strings(where, item)
            models = [chk.model(f"{where}[{j}]", m) for j, m in enumerate(listed or ())]
            parsed = tuple(dict.fromkeys(m for m in models if m)) if listed else None
        elif name == "ceiling_tier":
            parsed = _ceiling(chk, where, item, len(routing.tiers))
        elif name == "default_model":
            parsed = chk.model(where, item)
        elif name in ("degrade_past_soft", "inject_prompt_cache_key"):
            parsed = chk.flag(where, item)
        elif name == "overdraft":
            parsed = _overdraft(chk, where, item)
        elif name in ("max_input_tokens", "max_session_input_tokens"):
            parsed = chk.positive_int(where, item)
        else:
            parsed = chk.choice(where, item, CONTEXT_ACTIONS)
        if parsed is not None:
            own[name] = parsed
    return own


def _ceiling(chk: _Checker, path: str, value: Any, tiers: int) -> int | None:
    if not tiers:
        chk.error(path, "routing.tiers defines no tiers to put a ceiling on")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < tiers:
        chk.error(path, f"must be a tier index from 0 to {tiers - 1}, got {_shown(value)}")
        return None
    return value


def _overdraft(chk: _Checker, path: str, value: Any) -> Overdraft | None:
    raw = chk.mapping(path, value, ("model", "usd"), required=("model", "usd"))
    model = chk.model(f"{path}.model", raw["model"]) if "model" in raw else None
    nanos = chk.money(f"{path}.usd", raw["usd"]) if "usd" in raw else None
    return Overdraft(model, nanos) if model is not None and nanos is not None else None


def _merged_routing(
    chk: _Checker, path: str, own: Mapping[str, Any], base: RoutingSettings, routing: Routing
) -> RoutingSettings:
    """`base` with this level's settings on top, checked where this level changed something."""
    merged = replace(base, **own)
    if not own:
        return merged
    for label, model in (
        ("default_model", merged.default_model),
        ("overdraft.model", merged.overdraft.model if merged.overdraft else None),
    ):
        set_here = label.split(".")[0] in own
        if model is None:
            continue
        if not merged.allows(model) and (set_here or "allowed_models" in own):
            blame = label if set_here else "allowed_models"
            allowed = ", ".join(merged.allowed_models or ())
            chk.error(
                f"{path}.{blame}", f"{label} {_shown(model)} is not in allowed_models ({allowed})"
            )
        tier, ceiling = routing.tier_of(model), merged.ceiling_tier
        if (
            tier is not None
            and ceiling is not None
            and tier < ceiling
            and (set_here or "ceiling_tier" in own)
        ):
            blame = label if set_here else "ceiling_tier"
            chk.error(
                f"{path}.{blame}",
                f"{label} {_shown(model)} is in tier {tier}, above ceiling_tier {ceiling}",
            )
    if not routing.ladder:
        if own.get("degrade_past_soft"):
            chk.warnings.append(
                f"{path}.degrade_past_soft: routing.ladder is empty, so nothing can step down"
            )
        if own.get("on_context_exceeded") == "downgrade":
            chk.warnings.append(
                f"{path}.on_context_exceeded: routing.ladder is empty, so a downgrade always "
                "ends in a refusal"
            )
    return merged


def parse_policy(
    doc: Any,
    source: str = "policy.yaml",
    base_dir: Path | None = None,
    *,
    prices: PriceTable | None = None,
) -> Policy:
    """A Policy from an already-parsed YAML document (a dict), or PolicyError.

    `prices` (default: the bundled table) only decides which model names earn a warning.
    """
    chk = _Checker(base_dir or Path.cwd(), prices)
    raw = chk.mapping("", doc, _TOP, required=("version", "workspaces"), features=_FEATURE_SECTIONS)
    routing = _routing(chk, raw.get("routing"), _scopes(chk, raw.get("workspaces")))
    if "version" in raw and (isinstance(raw["version"], bool) or raw["version"] != VERSION):
        chk.error("version", f"unsupported version {_shown(raw['version'])} (this extproc reads 1)")
    tz = _timezone(chk, raw.get("timezone"))
    draw = chk.mapping("defaults", raw.get("defaults"), _DEFAULT_FIELDS)
    defaults = _settings(chk, "defaults", draw)
    base = {**_DEFAULTS, **defaults}
    _check_order(chk, "defaults", defaults, base["soft_limit"], base["hard_limit"])
    default_keys = _merge_limits(
        None, chk.rate_fields("defaults.key_rate_limits", draw.get("key_rate_limits"))
    )
    own_routing = _scope_routing(chk, "defaults.routing", draw.get("routing"), routing)
    default_routing = _merged_routing(
        chk, "defaults.routing", own_routing, RoutingSettings(), routing
    )
    workspaces: dict[str, Workspace] = {}
    if "workspaces" in raw and raw["workspaces"] in (None, {}):
        chk.error("workspaces", "must define at least one workspace")
    valid_defaults = {k: v for k, v in defaults.items() if v is not None}
    for name, body in chk.named("workspaces", raw.get("workspaces")).items():
        ws = _workspace(chk, name, body, valid_defaults, default_keys, routing, default_routing)
        if ws is not None:
            workspaces[name] = ws
    webhooks = _webhooks(chk, raw.get("alerts"))
    if chk.problems:
        raise PolicyError([f"{source}: {p}" for p in chk.problems])
    return Policy(
        version=VERSION,
        timezone=tz,
        workspaces=workspaces,
        webhooks=webhooks,
        source=source,
        warnings=tuple(f"{source}: {w}" for w in chk.warnings),
        routing=routing,
    )


def load_policy(path: str | Path, *, prices: PriceTable | None = None) -> Policy:
    """Read and validate a policy file; PolicyError lists every problem found."""
    source = str(path)
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise PolicyError([f"{source}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise PolicyError([f"{source}: not UTF-8 text"]) from None
    return parse_policy_text(text, source, Path(path).resolve().parent, prices=prices)


def parse_policy_text(
    text: str,
    source: str = "policy.yaml",
    base_dir: Path | None = None,
    *,
    prices: PriceTable | None = None,
) -> Policy:
    loader = _Loader(text)
    try:
        doc = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise PolicyError([f"{source}: not valid YAML: {exc}"]) from None
    finally:
        loader.dispose()
    duplicates = [f"{source}: {d}" for d in loader.duplicates]
    if doc is None:
        raise PolicyError([f"{source}: empty file (expected version: 1 and workspaces:)"])
    try:
        policy = parse_policy(doc, source, base_dir, prices=prices)
    except PolicyError as exc:
        raise PolicyError([*duplicates, *exc.problems]) from None
    if duplicates:
        raise PolicyError(duplicates)
    return policy


# --- hot reload --------------------------------------------------------------------------


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class PolicyWatcher:
    """Re-reads the policy when the file changes; a broken edit never replaces a good policy.

    Polling (not inotify) because Kubernetes ConfigMaps are updated by swapping a symlink,
    which stat() through the link sees and most file-watch APIs miss.
    """

    def __init__(
        self,
        path: str | Path,
        on_change: Callable[[Policy], None],
        *,
        policy: Policy | None = None,
        interval: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.on_change = on_change
        self.policy = policy
        self.interval = interval
        # The file as it is now is the one the caller has loaded: only later changes count.
        self._signature = _signature(self.path)
        self._digest: str | None = None
        try:
            self._digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            self._signature = None

    async def poll_once(self) -> bool:
        """Check the file once; True when a new policy was loaded and handed to on_change."""
        signature = _signature(self.path)
        if signature == self._signature:
            return False
        self._signature = signature
        if signature is None:
            log.warning("policy %s: cannot stat the file; keeping the current policy", self.path)
            return False
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            log.error("policy %s: cannot read (%s); keeping the current policy", self.path, exc)
            return False
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            return False
        self._digest = digest
        try:
            policy = await asyncio.to_thread(
                parse_policy_text,
                data.decode("utf-8", errors="replace"),
                str(self.path),
                self.path.resolve().parent,
            )
        except PolicyError as exc:
            log.error("policy reload rejected; keeping the current policy:\n%s", exc)
            return False
        self.policy = policy
        for warning in policy.warnings:
            log.warning("%s", warning)
        self.on_change(policy)
        log.info("policy reloaded from %s (%d workspaces)", self.path, len(policy.workspaces))
        return True

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:
                log.exception("policy watcher: unexpected error; keeping the current policy")
            await asyncio.sleep(self.interval)
