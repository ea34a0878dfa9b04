"""Unit tests of the billing decisions: one record per exchange, never silently $0."""

from __future__ import annotations

import gzip
import json

import pytest

from extproc.metering.decisions import Observed, finalize, parse_request, settle
from extproc.metering.prices import PriceTable
from extproc.metering.tokens import count_text
from extproc.wire import spec
from extproc.wire.endpoints import ENDPOINTS, StreamOutcome
from extproc.wire.errors import OpenAIError
from extproc.wire.usage import Usage

PRICES = PriceTable.load()
CHAT = ENDPOINTS["/v1/chat/completions"]
RESPONSES = ENDPOINTS["/v1/responses"]


def observed(**kw: object) -> Observed:
    facts = RESPONSES.facts({"model": "gpt-5", "input": "hi", "stream": True})
    base = {
        "request_id": "r1",
        "spec": spec.RESPONSES,
        "facts": facts,
        "counted_input_tokens": 100,
    }
    return Observed(**{**base, **kw})  # type: ignore[arg-type]


def stream(terminal: str | None, usage: Usage | None = None, text: str = "") -> StreamOutcome:
    return StreamOutcome(
        usage=usage, served_model=None, output_text=text, terminal=terminal, error=None
    )


def test_provider_usage_is_billed_exactly() -> None:
    usage = Usage(1000, 200, 50, 10)
    rec = settle(observed(status=200, response_finished=True, usage=usage), PRICES, count_text)
    assert (rec.input_tokens, rec.cached_input_tokens, rec.output_tokens) == (1000, 200, 50)
    assert rec.cost_nanos == PRICES.charge("gpt-5", usage).nanos > 0
    assert not rec.estimated
    assert rec.outcome == "completed"


@pytest.mark.parametrize(
    ("kw", "outcome"),
    [
        ({"status": 200, "response_finished": False, "stream": stream(None, text="a b c")}, "cut"),
        ({"status": 0, "response_finished": False}, "client_gone"),
        ({"status": 200, "response_finished": True, "stream": stream(None, text="a b")}, "cut"),
        ({"status": 200, "response_finished": True, "stream": stream("error", text="x")}, "error"),
        (
            {"status": 200, "response_finished": True, "stream": stream("completed")},
            "missing_usage",
        ),
        ({"status": 200, "response_finished": True}, "missing_usage"),
    ],
)
def test_no_usage_is_estimated_never_free(kw: dict, outcome: str) -> None:
    rec = settle(observed(**kw), PRICES, count_text)
    assert rec.outcome == outcome
    assert rec.estimated
    assert rec.input_tokens == 100
    assert rec.cost_nanos > 0
    text = kw.get("stream").output_text if kw.get("stream") else ""
    assert rec.output_tokens == count_text(text, "gpt-5")


def test_upstream_error_without_usage_costs_nothing_visibly() -> None:
    rec = settle(observed(status=429, response_finished=True), PRICES, count_text)
    assert rec.outcome == "upstream_error"
    assert rec.cost_nanos == 0
    assert not rec.estimated


def test_failed_stream_with_usage_is_billed_as_reported() -> None:
    usage = Usage(300, 0, 20, 0)
    seen = observed(status=200, response_finished=True, usage=usage, stream=stream("failed", usage))
    rec = settle(seen, PRICES, count_text)
    assert rec.outcome == "failed"
    assert not rec.estimated
    assert rec.cost_nanos == PRICES.charge("gpt-5", usage).nanos


def test_served_snapshot_and_unknown_model_pricing() -> None:
    usage = Usage(10, 0, 10, 0)
    snap = settle(
        observed(status=200, response_finished=True, usage=usage, served_model="gpt-5-2025-08-07"),
        PRICES,
        count_text,
    )
    assert snap.price_family == "gpt-5"
    unknown_facts = RESPONSES.facts({"model": "mystery-model", "input": "hi"})
    rec = settle(
        observed(facts=unknown_facts, status=200, response_finished=True, usage=usage),
        PRICES,
        count_text,
    )
    assert rec.price_fallback
    assert rec.cost_nanos > 0


def test_rejected_request_is_recorded_with_its_error() -> None:
    err = OpenAIError(400, "bad", "invalid_request_error", "model", "missing_model")
    rec = settle(
        observed(facts=None, rejected=err, status=400, response_finished=True), PRICES, count_text
    )
    assert rec.outcome == "rejected"
    assert rec.error_code == "missing_model"
    assert rec.cost_nanos == 0


def count(text: str, model: str) -> int:
    return count_text(text, model)


def test_prepare_request_injects_usage_for_chat_streams() -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    raw = gzip.compress(json.dumps(body).encode())
    prepared = parse_request(CHAT, raw, "gzip", max_body_bytes=1 << 20, count=count)
    assert prepared.injected_usage and prepared.encoded
    sent_body = finalize(prepared)
    assert sent_body is not None
    sent = json.loads(sent_body)
    assert sent["stream_options"] == {"include_usage": True}
    assert (
        prepared.counted_input_tokens
        == count_text("hi", "gpt-4o") + count_text("user", "gpt-4o") + 6
    )


def test_prepare_request_leaves_body_alone_when_nothing_to_change() -> None:
    body = json.dumps(
        {
            "model": "gpt-4o",
            "messages": [],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    prepared = parse_request(CHAT, body.encode(), "", max_body_bytes=1 << 20, count=count)
    assert finalize(prepared) is None
    assert not prepared.injected_usage
    assert finalize(prepared, rewritten=True) is not None  # routing changed it: re-serialised


def test_prepare_request_limits() -> None:
    with pytest.raises(OpenAIError) as info:
        parse_request(RESPONSES, b"x" * 2000, "", max_body_bytes=1000, count=count)
    assert info.value.status == 413
    bomb = gzip.compress(b"{" + b" " * 5000 + b"}")
    with pytest.raises(OpenAIError) as info:
        parse_request(RESPONSES, bomb, "gzip", max_body_bytes=1000, count=count)
    assert info.value.status == 413
