"""Inline SVG charts for the console: drawn on the server, no JavaScript, no chart library.

Each function returns SVG markup for one figure; numbers are integer nano-dollars, and
every drawn figure also carries its exact value in a `data-` attribute and a <title>, so a
test (or a screen reader) reads the number rather than measuring pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, tzinfo
from html import escape
from typing import Any

from markupsafe import Markup

from extproc.insight.spend.html import axis_usd, chart_svg, nice_step
from extproc.metering.prices import usd as money

WIDTH = 420
BAR_HEIGHT = 18
CENT = 10_000_000  # nano-dollars
DAILY_HEIGHT, DAILY_LEFT, DAILY_BOTTOM, DAILY_TOP = 150, 64, 22, 14
VALUES_UP_TO = 10
"""Per-day charts write each bar's amount over it up to this many days; past it only the
highest day's and today's, the rest stay in each bar's tooltip and the y axis."""


def usd(nanos: int | None) -> str:
    """Money for people: cents, but never "$0.00" for an amount that is not zero (a sub-cent
    amount keeps two significant digits: $0.0011). Every page shows money through here."""
    if nanos is None:
        return "-"
    if nanos == 0 or abs(nanos) >= CENT:
        return money(nanos, cents=True, sign=True, grouped=True)
    size = abs(nanos)
    step = 10 ** max(len(str(size)) - 2, 0)  # keep two significant digits, half up
    kept = (size + step // 2) // step * step
    return money(kept if nanos > 0 else -kept, sign=True)


def zone_name(zone: tzinfo | None) -> str:
    return str(getattr(zone, "key", None) or zone or "UTC")


def when(ms: int, zone: tzinfo | None) -> str:
    """A ledger or audit time in the policy's zone; the page names the zone once."""
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, zone or UTC).strftime("%Y-%m-%d %H:%M:%S")


def period_chart(chart: Any) -> Markup:
    """A workspace's period as `extproc spend --html` draws it (axes, limits, forecast)."""
    return Markup(chart_svg(chart))


def soft_marks(ws: Any, rows: Iterable[Any]) -> dict[tuple[str, str], int]:
    """(kind, name) -> the soft limit of each drill-down row that has a budget of its own: the
    workspace's soft fraction of that budget, where its alerts fire."""
    out: dict[tuple[str, str], int] = {}
    for row in rows:
        if row.kind == "workspace":
            out[(row.kind, row.name)] = ws.soft_nanos
        elif row.budget_nanos and ws.budget_nanos:
            out[(row.kind, row.name)] = row.budget_nanos * ws.soft_nanos // ws.budget_nanos
    return out


def _x(nanos: int, top: int) -> float:
    return round(WIDTH * nanos / top, 1) if top else 0.0


def budget_bar(
    spent: int, soft: int | None, hard: int | None, forecast: int | None, budget: int | None
) -> Markup:
    """Spend as a bar, soft and hard limits as lines, the forecast as a hollow marker."""
    top = max(v for v in (spent, soft or 0, hard or 0, forecast or 0, budget or 0, 1))
    top = top * 21 // 20
    colour = "#2e7d32"
    if soft is not None and spent >= soft:
        colour = "#e69500"
    if hard is not None and spent >= hard:
        colour = "#b00020"
    parts = [
        f'<svg class="bar" width="{WIDTH}" height="{BAR_HEIGHT + 14}" role="img" '
        f'data-spent-nanos="{spent}">',
        f"<title>spent {usd(spent)} of {usd(budget)} (soft {usd(soft)}, hard {usd(hard)})</title>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{BAR_HEIGHT}" fill="#eee"/>',
        f'<rect x="0" y="0" width="{_x(spent, top)}" height="{BAR_HEIGHT}" fill="{colour}"/>',
    ]
    if forecast is not None and forecast > spent:
        parts.append(
            f'<rect x="{_x(spent, top)}" y="3" width="{_x(forecast - spent, top)}" '
            f'height="{BAR_HEIGHT - 6}" fill="none" stroke="{colour}" stroke-dasharray="3 2"/>'
        )
    for value, label, dash in ((soft, "soft", "4 2"), (hard, "hard", "")):
        if value is not None:
            x = _x(value, top)
            parts.append(
                f'<line x1="{x}" x2="{x}" y1="0" y2="{BAR_HEIGHT + 4}" stroke="#333" '
                f'stroke-dasharray="{dash}"/><text x="{x}" y="{BAR_HEIGHT + 13}" '
                f'font-size="9" text-anchor="middle">{label}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))


def daily_chart(daily: Sequence[tuple[date, int]], usual: int | None) -> Markup:
    """Spend per day as columns on dollar and day axes, a usual day as a dashed line.

    Each bar carries its exact amount (`data-nanos`, a <title>); the amounts are written
    over the bars too (every bar for short periods, else the highest day and today)."""
    if not daily:
        return Markup("")
    plot_w, plot_h = WIDTH - DAILY_LEFT - 8, DAILY_HEIGHT - DAILY_TOP - DAILY_BOTTOM
    highest = max([n for _d, n in daily] + [usual or 0, 1])
    step = nice_step(highest, 4)
    top = -(-highest // step) * step
    base = DAILY_TOP + plot_h

    def y(nanos: int) -> float:
        return round(base - plot_h * nanos / top, 1)

    parts = [
        f'<svg class="daily" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
        f'height="{DAILY_HEIGHT}" viewBox="0 0 {WIDTH} {DAILY_HEIGHT}" role="img">',
        "<title>spend per day</title>",
    ]
    for k in range(top // step + 1):
        at = y(k * step)
        parts.append(
            f'<line class="grid" x1="{DAILY_LEFT}" x2="{DAILY_LEFT + plot_w}" y1="{at}" '
            f'y2="{at}"/><text class="tick" x="{DAILY_LEFT - 5}" y="{at + 4}" '
            f'text-anchor="end">{escape(axis_usd(k * step))}</text>'
        )
    width = plot_w / len(daily)
    labelled = {max(range(len(daily)), key=lambda i: daily[i][1]), len(daily) - 1}
    every = max(1, -(-len(daily) // 8))
    for i, (day, nanos) in enumerate(daily):
        x = round(DAILY_LEFT + i * width, 1)
        h = round(plot_h * nanos / top, 1)
        parts.append(
            f'<rect class="bar" x="{x}" y="{round(base - h, 1)}" '
            f'width="{max(width - 1, 1):.1f}" height="{h}" data-day="{day.isoformat()}" '
            f'data-nanos="{nanos}"><title>{escape(day.isoformat())}: {usd(nanos)}</title></rect>'
        )
        mid = round(x + width / 2, 1)
        if nanos and (len(daily) <= VALUES_UP_TO or i in labelled):
            parts.append(
                f'<text class="value" x="{mid}" y="{round(base - h - 3, 1)}" '
                f'text-anchor="middle">{escape(usd(nanos))}</text>'
            )
        if i % every == 0 or i == len(daily) - 1:
            parts.append(
                f'<text class="day" x="{mid}" y="{base + 14}" text-anchor="middle">{day.day}</text>'
            )
    parts.append(
        f'<line class="axis" x1="{DAILY_LEFT}" x2="{DAILY_LEFT + plot_w}" y1="{base}" '
        f'y2="{base}"/><line class="axis" x1="{DAILY_LEFT}" x2="{DAILY_LEFT}" '
        f'y1="{DAILY_TOP}" y2="{base}"/>'
    )
    if usual:
        parts.append(
            f'<line class="usual-line" x1="{DAILY_LEFT}" x2="{DAILY_LEFT + plot_w}" '
            f'y1="{y(usual)}" y2="{y(usual)}"><title>usual day {usd(usual)}</title></line>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
