"""`extproc spend`: read the hashes, build the report, print it (text, JSON or HTML)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from extproc.cli.admin import add_stack_options
from extproc.insight.spend.arithmetic import GROUPS, SELECTIONS, TOP_SESSIONS
from extproc.insight.spend.report import build_report, read_hashes, report_keys, report_reads
from extproc.insight.spend.text import render_text


def parse_now(text: str, tz: ZoneInfo) -> datetime:
    """An ISO 8601 instant; without an offset it is wall-clock time in the policy's zone."""
    value = datetime.fromisoformat(text.strip())
    return value.replace(tzinfo=tz) if value.tzinfo is None else value.astimezone(tz)


def cmd_spend(args: argparse.Namespace) -> int:
    from extproc.cli.admin import fail, load_policy_arg, redacted, redis_url
    from extproc.insight.spend.halt import read_halt
    from extproc.insight.spend.html import render_html
    from extproc.store.clients import UNAVAILABLE, make_sync_client

    policy = load_policy_arg(args.policy, args.stack)
    if isinstance(policy, str):
        return fail(policy, 2)
    try:
        now = parse_now(args.now, policy.timezone) if args.now else datetime.now(policy.timezone)
    except ValueError:
        return fail(f"--now: not an ISO 8601 time: {args.now!r}", 2)
    url = redis_url(args.redis_url, args.stack)
    keys = report_keys(policy, now, args.period, args.by)
    try:
        client = make_sync_client(url, socket_connect_timeout=3, socket_timeout=10)
        try:
            hashes = read_hashes(client, keys, report_reads(policy, now, args.period))
            halt = read_halt(client, policy, int(now.timestamp() * 1000))
        finally:
            client.close()
    except UNAVAILABLE as exc:
        return fail(f"Redis at {redacted(url)}: {exc}", 1)
    report = build_report(policy, hashes, now, selection=args.period, by=args.by, halt=halt)
    if args.html:
        try:
            Path(args.html).write_text(render_html(report), "utf-8")
        except OSError as exc:
            return fail(f"--html: cannot write {args.html}: {exc.strerror}", 1)
        print(f"extproc: wrote {args.html}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif not args.html:  # the page was asked for, not the text too
        print(render_text(report))
    return 0


def register_spend(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `spend` to the `extproc` command line."""
    p = sub.add_parser("spend", help="spend per workspace against its budget, with a forecast")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--by",
        choices=tuple(GROUPS),
        help=f"also break each workspace down (session: the {TOP_SESSIONS} costliest)",
    )
    p.add_argument(
        "--period",
        choices=SELECTIONS,
        default="current",
        help="which budget period (default: current)",
    )
    p.add_argument(
        "--policy", help="else EXTPROC_POLICY, else the stack's, else examples/policy.yaml"
    )
    add_stack_options(p)
    p.add_argument("--now", help="report as of this ISO 8601 time (for tests; default: the clock)")
    p.add_argument(
        "--html", metavar="FILE", help="write a self-contained HTML page here (instead of text)"
    )
    p.set_defaults(func=cmd_spend)
