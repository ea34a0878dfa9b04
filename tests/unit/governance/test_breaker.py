"""The runaway breaker's rules against ordinary traffic and against runaways.

Ordinary traffic is `tests.traffic`: 30 minutes of four developers in Codex (request shapes
measured from the real CLI, growing history, tool calls, restarts) and a CI bot's review
waves (the same repository context with different diffs, retries), fed to the detector with
its own clock. Nothing of it may trip, with margin; each kind of runaway must trip, soon.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict, deque
from decimal import Decimal

import pytest

from extproc.governance.breaker import MIN_REPEAT_TOKENS, Detector, Seen, Trip
from extproc.governance.policy import Breaker
from extproc.metering.prices import NANOS_PER_DOLLAR
from tests.traffic import Call, normal_traffic, record, records, runaway_loop

T0 = 1_796_000_000_000
DEFAULTS = Breaker()


def detect(calls: list[Call], rules: Breaker = DEFAULTS, baselines: dict[str, int] | None = None,
           ) -> list[Trip]:  # fmt: skip
    """Feed the calls in time order; after each, check the rate rule as the watch does."""
    detector = Detector(lambda _ws, _svc: rules)
    trips: list[Trip] = []
    for rec in records(sorted(calls, key=lambda c: c.at_s), T0):
        seen = Seen.of(rec)
        assert seen is not None
        trips += detector.feed(seen)
        for ws, svc, key in detector.rate_candidates():
            trip = detector.check_rate(ws, svc, key, (baselines or {}).get(key))
            if trip is not None:
                trips.append(trip)
    return trips


def busiest_hour(calls: list[Call]) -> dict[str, int]:
    """Each key's busiest 60 minutes: what a usual day of this traffic shows as its peak."""
    by_key: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for rec in records(calls, T0):
        by_key[rec.key_id].append((rec.time_ms, rec.cost_nanos))
    out = {}
    for key, spends in by_key.items():
        best, window, total = 0, deque[tuple[int, int]](), 0
        for t, n in spends:
            window.append((t, n))
            total += n
            while window[0][0] <= t - 3_600_000:
                total -= window.popleft()[1]
            best = max(best, total)
        out[key] = best
    return out


def test_ordinary_traffic_trips_nothing_with_margin() -> None:
    calls = normal_traffic()
    assert len(calls) > 300 and max(c.at_s for c in calls) > 25 * 60
    # The traffic is what it claims: long growing Codex sessions and CI waves.
    sessions = Counter(c.session for c in calls if c.session)
    assert max(sessions.values()) >= 30
    assert max(c.input_tokens for c in calls if c.who.startswith("dev")) > 60_000
    assert sum(1 for c in calls if c.who == "ci-bot") >= 50
    # Against a baseline as busy as this traffic's own busiest hour (a usual day of it).
    assert detect(calls, baselines=busiest_hour(calls)) == []
    # With margin: how close each rule came.
    shapes: dict[tuple[str, int], list[int]] = defaultdict(list)
    for c in calls:
        if c.input_tokens >= MIN_REPEAT_TOKENS:
            shapes[(c.who, hash(tuple(c.items)))].append(int(c.at_s))
    most = max(sum(1 for t in ts if ts[0] <= t < ts[0] + 600) for ts in shapes.values())
    assert most <= 4 < DEFAULTS.repeat_more_than // 4  # the restarts and CI retries
    largest_turn = max(c.input_tokens for c in calls)
    assert largest_turn < DEFAULTS.growth_tokens / 2  # type: ignore[operator]
    # Switching the floors off still trips nothing: the rules, not the floors, hold.
    bare = dataclasses.replace(DEFAULTS, rate_min_nanos=0)
    assert detect(calls, bare, busiest_hour(calls)) == []


def test_the_same_request_in_a_loop_is_tripped_by_its_21st_copy() -> None:
    calls = normal_traffic()
    loop = runaway_loop(600, 40)
    trips = detect(calls + loop)
    assert [(t.key_id, t.rule) for t in trips] == [("key_loop", "repeats")]
    trip = trips[0]
    assert trip.at_ms == T0 + int(loop[20].at_s * 1000)  # the 21st: "more than 20"
    assert trip.details["count"] == 21 and trip.details["input_tokens"] == 20_000
    assert "the same 20,000-token request on gpt-4o-mini was sent 21 times in 20 seconds" in (
        trip.why
    )
    assert trip.mode == "enforce"


def test_a_key_spending_ten_times_its_busiest_hour_is_tripped() -> None:
    """A script that sends different big requests quickly: no repeats, only the pace."""
    calls = normal_traffic()
    baselines = busiest_hour(calls)
    burst = [
        Call(900 + k * 2.0, "ci-bot", "", [("review-instructions", 1200), (f"big-{k}", 60_000 + k)],
             "gpt-4.1-mini", 2000, "chat.completions")
        for k in range(200)
    ]  # fmt: skip
    trips = detect(calls + burst, baselines=baselines)
    assert [(t.key_id, t.rule) for t in trips] == [("key_ci-bot", "spend_rate")]
    pace = Decimal(trips[0].details["pace_usd_per_hour"])
    assert pace > 10 * Decimal(trips[0].details["baseline_usd_per_hour"])
    # Without history to compare with, the pace alone never trips.
    assert detect(calls + burst) == []


def test_a_session_that_never_compacts_is_tripped_past_the_ceiling() -> None:
    grows = [
        Call(k * 20.0, "agent", "s1", [("sys", 2000), *[(f"h{j}", 30_000) for j in range(k)]],
             "gpt-4.1", 500)
        for k in range(1, 16)
    ]  # fmt: skip
    trips = detect(grows)
    assert [(t.rule, t.details["input_tokens"][-1]) for t in trips] == [("session_growth", 302_000)]
    # An agent that compacts its history (as Codex does before its context is full) grows
    # the same way between compactions and never trips.
    compacting = [
        Call(k * 20.0, "agent", "s2", [("sys", 2000), (f"summary{k // 8}", 8000),
             *[(f"h{k}-{j}", 30_000) for j in range(k % 8)]], "gpt-4.1", 500)
        for k in range(1, 40)
    ]  # fmt: skip
    assert max(c.input_tokens for c in compacting) < DEFAULTS.growth_tokens  # type: ignore[operator]
    assert detect(compacting) == []


def test_dry_run_reports_off_is_silent_and_a_rule_can_be_switched_off() -> None:
    loop = runaway_loop(0, 30)
    dry = detect(loop, dataclasses.replace(DEFAULTS, mode="dry_run"))
    assert [(t.rule, t.mode) for t in dry] == [("repeats", "dry_run")]
    assert detect(loop, dataclasses.replace(DEFAULTS, mode="off")) == []
    assert detect(loop, dataclasses.replace(DEFAULTS, repeat_more_than=None)) == []
    # A tripped rule stays quiet for its window: one trip, not one per copy.
    assert len(detect(runaway_loop(0, 200))) == 1


def test_a_resumed_key_is_judged_from_its_resume_on() -> None:
    detector = Detector(lambda _ws, _svc: DEFAULTS)
    loop = [Seen.of(record(c, T0)) for c in runaway_loop(0, 60)]
    trips = [t for s in loop[:25] for t in detector.feed(s)]  # type: ignore[arg-type]
    assert len(trips) == 1
    detector.forget("key_loop", loop[24].time_ms)  # type: ignore[union-attr]
    assert [t for s in loop[:25] for t in detector.feed(s)] == []  # type: ignore[arg-type]
    again = [t for s in loop[25:] for t in detector.feed(s)]  # type: ignore[arg-type]
    assert len(again) == 1 and again[0].details["count"] == 21


def test_refusals_and_small_requests_never_count() -> None:
    small = Call(0, "ping", "", [("ping", 20)], "gpt-4o-mini", 5, "chat.completions")
    assert detect([dataclasses.replace(small, at_s=k) for k in range(500)]) == []
    refused = record(runaway_loop(0, 1)[0], T0)
    refused.outcome = "rejected"
    assert Seen.of(refused) is None


@pytest.mark.parametrize("multiple", [Decimal(3), Decimal(10)])
def test_the_rate_rule_needs_its_floor(multiple: Decimal) -> None:
    """Pennies never trip: a key going from $0.01 to $0.50 in ten minutes is no runaway."""
    rules = dataclasses.replace(DEFAULTS, rate_multiple=multiple)
    cheap = [Call(k * 5.0, "tiny", "", [(f"t{k}", 2000)], "gpt-4o-mini", 100) for k in range(100)]
    spent = sum(record(c, T0).cost_nanos for c in cheap)
    assert spent < rules.rate_min_nanos
    assert detect(cheap, rules, {"key_tiny": 1}) == []
    assert rules.rate_min_nanos == 5 * NANOS_PER_DOLLAR
