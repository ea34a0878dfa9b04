"""The self-service view's verdicts as pure functions: a caller's typical request (what it
holds before it goes) and a scope whose remainder cannot hold one (effectively blocked)."""

from __future__ import annotations

from extproc.governance.keys import Identity
from extproc.governance.policy import parse_policy_text
from extproc.insight.me import MeReads, me_view, plan_for, standing_state, typical_request
from extproc.metering.prices import PriceTable
from extproc.metering.worstcase import worst_case_nanos
from extproc.store.schema import WORKSPACE_SCOPE
from extproc.v1.ledger_pb2 import UsageRecord

PRICES = PriceTable.load()
POLICY = parse_policy_text(
    """
version: 1
timezone: UTC
defaults: {hard_limit: 100%, default_output_cap: 4096}
workspaces:
  tiny:
    budget_usd: "0.10"
    upstream: {key_env: TEST_UPSTREAM}
    passthrough: {output_ceiling: {responses.compact: 1000}}
    services:
      codex-cli: {}
"""
)
WS = POLICY.workspaces["tiny"]
CALLER = Identity("key_t", "tiny", None, "codex-cli", None, 0)
T0 = 1_767_225_600_000
CENT = 10_000_000


def rec(
    endpoint: str, model: str, counted: int, cap: int = 0, outcome: str = "completed"
) -> UsageRecord:
    return UsageRecord(
        endpoint=endpoint,
        model_requested=model,
        model_served=model,
        counted_input_tokens=counted,
        output_cap=cap,
        outcome=outcome,
        key_id=CALLER.key_id,
    )


def test_typical_is_the_lower_median_hold_of_counted_requests() -> None:
    records = [
        rec("responses", "gpt-5", 20_000),  # default_output_cap is what it held
        rec("responses", "gpt-5", 30_000, outcome="rejected"),  # a refused attempt counts too
        rec("chat.completions", "gpt-5-mini", 1_000, cap=500),
        rec("responses.compact", "gpt-5", 50_000),  # held the policy's compact ceiling
        rec("files", "", 0),  # free: holds nothing, not part of it
    ]
    typical = typical_request(records, WS, PRICES)
    assert typical is not None and typical.based_on == 4
    holds = sorted(
        [
            worst_case_nanos(PRICES, "gpt-5", 20_000, 4096),
            worst_case_nanos(PRICES, "gpt-5", 30_000, 4096),
            worst_case_nanos(PRICES, "gpt-5-mini", 1_000, 500),
            worst_case_nanos(PRICES, "gpt-5", 50_000, 1000),
        ]
    )
    assert typical.hold_nanos == holds[1]  # the lower median: a request really sent
    assert (typical.model, typical.input_tokens, typical.output_tokens) == ("gpt-5", 20_000, 4096)
    assert typical_request([rec("files", "", 0)], WS, PRICES) is None


def test_standing_states() -> None:
    typical = typical_request([rec("responses", "gpt-5", 25_000)], WS, PRICES)
    assert typical is not None and 7 * CENT < typical.hold_nanos < 8 * CENT
    hard, soft = 10 * CENT, 8 * CENT
    assert standing_state(10 * CENT, 0, hard, soft, typical) == "exhausted"
    assert standing_state(3 * CENT, 0, hard, soft, typical) == "blocked"  # $0.07 left
    assert standing_state(1 * CENT, 2 * CENT, hard, soft, typical) == "blocked"  # held counts
    assert standing_state(1 * CENT, 0, hard, soft, typical) == "ok"
    assert standing_state(3 * CENT, 0, hard, soft, None) == "ok"  # no history, no verdict
    assert standing_state(8 * CENT, 1 * CENT, hard, soft, None) == "soft"
    assert standing_state(5 * CENT, 5 * CENT, hard, soft, None) == "blocked"  # all held
    assert standing_state(5 * CENT, 0, None, None, typical) == "ok"  # no hard limit


def test_me_view_shows_the_blocked_scope_as_data() -> None:
    records = [rec("responses", "gpt-5", 25_000) for _ in range(3)]
    typical = typical_request(records, WS, PRICES)
    plan = plan_for(POLICY, CALLER, PRICES, T0)
    reads = MeReads({WORKSPACE_SCOPE: 3 * CENT}, {}, {}, records, {})
    view = me_view(POLICY, CALLER, plan, reads, T0, typical)
    ws = next(b for b in view["budgets"] if b["scope"] == WORKSPACE_SCOPE)
    assert (ws["remaining_usd"], ws["state"], ws["effectively_blocked"]) == (
        "0.07",
        "blocked",
        True,
    )
    assert ws["typical_requests_left"] == 0
    assert view["typical_request"]["based_on"] == 3
    assert view["typical_request"]["model"] == "gpt-5"
    roomy = me_view(POLICY, CALLER, plan, MeReads({}, {}, {}, records, {}), T0, typical)
    ws = next(b for b in roomy["budgets"] if b["scope"] == WORKSPACE_SCOPE)
    assert (ws["state"], ws["effectively_blocked"], ws["typical_requests_left"]) == ("ok", False, 1)
    bare = me_view(POLICY, CALLER, plan, MeReads({}, {}, {}, [], {}), T0)
    assert bare["typical_request"] is None
    assert all(b["typical_requests_left"] is None for b in bare["budgets"])
