"""Admin commands: `check-config` for the budget policy, `keys` for virtual API keys.

Kept apart from the sidecar's own commands because these run on an operator's laptop or
in a deploy pipeline, against a Redis and a policy file, never on the request path.
Exit codes: 0 done, 1 refused or Redis unreachable, 2 bad arguments or an invalid policy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo

from extproc.metering.prices import usd_for_people

if TYPE_CHECKING:
    from extproc.devstack.state import StackState
    from extproc.governance.policy import Policy

# The checkout's example policy, wherever the CLI is run from (editable install).
DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"
REDIS_URL_HELP = (
    "Redis to use; else EXTPROC_REDIS_URL, else the running `make run` stack's (--stack)"
)
STACK_HELP = (
    "the `make run` stack on this port (default: EXTPROC_PORT, else the one started from "
    "this checkout, else the only one running)"
)
_DURATION = re.compile(r"(\d+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds in "90s", "15m", "24h" or "7d"."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (use a number and a unit: 90s, 15m, 24h, 7d)"
        )
    return int(match[1]) * _UNIT_SECONDS[match[2]]


def _stack_port(stack: int | None) -> int | None:
    if stack is not None:
        return stack
    raw = os.environ.get("EXTPROC_PORT", "").strip()
    return int(raw) if raw.isdigit() else None


_NAMED: set[int] = set()


def stack_used(stack: int | None = None) -> StackState:
    """The running `make run` stack the command uses (`state.find`), named once on stderr
    so stdout (JSON, CSV) stays clean; NoStackError when there is none to use."""
    from extproc.devstack import state

    found = state.find(_stack_port(stack))
    if found.port not in _NAMED:
        _NAMED.add(found.port)
        print(f"extproc: using {found.describe()}", file=sys.stderr)
    return found


def redis_url(arg: str | None, stack: int | None = None) -> str:
    """--redis-url, else EXTPROC_REDIS_URL, else the running `make run` stack's.

    With none of these, NoStackError says in one line how to get one: guessing a
    localhost Redis would report an empty ledger as if it were the truth.
    """
    if arg:
        return arg
    if os.environ.get("EXTPROC_REDIS_URL"):
        return os.environ["EXTPROC_REDIS_URL"]
    return stack_used(stack).redis_url


def policy_path(arg: str | None, stack: int | None = None) -> Path | None:
    """--policy, else EXTPROC_POLICY, else the running stack's, else examples/policy.yaml."""
    if arg:
        return Path(arg)
    if os.environ.get("EXTPROC_POLICY"):
        return Path(os.environ["EXTPROC_POLICY"])
    from extproc.devstack import state

    try:
        return Path(stack_used(stack).policy)
    except state.NoStackError:
        pass
    return DEFAULT_POLICY if DEFAULT_POLICY.exists() else None


def add_stack_options(parser: argparse.ArgumentParser) -> None:
    """--redis-url and --stack, for every command that reads or writes Redis."""
    parser.add_argument("--redis-url", help=REDIS_URL_HELP)
    parser.add_argument("--stack", type=int, metavar="PORT", help=STACK_HELP)


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    hosts = parts.netloc.rpartition("@")[2]  # "h1:1,h2:2" for a cluster: not one port
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


def _usd(nanos: int) -> str:
    return usd_for_people(nanos)


def _when(ms: int, zone: ZoneInfo | None = None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, zone or UTC).strftime("%Y-%m-%d %H:%M:%S %Z")


def display_zone(args: argparse.Namespace) -> ZoneInfo:
    """The policy's time zone, the one `spend` reports in, so every command shows one
    clock; UTC when no valid policy is at hand."""
    from extproc.governance.policy import PolicyError, load_policy

    path = policy_path(getattr(args, "policy", None), getattr(args, "stack", None))
    if path is not None:
        try:
            return load_policy(path).timezone
        except PolicyError:
            pass
    return ZoneInfo("UTC")


def fail(message: str, code: int) -> int:
    """Tell the operator what went wrong (no traceback) and give the exit code back."""
    print(f"extproc: {message}", file=sys.stderr)
    return code


def load_policy_arg(arg: str | None, stack: int | None = None) -> Policy | str:
    """The policy `--policy`, EXTPROC_POLICY or the running stack names, or why there is
    none to use."""
    from extproc.governance.policy import PolicyError, load_policy

    path = policy_path(arg, stack)
    if path is None:
        return "no policy file: pass --policy or set EXTPROC_POLICY"
    try:
        return load_policy(path)
    except PolicyError as exc:
        return f"the policy is invalid:\n{exc}"


# --- check-config ------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    from extproc.governance.policy import PolicyError, load_policy

    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        count = len(exc.problems)
        print(f"{count} problem{'s' if count != 1 else ''}; policy not usable", file=sys.stderr)
        return 2
    workspaces = ", ".join(
        f"{ws.name} {_usd(ws.budget_nanos)}/{ws.period}" for ws in policy.workspaces.values()
    )
    teams = sum(len(ws.teams) for ws in policy.workspaces.values())
    services = sum(len(ws.services) for ws in policy.workspaces.values())
    hooks = len(policy.webhooks)
    print(
        f"ok: {len(policy.workspaces)} workspaces ({workspaces}), {teams} teams, "
        f"{services} services, {hooks} webhook{'s' if hooks != 1 else ''}; "
        f"periods in {policy.timezone.key}"
    )
    for warning in policy.warnings:
        print(f"warning: {warning}")
    for ws in policy.workspaces.values():
        try:
            ws.upstream.read_key()
        except PolicyError as exc:
            reason = str(exc).removeprefix("upstream key: ")
            print(f"warning: workspaces.{ws.name}.upstream: {reason} (in this environment)")
    return 0


# --- keys --------------------------------------------------------------------------------


def _run_with_store(args: argparse.Namespace, action: Callable[[Any], Awaitable[int]]) -> int:
    from extproc.governance.keys import KeyStore, KeyStoreError
    from extproc.store.clients import UNAVAILABLE, make_client

    url = redis_url(args.redis_url, args.stack)

    async def go() -> int:
        client = make_client(url, socket_connect_timeout=3, socket_timeout=10)
        try:
            return await action(KeyStore(client))
        finally:
            await client.aclose()

    try:
        return asyncio.run(go())
    except KeyStoreError as exc:
        return fail(str(exc), 1)
    except UNAVAILABLE as exc:
        return fail(f"Redis at {redacted(url)}: {exc}", 1)


def _identity_json(secret: str, identity: Any, **extra: Any) -> str:
    from extproc.governance.keys import new_key_dict

    return json.dumps(new_key_dict(secret, identity, **extra), indent=2)


def _print_new_key(secret: str, identity: Any) -> None:
    team = f", team {identity.team}" if identity.team else ""
    print(f"{identity.key_id}  workspace {identity.workspace}{team}, service {identity.service}")
    print(secret)
    print("This is the only time the key is shown: store it in your secret manager now.")


def cmd_keys_create(args: argparse.Namespace) -> int:
    from extproc.governance.policy import PolicyError, load_policy

    policy = None
    path = policy_path(args.policy, args.stack)
    if path is not None:
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            return fail(f"the policy used to check names is invalid:\n{exc}", 2)
    else:
        print("extproc: no policy file found; names are not checked", file=sys.stderr)

    async def action(store: Any) -> int:
        secret, identity = await store.create(
            args.workspace, args.service, args.team, args.owner, policy=policy
        )
        if args.json:
            print(_identity_json(secret, identity))
        else:
            _print_new_key(secret, identity)
        return 0

    return _run_with_store(args, action)


def cmd_keys_list(args: argparse.Namespace) -> int:
    zone = display_zone(args)

    async def action(store: Any) -> int:
        infos = await store.list(args.workspace)
        if args.json:
            print(json.dumps([i.to_dict() for i in infos], indent=2))
            return 0
        header = ("KEY ID", "STATUS", "WORKSPACE", "TEAM", "SERVICE", "OWNER", "CREATED", "EXPIRES")
        rows = [header] + [
            (
                i.key_id,
                i.status + (f" -> {i.replaced_by}" if i.replaced_by else ""),
                i.workspace,
                i.team or "-",
                i.service,
                i.owner or "-",
                _when(i.created_ms, zone),
                _when(i.expires_ms, zone),
            )
            for i in infos
        ]
        widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        return 0

    return _run_with_store(args, action)


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    async def action(store: Any) -> int:
        secret, identity = await store.rotate(args.key_id, args.overlap)
        old = await store.info(args.key_id)
        old_expires = old.expires_ms if old else 0
        if args.json:
            print(
                _identity_json(secret, identity, replaces=args.key_id, old_expires_ms=old_expires)
            )
        else:
            _print_new_key(secret, identity)
            print(f"{args.key_id} keeps working until {_when(old_expires, display_zone(args))}.")
        return 0

    return _run_with_store(args, action)


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    async def action(store: Any) -> int:
        info = await store.revoke(args.key_id)
        if args.json:
            print(json.dumps(info.to_dict(), indent=2))
        else:
            print(f"revoked {info.key_id} (workspace {info.workspace}, service {info.service})")
        return 0

    return _run_with_store(args, action)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `check-config` and `keys` to the `extproc` command line."""
    p = sub.add_parser("check-config", help="validate a budget policy file")
    p.add_argument("file", help="policy YAML to check (nothing else is read)")
    p.set_defaults(func=cmd_check_config)

    common = argparse.ArgumentParser(add_help=False)
    add_stack_options(common)
    common.add_argument("--json", action="store_true", help="machine-readable output")

    keys = sub.add_parser("keys", help="create, list, rotate and revoke virtual API keys")
    ksub = keys.add_subparsers(dest="keys_command", metavar="SUBCOMMAND")

    def keys_help(_args: argparse.Namespace) -> int:
        keys.print_help()
        return 2

    keys.set_defaults(func=keys_help)

    p = ksub.add_parser("create", parents=[common], help="issue a key (shown once)")
    p.add_argument("--workspace", required=True, help="workspace the key bills to")
    p.add_argument("--service", required=True, help="service within the workspace")
    p.add_argument("--team", help="default: the service's team in the policy")
    p.add_argument("--owner", help="person or system responsible, e.g. an email")
    p.add_argument(
        "--policy",
        help="checks the names; else EXTPROC_POLICY, else the stack's, else examples/policy.yaml",
    )
    p.set_defaults(func=cmd_keys_create)

    p = ksub.add_parser("list", parents=[common], help="list keys (never the keys themselves)")
    p.add_argument("--workspace", help="only this workspace's keys")
    p.add_argument("--policy", help="for the time zone; else EXTPROC_POLICY, else the stack's")
    p.set_defaults(func=cmd_keys_list)

    p = ksub.add_parser("rotate", parents=[common], help="new key; the old one works a while")
    p.add_argument("key_id", help="the key to replace (from `keys list`)")
    p.add_argument(
        "--overlap",
        type=parse_duration,
        default=parse_duration("24h"),
        help="how long the old key keeps working: 90s, 15m, 24h (default), 7d",
    )
    p.set_defaults(func=cmd_keys_rotate)

    p = ksub.add_parser("revoke", parents=[common], help="refuse a key from now on")
    p.add_argument("key_id", help="the key to refuse (from `keys list`)")
    p.set_defaults(func=cmd_keys_revoke)

    from extproc.cli.topup import register_pause_commands

    register_pause_commands(ksub)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m extproc.cli.admin ...`)."""
    parser = argparse.ArgumentParser(prog="extproc", description=__doc__)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
