"""Budget refusals say what is true: spent, held by others, or too big for what is left.

The issue's cases, priced with the real table: a workspace with $0.07 of its $0.10 left
refusing a Codex turn whose worst case is ~$0.07, and a $0.02 budget refusing its very first
turn. Neither is "exhausted"; both say what the request could cost (tokens and model), what
is left of which limit, and the way out. The output cap the text offers is checked against
the hold arithmetic itself (it fits; one more token would not).
"""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest

from extproc.governance import guard
from extproc.governance.budget import Decision, Plan, Standing, plan_request
from extproc.governance.keys import Identity
from extproc.governance.policy import parse_policy_text
from extproc.metering.prices import PriceTable
from extproc.metering.worstcase import worst_case_nanos

PRICES = PriceTable.load()
UTC = ZoneInfo("UTC")
POLICY = parse_policy_text(
    """
version: 1
timezone: UTC
defaults: {hard_limit: 100%, default_output_cap: 4096}
workspaces:
  tiny:
    budget_usd: "0.10"
    upstream: {key_env: TEST_UPSTREAM}
    services:
      codex-cli: {}
"""
)
CALLER = Identity("key_t", "tiny", None, "codex-cli", None, 0)
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
CENT = 10_000_000  # nanos
TURN_INPUT = 25_000  # a Codex turn's counted input


def turn(model: str = "gpt-5", output_cap: int | None = None, inp: int = TURN_INPUT) -> Plan:
    return plan_request(
        POLICY,
        CALLER,
        model=model,
        counted_input=inp,
        output_cap=output_cap,
        prices=PRICES,
        now_ms=T0,
    )


def refused(plan: Plan, spent: int, held: int = 0) -> Decision:
    ws = plan.scopes[0]
    return Decision(False, "budget", denied=ws, standings=(Standing(ws, spent, held),))


def ask(plan: Plan, *, stated: bool = False, model: str = "gpt-5") -> guard.Ask:
    return guard.ask(
        PRICES,
        plan,
        model=model,
        outputs=1,
        output_param="max_output_tokens",
        stated=stated,
        source="the workspace's default_output_cap",
    )


def message(plan: Plan, decision: Decision, what: guard.Ask | None) -> str:
    error, headers = guard.denial(decision, plan, UTC, what)
    assert (error.status, error.type, error.code) == (
        429,
        "insufficient_quota",
        "insufficient_quota",
    )
    assert headers["x-should-retry"] == "false"
    assert headers["x-extproc-budget-scope"] == "workspace tiny"
    return error.message


def test_seven_cents_left_is_not_exhausted_and_names_what_would_fit() -> None:
    plan = turn()
    assert plan.reserve_nanos > 7 * CENT  # the issue's ~$0.07 worst case
    text = message(plan, refused(plan, spent=3 * CENT), ask(plan))
    assert "exhausted" not in text
    assert text.startswith("This request could cost up to $0.0723 (25,000 input tokens")
    assert "up to 4,096 output tokens on gpt-5" in text
    assert "no max_output_tokens was set, so the workspace's default_output_cap is held" in text
    assert "more than the $0.07 left of the $0.10 hard limit of workspace tiny" in text
    assert "($0.03 spent)" in text and "period 2026-01" in text
    assert "use a cheaper model, or ask your platform team to raise the limit" in text
    assert "It resets at 2026-02-01T00:00+00:00." in text
    fit = int(text.split("set max_output_tokens to ")[1].split(" or less")[0].replace(",", ""))
    left = 7 * CENT
    assert worst_case_nanos(PRICES, "gpt-5", TURN_INPUT, fit) <= left
    assert worst_case_nanos(PRICES, "gpt-5", TURN_INPUT, fit + 1) > left
    # And a request that sets that cap is admitted by the same arithmetic the script uses.
    assert turn(output_cap=fit).reserve_nanos <= left


def test_two_cents_budgeted_first_turn_says_the_input_alone_is_too_big() -> None:
    policy = parse_policy_text(
        "version: 1\ndefaults: {hard_limit: 100%}\nworkspaces:\n  tiny:\n"
        '    budget_usd: "0.02"\n    upstream: {key_env: X}\n    services: {codex-cli: {}}\n'
    )
    plan = plan_request(
        policy, CALLER, model="gpt-5", counted_input=TURN_INPUT, output_cap=None,
        prices=PRICES, now_ms=T0,
    )  # fmt: skip
    text = message(plan, refused(plan, spent=0), ask(plan))
    assert "exhausted" not in text and "($0.00 spent)" in text  # true, and not the cause
    assert "more than the $0.02 left of the $0.02 hard limit" in text
    assert "send less input (the input alone holds $0.0313)" in text
    assert "set max_output_tokens" not in text


def test_real_exhaustion_keeps_the_exhaustion_message() -> None:
    plan = turn()
    text = message(plan, refused(plan, spent=10 * CENT), ask(plan))
    assert text.startswith(
        "Budget exhausted for workspace tiny: $0.10 spent of a $0.10 hard limit "
        "(budget $0.10) for period 2026-01."
    )
    assert "could cost" not in text


def test_room_held_by_requests_in_flight_says_so() -> None:
    plan = turn()
    text = message(plan, refused(plan, spent=6 * CENT, held=4 * CENT), ask(plan))
    assert "nothing is free under the $0.10 hard limit of workspace tiny" in text
    assert "$0.06 spent, $0.04 held for requests in flight" in text
    assert "retry shortly" in text and "exhausted" not in text


@pytest.mark.parametrize("stated", [True, False])
def test_a_stated_cap_is_not_described_as_a_default(stated: bool) -> None:
    plan = turn(output_cap=6000)
    text = message(plan, refused(plan, spent=3 * CENT), ask(plan, stated=stated))
    assert ("default_output_cap is held" in text) is not stated
    assert "up to 6,000 output tokens" in text


def test_without_an_ask_the_cost_and_the_remainder_are_still_given() -> None:
    plan = turn()
    text = message(plan, refused(plan, spent=3 * CENT), None)
    assert text.startswith("This request could cost up to $0.0723, more than the $0.07 left")


def test_passthrough_without_an_output_cap_names_the_ceiling() -> None:
    plan = turn(output_cap=16_384)
    what = guard.ask(
        PRICES,
        plan,
        model="gpt-5",
        outputs=1,
        output_param=None,
        stated=False,
        source="passthrough.output_ceiling.responses.compact (16,384 per output)",
    )
    text = message(plan, refused(plan, spent=3 * CENT), what)
    assert (
        "this endpoint takes no output cap, so passthrough.output_ceiling.responses.compact "
        "(16,384 per output) is held" in text
    )
    assert "set max_output_tokens" not in text


def test_codex_gets_the_same_text_as_a_400_with_whom_to_ask() -> None:
    plan = turn()
    error, _headers = guard.denial(refused(plan, spent=3 * CENT), plan, UTC, ask(plan))
    shaped = guard.for_client(error, codex=True, contact="#platform-help")
    assert (shaped.status, shaped.code) == (400, "insufficient_quota")
    assert shaped.message == f"{error.message} Whom to ask: #platform-help."
    sdk = guard.for_client(error, codex=False, contact="#platform-help")
    assert sdk.status == 429 and sdk.message.endswith("Whom to ask: #platform-help.")


def test_amounts_below_a_cent_keep_their_digits() -> None:
    policy = parse_policy_text(
        "version: 1\ndefaults: {hard_limit: 110%}\nworkspaces:\n  tiny:\n"
        '    budget_usd: "0.01"\n    upstream: {key_env: X}\n    services: {codex-cli: {}}\n'
    )
    plan = plan_request(
        policy, CALLER, model="gpt-5", counted_input=8_000, output_cap=None,
        prices=PRICES, now_ms=T0,
    )  # fmt: skip
    text = message(plan, refused(plan, spent=0), ask(plan))
    # Not "$0.011 left of the $0.01 hard limit": the limit is 110% of a one-cent budget.
    assert "more than the $0.011 left of the $0.011 hard limit" in text
    assert "($0.00 spent)" in text
