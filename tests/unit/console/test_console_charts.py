"""The console's money and charts: what people read, drawn on the server."""

from __future__ import annotations

import re
from datetime import date
from types import SimpleNamespace
from zoneinfo import ZoneInfo

from extproc.console.charts import daily_chart, soft_marks, usd, when

CENT = 10_000_000


def test_money_for_people_never_hides_a_non_zero_amount() -> None:
    assert usd(0) == "$0.00"
    assert usd(1_087_000) == "$0.0011"  # $0.001087: not "$0.00"
    assert usd(1) == "$0.000000001" and usd(-4_990_000) == "$-0.005"
    assert usd(CENT) == "$0.01" and usd(123_456 * CENT) == "$1,234.56"
    assert usd(9_999_999) == "$0.01"  # rounds up into cents
    assert usd(None) == "-"
    for nanos in (1, 17, 999, 123_456, 4_999_999, 9_999_999):
        assert usd(nanos) != "$0.00"


def test_times_in_the_policys_zone() -> None:
    ms = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    assert when(ms, ZoneInfo("UTC")) == "2026-01-01 00:00:00"
    assert when(ms, ZoneInfo("Europe/Berlin")) == "2026-01-01 01:00:00"
    assert when(0, None) == "-"


def test_daily_chart_has_axes_values_and_the_usual_day() -> None:
    days = [(date(2026, 3, d), n) for d, n in ((1, 0), (2, 3 * CENT), (3, 12 * CENT))]
    svg = str(daily_chart(days, usual=5 * CENT))
    ticks = re.findall(r'<text class="tick"[^>]*>([^<]+)</text>', svg)
    assert ticks[0] == "$0" and len(ticks) >= 3  # a dollar axis from zero up
    bars = re.findall(r'data-day="([^"]+)" data-nanos="(\d+)"', svg)
    assert bars == [
        ("2026-03-01", "0"),
        ("2026-03-02", str(3 * CENT)),
        ("2026-03-03", str(12 * CENT)),
    ]
    values = re.findall(r'<text class="value"[^>]*>([^<]+)</text>', svg)
    assert values == ["$0.03", "$0.12"]  # written over the bars (no label on an empty day)
    assert re.findall(r'<text class="day"[^>]*>(\d+)</text>', svg) == ["1", "2", "3"]
    assert "usual day $0.05" in svg
    tall = [float(h) for h in re.findall(r'height="([\d.]+)" data-day', svg)]
    assert tall[1] < tall[2]  # not equal-height bars


def test_daily_chart_labels_only_the_peak_and_today_on_long_periods() -> None:
    days = [(date(2026, 3, d), d * CENT) for d in range(1, 31)]
    days[10] = (date(2026, 3, 11), 99 * CENT)
    svg = str(daily_chart(days, usual=None))
    assert re.findall(r'<text class="value"[^>]*>([^<]+)</text>', svg) == ["$0.99", "$0.30"]
    assert daily_chart([], None) == ""


def test_soft_marks_for_every_row_with_a_budget() -> None:
    ws = SimpleNamespace(budget_nanos=100 * CENT, soft_nanos=75 * CENT)
    rows = [
        SimpleNamespace(kind="workspace", name="dev", budget_nanos=100 * CENT),
        SimpleNamespace(kind="team", name="platform", budget_nanos=40 * CENT),
        SimpleNamespace(kind="team", name="data", budget_nanos=None),
    ]
    assert soft_marks(ws, rows) == {
        ("workspace", "dev"): 75 * CENT,
        ("team", "platform"): 30 * CENT,
    }
