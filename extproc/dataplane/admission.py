"""Admission: may this request go, on which model, holding what. Decisions are values.

Every policy decision the data plane applies before forwarding is made here and returned
as an `Admitted` (what was reserved, the route it was reserved for, the output cap to write)
or a `Refusal` (the OpenAI error, its headers, and what was held, if anything). The handlers
only apply them. In order, for a metered request:

1. route (`routing.decide_route`) at the budget level the caller stood at last time;
2. refuse a model nothing prices, if the workspace refuses those (`pricing.unknown_models`);
3. plan the worst case (`governance.budget.plan_request`) and reserve it: the one call to
   the budgets (`Budgets.reserve`), whose seam hides whether the hold is exact or leased.
   Refused at a hard cap with an overdraft configured: route again at the hard level and
   reserve the overdraft model's plan with every cap raised by the overdraft, once;
4. a denial becomes its refusal through `guard.denial` (the one mapping from a decision's
   reason to what the caller is told; a new reason is added there), a budget's with the
   link to ask for a top-up (live top-ups already raised the caps `reserve` checked);
5. the session guard, known only from the reservation's running total: route again with
   the session's input so far, refused (its hold released by the refusal's settlement) or
   downgraded;
6. the output cap to write when the workspace enforces `default_output_cap`.

A priced passthrough call is held the same way (`hold`), with the policy's output ceiling
in place of an output cap and the overdraft only for a call that names the overdraft
model. A paused key (the runaway breaker's, or a person's) is refused as soon as the
caller is known (`paused`), before anything else. Redis being down is decided here too:
the budgets answer per the workspace's `on_redis_down`, a failed key lookup or revocation
check becomes a refusal or a pass.

Every hold carries its orphan settlement (`settle.metered_orphan`), handed to `reserve`
as a value: what any replica bills if this one dies before settling.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from extproc.dataplane.deps import Deps
from extproc.dataplane.settle import metered_orphan, passthrough_orphan
from extproc.governance import guard
from extproc.governance.budget import (
    Decision,
    Plan,
    overdraft_left,
    per_choice_cap,
    plan_request,
    with_overdraft,
)
from extproc.governance.keys import Identity
from extproc.governance.policy import Policy, Workspace, model_key
from extproc.metering.decisions import Observed, PreparedRequest
from extproc.metering.passthrough import PassthroughSeen
from extproc.metering.worstcase import is_priced
from extproc.routing.decide import BudgetState, RouteDecision, Traits, decide_route, traits_for
from extproc.wire.endpoints import RequestFacts
from extproc.wire.errors import OpenAIError, upstream_credential_missing
from extproc.wire.spec import EndpointSpec

log = logging.getLogger("extproc.dataplane.admission")


@dataclass(frozen=True, slots=True)
class Admitted:
    """The request may go: what was reserved for it, and how it goes."""

    plan: Plan
    decision: Decision
    route: RouteDecision | None = None  # metered: the route the hold was made for
    output_cap: int | None = None  # per output, to write (the workspace enforces its default)


@dataclass(frozen=True, slots=True)
class Refusal:
    """The request is answered here and never forwarded."""

    error: OpenAIError
    headers: Mapping[str, str] = field(default_factory=dict)
    plan: Plan | None = None  # the plan a refused reservation was for (its charges)
    decision: Decision | None = None  # the budgets' decision, if one was made


def paused(deps: Deps, identity: Identity) -> Refusal | None:
    """A key the runaway breaker (or a person) paused goes nowhere until it is resumed: the
    403 made when the pause was learnt (`governance.live`), found by one dictionary probe."""
    error = deps.paused.get(identity.key_id) if deps.paused else None
    return None if error is None else Refusal(error)


def upstream_key(deps: Deps, identity: Identity) -> str | Refusal:
    """The workspace's real provider key, or the 503 that says it is missing."""
    key = deps.upstream_keys.get(identity.workspace)
    if key:
        return key
    missing = deps.upstream_missing.get(identity.workspace, "not configured")
    return Refusal(upstream_credential_missing(identity.workspace, missing))


def key_store_down(deps: Deps) -> Refusal:
    """The key store could not be asked: nobody is let through unidentified."""
    decision = Decision(False, "redis_down")
    error, headers = guard.denial(decision, None, deps.timezone)
    return Refusal(error, headers, decision=decision)


async def revocation(deps: Deps, identity: Identity) -> Refusal | None:
    """Free and unpriced passthrough calls hold no reservation, so the budget scripts'
    revocation check never runs for them: the revoked set is asked directly, so a revocation
    is immediate here too. Unanswerable: the workspace's `on_redis_down` decides."""
    keys = deps.keys
    assert keys is not None
    try:
        revoked = await keys.is_revoked(identity)
    except Exception:
        log.exception("revocation check failed")
        if _workspace(deps, identity).on_redis_down == "open":
            return None
        return key_store_down(deps)
    return Refusal(guard.UNKNOWN_KEY) if revoked else None


def passthrough_refusal(deps: Deps, identity: Identity, spec: EndpointSpec) -> Refusal | None:
    """Why the caller's workspace may not call this passthrough endpoint, if it may not."""
    error = _workspace(deps, identity).passthrough.refusal(spec)
    return None if error is None else Refusal(error)


def unreadable(deps: Deps, error: OpenAIError) -> Refusal | None:
    """A body we cannot read: refused, or (`bad_request: pass`) forwarded unmetered."""
    return None if deps.settings.bad_request == "pass" else Refusal(error)


async def admit(
    deps: Deps, identity: Identity, seen: Observed, prepared: PreparedRequest, task: str | None
) -> Admitted | Refusal:
    """Route, plan and reserve a metered request (see the module docstring)."""
    policy, budgets = deps.policy, deps.budgets
    assert policy is not None and budgets is not None
    ws = _workspace(deps, identity)
    facts = prepared.facts
    traits = traits_for(
        policy, identity, seen.endpoint, facts, prepared.counted_input_tokens, task=task
    )
    route = decide_route(policy, identity, traits, BudgetState(budgets.level(identity)))
    if route.refuse is not None:
        return Refusal(route.refuse)
    unpriced = ws.pricing.refusal(route.model, deps.prices)
    if unpriced is not None:
        if deps.new_models is not None:
            deps.new_models.seen(route.model, identity.workspace, admitted=False)
        return Refusal(unpriced)
    now = deps.now_ms()
    fail_open = ws.on_redis_down == "open"
    plan = _plan(deps, policy, identity, prepared, route, now)
    orphan = metered_orphan(deps, identity, seen, route, plan)
    decision = await budgets.reserve(plan, fail_open, now, session=seen.session_id, orphan=orphan)
    settings = policy.routing_for(identity.workspace, identity.service)
    overdraft = settings.overdraft
    if decision.reason == "budget" and overdraft is not None:
        retried = await _overdraft(
            deps, policy, identity, seen, prepared, traits, decision, overdraft.nanos, now,
            fail_open,
        )  # fmt: skip
        if retried is not None:
            route, plan, decision = retried
    if not decision.allowed:
        spec = seen.spec
        asked = None
        if decision.reason == "budget" and spec is not None:
            asked = guard.ask(
                deps.prices,
                plan,
                model=route.model,
                outputs=facts.choices,
                output_param=spec.output_cap_field,
                stated=(route.max_output_tokens or facts.output_cap) is not None,
                source="the workspace's default_output_cap",
            )
        return _denied(deps, plan, decision, asked)
    cap = settings.max_session_input_tokens
    if cap is not None and decision.session_tokens > cap:
        # The session's running total is known only now, from the reservation itself.
        before = decision.session_tokens - prepared.counted_input_tokens
        level = BudgetState(budgets.level(identity))
        guarded = decide_route(policy, identity, traits, level, before)
        if guarded.refuse is not None:
            return Refusal(guarded.refuse, plan=plan, decision=decision)
        route = guarded
    output_cap = None
    if ws.enforce_output_cap and route.max_output_tokens is None and not facts.output_cap:
        # Reserved for default_output_cap over all outputs (`n`, `best_of`): make the
        # upstream stop there too, each output getting its share.
        output_cap = per_choice_cap(ws.default_output_cap, facts.choices)
    return Admitted(plan, decision, route, output_cap)


async def _overdraft(
    deps: Deps,
    policy: Policy,
    identity: Identity,
    seen: Observed,
    prepared: PreparedRequest,
    traits: Traits,
    denial: Decision,
    nanos: int,
    now: int,
    fail_open: bool,
) -> tuple[RouteDecision, Plan, Decision] | None:
    """Refused at a hard cap: the overdraft model, with every cap raised by the overdraft,
    reserved once; None when routing at the hard level refuses (nothing fits)."""
    budget = BudgetState("hard", overdraft_left(denial, nanos))
    retry = decide_route(policy, identity, traits, budget)
    if retry.refuse is not None:
        return None
    plan = with_overdraft(_plan(deps, policy, identity, prepared, retry, now), nanos)
    orphan = metered_orphan(deps, identity, seen, retry, plan)
    assert deps.budgets is not None
    # Exact, never under a lease: the overdraft is what fits beyond the cap, request by request.
    decision = await deps.budgets.reserve(
        plan, fail_open, now, session=seen.session_id, orphan=orphan, exact=True
    )
    return retry, plan, decision


async def hold(
    deps: Deps, identity: Identity, seen: PassthroughSeen, facts: RequestFacts
) -> Admitted | Refusal:
    """Reserve for a priced passthrough call before it is forwarded, like a metered request.

    The hold is the counted input (`seen.counted_input_tokens`) plus
    `passthrough.output_ceiling` output tokens per output, at the named model's rates,
    through the same reservation (budgets, rate limits, revocation; the overdraft for a call
    that already names the overdraft model, since passthrough bodies are never rewritten).
    A model nothing prices is refused unless the workspace allows unpriced calls.
    """
    policy, budgets = deps.policy, deps.budgets
    assert policy is not None and budgets is not None
    ws = _workspace(deps, identity)
    name = seen.endpoint
    if not is_priced(deps.prices, facts.model):
        refusal = ws.passthrough.unpriced_model(name, facts.model)
        if refusal is not None:
            return Refusal(refusal)
    now = deps.now_ms()
    output = ws.passthrough.held_output(name, facts.output_cap)
    plan = plan_request(
        policy,
        identity,
        model=facts.model,
        counted_input=seen.counted_input_tokens,
        output_cap=output,
        prices=deps.prices,
        now_ms=now,
        choices=facts.choices,
    )
    fail_open = ws.on_redis_down == "open"
    orphan = passthrough_orphan(deps, identity, seen, plan)
    decision = await budgets.reserve(plan, fail_open, now, orphan=orphan)
    overdraft = policy.routing_for(identity.workspace, identity.service).overdraft
    if (
        decision.reason == "budget"
        and overdraft is not None
        and model_key(overdraft.model) == model_key(facts.model)
        and overdraft_left(decision, overdraft.nanos) > 0
    ):
        plan = with_overdraft(plan, overdraft.nanos)
        orphan = passthrough_orphan(deps, identity, seen, plan)
        decision = await budgets.reserve(plan, fail_open, now, orphan=orphan, exact=True)
    if not decision.allowed:
        asked = None
        if decision.reason == "budget":
            asked = guard.ask(
                deps.prices,
                plan,
                model=facts.model,
                outputs=facts.choices,
                output_param=None,
                stated=False,
                source=f"passthrough.output_ceiling.{name} ({output:,} per output)",
            )
        return _denied(deps, plan, decision, asked)
    return Admitted(plan, decision)


def _workspace(deps: Deps, identity: Identity) -> Workspace:
    policy = deps.policy
    assert policy is not None
    return policy.workspaces[identity.workspace]


def _plan(
    deps: Deps,
    policy: Policy,
    identity: Identity,
    prepared: PreparedRequest,
    route: RouteDecision,
    now: int,
) -> Plan:
    facts = prepared.facts
    return plan_request(
        policy,
        identity,
        model=route.model,
        counted_input=prepared.counted_input_tokens,
        output_cap=route.max_output_tokens or facts.output_cap,
        prices=deps.prices,
        now_ms=now,
        choices=facts.choices,
        service_tier=facts.service_tier,
        tools=facts.tools,
    )


def _denied(deps: Deps, plan: Plan, decision: Decision, asked: guard.Ask | None) -> Refusal:
    """A denied reservation's refusal; `asked` says what it would have held (budget only).
    A budget refusal links to the gateway's own top-up page (`settings.public_url`)."""
    public = deps.settings.public_url
    error, headers = guard.denial(decision, plan, deps.timezone, asked, public)
    if decision.reason == "budget" and decision.first_denial:
        log.warning("hard limit reached: %s", error.message)
    return Refusal(error, headers, plan, decision)
