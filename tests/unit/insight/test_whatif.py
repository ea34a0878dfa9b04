"""Policy what-if against a ledger with a known answer.

Ten days of traffic at exactly $10 a day against a $100 monthly budget: the policy in force
never refuses. Halve the budget and the replay must say the soft limit (50%, $25) is crossed
on day 3, the hard limit ($50) is met on day 5, and every request from day 6 on is refused.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from extproc.governance.policy import Policy, load_policy
from extproc.insight.whatif import render_text, replay
from extproc.metering.prices import NANOS_PER_DOLLAR, PriceTable
from extproc.v1.ledger_pb2 import UsageRecord
from extproc.wire.usage import Usage

BASE = """
version: 1
timezone: UTC
defaults: {{soft_limit: 50%, hard_limit: 100%}}
workspaces:
  dev:
    budget_usd: {budget}
    upstream: {{key_env: X}}
    teams:
      platform: {{}}
    services:
      cli: {{team: platform}}
{extra}
"""


def policy(tmp_path: Path, budget: str, extra: str = "") -> Policy:
    path = tmp_path / f"p{budget}{len(extra)}.yaml"
    path.write_text(BASE.format(budget=budget, extra=extra))
    return load_policy(path)


def ledger(days: int = 10, per_day: int = 2, model: str = "gpt-4o-mini") -> list[UsageRecord]:
    """`per_day` requests a day from 2026-11-01, together costing exactly $10 a day."""
    out = []
    for day in range(days):
        for i in range(per_day):
            when = datetime(2026, 11, 1 + day, 9 + i, tzinfo=UTC)
            out.append(
                UsageRecord(
                    request_id=f"r{day}-{i}",
                    time_ms=int(when.timestamp() * 1000),
                    endpoint="responses",
                    model_requested=model,
                    model_served=model,
                    status=200,
                    input_tokens=1000,
                    counted_input_tokens=1000,
                    output_tokens=100,
                    output_cap=100,
                    cost_nanos=10 * NANOS_PER_DOLLAR // per_day,
                    outcome="completed",
                    workspace="dev",
                    team="platform",
                    service="cli",
                    key_id="key_a",
                )
            )
    return out


def test_the_policy_in_force_replays_to_what_happened(tmp_path: Path) -> None:
    result = replay(policy(tmp_path, "100"), ledger(), PriceTable.load()).to_dict()
    assert result["replayed_requests"] == 20
    assert result["refused_requests"] == 0
    assert result["candidate_nanos"] == result["actual_nanos"] == 100 * NANOS_PER_DOLLAR
    ws = next(s for s in result["scopes"] if s["scope"] == "ws")
    assert ws["soft_crossed_on"] == "2026-11-05"  # $50 of $100
    assert ws["hard_crossed_on"] == "2026-11-10"  # $100 met on the tenth day


def test_a_halved_budget_shows_the_day_the_hard_limit_is_hit(tmp_path: Path) -> None:
    result = replay(policy(tmp_path, "50"), ledger(), PriceTable.load()).to_dict()
    ws = next(s for s in result["scopes"] if s["scope"] == "ws")
    assert ws["soft_crossed_on"] == "2026-11-03"  # $30 >= $25
    assert ws["hard_crossed_on"] == "2026-11-05"  # $50 = the hard limit
    assert result["refused_requests"] == 10  # days 6 to 10, two a day
    assert result["refused_by"] == {"insufficient_quota": 10}
    assert result["candidate_nanos"] == 50 * NANOS_PER_DOLLAR
    assert result["difference_nanos"] == -50 * NANOS_PER_DOLLAR
    text = render_text(replay(policy(tmp_path, "50"), ledger(), PriceTable.load()), 30)
    assert "would be refused   : 10" in text and "2026-11-05" in text


def test_degrading_past_soft_counts_downgrades_and_reprices(tmp_path: Path) -> None:
    path = tmp_path / "degrade.yaml"
    path.write_text(
        BASE.format(budget="100", extra="routing:\n  ladder: {gpt-4o: gpt-4o-mini}\n").replace(
            "      cli: {team: platform}",
            "      cli: {team: platform, routing: {degrade_past_soft: true}}",
        )
    )
    prices = PriceTable.load()
    result = replay(load_policy(path), ledger(model="gpt-4o"), prices).to_dict()
    # $50 (the soft limit) is reached with the fifth day's last request; the ten after it
    # are served by gpt-4o-mini and priced as such.
    assert result["downgrades"] == [{"from": "gpt-4o", "to": "gpt-4o-mini", "requests": 10}]
    mini = prices.charge("gpt-4o-mini", Usage(1000, 0, 100, 0)).nanos
    assert result["candidate_nanos"] == 50 * NANOS_PER_DOLLAR + 10 * mini
    assert result["refused_requests"] == 0


def degrading(tmp_path: Path, on: bool = True) -> Policy:
    path = tmp_path / f"degrade-{on}.yaml"
    flag = "true" if on else "false"
    path.write_text(
        BASE.format(budget="100", extra="routing:\n  ladder: {gpt-4o: gpt-4o-mini}\n").replace(
            "      cli: {team: platform}",
            f"      cli: {{team: platform, routing: {{degrade_past_soft: {flag}}}}}",
        )
    )
    return load_policy(path)


def served_as_in_force(prices: PriceTable) -> list[UsageRecord]:
    """What the degrading policy really did: asked for gpt-4o all along, the ten requests
    past the soft limit served (and billed) on gpt-4o-mini."""
    records = ledger(model="gpt-4o")
    for r in records[10:]:
        r.model_served = "gpt-4o-mini-2024-07-18"  # as the provider names what it served
        r.cost_nanos = prices.charge(r.model_served, _usage_of(r)).nanos
    return records


def _usage_of(r: UsageRecord) -> Usage:
    return Usage(r.input_tokens, r.cached_input_tokens, r.output_tokens, r.reasoning_tokens)


def test_the_downgrades_already_made_are_not_changes(tmp_path: Path) -> None:
    prices = PriceTable.load()
    records = served_as_in_force(prices)
    result = replay(degrading(tmp_path), records, prices).to_dict()
    assert result["downgrades"] == [] and result["downgraded_requests"] == 0
    assert result["already_rerouted_requests"] == 10
    assert result["candidate_nanos"] == result["actual_nanos"]
    assert result["difference_nanos"] == 0
    text = render_text(replay(degrading(tmp_path), records, prices), 30)
    assert "would change model : 0" in text and "10 served on another model already" in text


def test_undoing_a_downgrade_is_a_change_from_the_served_model(tmp_path: Path) -> None:
    prices = PriceTable.load()
    records = served_as_in_force(prices)
    result = replay(degrading(tmp_path, on=False), records, prices).to_dict()
    assert result["downgrades"] == [
        {"from": "gpt-4o-mini-2024-07-18", "to": "gpt-4o", "requests": 10}
    ]
    full = prices.charge("gpt-4o", Usage(1000, 0, 100, 0)).nanos
    mini = prices.charge("gpt-4o-mini", Usage(1000, 0, 100, 0)).nanos
    assert result["difference_nanos"] == 10 * (full - mini) > 0


def test_requests_refused_now_and_unknown_services_are_reported(tmp_path: Path) -> None:
    records = ledger(days=1)
    records[0].outcome = "rejected"
    records[1].service = "gone"
    result = replay(policy(tmp_path, "100"), records, PriceTable.load()).to_dict()
    assert result["already_refused_requests"] == 1
    assert result["refused_by"] == {"unknown_key": 1}


def test_top_ups_granted_at_the_time_raise_the_candidates_cap(tmp_path: Path) -> None:
    """$20 granted on the fifth day until the seventh began: days 6 fits, 7 to 10 do not."""
    from extproc.governance.topups import TopupRequest

    def ms(day: int, hour: int = 0) -> int:
        return int(datetime(2026, 11, day, hour, tzinfo=UTC).timestamp() * 1000)

    grant = TopupRequest(
        "tu_1", "dev", "ws", "workspace dev", 20 * NANOS_PER_DOLLAR, ms(7), "release", "key_a",
        "cli", "platform", "", ms(5, 8), status="expired", decided_by="lena",
        decided_ms=ms(5, 8), granted_nanos=20 * NANOS_PER_DOLLAR, granted_until_ms=ms(7),
    )  # fmt: skip
    fields = {f: getattr(grant, f) for f in grant.__dataclass_fields__}
    denied = TopupRequest(**{**fields, "request_id": "tu_2", "status": "denied"})
    result = replay(policy(tmp_path, "50"), ledger(), PriceTable.load(), [grant, denied]).to_dict()
    assert result["refused_requests"] == 8  # days 7 to 10
    assert result["candidate_nanos"] == 60 * NANOS_PER_DOLLAR
    ws = next(s for s in result["scopes"] if s["scope"] == "ws")
    assert ws["hard_nanos"] == 50 * NANOS_PER_DOLLAR  # the policy's; the grant is not a limit


def test_the_candidates_breaker_lists_the_keys_it_would_pause(tmp_path: Path) -> None:
    loop = []
    for k in range(30):
        r = ledger(days=1, per_day=1)[0]
        r.request_id, r.time_ms = f"loop{k}", r.time_ms + k * 1000
        r.counted_input_tokens, r.request_fingerprint, r.key_id = 20_000, "fp", "key_loop"
        loop.append(r)
    result = replay(policy(tmp_path, "1000"), [*ledger(), *loop], PriceTable.load()).to_dict()
    [trip] = result["breaker_trips"]
    assert (trip["key_id"], trip["rule"], trip["mode"]) == ("key_loop", "repeats", "enforce")
    assert trip["spent_after_nanos"] == 9 * loop[0].cost_nanos  # the 22nd to the 30th copy
    quiet = policy(tmp_path, "1000", "").workspaces["dev"]
    assert quiet.breaker.repeat_more_than == 20
    text = render_text(replay(policy(tmp_path, "1000"), loop, PriceTable.load()), 1)
    assert "breaker would pause: 1 key" in text and "key_loop" in text
