"""The policy's `topups:`, `breaker:` and `approvers.webhook`: inherited as documented, and
every mistake named at its field."""

from __future__ import annotations

import copy
from decimal import Decimal
from typing import Any

import pytest

from extproc.governance.policy import (
    AutoApprove,
    Breaker,
    PolicyError,
    Topups,
    parse_policy,
)

B = 1_000_000_000
BASE: dict[str, Any] = {
    "version": 1,
    "workspaces": {
        "dev": {
            "budget_usd": 100,
            "upstream": {"key_env": "X"},
            "teams": {"platform": {}},
            "services": {"cli": {"team": "platform"}, "ci": {}},
        }
    },
}


def policy_with(**sections: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    for path, value in sections.items():
        *parents, last = path.split("__")
        node = doc
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return doc


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(doc)
    return [p.removeprefix("policy.yaml: ") for p in info.value.problems]


def test_defaults_are_the_documented_ones() -> None:
    ws = parse_policy(BASE).workspaces["dev"]
    assert ws.breaker == Breaker() == ws.services["ci"].breaker
    assert (ws.breaker.mode, ws.breaker.repeat_more_than, ws.breaker.repeat_minutes) == (
        "enforce", 20, 10)  # fmt: skip
    assert (ws.breaker.rate_multiple, ws.breaker.rate_min_nanos) == (Decimal(10), 5 * B)
    assert (ws.breaker.growth_tokens, ws.breaker.growth_turns) == (300_000, 5)
    assert ws.topups == Topups() and ws.topups.max_nanos is None and ws.topups.max_days == 31


def test_breaker_is_inherited_field_by_field_and_rules_switch_off() -> None:
    doc = policy_with(
        defaults__breaker={"repeats": {"more_than": 30}, "spend_rate": {"min_usd": 0}},
        workspaces__dev__breaker={"mode": "dry_run", "session_growth": False},
        workspaces__dev__services__ci__breaker={"repeats": {"minutes": 2}, "mode": False},
    )
    ws = parse_policy(doc).workspaces["dev"]
    assert (ws.breaker.mode, ws.breaker.repeat_more_than, ws.breaker.repeat_minutes) == (
        "dry_run", 30, 10)  # fmt: skip
    assert ws.breaker.growth_tokens is None and ws.breaker.rate_min_nanos == 0
    ci = ws.breaker_for("ci")
    assert (ci.mode, ci.repeat_more_than, ci.repeat_minutes) == ("off", 30, 2)
    assert ws.breaker_for("cli") == ws.breaker
    assert ws.breaker_for("nobody") == ws.breaker
    assert ci.window_ms == 10 * 60_000  # the longest look back of its rules


def test_topups_and_auto_approval() -> None:
    doc = policy_with(
        defaults__topups={"max_usd": 200, "requester_webhooks": ["http://127.0.0.1:9/"]},
        workspaces__dev__topups={
            "max_days": 7,
            "auto_approve": {"services": ["ci"], "under_usd": 5, "period_max_usd": "20.5"},
        },
        workspaces__dev__approvers={"people": ["Ana@Example.com"], "webhook": "https://h/x"},
    )
    ws = parse_policy(doc).workspaces["dev"]
    assert ws.topups == Topups(
        200 * B, 7, AutoApprove(frozenset({"ci"}), 5 * B, 20_500_000_000), ("http://127.0.0.1:9/",)
    )
    assert ws.approvers is not None and ws.approvers.webhook == "https://h/x"
    assert ws.approvers.people == frozenset({"ana@example.com"})
    assert ws.approvers_of("platform") == [ws.approvers]


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"defaults__breaker": {"mode": "loud"}},
         'defaults.breaker.mode: must be one of enforce, dry_run, off, got "loud"'),
        ({"defaults__breaker": {"repeat": {}}},
         'defaults.breaker.repeat: unknown field (did you mean "repeats"?)'),
        ({"workspaces__dev__breaker": {"repeats": {"more_than": 0}}},
         "workspaces.dev.breaker.repeats.more_than: must be a positive integer, got 0"),
        ({"workspaces__dev__breaker": {"repeats": {"minutes": 2000}}},
         "workspaces.dev.breaker.repeats.minutes: must be at most 1440 minutes (a day), got 2000"),
        ({"workspaces__dev__breaker": {"spend_rate": {"multiple": 1}}},
         "workspaces.dev.breaker.spend_rate.multiple: must be a number above 1 and at most 1000"),
        ({"workspaces__dev__breaker": {"spend_rate": {"min_usd": "lots"}}},
         "workspaces.dev.breaker.spend_rate.min_usd: must be a positive decimal string"),
        ({"workspaces__dev__breaker": {"session_growth": None}},
         "workspaces.dev.breaker.session_growth: must be a mapping of thresholds, or false"),
        ({"workspaces__dev__services__ci__breaker": {"session_growth": {"turns": "five"}}},
         "workspaces.dev.services.ci.breaker.session_growth.turns: must be a positive integer"),
        ({"defaults__topups": {"max_usd": -1}},
         "defaults.topups.max_usd: must be a positive decimal string or number"),
        ({"defaults__topups": {"max_days": 400}},
         "defaults.topups.max_days: must be at most 366 days, got 400"),
        ({"defaults__topups": {"auto_approve": {"services": ["ci"], "under_usd": 1}}},
         "defaults.topups.auto_approve: names services: set it on a workspace, not under "
         "defaults"),
        ({"workspaces__dev__topups": {"auto_approve": {"services": ["cl"], "under_usd": 1}}},
         'workspaces.dev.topups.auto_approve.services[0]: unknown service "cl" (did you mean '
         '"cli"?)'),
        ({"workspaces__dev__topups": {"auto_approve": {"services": ["ci"]}}},
         "workspaces.dev.topups.auto_approve.under_usd: required"),
        ({"workspaces__dev__topups": {"auto_approve": {"services": ["ci"], "under_usd": 5,
                                                       "period_max_usd": 1}}},
         "workspaces.dev.topups.auto_approve.period_max_usd: must be at least under_usd"),
        ({"workspaces__dev__topups": {"requester_webhooks": ["ftp://x"]}},
         "workspaces.dev.topups.requester_webhooks[0]: must be an http:// or https:// URL"),
        ({"workspaces__dev__approvers": {"people": ["a@b.c"], "webhook": "slack"}},
         "workspaces.dev.approvers.webhook: must be an http:// or https:// URL with a host"),
        ({"alerts": {"webhooks": [{"url": "https://h/x", "events": ["key_pausd"]}]}},
         'alerts.webhooks[0].events: unknown event "key_pausd" (did you mean "key_paused"?)'),
    ],
)  # fmt: skip
def test_each_mistake_names_its_field(sections: dict[str, Any], expected: str) -> None:
    found = problems(policy_with(**sections))
    assert any(p.startswith(expected) for p in found), found
