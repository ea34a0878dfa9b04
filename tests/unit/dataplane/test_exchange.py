"""Exchange through the stream dispatcher, with small fakes for the key cache, the budgets and
the ledger: each ext_proc message in, each reply and the one settlement out.

The policy, prices and token counter are the real ones; only what would talk to Redis is
replaced. The e2e suite runs the same paths through a real Envoy and Redis.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2

from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane.deps import Deps
from extproc.dataplane.exchange import Exchange
from extproc.dataplane.server import dispatch
from extproc.governance.budget import Decision, Plan, Standing
from extproc.governance.keys import Identity, Lookup
from extproc.governance.policy import load_policy
from extproc.metering.prices import PriceTable
from extproc.metering.tokens import count_text
from extproc.settings import Settings
from extproc.store.schema import key_scope, service_scope, team_scope
from extproc.v1.ledger_pb2 import Settlement
from extproc.wire.usage import Usage

ROOT = Path(__file__).resolve().parents[3]
POLICY = load_policy(ROOT / "examples" / "policy.yaml")
SECRET = "sk-ext-" + "a" * 40
# `dev/codex-cli` belongs to team `platform` in the policy; the key itself names no team.
CALLER = Identity("key_unit", "dev", None, "codex-cli", None, 0)
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


class FakeKeys:
    def __init__(self, known: dict[str, Identity]) -> None:
        self.known = known

    def get(self, secret: str) -> Lookup:
        return self.known.get(secret)

    async def resolve(self, secret: str) -> Identity | None:
        return self.known.get(secret)

    async def is_revoked(self, identity: Identity) -> bool:
        return identity.key_id in self.revoked

    revoked: frozenset[str] = frozenset()


class FakeBudgets:
    """Admits (or refuses) every plan; remembers what it was asked to reserve."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.plans: list[Plan] = []

    def level(self, identity: Identity) -> str:
        return "ok"

    async def reserve_with_overdraft(
        self,
        plan: Plan,
        fail_open: bool,
        now_ms: int,
        *,
        session: str = "",
        orphan: Callable[[Plan], bytes] | None = None,
        overdraft_nanos: int | None = None,
        fallback: Callable[[int], Plan | None] | None = None,
    ) -> tuple[Plan, Decision, bool]:
        self.plans.append(plan)
        ws = plan.scopes[0]
        if self.refuse:
            standing = Standing(ws, ws.hard_nanos or 0, 0)
            decision = Decision(
                False, "budget", denied=ws, standings=(standing,), first_denial=True
            )
            return plan, decision, False
        return plan, Decision(True, "ok", f"rid-{len(self.plans)}"), False


class FakeLedger:
    def __init__(self) -> None:
        self.settlements: list[Settlement] = []
        self.unmetered: list[str] = []
        self.refused: list[str] = []

    def submit(self, settlement: Settlement) -> None:
        self.settlements.append(settlement)

    def note_unmetered(self, key: str) -> None:
        self.unmetered.append(key)

    def note_refused(self, reason: str) -> None:
        self.refused.append(reason)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


def make_deps(
    executor: ThreadPoolExecutor, *, bad_request: str = "reject", refuse: bool = False
) -> Deps:
    return Deps(
        settings=Settings(bad_request=bad_request),
        prices=PriceTable.load(None),
        count=count_text,
        ledger=FakeLedger(),
        executor=executor,
        policy=POLICY,
        keys=FakeKeys({SECRET: CALLER}),
        budgets=FakeBudgets(refuse=refuse),
        upstream_keys={"dev": "sk-upstream-dev"},
        now_ms=lambda: T0,
    )


def headers(pairs: dict[str, str], *, end: bool = False) -> msgs.pb.HttpHeaders:
    return msgs.pb.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
        ),
        end_of_stream=end,
    )


def send(exchange: Exchange, **message: object) -> msgs.ProcessingResponse:
    """One ext_proc message through the dispatcher; an awaitable reply is awaited."""
    reply = dispatch(exchange, msgs.ProcessingRequest(**message))  # type: ignore[arg-type]
    if isinstance(reply, msgs.ProcessingResponse):
        return reply

    async def wait(pending: Awaitable[msgs.ProcessingResponse]) -> msgs.ProcessingResponse:
        return await pending

    return asyncio.run(wait(reply))


def request(exchange: Exchange, body: bytes, *, secret: str = SECRET) -> msgs.ProcessingResponse:
    first = send(
        exchange,
        request_headers=headers(
            {
                ":method": "POST",
                ":path": "/v1/chat/completions",
                "authorization": f"Bearer {secret}",
                "x-extproc-workspace": "spoofed",
            }
        ),
    )
    if first.WhichOneof("response") == "immediate_response":
        return first
    return send(exchange, request_body=msgs.pb.HttpBody(body=body, end_of_stream=True))


def respond(exchange: Exchange, body: dict[str, object]) -> None:
    send(
        exchange,
        response_headers=headers({":status": "200", "content-type": "application/json"}),
    )
    last = msgs.pb.HttpBody(body=json.dumps(body).encode(), end_of_stream=True)
    send(exchange, response_body=last)


def reply_header(reply: msgs.ProcessingResponse, name: str) -> str | None:
    for kind in ("request_headers", "request_body", "response_headers", "response_body"):
        if reply.HasField(kind):
            mutation = getattr(reply, kind).response.header_mutation
            for h in mutation.set_headers:
                if h.header.key == name:
                    return h.header.raw_value.decode()
    return None


CHAT = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hello there"}]}
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-5-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
}


def test_governed_request_is_reserved_forwarded_and_settled_once(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    exchange = Exchange(deps)
    first = send(
        exchange,
        request_headers=headers(
            {
                ":method": "POST",
                ":path": "/v1/chat/completions",
                "authorization": f"Bearer {SECRET}",
                "x-extproc-workspace": "spoofed",
            }
        ),
    )
    mutation = first.request_headers.response.header_mutation
    assert reply_header(first, "authorization") == "Bearer sk-upstream-dev"
    assert "x-extproc-workspace" in mutation.remove_headers  # a client's own claim is stripped
    last = msgs.pb.HttpBody(body=json.dumps(CHAT).encode(), end_of_stream=True)
    send(exchange, request_body=last)
    budgets = deps.budgets
    assert isinstance(budgets, FakeBudgets) and len(budgets.plans) == 1
    respond(exchange, ANSWER)
    exchange.close()
    exchange.close()  # a second end of stream settles nothing more

    ledger = deps.ledger
    assert isinstance(ledger, FakeLedger) and len(ledger.settlements) == 1
    settlement = ledger.settlements[0]
    record = settlement.record
    assert (record.workspace, record.service, record.key_id) == ("dev", "codex-cli", "key_unit")
    assert settlement.reservation_id == "rid-1"
    assert settlement.period == budgets.plans[0].period.id
    served = record.model_served
    expected = deps.prices.charge(served, Usage(input_tokens=11, output_tokens=7)).nanos
    assert record.cost_nanos == expected > 0
    charged = [s.scope for s in settlement.scopes]
    assert charged[:4] == [s.scope for s in budgets.plans[0].scopes]
    assert team_scope("platform") in charged


def test_bad_request_passed_through_still_reaches_the_team_budget(
    executor: ThreadPoolExecutor,
) -> None:
    """Regression: without a reservation plan the settlement used to skip the team scope."""
    deps = make_deps(executor, bad_request="pass")
    exchange = Exchange(deps)
    reply = request(exchange, b"{not json")
    assert reply == msgs.CONTINUE_REQUEST_BODY  # forwarded untouched, as configured
    respond(exchange, ANSWER)
    exchange.close()

    ledger = deps.ledger
    assert isinstance(ledger, FakeLedger) and len(ledger.settlements) == 1
    settlement = ledger.settlements[0]
    scopes = {s.scope: s.soft_nanos for s in settlement.scopes}
    dev = POLICY.workspaces["dev"]
    assert scopes["ws"] == dev.soft_nanos  # soft-limit alerts fire for this spend too
    assert team_scope("platform") in scopes
    assert service_scope("codex-cli") in scopes
    assert key_scope("key_unit") in scopes
    assert settlement.record.cost_nanos > 0


def test_unknown_key_is_refused_and_counted_not_recorded(executor: ThreadPoolExecutor) -> None:
    """A flood of bad keys must cost a counter each, never a ledger write."""
    deps = make_deps(executor)
    exchange = Exchange(deps)
    reply = request(exchange, json.dumps(CHAT).encode(), secret="sk-ext-" + "b" * 40)
    assert reply.immediate_response.status.code == 401
    error = json.loads(reply.immediate_response.body)["error"]
    assert error["type"] == "invalid_request_error"
    exchange.close()
    ledger = deps.ledger
    assert isinstance(ledger, FakeLedger)
    assert ledger.settlements == [] and ledger.refused == ["invalid_api_key"]


def test_budget_refusal_answers_429_and_settles_without_spend(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor, refuse=True)
    exchange = Exchange(deps)
    reply = request(exchange, json.dumps(CHAT).encode())
    assert reply.immediate_response.status.code == 429
    assert json.loads(reply.immediate_response.body)["error"]["code"] == "insufficient_quota"
    exchange.close()
    ledger = deps.ledger
    assert isinstance(ledger, FakeLedger) and len(ledger.settlements) == 1
    settlement = ledger.settlements[0]
    assert settlement.record.cost_nanos == 0
    assert settlement.reservation_id == ""


def test_passthrough_is_key_swapped_and_settled_once(executor: ThreadPoolExecutor) -> None:
    deps = make_deps(executor)
    exchange = Exchange(deps)
    reply = send(
        exchange,
        request_headers=headers(
            {
                ":method": "GET",
                ":path": "/v1/files/f-1/",
                "authorization": f"Bearer {SECRET}",
                "api-key": SECRET,
                "cookie": "c",
            },
            end=True,
        ),
    )
    mutation = reply.request_headers.response.header_mutation
    assert reply_header(reply, "authorization") == "Bearer sk-upstream-dev"
    assert reply_header(reply, ":path") == "/v1/files/f-1"
    assert {"api-key", "cookie"} <= set(mutation.remove_headers)
    assert reply.mode_override.response_body_mode == msgs.ProcessingMode.NONE
    send(exchange, response_headers=headers({":status": "200"}, end=False))
    exchange.close()
    ledger = deps.ledger
    assert isinstance(ledger, FakeLedger) and len(ledger.settlements) == 1
    record = ledger.settlements[0].record
    assert (record.endpoint, record.price_family, record.key_id) == ("files", "free", "key_unit")


def test_unknown_path_is_404_and_a_failed_headers_phase_is_refused(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    reply = send(
        Exchange(deps),
        request_headers=headers(
            {":method": "POST", ":path": "/v1/chat/completion", "authorization": f"Bearer {SECRET}"}
        ),
    )
    assert reply.immediate_response.status.code == 404

    class BrokenKeys(FakeKeys):
        def get(self, secret: str) -> Lookup:
            raise RuntimeError("a bug in the headers phase")

    broken = make_deps(executor)
    broken.keys = BrokenKeys({})
    refused = send(
        Exchange(broken),
        request_headers=headers(
            {":method": "GET", ":path": "/v1/files", "authorization": f"Bearer {SECRET}"}
        ),
    )
    # Deny by default: never continue a request whose credentials were not swapped.
    assert refused.immediate_response.status.code == 500


def test_a_stream_without_request_headers_leaves_no_record(
    executor: ThreadPoolExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    """Envoy may open a stream only for its own reply (response headers, then the end): that
    is no request, so no record and no log line about a request with an empty id."""
    deps = make_deps(executor)
    exchange = Exchange(deps)
    reply = send(exchange, response_headers=headers({":status": "400"}, end=True))
    assert reply.WhichOneof("response") == "response_headers"
    exchange.close()
    assert deps.ledger.settlements == []  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if "request  " in r.getMessage()]
    # A stream cut before its response (client gone) is still recorded once, with its id.
    gone = Exchange(deps)
    send(
        gone,
        request_headers=headers(
            {
                ":method": "POST",
                ":path": "/v1/chat/completions",
                "authorization": f"Bearer {SECRET}",
            }
        ),
    )
    gone.close()
    (settled,) = deps.ledger.settlements  # type: ignore[attr-defined]
    assert settled.record.request_id == gone.seen.request_id != ""
    assert settled.record.outcome == "client_gone"
