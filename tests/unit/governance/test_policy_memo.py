"""The per-policy memo (`Policy.remember`) and the budget scopes kept in it: derived once per
caller, never shared between callers, gone with the policy they came from."""

from __future__ import annotations

import dataclasses

import pytest

from extproc.governance import budget
from extproc.governance.budget import attribution, plan_request
from extproc.governance.keys import Identity
from extproc.governance.policy import Policy, parse_policy_text
from extproc.governance.policy.model import MEMO_ENTRIES
from extproc.metering.prices import PriceTable
from extproc.store.schema import key_scope, service_scope, team_scope

PRICES = PriceTable.load()
NOW = 1_767_225_600_000


def policy_text(team_budget: int = 50, key_rpm: int = 60) -> str:
    return f"""
version: 1
defaults:
  key_rate_limits: {{rpm: {key_rpm}}}
workspaces:
  dev:
    budget_usd: 100
    upstream: {{key_env: K_DEV}}
    teams:
      platform: {{budget_usd: {team_budget}}}
      web: {{budget_usd: 10}}
    services:
      cli: {{team: platform}}
      ide: {{team: web, key_rate_limits: {{rpm: 5}}}}
"""


def caller(key: str = "key_a", service: str = "cli") -> Identity:
    return Identity(key, "dev", None, service, None, 0)


def plan(policy: Policy, identity: Identity) -> budget.Plan:
    return plan_request(
        policy,
        identity,
        model="gpt-4o-mini",
        counted_input=10,
        output_cap=10,
        prices=PRICES,
        now_ms=NOW,
    )


def test_scopes_are_derived_once_per_caller_and_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = parse_policy_text(policy_text())
    calls: list[Identity] = []
    derive = budget._attribution

    def counting(p: Policy, identity: Identity) -> object:
        calls.append(identity)
        return derive(p, identity)

    monkeypatch.setattr(budget, "_attribution", counting)
    first = plan(policy, caller())
    again = plan(policy, caller())
    assert calls == [caller()]
    assert again.scopes == first.scopes and again.rates == first.rates
    assert again.charged == first.charged and len(first.charged) == len(first.scopes)
    # A reloaded policy (a new object, even an identical one) derives afresh.
    plan(parse_policy_text(policy_text()), caller())
    assert calls == [caller(), caller()]


def test_different_callers_never_share_an_entry() -> None:
    policy = parse_policy_text(policy_text())
    a_scopes, a_rates, a_charged = attribution(policy, caller("key_a"))
    b_scopes, b_rates, _b_charged = attribution(policy, caller("key_b"))
    ide_scopes, ide_rates, _ide_charged = attribution(policy, caller("key_a", service="ide"))
    assert [(c.scope, c.soft_nanos) for c in a_charged] == [
        (s.scope, s.soft_nanos) for s in a_scopes
    ]
    assert [s.scope for s in a_scopes][-1] == key_scope("key_a")
    assert [s.scope for s in b_scopes][-1] == key_scope("key_b")
    assert [r.scope for r in b_rates] == [key_scope("key_b")]
    assert team_scope("platform") in [s.scope for s in a_scopes]
    assert [s.scope for s in ide_scopes][1:3] == [team_scope("web"), service_scope("ide")]
    assert [(r.scope, r.rpm) for r in a_rates] == [(key_scope("key_a"), 60)]
    assert [(r.scope, r.rpm) for r in ide_rates] == [(key_scope("key_a"), 5)]


def test_a_reload_brings_the_new_limits() -> None:
    before = parse_policy_text(policy_text(team_budget=50, key_rpm=60))
    after = parse_policy_text(policy_text(team_budget=20, key_rpm=7))
    old, new = plan(before, caller()), plan(after, caller())
    team = team_scope("platform")
    assert next(s for s in old.scopes if s.scope == team).budget_nanos == 50 * 10**9
    assert next(s for s in new.scopes if s.scope == team).budget_nanos == 20 * 10**9
    assert old.rates[0].rpm == 60 and new.rates[0].rpm == 7
    # The old policy's memo is untouched by the new one's.
    assert plan(before, caller()).scopes == old.scopes


def test_a_copied_policy_starts_with_an_empty_memo() -> None:
    policy = parse_policy_text(policy_text())
    policy.remember("test", "k", lambda: "old")
    copied = dataclasses.replace(policy, warnings=("edited",))
    assert copied.remember("test", "k", lambda: "new") == "new"
    assert policy.remember("test", "k", lambda: "new") == "old"
    # The memo is no part of the policy's value.
    assert dataclasses.replace(policy) == policy


def test_the_memo_is_bounded() -> None:
    policy = parse_policy_text(policy_text())
    for n in range(MEMO_ENTRIES + 5):
        assert policy.remember("test", n, str, n) == str(n)
    assert len(policy._memo["test"]) <= MEMO_ENTRIES
    # Names keep derivations apart: the same key under another name is another value.
    assert policy.remember("other", MEMO_ENTRIES + 4, lambda: "other") == "other"
    assert policy.remember("test", MEMO_ENTRIES + 4, lambda: "x") == str(MEMO_ENTRIES + 4)
