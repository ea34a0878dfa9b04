"""`extproc reconcile`: the ledger of one day against OpenAI's Usage and Costs APIs.

Exit codes: 0 the books agree, 3 they drift (reported, alerted), 1 Redis or the provider
could not be read, 2 the command or the policy is wrong. Nightly from cron or a CronJob,
`--date` defaulting to yesterday (UTC), the last complete day the provider reports.

On a `make run` stack it works out of the box: the stack's upstream answers the admin
API, and when that upstream is the simulator, its admin key and each workspace's project
(the project of the workspace's simulated key) stand in for what the policy does not say.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from extproc.cli.admin import add_stack_options, fail, load_policy_arg, redacted, stack_used

if TYPE_CHECKING:
    from extproc.devstack.state import StackState

DRIFT_EXIT = 3
SIMULATED_ADMIN_KEY = "sk-admin-local-simulator"


def admin_base_url(url: str) -> str:
    """The admin API's base: a bare host (`http://127.0.0.1:8000`) gets OpenAI's `/v1`."""
    url = url.rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") else url


def render_text(rec: Any) -> str:
    from extproc.metering.prices import usd_for_people as money

    lines = [f"reconciliation of {rec.day.isoformat()} (a UTC day) with the provider's bill"]
    for row in rec.rows:
        name = row.workspace or "(no workspace)"
        project = row.project_id or "(no upstream.project_id)"
        # Without a project there is no provider figure to show, only the ledger's.
        provider = money(row.provider_nanos) if row.project_id else "-"
        lines.append(
            f"  {name:16} {project:30} provider {provider:>14}  "
            f"ledger {money(row.ledger_nanos):>14}  drift {money(row.drift_nanos)}"
        )
        lines += [f"      ! {finding}" for finding in row.findings]
    verdict = "in agreement" if not rec.drifted else f"DRIFT {money(rec.drift_nanos)}"
    lines.append(f"  total: {verdict}")
    return "\n".join(lines)


def _alert(policy: Any, rec: Any) -> int:
    """One webhook alert per drifting workspace (policy `alerts`, event reconcile_drift)."""
    from extproc.insight.alerts import Alert, Alerter
    from extproc.metering.prices import usd_for_people
    from extproc.store.schema import WORKSPACE_SCOPE

    def targets(event: str) -> list[str]:
        return [w.url for w in policy.webhooks if event in w.events]

    alerts = [
        Alert(
            event="reconcile_drift",
            workspace=row.workspace or "",
            scope=WORKSPACE_SCOPE,
            text=(
                f"extproc reconcile {rec.day.isoformat()}: {row.workspace or row.project_id} "
                f"drifts by {usd_for_people(row.drift_nanos)} from the provider's bill. "
                + " ".join(row.findings)
            ),
            details={"day": rec.day.isoformat(), **row.to_dict()},
        )
        for row in rec.drifted
    ]
    if not alerts or not targets("reconcile_drift"):
        return 0

    async def deliver() -> int:
        alerter = Alerter(targets, delays=(0.5, 1.0, 2.0))
        for alert in alerts:
            alerter.send(alert)
        await alerter.drain()
        return alerter.failed

    return asyncio.run(deliver())


def _metric(rec: Any) -> None:
    """`extproc.reconcile.drift.usd` per workspace, when OTEL metrics exporting is set up."""
    from opentelemetry.sdk.metrics import MeterProvider

    from extproc.insight.telemetry import _metric_reader, exporter_names, service_resource

    names = exporter_names(os.environ, "METRICS")
    if not names:
        return
    provider = MeterProvider(
        resource=service_resource(),
        metric_readers=[_metric_reader(name, os.environ) for name in names],
    )
    gauge = provider.get_meter("extproc").create_gauge(
        "extproc.reconcile.drift.usd",
        unit="{USD}",
        description="Provider's bill minus the ledger, per workspace and UTC day.",
    )
    for row in rec.rows:
        labels = {"workspace": row.workspace or "", "project_id": row.project_id or ""}
        gauge.set(row.drift_nanos / 1e9, {**labels, "day": rec.day.isoformat()})
    provider.shutdown()  # flushes the one collection


def render_true_up(t: dict[str, Any]) -> str:
    lines = []
    if t["adjustments"]:
        verb = "would write" if t["dry_run"] else "wrote"
        lines.append(f"  true-up: {verb} {len(t['adjustments'])} adjustment records:")
        lines += [
            f"    {a['workspace']:16} {a['model']:28} ${a['cost_usd']}" for a in t["adjustments"]
        ]
    if t["override_rows"]:
        lines.append("  the provider's effective rates differ from the price table; these rows")
        lines.append("  of the price file would have priced the day right:")
        lines += ["    " + line for line in t["override_rows"].splitlines()]
    return "\n".join(lines) if lines else "  true-up: nothing to adjust"


def _true_up(
    args: argparse.Namespace, policy: Any, rec: Any, provider: Any, records: Any, url: str
) -> dict[str, Any] | str:
    """Effective rates, the override rows that would have priced the day right, and the
    adjustment records (written unless --dry-run), audited."""
    from extproc.books.trueup import (
        adjustment_counts,
        adjustments,
        effective_rates,
        mispriced,
        override_rows,
    )
    from extproc.metering.prices import PriceTable, usd

    table = PriceTable.load(os.environ.get("EXTPROC_PRICES") or None)
    rates = effective_rates(provider)
    wrong = mispriced(rates, table)
    planned = adjustments(rec, table.version, adjustment_counts(records))
    if planned and not args.dry_run:
        try:
            asyncio.run(_write_adjustments(policy, planned, url, table))
        except Exception as exc:  # Redis went away between reading and writing
            return f"writing the adjustment records: {exc}"
    return {
        "dry_run": bool(args.dry_run),
        "effective_rates": [
            {"model": r.model, "kind": r.kind, "tokens": r.tokens, "cost_usd": usd(r.nanos),
             "usd_per_million": str(r.usd_per_million)}
            for r in rates
        ],
        "adjustments": [
            {"request_id": a.request_id, "workspace": a.workspace, "model": a.model_served,
             "cost_usd": usd(a.cost_nanos), "why": a.adjustment}
            for a in planned
        ],
        "override_rows": override_rows(rec.day, wrong),
    }  # fmt: skip


async def _write_adjustments(policy: Any, planned: list[Any], url: str, table: Any) -> None:
    """Through the ledger's own writer and settle script: spend, day and period hashes move
    with the records, exactly as a request's settlement moves them; then one audit entry."""
    import getpass
    import tempfile
    from datetime import datetime

    from extproc.console.audit import audit
    from extproc.governance.periods import period_at
    from extproc.metering.ledger import Ledger
    from extproc.metering.prices import usd
    from extproc.metering.settlement import Charged, settlement_for
    from extproc.store.clients import make_client
    from extproc.store.schema import WORKSPACE_SCOPE, workspace_prefix

    client = make_client(url, socket_connect_timeout=3, socket_timeout=30)
    try:
        with tempfile.TemporaryDirectory(prefix="extproc-trueup-") as spool:
            ledger = Ledger(client, spool_dir=spool)
            await ledger.start()
            for record in planned:
                ws = policy.workspaces[record.workspace]
                settlement = settlement_for(
                    record,
                    (Charged(WORKSPACE_SCOPE, ws.soft_nanos),),
                    prefix=workspace_prefix(ws.name),
                    period_id=period_at(ws.period, record.time_ms, policy.timezone).id,
                    local_time=datetime.fromtimestamp(record.time_ms / 1000, policy.timezone),
                    prices=table,
                )
                ledger.submit(settlement)
            await ledger.close()
            if ledger.spooled:
                raise RuntimeError(f"Redis refused {ledger.spooled} adjustment records")
        total = sum(r.cost_nanos for r in planned)
        await audit(
            client,
            f"{getpass.getuser()} (extproc reconcile)",
            "ledger.true-up",
            planned[0].request_id.rsplit(":", 3)[0],
            records=[r.request_id for r in planned],
            total_usd=usd(total),
        )
    finally:
        await client.aclose()


def workspace_projects(policy: Any, stack: StackState | None) -> dict[str, str | None]:
    """Each workspace's provider project: the policy's `upstream.project_id`; on a stack
    whose upstream is the simulator, the project of the workspace's simulated key."""
    from extproc.governance.credentials import simulated_upstream_key
    from extproc.simulator.admin import simulated_ids

    simulated = stack is not None and stack.simulated
    return {
        name: ws.upstream.project_id
        or (simulated_ids(simulated_upstream_key(name))[0] if simulated else None)
        for name, ws in policy.workspaces.items()
    }


def cmd_reconcile(args: argparse.Namespace) -> int:
    from extproc.books.reconcile import DEFAULT_BASE_URL, AdminClient, ProviderError, reconcile
    from extproc.books.records import records_between
    from extproc.settings import ConfigError
    from extproc.store.clients import UNAVAILABLE, make_sync_client

    policy = load_policy_arg(args.policy, args.stack)
    if isinstance(policy, str):
        return fail(policy, 2)
    explicit = args.redis_url or os.environ.get("EXTPROC_REDIS_URL")
    stack = None if explicit else stack_used(args.stack)
    admin_key = os.environ.get("OPENAI_ADMIN_KEY", "").strip()
    if not admin_key and stack is not None and stack.simulated:
        admin_key = SIMULATED_ADMIN_KEY
    if not admin_key:
        return fail("OPENAI_ADMIN_KEY is not set (an organization admin key, sk-admin-...)", 2)
    try:
        day = (
            date.fromisoformat(args.date)
            if args.date
            else (datetime.now(UTC) - timedelta(days=1)).date()
        )
    except ValueError:
        return fail(f"--date: not a YYYY-MM-DD date: {args.date!r}", 2)
    projects = workspace_projects(policy, stack)
    base_url = admin_base_url(
        args.base_url
        or os.environ.get("OPENAI_ADMIN_BASE_URL")
        or (stack.upstream_url if stack is not None and stack.upstream_url else DEFAULT_BASE_URL)
    )
    try:
        provider = AdminClient(admin_key, base_url).day(day)
    except ProviderError as exc:
        hint = ""
        if "HTTP 404" in str(exc):
            hint = f" (asked {base_url}: is that the admin API's base, ending in /v1?)"
        return fail(f"the provider's admin API: {exc}{hint}", 1)
    url = explicit or (stack.redis_url if stack is not None else "")
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    try:
        client = make_sync_client(url, socket_connect_timeout=3, socket_timeout=30)
        try:
            records = records_between(client, start, start + timedelta(days=1))
        finally:
            client.close()
    except UNAVAILABLE as exc:
        return fail(f"Redis at {redacted(url)}: {exc}", 1)
    rec = reconcile(day, projects, provider, records)
    true_up = _true_up(args, policy, rec, provider, records, url)
    if isinstance(true_up, str):
        return fail(true_up, 1)
    if args.json:
        print(json.dumps({**rec.to_dict(), **true_up}, indent=2))
    else:
        print(render_text(rec))
        print(render_true_up(true_up))
    undelivered = _alert(policy, rec)
    if undelivered:
        print(f"extproc: {undelivered} drift alerts could not be delivered", file=sys.stderr)
    try:
        _metric(rec)
    except ConfigError as exc:
        print(f"extproc: drift metric not exported: {exc}", file=sys.stderr)
    return DRIFT_EXIT if rec.drifted else 0


def register_reconcile(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `reconcile` to the `extproc` command line."""
    p = sub.add_parser(
        "reconcile",
        help="compare a day of the ledger with OpenAI's Usage and Costs APIs (OPENAI_ADMIN_KEY)",
    )
    p.add_argument("--date", help="UTC day, YYYY-MM-DD (default: yesterday)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--policy", help="else EXTPROC_POLICY, else the stack's, else examples/policy.yaml"
    )
    p.add_argument(
        "--base-url",
        help="the admin API (a bare host gets /v1); else OPENAI_ADMIN_BASE_URL, else the "
        "stack's upstream, else https://api.openai.com/v1",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="report the true-up (adjustments, override rows) without writing to the ledger",
    )
    add_stack_options(p)
    p.set_defaults(func=cmd_reconcile)
