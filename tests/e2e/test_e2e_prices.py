"""End to end, money that matches the provider's bill: recorded answers of every kind OpenAI
bills, replayed through the real stack (Envoy, sidecar, Redis) from a replay upstream of the
test's own, bill to the nano-dollar what the published prices give.

The expected amounts never come from our compiled tables: token parts from genai-prices' own
calculator (exact decimals, by model name and service tier), tool fees and audio rates from
the published prices written out below. Unknown models: billed at the provisional rate under
their real name and flagged, with one alert; refused in a workspace whose policy says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import genai_prices
import httpx
import pytest
import redis

from extproc.devstack.stack import Stack
from extproc.store.schema import unpriced_model_key
from tests.conftest import Hooks, new_key, policy_stack, wait_record
from tests.replay import (
    REPLAY_HEADER,
    Fixture,
    Replay,
    chat_completion,
    chat_usage,
    code_interpreter_call,
    file_search_call,
    image_generation_call,
    replay_upstream,
    response,
    responses_usage,
    web_search_call,
)

# Published prices (developers.openai.com/api/docs/pricing) the catalogue does not carry.
WEB_SEARCH = Decimal("10.00") / 1000  # per call, the web_search tool
WEB_SEARCH_PREVIEW_NON_REASONING = Decimal("25.00") / 1000  # per call, gpt-4o / gpt-4.1
FILE_SEARCH = Decimal("2.50") / 1000  # per call
CONTAINER = Decimal("0.03")  # per code-interpreter container (1 GB)
GPT_IMAGE_1_OUTPUT = Decimal("40.00") / 10**6  # per image token
IMAGE_1024x1536_HIGH = 6240  # image tokens of one 1024x1536 high-quality image
AUDIO_PREVIEW = {"text_in": "2.50", "text_out": "10.00", "audio_in": "40.00", "audio_out": "80.00"}

POLICY = """
version: 1
timezone: UTC
workspaces:
  dev:
    budget_usd: 1000
    upstream: {{key_env: TEST_UPSTREAM}}
    services:
      app: {{}}
  strict:
    budget_usd: 1000
    upstream: {{key_env: TEST_UPSTREAM}}
    pricing: {{unknown_models: refuse}}
    services:
      app: {{}}
alerts:
  webhooks:
    - url: http://127.0.0.1:{hook_port}/hook
      events: [unknown_model]
"""


def tokens_usd(model: str, tier: str = "default", **usage: int) -> Decimal:
    """The token part, by genai-prices' own calculator (not our compiled tables)."""
    context = None if tier == "default" else {"service_tier": tier}
    calc = genai_prices.calc_price(
        genai_prices.Usage(**usage), model, provider_id="openai", price_context=context
    )
    return calc.total_price


def per_million(tokens: int, usd: str) -> Decimal:
    return tokens * Decimal(usd) / 10**6


def _r(inp: str) -> dict[str, Any]:
    return {"input": inp}


CASES: list[tuple[Fixture, Decimal, dict[str, Any]]] = [
    (
        Fixture("chat-cached", "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "hi"}]},
                chat_completion("gpt-4o-mini-2024-07-18", chat_usage(2_000, 300, cached=1_536))),
        tokens_usd("gpt-4o-mini", input_tokens=2_000, cache_read_tokens=1_536, output_tokens=300),
        {"cached_input_tokens": 1_536},
    ),
    (
        Fixture("responses-reasoning", "/v1/responses", _r("think"),
                response("gpt-5-2025-08-07",
                         responses_usage(9_120, 712, cached=8_960, reasoning=640))),
        tokens_usd("gpt-5", input_tokens=9_120, cache_read_tokens=8_960, output_tokens=712),
        {"reasoning_tokens": 640, "price_family": "gpt-5"},
    ),
    (
        Fixture("sse-cache-write", "/v1/responses", {"input": "long prompt", "stream": True},
                response("gpt-6.2-sol", responses_usage(50_000, 900, cached=20_000,
                                                        write=25_000, reasoning=300)),
                stream=True),
        tokens_usd("gpt-6.2-sol", input_tokens=50_000, cache_read_tokens=20_000,
                   cache_write_tokens=25_000, output_tokens=900),
        {"cache_write_tokens": 25_000, "stream": True},
    ),
    (
        Fixture("flex", "/v1/responses", {"input": "batchy", "service_tier": "flex"},
                response("gpt-5.4-mini", responses_usage(10_003, 1_001, cached=7_777),
                         tier="flex")),
        tokens_usd("gpt-5.4-mini", "flex", input_tokens=10_003, cache_read_tokens=7_777,
                   output_tokens=1_001),
        {"service_tier": "flex", "price_tier": "flex"},
    ),
    (
        Fixture("sse-priority", "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "now"}], "stream": True,
                 "service_tier": "priority"},
                chat_completion("gpt-5-2025-08-07", chat_usage(1_200, 400, cached=1_024,
                                                               reasoning=128), tier="priority"),
                stream=True),
        tokens_usd("gpt-5", "priority", input_tokens=1_200, cache_read_tokens=1_024,
                   output_tokens=400),
        {"service_tier": "priority", "price_tier": "priority"},
    ),
    (
        Fixture("web-search", "/v1/responses",
                {"input": "news", "tools": [{"type": "web_search"}]},
                response("gpt-5", responses_usage(3_000, 500),
                         output=[web_search_call(1), web_search_call(2)])),
        tokens_usd("gpt-5", input_tokens=3_000, output_tokens=500) + 2 * WEB_SEARCH,
        {"web_search_calls": 2},
    ),
    (
        Fixture("web-search-preview", "/v1/responses",
                {"input": "news", "tools": [{"type": "web_search_preview"}]},
                response("gpt-4o-2024-08-06", responses_usage(3_000, 500),
                         output=[web_search_call(1)])),
        tokens_usd("gpt-4o", input_tokens=3_000, output_tokens=500)
        + WEB_SEARCH_PREVIEW_NON_REASONING,
        {"web_search_calls": 1},
    ),
    (
        Fixture("file-search", "/v1/responses",
                {"input": "docs", "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]},
                response("gpt-4.1", responses_usage(4_000, 250),
                         output=[file_search_call(1), file_search_call(2), file_search_call(3)])),
        tokens_usd("gpt-4.1", input_tokens=4_000, output_tokens=250) + 3 * FILE_SEARCH,
        {"file_search_calls": 3},
    ),
    (
        Fixture("sse-code-interpreter", "/v1/responses",
                {"input": "compute", "stream": True,
                 "tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]},
                response("gpt-5", responses_usage(2_000, 600),
                         output=[code_interpreter_call(1, "cntr_a"),
                                 code_interpreter_call(2, "cntr_a")]),
                stream=True),
        tokens_usd("gpt-5", input_tokens=2_000, output_tokens=600) + CONTAINER,
        {"code_interpreter_containers": 1},
    ),
    (
        Fixture("image-generation", "/v1/responses",
                {"input": "a cat", "tools": [{"type": "image_generation"}]},
                response("gpt-5", responses_usage(1_500, 100),
                         output=[image_generation_call("1024x1536", "high")])),
        tokens_usd("gpt-5", input_tokens=1_500, output_tokens=100)
        + IMAGE_1024x1536_HIGH * GPT_IMAGE_1_OUTPUT,
        {"image_generations": 1},
    ),
    (
        Fixture("long-context", "/v1/responses", _r("the whole repo"),
                response("gpt-5.4", responses_usage(300_000, 2_000, cached=100_000))),
        tokens_usd("gpt-5.4", input_tokens=300_000, cache_read_tokens=100_000,
                   output_tokens=2_000),
        {"price_threshold": 272_000},
    ),
    (
        Fixture("audio", "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "say it"}],
                 "modalities": ["text", "audio"]},
                chat_completion("gpt-4o-audio-preview",
                                chat_usage(1_000, 900, audio_in=600, audio_out=700))),
        per_million(400, AUDIO_PREVIEW["text_in"]) + per_million(600, AUDIO_PREVIEW["audio_in"])
        + per_million(200, AUDIO_PREVIEW["text_out"])
        + per_million(700, AUDIO_PREVIEW["audio_out"]),
        {"input_audio_tokens": 600, "output_audio_tokens": 700, "price_source": "override"},
    ),
    (
        Fixture("chat-search", "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "weather"}], "web_search_options": {}},
                chat_completion("gpt-4o-search-preview", chat_usage(800, 120))),
        tokens_usd("gpt-4o-search-preview", input_tokens=800, output_tokens=120)
        + WEB_SEARCH_PREVIEW_NON_REASONING,
        {"web_search_calls": 1},
    ),
]  # fmt: skip
UNKNOWN = Fixture(
    "unknown-model", "/v1/responses", _r("new"), response("gpt-7-nova", responses_usage(1_000, 100))
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Replay]:
    with replay_upstream([f for f, _usd, _fields in CASES] + [UNKNOWN]) as replay:
        yield replay


@pytest.fixture(scope="module")
def pstack(
    upstream: Replay, hooks: Hooks, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    policy = POLICY.format(hook_port=hooks.port)
    env = {"TEST_UPSTREAM": "sk-upstream-prices"}
    with policy_stack(tmp_path_factory, policy, env, upstream_url=upstream.url) as s:
        yield s


def send(stack: Stack, key: str, fixture: Fixture, model: str) -> httpx.Response:
    body = {"model": model, **fixture.request}
    with httpx.Client(timeout=30) as http:
        return http.post(
            stack.base_url + fixture.path.removeprefix("/v1"),
            json=body,
            headers={"authorization": f"Bearer {key}", REPLAY_HEADER: fixture.name},
        )


@pytest.mark.parametrize(("fixture", "expected", "fields"), CASES, ids=[c[0].name for c in CASES])
def test_each_kind_of_answer_bills_what_the_published_prices_give(
    pstack: Stack, fixture: Fixture, expected: Decimal, fields: dict[str, Any]
) -> None:
    key = new_key(pstack, "dev", "app")["key"]
    answer = send(pstack, key, fixture, fixture.answer["model"].split("-20")[0])
    assert answer.status_code == 200, answer.text
    r = redis.Redis.from_url(pstack.redis_url)
    try:
        rec = wait_record(r, answer.headers["x-extproc-request-id"])
    finally:
        r.close()
    assert rec["outcome"] == "completed" and not rec["estimated"]
    assert rec["cost_nanos"] == math.ceil(expected * 10**9), (rec["parts"], expected)
    assert rec["cost_nanos"] == -(-sum(p["quantity"] * p["rate"] for p in rec["parts"]) // 10**6)
    for name, value in fields.items():
        assert rec[name] == value, name
    assert rec["catalogue_version"] == f"genai-prices {genai_prices.__version__}"
    assert rec["override_version"] and rec["price_version"].endswith(rec["override_version"])
    assert not rec["price_provisional"]
    if not fixture.stream:
        assert answer.headers["x-extproc-cost-usd"] == rec["cost_usd"]


def test_an_unknown_model_is_billed_provisionally_under_its_name_with_one_alert(
    pstack: Stack, upstream: Replay, hooks: Hooks
) -> None:
    key = new_key(pstack, "dev", "app")["key"]
    r = redis.Redis.from_url(pstack.redis_url)
    try:
        records = []
        for _ in range(2):
            answer = send(pstack, key, UNKNOWN, "gpt-7-nova")
            assert answer.status_code == 200, answer.text
            records.append(wait_record(r, answer.headers["x-extproc-request-id"]))
        (alert,) = [b for b in hooks.wait_for(1) if b["extproc"]["event"] == "unknown_model"]
        assert r.get(unpriced_model_key("gpt-7-nova")) == b"dev"
    finally:
        r.close()
    for rec in records:
        assert rec["model_served"] == "gpt-7-nova"
        assert rec["price_provisional"] and rec["price_fallback"]
        assert rec["price_family"].startswith("provisional:")
        # Never below any listed model's price for the same usage.
        listed = max(
            tokens_usd(m, input_tokens=1_000, output_tokens=100) for m in ("gpt-5", "o1-pro")
        )
        assert rec["cost_nanos"] >= math.ceil(listed * 10**9)
    assert "gpt-7-nova" in alert["text"] and "price file" in alert["text"]
    assert alert["extproc"]["workspace"] == "dev" and alert["extproc"]["model"] == "gpt-7-nova"
    assert alert["extproc"]["admitted"] is True


def test_a_workspace_that_refuses_unknown_models_says_which_and_how_to_price_it(
    pstack: Stack, upstream: Replay
) -> None:
    key = new_key(pstack, "strict", "app")["key"]
    before = upstream.asked.count("unknown-model")
    answer = send(pstack, key, UNKNOWN, "gpt-7-nova")
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "model_not_priced" and error["param"] == "model"
    assert "gpt-7-nova" in error["message"] and "price file" in error["message"]
    assert upstream.asked.count("unknown-model") == before  # never forwarded
    priced = send(pstack, key, CASES[1][0], "gpt-5")
    assert priced.status_code == 200, priced.text
