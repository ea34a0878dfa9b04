"""What a loaded policy is: plain frozen dataclasses, read on every request.

Nothing here parses or validates; `load` builds these from YAML and guarantees every
value in them was checked.
"""

from __future__ import annotations

import os
import re
import zoneinfo
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from extproc.governance.passthrough import DEFAULT as DEFAULT_PASSTHROUGH
from extproc.governance.passthrough import PassthroughPolicy
from extproc.governance.pricing import DEFAULT as DEFAULT_PRICING
from extproc.governance.pricing import PricingPolicy
from extproc.metering.prices import NANOS_PER_DOLLAR

VERSION = 1
MEMO_ENTRIES = 4096
"""Entries per memo of a policy (see `Policy.remember`) before it starts over: callers are
keys, and a flood of distinct keys must not grow a memo without end."""
_T = TypeVar("_T")
PERIODS = ("month", "week", "day")
ON_REDIS_DOWN = ("closed", "open")
TOPUP_EVENTS = frozenset({"topup_requested", "topup_approved", "topup_denied", "topup_expired"})
BREAKER_EVENTS = frozenset({"key_paused", "key_resumed"})
ALERT_EVENTS = frozenset(
    {"soft_limit", "hard_limit", "burn_rate", "reconcile_drift", "unknown_model"}
    | TOPUP_EVENTS
    | BREAKER_EVENTS
)
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
_TOP = ("version", "timezone", "defaults", "workspaces", "alerts", "console")
# Feature sections come after the core ones and are named apart in "unknown field" hints.
_FEATURE_SECTIONS = ("routing",)
_DEFAULT_FIELDS = (
    *_DEFAULTS,
    "key_rate_limits",
    "routing",
    "passthrough",
    "pricing",
    "topups",
    "breaker",
)
_WORKSPACE_FIELDS = (
    "budget_usd",
    *_DEFAULT_FIELDS,
    "upstream",
    "rate_limits",
    "teams",
    "services",
    "contact",
    "approvers",
)
_TEAM_FIELDS = ("budget_usd", "rate_limits", "contact", "approvers")
_SERVICE_FIELDS = ("team", "budget_usd", "rate_limits", "key_rate_limits", "routing", "breaker")
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
# Who may use the console, from the groups an identity provider puts in a claim.
CONSOLE_ROLES = ("admin", "viewer")
DEFAULT_ROLES_CLAIM = "groups"
MAX_PERSONAL_KEY_DAYS = 366
_CONSOLE_FIELDS = ("roles_claim", "roles", "personal_keys")
_PERSONAL_KEY_FIELDS = ("groups", "workspace", "services", "max_days")
_APPROVER_FIELDS = ("people", "groups", "webhook")
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
class Approvers:
    """Who may approve a scope's top-ups: named people (email or subject) and groups.

    People are kept lower-cased: an email address is compared case-insensitively.
    """

    people: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    # Where their scope's top-up requests (and its keys' pauses) are announced: a
    # Slack-compatible incoming webhook of the approvers' channel.
    webhook: str | None = None


BREAKER_MODES = ("enforce", "dry_run", "off")
MAX_TOPUP_DAYS = 366


@dataclass(frozen=True, slots=True)
class Breaker:
    """The runaway breaker's rules for one caller, merged defaults -> workspace -> service.

    A rule whose threshold is None is off. See docs/topups.md for why these defaults.
    """

    mode: str = "enforce"  # "dry_run": report what would trip, pause nothing; "off"
    repeat_more_than: int | None = 20  # the same request more than this many times...
    repeat_minutes: int = 10  # ...within this many minutes
    rate_multiple: Decimal | None = Decimal(10)  # recent pace above this x the key's busiest hour
    rate_minutes: int = 10  # the recent window
    rate_min_nanos: int = 5 * NANOS_PER_DOLLAR  # and at least this much spent in it
    growth_tokens: int | None = 300_000  # a session's per-turn input past this...
    growth_turns: int = 5  # ...after growing this many turns in a row

    @property
    def window_ms(self) -> int:
        """The longest look back any of its rules needs."""
        return max(self.repeat_minutes, self.rate_minutes) * 60_000


@dataclass(frozen=True, slots=True)
class AutoApprove:
    """Requests from these services under `under_nanos` are granted at once, up to
    `period_max_nanos` granted that way per scope and budget period."""

    services: frozenset[str]
    under_nanos: int
    period_max_nanos: int


@dataclass(frozen=True, slots=True)
class Topups:
    """How much one top-up request may ask for, for how long, and who is told."""

    max_nanos: int | None = None  # one request's largest amount; None: the workspace budget
    max_days: int = 31
    auto_approve: AutoApprove | None = None
    # URL prefixes a requester's own notification webhook must start with (their Slack).
    requester_webhooks: tuple[str, ...] = ("https://hooks.slack.com/",)


@dataclass(frozen=True, slots=True)
class PersonalKeyGrant:
    """Members of `groups` may mint keys of their own for these services, for at most
    `max_days` each (`services` lists them all when the policy named none)."""

    groups: frozenset[str]
    workspace: str
    services: tuple[str, ...]
    max_days: int


@dataclass(frozen=True, slots=True)
class ConsoleAccess:
    """The `console:` section: which groups hold which console role, read from which
    claim, and which groups may mint personal keys where. Empty: only admin tokens."""

    roles_claim: str = DEFAULT_ROLES_CLAIM
    roles: dict[str, frozenset[str]] = field(default_factory=dict)
    personal_keys: tuple[PersonalKeyGrant, ...] = ()


@dataclass(frozen=True, slots=True)
class Team:
    name: str
    budget_nanos: int | None
    rate_limits: RateLimits | None
    # Whom a refused developer should ask (a channel, an email): shown in every refusal.
    contact: str | None = None
    approvers: Approvers | None = None


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
    # The runaway breaker's rules for this service's keys, merged the same way.
    breaker: Breaker = Breaker()


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
    # Which other OpenAI endpoints this workspace may call through the gateway.
    passthrough: PassthroughPolicy = DEFAULT_PASSTHROUGH
    # Unknown models (refuse or admit provisionally) and the tool calls a reservation holds.
    pricing: PricingPolicy = DEFAULT_PRICING
    # Who may approve this workspace's top-ups (and its teams').
    approvers: Approvers | None = None
    # What a top-up request may ask for here; the breaker's rules for keys of no service.
    topups: Topups = Topups()
    breaker: Breaker = Breaker()

    def breaker_for(self, service: str) -> Breaker:
        """The breaker's rules for a key of `service` (the workspace's when unknown)."""
        svc = self.services.get(service)
        return svc.breaker if svc is not None else self.breaker

    def approvers_of(self, team: str | None) -> list[Approvers]:
        """Who may approve for a scope of `team` (None: the workspace): the team's own
        approvers, then the workspace's (who approve for every team in it)."""
        own = self.teams[team].approvers if team and team in self.teams else None
        return [a for a in (own, self.approvers) if a is not None]

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
    console: ConsoleAccess = field(default_factory=ConsoleAccess)
    # Values derived from this policy alone (see `remember`); never part of its value.
    _memo: dict[str, dict[Any, Any]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def remember(self, name: str, key: Hashable, derive: Callable[..., _T], *args: Any) -> _T:
        """`derive(*args)`, computed once per `key` for as long as this policy is in force.

        The hot path derives per caller what changes only when the policy does (a caller's
        budget scopes, the routing rules that can apply to it); each request would
        otherwise rebuild them. The memo lives on the policy object: a reload builds a new
        Policy, so nothing cached can outlive the policy it came from. `key` must determine
        the result given this policy; `name` keeps different derivations apart. Each memo
        holds at most MEMO_ENTRIES values, then starts over.
        """
        memo = self._memo.get(name)
        if memo is None:
            memo = self._memo.setdefault(name, {})
        try:
            return memo[key]  # type: ignore[no-any-return]
        except KeyError:
            pass
        if len(memo) >= MEMO_ENTRIES:
            memo.clear()
        value = memo[key] = derive(*args)
        return value

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
