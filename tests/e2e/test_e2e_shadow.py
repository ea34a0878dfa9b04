"""Shadow mode end to end: a second policy evaluated live, recorded, never enforced.

The real policy lets every request through; the shadow allows only gpt-4o-mini for the
`cli` service and gives team `data` next to no money. Each request must be served as the
real policy says, and carry the shadow's verdict on its ledger record; the admin API and
the console page then compare the two.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
import redis

from extproc.devstack.stack import Stack, free_port, temporary_stack
from tests.conftest import new_key, wait_record

ADMIN = "shadow-admin-0123456789abcdef"
REAL = """
version: 1
timezone: UTC
defaults: {default_output_cap: 64}
workspaces:
  dev:
    budget_usd: 100
    upstream: {key_env: TEST_UPSTREAM}
    teams:
      platform: {}
      data: {}
    services:
      cli: {team: platform}
      etl: {team: data}
"""
SHADOW = REAL.replace("      data: {}", '      data: {budget_usd: "0.000001"}').replace(
    "      cli: {team: platform}",
    "      cli: {team: platform, routing: {allowed_models: [gpt-4o-mini]}}",
)


@pytest.fixture(scope="module")
def sstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    d = tmp_path_factory.mktemp("policy")
    (d / "real.yaml").write_text(REAL)
    (d / "shadow.yaml").write_text(SHADOW)
    env = {
        "EXTPROC_POLICY": str(d / "real.yaml"),
        "EXTPROC_SHADOW_POLICY": str(d / "shadow.yaml"),
        "TEST_UPSTREAM": "sk-upstream",
    }
    with temporary_stack(
        sidecar_env=env,
        console_port=free_port(),
        console_env={"EXTPROC_ADMIN_TOKENS": f"ops:{ADMIN}"},
    ) as s:
        s.policy_path = d / "real.yaml"  # type: ignore[attr-defined]
        yield s


def call(stack: Stack, key: str, model: str) -> dict:
    client = openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "shadow me"}]
    )
    assert raw.http_response.status_code == 200  # the shadow is never enforced
    r = redis.Redis.from_url(stack.redis_url)
    try:
        return wait_record(r, raw.headers["x-extproc-request-id"])
    finally:
        r.close()


def test_shadow_verdicts_are_recorded_and_never_enforced(sstack: Stack) -> None:
    cli_key, etl_key = new_key(sstack, "dev", "cli"), new_key(sstack, "dev", "etl")
    assert call(sstack, cli_key["key"], "gpt-4o")["shadow"] == "refuse:model_not_allowed"
    assert call(sstack, cli_key["key"], "gpt-4o-mini")["shadow"] == "allow"
    assert call(sstack, etl_key["key"], "gpt-4o-mini")["shadow"] == "refuse:insufficient_quota"

    api = httpx.Client(
        base_url=sstack.console_url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30
    )
    summary = api.get("/admin/v1/shadow").json()
    assert summary["compared_requests"] == 3
    assert summary["agreeing_requests"] == 1
    pairs = {(p["actual"], p["shadow"]): p["requests"] for p in summary["pairs"]}
    assert pairs == {
        ("allow", "refuse:model_not_allowed"): 1,
        ("allow", "allow"): 1,
        ("allow", "refuse:insufficient_quota"): 1,
    }
    assert {d["service"] for d in summary["recent_differences"]} == {"cli", "etl"}
    api.close()
    with httpx.Client(follow_redirects=True, timeout=30) as browser:
        assert browser.get(sstack.console_login).status_code == 200
        page = browser.get(sstack.console_url + "/shadow").text
    assert '<strong id="agreeing">1</strong>' in page
    assert "refuse:model_not_allowed" in page and "refuse:insufficient_quota" in page
