"""Where each workspace stands against its budget, and where it is heading.

The report reads only the hashes the settle script already keeps (spent, held, day, hour),
so it costs one pipelined round trip however long the ledger has grown. Everything
after that read is a pure function of the policy, those hashes and the clock: a report can
be recomputed for any instant, and the arithmetic is tested without Redis.

Beside the budget table the report shows today's burn against a usual day (the same
numbers the sidecar's burn watch alerts on, see `extproc.insight.burn`), the sessions that
cost the most, and per service how well prompt caching works: the hit rate, and the
dollars that prefixes re-sent within 15 minutes but billed at the full input price cost on
top. `html` draws each workspace's period as a chart.

The forecast is a straight line on purpose. Spend is lumpy (nightly batches, Friday
refactors), and anything cleverer would look precise without being right; a straight line
is easy to check by hand, and it already answers the question people ask: at this pace,
do we make it to the end of the period, and if not, on which day do calls start failing?

Owns: `arithmetic` (forecasts), `report` (what to read, the report as data), `text` and
`html` (rendering). May import: governance (policy, periods, budget limits), insight.burn,
metering.prices, store.schema. The command itself lives in `extproc.cli.spend`.
"""

from extproc.insight.spend.arithmetic import (
    GROUPS,
    SELECTIONS,
    TOP_SESSIONS,
    days_in,
    forecast,
    percent,
    runs_out_at,
    select_period,
)
from extproc.insight.spend.report import (
    CacheRow,
    Chart,
    Report,
    Row,
    Totals,
    build_report,
    read_hashes,
    report_keys,
    report_reads,
)
from extproc.insight.spend.text import render_burn, render_cache, render_table, render_text

__all__ = [
    "GROUPS",
    "SELECTIONS",
    "TOP_SESSIONS",
    "CacheRow",
    "Chart",
    "Report",
    "Row",
    "Totals",
    "build_report",
    "days_in",
    "forecast",
    "percent",
    "read_hashes",
    "render_burn",
    "render_cache",
    "render_table",
    "render_text",
    "report_keys",
    "report_reads",
    "runs_out_at",
    "select_period",
]
