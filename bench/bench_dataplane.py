"""Pure-Python CPU of one enforced request through the data plane, without any I/O.

Drives a request's stream through the dispatcher exactly as the gRPC handler does: the four
ext_proc messages of a JSON chat completion (request headers, body, response headers, body),
or of a 50-event SSE stream, each parsed from its wire bytes and each reply serialized.
Budgets and the ledger are the real `Budgets` and `Ledger` over a canned in-memory Redis
client (the reserve script answers "ok", a lease is granted as asked, the settle calls
"written"), so building script arguments, every request's orphan, the leases' bookkeeping
and the ledger's batching are all counted; only the sockets, RESP encoding and Lua are
missing. `EXTPROC_BUDGET_LEASES=0` holds every request exactly, as the setting does. The
policy is examples/policy.yaml (teams, services, routing rules), the caller `dev/codex-cli`;
telemetry is off.

The figure is CPU time (`time.process_time`) per request, the median of several rounds,
with the spread: the sidecar's own Python cost, the part a code change moves. The whole
sidecar at load costs more (event loop, HTTP/2 framing, Redis round trips): see bench.py.

    .venv/bin/python bench/bench_dataplane.py             # 5 rounds of 3,000 requests
    .venv/bin/python bench/bench_dataplane.py --profile   # plus a cProfile listing
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from envoy.config.core.v3 import base_pb2  # noqa: E402

from bench.loadgen import CHAT_REQUEST, SSE_OUTPUT_TOKENS, SSE_REQUEST  # noqa: E402
from extproc.dataplane import envoy_msgs as msgs  # noqa: E402
from extproc.dataplane.deps import Deps  # noqa: E402
from extproc.dataplane.server import dispatch, open_stream  # noqa: E402
from extproc.governance.budget import Budgets  # noqa: E402
from extproc.governance.keys import Identity, Lookup  # noqa: E402
from extproc.governance.policy import load_policy  # noqa: E402
from extproc.metering.ledger import Ledger  # noqa: E402
from extproc.metering.prices import PriceTable  # noqa: E402
from extproc.metering.tokens import count_text  # noqa: E402
from extproc.settings import Settings  # noqa: E402
from extproc.simulator import chat as simulated_chat  # noqa: E402
from extproc.simulator.caching import PromptCache  # noqa: E402
from extproc.simulator.faults import Faults  # noqa: E402
from extproc.simulator.plan import OUTPUT_TOKENS_HEADER, plan_request  # noqa: E402
from extproc.store.scripts import LEASE  # noqa: E402

SECRET = "sk-ext-" + "b" * 40
CALLER = Identity("key_bench", "dev", None, "codex-cli", None, 0)


def _answers() -> tuple[bytes, list[bytes]]:
    """The upstream's JSON answer and SSE events, made by the simulator (the faithful
    upstream of every other test and bench): role, 46 deltas, finish, usage and [DONE]."""
    headers = {OUTPUT_TOKENS_HEADER: str(SSE_OUTPUT_TOKENS)}
    whole = simulated_chat.build(
        CHAT_REQUEST, plan_request("chat", CHAT_REQUEST, {}, PromptCache()), Faults()
    )
    events = simulated_chat.stream(
        SSE_REQUEST, plan_request("chat", SSE_REQUEST, headers, PromptCache()), Faults()
    )
    return json.dumps(whole).encode(), events.frames


class _Keys:
    def get(self, secret: str) -> Lookup:
        return CALLER if secret == SECRET else None

    async def resolve(self, secret: str) -> Identity | None:
        return self.get(secret)

    async def is_revoked(self, identity: Identity) -> bool:
        return False


class _Pipeline:
    """Queues commands; every settle call answers "written" for each of its settlements
    (no soft limit crossed)."""

    def __init__(self) -> None:
        self.replies: list[Any] = []

    def execute_command(self, *args: Any) -> None:
        if args[0] == "EVALSHA":  # a settle call: EVALSHA sha 1 prefix m ...
            self.replies.append([b"1" * int(args[4])])
        else:
            self.replies.append(0)

    def hincrby(self, name: str, key: str, amount: int = 1) -> None:
        self.replies.append(0)

    def sadd(self, name: str, *values: Any) -> None:
        self.replies.append(0)

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        replies, self.replies = self.replies, []
        return replies

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        return None


def _standings(capped: int) -> list[bytes]:
    return [b"0", b"0"] * capped  # spent, held of each capped scope


class _CannedRedis:
    """The reserve script admits with nothing spent, a lease is granted as asked, orphan
    writes succeed; pipelines are `_Pipeline`s."""

    async def execute_command(self, *args: Any) -> Any:
        return 0

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        args = keys_and_args[numkeys:]
        if sha == LEASE.sha:
            return self._lease(args)
        capped = args[7]  # see budget._args: the count of capped scopes
        return [b"ok", *_standings(capped), b"0"]

    @staticmethod
    def _lease(args: tuple[Any, ...]) -> list[Any]:
        mode = args[0]
        if mode == "return":
            return [b"ok", b"0"]
        now = int(args[1])
        minute = str(now // 60000).encode()
        want_requests, per_request = int(args[-2]), int(args[-1])
        chunk = [str(want_requests).encode(), str(want_requests * per_request).encode(), minute]
        if mode == "grant":  # grant, now, id, want, least, share, ttl, period, key, valid, n
            return [b"ok", str(args[3]).encode(), b"1000", *chunk, *_standings(args[10])]
        return [b"ok", b"1000", *chunk, *_standings(args[7])]  # refresh, now, id, key, ..., n

    async def script_load(self, script: str) -> Any:
        return "sha"

    def pipeline(self, transaction: bool = True) -> _Pipeline:
        return _Pipeline()


def _headers(pairs: dict[str, str]) -> msgs.pb.HttpHeaders:
    return msgs.pb.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
        )
    )


def _wire(sse: bool) -> list[bytes]:
    """The ext_proc messages of one request, serialized as Envoy sends them."""
    request_headers = {
        ":method": "POST",
        ":path": "/v1/chat/completions",
        "authorization": f"Bearer {SECRET}",
        "content-type": "application/json",
        "x-request-id": "5d9f0c0e-bench",
        "user-agent": "bench/1.0",
    }
    body = json.dumps(SSE_REQUEST if sse else CHAT_REQUEST).encode()
    answer, chunks = _answers()
    kind = "text/event-stream" if sse else "application/json"
    pr = msgs.ProcessingRequest
    out = [
        pr(request_headers=_headers(request_headers)),
        pr(request_body=msgs.pb.HttpBody(body=body, end_of_stream=True)),
        pr(response_headers=_headers({":status": "200", "content-type": kind})),
    ]
    if sse:
        out += [
            pr(response_body=msgs.pb.HttpBody(body=c, end_of_stream=i == len(chunks) - 1))
            for i, c in enumerate(chunks)
        ]
    else:
        out.append(pr(response_body=msgs.pb.HttpBody(body=answer, end_of_stream=True)))
    return [m.SerializeToString() for m in out]


async def _one(deps: Deps, wire: list[bytes]) -> None:
    stream = open_stream(deps)
    for raw in wire:
        reply = dispatch(stream, msgs.ProcessingRequest.FromString(raw))
        if not isinstance(reply, msgs.ProcessingResponse):
            reply = await reply
        reply.SerializeToString()
    stream.close()


async def _rounds(
    deps: Deps, ledger: Ledger, wire: list[bytes], rounds: int, n: int
) -> list[float]:
    """CPU µs per request of each round; the ledger writer runs between requests."""

    async def batch(count: int) -> float:
        start = time.process_time()
        for _ in range(count):
            await _one(deps, wire)
            await asyncio.sleep(0)  # let the ledger's writer take the settlement
        await ledger.drain()
        return (time.process_time() - start) / count * 1e6

    await batch(n // 5)  # warm up: caches, the tokenizer, the price table
    return [await batch(n) for _ in range(rounds)]


def _deps(executor: ThreadPoolExecutor, spool: str) -> tuple[Deps, Ledger]:
    redis = _CannedRedis()
    budgets = Budgets(redis, leases=os.environ.get("EXTPROC_BUDGET_LEASES", "1") != "0")
    ledger = Ledger(redis, spool_dir=spool, on_settled=budgets.settled)
    deps = Deps(
        settings=Settings(),
        prices=PriceTable.load(None),
        count=count_text,
        ledger=ledger,
        executor=executor,
        policy=load_policy(ROOT / "examples" / "policy.yaml"),
        keys=_Keys(),
        budgets=budgets,
        upstream_keys={"dev": "sk-upstream-dev"},
    )
    return deps, ledger


async def _main(args: argparse.Namespace, report: Callable[[str], None]) -> None:
    with ThreadPoolExecutor(1) as executor, tempfile.TemporaryDirectory() as spool:
        deps, ledger = _deps(executor, spool)
        await ledger.start()
        for name, sse in (("json", False), ("sse (50 events)", True)):
            wire = _wire(sse)
            n = args.requests // 3 if sse else args.requests
            per = await _rounds(deps, ledger, wire, args.rounds, n)
            report(
                f"enforced {name:<16} {statistics.median(per):6.0f} µs/request"
                f"  [{min(per):.0f}, {max(per):.0f}] over {args.rounds} rounds of {n}"
            )
            if args.profile:
                profile = cProfile.Profile()
                profile.enable()
                await _rounds(deps, ledger, wire, 1, n)
                profile.disable()
                pstats.Stats(profile).sort_stats("cumtime").print_stats(45)
        await ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=3000, help="per round (SSE: a third)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile listing")
    args = parser.parse_args()
    try:
        import uvloop  # the sidecar's loop when installed
    except ImportError:
        asyncio.run(_main(args, print))
    else:
        uvloop.run(_main(args, print))


if __name__ == "__main__":
    main()
