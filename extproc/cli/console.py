"""`extproc console`: start the console and admin API (kept light: the web stack is
imported only when the command runs, not by every `extproc` invocation)."""

from __future__ import annotations

import argparse
import socket
import sys


def cmd_console(args: argparse.Namespace) -> int:
    import uvicorn

    from extproc.cli.admin import policy_path, redis_url
    from extproc.console.app import create_app
    from extproc.console.auth import Auth, AuthConfigError, tokens_from_env
    from extproc.console.config import ConsoleConfigError, settings_from_env
    from extproc.console.sessions import mint_login
    from extproc.console.state import ConsoleState
    from extproc.store.clients import UNAVAILABLE

    try:
        tokens = tokens_from_env()
        settings = settings_from_env()
    except (AuthConfigError, ConsoleConfigError) as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    state = ConsoleState(
        redis_url=redis_url(args.redis_url, args.stack),
        policy_path=policy_path(args.policy, args.stack),
        auth=Auth(tokens),
        settings=settings,
    )
    app = create_app(state)
    base = f"http://{args.host}:{args.port}"
    if not tokens and not args.login_token and settings.oidc is None:
        print("extproc: no admin token (EXTPROC_ADMIN_TOKENS or _FILE): API closed", flush=True)
    if settings.oidc is not None:
        print(f"console single sign-on with {settings.oidc.issuer}", flush=True)
    if args.login_token:
        client = state.sync_redis()
        try:
            token = mint_login(client)
        except UNAVAILABLE as exc:
            print(f"extproc: console cannot reach Redis for its login link: {exc}", file=sys.stderr)
            return 1
        finally:
            client.close()
        print(f"console: {base}/login?token={token}", flush=True)
    # Bound here, before "listening" is printed: a client that reads that line can connect
    # at once (its connection waits in the backlog until uvicorn serves).
    try:
        sock = socket.create_server((args.host, args.port), reuse_port=False)
    except OSError as exc:
        print(f"extproc: console cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"console listening on {base}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def register_console(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("console", help="serve the web console and the admin API")
    from extproc.cli.admin import add_stack_options

    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=10080, help="port (default %(default)s)")
    p.add_argument(
        "--policy", help="else EXTPROC_POLICY, else the stack's, else examples/policy.yaml"
    )
    add_stack_options(p)
    p.add_argument(
        "--login-token", action="store_true", help="print a one-time browser login URL at start"
    )
    p.set_defaults(func=cmd_console)
