"""The lifecycle as a table: what each state accepts, and a phase in the wrong state let
through unchanged, never handed to a handler that did not expect it."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane.lifecycle import ACCEPTS, LET_THROUGH, TRAILERS, Phase, State
from extproc.dataplane.server import open_stream
from tests.unit.dataplane.fakes import (
    ANSWER,
    CHAT,
    error_of,
    headers,
    ledger,
    make_deps,
    open_request,
    request,
    respond,
    send,
)

TRAILER = msgs.pb.HttpTrailers()


def test_every_state_has_its_row_and_an_answered_request_accepts_nothing() -> None:
    assert set(ACCEPTS) == set(State)
    assert ACCEPTS[State.DONE] == frozenset()
    assert ACCEPTS[State.OPEN] == {Phase.REQUEST_HEADERS}
    assert set(LET_THROUGH) == set(Phase)


def test_a_stream_without_request_headers_leaves_no_record(
    executor: ThreadPoolExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    """Envoy may open a stream only for its own reply (response headers, then the end): that
    is no request, so no record and no log line about a request with an empty id."""
    deps = make_deps(executor)
    stream = open_stream(deps)
    reply = send(stream, response_headers=headers({":status": "400"}, end=True))
    assert reply == msgs.CONTINUE_RESPONSE_HEADERS
    stream.close()
    assert ledger(deps).settlements == []
    assert not [r for r in caplog.records if "request  " in r.getMessage()]
    # A stream cut before its response (client gone) is still recorded once, with its id.
    gone = open_stream(deps)
    open_request(gone)
    gone.close()
    [record] = ledger(deps).records
    assert record.request_id == gone.handler.seen.request_id != ""  # type: ignore[union-attr]
    assert record.outcome == "client_gone"


def test_phases_out_of_order_are_let_through_and_the_request_still_settles_once(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    stream = open_stream(deps)
    open_request(stream)
    assert stream.handler is not None and stream.handler.state is State.REQUEST
    early = msgs.pb.HttpBody(body=b"{}", end_of_stream=True)
    assert send(stream, response_body=early) == msgs.CONTINUE_RESPONSE_BODY  # not yet: ignored
    again = open_request(stream)  # a second set of request headers
    assert again == msgs.CONTINUE_REQUEST_HEADERS
    send(stream, request_body=msgs.pb.HttpBody(body=json.dumps(CHAT).encode(), end_of_stream=True))
    assert stream.handler.state is State.UPSTREAM
    body = msgs.pb.HttpBody(body=b"late", end_of_stream=True)
    assert send(stream, request_body=body) == msgs.CONTINUE_REQUEST_BODY
    respond(stream, ANSWER)
    assert stream.handler.state is State.DONE
    assert send(stream, response_body=early) == msgs.CONTINUE_RESPONSE_BODY
    assert send(stream, response_trailers=TRAILER) == TRAILERS[Phase.RESPONSE_TRAILERS]
    stream.close()
    [record] = ledger(deps).records
    assert (record.outcome, record.input_tokens, record.output_tokens) == ("completed", 11, 7)


def test_envoy_answering_before_the_body_is_read_is_recorded_as_its_answer(
    executor: ThreadPoolExecutor,
) -> None:
    """Envoy's own 413 for a body over its buffer limit comes while we still wait for it."""
    deps = make_deps(executor)
    stream = open_stream(deps)
    open_request(stream)
    reply = send(stream, response_headers=headers({":status": "413"}, end=True))
    assert reply.WhichOneof("response") == "response_headers"
    assert stream.handler is not None and stream.handler.state is State.DONE
    stream.close()
    [record] = ledger(deps).records
    assert (record.status, record.outcome, record.cost_nanos) == (413, "upstream_error", 0)


def test_after_a_refusal_nothing_more_is_read_or_recorded(executor: ThreadPoolExecutor) -> None:
    deps = make_deps(executor, refuse=True)
    stream = open_stream(deps)
    assert error_of(request(stream, json.dumps(CHAT).encode()))[0] == 429
    assert respond(stream, ANSWER) == msgs.CONTINUE_RESPONSE_BODY
    stream.close()
    stream.close()
    assert len(ledger(deps).settlements) == 1
