"""End to end: model routing, downgrades instead of halts, session caps, prompt-cache keys.

Real Envoy (with a second upstream cluster for routed traffic), the sidecar with a routing
policy, real Redis, two simulators; the openai SDK and httpx as clients.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
import redis

from extproc.devstack.stack import Stack
from extproc.metering.prices import default_table
from tests.conftest import new_key, policy_stack, wait_record

RID = "x-extproc-request-id"

POLICY = """
version: 1
timezone: UTC
defaults: {period: month, soft_limit: 75%, hard_limit: 100%, default_output_cap: 64}
routing:
  aliases: {codex-default: gpt-5.1-codex}
  tiers:
    - [gpt-5.1-codex, gpt-5]
    - [gpt-5.1-codex-mini, gpt-5-mini]
    - [gpt-5-nano]
  ladder:
    gpt-5.1-codex: gpt-5.1-codex-mini
    gpt-5.1-codex-mini: gpt-5-nano
    gpt-5: gpt-5-mini
    gpt-5-mini: gpt-5-nano
  upstream_routes:
    azure: {description: second upstream}
  rules:
    - name: lint-is-cheap
      when: {task: [lint]}
      set: {model: gpt-5.1-codex-mini, reasoning_effort: low}
    - name: batch-to-azure
      when: {service: [batch]}
      set: {route: azure}
workspaces:
  dev:
    budget_usd: 1000
    upstream: {key_env: TEST_UPSTREAM}
    routing: {inject_prompt_cache_key: true}
    services:
      cli: {}
      batch: {}
      nocache: {routing: {inject_prompt_cache_key: false}}
      agent:
        routing: {max_session_input_tokens: 120, on_context_exceeded: reject}
  over:
    budget_usd: "0.002"
    enforce_output_cap: true
    upstream: {key_env: TEST_UPSTREAM}
    routing: {overdraft: {model: gpt-5-nano, usd: "0.0005"}}
    services:
      bot: {}
  ladder:
    budget_usd: "0.002"
    hard_limit: 500%
    upstream: {key_env: TEST_UPSTREAM}
    routing: {degrade_past_soft: true}
    services:
      bot: {}
"""


@pytest.fixture(scope="module")
def rstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"TEST_UPSTREAM": "sk-upstream"}
    with policy_stack(tmp_path_factory, POLICY, env, extra_upstreams=("azure",)) as s:
        yield s


@pytest.fixture(scope="module")
def rclient(rstack: Stack) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(rstack.redis_url)
    yield r
    r.close()


def key_for(stack: Stack, workspace: str, service: str) -> str:
    return new_key(stack, workspace, service)["key"]


def sdk(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=30)


def seen_by(upstream_url: str) -> list[dict]:
    return httpx.get(f"{upstream_url}/_sim/requests", timeout=10).json()["requests"]


def test_alias_is_resolved_and_both_models_are_visible(rstack: Stack, rclient: redis.Redis) -> None:
    client = sdk(rstack, key_for(rstack, "dev", "cli"))
    raw = client.responses.with_raw_response.create(model="codex-default", input="hello")
    assert raw.parse().model == "gpt-5.1-codex"
    assert raw.headers["x-extproc-model-requested"] == "codex-default"
    assert raw.headers["x-extproc-model-served"] == "gpt-5.1-codex"
    assert "alias" in raw.headers["x-extproc-routing"]
    assert seen_by(rstack.upstream_url)[-1]["model"] == "gpt-5.1-codex"
    rec = wait_record(rclient, raw.headers[RID])
    assert (rec["model_requested"], rec["model_served"]) == ("codex-default", "gpt-5.1-codex")
    # The catalogue's row that covers it (genai-prices prices gpt-5.1-codex as gpt-5.1).
    assert rec["price_family"] == default_table().family_of("gpt-5.1-codex") == "gpt-5.1"
    assert "alias" in rec["routing"]


def test_task_rule_downgrades_and_caps_effort(rstack: Stack, rclient: redis.Redis) -> None:
    client = sdk(rstack, key_for(rstack, "dev", "cli"))
    raw = client.responses.with_raw_response.create(
        model="gpt-5.1-codex",
        input="fix the lint error",
        reasoning={"effort": "high"},
        extra_headers={"x-task": "lint"},
    )
    assert raw.headers["x-extproc-model-served"] == "gpt-5.1-codex-mini"
    upstream = seen_by(rstack.upstream_url)[-1]
    assert upstream["model"] == "gpt-5.1-codex-mini"
    assert upstream["body"]["reasoning"]["effort"] == "low"
    rec = wait_record(rclient, raw.headers[RID])
    assert rec["rule"] == "lint-is-cheap"
    assert rec["model_served"] == "gpt-5.1-codex-mini"


def test_route_header_sends_traffic_to_the_second_upstream(rstack: Stack) -> None:
    client = sdk(rstack, key_for(rstack, "dev", "batch"))
    before_main = len(seen_by(rstack.upstream_url))
    before_azure = len(seen_by(rstack.routes["azure"]))
    client.chat.completions.create(
        model="gpt-5-mini", messages=[{"role": "user", "content": "batch job"}]
    )
    assert len(seen_by(rstack.routes["azure"])) == before_azure + 1
    assert len(seen_by(rstack.upstream_url)) == before_main
    assert seen_by(rstack.routes["azure"])[-1]["headers"]["x-extproc-route"] == "azure"


def test_soft_limit_steps_down_the_ladder_instead_of_refusing(
    rstack: Stack, rclient: redis.Redis
) -> None:
    client = sdk(rstack, key_for(rstack, "ladder", "bot"))
    served = []
    for _ in range(8):
        raw = client.responses.with_raw_response.create(model="gpt-5.1-codex", input="work")
        wait_record(rclient, raw.headers[RID])
        served.append(raw.headers["x-extproc-model-served"])
        if served[-1] != "gpt-5.1-codex":
            assert "degrade" in raw.headers["x-extproc-routing"]
            assert raw.headers["x-extproc-budget-warning"]
            break
    assert served[0] == "gpt-5.1-codex"
    assert served[-1] == "gpt-5.1-codex-mini"
    assert seen_by(rstack.upstream_url)[-1]["model"] == "gpt-5.1-codex-mini"


def test_session_is_capped_after_its_input_grows(rstack: Stack) -> None:
    key = key_for(rstack, "dev", "agent")
    history: list[dict] = []
    statuses = []
    for turn in range(8):
        history.append({"role": "user", "content": f"turn {turn}: please continue the work"})
        resp = httpx.post(
            f"{rstack.base_url}/responses",
            json={"model": "gpt-5-mini", "input": history},
            headers={"authorization": f"Bearer {key}", "session_id": "sess-42"},
            timeout=30,
        )
        statuses.append(resp.status_code)
        if resp.status_code != 200:
            break
        history.append({"role": "assistant", "content": "ok, continuing"})
    assert statuses[0] == 200
    assert statuses[-1] == 413
    assert 2 <= len(statuses) <= 8
    err = resp.json()["error"]
    assert err["code"] == "session_input_tokens_over_limit"


def test_prompt_cache_key_injected_stable_and_never_overwritten(rstack: Stack) -> None:
    client = sdk(rstack, key_for(rstack, "dev", "cli"))
    context = "shared repository context line\n" * 400
    usages = []
    for turn in range(2):
        raw = client.responses.with_raw_response.create(
            model="gpt-5-mini",
            input=[
                {"role": "user", "content": context},
                {"role": "user", "content": f"question {turn}"},
            ],
            extra_headers={"session_id": "ci-run-7"},
        )
        usages.append(raw.parse().usage)
        assert seen_by(rstack.upstream_url)[-1]["body"]["prompt_cache_key"].startswith("extproc-")
    keys = [r["body"]["prompt_cache_key"] for r in seen_by(rstack.upstream_url)[-2:]]
    assert keys[0] == keys[1]
    assert usages[0].input_tokens_details.cached_tokens == 0
    assert usages[1].input_tokens_details.cached_tokens >= 1024
    client.responses.create(model="gpt-5-mini", input="hi", prompt_cache_key="mine")
    assert seen_by(rstack.upstream_url)[-1]["body"]["prompt_cache_key"] == "mine"


def test_uncached_repeat_prefix_is_counted_as_a_cache_miss(
    rstack: Stack, rclient: redis.Redis
) -> None:
    # The pipeline re-sends the same repository context but with a fresh prompt_cache_key each
    # run (a common CI mistake): the provider cannot reuse its cache, and we say what it cost.
    client = sdk(rstack, key_for(rstack, "dev", "nocache"))
    context = "the same repository file, again and again\n" * 300
    ids = []
    for run in range(2):
        raw = client.responses.with_raw_response.create(
            model="gpt-5-mini",
            input=[{"role": "user", "content": context}, {"role": "user", "content": "review"}],
            prompt_cache_key=f"ci-run-{run}",
        )
        assert raw.parse().usage.input_tokens_details.cached_tokens == 0
        ids.append(raw.headers[RID])
    rec = wait_record(rclient, ids[-1])
    period = rec["time_ms"]
    from datetime import UTC, datetime

    spent = rclient.hgetall(
        "{ws:dev}:spent:" + datetime.fromtimestamp(period / 1000, UTC).strftime("%Y-%m")
    )
    missed = int(spent[b"cachemiss_tokens:svc:nocache"])
    assert 1024 <= missed <= rec["input_tokens"]
    assert int(spent[b"cachemiss_nanos:svc:nocache"]) > 0
    assert int(spent[b"input_tokens:svc:nocache"]) >= 2 * rec["input_tokens"] - 8


def test_hard_limit_keeps_the_overdraft_model_open_then_stops(
    rstack: Stack, rclient: redis.Redis
) -> None:
    key = key_for(rstack, "over", "bot")
    served, statuses = [], []
    for _ in range(60):
        resp = httpx.post(
            f"{rstack.base_url}/responses",
            json={"model": "gpt-5.1-codex", "input": "work"},
            headers={"authorization": f"Bearer {key}"},
            timeout=30,
        )
        statuses.append(resp.status_code)
        if resp.status_code != 200:
            break
        wait_record(rclient, resp.headers[RID])
        served.append(resp.headers["x-extproc-model-served"])
    assert served[0] == "gpt-5.1-codex"
    assert "gpt-5-nano" in served
    first_nano = served.index("gpt-5-nano")
    assert set(served[first_nano:]) == {"gpt-5-nano"}
    assert statuses[-1] == 429
    assert resp.json()["error"]["code"] == "insufficient_quota"
    from datetime import UTC, datetime

    month = datetime.now(UTC).strftime("%Y-%m")
    spent = int(rclient.hget("{ws:over}:spent:" + month, "ws"))
    # Budget $0.002 at a 100% hard limit plus the $0.0005 overdraft, and not a nano-dollar
    # more: enforce_output_cap makes every answer stop within what was reserved for it.
    assert 2_000_000 < spent <= 2_500_000
    assert seen_by(rstack.upstream_url)[-1]["body"]["max_output_tokens"] == 64
