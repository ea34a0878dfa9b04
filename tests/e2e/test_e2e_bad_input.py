"""End to end: bad input gets a clear OpenAI-shaped error, and the sidecar keeps serving."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest
import redis

from extproc.devstack.stack import Stack
from tests.conftest import E2E_MAX_BODY, wait_record

RID = "x-extproc-request-id"


def post(stack: Stack, path: str, content: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}{path}",
        content=content,
        headers={"content-type": "application/json", **headers},
        timeout=60,
    )


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    assert err["param"] == param
    return err


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"model": "gpt-5", "input": "hi"', "truncated JSON"),
        (b"model=gpt-5&input=hi", "not JSON"),
        (b'["gpt-5"]', "not an object"),
        (b'{"model": "gpt-5", "input": "caf\xe9"}', "invalid UTF-8"),
        (b'{"model": "gpt-5", "model": "gpt-5-nano", "input": "x"}', "duplicate key"),
    ],
)
def test_unparseable_bodies_get_400(
    stack: Stack, redis_client: redis.Redis, body: bytes, why: str
) -> None:
    resp = post(stack, "/responses", body)
    err = assert_openai_error(resp, 400)
    assert err["type"] == "invalid_request_error"
    rec = wait_record(redis_client, resp.headers[RID])
    assert rec["outcome"] == "rejected"
    assert rec["cost_nanos"] == 0


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"input": "hi"}, "model"),
        ({"model": 5, "input": "hi"}, "model"),
        ({"model": "gpt-5", "input": "hi", "stream": "yes"}, "stream"),
    ],
)
def test_invalid_fields_name_the_param(stack: Stack, payload: dict, param: str) -> None:
    assert_openai_error(post(stack, "/responses", json.dumps(payload).encode()), 400, param)


def test_unsupported_content_encoding(stack: Stack) -> None:
    err = assert_openai_error(
        post(stack, "/chat/completions", b"\x00\x01", **{"content-encoding": "br"}), 415
    )
    assert "br" in err["message"]


def test_body_over_limit_gets_413(stack: Stack) -> None:
    big = json.dumps({"model": "gpt-5", "input": "x" * (E2E_MAX_BODY + 10)}).encode()
    assert_openai_error(post(stack, "/responses", big), 413)


def test_large_codex_body_within_limit_passes(stack: Stack, redis_client: redis.Redis) -> None:
    # 5 MiB: far over Envoy's default 1 MiB buffer, under our limit.
    items = [
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": f"{i} " + "code line\n" * 5000}],
        }
        for i in range(100)
    ]
    body = json.dumps({"model": "gpt-5-codex", "input": items}).encode()
    assert len(body) > 1024 * 1024
    resp = post(stack, "/responses", body)
    assert resp.status_code == 200, resp.text
    rec = wait_record(redis_client, resp.headers[RID])
    assert rec["input_tokens"] == resp.json()["usage"]["input_tokens"]


def test_special_token_text_is_ordinary_text(
    client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "explain <|endoftext|> and <|endofprompt|>"}],
    )
    rec = wait_record(redis_client, raw.headers[RID])
    assert rec["status"] == 200
    assert rec["input_tokens"] == raw.parse().usage.prompt_tokens
    assert rec["counted_input_tokens"] > 10


def test_empty_body_on_metered_path(stack: Stack) -> None:
    resp = httpx.post(f"{stack.base_url}/responses", timeout=30)
    assert_openai_error(resp, 400)


def test_other_endpoints_pass_through_with_a_record(
    stack: Stack, redis_client: redis.Redis, client: openai.OpenAI
) -> None:
    """Metering-only mode (no policy): known OpenAI endpoints pass, each with one record."""
    raw = client.models.with_raw_response.list()
    assert any(m.id for m in raw.parse().data)
    rec = wait_record(redis_client, raw.headers[RID])
    assert (rec["endpoint"], rec["status"], rec["price_family"]) == ("models", 200, "free")


def test_unknown_paths_are_404_not_forwarded(stack: Stack) -> None:
    for method, path in (("POST", "/chat/completion"), ("GET", "/admin"), ("PUT", "/responses")):
        resp = httpx.request(method, f"{stack.base_url}{path}", content=b"{}", timeout=30)
        assert_openai_error(resp, 404)
        assert resp.json()["error"]["code"] == "unknown_url"


def test_sidecar_keeps_serving_after_bad_input(stack: Stack, client: openai.OpenAI) -> None:
    for body in (b"{", b"\xff\xfe", b"null", b'{"model": []}'):
        assert post(stack, "/chat/completions", body).status_code == 400
    ok = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "still there?"}]
    )
    assert ok.choices[0].message.content


def test_usage_cli_prints_newest_first(
    stack: Stack, client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    ids = []
    for model in ("gpt-4o-mini", "gpt-5-nano"):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi"}]
        )
        ids.append(raw.headers[RID])
    wait_record(redis_client, ids[-1])
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "extproc",
            "usage",
            "--json",
            "--limit",
            "2",
            "--redis-url",
            stack.redis_url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(out.stdout)
    assert [r["request_id"] for r in rows] == ids[::-1]
    assert rows[0]["model_requested"] == "gpt-5-nano"
    assert float(rows[0]["cost_usd"]) > 0
