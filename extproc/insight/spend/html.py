"""`extproc spend --html`: the spend report as one page that works from a file, offline.

The page gets attached to tickets and opened from mail, so it must not reach out: no
scripts, stylesheets, fonts or images from anywhere, nothing that needs JavaScript. The
charts are inline SVG drawn here: a burn chart is a few lines and labels, and drawing
them directly keeps the page small and its numbers exactly the report's.

Each workspace gets its period as a chart: spend accumulated day by day, the budget, the
soft and hard limits, and two ways the period could end: at its average pace so far (the
report's FORECAST) and at today's pace (the burn watch's projection). The gap between the
two lines is the question a spike raises: is today a blip, or the new normal?
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from html import escape

from extproc.governance.periods import Period
from extproc.insight.spend.report import Chart, Report
from extproc.insight.spend.text import (
    BURN_HEADER,
    CACHE_HEADER,
    ROW_HEADER,
    burn_cells,
    cache_cells,
    dollars,
    row_cells,
)
from extproc.metering.prices import NANOS_PER_DOLLAR, usd
from extproc.store.schema import UNATTRIBUTED

WIDTH, HEIGHT = 760, 300
LEFT, RIGHT, TOP, BOTTOM = 76, 170, 14, 34
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
LABEL_GAP = 13  # px between stacked line labels
# Today's pace can be a hundred times the budget; past this multiple of everything else the
# line leaves the chart instead of flattening it.
PACE_HEADROOM = 2

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328;
       margin: 24px auto; max-width: 1000px; padding: 0 16px; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 32px; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { padding: 3px 10px; border-bottom: 1px solid #d0d7de; text-align: left;
         white-space: nowrap; }
th { background: #f6f8fa; font-weight: 600; }
th.num { text-align: right; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.alert td { background: #ffebe9; }
.note { color: #59636e; }
svg { display: block; max-width: 100%; height: auto; }
svg text { font: 11px system-ui, sans-serif; fill: #59636e; }
svg .axis { stroke: #8c959f; stroke-width: 1; }
svg .grid { stroke: #eaeef2; stroke-width: 1; }
svg .spend-line { stroke: #0969da; stroke-width: 2.5; fill: none; }
svg .budget-line { stroke: #1f2328; stroke-width: 1.5; }
svg .soft-line { stroke: #bf8700; stroke-width: 1.5; stroke-dasharray: 6 4; }
svg .hard-line { stroke: #cf222e; stroke-width: 1.5; stroke-dasharray: 2 3; }
svg .forecast-line { stroke: #0969da; stroke-width: 1.5; stroke-dasharray: 5 4; }
svg .pace-line { stroke: #8250df; stroke-width: 1.5; stroke-dasharray: 1 3; }
svg .now-line { stroke: #8c959f; stroke-width: 1; stroke-dasharray: 2 2; }
svg text.budget-line, svg text.soft-line, svg text.hard-line, svg text.forecast-line,
svg text.pace-line { stroke: none; }
svg text.budget-line { fill: #1f2328; } svg text.soft-line { fill: #9a6700; }
svg text.hard-line { fill: #cf222e; } svg text.forecast-line { fill: #0969da; }
svg text.pace-line { fill: #8250df; }
"""


# --- scales ---------------------------------------------------------------------------------


def nice_step(span: int, ticks: int = 5) -> int:
    """A round tick step (1, 2 or 5 times a power of ten nano-dollars) covering `span`."""
    raw = max(span // ticks, 1)
    magnitude = 10 ** (len(str(raw)) - 1)
    for factor in (1, 2, 5, 10):
        if factor * magnitude >= raw:
            return factor * magnitude
    return 10 * magnitude  # pragma: no cover - the loop always returns


def axis_usd(nanos: int) -> str:
    return usd(nanos, sign=True, grouped=nanos % NANOS_PER_DOLLAR == 0)


class Scale:
    def __init__(self, period: Period, top_nanos: int) -> None:
        self.period = period
        self.step = nice_step(top_nanos)
        self.top = -(-top_nanos // self.step) * self.step
        self._span_s = (period.end - period.start).total_seconds()

    def x(self, when: datetime) -> float:
        share = (when - self.period.start).total_seconds() / self._span_s
        return round(LEFT + PLOT_W * min(max(share, 0.0), 1.0), 1)

    def y(self, nanos: int) -> float:
        return round(TOP + PLOT_H * (1 - nanos / self.top), 1)


def chart_top(chart: Chart) -> int:
    """The highest amount the chart must show: limits, spend and the average-pace forecast;
    today's pace too, unless it would squash everything else into the bottom strip."""
    top = max(chart.hard_nanos, chart.budget_nanos, chart.spent_nanos, chart.forecast_nanos or 0)
    pace = chart.burn_forecast_nanos or 0
    return max(top, pace) if pace <= PACE_HEADROOM * top else top


# --- the chart ------------------------------------------------------------------------------


def _attrs(**values: object) -> str:
    return " ".join(
        f'{k.rstrip("_").replace("_", "-")}="{escape(str(v))}"' for k, v in values.items()
    )


def _ticks(period: Period) -> list[tuple[datetime, str]]:
    days = (period.end.date() - period.start.date()).days
    if days <= 1:
        return [(period.start + timedelta(hours=h), f"{h:02d}:00") for h in (0, 6, 12, 18)]
    out = []
    for k in range(days):
        day = period.start + timedelta(days=k)
        if days <= 7 or day.day in (1, 8, 15, 22, 29):
            out.append((day, day.strftime("%a %-d") if days <= 7 else day.strftime("%b %-d")))
    return out


def _spread(labels: list[tuple[float, str, str]]) -> list[tuple[float, str, str]]:
    """Push line labels apart vertically so none overlaps the next."""
    placed: list[tuple[float, str, str]] = []
    for y, text, cls in sorted(labels):
        if placed and y - placed[-1][0] < LABEL_GAP:
            y = placed[-1][0] + LABEL_GAP
        placed.append((y, text, cls))
    return placed


def chart_svg(chart: Chart) -> str:
    """One workspace's burn chart as an <svg> element."""
    scale = Scale(chart.period, chart_top(chart))
    clip = f"plot-{chart.workspace}"
    title = f"{chart.workspace}: spend this period against the budget"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f"{_attrs(width=WIDTH, height=HEIGHT, role='img', data_workspace=chart.workspace)}>",
        f"<title>{escape(title)}</title>",
        f'<clipPath id="{escape(clip)}">'
        f"<rect {_attrs(x=LEFT, y=TOP, width=PLOT_W, height=PLOT_H)}/></clipPath>",
    ]
    for k in range(0, scale.top // scale.step + 1):
        nanos = k * scale.step
        y = scale.y(nanos)
        parts.append(f'<line class="grid" {_attrs(x1=LEFT, x2=LEFT + PLOT_W, y1=y, y2=y)}/>')
        parts.append(
            f"<text {_attrs(x=LEFT - 6, y=y + 4, text_anchor='end')}>{axis_usd(nanos)}</text>"
        )
    base = TOP + PLOT_H
    for when, label in _ticks(chart.period):
        x = scale.x(when)
        parts.append(f'<line class="axis" {_attrs(x1=x, x2=x, y1=base, y2=base + 4)}/>')
        parts.append(
            f"<text {_attrs(x=x, y=base + 17, text_anchor='middle')}>{escape(label)}</text>"
        )
    parts.append(f'<line class="axis" {_attrs(x1=LEFT, x2=LEFT + PLOT_W, y1=base, y2=base)}/>')
    parts.append(f'<line class="axis" {_attrs(x1=LEFT, x2=LEFT, y1=TOP, y2=base)}/>')

    labels: list[tuple[float, str, str]] = []
    for cls, nanos, name in (
        ("budget-line", chart.budget_nanos, "budget"),
        ("soft-line", chart.soft_nanos, "soft limit"),
        ("hard-line", chart.hard_nanos, "hard limit"),
    ):
        y = scale.y(nanos)
        where = _attrs(x1=LEFT, x2=LEFT + PLOT_W, y1=y, y2=y, data_usd=axis_usd(nanos))
        parts.append(f'<line class="{cls}" {where}/>')
        labels.append((y, f"{name} {dollars(nanos)}", cls))

    points = [(scale.x(chart.period.start), scale.y(0))]
    total = 0
    last = chart.now or chart.period.end
    for day, nanos in chart.daily:
        total += nanos
        day_end = datetime(day.year, day.month, day.day, tzinfo=chart.period.start.tzinfo)
        points.append((scale.x(min(day_end + timedelta(days=1), last)), scale.y(total)))
    path = " ".join(f"{x},{y}" for x, y in points)
    parts.append(f'<polyline class="spend-line" clip-path="url(#{escape(clip)})" points="{path}"/>')

    if chart.now is not None:
        x_now, y_now = scale.x(chart.now), scale.y(total)
        parts.append(f'<line class="now-line" {_attrs(x1=x_now, x2=x_now, y1=TOP, y2=base)}/>')
        parts.append(f"<text {_attrs(x=x_now + 3, y=TOP + 10)}>now</text>")
        x_end = scale.x(chart.period.end)
        for cls, nanos, name in (
            ("forecast-line", chart.forecast_nanos, "at the average pace"),
            ("pace-line", chart.burn_forecast_nanos, "at today's pace"),
        ):
            if nanos is None:
                continue
            y_end = scale.y(nanos)
            parts.append(
                f'<line class="{cls}" clip-path="url(#{escape(clip)})" '
                f"{_attrs(x1=x_now, y1=y_now, x2=x_end, y2=y_end)}/>"
            )
            labels.append((max(y_end, TOP + 4.0), f"{name} {dollars(nanos)}", cls))

    for y, text, cls in _spread(labels):
        parts.append(
            f'<text class="{cls}" {_attrs(x=LEFT + PLOT_W + 6, y=y + 4)}>{escape(text)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


# --- the page -------------------------------------------------------------------------------


_TITLES = {"current": "current period", "previous": "previous period", "today": "today"}


BURN_NOTE = (
    "Burn today: today's spend projected to midnight at the recent rate (the last 30 to 90 "
    "minutes), against a usual day (the average of the same weekday in recent weeks, else of "
    "the last 7 days). The hard-limit date assumes the rest of today runs at the recent rate "
    "and every later day costs what today is projected to."
)
CACHE_NOTE = (
    "Prompt cache: repeated prefix counts the prefix tokens of requests that re-sent a "
    "prefix seen in the last 15 minutes; missed is the part billed at the full input price, "
    "and missed $ is what a better cache would have saved."
)


def _table(
    header: Sequence[str], rows: Iterable[tuple[Sequence[str], bool]], numeric: Iterable[int]
) -> str:
    right = frozenset(numeric)
    head = "".join(
        f'<th class="num">{escape(h)}</th>' if c in right else f"<th>{escape(h)}</th>"
        for c, h in enumerate(header)
    )
    body = []
    for cells, alert in rows:
        tds = "".join(
            f'<td class="num">{escape(cell)}</td>' if c in right else f"<td>{escape(cell)}</td>"
            for c, cell in enumerate(cells)
        )
        body.append(f'<tr class="alert">{tds}</tr>' if alert else f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _section(report: Report, workspace: str) -> str:
    label = "(unattributed)" if workspace == UNATTRIBUTED else workspace
    out = [f"<section><h2>{escape(label)}</h2>"]
    chart = next((c for c in report.charts if c.workspace == workspace), None)
    if chart is not None:
        out.append(chart_svg(chart))
    rows = [(row_cells(r), False) for r in report.rows if r.workspace == workspace]
    out.append(_table(ROW_HEADER, rows, range(2, 8)))
    burn = [b for b in report.burn or () if b.workspace == workspace]
    if burn:
        out.append("<h3>Burn today</h3>")
        lines = [
            ((f"svc {b.service}" if b.service else "workspace", *burn_cells(b)), b.alert)
            for b in burn
        ]
        out.append(_table(("SCOPE", *BURN_HEADER), lines, range(1, 5)))
    cache = [c for c in report.cache if c.workspace == workspace]
    if cache:
        out.append("<h3>Prompt cache</h3>")
        out.append(
            _table(
                ("SERVICE", *CACHE_HEADER),
                [((c.service, *cache_cells(c)), False) for c in cache],
                range(1, 7),
            )
        )
    out.append("</section>")
    return "\n".join(out)


def render_html(report: Report) -> str:
    """The whole report as a standalone HTML document."""
    when = report.generated_at.strftime("%Y-%m-%d %H:%M")
    zone = str(report.generated_at.tzinfo)
    workspaces = list(dict.fromkeys(r.workspace for r in report.rows))
    notes = [CACHE_NOTE] if report.cache else []
    if report.burn is not None:
        notes.insert(0, BURN_NOTE)
    t = report.totals
    summary = (
        f"Total spent {dollars(t.spent_nanos)} of {dollars(t.budget_nanos)} budgeted"
        + (f", heading for {dollars(t.forecast_nanos)}" if t.forecast_nanos is not None else "")
        + "."
    )
    body = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>extproc spend, {escape(when)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>extproc spend, {escape(_TITLES[report.selection])}, as of {escape(when)} "
        f"{escape(zone)}</h1>",
        f'<p class="note">{escape(summary)}</p>',
    ]
    body += [f'<p class="note">{escape(line)}</p>' for line in notes]
    body += [_section(report, ws) for ws in workspaces]
    body.append("</body></html>")
    return "\n".join(body) + "\n"
