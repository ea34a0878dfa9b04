"""Burn-rate watch: the projection, baseline and forecast as plain functions, then a week of
traffic settled through the real Ledger into a real Redis, watched by two replicas that
deliver to a real webhook receiver."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc.governance.budget import plan_request
from extproc.governance.keys import Identity
from extproc.governance.policy import PolicyError, parse_policy_text
from extproc.insight.alerts import Alerter
from extproc.insight.burn import (
    ALERT_TTL_S,
    Baseline,
    Burn,
    BurnWatch,
    alert_text,
    alerted_key,
    burn_reads,
    burn_state,
    choose_baseline,
    clock_at,
    project_day,
    utilization,
)
from extproc.insight.telemetry import Telemetry
from extproc.metering.ledger import Ledger
from extproc.metering.prices import PriceTable
from extproc.store.clients import make_client
from extproc.v1.ledger_pb2 import ScopeCharge, Settlement, UsageRecord
from tests.conftest import Hooks

BERLIN = ZoneInfo("Europe/Berlin")
USD = 1_000_000_000
UNIT = 600_000_000  # $0.60: the CI service's normal spend per hour
POLICY_TEXT = """
version: 1
timezone: Europe/Berlin
workspaces:
  eng:
    budget_usd: 3000
    upstream: {{key_env: TEST_UPSTREAM}}
    services:
      ide: {{}}
      ci: {{budget_usd: 200}}
alerts:
  webhooks:
    - url: http://127.0.0.1:{port}/hook
      events: [burn_rate]
"""
POLICY = parse_policy_text(POLICY_TEXT.format(port=9))


def berlin(*args: int) -> datetime:
    return datetime(*args, tzinfo=BERLIN)  # type: ignore[misc]


def ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


# --- policy --------------------------------------------------------------------------------


def test_policy_defaults_and_per_workspace_overrides() -> None:
    ws = POLICY.workspaces["eng"]
    assert (ws.burn_alert_multiple, ws.burn_alert_min_nanos) == (Decimal(3), USD)
    text = """
version: 1
defaults: {burn_alert_multiple: "2.5", burn_alert_min_usd: "0.25"}
workspaces:
  a: {budget_usd: 10, upstream: {key_env: K}}
  b: {budget_usd: 10, upstream: {key_env: K}, burn_alert_multiple: 5, burn_alert_min_usd: 0}
"""
    policy = parse_policy_text(text)
    a, b = policy.workspaces["a"], policy.workspaces["b"]
    assert (a.burn_alert_multiple, a.burn_alert_min_nanos) == (Decimal("2.5"), 250_000_000)
    assert (b.burn_alert_multiple, b.burn_alert_min_nanos) == (Decimal(5), 0)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("burn_alert_multiple", 1, "must be a number above 1 and at most 100"),
        ("burn_alert_multiple", "0.5", "at most 100 (3 alerts at three times the usual daily "),
        ("burn_alert_multiple", 101, "got 101"),
        ("burn_alert_multiple", True, "got true"),
        ("burn_alert_multiple", "3x", 'got "3x"'),
        ("burn_alert_min_usd", -1, "must be a positive decimal string or number"),
        ("burn_alert_min_usd", "$1", 'got "$1"'),
        ("burn_alert_min_usd", False, "got false"),
        ("burn_alert_mutliple", 3, 'unknown field (did you mean "burn_alert_multiple"?)'),
    ],
)
def test_policy_names_a_bad_burn_setting(field: str, value: Any, problem: str) -> None:
    for where in ("defaults", "workspaces.a"):
        defaults = {field: value} if where == "defaults" else {}
        own = {field: value} if where != "defaults" else {}
        doc = json.dumps(
            {
                "version": 1,
                "defaults": defaults,
                "workspaces": {"a": {"budget_usd": 10, "upstream": {"key_env": "K"}, **own}},
            }
        )
        with pytest.raises(PolicyError) as err:
            parse_policy_text(doc)
        (line,) = err.value.problems
        assert line.startswith(f"policy.yaml: {where}.{field}: ") and problem in line, line


# --- the arithmetic ------------------------------------------------------------------------


def test_rate_window_is_never_shorter_than_half_an_hour() -> None:
    early = clock_at(berlin(2026, 11, 10, 9, 10), POLICY)
    assert early.window_hours == ("2026-11-10T08", "2026-11-10T09")
    assert early.window_ms == 70 * 60_000
    late = clock_at(berlin(2026, 11, 10, 9, 40), POLICY)
    assert (late.window_hours, late.window_ms) == (("2026-11-10T09",), 40 * 60_000)
    midnight = clock_at(berlin(2026, 11, 10, 0, 5), POLICY)
    assert midnight.window_hours == ("2026-11-09T23", "2026-11-10T00")
    assert midnight.remaining_ms == (24 * 60 - 5) * 60_000
    # 02:10 after the clocks went back: the repeated hour is one bucket holding two hours.
    second = datetime(2026, 10, 25, 2, 10, fold=1, tzinfo=BERLIN)
    back = clock_at(second, POLICY)
    assert (back.window_hours, back.window_ms) == (("2026-10-25T02",), 70 * 60_000)
    assert back.remaining_ms == (21 * 60 + 50) * 60_000
    after = clock_at(berlin(2026, 10, 25, 3, 10), POLICY)
    assert after.window_hours == ("2026-10-25T02", "2026-10-25T03")
    assert after.window_ms == 130 * 60_000
    # Clocks go forward: 01:59 CET is followed by 03:00 CEST, and there is no bucket 02.
    spring = clock_at(berlin(2027, 3, 28, 3, 10), POLICY)
    assert (spring.window_hours, spring.window_ms) == (
        ("2027-03-28T01", "2027-03-28T03"),
        70 * 60_000,
    )


def test_projection_extends_the_recent_rate_to_midnight() -> None:
    clock = clock_at(berlin(2026, 11, 10, 9, 30), POLICY)
    # $14 so far; $3 in the last half hour is $6 an hour for 14.5 more hours.
    assert project_day(14 * USD, 3 * USD, clock) == 101 * USD
    assert project_day(5, 0, clock) == 5


def test_baseline_prefers_two_or_more_same_weekdays_else_the_last_week() -> None:
    tue = date(2026, 11, 10)
    spend = {tue - timedelta(days=k): k * USD for k in range(1, 29)}
    everything = set(spend)
    weekly = choose_baseline(spend, everything, tue)
    assert weekly == Baseline((7 + 14 + 21 + 28) * USD // 4, weekly.days if weekly else (), True)
    assert weekly is not None and weekly.describe() == "the average of the last 4 Tuesdays"
    one_tuesday = {d for d in everything if d >= tue - timedelta(days=7)}
    trailing = choose_baseline(spend, one_tuesday, tue)
    assert trailing is not None and not trailing.same_weekday
    assert (trailing.nanos, len(trailing.days)) == (4 * USD, 7)
    assert trailing.describe() == "the average of the last 7 days"
    # A day without any traffic in the workspace is no history, not a free day.
    short = choose_baseline(spend, {tue - timedelta(days=1)}, tue)
    assert short is not None and (short.nanos, short.describe()) == (USD, "the day before")
    assert choose_baseline(spend, set(), tue) is None


def burn(**overrides: Any) -> Burn:
    fields: dict[str, Any] = {
        "workspace": "eng",
        "scope": "svc:ci",
        "service": "ci",
        "day": date(2026, 11, 10),
        "today_nanos": 10 * USD,
        "recent_nanos": 2 * USD,
        "window_ms": 3_600_000,
        "projected_nanos": 60 * USD,
        "baseline": Baseline(20 * USD, (date(2026, 11, 9),), False),
        "multiple": Decimal(3),
        "min_nanos": USD,
        "spent_nanos": 100 * USD,
        "hard_nanos": 220 * USD,
        "forecast_nanos": 500 * USD,
        "runs_out": berlin(2026, 11, 12, 6),
    }
    return Burn(**{**fields, **overrides})


def test_alert_needs_the_multiple_history_and_real_money() -> None:
    assert burn().ratio == 3 and burn().alert
    assert not burn(projected_nanos=59 * USD).alert  # 2.95x
    assert not burn(baseline=None).alert and burn(baseline=None).ratio is None
    assert not burn(today_nanos=USD - 1).alert  # pennies, however fast
    waking = burn(baseline=Baseline(0, (date(2026, 11, 9),), False))
    assert waking.ratio is None and waking.alert  # a scope that spends nothing, spending
    assert not burn(min_nanos=0, today_nanos=0, baseline=waking.baseline).alert


def test_alert_text_says_who_how_fast_and_when_the_money_runs_out() -> None:
    text = alert_text(burn())
    assert text == (
        "extproc: burn rate alert for service ci in workspace eng: today is heading for "
        "$60.00, 3.00x the day before ($20.00). Spent so far today: $10.00. At this pace the "
        "$220.00 hard limit is reached on 2026-11-12 06:00 CET and calls will be refused."
    )
    ws = alert_text(burn(scope="ws", service="", runs_out=None, hard_nanos=3300 * USD))
    assert ws.startswith("extproc: burn rate alert for workspace eng: ")
    assert ws.endswith("At this pace the $3,300.00 hard limit holds this period.")
    free = alert_text(burn(baseline=Baseline(0, (date(2026, 11, 9),), False), hard_nanos=None))
    assert "heading for $60.00, against $0.00 on the day before." in free


def test_forecast_continues_today_then_repeats_the_projected_day() -> None:
    # Tuesday 09:30, no history: $10 so far, $6/h in the last half hour -> $97 today.
    now = berlin(2026, 11, 10, 9, 30)
    hashes = {
        "{ws:eng}:day:2026-11-10": {"ws": 10 * USD, "svc:ci": 10 * USD},
        "{ws:eng}:hour:2026-11-10T09": {"ws": 3 * USD, "svc:ci": 3 * USD},
        "{ws:eng}:spent:2026-11": {"ws": 100 * USD, "svc:ci": 100 * USD},
    }
    states = {b.scope: b for b in burn_state(POLICY, hashes, now)}
    assert set(states) == {"ws", "svc:ide", "svc:ci"}
    ci = states["svc:ci"]
    assert (ci.projected_nanos, ci.baseline, ci.alert) == (97 * USD, None, False)
    # The $220 hard limit: $87 more today, then $97 a day from midnight: $33 more on the
    # 11th, 33/97 of a day after midnight.
    assert ci.hard_nanos == 220 * USD and ci.runs_out is not None
    expected = berlin(2026, 11, 11) + timedelta(days=33 / 97)
    assert abs(ci.runs_out - expected) < timedelta(milliseconds=1)
    # 20 days after today at $97 each, plus the rest of today, on top of $100.
    assert ci.forecast_nanos == 100 * USD + 87 * USD + 20 * 97 * USD
    ws = states["ws"]
    assert ws.hard_nanos == 3300 * USD and ws.runs_out is None  # $2,127 < $3,300
    assert states["svc:ide"].hard_nanos is None and states["svc:ide"].runs_out is None
    # Within today at the recent rate: $3 more needed at $6 an hour is half an hour.
    near = {**hashes, "{ws:eng}:spent:2026-11": {"svc:ci": 217 * USD}}
    ci = next(b for b in burn_state(POLICY, near, now) if b.scope == "svc:ci")
    assert ci.runs_out == berlin(2026, 11, 10, 10)
    past = {**hashes, "{ws:eng}:spent:2026-11": {"svc:ci": 230 * USD}}
    ci = next(b for b in burn_state(POLICY, past, now) if b.scope == "svc:ci")
    assert ci.runs_out == now and "already reached" in alert_text(
        burn(spent_nanos=230 * USD, runs_out=now)
    )


def test_reads_are_one_field_list_per_hash() -> None:
    reads = burn_reads(POLICY, berlin(2026, 11, 10, 9, 10))
    fields = ("ws", "svc:ide", "svc:ci")
    assert all(f == fields for f in reads.values())
    days = sorted(k for k in reads if ":day:" in k)
    assert days[0] == "{ws:eng}:day:2026-10-13" and days[-1] == "{ws:eng}:day:2026-11-10"
    assert len(days) == 1 + 7 + 3  # today, the last week, three more Tuesdays
    assert {"{ws:eng}:hour:2026-11-10T08", "{ws:eng}:hour:2026-11-10T09"} <= reads.keys()
    assert "{ws:eng}:spent:2026-11" in reads


# --- a week of traffic in Redis, two replicas watching ---------------------------------------


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    h = Hooks()
    yield h
    h.server.shutdown()


@dataclass(frozen=True, slots=True)
class Call:
    at: datetime
    service: str
    cost: int


def normal_hour(day: date, hour: int) -> list[Call]:
    """Two calls per service per hour: the IDE busy in office hours, CI around the clock."""
    weekend = day.weekday() >= 5
    ide = UNIT // 5 if weekend else (2 * UNIT if 9 <= hour < 18 else UNIT // 2)
    ci = UNIT // 2 if weekend else UNIT
    start = datetime(day.year, day.month, day.day, hour, tzinfo=BERLIN)
    return [
        Call(start + timedelta(minutes=minute), service, cost // 2)
        for minute in (10, 40)
        for service, cost in (("ide", ide), ("ci", ci))
    ]


def runaway_hour(day: date, hour: int) -> list[Call]:
    """A CI script in a retry loop: five times CI's usual hourly spend, every ten minutes."""
    start = datetime(day.year, day.month, day.day, hour, tzinfo=BERLIN)
    return [Call(start + timedelta(minutes=m), "ci", 5 * UNIT // 6) for m in range(5, 60, 10)]


RUNAWAY_START = berlin(2026, 11, 10, 9)  # a Tuesday, after six ordinary days


def traffic() -> list[Call]:
    calls: list[Call] = []
    for offset in range(8):  # Wednesday 4th to Wednesday 11th
        day = date(2026, 11, 4) + timedelta(days=offset)
        for hour in range(24):
            calls += normal_hour(day, hour)
            if datetime(day.year, day.month, day.day, hour, tzinfo=BERLIN) >= RUNAWAY_START:
                calls += runaway_hour(day, hour)
    return sorted(calls, key=lambda c: c.at)


def settlement(call: Call, n: int, prices: PriceTable) -> Settlement:
    identity = Identity(f"key_{call.service}", "eng", None, call.service, None, 0)
    plan = plan_request(
        POLICY,
        identity,
        model="gpt-4o-mini",
        counted_input=1000,
        output_cap=None,
        prices=prices,
        now_ms=ms(call.at),
    )
    scopes = [
        ScopeCharge(scope=s.scope, soft_nanos=-1 if s.soft_nanos is None else s.soft_nanos)
        for s in plan.scopes
    ]
    return Settlement(
        prefix=plan.prefix,
        period=plan.period.id,
        day=call.at.strftime("%Y-%m-%d"),
        hour=call.at.strftime("%Y-%m-%dT%H"),
        scopes=[*scopes, ScopeCharge(scope=f"sess:s{n % 7}", soft_nanos=-1)],
        record=UsageRecord(
            request_id=f"r{n}", cost_nanos=call.cost, workspace="eng", service=call.service
        ),
    )


def check_times() -> list[datetime]:
    """Several looks each ordinary day, every quarter hour around the spike."""
    times = []
    for offset in range(6):
        day = date(2026, 11, 4) + timedelta(days=offset)
        for hh, mm in ((0, 20), (3, 0), (8, 45), (9, 30), (10, 0), (13, 0), (17, 45), (23, 50)):
            times.append(datetime(day.year, day.month, day.day, hh, mm, tzinfo=BERLIN))
    times += [berlin(2026, 11, 10, 0, 20), berlin(2026, 11, 10, 8, 45)]
    times += [RUNAWAY_START + timedelta(minutes=15 * k) for k in range(9)]  # 09:00 to 11:00
    times += [berlin(2026, 11, 10, 15), berlin(2026, 11, 10, 23, 50), berlin(2026, 11, 11, 0, 30)]
    return times


def test_runaway_ci_alerts_within_the_hour_once_across_replicas(
    redis_url: str, hooks: Hooks, tmp_path: Path
) -> None:
    policy = parse_policy_text(POLICY_TEXT.format(port=hooks.port))
    prices = PriceTable.load()
    calls = traffic()
    reader = InMemoryMetricReader()
    telemetry = Telemetry(meter_provider=MeterProvider(metric_readers=[reader]))

    def gauge() -> dict[tuple[str, str], float]:
        data = reader.get_metrics_data()
        assert data is not None
        return {
            (p.attributes["workspace"], p.attributes["service"]): p.value
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == "extproc.burn_rate.ratio"
            for p in metric.data.data_points
        }

    def utilization_gauge() -> dict[tuple[str, str], float]:
        data = reader.get_metrics_data()
        assert data is not None
        return {
            (p.attributes["workspace"], p.attributes["scope"]): p.value
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == "extproc.budget.utilization.ratio"
            for p in metric.data.data_points
        }

    async def scenario() -> dict[datetime, list[Burn]]:
        client = make_client(redis_url)
        ledger = Ledger(client, spool_dir=tmp_path / "spool")
        await ledger.start()
        clock = {"now": 0}
        replicas = []
        for _ in range(2):
            alerter = Alerter(lambda event: [w.url for w in policy.webhooks], delays=(0.05,))
            watch = BurnWatch(
                make_client(redis_url),
                lambda: policy,
                alerter,
                telemetry,
                now_ms=lambda: clock["now"],
            )
            replicas.append((watch, alerter))
        seen: dict[datetime, list[Burn]] = {}
        sent = 0
        try:
            for when in check_times():
                while sent < len(calls) and calls[sent].at <= when:
                    ledger.submit(settlement(calls[sent], sent, prices))
                    sent += 1
                await ledger.drain()
                clock["now"] = ms(when)
                for watch, alerter in replicas:
                    seen[when] = await watch.check_once()
                    await alerter.drain()
                if when == berlin(2026, 11, 9, 23, 50):
                    assert hooks.bodies == []  # six ordinary days: not a word
            ttl = await client.ttl("{ws:eng}:alerted:burn:2026-11-10:svc:ci")
            assert 0 < ttl <= ALERT_TTL_S
        finally:
            await ledger.close()
            await client.aclose()
            for watch, _alerter in replicas:
                await watch._redis.aclose()
        assert ledger.written == sent
        return seen

    seen = asyncio.run(scenario())

    alerts = [(b["extproc"]["day"], b["extproc"]["scope"]) for b in hooks.bodies]
    assert sorted(alerts) == [
        ("2026-11-10", "svc:ci"),
        ("2026-11-10", "ws"),
        # Still running after midnight: once more for the new day (yesterday is now in the
        # baseline, but three times a usual day is still in sight).
        ("2026-11-11", "svc:ci"),
        ("2026-11-11", "ws"),
    ]
    # The first look that alerted was at most an hour after the runaway began.
    first = min(when for when, states in seen.items() if any(b.alert for b in states))
    assert RUNAWAY_START < first <= RUNAWAY_START + timedelta(hours=1)
    assert first == berlin(2026, 11, 10, 9, 30)
    ci = next(b for b in seen[first] if b.scope == "svc:ci")
    assert ci.ratio is not None and ci.ratio >= 3
    assert ci.baseline is not None and not ci.baseline.same_weekday
    assert len(ci.baseline.days) == 6  # Wednesday to Monday: no Tuesday seen yet
    # Every look on the ordinary days stayed below the multiple, with room to spare.
    ordinary = [
        b.ratio
        for when, states in seen.items()
        if when < RUNAWAY_START
        for b in states
        if b.ratio is not None
    ]
    assert ordinary and max(ordinary) < Fraction(5, 2)

    body = next(b for b in hooks.bodies if b["extproc"]["scope"] == "svc:ci")
    details = body["extproc"]
    assert (details["event"], details["workspace"], details["service"]) == (
        "burn_rate",
        "eng",
        "ci",
    )
    assert Decimal(details["ratio"]) >= 3 and details["alert"] is True
    assert details["runs_out_on"] == "2026-11-12"  # $220 hard limit at today's pace
    assert body["text"].startswith("extproc: burn rate alert for service ci in workspace eng: ")
    assert "hard limit is reached on 2026-11-12" in body["text"]
    assert gauge()[("eng", "ci")] >= 3
    # The same looks keep the utilization gauge: the month's spend over each budget.
    last = seen[max(seen)]
    spent = {b.scope: b.spent_nanos for b in last}
    assert utilization_gauge() == {
        ("eng", "ws"): spent["ws"] / (3000 * USD),
        ("eng", "svc:ci"): spent["svc:ci"] / (200 * USD),
    }
    assert alerted_key(ci) == "{ws:eng}:alerted:burn:2026-11-10:svc:ci"


def test_utilization_is_the_periods_spend_over_each_budget() -> None:
    policy = parse_policy_text(
        POLICY_TEXT.format(port=9).replace(
            "    services:\n",
            "    teams:\n      infra: {budget_usd: 400}\n      free: {}\n    services:\n",
            1,
        )
    )
    now = berlin(2026, 11, 10, 9, 10)
    reads = burn_reads(policy, now)
    spent_key = "{ws:eng}:spent:2026-11"
    assert reads[spent_key] == ("ws", "svc:ide", "svc:ci", "team:infra")
    hashes = {spent_key: {"ws": 600 * USD, "svc:ci": 50 * USD, "team:infra": 100 * USD}}
    # Scopes without a budget (service ide, team free) have nothing to be a share of.
    assert utilization(policy, hashes, now) == [
        ("eng", "ws", 0.2),
        ("eng", "team:infra", 0.25),
        ("eng", "svc:ci", 0.25),
    ]
