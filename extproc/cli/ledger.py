"""`extproc ledger ship|export`: the usage records, out of Redis and into files.

Thin on purpose: the work is in `extproc.books`; this module parses arguments, opens Redis
and files, and turns every operator mistake into one line on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from extproc.cli.admin import add_stack_options, redacted, redis_url


def _fail(message: str, code: int) -> int:
    print(f"extproc: {message}", file=sys.stderr)
    return code


def _client(args: argparse.Namespace) -> Any:
    from extproc.store.clients import make_sync_client

    return make_sync_client(
        redis_url(args.redis_url, args.stack), socket_connect_timeout=3, socket_timeout=30
    )


def cmd_export(args: argparse.Namespace) -> int:
    from extproc.books.export import write
    from extproc.books.records import RecordFilter, parse_instant, records_between, total_nanos
    from extproc.metering.prices import usd_for_people
    from extproc.store.clients import UNAVAILABLE

    try:
        since = parse_instant(args.since)
    except ValueError:
        return _fail(f"--since: not a date or ISO 8601 time: {args.since!r}", 2)
    try:
        until = parse_instant(args.until) if args.until else datetime.now(UTC)
    except ValueError:
        return _fail(f"--until: not a date or ISO 8601 time: {args.until!r}", 2)
    if until <= since:
        return _fail("--until must be after --since", 2)
    where = RecordFilter(
        workspace=args.workspace, team=args.team, service=args.service, model=args.model
    )
    url = redis_url(args.redis_url, args.stack)
    try:
        client = _client(args)
        try:
            records = records_between(client, since, until, where)
        finally:
            client.close()
    except UNAVAILABLE as exc:
        return _fail(f"Redis at {redacted(url)}: {exc}", 1)
    try:
        if args.out == "-":
            rows = write(records, args.format, sys.stdout)
        else:
            with Path(args.out).open("w", encoding="utf-8", newline="") as out:
                rows = write(records, args.format, out)
    except BrokenPipeError:
        raise  # the reader stopped (`| head`): main() ends quietly
    except OSError as exc:
        return _fail(f"--out: cannot write {args.out}: {exc.strerror}", 1)
    print(
        f"extproc: {rows} records, {usd_for_people(total_nanos(records))} "
        f"from {since.isoformat()} to {until.isoformat()}",
        file=sys.stderr,
    )
    return 0


def cmd_ship(args: argparse.Namespace) -> int:
    from extproc.books.shipper import Shipper
    from extproc.store.clients import UNAVAILABLE

    if args.batch < 1:
        return _fail("--batch must be at least 1", 2)
    url = redis_url(args.redis_url, args.stack)
    stop = threading.Event()
    if not args.once:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    try:
        client = _client(args)
    except UNAVAILABLE as exc:
        return _fail(f"Redis at {redacted(url)}: {exc}", 1)
    shipper = Shipper(client, args.dir, consumer=args.consumer, batch=args.batch)
    try:
        stats = shipper.run(stop, once=args.once, poll_seconds=args.poll)
    except UNAVAILABLE as exc:
        return _fail(f"Redis at {redacted(url)}: {exc} (nothing unshipped was acknowledged)", 1)
    except OSError as exc:
        return _fail(
            f"--dir {args.dir}: {exc.strerror or exc} (nothing unwritten was acknowledged)", 1
        )
    finally:
        client.close()
    print(
        f"extproc: shipped {stats.shipped} records to {args.dir} "
        f"({stats.skipped} already there after a restart)",
        file=sys.stderr,
    )
    return 0


def register_ledger(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `ledger ship` and `ledger export` to the `extproc` command line."""
    ledger = sub.add_parser("ledger", help="ship or export the usage records")
    verbs = ledger.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser(
        "ship", help="copy the ledger streams to daily JSON Lines files, exactly once"
    )
    p.add_argument("--dir", required=True, help="where usage-YYYY-MM-DD.jsonl files go")
    p.add_argument("--consumer", default=socket.gethostname(), help="consumer name (host)")
    p.add_argument("--batch", type=int, default=500, help="records per fsync (default 500)")
    p.add_argument("--poll", type=float, default=1.0, help="idle poll interval, seconds")
    p.add_argument("--once", action="store_true", help="ship what is there, then exit")
    add_stack_options(p)
    p.set_defaults(func=cmd_ship)

    p = verbs.add_parser("export", help="records of a time window as jsonl, csv or FOCUS csv")
    p.add_argument("--since", required=True, help="date or ISO 8601 time (UTC unless offset)")
    p.add_argument("--until", help="exclusive end (default: now)")
    p.add_argument(
        "--format", choices=("jsonl", "csv", "focus"), default="jsonl", help="default: jsonl"
    )
    p.add_argument("--out", default="-", help="file to write (default: stdout)")
    p.add_argument("--workspace", help="only this workspace's records")
    p.add_argument("--team", help="only this team's records")
    p.add_argument("--service", help="only this service's records")
    p.add_argument("--model", help="only this model's records")
    add_stack_options(p)
    p.set_defaults(func=cmd_export)
