"""extproc: meter, price and govern OpenAI / Codex API traffic behind Envoy.

Commands that read Redis find the running `make run` stack from any directory;
`--redis-url` (or EXTPROC_REDIS_URL) points them at another Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    from extproc import compiled
    from extproc.dataplane.server import serve
    from extproc.dataplane.workers import supervise, worker_count
    from extproc.governance.policy import PolicyError, load_policy
    from extproc.settings import ConfigError, check_mode, load_settings

    try:
        settings = load_settings(args.config)
        check_mode(settings)
    except ConfigError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    # Read the policies here, once, before any worker starts: a path that is set but missing
    # or invalid stops the sidecar with its reason first, not a worker's crash loop.
    for path in (settings.policy, settings.shadow_policy):
        try:
            if path:
                load_policy(path)
        except PolicyError as exc:
            problems = exc.problems
            head = problems[0] if len(problems) == 1 else f"{path}: {len(problems)} problems"
            print(f"extproc: not starting: policy {head}", file=sys.stderr)
            if len(problems) > 1:
                print("\n".join(f"  {p}" for p in problems), file=sys.stderr)
            return 2
    if args.workers is not None:
        if args.workers < 0:
            print("extproc: --workers: must be 0 (one per CPU) or more", file=sys.stderr)
            return 2
        settings = dataclasses.replace(settings, workers=args.workers)
    count = worker_count(settings)
    if not args.reuse_port:  # once per sidecar: its workers run the same files
        print(f"extproc: request path {compiled.state}", file=sys.stderr, flush=True)
    if count > 1 and not args.reuse_port:
        try:
            return asyncio.run(supervise(settings, count, args.config))
        except ConfigError as exc:
            print(f"extproc: {exc}", file=sys.stderr)
            return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(settings, reuse_port=args.reuse_port))
    except ConfigError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from extproc.simulator import main as sim_main

    return sim_main(["--host", args.host, "--port", str(args.port)])


def cmd_usage(args: argparse.Namespace) -> int:
    from extproc.cli.admin import display_zone, redacted
    from extproc.metering.ledger import recent_records, record_to_dict
    from extproc.store.clients import UNAVAILABLE, make_client

    url = redis_url(args.redis_url, args.stack)

    async def fetch() -> list[dict[str, object]]:
        client = make_client(url, socket_connect_timeout=2)
        try:
            records = await recent_records(client, args.limit)
        finally:
            await client.aclose()
        return [record_to_dict(r) for r in records]

    try:
        rows = asyncio.run(fetch())
    except UNAVAILABLE as exc:
        print(f"extproc: Redis at {redacted(url)}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(usage_table(rows, display_zone(args)))
    return 0


def usage_table(rows: list[dict[str, Any]], zone: ZoneInfo) -> str:
    """One line per record: when, who, what, how much. `~` estimated, `?` fallback price."""
    from extproc.metering.prices import usd_for_people

    header = ("TIME", "WORKSPACE", "SERVICE", "ENDPOINT", "MODEL", "IN", "CACHED", "OUT", "USD")
    lines = [(*header, "", "OUTCOME")]
    for r in rows:
        when = datetime.fromtimestamp(int(r["time_ms"]) / 1000, zone)
        lines.append(
            (
                when.strftime("%Y-%m-%d %H:%M:%S %Z"),
                str(r["workspace"] or "-"),
                str(r["service"] or "-"),
                str(r["endpoint"]),
                str(r["model_served"] or r["model_requested"] or "-")[:28],
                str(r["input_tokens"]),
                str(r["cached_input_tokens"]),
                str(r["output_tokens"]),
                usd_for_people(int(r["cost_nanos"])),
                ("~" if r["estimated"] else "") + ("?" if r["price_fallback"] else ""),
                str(r["outcome"]),
            )
        )
    widths = [max(len(line[c]) for line in lines) for c in range(len(lines[0]))]
    numeric = {5, 6, 7, 8}
    return "\n".join(
        "  ".join(
            cell.rjust(w) if c in numeric else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )


def cmd_stack(args: argparse.Namespace) -> int:
    from extproc.devstack import run

    return run.main()


from extproc.cli.admin import add_stack_options, redis_url, register  # noqa: E402
from extproc.cli.console import register_console  # noqa: E402
from extproc.cli.ledger import register_ledger  # noqa: E402
from extproc.cli.policy import register_policy  # noqa: E402
from extproc.cli.prices import register_prices  # noqa: E402
from extproc.cli.reconcile import register_reconcile  # noqa: E402
from extproc.cli.route import register_route  # noqa: E402
from extproc.cli.spend import register_spend  # noqa: E402
from extproc.cli.topup import register_topup  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extproc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="run the ext_proc gRPC sidecar")
    p.add_argument("--config", help="settings YAML (or EXTPROC_CONFIG)")
    p.add_argument(
        "--workers",
        type=int,
        help="sidecar processes sharing the port (default: settings `workers`, else one per CPU)",
    )
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a worker
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("simulate", help="run the OpenAI-compatible upstream simulator")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default %(default)s)")
    p.set_defaults(func=cmd_simulate)

    from extproc.devstack.run import ENV_HELP

    p = sub.add_parser(
        "stack",
        help="run Envoy + sidecar + Redis + simulator locally (make run)",
        description="Run the local stack in the foreground: Envoy, the sidecar, a "
        "Redis-protocol server and (without UPSTREAM_URL) the OpenAI simulator.",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("usage", help="print recent usage records, newest first")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--limit", type=positive_int, default=20, help="how many records (default %(default)s)"
    )
    add_stack_options(p)
    p.add_argument("--policy", help="for the time zone; else EXTPROC_POLICY, else the stack's")
    p.set_defaults(func=cmd_usage)
    register(sub)
    register_spend(sub)
    register_route(sub)
    register_ledger(sub)
    register_reconcile(sub)
    register_console(sub)
    register_policy(sub)
    register_prices(sub)
    register_topup(sub)
    return parser


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Mistakes get one line on stderr and exit code 1 or 2, never a
    traceback; EXTPROC_DEBUG=1 shows the traceback of an unexpected failure."""
    logging.basicConfig(
        level=os.environ.get("EXTPROC_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at exit, where a closed pipe could not be caught
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `extproc ledger export | head`: the reader has had enough
        _quiet_stdout()
        return 0
    except Exception as exc:
        return _explain(exc)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what is still buffered
    meets no closed pipe (Python would print "Exception ignored ... BrokenPipeError")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _explain(exc: Exception) -> int:
    from redis.exceptions import RedisClusterException, RedisError

    from extproc.devstack.state import NoStackError
    from extproc.governance.policy import PolicyError
    from extproc.metering.overrides import PriceFileError
    from extproc.settings import ConfigError

    if os.environ.get("EXTPROC_DEBUG"):
        raise exc
    if isinstance(exc, NoStackError):
        message, code = str(exc), 1
    elif isinstance(exc, PolicyError | ConfigError | PriceFileError):
        message, code = str(exc), 2
    elif isinstance(exc, RedisError | RedisClusterException):
        message, code = f"Redis unreachable: {exc} (is the stack running? `make run`)", 1
    elif isinstance(exc, OSError):
        message, code = f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", 1
    else:
        message = f"unexpected {type(exc).__name__}: {exc} (EXTPROC_DEBUG=1 shows where)"
        code = 1
    print(f"extproc: {message}", file=sys.stderr)
    return code
