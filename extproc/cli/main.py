"""`extproc` command line: serve, simulate, stack, usage."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

STATE_FILE = Path(".data") / "stack.json"


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    from extproc.dataplane.server import serve
    from extproc.dataplane.workers import supervise, worker_count
    from extproc.settings import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    if args.workers is not None:
        if args.workers < 0:
            print("extproc: --workers: must be 0 (one per CPU) or more", file=sys.stderr)
            return 2
        settings = dataclasses.replace(settings, workers=args.workers)
    count = worker_count(settings)
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
    asyncio.run(serve(settings, reuse_port=args.reuse_port))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from extproc.simulator import main as sim_main

    return sim_main(["--host", args.host, "--port", str(args.port)])


def cmd_usage(args: argparse.Namespace) -> int:
    from extproc.metering.ledger import recent_records, record_to_dict
    from extproc.store.clients import make_client

    async def fetch() -> list[dict[str, object]]:
        client = make_client(redis_url(args.redis_url), socket_connect_timeout=2)
        try:
            records = await recent_records(client, args.limit)
        finally:
            await client.aclose()
        return [record_to_dict(r) for r in records]

    rows = asyncio.run(fetch())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        flags = ("~" if r["estimated"] else " ") + ("?" if r["price_fallback"] else " ")
        print(
            f"{r['request_id'][:12]:12} {r['endpoint']:17} {r['model_served'][:24]:24} "
            f"in={r['input_tokens']:>8} cached={r['cached_input_tokens']:>8} "
            f"out={r['output_tokens']:>7} ${r['cost_usd']:<12} {flags} {r['outcome']}"
        )
    return 0


DEFAULT_POLICY = Path("examples/policy.yaml")


def _demo_key(redis_url_: str, policy_path: Path) -> str:
    """A key for the first service of the first workspace, so `make run` is usable at once."""
    from extproc.governance.keys import KeyStore
    from extproc.governance.policy import load_policy
    from extproc.store.clients import make_client

    policy = load_policy(policy_path)
    ws = next(iter(policy.workspaces.values()))
    service = next(iter(ws.services), "demo")

    async def create() -> str:
        client = make_client(redis_url_)
        try:
            secret, _identity = await KeyStore(client).create(ws.name, service, policy=policy)
        finally:
            await client.aclose()
        return f"{secret}   (workspace {ws.name}, service {service})"

    return asyncio.run(create())


def cmd_stack(args: argparse.Namespace) -> int:
    from extproc.dataplane.workers import available_cpus
    from extproc.devstack.stack import Stack, StackConfig
    from extproc.governance.policy import load_policy

    port = int(os.environ.get("EXTPROC_PORT", "10000"))
    upstream = os.environ.get("UPSTREAM_URL") or None
    policy_path = Path(os.environ.get("EXTPROC_POLICY") or DEFAULT_POLICY).resolve()
    env = {"EXTPROC_POLICY": str(policy_path)}
    if os.environ.get("EXTPROC_CONFIG"):
        env["EXTPROC_CONFIG"] = str(Path(os.environ["EXTPROC_CONFIG"]).resolve())
    if upstream is None:
        # The simulator accepts any credential: stand in for the real keys nobody has locally.
        for name, ws in load_policy(policy_path).workspaces.items():
            if ws.upstream.key_env and not os.environ.get(ws.upstream.key_env):
                env[ws.upstream.key_env] = f"sk-simulated-{name}"
    # One sidecar worker and one Envoy worker thread per usable CPU, unless told otherwise.
    workers = int(os.environ.get("EXTPROC_WORKERS") or 0) or available_cpus()
    console_port = int(os.environ.get("EXTPROC_CONSOLE_PORT", "10080"))
    # The admin API needs a token: a fresh one per local stack unless the operator set one.
    admin_tokens = os.environ.get("EXTPROC_ADMIN_TOKENS") or f"local:{secrets.token_urlsafe(24)}"
    stack = Stack(
        StackConfig(
            listen_port=port,
            upstream_url=upstream,
            data_dir=Path(".data"),
            sidecar_env=env,
            sidecar_workers=workers,
            envoy_concurrency=workers,
            console_port=console_port,
            console_env={"EXTPROC_ADMIN_TOKENS": admin_tokens},
            # A CA bundle for an https UPSTREAM_URL other than the system's (a corporate proxy).
            upstream_ca=os.environ.get("UPSTREAM_CA_FILE") or None,
        )
    )
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stack.start()
    try:
        STATE_FILE.write_text(
            json.dumps({"redis_url": stack.redis_url, "base_url": stack.base_url})
        )
        print(
            f"\nextproc stack is up.\n"
            f"  OpenAI base URL : {stack.base_url}\n"
            f"  upstream        : {stack.upstream_url}\n"
            f"  policy          : {policy_path}\n"
            f"  redis           : {stack.redis_url} (data in .data/redis)\n"
            f"  demo key        : {_demo_key(stack.redis_url, policy_path)}\n"
            f"  more keys       : .venv/bin/extproc keys create --workspace W --service S\n"
            f"  usage / spend   : .venv/bin/extproc usage --limit 10 ; .venv/bin/extproc spend\n"
            f"  console         : {stack.console_login}   (one-time login link)\n"
            f"  admin API       : {stack.console_url}/admin/v1 with 'Authorization: Bearer "
            f"{admin_tokens.split(',')[0].partition(':')[2] or admin_tokens}'\n"
            f"  my usage        : {stack.base_url.removesuffix('/v1')}/extproc/me\n"
            f"Ctrl-C stops everything.",
            flush=True,
        )
        stopped.wait()
    finally:
        print("stopping…", flush=True)
        stack.stop()
        STATE_FILE.unlink(missing_ok=True)
    return 0


from extproc.cli.admin import redis_url, register  # noqa: E402
from extproc.cli.ledger import register_ledger  # noqa: E402
from extproc.cli.policy import register_policy  # noqa: E402
from extproc.cli.reconcile import register_reconcile  # noqa: E402
from extproc.cli.route import register_route  # noqa: E402
from extproc.cli.spend import register_spend  # noqa: E402
from extproc.console.cli import register_console  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("stack", help="run Envoy + sidecar + Redis + simulator (make run)")
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("usage", help="print recent usage records, newest first")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--redis-url")
    p.set_defaults(func=cmd_usage)
    register(sub)
    register_spend(sub)
    register_route(sub)
    register_ledger(sub)
    register_reconcile(sub)
    register_console(sub)
    register_policy(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("EXTPROC_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
