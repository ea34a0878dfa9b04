"""The cacheable prefix: everything but the last input item, fingerprinted when it is long
enough for the provider to cache; the endpoint's spec says which list holds the items."""

from __future__ import annotations

import json
from typing import Any

from extproc.metering.cacheprefix import MIN_CACHEABLE_TOKENS, prefix_of
from extproc.metering.decisions import parse_request
from extproc.metering.tokens import count_text
from extproc.wire.spec import CHAT, EMBEDDINGS, RESPONSES, EndpointSpec

HISTORY = "the repository's context, re-sent every turn " * 200


def fingerprint(spec: EndpointSpec, body: dict[str, Any]) -> tuple[Any, int]:
    assert spec.reader is not None
    counted = parse_request(
        spec.reader,
        json.dumps(body).encode(),
        "",
        max_body_bytes=1 << 22,
        count=count_text,
    ).counted_input_tokens
    return prefix_of(spec, body, counted, lambda text: count_text(text, "gpt-5")), counted


def chat(last: str) -> dict[str, Any]:
    return {
        "model": "gpt-5",
        "messages": [
            {"role": "system", "content": HISTORY},
            {"role": "user", "content": last},
        ],
    }


def test_the_same_history_has_the_same_fingerprint_whatever_comes_last() -> None:
    one, counted = fingerprint(CHAT, chat("first question"))
    two, _ = fingerprint(CHAT, chat("a different, longer second question"))
    assert one is not None and two is not None
    assert one.fingerprint == two.fingerprint
    assert MIN_CACHEABLE_TOKENS <= one.tokens < counted
    other, _ = fingerprint(CHAT, {**chat("first question"), "model": "gpt-5-mini"})
    assert other is not None and other.fingerprint != one.fingerprint  # per model


def test_the_responses_prefix_is_read_from_its_input_list() -> None:
    body = {"model": "gpt-5", "input": chat("q")["messages"]}
    found, _ = fingerprint(RESPONSES, body)
    assert found is not None


def test_short_histories_single_items_and_endpoints_without_a_prefix_have_none() -> None:
    assert fingerprint(CHAT, {**chat("q"), "messages": chat("q")["messages"][-1:]})[0] is None
    short = {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}] * 2}
    assert fingerprint(CHAT, short)[0] is None
    # Long enough, but nothing in it is a prefix: only the whole request is fingerprinted
    # (the runaway breaker counts its repeats).
    whole = fingerprint(EMBEDDINGS, {"model": "text-embedding-3-small", "input": HISTORY})[0]
    assert whole is not None and (whole.fingerprint, whole.tokens) == ("", 0)
    again = fingerprint(EMBEDDINGS, {"model": "text-embedding-3-small", "input": HISTORY})[0]
    assert again is not None and again.request == whole.request != ""


def test_the_whole_request_fingerprint_tells_the_last_item_apart() -> None:
    one, _ = fingerprint(CHAT, chat("first question"))
    two, _ = fingerprint(CHAT, chat("second question"))
    assert one is not None and two is not None
    assert one.fingerprint == two.fingerprint and one.request != two.request
