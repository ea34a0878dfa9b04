"""The policy's people: `console:` roles and personal-key grants, scopes' `approvers:`, and the
pure functions that answer who may do what."""

from __future__ import annotations

import pytest

from extproc.governance.access import (
    Person,
    approver_scopes,
    groups_from_claims,
    has_access,
    key_choices,
    may_approve,
    personal_key_days,
    roles_of,
)
from extproc.governance.policy import PolicyError, parse_policy_text

POLICY = """
version: 1
workspaces:
  dev:
    budget_usd: 100
    upstream: {key_env: X}
    approvers: {people: [Ana@Example.com], groups: [leads-dev]}
    teams:
      platform: {approvers: {groups: [leads-platform]}}
      data: {}
    services:
      cli: {team: platform}
      etl: {team: data}
  prod:
    budget_usd: 100
    upstream: {key_env: X}
    services:
      api: {}
console:
  roles_claim: roles
  roles: {admin: [platform-admins], viewer: [finance]}
  personal_keys:
    - {groups: [developers], workspace: dev, services: [cli], max_days: 30}
    - {groups: [developers, contractors], workspace: dev, max_days: 7}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        parse_policy_text(text)
    return [p.removeprefix("policy.yaml: ").rsplit(" (line", 1)[0] for p in caught.value.problems]


def test_roles_grants_and_approvers_from_the_policy() -> None:
    policy = parse_policy_text(POLICY)
    assert policy.console.roles_claim == "roles"
    assert roles_of(policy, ["platform-admins"]) == {"admin", "viewer"}  # admin includes viewer
    assert roles_of(policy, ["finance", "other"]) == {"viewer"}
    assert roles_of(policy, ["developers"]) == frozenset() and roles_of(None, ["finance"]) == set()
    # A service named by two grants gets the longer lifetime; a grant without services
    # covers every service of its workspace.
    assert key_choices(policy, ["developers"]) == {("dev", "cli"): 30, ("dev", "etl"): 7}
    assert key_choices(policy, ["contractors"]) == {("dev", "cli"): 7, ("dev", "etl"): 7}
    assert personal_key_days(policy, ["developers"], "prod", "api") is None
    assert personal_key_days(policy, ["finance"], "dev", "cli") is None

    ana = Person("sub-1", "ana@example.com")  # named in person (case-insensitively)
    lead = Person("sub-2", groups=frozenset({"leads-platform"}))
    nobody = Person("sub-3", "x@example.com", groups=frozenset({"finance"}))
    assert may_approve(policy, ana, "dev", None) and may_approve(policy, ana, "dev", "data")
    assert may_approve(policy, lead, "dev", "platform")
    assert not may_approve(policy, lead, "dev", None)  # a team's approver, not the workspace's
    assert not may_approve(policy, lead, "dev", "data")
    assert not may_approve(policy, ana, "prod", None) and not may_approve(policy, ana, "no", None)
    assert approver_scopes(policy, ana) == [("dev", None), ("dev", "platform"), ("dev", "data")]
    assert approver_scopes(policy, lead) == [("dev", "platform")]
    assert approver_scopes(policy, nobody) == []
    assert has_access(policy, nobody) and has_access(policy, lead)
    assert not has_access(policy, Person("sub-4", groups=frozenset({"sales"})))


def test_groups_claim_shapes() -> None:
    assert groups_from_claims({"groups": ["a", "b", 3, ""]}, "groups") == {"a", "b"}
    assert groups_from_claims({"roles": "a b"}, "roles") == {"a", "b"}
    assert groups_from_claims({"groups": {"a": 1}}, "groups") == frozenset()
    assert groups_from_claims({}, "groups") == frozenset()


def test_every_mistake_names_its_field() -> None:
    bad = (
        POLICY.replace("roles: {admin", "roles: {owner: [x], admin")
        .replace("services: [cli]", "services: [clj]")
        .replace("max_days: 30", "max_days: 0")
        .replace("groups: [leads-dev]", "groups: leads-dev")
        .replace("roles_claim: roles", "roles_claim: 3")
        .replace("{approvers: {groups: [leads-platform]}}", "{approvers: {}}")
        .replace("workspace: dev, max_days: 7", "workspace: dve, max_days: 7")
    )
    assert sorted(problems(bad)) == sorted(
        [
            "workspaces.dev.approvers.groups: must be a list like [platform-admins], "
            'got "leads-dev"',
            "workspaces.dev.teams.platform.approvers: name at least one of people or groups "
            "(omit approvers for nobody)",
            "console.roles_claim: must be a non-empty string, got 3",
            'console.roles.owner: unknown role "owner" (roles: admin, viewer)',
            'console.personal_keys[0].services[0]: unknown service "clj" in dev '
            '(did you mean "cli"?)',
            "console.personal_keys[0].max_days: must be a whole number of days, 1 to 366",
            'console.personal_keys[1].workspace: unknown workspace "dve" (did you mean "dev"?)',
        ]
    )
    assert problems(POLICY.replace("console:", "consol:"))[0].startswith(
        'consol: unknown field (did you mean "console"?)'
    )
    assert (
        problems(
            POLICY.replace(
                "    - {groups: [developers], workspace: dev, services",
                "    - {workspace: dev, services",
            )
        )[0]
        == "console.personal_keys[0].groups: required"
    )
