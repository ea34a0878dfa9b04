"""The metered handler through the stream dispatcher: each ext_proc message in, each reply
and the one settlement out. Small fakes for the key cache, the budgets and the ledger
(`fakes`); the policy, prices, routing and token counter are the real ones.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane.metered import MeteredExchange
from extproc.dataplane.server import open_stream
from extproc.governance.budget import Decision
from extproc.governance.keys import Identity
from extproc.metering.cacheprefix import MIN_CACHEABLE_TOKENS
from extproc.store.schema import key_scope, service_scope, team_scope
from extproc.wire.usage import Usage
from tests.unit.dataplane.fakes import (
    ANSWER,
    CHAT,
    POLICY,
    FakeBudgets,
    budgets,
    error_of,
    headers,
    ledger,
    make_deps,
    open_request,
    reply_header,
    request,
    respond,
    send,
)

NIGHTLY = Identity("key_night", "ci", None, "nightly-refactor", None, 0)
NIGHTLY_SECRET = "sk-ext-" + "n" * 40


def test_governed_request_is_reserved_forwarded_and_settled_once(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    stream = open_stream(deps)
    first = open_request(stream, **{"x-extproc-workspace": "spoofed"})
    mutation = first.request_headers.response.header_mutation
    assert reply_header(first, "authorization") == "Bearer sk-upstream-dev"
    assert "x-extproc-workspace" in mutation.remove_headers  # a client's own claim is stripped
    assert "accept-encoding" in mutation.remove_headers  # usage must be readable as it passes
    assert isinstance(stream.handler, MeteredExchange)
    last = msgs.pb.HttpBody(body=json.dumps(CHAT).encode(), end_of_stream=True)
    sent = send(stream, request_body=last).request_body.response.body_mutation.body
    assert json.loads(sent)["prompt_cache_key"].startswith("extproc-")  # dev injects one
    assert len(budgets(deps).plans) == 1
    done = respond(stream, ANSWER)
    assert reply_header(done, "x-extproc-cost-usd") is not None
    stream.close()
    stream.close()  # a second end of stream settles nothing more

    [settlement] = ledger(deps).settlements
    record = settlement.record
    assert (record.workspace, record.service, record.key_id) == ("dev", "codex-cli", "key_unit")
    plan = budgets(deps).plans[0]
    assert settlement.reservation_id == "rid-1"
    assert (settlement.period, settlement.prefix) == (plan.period.id, plan.prefix)
    served = record.model_served
    expected = deps.prices.charge(served, Usage(input_tokens=11, output_tokens=7)).nanos
    assert record.cost_nanos == expected > 0
    charged = [s.scope for s in settlement.scopes]
    assert charged[:4] == [s.scope for s in plan.scopes]
    assert team_scope("platform") in charged


def test_the_routed_request_is_rewritten_for_its_route_and_says_so(
    executor: ThreadPoolExecutor,
) -> None:
    """`lint-is-cheap` lowers the model and the effort: the body carries both, where the
    Responses spec says effort goes, and the answer names the route."""
    deps = make_deps(executor)
    stream = open_stream(deps)
    body = {"model": "codex-default", "input": "fix the lint error"}
    reply = request(stream, json.dumps(body).encode(), path="/v1/responses", **{"x-task": "lint"})
    sent = json.loads(reply.request_body.response.body_mutation.body)
    assert sent["model"] == "gpt-5.1-codex-mini"
    assert sent["reasoning"] == {"effort": "low"}
    assert sent["prompt_cache_key"].startswith("extproc-")  # dev injects one
    assert reply_header(reply, "content-length") == str(
        len(reply.request_body.response.body_mutation.body)
    )
    assert not reply.request_body.response.clear_route_cache
    answer = send(stream, response_headers=headers({":status": "200"}))
    assert reply_header(answer, "x-extproc-model-requested") == "codex-default"
    assert reply_header(answer, "x-extproc-model-served") == "gpt-5.1-codex-mini"
    routing = reply_header(answer, "x-extproc-routing") or ""
    assert routing.startswith("alias:codex-default>gpt-5.1-codex; rule:lint-is-cheap")
    stream.close()
    [record] = ledger(deps).records
    assert (record.rule, record.routing) == ("lint-is-cheap", routing)


def test_a_named_upstream_route_is_set_and_the_route_cache_cleared(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor, callers={NIGHTLY_SECRET: NIGHTLY})
    stream = open_stream(deps)
    body = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "refactor"}]}
    reply = request(stream, json.dumps(body).encode(), secret=NIGHTLY_SECRET)
    assert reply_header(reply, "x-extproc-route") == "azure-eastus"
    assert reply.request_body.response.clear_route_cache
    sent = json.loads(reply.request_body.response.body_mutation.body)
    # ci enforces its default output cap: written where the Chat spec says, in full (n=1).
    assert sent["max_completion_tokens"] == POLICY.workspaces["ci"].default_output_cap


def test_a_stream_is_metered_chunk_by_chunk_and_the_injected_usage_chunk_cut(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    stream = open_stream(deps)
    reply = request(stream, json.dumps({**CHAT, "stream": True}).encode())
    sent = json.loads(reply.request_body.response.body_mutation.body)
    assert sent["stream_options"] == {"include_usage": True}  # asked on the client's behalf
    started = send(
        stream,
        response_headers=headers({":status": "200", "content-type": "text/event-stream"}),
    )
    assert started.mode_override.response_body_mode == msgs.ProcessingMode.STREAMED
    assert "content-length" in started.response_headers.response.header_mutation.remove_headers
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-5-mini"}
    text = {**chunk, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
    usage = {**chunk, "choices": [], "usage": ANSWER["usage"]}
    events = [f"data: {json.dumps(text)}\n\n", f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n"]
    first = send(stream, response_body=msgs.pb.HttpBody(body=events[0].encode()))
    assert first.response_body.response.body_mutation.body == events[0].encode()  # as it came
    last = send(stream, response_body=msgs.pb.HttpBody(body=events[1].encode(), end_of_stream=True))
    assert b"usage" not in last.response_body.response.body_mutation.body  # not asked for
    assert b"[DONE]" in last.response_body.response.body_mutation.body
    stream.close()
    [record] = ledger(deps).records
    assert (record.input_tokens, record.output_tokens, record.estimated) == (11, 7, False)
    assert record.stream and record.outcome == "completed"


def test_a_long_history_is_fingerprinted_for_the_cache_counters(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    stream = open_stream(deps)
    history = "the whole repository, again " * (MIN_CACHEABLE_TOKENS // 2)
    body = {
        "model": "gpt-5-mini",
        "messages": [
            {"role": "system", "content": history},
            {"role": "user", "content": "and now?"},
        ],
    }
    request(stream, json.dumps(body).encode())
    respond(stream, ANSWER)
    stream.close()
    [settlement] = ledger(deps).settlements
    assert len(settlement.prefix_fingerprint) == 32 and settlement.prefix_tokens >= 1024
    assert settlement.hygiene_scope == service_scope("codex-cli")


def test_bad_request_passed_through_still_reaches_the_team_budget(
    executor: ThreadPoolExecutor,
) -> None:
    """Regression: without a reservation plan the settlement used to skip the team scope."""
    deps = make_deps(executor, bad_request="pass")
    stream = open_stream(deps)
    reply = request(stream, b"{not json")
    assert reply == msgs.CONTINUE_REQUEST_BODY  # forwarded untouched, as configured
    respond(stream, ANSWER)
    stream.close()

    [settlement] = ledger(deps).settlements
    scopes = {s.scope: s.soft_nanos for s in settlement.scopes}
    dev = POLICY.workspaces["dev"]
    assert scopes["ws"] == dev.soft_nanos  # soft-limit alerts fire for this spend too
    assert team_scope("platform") in scopes
    assert service_scope("codex-cli") in scopes
    assert key_scope("key_unit") in scopes
    assert settlement.record.cost_nanos > 0
    assert budgets(deps).plans == []  # never admitted: nothing held


def test_bad_request_is_refused_and_recorded_by_default(executor: ThreadPoolExecutor) -> None:
    deps = make_deps(executor)
    stream = open_stream(deps)
    status, error = error_of(request(stream, b'{"model": 5, "messages": []}'))
    assert (status, error["param"]) == (400, "model")
    [record] = ledger(deps).records
    assert (record.outcome, record.status, record.key_id) == ("rejected", 400, "key_unit")


def test_budget_refusal_answers_429_and_settles_without_spend(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor, refuse=True)
    stream = open_stream(deps)
    reply = request(stream, json.dumps(CHAT).encode(), originator="codex_cli_rs")
    status, error = error_of(reply)
    assert (status, error["code"]) == (400, "insufficient_quota")  # Codex reads 400s at once
    assert reply_header(reply, "x-should-retry") == "false"
    assert reply_header(reply, "x-extproc-workspace") == "dev"
    stream.close()
    [settlement] = ledger(deps).settlements
    assert settlement.record.cost_nanos == 0 and settlement.record.outcome == "rejected"
    assert settlement.reservation_id == ""
    assert settlement.period == budgets(deps).plans[0].period.id  # charged where it was asked


def test_a_session_refused_after_its_hold_releases_the_hold(
    executor: ThreadPoolExecutor,
) -> None:
    ide = Identity("key_ide", "dev", None, "ide-assistant", None, 0)
    over = FakeBudgets(answer=lambda plan: Decision(True, "ok", "rid-s", session_tokens=10**7))
    deps = make_deps(executor, budgets=over, callers={"sk-ext-" + "i" * 40: ide})
    stream = open_stream(deps)
    reply = request(stream, json.dumps(CHAT).encode(), secret="sk-ext-" + "i" * 40)
    assert error_of(reply)[0] == 413
    stream.close()
    [settlement] = ledger(deps).settlements
    assert settlement.reservation_id == "rid-s" and settlement.record.outcome == "rejected"


def test_metering_only_mode_meters_without_a_caller(executor: ThreadPoolExecutor) -> None:
    deps = make_deps(executor)
    deps.policy = deps.keys = deps.budgets = None
    stream = open_stream(deps)
    first = send(
        stream, request_headers=headers({":method": "POST", ":path": "/v1/chat/completions"})
    )
    assert first == msgs.CONTINUE_METERED_REQUEST_HEADERS  # the client's own key goes up
    body = msgs.pb.HttpBody(body=json.dumps(CHAT).encode(), end_of_stream=True)
    assert send(stream, request_body=body) == msgs.CONTINUE_REQUEST_BODY
    respond(stream, ANSWER)
    stream.close()
    [settlement] = ledger(deps).settlements
    assert settlement.record.workspace == "" and settlement.record.cost_nanos > 0
    assert settlement.prefix == "{ws:_}"


def test_a_failing_request_body_phase_is_a_500_before_forwarding_and_one_record(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)

    def broken(text: str, model: str) -> int:
        raise RuntimeError("a bug in the counter")

    deps.count = broken
    stream = open_stream(deps)
    status, error = error_of(request(stream, json.dumps(CHAT).encode()))
    assert (status, error["type"]) == (500, "server_error")
    stream.close()
    [record] = ledger(deps).records
    assert (record.outcome, record.status) == ("rejected", 500)


def test_a_failing_response_phase_lets_the_answer_through_and_still_records_once(
    executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    deps = make_deps(executor)
    stream = open_stream(deps)
    request(stream, json.dumps(CHAT).encode())

    def broken(self: MeteredExchange, msg: msgs.pb.HttpBody) -> msgs.ProcessingResponse:
        raise RuntimeError("a bug in the response phase")

    monkeypatch.setattr(MeteredExchange, "on_response_body", broken)
    assert respond(stream, ANSWER) == msgs.CONTINUE_RESPONSE_BODY  # the client gets it
    stream.close()
    [record] = ledger(deps).records
    assert record.status == 200 and record.outcome == "cut"  # no usage read: estimated
    assert record.estimated and record.cost_nanos > 0
