"""The spend report as text: the tables `extproc spend` prints (the HTML page reuses the
cells).
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from extproc.insight.burn import Burn, ratio_text
from extproc.insight.spend.halt import render_halt
from extproc.insight.spend.report import CacheRow, Report, Row
from extproc.metering.prices import usd_for_people
from extproc.store.schema import (
    UNATTRIBUTED,
)

# --- presentation --------------------------------------------------------------------------


def dollars(nanos: int | None) -> str:
    """For people (`usd_for_people`); "-" where there is no amount."""
    return "-" if nanos is None else usd_for_people(nanos)


def _pct_text(share: Decimal | None) -> str:
    if share is None:
        return "-"
    return f"{share.quantize(Decimal('0.1'), ROUND_HALF_UP)}%"


def _outlook(row: Row) -> str:
    if row.today_nanos is not None:
        return f"today {dollars(row.today_nanos)}"
    if row.limit_reached:
        return "hard limit reached"
    if row.runs_out is not None:
        return f"runs out {row.runs_out.date().isoformat()}"
    return "over budget" if row.over_budget else ""


_KIND_LABEL = {"team": "team", "service": "svc", "key": "key", "model": "model", "session": "sess"}
_RIGHT = frozenset({2, 3, 4, 5, 6, 7})
SHOWN_SESSION_CHARS = 40


def _layout(lines: list[tuple[str, ...]], right: frozenset[int]) -> list[str]:
    """Columns padded to their widest cell; numbers right-aligned."""
    widths = [max(len(line[c]) for line in lines) for c in range(len(lines[0]))]
    return [
        "  ".join(
            cell.rjust(w) if c in right else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]


def _row_name(r: Row) -> str:
    if r.kind == "workspace":
        return "(unattributed)" if r.name == UNATTRIBUTED else r.name
    name = r.name
    if r.kind == "session" and len(name) > SHOWN_SESSION_CHARS:
        name = name[: SHOWN_SESSION_CHARS - 1] + "…"
    return f"  {_KIND_LABEL[r.kind]} {name}"


ROW_HEADER = ("WORKSPACE", "PERIOD", "SPENT", "REQUESTS", "BUDGET", "USED", "IN FLIGHT")
ROW_HEADER += ("FORECAST", "OUTLOOK")


def row_cells(r: Row) -> tuple[str, ...]:
    budget = dollars(r.budget_nanos) if r.budget_nanos is not None else "-"
    if r.kind != "workspace" and r.budget_nanos is None and r.share_base_nanos:
        budget = "(ws)"
    return (
        _row_name(r),
        r.period.id if r.kind == "workspace" else "",
        dollars(r.spent_nanos),
        "-" if r.requests is None else f"{r.requests:,}",
        budget,
        _pct_text(r.share_pct),
        dollars(r.held_nanos),
        dollars(r.forecast_nanos),
        _outlook(r),
    )


def render_table(report: Report) -> str:
    lines: list[tuple[str, ...]] = [ROW_HEADER]
    lines += [row_cells(r) for r in report.rows]
    t = report.totals
    lines.append(
        (
            "TOTAL",
            "",
            dollars(t.spent_nanos),
            "-" if t.requests is None else f"{t.requests:,}",
            dollars(t.budget_nanos),
            _pct_text(t.share_pct),
            dollars(t.held_nanos),
            dollars(t.forecast_nanos),
            "",
        )
    )
    laid = _layout(lines, _RIGHT)
    when = report.generated_at.strftime("%Y-%m-%d %H:%M")
    title = {
        "current": "current period",
        "previous": "previous period",
        "today": "today (budgets are a day's share of each period's)",
    }[report.selection]
    out = [f"spend, {title}, as of {when} {report.generated_at.tzinfo}", ""]
    out += laid[:-1]
    out += ["-" * len(laid[0]), laid[-1]]
    return "\n".join(out)


def burn_cells(b: Burn) -> tuple[str, ...]:
    """Today so far, projected, usual day, ratio, alert flag, run-out date: for people."""
    ratio = b.ratio
    if ratio is not None:
        pace = f"{ratio_text(ratio)}x"
    else:
        pace = "-" if b.baseline is None or not b.projected_nanos else "new"
    return (
        dollars(b.today_nanos),
        dollars(b.projected_nanos),
        "-" if b.baseline is None else dollars(b.baseline.nanos),
        pace,
        "ALERT" if b.alert else "",
        _runs_out_text(b),
    )


def _runs_out_text(b: Burn) -> str:
    if b.hard_nanos is None:
        return "-"
    if b.spent_nanos >= b.hard_nanos:
        return "hard limit reached"
    return b.runs_out.strftime("%Y-%m-%d %H:%M %Z") if b.runs_out else "holds"


BURN_HEADER = ("TODAY", "PROJECTED", "USUAL DAY", "RATIO", "", "HARD LIMIT AT THIS PACE")


def render_burn(report: Report) -> str:
    if report.burn is None:
        return ""
    lines: list[tuple[str, ...]] = [("WORKSPACE", *BURN_HEADER)]
    for b in report.burn:
        name = f"  svc {b.service}" if b.service else b.workspace
        lines.append((name, *burn_cells(b)))
    when = report.generated_at.strftime("%H:%M %Z")
    title = [
        f"burn today, as of {when}: today projected to midnight at the recent rate (the last",
        "30 to 90 minutes), against a usual day (the same weekday, else the last 7 days)",
    ]
    return "\n".join([*title, "", *_layout(lines, frozenset({1, 2, 3, 4}))])


CACHE_HEADER = ("INPUT TOKENS", "CACHED", "HIT RATE", "REPEATED PREFIX", "MISSED", "MISSED $")


def cache_cells(c: CacheRow) -> tuple[str, ...]:
    return (
        f"{c.input_tokens:,}",
        f"{c.cached_tokens:,}",
        _pct_text(c.hit_pct),
        f"{c.repeat_tokens:,}",
        f"{c.miss_tokens:,}",
        dollars(c.miss_nanos),
    )


def render_cache(report: Report) -> str:
    if not report.cache:
        return ""
    lines: list[tuple[str, ...]] = [("WORKSPACE", "SERVICE", "PERIOD", *CACHE_HEADER)]
    for c in report.cache:
        lines.append((c.workspace, c.service, c.period.id, *cache_cells(c)))
    title = [
        "prompt cache: MISSED counts prefix tokens re-sent within 15 minutes but billed at",
        "the full input price; MISSED $ is what a better cache would have saved",
    ]
    return "\n".join([*title, "", *_layout(lines, frozenset(range(3, 9)))])


def render_text(report: Report) -> str:
    """The budget table, then today's burn and the prompt-cache section when there is one,
    then live top-ups and paused keys."""
    tz = report.generated_at.tzinfo
    halt = render_halt(report.halt, tz) if report.halt.now_ms else ""  # type: ignore[arg-type]
    parts = [render_table(report), render_burn(report), render_cache(report), halt]
    return "\n\n".join(part for part in parts if part)
