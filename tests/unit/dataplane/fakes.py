"""Small fakes for what a request's handler would ask of Redis (the key cache, the budgets,
the ledger) and helpers that drive one ext_proc stream through the dispatcher.

The policy, prices and token counter are the real ones: only what would talk to Redis is
replaced. The e2e suite runs the same paths through a real Envoy and Redis.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2

from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane.deps import Deps
from extproc.dataplane.lifecycle import Stream
from extproc.dataplane.server import dispatch
from extproc.governance.budget import Decision, Plan, Standing
from extproc.governance.keys import Identity, Lookup
from extproc.governance.policy import Policy, load_policy
from extproc.metering.orphans import Orphan, orphan_settlement
from extproc.metering.prices import PriceTable
from extproc.metering.tokens import count_text
from extproc.settings import Settings
from extproc.v1.ledger_pb2 import Settlement, UsageRecord

ROOT = Path(__file__).resolve().parents[3]
POLICY = load_policy(ROOT / "examples" / "policy.yaml")
SECRET = "sk-ext-" + "a" * 40
# `dev/codex-cli` belongs to team `platform` in the policy; the key itself names no team.
CALLER = Identity("key_unit", "dev", None, "codex-cli", None, 0)
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
PRICES = PriceTable.load(None)

CHAT = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hello there"}]}
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-5-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
}


class FakeKeys:
    def __init__(self, known: dict[str, Identity]) -> None:
        self.known = known
        self.revoked: frozenset[str] = frozenset()
        self.down = False  # the key store cannot be asked

    def get(self, secret: str) -> Lookup:
        return self.known.get(secret)

    async def resolve(self, secret: str) -> Identity | None:
        if self.down:
            raise ConnectionError("the key store is down")
        return self.known.get(secret)

    async def is_revoked(self, identity: Identity) -> bool:
        if self.down:
            raise ConnectionError("the key store is down")
        return identity.key_id in self.revoked


def budget_denial(plan: Plan) -> Decision:
    """The workspace's hard cap is spent: what the reserve script says then."""
    ws = plan.scopes[0]
    standing = Standing(ws, ws.hard_nanos or 0, 0)
    return Decision(False, "budget", denied=ws, standings=(standing,), first_denial=True)


class FakeBudgets:
    """Admits (or refuses) every plan; remembers what it was asked to reserve.

    `answer` decides each reservation from its plan (default: admit with a fresh id)."""

    def __init__(
        self, refuse: bool = False, answer: Callable[[Plan], Decision] | None = None
    ) -> None:
        self.refuse = refuse
        self.answer = answer
        self.plans: list[Plan] = []
        self.orphans: list[bytes | Orphan] = []
        self.exact: list[bool] = []
        self.sessions: list[str] = []
        self.fail_open: list[bool] = []
        self.levels = "ok"

    def level(self, identity: Identity) -> str:
        return self.levels

    async def reserve(
        self,
        plan: Plan,
        fail_open: bool,
        now_ms: int,
        *,
        session: str = "",
        orphan: bytes | Orphan = b"",
        exact: bool = False,
    ) -> Decision:
        self.plans.append(plan)
        self.orphans.append(orphan)
        self.exact.append(exact)
        self.sessions.append(session)
        self.fail_open.append(fail_open)
        if self.answer is not None:
            return self.answer(plan)
        if self.refuse:
            return budget_denial(plan)
        return Decision(True, "ok", f"rid-{len(self.plans)}")

    def orphan_settlements(self) -> list[Settlement]:
        """Each hold's orphan as the reaper would bill it (compact ones priced as it would)."""
        return [
            orphan_settlement(o, PriceTable.load()) if isinstance(o, Orphan)
            else Settlement.FromString(o)
            for o in self.orphans
        ]  # fmt: skip


class FakeLedger:
    def __init__(self) -> None:
        self.settlements: list[Settlement] = []
        self.unmetered: list[str] = []
        self.refused: list[str] = []

    def submit(self, settlement: Settlement) -> None:
        self.settlements.append(settlement)

    def submit_later(self, build: Callable[[], Settlement], *, may_wait: bool = False) -> None:
        self.settlements.append(build())  # built at once: what the writer will build

    def note_unmetered(self, key: str) -> None:
        self.unmetered.append(key)

    def note_refused(self, reason: str) -> None:
        self.refused.append(reason)

    @property
    def records(self) -> list[UsageRecord]:
        return [s.record for s in self.settlements]


def make_deps(
    executor: ThreadPoolExecutor,
    *,
    bad_request: str = "reject",
    refuse: bool = False,
    policy: Policy = POLICY,
    budgets: Any = None,
    callers: dict[str, Identity] | None = None,
    **settings: Any,
) -> Deps:
    """`callers`: more keys the key cache knows, by secret (SECRET is always `CALLER`)."""
    return Deps(
        settings=Settings(bad_request=bad_request, **settings),
        prices=PRICES,
        count=count_text,
        ledger=FakeLedger(),
        executor=executor,
        policy=policy,
        keys=FakeKeys({SECRET: CALLER, **(callers or {})}),
        budgets=budgets or FakeBudgets(refuse=refuse),
        upstream_keys={name: f"sk-upstream-{name}" for name in policy.workspaces},
        now_ms=lambda: T0,
    )


def ledger(deps: Deps) -> FakeLedger:
    assert isinstance(deps.ledger, FakeLedger)
    return deps.ledger


def budgets(deps: Deps) -> FakeBudgets:
    assert isinstance(deps.budgets, FakeBudgets)
    return deps.budgets


def headers(pairs: dict[str, str], *, end: bool = False) -> msgs.pb.HttpHeaders:
    return msgs.pb.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
        ),
        end_of_stream=end,
    )


def send(stream: Stream, **message: object) -> msgs.ProcessingResponse:
    """One ext_proc message through the dispatcher; an awaitable reply is awaited."""
    reply = dispatch(stream, msgs.ProcessingRequest(**message))  # type: ignore[arg-type]
    if isinstance(reply, msgs.ProcessingResponse):
        return reply

    async def wait(pending: Awaitable[msgs.ProcessingResponse]) -> msgs.ProcessingResponse:
        return await pending

    return asyncio.run(wait(reply))


def open_request(
    stream: Stream,
    path: str = "/v1/chat/completions",
    *,
    method: str = "POST",
    secret: str = SECRET,
    end: bool = False,
    **extra: str,
) -> msgs.ProcessingResponse:
    pairs = {":method": method, ":path": path, "authorization": f"Bearer {secret}", **extra}
    return send(stream, request_headers=headers(pairs, end=end))


def request(
    stream: Stream,
    body: bytes,
    *,
    secret: str = SECRET,
    path: str = "/v1/chat/completions",
    **extra: str,
) -> msgs.ProcessingResponse:
    first = open_request(stream, path, secret=secret, **{"x-extproc-workspace": "spoofed", **extra})
    if first.WhichOneof("response") == "immediate_response":
        return first
    return send(stream, request_body=msgs.pb.HttpBody(body=body, end_of_stream=True))


def respond(
    stream: Stream, body: dict[str, object], status: str = "200"
) -> msgs.ProcessingResponse:
    send(
        stream,
        response_headers=headers({":status": status, "content-type": "application/json"}),
    )
    last = msgs.pb.HttpBody(body=json.dumps(body).encode(), end_of_stream=True)
    return send(stream, response_body=last)


def reply_header(reply: msgs.ProcessingResponse, name: str) -> str | None:
    """A header the reply sets, wherever in the reply it is."""
    if reply.HasField("immediate_response"):
        mutations = [reply.immediate_response.headers]
    else:
        mutations = [
            getattr(reply, kind).response.header_mutation
            for kind in ("request_headers", "request_body", "response_headers", "response_body")
            if reply.HasField(kind)
        ]
    for mutation in mutations:
        for h in mutation.set_headers:
            if h.header.key == name:
                return h.header.raw_value.decode()
    return None


def error_of(reply: msgs.ProcessingResponse) -> tuple[int, dict[str, Any]]:
    """An immediate answer's status and OpenAI error object."""
    answer = reply.immediate_response
    return int(answer.status.code), json.loads(answer.body)["error"]
