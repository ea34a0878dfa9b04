"""Top-ups and pauses where people look: `extproc spend`, `/extproc/v1/me`, the metrics and
the request spans (pure functions of what was read, and the telemetry's own instruments)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc.dataplane.server import report_live
from extproc.governance.keys import Identity
from extproc.governance.live import LiveState
from extproc.governance.pauses import Pause
from extproc.governance.policy import parse_policy_text
from extproc.governance.topups import Grant
from extproc.insight.me import MeReads, me_view, plan_for
from extproc.insight.spend import build_report, render_text
from extproc.insight.spend.halt import Halt
from extproc.insight.telemetry import RequestTelemetry, Telemetry, span_attributes, verdict
from extproc.metering.prices import PriceTable
from extproc.v1.ledger_pb2 import UsageRecord

B = 1_000_000_000
NOW = datetime(2026, 12, 4, 17, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
POLICY = parse_policy_text(
    """
version: 1
timezone: UTC
defaults: {hard_limit: 100%}
workspaces:
  dev:
    budget_usd: 100
    upstream: {key_env: X}
    teams: {platform: {budget_usd: 40}}
    services: {cli: {team: platform}}
"""
)
CALLER = Identity("key_a", "dev", "platform", "cli", None, 0)
GRANTS = (
    Grant("tu_live", "ws", 20 * B, NOW_MS + 3_600_000),
    Grant("tu_team", "team:platform", 5 * B, NOW_MS + 60_000),
    Grant("tu_over", "ws", 7 * B, NOW_MS),  # ended just now, not swept yet: counts nowhere
)
PAUSE = Pause("key_b", "dev", "cli", "repeats", "it looped", NOW_MS - 60_000, "breaker")


def test_spend_counts_live_grants_in_the_hard_limit_and_lists_them_and_pauses() -> None:
    halt = Halt(NOW_MS, {"dev": GRANTS}, (PAUSE,))
    report = build_report(POLICY, {}, NOW, by="team", halt=halt)
    rows = {(r.kind, r.name): r for r in report.rows}
    assert rows[("workspace", "dev")].hard_nanos == 120 * B
    assert rows[("workspace", "dev")].topup_nanos == 20 * B
    assert rows[("team", "platform")].hard_nanos == 45 * B
    data = report.to_dict()
    assert data["rows"][0]["topup_usd"] == "20"
    assert {t["id"] for t in data["topups"]} == {"tu_team", "tu_live"}
    assert [p["key_id"] for p in data["paused"]] == ["key_b"]
    text = render_text(report)
    assert "TOP-UPS (raising hard limits now)" in text and "+$20.00 until" in text
    assert "PAUSED KEYS (refused until resumed)" in text and "key_b (cli)" in text
    # The previous period is history: no grant raises it.
    before = build_report(POLICY, {}, NOW, selection="previous", halt=halt)
    assert before.rows[0].topup_nanos == 0 and "TOP-UPS" not in render_text(before)


def test_me_shows_grants_in_each_budget_the_link_to_ask_and_a_pause() -> None:
    plan = plan_for(POLICY, CALLER, PriceTable.load(), NOW_MS)
    pause = Pause("key_a", "dev", "cli", "manual", "an admin paused it", NOW_MS - 1, "ops")
    reads = MeReads({}, {}, {}, [], {}, GRANTS, pause)
    view: dict[str, Any] = me_view(POLICY, CALLER, plan, reads, NOW_MS)
    budgets = {b["scope"]: b for b in view["budgets"]}
    assert budgets["ws"]["hard_usd"] == "120" and budgets["ws"]["topup_usd"] == "20"
    assert budgets["ws"]["topup_page"] == "/extproc/topup/ws"
    assert budgets["team:platform"]["remaining_usd"] == "45"
    assert budgets["key:key_a"]["topup_page"] is None  # no hard limit: nothing to ask for
    assert view["paused"]["why"] == "an admin paused it" and view["paused"]["by"] == "ops"


def test_a_paused_refusal_is_its_own_denial_reason_and_a_grant_shows_on_the_span() -> None:
    refused = UsageRecord(outcome="rejected", error_code="key_paused", status=403)
    assert verdict(refused, rejected=True, denial_reason=None, downgraded=False) == (
        "denied", "paused")  # fmt: skip
    bad = UsageRecord(outcome="rejected", error_code="invalid_json", status=400)
    assert verdict(bad, rejected=True, denial_reason=None, downgraded=False)[1] == "bad_request"
    t = RequestTelemetry(UsageRecord(endpoint="responses", outcome="completed"), 1, 2, None,
                         None, "allowed", None, None, None, 0, topup_nanos=20 * B)  # fmt: skip
    assert span_attributes(t)["extproc.topup_usd"] == 20.0


def test_gauges_of_live_grants_and_pauses_and_the_trip_counter() -> None:
    reader = InMemoryMetricReader()
    telemetry = Telemetry(meter_provider=MeterProvider(metric_readers=[reader]))
    try:
        live = LiveState(None, lambda: POLICY)  # type: ignore[arg-type]
        soon = time.time_ns() // 1_000_000 + 3_600_000  # the gauges read the wall clock
        live._grants = {"dev": (Grant("tu_live", "ws", 20 * B, soon),)}
        live.paused.update({"key_b": PAUSE})
        report_live(telemetry, live)
        assert telemetry.halt is not None
        telemetry.halt.trip("dev", "repeats", "enforce")
        points = _points(reader)
        assert points["extproc.topup.usd"] == {
            frozenset({("workspace", "dev"), ("scope", "ws")}): 20
        }
        assert points["extproc.keys.paused"] == {frozenset({("workspace", "dev")}): 1}
        assert points["extproc.breaker.trips"] == {
            frozenset({("workspace", "dev"), ("rule", "repeats"), ("mode", "enforce")}): 1
        }
        live._grants = {}
        live.paused.clear()
        report_live(telemetry, live)  # ended grants and resumed keys drop to zero
        points = _points(reader)
        assert set(points["extproc.topup.usd"].values()) == {0.0}
        assert points["extproc.keys.paused"] == {frozenset({("workspace", "dev")}): 0}
    finally:
        telemetry.shutdown()


def _points(reader: InMemoryMetricReader) -> dict[str, dict[frozenset[tuple[str, Any]], Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        m.name: {frozenset(p.attributes.items()): p.value for p in m.data.data_points}
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
