"""Cost shaping: aliases, rules, ceilings, context caps and budget degrading, step by step."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.governance.keys import Identity
from extproc.governance.policy import (
    ENDPOINT_NAMES,
    Overdraft,
    Policy,
    PolicyError,
    RoutingSettings,
    load_policy,
    parse_policy_text,
)
from extproc.routing.decide import (
    BudgetState,
    RouteDecision,
    Step,
    Traits,
    caller_rules,
    capped_effort,
    decide_route,
    prompt_cache_key,
    traits_for,
)
from extproc.routing.explain import explain
from extproc.wire.endpoints import RequestFacts
from extproc.wire.spec import METERED

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "policy.yaml"
B = 1_000_000_000

TIERS = [
    ["gpt-5.1-codex", "gpt-5-codex", "gpt-5"],
    ["gpt-5.1-codex-mini", "gpt-5-mini", "gpt-4.1-mini"],
    ["gpt-5-nano", "gpt-4.1-nano"],
]
LADDER = {
    "gpt-5.1-codex": "gpt-5.1-codex-mini",
    "gpt-5-codex": "gpt-5-mini",
    "gpt-5": "gpt-5-mini",
    "gpt-5.1-codex-mini": "gpt-5-nano",
    "gpt-5-mini": "gpt-5-nano",
}
BASE: dict[str, Any] = {
    "version": 1,
    "routing": {
        "aliases": {"codex-default": "gpt-5.1-codex", "house": "default"},
        "tiers": TIERS,
        "ladder": LADDER,
        "upstream_routes": {"azure-eastus": {"description": "batch"}},
        "rules": [],
    },
    "workspaces": {
        "dev": {
            "budget_usd": 100,
            "upstream": {"key_env": "K_DEV"},
            "teams": {"platform": {}, "web": {}},
            "services": {"codex-cli": {"team": "platform"}, "ide": {"team": "web"}},
        },
        "ci": {"budget_usd": 100, "upstream": {"key_env": "K_CI"}, "services": {"bot": {}}},
    },
}


def make_policy(
    rules: list[dict[str, Any]] | None = None,
    dev: dict[str, Any] | None = None,
    service: dict[str, Any] | None = None,
) -> Policy:
    doc = copy.deepcopy(BASE)
    doc["routing"]["rules"] = rules or []
    if dev is not None:
        doc["workspaces"]["dev"]["routing"] = dev
    if service is not None:
        doc["workspaces"]["dev"]["services"]["codex-cli"]["routing"] = service
    return parse_policy_text(yaml.safe_dump(doc, sort_keys=False), "policy.yaml")


def who(workspace: str = "dev", service: str = "codex-cli", team: str | None = "platform"):
    return Identity("key_t", workspace, team, service, None, 0)


def request(model: str = "gpt-5.1-codex", **overrides: Any) -> Traits:
    values: dict[str, Any] = {
        "endpoint": "responses",
        "workspace": "dev",
        "team": "platform",
        "service": "codex-cli",
        "model": model,
    }
    values.update(overrides)
    return Traits(**values)


def route(
    policy: Policy,
    traits: Traits,
    budget: BudgetState | None = None,
    session: int = 0,
) -> RouteDecision:
    identity = who(traits.workspace, traits.service, traits.team)
    return decide_route(policy, identity, traits, budget, session)


NANO = {"model": "gpt-5-nano"}


# --- aliases -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "dev", "served", "header", "refused"),
    [
        ("codex-default", None, "gpt-5.1-codex", "alias:codex-default>gpt-5.1-codex", None),
        ("gpt-5", None, "gpt-5", "", None),
        (
            "default",
            {"default_model": "gpt-5-mini"},
            "gpt-5-mini",
            "alias:default>gpt-5-mini",
            None,
        ),
        ("house", {"default_model": "gpt-5-mini"}, "gpt-5-mini", "alias:house>gpt-5-mini", None),
        ("house", None, "house", "alias:house>refused", "model_not_found"),
        ("default", None, "default", "alias:default>refused", "model_not_found"),
    ],
)
def test_alias_resolution(
    model: str, dev: dict[str, Any] | None, served: str, header: str, refused: str | None
) -> None:
    decision = route(make_policy(dev=dev), request(model))
    assert (decision.model, decision.requested_model) == (served, model)
    assert decision.header_value() == header
    assert (decision.refuse.code if decision.refuse else None) == refused
    if refused:
        assert decision.refuse is not None and decision.refuse.status == 400
        assert decision.refuse.param == "model"


def test_a_request_nothing_applies_to_is_unchanged() -> None:
    decision = route(make_policy(), request("gpt-5"))
    assert decision == RouteDecision("gpt-5", "gpt-5", None, None, None, (), None)
    assert not decision.changed and decision.header_value() == ""


# --- rules: each match key, first match wins ---------------------------------------------

MATCH_CASES: list[tuple[dict[str, Any], dict[str, Any], bool]] = [
    ({}, {}, True),
    ({"endpoint": ["responses"]}, {}, True),
    ({"endpoint": ["chat.completions"]}, {}, False),
    ({"workspace": ["ci"]}, {}, False),
    ({"workspace": ["ci"]}, {"workspace": "ci", "service": "bot", "team": None}, True),
    ({"service": ["ide"]}, {}, False),
    ({"service": ["ide"]}, {"service": "ide", "team": "web"}, True),
    ({"team": ["web"]}, {"service": "ide", "team": "web"}, True),
    ({"team": ["web"]}, {"team": None}, False),
    ({"model": ["gpt-5.1-codex"]}, {"model": "codex-default"}, True),  # after alias
    ({"model": ["gpt-5"]}, {"model": "gpt-5-2025-08-07"}, True),  # snapshot = its model
    ({"model": ["gpt-5"]}, {"model": "GPT-5"}, True),
    ({"model": ["gpt-5"]}, {"model": "gpt-5-mini"}, False),
    ({"task": ["lint", "Format"]}, {"task": "format"}, True),
    ({"task": ["lint"]}, {"task": "LINT"}, True),
    ({"task": ["lint"]}, {}, False),
    ({"tools": True}, {"tools": True}, True),
    ({"tools": True}, {}, False),
    ({"tools": False}, {}, True),
    ({"reasoning_effort": ["high", "xhigh"]}, {"reasoning_effort": "xhigh"}, True),
    ({"reasoning_effort": ["high"]}, {"reasoning_effort": "low"}, False),
    ({"reasoning_effort": ["high"]}, {}, False),
    ({"input_tokens_over": 100}, {"input_tokens": 101}, True),
    ({"input_tokens_over": 100}, {"input_tokens": 100}, False),
    ({"input_tokens_under": 100}, {"input_tokens": 99}, True),
    ({"input_tokens_under": 100}, {"input_tokens": 100}, False),
    ({"input_tokens_over": 10, "input_tokens_under": 12}, {"input_tokens": 11}, True),
    ({"stream": True}, {"stream": True}, True),
    ({"stream": True}, {}, False),
    ({"endpoint": ["responses"], "task": ["lint"]}, {"task": "lint"}, True),  # all must hold
    ({"endpoint": ["responses"], "task": ["lint"]}, {"task": "docs"}, False),
]


@pytest.mark.parametrize(("when", "traits", "matches"), MATCH_CASES)
def test_each_match_key(when: dict[str, Any], traits: dict[str, Any], matches: bool) -> None:
    policy = make_policy([{"name": "r", "when": when, "set": NANO}])
    decision = route(policy, request(**{"model": "gpt-5.1-codex", **traits}))
    fired = [s for s in decision.steps if s.kind == "rule"]
    assert bool(fired) is matches, decision.steps
    if matches:
        assert decision.model == "gpt-5-nano" and fired[0].rule == "r"


def test_first_matching_rule_wins_and_later_rules_are_skipped() -> None:
    rules = [
        {"name": "lint", "when": {"task": ["lint"]}, "set": {"model": "gpt-5-mini"}},
        {"name": "all-codex", "when": {}, "set": {"model": "gpt-5-codex"}},
        {"name": "never", "when": {"task": ["lint"]}, "set": NANO},
    ]
    policy = make_policy(rules)
    assert route(policy, request(task="lint")).header_value() == "rule:lint>gpt-5-mini"
    assert route(policy, request()).header_value() == "rule:all-codex>gpt-5-codex"


def test_an_empty_set_is_an_exemption_from_later_rules() -> None:
    rules = [
        {"name": "vip", "when": {"service": ["ide"]}, "set": {}},
        {"name": "cheap", "when": {}, "set": NANO},
    ]
    policy = make_policy(rules)
    vip = route(policy, request(service="ide", team="web"))
    assert vip.model == "gpt-5.1-codex" and not vip.changed
    assert vip.header_value() == "rule:vip" and "changes nothing" in vip.steps[0].why
    assert route(policy, request()).model == "gpt-5-nano"


# --- rules: each set key; caps only lower -------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "traits", "expected"),
    [
        ({"reasoning_effort": "medium"}, {"reasoning_effort": "high"}, ("medium", None)),
        ({"reasoning_effort": "medium"}, {"reasoning_effort": "xhigh"}, ("medium", None)),
        ({"reasoning_effort": "medium"}, {"reasoning_effort": "low"}, (None, None)),
        ({"reasoning_effort": "medium"}, {"reasoning_effort": "medium"}, (None, None)),
        ({"reasoning_effort": "medium"}, {}, (None, None)),  # unset counts as medium
        ({"reasoning_effort": "low"}, {}, ("low", None)),
        ({"reasoning_effort": "minimal"}, {"reasoning_effort": "none"}, (None, None)),
        ({"reasoning_effort": "low"}, {"reasoning_effort": "turbo"}, ("low", None)),
        ({"reasoning_effort": "low"}, {"endpoint": "completions"}, (None, None)),
        ({"reasoning_effort": "low"}, {"endpoint": "chat.completions"}, ("low", None)),
        ({"max_output_tokens": 1000}, {}, (None, 1000)),
        ({"max_output_tokens": 1000}, {"output_cap": 5000}, (None, 1000)),
        ({"max_output_tokens": 1000}, {"output_cap": 1000}, (None, None)),
        ({"max_output_tokens": 1000}, {"output_cap": 200}, (None, None)),
        ({"max_output_tokens": 1000}, {"endpoint": "embeddings"}, (None, None)),
        ({"max_output_tokens": 1000}, {"endpoint": "completions"}, (None, 1000)),
    ],
)
def test_effort_and_output_caps_only_lower(
    changes: dict[str, Any], traits: dict[str, Any], expected: tuple[str | None, int | None]
) -> None:
    policy = make_policy([{"name": "cap", "when": {}, "set": changes}])
    decision = route(policy, request(**traits))
    assert (decision.reasoning_effort, decision.max_output_tokens) == expected
    assert decision.model == "gpt-5.1-codex"
    assert decision.changed is (expected != (None, None))


def test_effort_order() -> None:
    ladder = ["none", "minimal", "low", "medium", "high", "xhigh"]
    for i, cap in enumerate(ladder):
        for j, asked in enumerate(ladder):
            assert capped_effort(asked, cap) == (cap if i < j else None)


def test_set_model_and_route() -> None:
    rules = [{"name": "batch", "when": {}, "set": {"model": "gpt-5", "route": "azure-eastus"}}]
    decision = route(make_policy(rules), request("gpt-5-mini"))
    assert (decision.model, decision.route) == ("gpt-5", "azure-eastus")  # a set may raise
    assert decision.header_value() == "rule:batch>gpt-5 route=azure-eastus"
    same = route(make_policy(rules), request("GPT-5"))
    assert same.model == "GPT-5" and same.header_value() == "rule:batch route=azure-eastus"


# --- allowed models and the ceiling -------------------------------------------------------

ALLOWED_CASES: list[tuple[dict[str, Any], Traits, str, str, str | None]] = [
    # ceiling 1: down the model's own ladder
    ({"ceiling_tier": 1}, request("gpt-5.1-codex"), "gpt-5.1-codex-mini", "ceiling", None),
    ({"ceiling_tier": 1}, request("gpt-5-codex"), "gpt-5-mini", "ceiling", None),
    ({"ceiling_tier": 2}, request("gpt-5.1-codex"), "gpt-5-nano", "ceiling", None),
    ({"ceiling_tier": 1}, request("gpt-5-mini"), "gpt-5-mini", "", None),
    # the ladder's allowed rung is a tier lower than an allowed model of the ceiling tier
    (
        {"ceiling_tier": 1, "allowed_models": ["gpt-5-mini", "gpt-5-nano"]},
        request("gpt-5.1-codex"),
        "gpt-5-mini",
        "ceiling",
        None,
    ),
    ({"ceiling_tier": 1}, request("gpt-4o"), "gpt-4o", "", None),  # in no tier
    (
        {"ceiling_tier": 2, "allowed_models": ["gpt-5.1-codex"]},
        request("gpt-5.1-codex"),
        "gpt-5.1-codex",
        "ceiling",
        "model_not_allowed",
    ),
    (
        {"allowed_models": ["gpt-5-mini", "gpt-5-nano"], "default_model": "gpt-5-mini"},
        request("o3"),
        "gpt-5-mini",
        "allowed",
        None,
    ),
    ({"allowed_models": ["gpt-5-mini"]}, request("o3"), "o3", "allowed", "model_not_allowed"),
    (
        {"allowed_models": ["gpt-5-mini"]},
        request("gpt-5-mini-2025-08-07"),
        "gpt-5-mini-2025-08-07",
        "",
        None,
    ),
    (
        {"allowed_models": ["gpt-5-mini", "text-embedding-3-small"], "default_model": "gpt-5-mini"},
        request("text-embedding-3-large", endpoint="embeddings"),
        "text-embedding-3-large",
        "allowed",
        "model_not_allowed",
    ),
]


@pytest.mark.parametrize(("dev", "traits", "served", "kind", "refused"), ALLOWED_CASES)
def test_allowed_models_and_ceiling(
    dev: dict[str, Any], traits: Traits, served: str, kind: str, refused: str | None
) -> None:
    decision = route(make_policy(dev=dev), traits)
    assert decision.model == served
    assert [s.kind for s in decision.steps] == ([kind] if kind else [])
    assert (decision.refuse.code if decision.refuse else None) == refused
    if refused:
        assert decision.refuse is not None and decision.refuse.status == 403
        assert decision.steps[-1].to_model is None


def test_a_model_in_no_tier_is_noted_under_a_ceiling() -> None:
    decision = route(make_policy(dev={"ceiling_tier": 1}), request("gpt-4o"))
    assert decision.notes == ("gpt-4o is in no tier, so ceiling_tier 1 does not apply",)


def test_rules_run_before_the_ceiling_and_allowed_models() -> None:
    rules = [{"name": "up", "when": {}, "set": {"model": "gpt-5.1-codex"}}]
    decision = route(make_policy(rules, dev={"ceiling_tier": 1}), request("gpt-5-nano"))
    assert decision.header_value() == "rule:up>gpt-5.1-codex; ceiling>gpt-5.1-codex-mini"


# --- context guard ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dev", "model", "tokens", "session", "served", "code"),
    [
        ({"max_input_tokens": 1000}, "gpt-5", 1000, 0, "gpt-5", None),
        ({"max_input_tokens": 1000}, "gpt-5", 1001, 0, "gpt-5", "input_tokens_over_limit"),
        ({"max_session_input_tokens": 1000}, "gpt-5", 100, 900, "gpt-5", None),
        (
            {"max_session_input_tokens": 1000},
            "gpt-5",
            101,
            900,
            "gpt-5",
            "session_input_tokens_over_limit",
        ),
        (
            {"max_input_tokens": 1000, "on_context_exceeded": "downgrade"},
            "gpt-5.1-codex",
            5000,
            0,
            "gpt-5.1-codex-mini",
            None,
        ),
        (
            {"max_input_tokens": 1000, "on_context_exceeded": "downgrade"},
            "gpt-5-nano",
            5000,
            0,
            "gpt-5-nano",
            "input_tokens_over_limit",
        ),
        (
            {
                "max_input_tokens": 1000,
                "on_context_exceeded": "downgrade",
                "allowed_models": ["gpt-5.1-codex", "gpt-5-nano"],
            },
            "gpt-5.1-codex",
            5000,
            0,
            "gpt-5-nano",  # skips the rung the caller may not use
            None,
        ),
    ],
)
def test_context_guard_reject_and_downgrade(
    dev: dict[str, Any], model: str, tokens: int, session: int, served: str, code: str | None
) -> None:
    decision = route(make_policy(dev=dev), request(model, input_tokens=tokens), session=session)
    assert decision.model == served
    assert (decision.refuse.code if decision.refuse else None) == code
    if code:
        assert decision.refuse is not None and decision.refuse.status == 413
        assert "/compact" in decision.refuse.message
        assert decision.header_value() == "context>refused"
    elif served != model:
        assert decision.header_value() == f"context>{served}"


# --- budget: soft-limit ladder, hard-limit overdraft --------------------------------------

OVERDRAFT = {"overdraft": {"model": "gpt-5-nano", "usd": 5}}


@pytest.mark.parametrize(
    ("dev", "traits", "budget", "served", "header", "code"),
    [
        ({"degrade_past_soft": True}, request(), BudgetState("ok"), "gpt-5.1-codex", "", None),
        (
            {"degrade_past_soft": True},
            request(),
            BudgetState("soft"),
            "gpt-5.1-codex-mini",
            "degrade>gpt-5.1-codex-mini",
            None,
        ),
        ({}, request(), BudgetState("soft"), "gpt-5.1-codex", "", None),
        (
            {"degrade_past_soft": True},
            request("gpt-5-nano"),
            BudgetState("soft"),
            "gpt-5-nano",
            "",
            None,
        ),
        (
            {"degrade_past_soft": True, "allowed_models": ["gpt-5.1-codex", "gpt-5-nano"]},
            request(),
            BudgetState("soft"),
            "gpt-5-nano",
            "degrade>gpt-5-nano",
            None,
        ),
        (
            OVERDRAFT,
            request("gpt-5"),
            BudgetState("hard", 3 * B),
            "gpt-5-nano",
            "overdraft>gpt-5-nano",
            None,
        ),
        (
            OVERDRAFT,
            request("gpt-5-nano"),
            BudgetState("hard", 1),
            "gpt-5-nano",
            "overdraft",
            None,
        ),
        (
            OVERDRAFT,
            request("gpt-5"),
            BudgetState("hard", 0),
            "gpt-5",
            "overdraft>refused",
            "insufficient_quota",
        ),
        (
            {},
            request("gpt-5"),
            BudgetState("hard", 5 * B),
            "gpt-5",
            "overdraft>refused",
            "insufficient_quota",
        ),
        (
            OVERDRAFT,
            request("text-embedding-3-small", endpoint="embeddings"),
            BudgetState("hard", 5 * B),
            "text-embedding-3-small",
            "overdraft>refused",
            "insufficient_quota",
        ),
    ],
)
def test_soft_limit_ladder_and_hard_limit_overdraft(
    dev: dict[str, Any],
    traits: Traits,
    budget: BudgetState,
    served: str,
    header: str,
    code: str | None,
) -> None:
    decision = route(make_policy(dev=dev), traits, budget)
    assert (decision.model, decision.header_value()) == (served, header)
    assert (decision.refuse.code if decision.refuse else None) == code
    if code:
        assert decision.refuse is not None and decision.refuse.status == 429


def test_soft_limit_without_degrading_is_noted() -> None:
    decision = route(make_policy(), request(), BudgetState("soft"))
    assert decision.notes == ("past the soft limit; degrade_past_soft is off for dev/codex-cli",)
    overdraft = route(make_policy(dev=OVERDRAFT), request(), BudgetState("hard", 3 * B))
    assert "$3 of the $5 overdraft left" in overdraft.steps[0].why


def test_budget_state_rejects_unknown_levels() -> None:
    with pytest.raises(ValueError, match="ok, soft, hard"):
        BudgetState("over")


# --- everything together; the header ------------------------------------------------------


def test_every_stage_in_order_and_the_header() -> None:
    rules = [
        {
            "name": "lint-is-cheap",
            "when": {"task": ["lint"]},
            "set": {"model": "gpt-5-codex", "reasoning_effort": "low", "max_output_tokens": 2000},
        }
    ]
    dev = {
        "ceiling_tier": 0,
        "max_input_tokens": 1000,
        "on_context_exceeded": "downgrade",
        "degrade_past_soft": True,
        "inject_prompt_cache_key": True,
    }
    traits = request("codex-default", task="lint", input_tokens=5000, reasoning_effort="high")
    decision = route(make_policy(rules, dev=dev), traits, BudgetState("soft"))
    assert decision.header_value() == (
        "alias:codex-default>gpt-5.1-codex; "
        "rule:lint-is-cheap>gpt-5-codex effort=low max_output=2000; "
        "context>gpt-5-mini; degrade>gpt-5-nano"
    )
    assert [(s.kind, s.from_model, s.to_model) for s in decision.steps] == [
        ("alias", "codex-default", "gpt-5.1-codex"),
        ("rule", "gpt-5.1-codex", "gpt-5-codex"),
        ("context", "gpt-5-codex", "gpt-5-mini"),
        ("degrade", "gpt-5-mini", "gpt-5-nano"),
    ]
    assert (decision.model, decision.requested_model) == ("gpt-5-nano", "codex-default")
    assert (decision.reasoning_effort, decision.max_output_tokens) == ("low", 2000)
    assert decision.inject_prompt_cache_key and decision.refuse is None
    assert decision.header_value().isascii()
    as_json = json.loads(json.dumps(decision.to_dict()))
    assert as_json["header"] == decision.header_value() and len(as_json["steps"]) == 4


def test_a_refusal_stops_evaluation() -> None:
    dev = {"max_input_tokens": 10, "degrade_past_soft": True, "inject_prompt_cache_key": True}
    decision = route(make_policy(dev=dev), request(input_tokens=11), BudgetState("soft"))
    assert [s.kind for s in decision.steps] == ["context"]
    assert not decision.inject_prompt_cache_key and decision.notes == ()


def test_step_header_parts() -> None:
    assert Step("alias", None, "a", "b", "").header_part() == "alias:a>b"
    assert Step("rule", "r", "m", "m", "", route="x").header_part() == "rule:r route=x"
    assert Step("allowed", None, "m", None, "").header_part() == "allowed>refused"


@pytest.mark.parametrize(
    ("traits", "injected"),
    [
        (request(), True),
        (request(has_prompt_cache_key=True), False),
        (request(endpoint="chat.completions"), True),
        (request(endpoint="embeddings"), False),
    ],
)
def test_prompt_cache_key_injection(traits: Traits, injected: bool) -> None:
    policy = make_policy(dev={"inject_prompt_cache_key": True})
    decision = route(policy, traits)
    assert decision.inject_prompt_cache_key is injected
    assert decision.changed is injected
    assert route(make_policy(), traits).inject_prompt_cache_key is False


def test_prompt_cache_key_is_stable_per_session_and_reveals_no_names() -> None:
    key = prompt_cache_key(who(), "sess-1")
    assert key == prompt_cache_key(who(), "sess-1") != prompt_cache_key(who(), "sess-2")
    assert prompt_cache_key(who()) != prompt_cache_key(who(service="ide"))
    assert key.startswith("extproc-") and len(key) <= 64 and "dev" not in key


def test_traits_from_request_facts_use_the_policy_team() -> None:
    facts = RequestFacts("gpt-5", True, 100, None, None, "high", True)
    stale_key = Identity("key_t", "dev", "web", "codex-cli", None, 0)  # key says web
    traits = traits_for(make_policy(), stale_key, "responses", facts, 1234, " Lint ")
    assert traits == Traits(
        endpoint="responses",
        workspace="dev",
        team="platform",
        service="codex-cli",
        model="gpt-5",
        task="lint",
        tools=True,
        reasoning_effort="high",
        input_tokens=1234,
        stream=True,
        output_cap=100,
        has_prompt_cache_key=False,
    )


# --- policy: inheritance and validation ---------------------------------------------------


def test_settings_inherit_defaults_then_workspace_then_service() -> None:
    doc = copy.deepcopy(BASE)
    doc["defaults"] = {"routing": {"inject_prompt_cache_key": True, "max_input_tokens": 1000}}
    dev = doc["workspaces"]["dev"]
    dev["routing"] = {
        "default_model": "gpt-5-mini",
        "overdraft": {"model": "gpt-5-nano", "usd": "2.5"},
    }
    dev["services"]["codex-cli"]["routing"] = {"max_input_tokens": None, "ceiling_tier": 1}
    policy = parse_policy_text(yaml.safe_dump(doc), "policy.yaml")
    assert policy.workspaces["ci"].routing == RoutingSettings(
        inject_prompt_cache_key=True, max_input_tokens=1000
    )
    assert policy.routing_for("dev", "ide") == RoutingSettings(
        default_model="gpt-5-mini",
        overdraft=Overdraft("gpt-5-nano", 2_500_000_000),
        inject_prompt_cache_key=True,
        max_input_tokens=1000,
    )
    codex = policy.routing_for("dev", "codex-cli")
    assert (codex.max_input_tokens, codex.ceiling_tier, codex.default_model) == (
        None,
        1,
        "gpt-5-mini",
    )
    assert policy.routing_for("dev", "unknown-service") == policy.workspaces["dev"].routing
    assert policy.routing_for("nowhere", "x") == RoutingSettings()


def test_routing_vocabulary_is_parsed() -> None:
    policy = make_policy([{"name": "r", "when": {"task": ["Lint"]}, "set": NANO}])
    r = policy.routing
    assert r.aliases == {"codex-default": "gpt-5.1-codex", "house": "default"}
    assert (r.tier_of("gpt-5-mini"), r.tier_of("GPT-5-NANO"), r.tier_of("o3")) == (1, 2, None)
    assert r.step_down("gpt-5.1-codex-2025-11-13") == "gpt-5.1-codex-mini"
    assert r.rules[0].when.task == ("lint",) and r.rules[0].changes.model == "gpt-5-nano"
    assert r.upstream_routes["azure-eastus"].description == "batch"


def test_endpoint_names_match_the_metered_endpoints() -> None:
    assert set(ENDPOINT_NAMES) == {s.name for s in METERED}


R = "routing"
RULE0 = "routing.rules[0]"
WS = "workspaces.dev.routing"


def with_routing(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    node = doc
    *parents, last = path.split("/")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[last] = value
    return doc


def rule(when: Any = None, changes: Any = None, name: str = "r") -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "set": changes if changes is not None else NANO}
    if when is not None:
        body["when"] = when
    return body


def rules_doc(*rules: Any) -> dict[str, Any]:
    return with_routing("routing/rules", list(rules))


def dev_doc(settings: Any, service: Any = None) -> dict[str, Any]:
    doc = with_routing("workspaces/dev/routing", settings)
    if service is not None:
        doc["workspaces"]["dev"]["services"]["codex-cli"]["routing"] = service
    return doc


INVALID: list[tuple[dict[str, Any], str]] = [
    (with_routing("routng", {}), 'routng: unknown field (did you mean "routing"?)'),
    (
        with_routing("budgets", 1),
        "budgets: unknown field (known: version, timezone, defaults, workspaces, alerts, console) "
        "(feature sections: routing)",
    ),
    (with_routing("routing/rulez", []), 'routing.rulez: unknown field (did you mean "rules"?)'),
    (
        with_routing("routing/aliases/default", "gpt-5"),
        'routing.aliases.default: "default" is built in',
    ),
    (
        with_routing("routing/aliases/x", "codex-default"),
        "routing.aliases.x: points at another alias",
    ),
    (
        with_routing("routing/aliases/x", "two words"),
        'routing.aliases.x: not a model id: "two words"',
    ),
    (
        with_routing("routing/tiers", "gpt-5"),
        'routing.tiers: must be a list of model lists, got "gpt-5"',
    ),
    (with_routing("routing/tiers", [[]]), "routing.tiers[0]: must be a non-empty list of models"),
    (
        with_routing("routing/tiers", [["gpt-5"], ["GPT-5"]]),
        'routing.tiers[1][0]: model "GPT-5" is already in tier 0',
    ),
    (with_routing("routing/ladder/gpt-5", "gpt-5"), "routing.ladder.gpt-5: steps down to itself"),
    (
        with_routing("routing/ladder/gpt-5-nano", "gpt-5"),
        "routing.ladder.gpt-5-nano: climbs from tier 2 to tier 0; a ladder only steps down",
    ),
    (
        with_routing("routing/ladder", {"o3": "o4-mini", "o4-mini": "o3"}),
        "routing.ladder.o3: loops: o3 -> o4-mini -> o3",
    ),
    (
        with_routing("routing/upstream_routes/az", {"cluster": "x"}),
        "routing.upstream_routes.az.cluster: unknown field (known: description)",
    ),
    (with_routing("routing/rules", {"name": "r"}), "routing.rules: must be a list of rules"),
    (rules_doc({"when": {}}), f"{RULE0}.name: required"),
    (rules_doc({"name": "r"}), f"{RULE0}.set: required"),
    (rules_doc(rule(name="has space")), f"{RULE0}.name: must be 1-64 letters"),
    (rules_doc(rule(), rule()), 'routing.rules[1].name: "r" is already the name of rules[0]'),
    (
        rules_doc(rule({"endpont": ["responses"]})),
        f'{RULE0}.when.endpont: unknown field (did you mean "endpoint"?)',
    ),
    (
        rules_doc(rule({"endpoint": ["chat/completions"]})),
        f'{RULE0}.when.endpoint[0]: unknown value "chat/completions" '
        '(did you mean "chat.completions"?)',
    ),
    (
        rules_doc(rule({"task": "lint"})),
        f'{RULE0}.when.task: must be a non-empty list like [a, b], got "lint"',
    ),
    (rules_doc(rule({"task": []})), f"{RULE0}.when.task: must be a non-empty list"),
    (
        rules_doc(rule({"workspace": ["dve"]})),
        f'{RULE0}.when.workspace[0]: unknown workspace "dve" (did you mean "dev"?)',
    ),
    (
        rules_doc(rule({"service": ["codex"]})),
        f'{RULE0}.when.service[0]: unknown service "codex" (did you mean "codex-cli"?) in dev, ci',
    ),
    (
        rules_doc(rule({"workspace": ["ci"], "service": ["codex-cli"]})),
        f'{RULE0}.when.service[0]: unknown service "codex-cli" in ci',
    ),
    (
        rules_doc(rule({"team": ["webb"]})),
        f'{RULE0}.when.team[0]: unknown team "webb" (did you mean "web"?)',
    ),
    (
        rules_doc(rule({"model": ["codex-default"]})),
        f'{RULE0}.when.model[0]: "codex-default" is an alias',
    ),
    (
        rules_doc(rule({"reasoning_effort": ["max"]})),
        f'{RULE0}.when.reasoning_effort[0]: unknown value "max"',
    ),
    (rules_doc(rule({"tools": "yes"})), f'{RULE0}.when.tools: must be true or false, got "yes"'),
    (rules_doc(rule({"stream": 1})), f"{RULE0}.when.stream: must be true or false, got 1"),
    (
        rules_doc(rule({"input_tokens_over": -1})),
        f"{RULE0}.when.input_tokens_over: must be a whole number >= 0",
    ),
    (
        rules_doc(rule({"input_tokens_over": 10, "input_tokens_under": 11})),
        f"{RULE0}.when.input_tokens_under: no token count is over 10 and under 11",
    ),
    (
        rules_doc(rule(changes={"modle": "gpt-5"})),
        f'{RULE0}.set.modle: unknown field (did you mean "model"?)',
    ),
    (rules_doc(rule(changes={"model": "house"})), f'{RULE0}.set.model: "house" is an alias'),
    (
        rules_doc(rule(changes={"model": "default"})),
        f'{RULE0}.set.model: "default" is not a model here',
    ),
    (
        rules_doc(rule(changes={"reasoning_effort": "max"})),
        f"{RULE0}.set.reasoning_effort: must be one of none, minimal",
    ),
    (
        rules_doc(rule(changes={"max_output_tokens": 0})),
        f"{RULE0}.set.max_output_tokens: must be a positive integer",
    ),
    (
        rules_doc(rule(changes={"route": "azure-east"})),
        f'{RULE0}.set.route: unknown route "azure-east" (did you mean "azure-eastus"?)',
    ),
    (
        dev_doc({"allowed": ["gpt-5"]}),
        f'{WS}.allowed: unknown field (did you mean "allowed_models"?)',
    ),
    (dev_doc({"allowed_models": "gpt-5"}), f"{WS}.allowed_models: must be a non-empty list"),
    (dev_doc({"ceiling_tier": 3}), f"{WS}.ceiling_tier: must be a tier index from 0 to 2, got 3"),
    (
        dev_doc({"ceiling_tier": True}),
        f"{WS}.ceiling_tier: must be a tier index from 0 to 2, got true",
    ),
    (dev_doc({"default_model": "default"}), f'{WS}.default_model: "default" is not a model here'),
    (
        dev_doc({"degrade_past_soft": "on"}),
        f'{WS}.degrade_past_soft: must be true or false, got "on"',
    ),
    (dev_doc({"overdraft": {"model": "gpt-5-nano"}}), f"{WS}.overdraft.usd: required"),
    (
        dev_doc({"overdraft": {"model": "gpt-5-nano", "usd": 0}}),
        f"{WS}.overdraft.usd: must be a positive decimal",
    ),
    (dev_doc({"max_input_tokens": 0}), f"{WS}.max_input_tokens: must be a positive integer, got 0"),
    (
        dev_doc({"on_context_exceeded": "truncate"}),
        f'{WS}.on_context_exceeded: must be one of reject, downgrade, got "truncate"',
    ),
    (
        dev_doc({"on_context_exceeded": None}),
        f"{WS}.on_context_exceeded: must be one of reject, downgrade, got null",
    ),
    (
        dev_doc({"allowed_models": ["gpt-5-mini"], "default_model": "gpt-5"}),
        f'{WS}.default_model: default_model "gpt-5" is not in allowed_models (gpt-5-mini)',
    ),
    (
        dev_doc({"ceiling_tier": 1, "overdraft": {"model": "gpt-5", "usd": 1}}),
        f'{WS}.overdraft.model: overdraft.model "gpt-5" is in tier 0, above ceiling_tier 1',
    ),
    (
        dev_doc({"default_model": "gpt-5"}, {"ceiling_tier": 1}),
        'workspaces.dev.services.codex-cli.routing.ceiling_tier: default_model "gpt-5" is in '
        "tier 0, above ceiling_tier 1",
    ),
    (
        dev_doc({"default_model": "gpt-5"}, {"allowed_models": ["gpt-5-mini"]}),
        'workspaces.dev.services.codex-cli.routing.allowed_models: default_model "gpt-5" is not '
        "in allowed_models",
    ),
    (
        with_routing("defaults/routing/ceiling", 1),
        'defaults.routing.ceiling: unknown field (did you mean "ceiling_tier"?)',
    ),
]


@pytest.mark.parametrize(("doc", "expected"), INVALID, ids=[c[1][:70] for c in INVALID])
def test_each_routing_problem_names_the_field(doc: dict[str, Any], expected: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy_text(yaml.safe_dump(doc, sort_keys=False), "policy.yaml")
    problems = info.value.problems
    assert any(p.startswith(f"policy.yaml: {expected}") for p in problems), problems


def test_ceiling_without_tiers_is_an_error() -> None:
    doc = dev_doc({"ceiling_tier": 0})
    doc["routing"]["tiers"] = []
    with pytest.raises(PolicyError, match=r"ceiling_tier: routing\.tiers defines no tiers"):
        parse_policy_text(yaml.safe_dump(doc), "policy.yaml")


def empty_ladder_with_degrading() -> dict[str, Any]:
    doc = dev_doc({"degrade_past_soft": True})
    doc["routing"]["ladder"] = {}
    return doc


@pytest.mark.parametrize(
    ("doc", "warning"),
    [
        (
            with_routing("routing/tiers", [["gpt-9-ultra", "gpt-5"]]),
            'routing.tiers[0][0]: model "gpt-9-ultra" is not in the price table',
        ),
        (
            rules_doc(rule({}, name="all"), rule({"task": ["x"]}, name="later")),
            "routing.rules[1]: never reached: rules[0] (all) matches every request",
        ),
        (
            empty_ladder_with_degrading(),
            f"{WS}.degrade_past_soft: routing.ladder is empty, so nothing can step down",
        ),
    ],
)
def test_routing_warnings(doc: dict[str, Any], warning: str) -> None:
    policy = parse_policy_text(yaml.safe_dump(doc, sort_keys=False), "policy.yaml")
    assert any(w.startswith(f"policy.yaml: {warning}") for w in policy.warnings), policy.warnings


def test_an_unpriced_model_warns_once_at_its_first_use() -> None:
    doc = with_routing("routing/aliases/next", "gpt-9-ultra")
    doc["workspaces"]["dev"]["routing"] = {"default_model": "GPT-9-ultra"}
    policy = parse_policy_text(yaml.safe_dump(doc, sort_keys=False), "policy.yaml")
    unpriced = [w for w in policy.warnings if "gpt-9-ultra" in w.lower()]
    assert len(unpriced) == 1
    assert unpriced[0].startswith(
        'policy.yaml: routing.aliases.next: model "gpt-9-ultra" is not in the price table'
    )
    assert unpriced[0].endswith("(or refused: pricing.unknown_models) (line 6)")


def test_a_policy_without_routing_changes_nothing() -> None:
    doc = copy.deepcopy(BASE)
    del doc["routing"]
    policy = parse_policy_text(yaml.safe_dump(doc), "policy.yaml")
    assert policy.routing.rules == () and policy.routing.aliases == {}
    decision = route(policy, request("codex-default", input_tokens=10**7), BudgetState("soft"))
    assert decision.model == "codex-default" and not decision.steps and not decision.changed


# --- the example policy and the CLI -------------------------------------------------------


def test_example_policy_routing() -> None:
    policy = load_policy(EXAMPLE)
    assert not [w for w in policy.warnings if "routing" in w]
    names = [r.name for r in policy.routing.rules]
    assert names[:3] == ["lint-is-cheap", "huge-context-to-mini", "no-high-effort-in-ci"]
    codex = policy.routing_for("dev", "codex-cli")
    assert codex.on_context_exceeded == "downgrade"  # the service's own
    assert codex.overdraft == Overdraft("gpt-5-nano", 5 * B)  # from the workspace
    assert codex.inject_prompt_cache_key  # from defaults
    assert policy.routing_for("ci", "nightly-refactor").max_input_tokens is None  # lifted
    assert policy.routing_for("prod", "docs-search").default_model == "gpt-5-mini"
    lint = route(policy, request("codex-default", task="lint"))
    assert lint.header_value() == (
        "alias:codex-default>gpt-5.1-codex; rule:lint-is-cheap>gpt-5.1-codex-mini effort=low"
    )


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_explain_shows_the_rule_and_each_step() -> None:
    done = run_cli(
        "route", "--explain", "--workspace", "dev", "--service", "codex-cli",
        "--model", "codex-default", "--task", "lint", "--budget", "soft",
        "--policy", str(EXAMPLE),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "[0] lint-is-cheap: MATCH (task in [lint, format])" in out
    assert "1. alias     codex-default -> gpt-5.1-codex" in out
    assert "2. rule      gpt-5.1-codex -> gpt-5.1-codex-mini" in out
    assert "3. degrade   gpt-5.1-codex-mini -> gpt-5-nano" in out
    assert "result   serve gpt-5-nano reasoning_effort=low" in out
    assert explain(load_policy(EXAMPLE), {
        "workspace": "dev", "service": "codex-cli", "model": "codex-default", "task": "lint",
        "budget": "soft",
    }) == out.rstrip("\n")  # fmt: skip


def test_cli_json_and_exit_codes() -> None:
    refused = run_cli(
        "route", "--json", "--workspace", "prod", "--service", "docs-search", "--endpoint",
        "embeddings", "--model", "text-embedding-3-large", "--policy", str(EXAMPLE),
    )  # fmt: skip
    assert refused.returncode == 1, refused.stderr
    body = json.loads(refused.stdout)
    assert body["refused"]["status"] == 403 and body["refused"]["code"] == "model_not_allowed"
    assert body["header"] == "allowed>refused"
    overdraft = run_cli(
        "route", "--workspace", "dev", "--service", "codex-cli", "--model", "gpt-5.1-codex",
        "--budget", "hard", "--overdraft-left", "0", "--policy", str(EXAMPLE),
    )  # fmt: skip
    assert overdraft.returncode == 1 and "refused 429 insufficient_quota" in overdraft.stdout
    unknown = run_cli("route", "--workspace", "qa", "--service", "x", "--model", "m",
                      "--policy", str(EXAMPLE))  # fmt: skip
    assert unknown.returncode == 2 and 'unknown workspace "qa"' in unknown.stderr


def test_check_config_accepts_the_example() -> None:
    done = run_cli("check-config", str(EXAMPLE))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: 3 workspaces")


# --- rules kept per caller ------------------------------------------------------------------


def test_rules_for_one_caller_are_filtered_once_and_never_reach_another() -> None:
    rules = [
        {"name": "web-only", "when": {"team": ["web"]}, "set": NANO},
        {"name": "ci-only", "when": {"workspace": ["ci"]}, "set": {"model": "gpt-5-mini"}},
        {"name": "lint", "when": {"task": ["lint"]}, "set": {"model": "gpt-5-mini"}},
    ]
    policy = make_policy(rules)
    web = request(team="web", service="ide")
    platform = request()
    assert [rule.name for _i, rule in caller_rules(policy, web)] == ["web-only", "lint"]
    assert [i for i, _rule in caller_rules(policy, platform)] == [2]
    assert caller_rules(policy, web) is caller_rules(policy, web)  # kept, not rebuilt
    assert route(policy, web).header_value() == "rule:web-only>gpt-5-nano"
    assert route(policy, platform).header_value() == ""
    assert route(policy, request(task="lint")).header_value() == "rule:lint>gpt-5-mini"
    bot = request(workspace="ci", team=None, service="bot", endpoint="chat.completions")
    assert route(policy, bot).header_value() == "rule:ci-only>gpt-5-mini"


def test_a_reloaded_policy_brings_its_own_rules() -> None:
    before = make_policy([{"name": "old", "when": {"team": ["platform"]}, "set": NANO}])
    after = make_policy([{"name": "new", "when": {"team": ["platform"]}, "set": NANO}])
    assert route(before, request()).header_value() == "rule:old>gpt-5-nano"
    assert route(after, request()).header_value() == "rule:new>gpt-5-nano"
    assert route(before, request()).header_value() == "rule:old>gpt-5-nano"


def test_rules_match_the_aliased_model() -> None:
    rules = [{"name": "codex", "when": {"model": ["gpt-5.1-codex"]}, "set": NANO}]
    policy = make_policy(rules)
    assert route(policy, request("codex-default")).header_value() == (
        "alias:codex-default>gpt-5.1-codex; rule:codex>gpt-5-nano"
    )
