"""Inline SVG charts for the console: drawn on the server, no JavaScript, no chart library.

Each function returns SVG markup for one figure; numbers are integer nano-dollars, and
every drawn figure also carries its exact value in a `data-` attribute and a <title>, so a
test (or a screen reader) reads the number rather than measuring pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from html import escape

from markupsafe import Markup

from extproc.metering.prices import usd as money

WIDTH = 420
BAR_HEIGHT = 18


def usd(nanos: int | None) -> str:
    return "-" if nanos is None else money(nanos, cents=True, sign=True, grouped=True)


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
    """Spend per day as columns, with a usual day as a dashed line."""
    height = 80
    if not daily:
        return Markup("")
    top = max([n for _d, n in daily] + [usual or 0, 1]) * 21 // 20
    step = WIDTH / len(daily)
    parts = [f'<svg class="daily" width="{WIDTH}" height="{height + 12}" role="img">']
    for i, (day, nanos) in enumerate(daily):
        h = round(height * nanos / top, 1)
        parts.append(
            f'<rect x="{round(i * step, 1)}" y="{height - h}" width="{max(step - 1, 1):.1f}" '
            f'height="{h}" fill="#5c6bc0"><title>{escape(day.isoformat())}: {usd(nanos)}</title>'
            "</rect>"
        )
    if usual:
        y = round(height - height * usual / top, 1)
        parts.append(
            f'<line x1="0" x2="{WIDTH}" y1="{y}" y2="{y}" stroke="#b00020" '
            f'stroke-dasharray="4 3"><title>usual day {usd(usual)}</title></line>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
