"""End to end: `GET /extproc/v1/me` through the real gateway, authenticated by the virtual key.

Real Envoy, sidecar, Redis and simulator; the openai SDK makes the traffic and httpx asks
the gateway what it knows about the caller.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal

import httpx
import openai
import pytest
import redis

from extproc.devstack.stack import Stack
from tests.conftest import new_key, policy_stack, wait_record

POLICY = """
version: 1
timezone: UTC
defaults: {default_output_cap: 64}
workspaces:
  dev:
    budget_usd: 100
    contact: "#platform-help"
    upstream: {key_env: TEST_UPSTREAM}
    teams:
      platform: {budget_usd: 40, contact: "alice@example.com"}
      data: {budget_usd: 30}
    services:
      cli: {team: platform, key_rate_limits: {rpm: 50}}
      etl: {team: data}
"""


@pytest.fixture(scope="module")
def mstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with policy_stack(tmp_path_factory, POLICY, {"TEST_UPSTREAM": "sk-upstream"}) as s:
        yield s


def me(stack: Stack, key: str | None, header: str = "authorization") -> httpx.Response:
    """`/extproc/v1/me` with `key` in `header`, as the gateway accepts it there."""
    value = f"Bearer {key}" if header == "authorization" else key
    headers = {header: value} if key else {}
    url = stack.base_url.removesuffix("/v1") + "/extproc/v1/me"
    return httpx.get(url, headers=headers, timeout=10)


def test_me_shows_own_standing_and_only_own_requests(mstack: Stack) -> None:
    r = redis.Redis.from_url(mstack.redis_url)
    mine = new_key(mstack, "dev", "cli")
    other = new_key(mstack, "dev", "etl")
    client = openai.OpenAI(base_url=mstack.base_url, api_key=mine["key"], max_retries=0)
    raws = [
        client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": f"hello {i}"}],
            extra_headers={"session_id": "sess-me-1"},
        )
        for i in range(3)
    ]
    theirs = openai.OpenAI(base_url=mstack.base_url, api_key=other["key"], max_retries=0)
    their_raw = theirs.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "secret project"}]
    )
    records = [wait_record(r, raw.headers["x-extproc-request-id"]) for raw in raws]
    wait_record(r, their_raw.headers["x-extproc-request-id"])

    resp = me(mstack, mine["key"])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["identity"] == {
        "key_id": mine["key_id"],
        "workspace": "dev",
        "team": "platform",
        "service": "cli",
        "owner": None,
        "expires_at": None,
    }
    assert body["contact"] == "alice@example.com"  # the team's own contact wins
    scopes = {b["scope"]: b for b in body["budgets"]}
    assert set(scopes) == {"ws", "team:platform", "svc:cli", f"key:{mine['key_id']}"}
    spent_mine = sum(rec["cost_nanos"] for rec in records)
    assert scopes[f"key:{mine['key_id']}"]["spent_nanos"] == spent_mine
    assert scopes["team:platform"]["spent_nanos"] == spent_mine
    assert scopes["team:platform"]["hard_usd"] == "44"  # 110% of 40
    team = scopes["team:platform"]
    assert Decimal(team["remaining_usd"]) == Decimal(44) - Decimal(spent_mine) / 10**9
    assert team["resets_at"] == body["period"]["resets_at"]
    rates = {r["scope"]: r for r in body["rate_limits"]}
    assert rates[f"key:{mine['key_id']}"]["rpm"] == 50
    assert rates[f"key:{mine['key_id']}"]["requests_this_minute"] >= 1
    ids = [row["request_id"] for row in body["recent_requests"]]
    assert ids == [rec["request_id"] for rec in reversed(records)]  # newest first
    row = body["recent_requests"][0]
    assert row["model_requested"] == "gpt-4o-mini"
    assert row["cost_nanos"] == records[-1]["cost_nanos"]
    assert body["sessions"][0]["session_id"] == "sess-me-1"
    assert body["sessions"][0]["input_tokens"] > 0
    assert their_raw.headers["x-extproc-request-id"] not in resp.text
    assert other["key_id"] not in resp.text
    assert "svc:etl" not in resp.text and "team:data" not in resp.text
    # Every header the gateway takes a key from, /me takes it from too.
    for header in ("x-api-key", "api-key"):
        alt = me(mstack, mine["key"], header)
        assert alt.status_code == 200, alt.text
        assert alt.json()["identity"]["key_id"] == mine["key_id"]


def test_remaining_means_the_same_in_the_headers_and_in_me(mstack: Stack) -> None:
    """Against the hard limit (110% of the budget here), less spent and held, exactly."""
    r = redis.Redis.from_url(mstack.redis_url)
    key = new_key(mstack, "dev", "etl")
    client = openai.OpenAI(base_url=mstack.base_url, api_key=key["key"], max_retries=0)
    first = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "spend a little"}]
    )
    wait_record(r, first.headers["x-extproc-request-id"])
    standing = me(mstack, key["key"]).json()["budgets"]
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "and tell me what is left"}]
    )
    scope = raw.headers["x-extproc-budget-scope"]
    (binding,) = [b for b in standing if b["label"] == scope]
    hard = Decimal(binding["hard_usd"])
    assert hard == Decimal(binding["budget_usd"]) * Decimal("1.1")  # the default hard_limit
    assert Decimal(binding["spent_usd"]) > 0
    assert raw.headers["x-extproc-budget-remaining-usd"] == binding["remaining_usd"]
    left = Decimal(binding["remaining_usd"])
    assert left == hard - Decimal(binding["spent_usd"])  # nothing held between two calls
    percent = raw.headers["x-extproc-budget-remaining-percent"]
    assert percent == f"{100 * float(left) / float(hard):.1f}"
    r.close()


def test_me_refuses_wrong_keys_and_never_reaches_upstream(mstack: Stack) -> None:
    before = httpx.get(f"{mstack.upstream_url}/_sim/requests", timeout=10).json()["requests"]
    for key in (None, "sk-ext-" + "x" * 40, "admin-token-is-not-a-key"):
        for header in ("authorization", "x-api-key"):
            resp = me(mstack, key, header)
            assert resp.status_code == 401
            assert resp.json()["error"]["code"] == "invalid_api_key"
    revoked = new_key(mstack, "dev", "cli")
    assert me(mstack, revoked["key"]).status_code == 200
    from tests.conftest import cli

    cli(mstack, "keys", "revoke", revoked["key_id"])
    assert me(mstack, revoked["key"]).status_code == 401
    after = httpx.get(f"{mstack.upstream_url}/_sim/requests", timeout=10).json()["requests"]
    assert len(after) == len(before)


def test_me_page_is_served_by_the_gateway_with_no_key_in_it(mstack: Stack) -> None:
    url = mstack.base_url.removesuffix("/v1") + "/extproc/me"
    resp = httpx.get(url, timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert 'type="password"' in resp.text and "/extproc/v1/me" in resp.text
    bad = httpx.post(url, content=json.dumps({}), timeout=10)
    assert bad.status_code == 405
