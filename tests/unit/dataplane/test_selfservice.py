"""What issue 22 added to the data plane, in the handlers' structure: a paused key refused
at admission before anything is held, a budget refusal that links to its top-up page, and
a top-up asked for by a POST under `/extproc/` (its own handler, answered at the body, never
forwarded, counted but not recorded). Small fakes for Redis's parts, the real policy."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from zoneinfo import ZoneInfo

from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane.lifecycle import State
from extproc.dataplane.selfservice import MAX_CALL_BODY, Call
from extproc.dataplane.server import open_stream
from extproc.governance import guard
from extproc.governance.keys import Identity
from extproc.governance.pauses import Pause
from tests.unit.dataplane.fakes import (
    CALLER,
    CHAT,
    T0,
    budgets,
    error_of,
    ledger,
    make_deps,
    open_request,
    reply_header,
    request,
    send,
)

TOPUPS = "/extproc/v1/topups"


def test_a_paused_key_is_refused_before_anything_is_held(executor: ThreadPoolExecutor) -> None:
    deps = make_deps(executor)
    pause = Pause("key_unit", "dev", "codex-cli", "repeats", "it sent one request 40 times",
                  T0, "breaker")  # fmt: skip
    deps.paused["key_unit"] = guard.paused(pause, ZoneInfo("UTC"), "https://console.example")
    stream = open_stream(deps)
    status, error = error_of(request(stream, json.dumps(CHAT).encode()))
    assert (status, error["code"]) == (403, guard.PAUSED_CODE)
    message = error["message"]
    assert "runaway breaker" in message and "extproc keys resume key_unit" in message
    stream.close()
    assert budgets(deps).plans == []  # nothing reserved, nothing forwarded
    [record] = ledger(deps).records
    assert (record.key_id, record.status, record.error_code) == ("key_unit", 403, "key_paused")
    del deps.paused["key_unit"]  # resumed: the next request goes
    again = open_stream(deps)
    assert request(again, json.dumps(CHAT).encode()).WhichOneof("response") == "request_body"


def test_a_budget_refusal_links_to_its_top_up_page(executor: ThreadPoolExecutor) -> None:
    deps = make_deps(executor, refuse=True, public_url="https://gw.example/")
    status, error = error_of(request(open_stream(deps), json.dumps(CHAT).encode()))
    assert (status, error["code"]) == (429, "insufficient_quota")
    scope = budgets(deps).plans[0].scopes[0].scope
    link = f"https://gw.example/extproc/topup/{scope}"
    assert f"Ask for a top-up: {link}" in error["message"]
    reply = request(open_stream(deps), json.dumps(CHAT).encode())
    assert reply_header(reply, "x-extproc-topup-url") == link


class FakeDesk:
    """The top-up desk: remembers what was asked, by whom."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, Any]] = []

    async def ask(self, identity: Identity, body: Any) -> Any:
        self.asked.append((identity.key_id, body))
        desk = self

        class Asked:
            def to_dict(self, tz: ZoneInfo, now_ms: int) -> dict[str, Any]:
                return {"id": f"tu_{len(desk.asked)}", "status": "pending"}

        return Asked()


def test_a_top_up_is_asked_for_at_the_body_and_never_forwarded(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    deps.store, deps.halt = object(), FakeDesk()
    stream = open_stream(deps)
    first = open_request(stream, TOPUPS)
    assert first == msgs.CONTINUE_REQUEST_HEADERS  # nothing swapped: it goes nowhere
    assert isinstance(stream.handler, Call) and stream.state is State.REQUEST
    body = {"scope": "workspace", "amount_usd": 20, "reason": "release day"}
    half = json.dumps(body).encode()
    assert send(stream, request_body=msgs.pb.HttpBody(body=half[:10])) == (
        msgs.CONTINUE_REQUEST_BODY
    )
    reply = send(stream, request_body=msgs.pb.HttpBody(body=half[10:], end_of_stream=True))
    answer = reply.immediate_response
    assert int(answer.status.code) == 201 and json.loads(answer.body)["id"] == "tu_1"
    assert deps.halt.asked == [(CALLER.key_id, body)] and stream.state is State.DONE
    stream.close()
    assert ledger(deps).settlements == [] and ledger(deps).unmetered == ["POST /extproc/v1/*"]


def test_a_top_up_call_without_a_body_or_too_big_is_refused(executor: ThreadPoolExecutor) -> None:
    deps = make_deps(executor)
    deps.store, deps.halt = object(), FakeDesk()
    empty = open_stream(deps)
    assert error_of(open_request(empty, TOPUPS, end=True))[0] == 400
    assert empty.handler is None and empty.state is State.DONE
    big = open_stream(deps)
    open_request(big, TOPUPS)
    huge = msgs.pb.HttpBody(body=b" " * (MAX_CALL_BODY + 1), end_of_stream=True)
    assert error_of(send(big, request_body=huge))[0] == 413
    assert big.state is State.DONE and deps.halt.asked == []
    unknown = open_stream(deps)
    open_request(unknown, TOPUPS, secret="sk-ext-" + "b" * 40)
    refused = send(unknown, request_body=msgs.pb.HttpBody(body=b"{}", end_of_stream=True))
    assert error_of(refused)[0] == 401 and deps.halt.asked == []
