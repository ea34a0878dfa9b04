"""The spend report: its arithmetic as plain functions, then the command against a real Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from extproc.cli.spend import parse_now
from extproc.governance.budget import Budgets, Decision, Plan, plan_request
from extproc.governance.keys import Identity
from extproc.governance.periods import period_at
from extproc.governance.policy import parse_policy_text
from extproc.insight.spend import (
    SELECTIONS,
    Row,
    build_report,
    days_in,
    forecast,
    render_burn,
    render_cache,
    render_table,
    render_text,
    report_keys,
    report_reads,
    runs_out_at,
    select_period,
)
from extproc.insight.spend.html import axis_usd, chart_svg, chart_top, nice_step, render_html
from extproc.metering.ledger import Ledger
from extproc.metering.prices import PriceTable
from extproc.metering.settlement import Charged, settlement_for
from extproc.store.clients import make_client
from extproc.v1.ledger_pb2 import ScopeCharge, Settlement, UsageRecord

BERLIN = ZoneInfo("Europe/Berlin")
USD = 1_000_000_000
POLICY_TEXT = """
version: 1
timezone: Europe/Berlin
defaults:
  hard_limit: 110%
  default_output_cap: 100
workspaces:
  dev:
    budget_usd: 100
    upstream: {key_env: TEST_UPSTREAM}
    teams:
      platform: {budget_usd: 60}
      web: {}
    services:
      cli: {team: platform, budget_usd: 40}
      bot: {}
  ci:
    budget_usd: 50
    period: week
    upstream: {key_env: TEST_UPSTREAM}
    services:
      runner: {}
"""
POLICY = parse_policy_text(POLICY_TEXT)


def berlin(*args: int) -> datetime:
    return datetime(*args, tzinfo=BERLIN)  # type: ignore[misc]


def ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


# --- arithmetic ----------------------------------------------------------------------------


def test_forecast_extends_the_average_pace_to_the_end_of_the_period() -> None:
    assert forecast(25 * USD, Fraction(1, 4)) == 100 * USD
    assert forecast(26 * USD, 0.325) == 80 * USD  # a float share of the period
    assert forecast(1, Fraction(1, 3)) == 3
    assert forecast(550 * USD + 1, Fraction(1, 3)) == 1650 * USD + 3  # exact, never a float
    assert forecast(0, 0.5) == 0
    assert forecast(7, 0.0) == 7  # no time elapsed: no pace to extend
    assert forecast(7, 1.0) == 7  # a finished period is what it is


@pytest.mark.parametrize(
    ("year", "month", "days"),
    [(2026, 11, 30), (2026, 12, 31), (2027, 2, 28), (2026, 10, 31)],  # October: DST ends
)
def test_runs_out_date_follows_the_pace_whatever_the_month_length(
    year: int, month: int, days: int
) -> None:
    period = period_at("month", ms(berlin(year, month, 10)), BERLIN)
    assert days_in(period) == days
    elapsed = Fraction(9, days)  # 9 whole days gone on the 10th at midnight
    assert period.elapsed_fraction(berlin(year, month, 10)) == pytest.approx(float(elapsed))
    # $200 in 9 days is $22.22 a day: the $550 hard limit falls 24.75 days in.
    out = runs_out_at(200 * USD, 550 * USD, elapsed, period)
    assert out == berlin(year, month, 25, 18)


def test_runs_out_is_none_when_the_pace_does_not_reach_the_limit_this_period() -> None:
    period = period_at("month", ms(berlin(2026, 11, 10)), BERLIN)
    assert runs_out_at(100 * USD, 550 * USD, Fraction(9, 30), period) is None  # day 49.5
    assert runs_out_at(0, 550 * USD, Fraction(9, 30), period) is None
    assert runs_out_at(100 * USD, 550 * USD, Fraction(0), period) is None
    # Already past the limit: the average pace crossed it before now.
    passed = runs_out_at(600 * USD, 550 * USD, Fraction(9, 30), period)
    assert passed == berlin(2026, 11, 9, 6)


def test_previous_period_across_a_year_boundary() -> None:
    new_year = ms(berlin(2027, 1, 1, 0, 30))  # still 2026 in UTC
    assert datetime.fromtimestamp(new_year / 1000, UTC).year == 2026
    month = select_period("month", "previous", new_year, BERLIN)
    assert (month.id, month.start, month.end) == (
        "2026-12",
        berlin(2026, 12, 1),
        berlin(2027, 1, 1),
    )
    assert select_period("month", "current", new_year, BERLIN).id == "2027-01"
    assert select_period("day", "previous", new_year, BERLIN).id == "2026-12-31"
    assert select_period("week", "today", new_year, BERLIN).id == "2027-01-01"
    monday = ms(berlin(2027, 1, 4, 9))
    assert select_period("week", "current", monday, BERLIN).id == "2027-W01"
    week = select_period("week", "previous", monday, BERLIN)
    assert (week.id, week.start) == ("2026-W53", berlin(2026, 12, 28))
    keys = report_keys(POLICY, berlin(2027, 1, 4, 9), "previous")
    assert keys == ["{ws:dev}:spent:2026-12", "{ws:ci}:spent:2026-W53", "{ws:_}:spent:2026-12"]


def test_the_policy_time_zone_decides_which_period_is_read() -> None:
    instant = datetime(2026, 11, 30, 23, 30, tzinfo=UTC)  # Dec 1, 00:30 in Berlin
    nov = {"ws": 90 * USD, "#requests": 9}
    dec = {"ws": 1 * USD, "#requests": 1}
    hashes = {"{ws:dev}:spent:2026-11": nov, "{ws:dev}:spent:2026-12": dec}
    row = build_report(POLICY, hashes, instant).rows[0]
    assert (row.period.id, row.spent_nanos, row.requests) == ("2026-12", 1 * USD, 1)
    assert row.forecast_nanos == 1 * USD * 31 * 48  # half an hour of a 31-day month
    utc = parse_policy_text(POLICY_TEXT.replace("Europe/Berlin", "UTC"))
    row = build_report(utc, hashes, instant).rows[0]
    assert (row.period.id, row.spent_nanos) == ("2026-11", 90 * USD)
    assert "{ws:dev}:day:2026-12-01" in report_keys(POLICY, instant, "today")


def test_parse_now_reads_wall_clock_time_in_the_policy_zone() -> None:
    assert parse_now("2026-11-10T12:00", BERLIN) == berlin(2026, 11, 10, 12)
    assert parse_now("2026-11-10T11:00:00Z", BERLIN) == berlin(2026, 11, 10, 12)
    assert parse_now("2026-11-10T12:00:00+01:00", BERLIN).tzinfo is BERLIN


# --- the report ----------------------------------------------------------------------------

NOW = berlin(2026, 11, 10, 18)  # 9.75 of 30 days: 13/40 of November gone
HASHES = {
    "{ws:dev}:spent:2026-11": {
        "ws": 27_300_000_000,
        "#requests": 4,
        "team:platform": 26 * USD,
        "team:web": 1_300_000_000,
        "svc:cli": 26 * USD,
        "svc:bot": 1_300_000_000,
        "key:key_a": 26 * USD,
        "key:key_b": 1_300_000_000,
        "model:gpt-4o-mini": 27_300_000_000,
    },
    "{ws:dev}:held:2026-11": {"ws": 210_000, "team:platform": 210_000, "svc:cli": 210_000},
    "{ws:dev}:day:2026-11-10": {"ws": 2 * USD, "svc:cli": 2 * USD},
}


def by_name(rows: tuple[Row, ...]) -> dict[tuple[str, str], Row]:
    return {(r.workspace, r.name): r for r in rows}


def test_report_per_service_with_shares_forecasts_and_zero_rows() -> None:
    report = build_report(POLICY, HASHES, NOW, by="service")
    assert [(r.workspace, r.kind, r.name) for r in report.rows] == [
        ("dev", "workspace", "dev"),
        ("dev", "service", "cli"),
        ("dev", "service", "bot"),
        ("ci", "workspace", "ci"),
        ("ci", "service", "runner"),
    ]
    rows = by_name(report.rows)
    dev, cli, bot = rows["dev", "dev"], rows["dev", "cli"], rows["dev", "bot"]
    assert (dev.requests, dev.held_nanos, dev.forecast_nanos) == (4, 210_000, 84 * USD)
    assert str(dev.share_pct) == "27.3" and dev.runs_out is None and not dev.over_budget
    # cli: $26 of its own $40, heading for $80; its $44 hard limit falls on day 16.5.
    assert (cli.budget_nanos, cli.hard_nanos, cli.forecast_nanos) == (40 * USD, 44 * USD, 80 * USD)
    assert cli.share_pct == 65 and cli.held_nanos == 210_000 and cli.over_budget
    assert cli.runs_out is not None and cli.runs_out.date().isoformat() == "2026-11-17"
    # bot has no budget: its share is of the workspace's, and its reservations are not tracked.
    assert (bot.budget_nanos, bot.share_base_nanos, bot.held_nanos) == (None, 100 * USD, None)
    assert bot.share_pct == Decimal("1.3") and bot.runs_out is None
    ci = rows["ci", "ci"]
    assert (ci.period.id, ci.spent_nanos, ci.requests, ci.forecast_nanos) == ("2026-W46", 0, 0, 0)
    assert rows["ci", "runner"].spent_nanos == 0
    totals = report.totals
    assert (totals.spent_nanos, totals.requests, totals.budget_nanos) == (
        27_300_000_000,
        4,
        150 * USD,
    )
    assert (totals.held_nanos, totals.forecast_nanos) == (210_000, 84 * USD)


def test_report_per_team_key_and_model() -> None:
    teams = by_name(build_report(POLICY, HASHES, NOW, by="team").rows)
    assert teams["dev", "platform"].budget_nanos == 60 * USD
    assert teams["dev", "platform"].hard_nanos == 66 * USD
    assert teams["dev", "web"].share_base_nanos == 100 * USD
    assert ("ci", "platform") not in teams
    keys = by_name(build_report(POLICY, HASHES, NOW, by="key").rows)
    assert keys["dev", "key_b"].spent_nanos == 1_300_000_000
    assert keys["dev", "key_b"].held_nanos is None
    models = build_report(POLICY, HASHES, NOW, by="model").rows
    assert [(r.kind, r.name, r.spent_nanos) for r in models if r.kind == "model"] == [
        ("model", "gpt-4o-mini", 27_300_000_000)
    ]


def test_previous_period_has_no_forecast_and_nothing_in_flight() -> None:
    hashes = {"{ws:dev}:spent:2026-10": {"ws": 120 * USD, "#requests": 7}}
    report = build_report(POLICY, hashes, NOW, selection="previous")
    dev = report.rows[0]
    assert (dev.period.id, dev.spent_nanos, dev.requests) == ("2026-10", 120 * USD, 7)
    assert (dev.forecast_nanos, dev.held_nanos, dev.runs_out) == (None, None, None)
    assert dev.limit_reached and dev.share_pct == 120
    assert (report.totals.forecast_nanos, report.totals.held_nanos) == (None, None)


def test_today_compares_with_a_days_share_of_the_budget() -> None:
    report = build_report(POLICY, HASHES, NOW, selection="today")
    rows = by_name(report.rows)
    dev, ci = rows["dev", "dev"], rows["ci", "ci"]
    assert dev.period.id == "2026-11-10" and dev.requests is None
    assert dev.budget_nanos == 100 * USD // 30 and ci.budget_nanos == 50 * USD // 7
    assert dev.spent_nanos == 2 * USD and dev.forecast_nanos == 2_666_666_667  # 18h of 24h
    assert dev.hard_nanos is None and dev.runs_out is None
    assert report.totals.requests is None


def test_unattributed_spend_gets_a_row_only_when_there_is_some() -> None:
    assert all(r.workspace != "_" for r in build_report(POLICY, HASHES, NOW).rows)
    hashes = {**HASHES, "{ws:_}:spent:2026-11": {"ws": 5 * USD, "#requests": 2}}
    report = build_report(POLICY, hashes, NOW)
    row = report.rows[-1]
    assert (row.workspace, row.spent_nanos, row.budget_nanos, row.share_pct) == (
        "_",
        5 * USD,
        None,
        None,
    )
    assert report.totals.spent_nanos == 32_300_000_000
    assert "(unattributed)" in render_table(report)


def test_table_shows_money_to_the_cent_and_the_outlook() -> None:
    text = render_table(build_report(POLICY, HASHES, NOW, by="service"))
    lines = text.splitlines()
    assert lines[0] == "spend, current period, as of 2026-11-10 18:00 Europe/Berlin"
    cli = next(line for line in lines if "svc cli" in line)
    assert "$26.00" in cli and "$40.00" in cli and "65.0%" in cli and "runs out 2026-11-17" in cli
    total = lines[-1].split()
    assert total[:5] == ["TOTAL", "$27.30", "4", "$150.00", "18.2%"]


# --- the command against Redis -----------------------------------------------------------


def settled(p: Plan, cost: int, request_id: str, now_ms: int) -> Settlement:
    """What the exchange hands the ledger for a request settled under plan `p`."""
    record = UsageRecord(
        request_id=request_id, cost_nanos=cost, workspace=p.workspace, model_served="gpt-4o-mini"
    )
    return settlement_for(
        record,
        [Charged(s.scope, s.soft_nanos) for s in p.scopes],
        prefix=p.prefix,
        period_id=p.period.id,
        local_time=datetime.fromtimestamp(now_ms / 1000, BERLIN),
        prices=PriceTable.load(),
    )


def test_spend_command_reports_what_the_ledger_settled(redis_url: str, tmp_path: Path) -> None:
    now_ms = ms(NOW)
    prices = PriceTable.load()

    def plan(service: str, key: str) -> Plan:
        identity = Identity(key, "dev", None, service, None, 0)
        return plan_request(
            POLICY,
            identity,
            model="gpt-4o-mini",
            counted_input=1000,
            output_cap=None,
            prices=prices,
            now_ms=now_ms,
        )

    cli, bot = plan("cli", "key_a"), plan("bot", "key_b")

    async def write() -> Decision:
        client = make_client(redis_url)
        ledger = Ledger(client, spool_dir=tmp_path / "spool")
        await ledger.start()
        try:
            first = settled(cli, 10 * USD, "r1", now_ms)
            for s in (first, settled(cli, 9 * USD, "r2", now_ms), first):
                ledger.submit(s)
            ledger.submit(settled(cli, 7 * USD, "r3", now_ms))
            ledger.submit(settled(bot, 1_300_000_000, "r4", now_ms))
            await ledger.drain()
            return await Budgets(client).reserve(cli, False, now_ms)  # still in flight
        finally:
            await ledger.close()
            await client.aclose()

    assert asyncio.run(write()).allowed
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY_TEXT)
    out = subprocess.run(
        [
            *(sys.executable, "-m", "extproc", "spend", "--json", "--by", "service"),
            *("--now", "2026-11-10T17:00:00Z", "--policy", str(policy_file)),
            *("--redis-url", redis_url),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    report = json.loads(out.stdout)
    assert (report["period"], report["generated_at"]) == ("current", "2026-11-10T18:00:00+01:00")
    fields = ("spent_usd", "requests", "budget_usd", "share_pct", "share_of", "held_usd")
    fields += ("forecast_usd", "over_budget", "runs_out_on")
    rows = {(r["workspace"], r["name"]): [r[f] for f in fields] for r in report["rows"]}
    assert rows == {
        ("dev", "dev"): ["27.3", 4, "100", "27.30", "own", "0.00021", "84", False, None],
        # $26 of its own $40 in 13/40 of the month: $80 by the end, its $44 hard limit on the
        # 17th (16.5 days in).
        ("dev", "cli"): ["26", None, "40", "65.00", "own", "0.00021", "80", True, "2026-11-17"],
        # No budget of its own: a share of the workspace's, reservations not tracked.
        ("dev", "bot"): ["1.3", None, None, "1.30", "workspace", None, "4", False, None],
        ("ci", "ci"): ["0", 0, "50", "0.00", "own", "0", "0", False, None],
        ("ci", "runner"): ["0", None, None, "0.00", "workspace", None, "0", False, None],
    }
    by_id = {r["name"]: r for r in report["rows"]}
    assert (by_id["dev"]["period_id"], by_id["ci"]["period_id"]) == ("2026-11", "2026-W46")
    assert by_id["cli"]["hard_limit_usd"] == "44"
    assert report["totals"] == {
        "spent_usd": "27.3",
        "requests": 4,
        "budget_usd": "150",
        "share_pct": "18.20",
        "held_usd": "0.00021",
        "forecast_usd": "84",
    }


# --- burn, sessions, prompt cache and the HTML page ------------------------------------------

SESSIONS = {f"sess:s{i:02d}": (i + 1) * 100_000_000 for i in range(12)}
CACHE = {
    "input_tokens:svc:cli": 10_000,
    "cached_tokens:svc:cli": 2_500,
    "repeat_tokens:svc:cli": 6_000,
    "cachemiss_tokens:svc:cli": 3_500,
    "cachemiss_nanos:svc:cli": 262_500,
    "input_tokens:svc:bot": 1_000,
    "cached_tokens:svc:bot": 0,
}
RICH = {
    **HASHES,
    "{ws:dev}:spent:2026-11": {**HASHES["{ws:dev}:spent:2026-11"], **SESSIONS, **CACHE},
    "{ws:dev}:day:2026-11-10": {"ws": 2 * USD, "svc:cli": 2 * USD, "sess:s11": 400_000_000},
    "{ws:dev}:hour:2026-11-10T17": {"ws": USD, "svc:cli": USD},
    **{f"{{ws:dev}}:day:2026-11-0{d}": {"ws": USD // 4, "svc:cli": USD // 4} for d in range(3, 10)},
}


def test_by_session_lists_the_ten_costliest_with_what_today_added() -> None:
    report = build_report(POLICY, RICH, NOW, by="session")
    sessions = [r for r in report.rows if r.kind == "session"]
    assert [r.name for r in sessions] == [f"s{i:02d}" for i in range(11, 1, -1)]
    top = sessions[0]
    assert (top.spent_nanos, top.today_nanos, top.forecast_nanos) == (
        1_200_000_000,
        4 * 10**8,
        None,
    )
    assert sessions[1].today_nanos == 0
    assert all(r.workspace == "dev" for r in sessions)  # ci has no sessions
    assert "{ws:dev}:day:2026-11-10" in report_keys(POLICY, NOW, "current", "session")
    lines = render_table(report).splitlines()
    assert any("sess s11" in line and "today $0.40" in line for line in lines)
    row = next(r for r in report.to_dict()["rows"] if r["name"] == "s11")
    assert (row["kind"], row["spent_usd"], row["today_usd"]) == ("session", "1.2", "0.4")


def test_prompt_cache_section_per_service() -> None:
    report = build_report(POLICY, RICH, NOW)
    assert [(c.workspace, c.service) for c in report.cache] == [("dev", "cli"), ("dev", "bot")]
    cli = report.cache[0]
    assert cli.hit_pct == 25 and (cli.repeat_tokens, cli.miss_tokens) == (6_000, 3_500)
    assert report.to_dict()["cache"][0] == {
        "workspace": "dev",
        "service": "cli",
        "period_id": "2026-11",
        "input_tokens": 10_000,
        "cached_tokens": 2_500,
        "hit_rate_pct": "25.00",
        "repeat_prefix_tokens": 6_000,
        "missed_tokens": 3_500,
        "missed_usd": "0.0002625",
    }
    text = render_cache(report)
    assert render_text(report).endswith(text)
    cache_line = next(line.split() for line in text.splitlines() if line.startswith("dev  "))
    assert cache_line[:3] == ["dev", "cli", "2026-11"]
    assert cache_line[3:] == ["10,000", "2,500", "25.0%", "6,000", "3,500", "$0.0002625"]
    # `today` still reports the period's counters, read field by field.
    reads = report_reads(POLICY, NOW, "today")
    assert "cachemiss_nanos:svc:cli" in reads["{ws:dev}:spent:2026-11"]


def test_burn_section_projects_today_and_flags_an_alert() -> None:
    report = build_report(POLICY, RICH, NOW)
    assert report.burn is not None
    burn = {(b.workspace, b.scope): b for b in report.burn}
    dev = burn["dev", "ws"]
    # 18:00: the last hour cost $1, so six more hours add $6 to today's $2; a usual day
    # (the 3rd to the 9th) is $0.25.
    assert (dev.today_nanos, dev.projected_nanos, dev.baseline_nanos) == (
        2 * USD,
        8 * USD,
        USD // 4,
    )
    assert dev.ratio == 32 and dev.alert
    assert not burn["ci", "ws"].alert and burn["ci", "ws"].baseline is None
    as_json = report.to_dict()["burn"][0]
    assert (as_json["ratio"], as_json["alert"], as_json["projected_usd"]) == ("32.00", True, "8")
    text = render_burn(report).splitlines()
    assert text[0].startswith("burn today, as of 18:00")
    dev_line = next(line.split() for line in text if line.startswith("dev "))
    assert dev_line[:6] == ["dev", "$2.00", "$8.00", "$0.25", "32.00x", "ALERT"]
    assert build_report(POLICY, RICH, NOW, selection="previous").burn is None
    assert build_report(POLICY, RICH, NOW, selection="previous").to_dict()["burn"] is None


class PageCheck(HTMLParser):
    """What a browser would fetch, and what each SVG draws."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs: list[dict[str, list[dict[str, str | None]]]] = []
        self.tags: list[str] = []
        self.external: list[str] = []
        self.open: list[str] = []

    VOID = frozenset({"meta", "br", "hr", "img", "input", "link", "wbr"})

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag not in self.VOID:
            self.open.append(tag)
        found = dict(attrs)
        for name in ("src", "href", "xlink:href"):
            if found.get(name):
                self.external.append(f"{tag} {name}={found[name]}")
        if tag == "svg":
            self.svgs.append({})
        elif self.svgs and "svg" in self.open:
            for cls in (found.get("class") or "").split():
                self.svgs[-1].setdefault(f"{tag}.{cls}", []).append(found)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.open.pop()

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, (tag, self.open[-5:])
        self.open.pop()


def check_page(page: str) -> PageCheck:
    parser = PageCheck()
    parser.feed(page)
    parser.close()
    assert parser.open == [] and parser.tags[0] == "html"
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(parser.tags)
    assert parser.external == [] and "url(http" not in page and "@import" not in page
    return parser


def test_html_page_draws_one_burn_chart_per_workspace() -> None:
    report = build_report(POLICY, RICH, NOW, by="service")
    dev_chart = next(c for c in report.charts if c.workspace == "dev")
    assert [d.isoformat() for d, _n in dev_chart.daily][:2] == ["2026-11-01", "2026-11-02"]
    assert len(dev_chart.daily) == 10 and dev_chart.spent_nanos == 7 * USD // 4 + 2 * USD
    page = render_html(report)
    parser = check_page(page)
    assert len(parser.svgs) == len(POLICY.workspaces) == 2
    for svg in parser.svgs:
        (budget,) = svg["line.budget-line"]
        (soft,) = svg["line.soft-line"]
        (hard,) = svg["line.hard-line"]
        # SVG y grows downwards: hard limit above the budget above the 75% soft limit.
        assert float(hard["y1"] or 0) < float(budget["y1"] or 0) < float(soft["y1"] or 0)
        assert "polyline.spend-line" in svg
    dev = parser.svgs[0]
    assert dev["line.budget-line"][0]["data-usd"] == "$100"
    assert dev["line.soft-line"][0]["data-usd"] == "$75"
    assert {"line.forecast-line", "line.pace-line", "line.now-line"} <= dev.keys()
    assert "runs out" not in page or "2026-11-17" in page
    assert "<h3>Burn today</h3>" in page and "<h3>Prompt cache</h3>" in page
    assert '<tr class="alert">' in page  # dev is burning 32 usual days today
    previous = check_page(render_html(build_report(POLICY, RICH, NOW, selection="previous")))
    assert len(previous.svgs) == 2 and "line.forecast-line" not in previous.svgs[0]


def test_chart_keeps_a_runaway_pace_from_flattening_the_limits() -> None:
    report = build_report(POLICY, RICH, NOW)
    chart = next(c for c in report.charts if c.workspace == "dev")
    assert chart.burn_forecast_nanos == 193_300_000_000  # within twice the $110 hard limit
    assert chart_top(chart) == chart.burn_forecast_nanos
    runaway = replace(chart, burn_forecast_nanos=5_000 * USD)
    assert chart_top(runaway) == chart.hard_nanos  # the pace line leaves the chart, clipped
    svg = chart_svg(runaway)
    assert 'class="pace-line" clip-path="url(#plot-dev)"' in svg and "$5,000.00" in svg
    assert nice_step(110 * USD) == 50 * USD and nice_step(7) == 1
    assert (axis_usd(50 * USD), axis_usd(250_000_000), axis_usd(1_500 * USD)) == (
        "$50",
        "$0.25",
        "$1,500",
    )


def test_spend_command_shows_sessions_cache_and_burn_and_writes_html(
    redis_url: str, tmp_path: Path
) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/1"  # a database of its own
    prices = PriceTable.load()

    def write(service: str, when: datetime, cost: int, rid: str, **extra: Any) -> Settlement:
        identity = Identity(f"key_{service}", "dev", None, service, None, 0)
        p = plan_request(
            POLICY,
            identity,
            model="gpt-4o-mini",
            counted_input=1000,
            output_cap=None,
            prices=prices,
            now_ms=ms(when),
        )
        s = settled(p, cost, rid, ms(when))
        s.scopes.append(ScopeCharge(scope=f"sess:{extra.pop('session')}", soft_nanos=-1))
        s.hygiene_scope = f"svc:{service}"
        for name, value in extra.items():
            setattr(s, name, value)
        s.record.input_tokens, s.record.cached_input_tokens = 3_000, extra.get("cached", 0)
        return s

    settlements = [
        write("cli", berlin(2026, 11, d, 12), USD, f"h{d}", session=f"day{d}") for d in range(3, 10)
    ]
    hot = {"prefix_fingerprint": "f00d", "prefix_tokens": 2_000, "miss_nanos_per_token": 75}
    settlements += [
        write("cli", berlin(2026, 11, 10, 17, 10), 5 * USD, "t1", session="loop", **hot),
        write("cli", berlin(2026, 11, 10, 17, 20), 5 * USD, "t2", session="loop", **hot),
        write("bot", berlin(2026, 11, 10, 17, 30), USD, "t3", session="chat"),
    ]

    async def settle_all() -> int:
        client = make_client(url)
        ledger = Ledger(client, spool_dir=tmp_path / "spool")
        await ledger.start()
        try:
            for s in settlements:
                ledger.submit(s)
            await ledger.drain()
            return ledger.written
        finally:
            await ledger.close()
            await client.aclose()

    assert asyncio.run(settle_all()) == len(settlements)
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY_TEXT)
    page = tmp_path / "spend.html"

    def spend(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *(sys.executable, "-m", "extproc", "spend", *args),
                *("--now", "2026-11-10T18:00", "--policy", str(policy_file)),
                *("--redis-url", url),
            ],
            capture_output=True,
            text=True,
            check=True,
            env={"PATH": "/usr/bin:/bin"},
            cwd=tmp_path,
        )

    report = json.loads(spend("--json", "--by", "session", "--html", str(page)).stdout)
    sessions = [(r["name"], r["spent_usd"], r["today_usd"]) for r in report["rows"]]
    # dev, its nine sessions costliest first (ties by name), then ci, which has none.
    assert sessions[1:4] == [("loop", "10", "10"), ("chat", "1", "1"), ("day3", "1", "0")]
    assert [name for name, _spent, _today in sessions][-2:] == ["day9", "ci"]
    assert len(sessions) == 1 + 9 + 1
    cache = {c["service"]: c for c in report["cache"]}
    # The second call re-sent the 2,000-token prefix and none of it was billed as cached.
    assert cache["cli"]["repeat_prefix_tokens"] == 2_000
    assert (cache["cli"]["missed_tokens"], cache["cli"]["missed_usd"]) == (2_000, "0.00015")
    assert cache["cli"]["hit_rate_pct"] == "0.00" and cache["bot"]["repeat_prefix_tokens"] == 0
    burn = {(b["workspace"], b["scope"]): b for b in report["burn"]}
    # $11 today, all of it in the last hour: $11 + 6 x $11 against a usual $1 day.
    assert burn["dev", "ws"]["projected_usd"] == "77" and burn["dev", "ws"]["ratio"] == "77.00"
    assert burn["dev", "ws"]["alert"] and burn["dev", "svc:cli"]["alert"]
    assert burn["dev", "ws"]["baseline_days"][0] == "2026-11-09"
    # cli has spent $17 of its $44 hard limit; at $10 an hour the rest goes by 20:42 tonight.
    assert burn["dev", "svc:cli"]["runs_out_on"] == "2026-11-10"
    parsed = check_page(page.read_text("utf-8"))
    assert len(parsed.svgs) == 2
    text = spend("--by", "session").stdout
    assert "sess loop" in text and "77.00x" in text and "ALERT" in text and "prompt cache" in text


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("by", [None, "session", "service"])
def test_every_selection_renders_as_text_json_and_html(selection: str, by: str | None) -> None:
    report = build_report(POLICY, RICH, NOW, selection=selection, by=by)
    assert render_text(report).startswith("spend, ")
    assert json.loads(json.dumps(report.to_dict()))["period"] == selection
    assert len(check_page(render_html(report)).svgs) == 2
    assert (report.burn is None) == (selection == "previous")
    if by == "session" and selection == "today":
        # Ranked by what each session spent today, read from today's day hash.
        assert [r.name for r in report.rows if r.kind == "session"] == ["s11"]


def test_people_see_cents_but_never_zero_for_a_non_zero_amount() -> None:
    from extproc.insight.spend.text import dollars

    assert dollars(None) == "-"
    assert dollars(0) == "$0.00"
    assert dollars(1_834_125) == "$0.001834125"  # a short demo: not "$0.00"
    assert dollars(-262_500) == "$-0.0002625"
    assert dollars(10_000_000) == "$0.01"
    assert dollars(194_999_999) == "$0.19"
    assert dollars(1_234_567_890_000) == "$1,234.57"
