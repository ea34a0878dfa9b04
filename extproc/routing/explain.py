"""What the routing rules would do to a made-up request, in words (`extproc route`).

Kept apart from `decide`, which runs on every request: this module only describes a
decision for people, stage by stage, with the settings and rules that shaped it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal
from typing import Any

from extproc.governance.keys import Identity
from extproc.governance.policy import (
    Policy,
    RoutingSettings,
)
from extproc.metering.prices import NANOS_PER_DOLLAR, usd_for_people
from extproc.routing.decide import (
    BUDGET_LEVELS,
    BudgetState,
    Traits,
    conditions,
    decide_route,
    rule_mismatch,
)
from extproc.wire.spec import DEFAULT_METERED, METERED_NAMES


def sample_request(
    policy: Policy, sample: Mapping[str, Any]
) -> tuple[Identity, Traits, BudgetState, int]:
    """A made-up request from plain values (what `extproc route` takes); ValueError if unusable.

    Keys: workspace, service, model (required); endpoint (default responses), task,
    input_tokens, tools, reasoning_effort, stream, output_cap, budget (ok/soft/hard),
    overdraft_left_usd (default: the whole overdraft), session_input_tokens.
    """
    workspace, service = str(sample["workspace"]), str(sample["service"])
    ws = policy.workspaces.get(workspace)
    if ws is None:
        raise ValueError(
            f'unknown workspace "{workspace}" (workspaces: {", ".join(policy.workspaces)})'
        )
    svc = ws.services.get(service)
    if svc is None:
        known = ", ".join(ws.services) or "none"
        raise ValueError(f'unknown service "{service}" in {workspace} (services: {known})')
    identity = Identity("key_explain", workspace, svc.team, service, None, 0)
    level = str(sample.get("budget") or "ok")
    if level not in BUDGET_LEVELS:
        raise ValueError(f"budget must be one of {', '.join(BUDGET_LEVELS)}, got {level!r}")
    overdraft = svc.routing.overdraft
    left_usd = sample.get("overdraft_left_usd")
    if left_usd is None:
        left = overdraft.nanos if overdraft else 0
    else:
        left = int(Decimal(str(left_usd)) * NANOS_PER_DOLLAR)
    task = sample.get("task")
    endpoint = str(sample.get("endpoint") or DEFAULT_METERED)
    if endpoint not in METERED_NAMES:
        raise ValueError(f"endpoint must be one of {', '.join(METERED_NAMES)}, got {endpoint!r}")
    traits = Traits(
        endpoint=endpoint,
        workspace=workspace,
        team=svc.team,
        service=service,
        model=str(sample["model"]),
        task=str(task).strip().lower() if task else None,
        tools=bool(sample.get("tools")),
        reasoning_effort=sample.get("reasoning_effort"),
        input_tokens=int(sample.get("input_tokens") or 0),
        stream=bool(sample.get("stream")),
        output_cap=sample.get("output_cap"),
        has_prompt_cache_key=bool(sample.get("has_prompt_cache_key")),
    )
    return identity, traits, BudgetState(level, left), int(sample.get("session_input_tokens") or 0)


def _settings_text(s: RoutingSettings) -> str:
    parts = []
    if s.allowed_models is not None:
        parts.append(f"allowed {', '.join(s.allowed_models)}")
    if s.ceiling_tier is not None:
        parts.append(f"ceiling tier {s.ceiling_tier}")
    if s.default_model is not None:
        parts.append(f"default {s.default_model}")
    if s.degrade_past_soft:
        parts.append("degrade past soft limit")
    if s.overdraft is not None:
        parts.append(f"overdraft {s.overdraft.model} {usd_for_people(s.overdraft.nanos)}")
    if s.max_input_tokens is not None:
        parts.append(f"max input {s.max_input_tokens}")
    if s.max_session_input_tokens is not None:
        parts.append(f"max session input {s.max_session_input_tokens}")
    if s.max_input_tokens is not None or s.max_session_input_tokens is not None:
        parts.append(f"over it: {s.on_context_exceeded}")
    if s.inject_prompt_cache_key:
        parts.append("inject prompt_cache_key")
    return "; ".join(parts) or "none"


def explain(policy: Policy, sample: Mapping[str, Any]) -> str:
    """Which rule fires and what else changes, step by step, for a made-up request."""
    identity, traits, budget, session = sample_request(policy, sample)
    decision = decide_route(policy, identity, traits, budget, session)
    settings = policy.routing_for(identity.workspace, identity.service)
    effort = traits.reasoning_effort or "unset"
    cap = "unset" if traits.output_cap is None else str(traits.output_cap)
    lines = [
        f"request  {traits.endpoint} model={traits.model} workspace={traits.workspace} "
        f"service={traits.service} team={traits.team or '-'}",
        f"         task={traits.task or '-'} input_tokens={traits.input_tokens} "
        f"session_input_tokens={session} reasoning_effort={effort} max_output={cap} "
        f"tools={str(traits.tools).lower()} stream={str(traits.stream).lower()} "
        f"budget={budget.level}",
        f"limits   {_settings_text(settings)}",
    ]
    alias_steps = [s for s in decision.steps if s.kind == "alias"]
    if alias_steps and alias_steps[0].to_model is None:
        lines.append("rules    not evaluated (refused before)")
    elif not policy.routing.rules:
        lines.append("rules    none defined")
    else:
        after_alias = alias_steps[0].to_model if alias_steps else traits.model
        seen = replace(traits, model=after_alias or traits.model)
        for i, rule in enumerate(policy.routing.rules):
            miss = rule_mismatch(rule, seen)
            head = "rules   " if i == 0 else "        "
            if miss is None:
                lines.append(f"{head} [{i}] {rule.name}: MATCH ({conditions(rule.when)})")
                rest = len(policy.routing.rules) - i - 1
                if rest:
                    lines.append(f"         first match wins: {rest} later rule(s) not evaluated")
                break
            lines.append(f"{head} [{i}] {rule.name}: no, {miss}")
        else:
            lines.append("         no rule matched")
    if decision.steps:
        for i, step in enumerate(decision.steps, 1):
            target = "REFUSED" if step.to_model is None else step.to_model
            head = "steps   " if i == 1 else "        "
            lines.append(f"{head} {i}. {step.kind:<9} {step.from_model} -> {target}: {step.why}")
    else:
        lines.append("steps    none: the request is served as sent")
    lines.extend(f"note     {note}" for note in decision.notes)
    if decision.refuse is not None:
        err = decision.refuse
        lines.append(f"result   REFUSED {err.status} {err.code}: {err.message}")
    else:
        extras = []
        if decision.reasoning_effort is not None:
            extras.append(f"reasoning_effort={decision.reasoning_effort}")
        if decision.max_output_tokens is not None:
            extras.append(f"max_output_tokens={decision.max_output_tokens}")
        if decision.route is not None:
            extras.append(f"route={decision.route}")
        if decision.inject_prompt_cache_key:
            extras.append("prompt_cache_key=injected")
        lines.append(" ".join([f"result   serve {decision.model}", *extras]))
    if decision.steps:
        lines.append(f"header   {decision.header_value()}")
    return "\n".join(lines)
