"""End to end: hostile input is refused or survived, and always recorded once (issue 8).

Real Envoy, one sidecar, a real Redis-protocol server and the simulator upstream. Each
defect the issue lists within items 5 and 6 has its regression test here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import unquote

import httpx
import pytest
import redis

from extproc.devstack.stack import Stack
from tests.conftest import new_key, policy_stack, wait_record

RID = "x-extproc-request-id"

POLICY = """
version: 1
timezone: UTC
defaults:
  default_output_cap: 64
workspaces:
  dev:
    budget_usd: 1000
    enforce_output_cap: true
    upstream: {key_env: TEST_UPSTREAM_DEV}
    services:
      cli: {}
  tight:
    budget_usd: "0.001"
    upstream: {key_env: TEST_UPSTREAM_DEV}
    services:
      bot: {}
"""


@pytest.fixture(scope="module")
def rstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with policy_stack(tmp_path_factory, POLICY, {"TEST_UPSTREAM_DEV": "sk-upstream-dev"}) as s:
        yield s


@pytest.fixture(scope="module")
def rdb(rstack: Stack) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(rstack.redis_url)
    yield r
    r.close()


@pytest.fixture(scope="module")
def dev_key(rstack: Stack) -> str:
    return new_key(rstack, "dev", "cli")["key"]


def post(stack: Stack, key: str, path: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}{path}",
        json=body,
        headers={"authorization": f"Bearer {key}", **headers},
        timeout=60,
    )


def upstream_bodies(stack: Stack) -> list[dict]:
    seen = httpx.get(f"{stack.upstream_url}/_sim/requests", timeout=10).json()["requests"]
    return [r["body"] for r in seen if r["body"]]


@pytest.mark.parametrize("stream", [False, True])
def test_non_latin1_model_name_is_served_and_billed(
    rstack: Stack, rdb: redis.Redis, dev_key: str, stream: bool
) -> None:
    model = "\uff47\uff50\uff54-5-mini"
    body = {"model": model, "input": "hello", "stream": stream}
    resp = post(rstack, dev_key, "/responses", body)
    assert resp.status_code == 200, resp.text
    assert unquote(resp.headers["x-extproc-model-requested"]) == model
    if stream:
        assert "response.completed" in resp.text
        done = [
            json.loads(line[6:])
            for line in resp.text.splitlines()
            if line.startswith("data: ") and "response.completed" in line
        ]
        usage = done[0]["response"]["usage"]
    else:
        usage = resp.json()["usage"]
    rec = wait_record(rdb, resp.headers[RID])
    assert rec["outcome"] == "completed"
    assert rec["estimated"] is False
    assert rec["model_requested"] == model
    assert rec["output_tokens"] == usage["output_tokens"] > 0
    assert rec["cost_nanos"] > 0


def test_control_characters_in_the_model_name_do_not_break_the_reply(
    rstack: Stack, rdb: redis.Redis, dev_key: str
) -> None:
    resp = post(rstack, dev_key, "/responses", {"model": "gpt-5\r\nx-evil: 1\u0000", "input": "x"})
    assert resp.status_code == 200, resp.text
    assert "x-evil" not in resp.headers
    rec = wait_record(rdb, resp.headers[RID])
    assert rec["outcome"] == "completed"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/chat/completions",
            {"model": "gpt-4o-mini", "messages": [], "max_tokens": 2147483648},
            "max_tokens",
        ),
        (
            "/responses",
            {"model": "gpt-5", "input": "x", "max_output_tokens": 10**30},
            "max_output_tokens",
        ),
        ("/chat/completions", {"model": "gpt-4o-mini", "messages": [], "n": 1000}, "n"),
        (
            "/chat/completions",
            {"model": "gpt-4o-mini", "messages": [], "stream": True, "stream_options": "yes"},
            "stream_options",
        ),
    ],
)
def test_out_of_range_and_ill_typed_params_are_400_and_recorded(
    rstack: Stack, rdb: redis.Redis, dev_key: str, path: str, body: dict, param: str
) -> None:
    resp = post(rstack, dev_key, path, body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    rec = wait_record(rdb, resp.headers[RID])
    assert rec["outcome"] == "rejected"
    assert rec["workspace"] == "dev"


def test_reservation_covers_every_choice(rstack: Stack, rdb: redis.Redis) -> None:
    key = new_key(rstack, "tight", "bot")["key"]
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 100,
    }
    one = post(rstack, key, "/chat/completions", body)
    assert one.status_code == 200, one.text
    # 50 outputs of up to 100 tokens each cannot fit in $0.001; one output could.
    many = post(rstack, key, "/chat/completions", {**body, "n": 50})
    assert many.status_code == 429, many.text
    assert many.json()["error"]["code"] == "insufficient_quota"
    assert wait_record(rdb, many.headers[RID])["outcome"] == "rejected"


def test_enforced_output_cap_bounds_the_whole_request(
    rstack: Stack, rdb: redis.Redis, dev_key: str
) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "cap me"}], "n": 4}
    resp = post(rstack, dev_key, "/chat/completions", body)
    assert resp.status_code == 200, resp.text
    sent = [b for b in upstream_bodies(rstack) if b.get("messages") == body["messages"]]
    assert sent[-1]["n"] == 4
    assert sent[-1]["max_completion_tokens"] == 64 // 4
    rec = wait_record(rdb, resp.headers[RID])
    assert rec["outcome"] == "completed"


def test_a_number_beyond_a_double_is_400_naming_the_param(
    rstack: Stack, rdb: redis.Redis, dev_key: str
) -> None:
    # Streaming chat: the sidecar must rewrite the body (to ask for usage), and 1e999
    # cannot be written back as JSON. The client hears which parameter, not a 500.
    raw = b'{"model":"gpt-4o-mini","messages":[],"stream":true,"temperature":1e999}'
    resp = httpx.post(
        f"{rstack.base_url}/chat/completions",
        content=raw,
        headers={"authorization": f"Bearer {dev_key}", "content-type": "application/json"},
        timeout=60,
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "temperature"
    assert wait_record(rdb, resp.headers[RID])["outcome"] == "rejected"
