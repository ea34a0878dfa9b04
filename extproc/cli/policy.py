"""`extproc policy what-if NEW.yaml [--since 30d]`: what a candidate policy would have done.

The same replay the console's what-if page runs (`extproc.insight.whatif`), over the ledger
in Redis. Exit codes: 0 done, 1 Redis unreachable, 2 an invalid candidate policy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from extproc.cli.admin import add_stack_options, parse_duration, redacted, redis_url


def cmd_what_if(args: argparse.Namespace) -> int:
    from extproc.governance.policy import PolicyError, load_policy
    from extproc.insight.whatif import ledger_since, render_text, replay, topups_of
    from extproc.metering.prices import PriceTable
    from extproc.store.clients import UNAVAILABLE, make_client

    try:
        candidate = load_policy(args.file)
    except PolicyError as exc:
        print(f"extproc: the candidate policy is invalid:\n{exc}", file=sys.stderr)
        return 2
    url = redis_url(args.redis_url, args.stack)
    since_ms = int(time.time() * 1000) - args.since * 1000

    async def read() -> tuple:  # type: ignore[type-arg]
        client = make_client(url, socket_connect_timeout=3, socket_timeout=30)
        try:
            return await ledger_since(client, since_ms), await topups_of(client, candidate)
        finally:
            await client.aclose()

    try:
        records, topups = asyncio.run(read())
    except UNAVAILABLE as exc:
        print(f"extproc: Redis at {redacted(url)}: {exc}", file=sys.stderr)
        return 1
    result = replay(candidate, records, PriceTable.load(), topups)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(render_text(result, args.since // 86400))
    return 0


def register_policy(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("policy", help="what a candidate policy would have done")
    psub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")

    def policy_help(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=policy_help)
    w = psub.add_parser("what-if", help="replay the ledger under a candidate policy")
    w.add_argument("file", help="the candidate policy YAML")
    w.add_argument(
        "--since", type=parse_duration, default=parse_duration("30d"), help="default 30d"
    )
    w.add_argument("--json", action="store_true", help="machine-readable output")
    add_stack_options(w)
    w.set_defaults(func=cmd_what_if)
