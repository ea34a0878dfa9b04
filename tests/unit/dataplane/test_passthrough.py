"""The passthrough handler: a free call key-swapped and recorded once; a priced call counted,
priced and held before it goes, settled once from its usage; refused (recorded) when the
hold is denied or the model is unpriced.

The fakes are in `fakes` (key cache, budgets, ledger); policy, prices and the token counter
are the real ones. tests/e2e/test_e2e_caps.py runs the same through Envoy and Redis.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane.lifecycle import Stream
from extproc.dataplane.server import open_stream
from extproc.governance.passthrough import DEFAULT_OUTPUT_CEILING
from extproc.metering.decisions import parse_request
from extproc.metering.tokens import count_text
from extproc.wire.spec import PRICED
from extproc.wire.usage import Usage
from tests.unit.dataplane.fakes import (
    CALLER,
    SECRET,
    FakeBudgets,
    FakeLedger,
    headers,
    make_deps,
    reply_header,
    send,
)

COMPACT = {
    "model": "gpt-5-mini",
    "input": [{"role": "user", "content": "a long history " * 40}],
    "instructions": "keep what matters",
}
ANSWER = {
    "id": "resp_1",
    "object": "response.compaction",
    "output": [],
    "usage": {"input_tokens": 333, "output_tokens": 222, "total_tokens": 555},
}
CEILING = dict(DEFAULT_OUTPUT_CEILING)


def compact(exchange: Stream, body: bytes, *, codex: bool = False) -> msgs.ProcessingResponse:
    pairs = {
        ":method": "POST",
        ":path": "/v1/responses/compact",
        "authorization": f"Bearer {SECRET}",
        "content-type": "application/json",
    }
    if codex:
        pairs["originator"] = "codex_cli_rs"
    first = send(exchange, request_headers=headers(pairs))
    if first.WhichOneof("response") == "immediate_response":
        return first
    # The body is read (buffered) whatever the content type: it must be counted and priced.
    assert first.mode_override.request_body_mode == msgs.ProcessingMode.BUFFERED
    return send(exchange, request_body=msgs.pb.HttpBody(body=body, end_of_stream=True))


def counted(body: dict[str, object]) -> int:
    """The input the metered path's own code counts for this body (the oracle)."""
    raw = json.dumps(body).encode()
    spec = PRICED["responses.compact"].reader
    assert spec is not None
    return parse_request(
        spec, raw, "", max_body_bytes=1 << 20, count=count_text
    ).counted_input_tokens


def test_priced_passthrough_is_held_then_settled_from_its_usage(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    exchange = open_stream(deps)
    reply = compact(exchange, json.dumps(COMPACT).encode())
    assert reply == msgs.CONTINUE_REQUEST_BODY
    budgets = deps.budgets
    assert isinstance(budgets, FakeBudgets) and len(budgets.plans) == 1
    plan = budgets.plans[0]
    inp = counted(COMPACT)
    assert inp > 120  # the whole input, counted like /v1/responses counts it
    held = deps.prices.charge(
        "gpt-5-mini", Usage(input_tokens=inp, output_tokens=CEILING["responses.compact"])
    ).nanos
    assert (plan.reserve_nanos, plan.counted_input) == (held, inp)
    assert plan.tokens == inp + CEILING["responses.compact"]
    send(exchange, response_headers=headers({":status": "200"}))
    body = msgs.pb.HttpBody(body=json.dumps(ANSWER).encode(), end_of_stream=True)
    done = send(exchange, response_body=body)
    exchange.close()
    ledger = deps.ledger
    assert isinstance(ledger, FakeLedger) and len(ledger.settlements) == 1
    settlement = ledger.settlements[0]
    record = settlement.record
    assert settlement.reservation_id == "rid-1"  # the hold is released by this settlement
    assert [s.scope for s in settlement.scopes][:4] == [s.scope for s in plan.scopes]
    cost = deps.prices.charge("gpt-5-mini", Usage(input_tokens=333, output_tokens=222)).nanos
    assert (record.endpoint, record.cost_nanos, record.estimated) == (
        "responses.compact",
        cost,
        False,
    )
    assert (record.counted_input_tokens, record.key_id) == (inp, CALLER.key_id)
    cost_header = done.response_body.response.header_mutation.set_headers[0].header
    assert cost_header.key == "x-extproc-cost-usd"


def test_a_denied_hold_is_refused_like_a_metered_call_and_recorded(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor, refuse=True)  # the workspace is at its hard limit
    exchange = open_stream(deps)
    reply = compact(exchange, json.dumps(COMPACT).encode())
    assert reply.immediate_response.status.code == 429
    error = json.loads(reply.immediate_response.body)["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert error["message"].startswith("Budget exhausted for workspace dev")
    exchange.close()
    ledger = deps.ledger
    assert isinstance(ledger, FakeLedger) and len(ledger.settlements) == 1
    record = ledger.settlements[0].record
    assert (record.outcome, record.error_code, record.cost_nanos) == (
        "rejected",
        "insufficient_quota",
        0,
    )
    assert (record.status, record.model_requested) == (429, "gpt-5-mini")
    assert ledger.settlements[0].reservation_id == ""


def test_unpriced_model_on_a_priced_endpoint_is_refused_before_any_hold(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    exchange = open_stream(deps)
    body = {**COMPACT, "model": "gpt-9-unlisted"}
    reply = compact(exchange, json.dumps(body).encode(), codex=True)
    assert reply.immediate_response.status.code == 400  # Codex gets its refusals as 400
    error = json.loads(reply.immediate_response.body)["error"]
    assert (error["code"], error["param"]) == ("unpriced_model_not_allowed", "model")
    assert "gpt-9-unlisted" in error["message"] and "allow_unpriced" in error["message"]
    budgets = deps.budgets
    assert isinstance(budgets, FakeBudgets) and budgets.plans == []
    exchange.close()
    ledger = deps.ledger
    assert isinstance(ledger, FakeLedger) and len(ledger.settlements) == 1
    assert ledger.settlements[0].record.outcome == "rejected"


def test_bad_or_missing_body_is_a_400_and_nothing_is_held(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    bad = compact(open_stream(deps), b'{"input": "no model"}')
    assert bad.immediate_response.status.code == 400
    assert json.loads(bad.immediate_response.body)["error"]["param"] == "model"
    empty = send(
        open_stream(deps),
        request_headers=headers(
            {
                ":method": "POST",
                ":path": "/v1/responses/compact",
                "authorization": f"Bearer {SECRET}",
            },
            end=True,
        ),
    )
    assert empty.immediate_response.status.code == 400
    budgets = deps.budgets
    assert isinstance(budgets, FakeBudgets) and budgets.plans == []


def test_a_held_call_without_usage_is_billed_its_counted_input(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    exchange = open_stream(deps)
    compact(exchange, json.dumps(COMPACT).encode())
    exchange.close()  # the client left before any answer: the provider may have run it
    ledger = deps.ledger
    assert isinstance(ledger, FakeLedger) and len(ledger.settlements) == 1
    record = ledger.settlements[0].record
    inp = counted(COMPACT)
    expected = deps.prices.charge("gpt-5-mini", Usage(input_tokens=inp)).nanos
    assert (record.outcome, record.estimated, record.cost_nanos) == ("client_gone", True, expected)
    assert ledger.settlements[0].reservation_id == "rid-1"


def test_image_generations_hold_the_ceiling_per_image(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    exchange = open_stream(deps)
    # gpt-5-mini stands in for a priced model: the bundled table has no image model's row.
    body = {"model": "gpt-5-mini", "prompt": "a lighthouse at dusk", "n": 3}
    first = send(
        exchange,
        request_headers=headers(
            {
                ":method": "POST",
                ":path": "/v1/images/generations",
                "authorization": f"Bearer {SECRET}",
                "content-type": "application/json",
            }
        ),
    )
    assert first.WhichOneof("response") == "request_headers"
    reply = send(
        exchange, request_body=msgs.pb.HttpBody(body=json.dumps(body).encode(), end_of_stream=True)
    )
    assert reply == msgs.CONTINUE_REQUEST_BODY
    budgets = deps.budgets
    assert isinstance(budgets, FakeBudgets)
    [plan] = budgets.plans
    prompt = count_text("a lighthouse at dusk", "gpt-5-mini")
    assert plan.tokens == prompt + 3 * CEILING["images.generations"]


def test_metering_only_mode_forwards_priced_calls_without_a_hold(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    deps.policy = deps.keys = deps.budgets = None
    exchange = open_stream(deps)
    first = send(
        exchange,
        request_headers=headers(
            {
                ":method": "POST",
                ":path": "/v1/responses/compact",
                "content-type": "application/json",
            }
        ),
    )
    assert first.WhichOneof("response") == "request_headers"
    reply = send(
        exchange,
        request_body=msgs.pb.HttpBody(body=json.dumps(COMPACT).encode(), end_of_stream=True),
    )
    assert reply == msgs.CONTINUE_REQUEST_BODY
    send(exchange, response_headers=headers({":status": "200"}))
    body = msgs.pb.HttpBody(body=json.dumps(ANSWER).encode(), end_of_stream=True)
    send(exchange, response_body=body)
    exchange.close()
    ledger = deps.ledger
    assert isinstance(ledger, FakeLedger)
    [settlement] = ledger.settlements
    assert settlement.reservation_id == "" and settlement.record.cost_nanos > 0


def test_passthrough_is_key_swapped_and_settled_once(executor: ThreadPoolExecutor) -> None:
    deps = make_deps(executor)
    stream = open_stream(deps)
    reply = send(
        stream,
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
    send(stream, response_headers=headers({":status": "200"}, end=False))
    stream.close()
    ledger = deps.ledger
    assert isinstance(ledger, FakeLedger) and len(ledger.settlements) == 1
    record = ledger.settlements[0].record
    assert (record.endpoint, record.price_family, record.key_id) == ("files", "free", "key_unit")
