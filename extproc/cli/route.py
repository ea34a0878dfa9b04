"""`extproc route`: what the routing rules would do to a request, without sending one.

Policies with rules, ceilings and ladders interact; an operator editing one needs to see,
before deploying, which rule a Codex CLI turn would hit and what it would be served by.
Exit codes follow the admin commands: 0 served, 1 refused, 2 bad arguments or policy.
"""

from __future__ import annotations

import argparse
import json
import sys
from decimal import Decimal, InvalidOperation

from extproc.cli.admin import fail, load_policy_arg
from extproc.governance.policy import EFFORTS, ENDPOINT_NAMES
from extproc.wire.spec import DEFAULT_METERED

_BUDGETS = ("ok", "soft", "hard")


def _tokens(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r}")
    return value


def _usd(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = Decimal(-1)
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"not an amount in dollars: {text!r}")
    return value


def cmd_route(args: argparse.Namespace) -> int:
    from extproc.routing.decide import decide_route
    from extproc.routing.explain import explain, sample_request

    policy = load_policy_arg(args.policy)
    if isinstance(policy, str):
        return fail(policy, 2)
    sample = {
        "workspace": args.workspace,
        "service": args.service,
        "model": args.model,
        "endpoint": args.endpoint,
        "task": args.task,
        "input_tokens": args.input_tokens,
        "session_input_tokens": args.session_tokens,
        "tools": args.tools,
        "stream": args.stream,
        "reasoning_effort": args.effort,
        "output_cap": args.max_output_tokens,
        "budget": args.budget,
        "overdraft_left_usd": args.overdraft_left,
    }
    try:
        identity, traits, budget, session = sample_request(policy, sample)
    except ValueError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    decision = decide_route(policy, identity, traits, budget, session)
    if args.json:
        print(json.dumps(decision.to_dict(), indent=2))
    elif args.explain:
        print(explain(policy, sample))
    elif decision.refuse is not None:
        print(f"refused {decision.refuse.status} {decision.refuse.code}: {decision.refuse.message}")
    else:
        steps = decision.header_value()
        print(decision.model + (f"  ({steps})" if steps else ""))
    return 1 if decision.refuse is not None else 0


def register_route(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `route` to the `extproc` command line."""
    p = sub.add_parser("route", help="show which model and limits the routing rules give a request")
    p.add_argument("--explain", action="store_true", help="every rule and step with its reason")
    p.add_argument("--json", action="store_true", help="the decision as JSON")
    p.add_argument("--workspace", required=True, help="the caller's workspace")
    p.add_argument("--service", required=True, help="the caller's service")
    p.add_argument("--model", required=True, help="as the client sends it (aliases resolve)")
    p.add_argument(
        "--endpoint", default=DEFAULT_METERED, choices=ENDPOINT_NAMES, help="default: %(default)s"
    )
    p.add_argument("--task", help="the x-task header")
    p.add_argument(
        "--input-tokens", type=_tokens, default=0, metavar="N", help="the request's input size"
    )
    p.add_argument(
        "--session-tokens", type=_tokens, default=0, metavar="N",
        help="input tokens already sent in this session",
    )  # fmt: skip
    p.add_argument("--max-output-tokens", type=_tokens, metavar="N", help="the request's cap")
    p.add_argument("--tools", action="store_true", help="the request declares tools")
    p.add_argument("--stream", action="store_true", help="the request streams")
    p.add_argument("--effort", choices=EFFORTS, help="the request's reasoning effort")
    p.add_argument("--budget", choices=_BUDGETS, default="ok", help="budget standing")
    p.add_argument(
        "--overdraft-left", type=_usd, metavar="USD",
        help="overdraft money left at --budget hard (default: all of it)",
    )  # fmt: skip
    p.add_argument(
        "--policy", help="else EXTPROC_POLICY, else the stack's, else examples/policy.yaml"
    )
    p.set_defaults(func=cmd_route)
