"""Cost shaping: which model serves a request, with which limits, and why.

The platform team's levers on cost are not only budgets but the model a request runs on,
how hard it reasons and how much context it may drag along. `decide_route` turns the
policy's `routing:` section, the caller's merged settings, the request's traits and the
budget's state into one `RouteDecision`, with every change recorded as a `Step` and a
reason, so callers (response header), spans and `extproc route --explain` can all say
exactly why a request was served by another model. It does no I/O and keeps no state.

Order of evaluation; a refusal ends it:

1. alias: the requested name through `routing.aliases`, once. `default` (sent as the model
   or as an alias target) means the caller's `default_model`.
2. rules: the first rule whose conditions all hold (on the model after aliasing) applies;
   later rules are not looked at. `set.model` replaces the model; `set.reasoning_effort` and
   `set.max_output_tokens` are caps that only ever lower what the request asked for;
   `set.route` names the upstream route.
3. ceiling, then allowed models: a model in a tier above `ceiling_tier` becomes the most
   capable allowed model at or below the ceiling: the first one down its own ladder when
   that is in as capable a tier (codex stays codex), else the first allowed model of the
   highest permitted tier. A model outside
   `allowed_models` becomes `default_model`, or is refused (403) when there is none (or
   on embeddings, where a chat model cannot stand in).
   A model in no tier is not subject to the ceiling: pair a ceiling with `allowed_models`.
4. context guard: counted input over `max_input_tokens`, or the session's input so far
   plus this request over `max_session_input_tokens`, is refused (413) or, with
   `on_context_exceeded: downgrade`, served one ladder rung cheaper.
5. budget: past the soft limit with `degrade_past_soft`, one ladder rung down; at the hard
   limit only the `overdraft` model is served while overdraft money is left, otherwise
   the request is refused (429 insufficient_quota).
6. prompt cache: with `inject_prompt_cache_key`, a request without `prompt_cache_key` gets
   one (see `prompt_cache_key`), so a session's re-sent history hits the provider's cache.

Ladder steps skip models the caller is not allowed. Reasoning effort ranks
none < minimal < low < medium < high < xhigh; a request that leaves it unset runs at the
model's default, counted as medium (the GPT-5 family's), so a cap below medium is written
into the request and a cap of medium or above leaves it unset. Effort caps apply to the
Responses and Chat Completions endpoints only, output caps to every endpoint but embeddings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from extproc.governance.keys import Identity
from extproc.governance.policy import (
    DEFAULT_MODEL,
    EFFORTS,
    Policy,
    Routing,
    RoutingSettings,
    Rule,
    RuleMatch,
    model_key,
)
from extproc.metering.prices import usd
from extproc.wire.endpoints import RequestFacts
from extproc.wire.errors import OpenAIError
from extproc.wire.spec import EndpointSpec, metered

BUDGET_LEVELS = ("ok", "soft", "hard")
ASSUMED_EFFORT = "medium"
DOWNGRADE_STEPS = frozenset({"degrade", "overdraft", "context"})
STEP_KINDS = ("alias", "rule", "ceiling", "allowed", "context", "degrade", "overdraft")
_EFFORT_RANK = {effort: rank for rank, effort in enumerate(EFFORTS)}


@dataclass(frozen=True, slots=True)
class Traits:
    """What rules match on: the request as the caller sent it, and who sent it."""

    endpoint: str  # a metered endpoint's name (`wire.spec.METERED_NAMES`)
    workspace: str
    team: str | None
    service: str
    model: str  # as requested, before aliases
    task: str | None = None  # the caller's `x-task` header
    tools: bool = False
    reasoning_effort: str | None = None
    input_tokens: int = 0  # counted by the sidecar
    stream: bool = False
    output_cap: int | None = None  # the request's own output token limit, if any
    has_prompt_cache_key: bool = False


@dataclass(frozen=True, slots=True)
class BudgetState:
    """Where the caller's budget stands: 'ok', 'soft' (past the soft limit) or 'hard'."""

    level: str = "ok"
    overdraft_left_nanos: int = 0

    def __post_init__(self) -> None:
        if self.level not in BUDGET_LEVELS:
            raise ValueError(f"budget level must be one of {', '.join(BUDGET_LEVELS)}")


@dataclass(frozen=True, slots=True)
class Step:
    """One change to the request and its reason. `to_model` None: refused at this step."""

    kind: str  # one of STEP_KINDS
    rule: str | None
    from_model: str
    to_model: str | None
    why: str
    reasoning_effort: str | None = None
    max_output_tokens: int | None = None
    route: str | None = None

    def header_part(self) -> str:
        head = self.kind
        label = self.from_model if self.kind == "alias" else self.rule
        if label:
            head += f":{label}"
        if self.to_model is None:
            head += ">refused"
        elif self.to_model != self.from_model:
            head += f">{self.to_model}"
        extras = []
        if self.reasoning_effort is not None:
            extras.append(f"effort={self.reasoning_effort}")
        if self.max_output_tokens is not None:
            extras.append(f"max_output={self.max_output_tokens}")
        if self.route is not None:
            extras.append(f"route={self.route}")
        return " ".join([head, *extras])


@dataclass(frozen=True, slots=True)
class RouteDecision:
    model: str  # the model to serve (may equal the requested one)
    requested_model: str
    reasoning_effort: str | None  # new value to write, or None: leave as sent
    max_output_tokens: int | None  # new output cap to write, or None: leave as sent
    route: str | None  # upstream route name for `x-extproc-route`
    steps: tuple[Step, ...]
    refuse: OpenAIError | None
    inject_prompt_cache_key: bool = False
    notes: tuple[str, ...] = ()  # what was considered and left alone, for explanations

    @property
    def downgraded(self) -> bool:
        """Served a cheaper model than asked because of budget or context (not by a rule)."""
        return any(step.kind in DOWNGRADE_STEPS for step in self.steps)

    def downgrades(self) -> list[Step]:
        """The downgrade steps that actually changed the model."""
        return [
            s
            for s in self.steps
            if s.kind in DOWNGRADE_STEPS and s.to_model and s.to_model != s.from_model
        ]

    @property
    def changed(self) -> bool:
        """True when the request's body or its upstream route must be rewritten."""
        return (
            self.model != self.requested_model
            or self.reasoning_effort is not None
            or self.max_output_tokens is not None
            or self.route is not None
            or self.inject_prompt_cache_key
        )

    def header_value(self) -> str:
        """Compact, ASCII: "alias:codex-default>gpt-5.1-codex; rule:lint-is-cheap>gpt-5-mini"."""
        return "; ".join(step.header_part() for step in self.steps)

    def to_dict(self) -> dict[str, Any]:
        refused = None
        if self.refuse is not None:
            err = self.refuse
            refused = {
                "status": err.status,
                "type": err.type,
                "code": err.code,
                "param": err.param,
                "message": err.message,
            }
        return {
            "model": self.model,
            "requested_model": self.requested_model,
            "reasoning_effort": self.reasoning_effort,
            "max_output_tokens": self.max_output_tokens,
            "route": self.route,
            "inject_prompt_cache_key": self.inject_prompt_cache_key,
            "changed": self.changed,
            "header": self.header_value(),
            "refused": refused,
            "steps": [
                {
                    "kind": s.kind,
                    "rule": s.rule,
                    "from": s.from_model,
                    "to": s.to_model,
                    "why": s.why,
                    "reasoning_effort": s.reasoning_effort,
                    "max_output_tokens": s.max_output_tokens,
                    "route": s.route,
                }
                for s in self.steps
            ],
            "notes": list(self.notes),
        }


# --- building traits ---------------------------------------------------------------------


def traits_for(
    policy: Policy,
    identity: Identity,
    endpoint: str,
    facts: RequestFacts,
    input_tokens: int,
    task: str | None = None,
) -> Traits:
    """Traits from what the data path already knows; the policy's team wins, as in budgets."""
    service = policy.service(identity.workspace, identity.service)
    team = (service.team if service and service.team else None) or identity.team
    return Traits(
        endpoint=endpoint,
        workspace=identity.workspace,
        team=team,
        service=identity.service,
        model=facts.model,
        task=(task or "").strip().lower() or None,
        tools=facts.has_tools,
        reasoning_effort=facts.reasoning_effort,
        input_tokens=input_tokens,
        stream=facts.stream,
        output_cap=facts.output_cap,
        has_prompt_cache_key=facts.prompt_cache_key is not None,
    )


def prompt_cache_key(identity: Identity, session_id: str = "") -> str:
    """A stable cache key per workspace, service and session (else per key); no names leak."""
    return _cache_key(identity.workspace, identity.service, session_id or identity.key_id)


@lru_cache(maxsize=4096)
def _cache_key(workspace: str, service: str, session: str) -> str:
    """Hashed once per conversation: its every turn asks again (a pure function, kept LRU)."""
    basis = "\0".join((workspace, service, session))
    return "extproc-" + hashlib.sha256(basis.encode()).hexdigest()[:24]


# --- rule matching -----------------------------------------------------------------------


def _listed(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(values) + "]"


_Condition = tuple[str, tuple[str, ...] | None, str | None]  # name, wanted (None: any), actual


def _caller_conditions(when: RuleMatch, traits: Traits) -> tuple[_Condition, ...]:
    """The conditions on who calls and where: fixed per caller and endpoint (`caller_rules`)."""
    return (
        ("endpoint", when.endpoint, traits.endpoint),
        ("workspace", when.workspace, traits.workspace),
        ("service", when.service, traits.service),
        ("team", when.team, traits.team),
    )


def rule_mismatch(rule: Rule, traits: Traits) -> str | None:
    """None when every condition of `rule` holds, else the first one that does not."""
    when = rule.when
    listed: tuple[_Condition, ...] = (
        *_caller_conditions(when, traits),
        ("model", when.model, model_key(traits.model)),
        ("task", when.task, traits.task.lower() if traits.task else None),
        ("reasoning_effort", when.reasoning_effort, traits.reasoning_effort),
    )
    for name, wanted, actual in listed:
        if wanted is not None and actual not in wanted:
            shown = traits.model if name == "model" else actual
            return f"{name} is {shown or 'unset'}, not one of {_listed(wanted)}"
    for name, flag, actual_flag in (
        ("tools", when.tools, traits.tools),
        ("stream", when.stream, traits.stream),
    ):
        if flag is not None and flag != actual_flag:
            return f"{name} is {str(actual_flag).lower()}, the rule wants {str(flag).lower()}"
    n = traits.input_tokens
    if when.input_tokens_over is not None and n <= when.input_tokens_over:
        return f"input_tokens {n} is not over {when.input_tokens_over}"
    if when.input_tokens_under is not None and n >= when.input_tokens_under:
        return f"input_tokens {n} is not under {when.input_tokens_under}"
    return None


def conditions(when: RuleMatch) -> str:
    """The rule's conditions for people: "task in [lint, format] and stream"."""
    parts = []
    for name in ("endpoint", "workspace", "service", "team", "model", "task", "reasoning_effort"):
        wanted = getattr(when, name)
        if wanted is not None:
            parts.append(f"{name} in {_listed(wanted)}")
    for name in ("tools", "stream"):
        flag = getattr(when, name)
        if flag is not None:
            parts.append(name if flag else f"no {name}")
    if when.input_tokens_over is not None:
        parts.append(f"input_tokens > {when.input_tokens_over}")
    if when.input_tokens_under is not None:
        parts.append(f"input_tokens < {when.input_tokens_under}")
    return " and ".join(parts) or "every request"


# --- caps --------------------------------------------------------------------------------


def capped_effort(requested: str | None, cap: str) -> str | None:
    """The effort to write under `cap`, or None when the request is already at or below it."""
    if requested is not None and requested not in _EFFORT_RANK:
        return cap  # a value we cannot rank: the cap is the one we can vouch for
    current = _EFFORT_RANK[requested or ASSUMED_EFFORT]
    return cap if _EFFORT_RANK[cap] < current else None


def capped_output(requested: int | None, cap: int) -> int | None:
    return cap if requested is None or requested > cap else None


# --- the decision ------------------------------------------------------------------------


@dataclass(slots=True)
class _Route:
    """The decision while it is being made."""

    routing: Routing
    settings: RoutingSettings
    traits: Traits
    spec: EndpointSpec
    budget: BudgetState
    session_input_tokens: int
    scope: str
    model: str
    candidates: tuple[tuple[int, Rule], ...] = ()  # see `caller_rules`
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    refuse: OpenAIError | None = None
    effort: str | None = None
    output: int | None = None
    route: str | None = None
    inject: bool = False

    def move(self, kind: str, to_model: str, why: str, rule: str | None = None) -> None:
        self.steps.append(Step(kind, rule, self.model, to_model, why))
        self.model = to_model

    def refused(self, kind: str, err: OpenAIError, why: str) -> None:
        self.steps.append(Step(kind, None, self.model, None, why))
        self.refuse = err


def _walk_down(routing: Routing, model: str, ok: Callable[[str], bool]) -> str | None:
    """The first model below `model` on the ladder that satisfies `ok`."""
    seen = {model_key(model)}
    step = routing.step_down(model)
    while step is not None and model_key(step) not in seen:
        if ok(step):
            return step
        seen.add(model_key(step))
        step = routing.step_down(step)
    return None


def _alias(r: _Route) -> None:
    requested = r.model
    target = r.routing.aliases.get(requested)
    if requested != DEFAULT_MODEL and target != DEFAULT_MODEL:
        if target is not None:
            r.move("alias", target, f"routing.aliases maps {requested} to {target}")
        return
    via = (
        f"alias {requested} means the caller's default model"
        if target
        else (f'model "{DEFAULT_MODEL}" means the caller\'s default model')
    )
    default = r.settings.default_model
    if default is None:
        message = (
            f"The model '{requested}' stands for a default model, and {r.scope} has none "
            "configured. Name a model explicitly."
        )
        err = OpenAIError(400, message, "invalid_request_error", "model", "model_not_found")
        r.refused("alias", err, f"{via}, but {r.scope} sets no default_model")
        return
    r.move("alias", default, f"{via}: default_model of {r.scope} is {default}")


def _caller_mismatch(when: RuleMatch, traits: Traits) -> bool:
    """True when a condition on who calls, and where, rules the rule out for `traits`."""
    return any(
        wanted is not None and actual not in wanted
        for _name, wanted, actual in _caller_conditions(when, traits)
    )


def _caller_rules(routing: Routing, traits: Traits) -> tuple[tuple[int, Rule], ...]:
    return tuple(
        (index, rule)
        for index, rule in enumerate(routing.rules)
        if not _caller_mismatch(rule.when, traits)
    )


def caller_rules(policy: Policy, traits: Traits) -> tuple[tuple[int, Rule], ...]:
    """The rules (with their place in the list) whose endpoint, workspace, service and team
    conditions `traits` meet: the only ones the request itself can still match.

    Those four are fixed per caller and endpoint, so the list is filtered once per
    (endpoint, workspace, service, team) and kept in the policy's memo, which a reload
    replaces (see `Policy.remember`); each request then checks only what can vary.
    """
    key = (traits.endpoint, traits.workspace, traits.service, traits.team)
    return policy.remember("routing.caller_rules", key, _caller_rules, policy.routing, traits)


def _rules(r: _Route) -> None:
    traits = r.traits
    if r.model != traits.model:  # an alias changed it: rules match the aliased model
        traits = replace(traits, model=r.model)
    for index, rule in r.candidates:
        if rule_mismatch(rule, traits) is None:
            _apply(r, index, rule)
            return


def _apply(r: _Route, index: int, rule: Rule) -> None:
    changes, traits = rule.changes, r.traits
    did: list[str] = []
    to_model = r.model
    if changes.model is not None and model_key(changes.model) != model_key(r.model):
        to_model = changes.model
        did.append(f"model {r.model} -> {to_model}")
    if changes.reasoning_effort is not None:
        cap = changes.reasoning_effort
        if not r.spec.takes_effort:
            did.append(f"reasoning_effort cap {cap} does not apply to {traits.endpoint}")
        else:
            r.effort = capped_effort(traits.reasoning_effort, cap)
            asked = traits.reasoning_effort or f"unset (counted as {ASSUMED_EFFORT})"
            if r.effort is None:
                did.append(f"reasoning_effort {asked} is within the cap {cap}")
            else:
                did.append(f"reasoning_effort {asked} -> {cap}")
    if changes.max_output_tokens is not None:
        cap_n = changes.max_output_tokens
        if not r.spec.takes_output_cap:
            did.append(f"max_output_tokens cap does not apply to {traits.endpoint}")
        else:
            r.output = capped_output(traits.output_cap, cap_n)
            asked = "unset" if traits.output_cap is None else str(traits.output_cap)
            if r.output is None:
                did.append(f"max_output_tokens {asked} is within the cap {cap_n}")
            else:
                did.append(f"max_output_tokens {asked} -> {cap_n}")
    if changes.route is not None:
        r.route = changes.route
        did.append(f"route -> {changes.route}")
    outcome = "; ".join(did) or "it changes nothing (later rules are skipped)"
    why = f"rule {rule.name} (routing.rules[{index}]) matched: {conditions(rule.when)}; {outcome}"
    r.steps.append(Step("rule", rule.name, r.model, to_model, why, r.effort, r.output, r.route))
    r.model = to_model


def _ceiling_and_allowed(r: _Route) -> None:
    s, routing = r.settings, r.routing
    ceiling, tier = s.ceiling_tier, routing.tier_of(r.model)
    if ceiling is not None and tier is None:
        r.notes.append(f"{r.model} is in no tier, so ceiling_tier {ceiling} does not apply")
    if ceiling is not None and tier is not None and tier < ceiling:
        target = _within_ceiling(r, ceiling)
        why = f"{r.model} is in tier {tier}, above ceiling_tier {ceiling} of {r.scope}"
        if target is None:
            message = (
                f"The model '{r.model}' is above the most expensive model class {r.scope} may "
                "use, and no allowed model is within it."
            )
            err = OpenAIError(403, message, "permission_error", "model", "model_not_allowed")
            r.refused("ceiling", err, why + "; no allowed model at or below the ceiling")
            return
        r.move("ceiling", target, f"{why}; lowered to {target}")
    if s.allows(r.model):
        return
    allowed = ", ".join(s.allowed_models or ())
    why = f"{r.model} is not in allowed_models of {r.scope} ({allowed})"
    if not r.spec.stand_in:
        why += f"; default_model cannot stand in on {r.traits.endpoint}"
    elif s.default_model is not None and s.allows(s.default_model):
        r.move("allowed", s.default_model, f"{why}; serving default_model {s.default_model}")
        return
    else:
        why += "; no default_model to fall back to"
    message = f"The model '{r.model}' is not allowed for {r.scope}. Allowed models: {allowed}."
    err = OpenAIError(403, message, "permission_error", "model", "model_not_allowed")
    r.refused("allowed", err, why)


def _within_ceiling(r: _Route, ceiling: int) -> str | None:
    """The most capable allowed model at or below the ceiling, from the model's own ladder
    when that reaches as capable a tier (so codex stays codex)."""
    routing, s = r.routing, r.settings

    def ok(model: str) -> bool:
        tier = routing.tier_of(model)
        return tier is not None and tier >= ceiling and s.allows(model)

    best = next((m for tier in routing.tiers[ceiling:] for m in tier if s.allows(m)), None)
    on_ladder = _walk_down(routing, r.model, ok)
    if on_ladder is not None and (
        best is None or (routing.tier_of(on_ladder) or 0) <= (routing.tier_of(best) or 0)
    ):
        return on_ladder
    return best


def _context(r: _Route) -> None:
    s, n = r.settings, r.traits.input_tokens
    over: list[str] = []
    code = ""
    if s.max_input_tokens is not None and n > s.max_input_tokens:
        over.append(f"{n} input tokens is over max_input_tokens {s.max_input_tokens}")
        code = "input_tokens_over_limit"
    session_total = r.session_input_tokens + n
    cap = s.max_session_input_tokens
    if cap is not None and session_total > cap:
        over.append(
            f"the session's input would reach {session_total} tokens, over "
            f"max_session_input_tokens {cap}"
        )
        code = code or "session_input_tokens_over_limit"
    if not over:
        return
    why = "; ".join(over)
    if s.on_context_exceeded == "downgrade":
        cheaper = _walk_down(r.routing, r.model, s.allows)
        if cheaper is not None:
            r.move("context", cheaper, f"{why}; downgraded one ladder rung")
            return
        why += f"; the ladder has no cheaper allowed model below {r.model}"
    hint = (
        "Start a new session or compact the conversation (Codex CLI: /compact or /new)."
        if code == "session_input_tokens_over_limit"
        else "Send less context, or compact the conversation (Codex CLI: /compact)."
    )
    message = f"This request is over the context limit of {r.scope}: {why}. {hint}"
    r.refused("context", OpenAIError(413, message, "invalid_request_error", "input", code), why)


def _budget(r: _Route) -> None:
    s, level = r.settings, r.budget.level
    if level == "soft":
        if not s.degrade_past_soft:
            r.notes.append(f"past the soft limit; degrade_past_soft is off for {r.scope}")
            return
        cheaper = _walk_down(r.routing, r.model, s.allows)
        if cheaper is None:
            r.notes.append(f"past the soft limit, but no cheaper allowed model below {r.model}")
            return
        r.move("degrade", cheaper, f"past the soft limit: one ladder rung down from {r.model}")
    elif level == "hard":
        od, left = s.overdraft, r.budget.overdraft_left_nanos
        if od is not None and left > 0 and r.spec.stand_in:
            why = (
                f"at the hard limit: only the overdraft model {od.model} is served "
                f"({usd(left, sign=True)} of the {usd(od.nanos, sign=True)} overdraft left)"
            )
            r.move("overdraft", od.model, why)
            return
        if od is None:
            why = f"at the hard limit and {r.scope} has no overdraft"
        elif left <= 0:
            why = f"at the hard limit and the {usd(od.nanos, sign=True)} overdraft is spent"
        else:
            why = f"at the hard limit; the overdraft model cannot serve {r.traits.endpoint}"
        message = f"Budget exhausted for {r.scope}: {why}."
        err = OpenAIError(429, message, "insufficient_quota", None, "insufficient_quota")
        r.refused("overdraft", err, why)


def _prompt_cache(r: _Route) -> None:
    if (
        r.settings.inject_prompt_cache_key
        and r.spec.prompt_cache_key
        and not r.traits.has_prompt_cache_key
    ):
        r.inject = True


_STAGES = (_alias, _rules, _ceiling_and_allowed, _context, _budget, _prompt_cache)


def decide_route(
    policy: Policy,
    identity: Identity,
    traits: Traits,
    budget: BudgetState | None = None,
    session_input_tokens: int = 0,
) -> RouteDecision:
    """The model and limits to serve `traits` with, for the caller `identity` (see module doc).

    `session_input_tokens` is the input already sent in this session, before this request.
    """
    r = _Route(
        routing=policy.routing,
        settings=policy.routing_for(identity.workspace, identity.service),
        traits=traits,
        spec=metered(traits.endpoint),
        budget=budget or BudgetState(),
        session_input_tokens=session_input_tokens,
        scope=f"{identity.workspace}/{identity.service}",
        model=traits.model,
        candidates=caller_rules(policy, traits),
    )
    for stage in _STAGES:
        stage(r)
        if r.refuse is not None:
            break
    return RouteDecision(
        model=r.model,
        requested_model=traits.model,
        reasoning_effort=r.effort,
        max_output_tokens=r.output,
        route=r.route,
        steps=tuple(r.steps),
        refuse=r.refuse,
        inject_prompt_cache_key=r.inject,
        notes=tuple(r.notes),
    )
