"""`extproc topup list|approve|deny|revoke` and `extproc keys paused|pause|resume`.

The operator's side of top-ups and the runaway breaker, with the same checks, audit entries
and webhooks as the console (`extproc.console.halt`). The CLI acts with the trust of whoever
holds the Redis credentials; the audit log names it `cli:<user>`.
Exit codes: 0 done, 1 refused (unknown id, not pending, not paused) or Redis unreachable,
2 bad arguments or an invalid policy.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from extproc.cli.admin import (
    add_stack_options,
    fail,
    load_policy_arg,
    redacted,
    redis_url,
)
from extproc.metering.prices import usd_for_people


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name in this container
        return "cli"


def _run(args: argparse.Namespace, action: Callable[[Any, Any], Awaitable[int]]) -> int:
    from extproc.console.halt import NotAllowed, alerter_for
    from extproc.governance.pauses import PauseError
    from extproc.governance.topups import TopupError
    from extproc.store.clients import UNAVAILABLE, make_client

    policy = load_policy_arg(args.policy, args.stack)
    if isinstance(policy, str):
        return fail(policy, 2)
    url = redis_url(args.redis_url, args.stack)

    async def go() -> int:
        client = make_client(url, socket_connect_timeout=3, socket_timeout=10)
        alerter = alerter_for(client, lambda: policy, delays=(0.5, 2.0))
        try:
            return await action(client, (policy, alerter))
        finally:
            await alerter.drain()  # the webhooks go out before the command returns
            await client.aclose()

    try:
        return asyncio.run(go())
    except (TopupError, PauseError, NotAllowed) as exc:
        return fail(str(exc), 1)
    except UNAVAILABLE as exc:
        return fail(f"Redis at {redacted(url)}: {exc}", 1)


def cmd_list(args: argparse.Namespace) -> int:
    from extproc.console.halt import requests_for

    async def action(client: Any, ctx: Any) -> int:
        policy, _alerter = ctx
        now = int(time.time() * 1000)
        rows = [r.to_dict(policy.timezone, now) for r in await requests_for(client, policy)]
        rows = [r for r in rows if args.status in (None, r["status"])]
        if args.workspace:
            rows = [r for r in rows if r["workspace"] == args.workspace]
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        header = ("ID", "STATUS", "BUDGET", "ASKED", "UNTIL", "WHO", "REASON")
        lines = [header] + [
            (r["id"], r["status"], r["label"], f"${r['amount_usd']}", r["until"][:16],
             r["owner"] or r["key_id"], r["reason"][:50])
            for r in rows
        ]  # fmt: skip
        widths = [max(len(str(line[c])) for line in lines) for c in range(len(header))]
        for line in lines:
            print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        return 0

    return _run(args, action)


def _decide(verdict: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        from extproc.console.halt import decide

        async def action(client: Any, ctx: Any) -> int:
            policy, alerter = ctx
            done = await decide(
                client, policy, _actor(), args.request_id, verdict, alerter=alerter,
                amount_usd=getattr(args, "amount", None), until=getattr(args, "until", None),
                note=args.note or "",
            )  # fmt: skip
            if args.json:
                print(json.dumps(done.to_dict(policy.timezone, done.decided_ms), indent=2))
            elif verdict == "approve":
                print(
                    f"approved {done.request_id}: {usd_for_people(done.granted_nanos)} more for "
                    f"{done.label} until {done.to_dict(policy.timezone, 0)['granted_until']}"
                )
            else:
                print(f"{done.status} {done.request_id} ({done.label})")
            return 0

        return _run(args, action)

    return command


def cmd_paused(args: argparse.Namespace) -> int:
    from extproc.console.halt import paused_keys

    async def action(client: Any, ctx: Any) -> int:
        policy, _alerter = ctx
        found = [p.to_dict(policy.timezone) for p in await paused_keys(client, policy)]
        if not args.all:
            found = [p for p in found if p["state"] == "paused"]
        if args.json:
            print(json.dumps(found, indent=2))
            return 0
        for p in found:
            print(f"{p['key_id']}  {p['state']}  {p['workspace']}/{p['service']}  since "
                  f"{p['since'][:19]}  {p['rule']}: {p['why']}")  # fmt: skip
        if not found:
            print("no key is paused")
        return 0

    return _run(args, action)


def cmd_resume(args: argparse.Namespace) -> int:
    from extproc.console.halt import resume

    async def action(client: Any, ctx: Any) -> int:
        policy, alerter = ctx
        done = await resume(client, policy, _actor(), args.key_id, alerter=alerter)
        shown = done.to_dict(policy.timezone)
        print(json.dumps(shown, indent=2) if args.json else
              f"resumed {done.key_id} (paused since {shown['since']})")  # fmt: skip
        return 0

    return _run(args, action)


def cmd_pause(args: argparse.Namespace) -> int:
    from extproc.console.halt import pause_by_hand

    async def action(client: Any, ctx: Any) -> int:
        policy, alerter = ctx
        done = await pause_by_hand(client, policy, _actor(), args.key_id, args.why, alerter=alerter)
        print(json.dumps(done.to_dict(policy.timezone), indent=2) if args.json
              else f"paused {done.key_id}: {done.why}")  # fmt: skip
        return 0

    return _run(args, action)


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_stack_options(common)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--policy", help="else EXTPROC_POLICY, else the stack's")
    return common


def register_topup(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = _common()
    top = sub.add_parser("topup", help="list, approve and deny top-up requests")
    tsub = top.add_subparsers(dest="topup_command", metavar="SUBCOMMAND")

    def top_help(_args: argparse.Namespace) -> int:
        top.print_help()
        return 2

    top.set_defaults(func=top_help)
    p = tsub.add_parser("list", parents=[common], help="requests, newest first")
    p.add_argument(
        "--status",
        choices=("pending", "approved", "denied", "expired", "revoked", "lapsed"),
        help="only requests in this state",
    )
    p.add_argument("--workspace", help="only this workspace's")
    p.set_defaults(func=cmd_list)
    p = tsub.add_parser("approve", parents=[common], help="grant a pending request")
    p.add_argument("request_id", help="the request (tu_..., from `topup list`)")
    p.add_argument("--amount", help="grant less than asked, in dollars")
    p.add_argument("--until", help='end sooner than asked: ISO 8601, a date, "monday", "period"')
    p.add_argument("--note", help="shown to the requester")
    p.set_defaults(func=_decide("approve"))
    p = tsub.add_parser("deny", parents=[common], help="refuse a pending request")
    p.add_argument("request_id", help="the request (tu_..., from `topup list`)")
    p.add_argument("--note", help="shown to the requester: why")
    p.set_defaults(func=_decide("deny"))
    p = tsub.add_parser("revoke", parents=[common], help="end a granted top-up now")
    p.add_argument("request_id", help="the granted request (tu_...)")
    p.add_argument("--note", help="shown to the requester")
    p.set_defaults(func=_decide("revoke"))


def register_pause_commands(ksub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`keys paused|pause|resume`, beside `keys create|list|rotate|revoke`."""
    common = _common()
    p = ksub.add_parser("paused", parents=[common], help="keys the runaway breaker paused")
    p.add_argument("--all", action="store_true", help="resumed ones too")
    p.set_defaults(func=cmd_paused)
    p = ksub.add_parser("resume", parents=[common], help="let a paused key spend again")
    p.add_argument("key_id", help="the paused key (from `keys paused`)")
    p.set_defaults(func=cmd_resume)
    p = ksub.add_parser("pause", parents=[common], help="pause a key by hand (until resumed)")
    p.add_argument("key_id", help="the key to pause (from `keys list`)")
    p.add_argument("--why", default="", help="shown in every refusal of the key")
    p.set_defaults(func=cmd_pause)
