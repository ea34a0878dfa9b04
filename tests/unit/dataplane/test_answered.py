"""Requests answered at their headers: refused (recorded, or only counted before anyone is
identified), the caller's own model list, the self-service paths; and a headers phase that
fails. Small fakes for Redis's parts (`fakes`), the real policy."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane.answered import Answered
from extproc.dataplane.lifecycle import State
from extproc.dataplane.passthrough import PassthroughCall
from extproc.dataplane.server import open_stream
from extproc.governance.keys import MISSING, Lookup
from extproc.governance.policy import parse_policy_text
from extproc.wire.errors import MISSING_BODY
from tests.unit.dataplane.fakes import (
    CHAT,
    FakeKeys,
    error_of,
    headers,
    ledger,
    make_deps,
    open_request,
    reply_header,
    request,
    send,
)


def test_unknown_key_is_refused_and_counted_not_recorded(executor: ThreadPoolExecutor) -> None:
    """A flood of bad keys must cost a counter each, never a ledger write."""
    deps = make_deps(executor)
    stream = open_stream(deps)
    status, error = error_of(
        request(stream, json.dumps(CHAT).encode(), secret="sk-ext-" + "b" * 40)
    )
    assert (status, error["type"], error["code"]) == (
        401,
        "invalid_request_error",
        "invalid_api_key",
    )
    assert stream.handler is None and stream.state is State.DONE
    stream.close()
    assert ledger(deps).settlements == [] and ledger(deps).refused == ["invalid_api_key"]
    missing = open_stream(deps)
    reply = send(missing, request_headers=headers({":method": "POST", ":path": "/v1/responses"}))
    assert error_of(reply)[0] == 401
    assert ledger(deps).refused == ["invalid_api_key", "missing_key"]


def test_refusals_of_a_known_caller_are_recorded_in_the_shape_of_what_was_asked(
    executor: ThreadPoolExecutor,
) -> None:
    policy = parse_policy_text(
        "version: 1\nworkspaces:\n  dev:\n    budget_usd: 10\n"
        "    upstream: {key_env: TEST_UPSTREAM}\n    passthrough: {endpoints: [files]}\n"
    )
    deps = make_deps(executor, policy=policy)
    assert error_of(open_request(open_stream(deps), "/v1/chat/completion"))[0] == 404
    assert error_of(open_request(open_stream(deps), end=True))[1]["code"] == MISSING_BODY.code
    batch = error_of(open_request(open_stream(deps), "/v1/batches"))
    assert (batch[0], batch[1]["code"]) == (403, "endpoint_not_allowed")
    unknown, empty, refused = ledger(deps).records
    assert (unknown.endpoint, unknown.status, unknown.outcome) == ("unknown", 404, "rejected")
    assert (empty.endpoint, empty.status, empty.key_id) == ("chat.completions", 400, "key_unit")
    assert (refused.endpoint, refused.price_family, refused.error_code) == (
        "batches",
        "free",
        "endpoint_not_allowed",
    )


def test_a_workspace_without_its_provider_key_is_a_503_recorded(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    deps.upstream_keys = {}
    deps.upstream_missing = {"dev": "environment variable OPENAI_API_KEY_DEV is not set"}
    status, error = error_of(open_request(open_stream(deps)))
    assert (status, error["code"]) == (503, "upstream_credential_missing")
    assert "OPENAI_API_KEY_DEV" in error["message"]
    [record] = ledger(deps).records
    assert (record.key_id, record.status) == ("key_unit", 503)


def test_a_key_store_that_cannot_be_asked_lets_nobody_through(
    executor: ThreadPoolExecutor,
) -> None:
    class Cold(FakeKeys):
        def get(self, secret: str) -> Lookup:
            return MISSING  # not cached: must be asked for

    deps = make_deps(executor)
    keys = Cold({})
    keys.down = True
    deps.keys = keys
    reply = open_request(open_stream(deps))
    assert error_of(reply)[0] == 503 and reply_header(reply, "retry-after") == "2"
    [record] = ledger(deps).records
    assert (record.workspace, record.outcome) == ("", "rejected")  # nobody identified


def test_a_revoked_key_is_refused_on_a_free_call_at_once(executor: ThreadPoolExecutor) -> None:
    deps = make_deps(executor)
    keys = deps.keys
    assert isinstance(keys, FakeKeys)
    keys.revoked = frozenset({"key_unit"})
    reply = open_request(open_stream(deps), "/v1/files", method="GET", end=True)
    assert error_of(reply)[1]["code"] == "invalid_api_key"
    [record] = ledger(deps).records
    assert (record.endpoint, record.outcome) == ("files", "rejected")
    keys.revoked = frozenset()
    stream = open_stream(deps)
    reply = open_request(stream, "/v1/files", method="GET", end=True)
    assert reply.WhichOneof("response") == "request_headers"  # forwarded
    assert isinstance(stream.handler, PassthroughCall)


def test_the_model_list_is_the_callers_own_and_recorded_as_answered(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    stream = open_stream(deps)
    reply = open_request(stream, "/v1/models", method="GET", end=True)
    answer = reply.immediate_response
    ids = [m["id"] for m in json.loads(answer.body)["data"]]
    assert answer.status.code == 200 and "gpt-5-mini" in ids and "o3-pro" not in ids
    assert isinstance(stream.handler, Answered) and stream.state is State.DONE
    one = open_request(open_stream(deps), "/v1/models/gpt-5-mini", method="GET", end=True)
    assert json.loads(one.immediate_response.body)["id"] == "gpt-5-mini"
    stream.close()
    listed, retrieved = ledger(deps).records
    assert (listed.endpoint, listed.outcome, listed.status) == ("models", "answered", 200)
    assert retrieved.outcome == "answered" and listed.key_id == "key_unit"


def test_self_service_paths_are_answered_here_and_counted(executor: ThreadPoolExecutor) -> None:
    deps = make_deps(executor)
    stream = open_stream(deps)
    reply = open_request(stream, "/extproc/v1/me", method="GET", end=True)
    assert error_of(reply)[0] == 404  # this gateway has no store to read standings from
    assert ledger(deps).unmetered == ["GET /extproc/v1/*"] and ledger(deps).settlements == []
    page = open_request(open_stream(deps), "/extproc/me", method="GET", end=True)
    assert reply_header(page, "content-type") == "text/html; charset=utf-8"


def test_a_failed_headers_phase_is_refused_and_recorded_once(
    executor: ThreadPoolExecutor,
) -> None:
    class BrokenKeys(FakeKeys):
        def get(self, secret: str) -> Lookup:
            raise RuntimeError("a bug in the headers phase")

    deps = make_deps(executor)
    deps.keys = BrokenKeys({})
    stream = open_stream(deps)
    refused = open_request(stream, "/v1/files", method="GET")
    # Deny by default: never continue a request whose credentials were not swapped.
    assert error_of(refused)[0] == 500
    assert send(stream, request_body=msgs.pb.HttpBody(end_of_stream=True)) == (
        msgs.CONTINUE_REQUEST_BODY
    )
    stream.close()
    [record] = ledger(deps).records
    assert (record.endpoint, record.status, record.outcome) == ("files", 500, "rejected")
