"""End to end: openai SDK -> real Envoy -> extproc sidecar -> simulator, ledger in real Redis.

Every test checks the ledger against what the client itself was told by the upstream,
so "exact" means: the record holds the provider's own usage, to the token, priced by
the table.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import httpx
import openai
import pytest
import redis
import zstandard

from extproc.devstack.stack import Stack
from extproc.metering.prices import PriceTable
from extproc.wire.usage import Usage
from tests.conftest import all_records, wait_record

PRICES = PriceTable.load()
RID = "x-extproc-request-id"


def expected_nanos(model: str, usage: Usage) -> int:
    return PRICES.charge(model, usage).nanos


def assert_exact(rec: dict[str, Any], model: str, usage: Usage) -> None:
    assert rec["estimated"] is False
    assert rec["outcome"] == "completed"
    assert rec["status"] == 200
    assert rec["input_tokens"] == usage.input_tokens
    assert rec["cached_input_tokens"] == usage.cached_input_tokens
    assert rec["output_tokens"] == usage.output_tokens
    assert rec["reasoning_tokens"] == usage.reasoning_tokens
    assert rec["cost_nanos"] == expected_nanos(model, usage) > 0
    assert rec["counted_input_tokens"] > 0


def chat_usage(u: Any) -> Usage:
    return Usage(
        input_tokens=u.prompt_tokens,
        cached_input_tokens=(
            u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
        )
        or 0,
        output_tokens=u.completion_tokens,
        reasoning_tokens=(
            u.completion_tokens_details.reasoning_tokens if u.completion_tokens_details else 0
        )
        or 0,
    )


def responses_usage(u: Any) -> Usage:
    return Usage(
        input_tokens=u.input_tokens,
        cached_input_tokens=u.input_tokens_details.cached_tokens,
        output_tokens=u.output_tokens,
        reasoning_tokens=u.output_tokens_details.reasoning_tokens,
    )


MESSAGES = [
    {"role": "system", "content": "You are a terse code reviewer."},
    {"role": "user", "content": "Review: def add(a, b): return a - b"},
]


def test_chat_completion(client: openai.OpenAI, redis_client: redis.Redis) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    completion = raw.parse()
    rec = wait_record(redis_client, raw.headers[RID])
    assert rec["endpoint"] == "chat.completions"
    assert rec["model_requested"] == "gpt-4o-mini"
    assert rec["stream"] is False
    assert_exact(rec, "gpt-4o-mini", chat_usage(completion.usage))


def test_chat_stream_gets_usage_without_client_asking(
    client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    # The client did not ask for usage: the sidecar injects include_usage upstream, takes the
    # usage chunk for the ledger and keeps it from the client, who never asked for it.
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=MESSAGES, stream=True
    ) as resp:
        chunks = list(resp.parse())
        rid = resp.headers[RID]
    assert chunks and all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)

    # The same request, asking for usage, is answered identically and shows the usage.
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ) as resp2:
        chunks2 = list(resp2.parse())
        rid2 = resp2.headers[RID]
    usage = chat_usage(chunks2[-1].usage)
    assert "".join(c.choices[0].delta.content or "" for c in chunks2 if c.choices) == text
    assert_exact(wait_record(redis_client, rid), "gpt-4o", usage)
    assert_exact(wait_record(redis_client, rid2), "gpt-4o", usage)


def test_responses_non_streaming_reasoning(
    client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    raw = client.responses.with_raw_response.create(
        model="gpt-5-codex",
        instructions="Fix the bug.",
        input="def add(a, b): return a - b",
        reasoning={"effort": "high"},
    )
    response = raw.parse()
    usage = responses_usage(response.usage)
    assert usage.reasoning_tokens > 0
    rec = wait_record(redis_client, raw.headers[RID])
    assert rec["endpoint"] == "responses"
    assert_exact(rec, "gpt-5-codex", usage)


def test_responses_streaming_like_codex(client: openai.OpenAI, redis_client: redis.Redis) -> None:
    with client.responses.with_streaming_response.create(
        model="gpt-5.1-codex",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "list files"}]}],
        stream=True,
        prompt_cache_key="session-abc",
        extra_headers={"session_id": "session-abc"},
    ) as resp:
        events = list(resp.parse())
        rid = resp.headers[RID]
    completed = [e for e in events if e.type == "response.completed"]
    assert len(completed) == 1
    rec = wait_record(redis_client, rid)
    assert rec["stream"] is True
    assert rec["session_id"] == "session-abc"
    assert_exact(rec, "gpt-5.1-codex", responses_usage(completed[0].response.usage))


def test_completions_streaming(client: openai.OpenAI, redis_client: redis.Redis) -> None:
    with client.completions.with_streaming_response.create(
        model="gpt-3.5-turbo-instruct",
        prompt="Say hello",
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=8,
    ) as resp:
        chunks = list(resp.parse())
        rid = resp.headers[RID]
    usage = chunks[-1].usage
    rec = wait_record(redis_client, rid)
    assert rec["endpoint"] == "completions"
    assert rec["output_cap"] == 8
    assert rec["output_tokens"] == usage.completion_tokens <= 8
    assert rec["input_tokens"] == usage.prompt_tokens
    assert rec["estimated"] is False


def test_embeddings(client: openai.OpenAI, redis_client: redis.Redis) -> None:
    raw = client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["alpha beta", "gamma"]
    )
    emb = raw.parse()
    rec = wait_record(redis_client, raw.headers[RID])
    assert rec["endpoint"] == "embeddings"
    assert rec["input_tokens"] == emb.usage.prompt_tokens > 0
    assert rec["output_tokens"] == 0
    assert rec["cost_nanos"] == expected_nanos(
        "text-embedding-3-small", Usage(input_tokens=emb.usage.prompt_tokens)
    )


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
def test_compressed_request_bodies(stack: Stack, redis_client: redis.Redis, coding: str) -> None:
    body = json.dumps({"model": "gpt-5-mini", "input": "compressed hello " * 50}).encode()
    packed = gzip.compress(body) if coding == "gzip" else zstandard.compress(body)
    resp = httpx.post(
        f"{stack.base_url}/responses",
        content=packed,
        headers={"content-type": "application/json", "content-encoding": coding},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    rec = wait_record(redis_client, resp.headers[RID])
    assert rec["input_tokens"] == usage["input_tokens"]
    assert rec["output_tokens"] == usage["output_tokens"]
    # We counted the decoded body: our count is close to the provider's.
    assert abs(rec["counted_input_tokens"] - usage["input_tokens"]) <= 8


def test_cut_stream_is_estimated_from_deltas(
    client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    with (
        pytest.raises(openai.APIError),
        client.responses.with_streaming_response.create(
            model="gpt-5",
            input="write a poem",
            stream=True,
            extra_headers={
                "x-sim-fault": "cut-after=14,event-delay-ms=10",
                "x-sim-output-tokens": "40",
            },
        ) as resp,
    ):
        rid = resp.headers[RID]
        for _ in resp.parse():
            pass
    rec = wait_record(redis_client, rid)
    assert rec["estimated"] is True
    assert rec["outcome"] == "cut"
    assert rec["input_tokens"] == rec["counted_input_tokens"] > 0
    assert 0 < rec["output_tokens"] < 40
    assert rec["cost_nanos"] > 0


def test_client_disconnect_mid_stream(stack: Stack, redis_client: redis.Redis) -> None:
    body = {"model": "gpt-4.1", "messages": MESSAGES, "stream": True}
    headers = {"x-sim-fault": "event-delay-ms=40", "x-sim-output-tokens": "200"}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{stack.base_url}/chat/completions", json=body, headers=headers) as r,
    ):
        rid = r.headers[RID]
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 3:
                break
    rec = wait_record(redis_client, rid)
    assert rec["estimated"] is True
    assert rec["outcome"] in ("cut", "client_gone")
    assert 0 < rec["output_tokens"] < 200
    assert len(all_records(redis_client, rid)) == 1


def test_upstream_error_event_is_estimated(
    client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-sim-fault": "error-event"},
    ) as resp:
        rid = resp.headers[RID]
        with pytest.raises(openai.APIError):
            for _ in resp.parse():
                pass
    rec = wait_record(redis_client, rid)
    assert rec["outcome"] == "error"
    assert rec["estimated"] is True
    assert rec["output_tokens"] > 0


def test_upstream_500_costs_nothing_and_is_recorded(
    client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"x-sim-fault": "status=500"}
        )
    rec = wait_record(redis_client, info.value.response.headers[RID])
    assert rec["status"] == 500
    assert rec["outcome"] == "upstream_error"
    assert rec["cost_nanos"] == 0
    assert rec["estimated"] is False


def test_missing_usage_is_estimated_not_free(
    client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    raw = client.responses.with_raw_response.create(
        model="gpt-5-nano", input="hi", extra_headers={"x-sim-fault": "no-usage"}
    )
    rec = wait_record(redis_client, raw.headers[RID])
    assert rec["outcome"] == "missing_usage"
    assert rec["estimated"] is True
    assert rec["cost_nanos"] > 0


def test_unknown_model_priced_provisionally(
    client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    """Metering-only mode (no policy): an unknown model is admitted at its class's
    provisional rate, flagged, under its own name (docs/prices.md)."""
    raw = client.chat.completions.with_raw_response.create(model="gpt-9-hyper", messages=MESSAGES)
    rec = wait_record(redis_client, raw.headers[RID])
    assert rec["price_fallback"] is True and rec["price_provisional"] is True
    assert rec["price_family"].startswith("provisional:")
    assert rec["model_requested"] == "gpt-9-hyper"
    assert rec["cost_nanos"] > 0


def test_dated_snapshot_priced_as_family(client: openai.OpenAI, redis_client: redis.Redis) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, extra_headers={"x-sim-served-model": "gpt-4o-2024-08-06"}
    )
    completion = raw.parse()
    rec = wait_record(redis_client, raw.headers[RID])
    assert rec["model_served"] == "gpt-4o-2024-08-06"
    assert rec["price_family"] == "gpt-4o"
    assert rec["cost_nanos"] == expected_nanos("gpt-4o", chat_usage(completion.usage))


def test_ledger_matches_provider_usage_over_many_calls(
    client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    reported = Usage()
    ids = []
    for i in range(12):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-5-mini",
            messages=[{"role": "user", "content": f"question {i} " * (i + 1)}],
            max_completion_tokens=5 + i,
        )
        u = chat_usage(raw.parse().usage)
        reported = Usage(
            reported.input_tokens + u.input_tokens,
            reported.cached_input_tokens + u.cached_input_tokens,
            reported.output_tokens + u.output_tokens,
            reported.reasoning_tokens + u.reasoning_tokens,
        )
        ids.append(raw.headers[RID])
    recs = [wait_record(redis_client, rid) for rid in ids]
    assert sum(r["input_tokens"] for r in recs) == reported.input_tokens
    assert sum(r["output_tokens"] for r in recs) == reported.output_tokens
    assert sum(r["reasoning_tokens"] for r in recs) == reported.reasoning_tokens
    assert all(len(all_records(redis_client, rid)) == 1 for rid in ids)


def test_long_prompt_cached_on_repeat(client: openai.OpenAI, redis_client: redis.Redis) -> None:
    history = [{"role": "user", "content": "line of repository context\n" * 600}]
    first = client.chat.completions.with_raw_response.create(model="gpt-4.1", messages=history)
    second = client.chat.completions.with_raw_response.create(
        model="gpt-4.1", messages=[*history, {"role": "user", "content": "and now?"}]
    )
    u1, u2 = chat_usage(first.parse().usage), chat_usage(second.parse().usage)
    assert u1.cached_input_tokens == 0 < u2.cached_input_tokens
    rec = wait_record(redis_client, second.headers[RID])
    assert_exact(rec, "gpt-4.1", u2)
    assert rec["cost_nanos"] < expected_nanos(
        "gpt-4.1", Usage(u2.input_tokens, 0, u2.output_tokens)
    )
