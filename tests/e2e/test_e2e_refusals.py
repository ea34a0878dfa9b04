"""End to end: a refused developer reads why, in the real Codex CLI and in the openai SDK.

Codex CLI is told in a shape it prints at once (400, our JSON body) and sends no second
request; the SDK keeps OpenAI's statuses and types, and its exception text carries the same
message: what stopped the caller (here: a worst case bigger than the budget, not an
exhausted one), the numbers, when it resets, whom to ask. The number of
requests each client sent is read from the ledger (exactly one record per request).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis

from extproc.devstack.stack import Stack
from extproc.store.schema import ledger_key, workspace_prefix
from extproc.v1.ledger_pb2 import UsageRecord
from tests.codex import codex_exec
from tests.conftest import new_key, policy_stack, wait_for

POLICY = """
version: 1
timezone: UTC
defaults: {default_output_cap: 4096}
workspaces:
  broke:
    budget_usd: "0.01"
    contact: "#platform-help"
    upstream: {key_env: TEST_UPSTREAM}
    teams:
      web: {contact: "web-leads@example.com"}
    services:
      codex-cli: {}
      site: {team: web}
  open:
    budget_usd: 100
    contact: "#platform-help"
    upstream: {key_env: TEST_UPSTREAM}
    services:
      limited: {key_rate_limits: {rpm: 1}}
      narrow: {routing: {allowed_models: [gpt-4o-mini]}}
"""


@pytest.fixture(scope="module")
def rstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with policy_stack(tmp_path_factory, POLICY, {"TEST_UPSTREAM": "sk-upstream"}) as s:
        yield s


def records_of(stack: Stack, workspace: str, key_id: str) -> list[UsageRecord]:
    r = redis.Redis.from_url(stack.redis_url)
    try:
        rows = r.xrange(ledger_key(workspace_prefix(workspace)))
    finally:
        r.close()
    found = [UsageRecord.FromString(f[b"r"]) for _id, f in rows]
    return [rec for rec in found if rec.key_id == key_id]


def test_codex_cli_prints_the_budget_refusal_after_one_request(
    rstack: Stack, tmp_path: Path
) -> None:
    key = new_key(rstack, "broke", "codex-cli")
    run = codex_exec(rstack, key["key"], tmp_path, timeout=180)
    output = run.stdout + run.stderr
    assert run.returncode != 0, output
    # Nothing is spent: the $0.01 budget is too small for the turn's worst case, and the
    # refusal says so rather than calling the budget exhausted.
    assert "Budget exhausted" not in output, output
    assert "This request could cost up to $" in output, output  # what, and on which model
    assert "output tokens on gpt-5.1-codex" in output, output
    assert "left of the $0.011 hard limit of workspace broke" in output  # 110% of $0.01
    assert "use a cheaper model" in output  # the way out
    assert "It resets at 20" in output  # when
    assert "#platform-help" in output  # whom to ask
    assert "Quota exceeded" not in output and "retry limit" not in output
    r = redis.Redis.from_url(rstack.redis_url)
    try:
        wait_for(r, lambda rec: rec.key_id == key["key_id"], "the refused codex request")
    finally:
        r.close()
    sent = records_of(rstack, "broke", key["key_id"])
    assert 1 <= len(sent) <= 2, [(x.status, x.outcome) for x in sent]
    assert all(x.outcome == "rejected" and x.error_code == "insufficient_quota" for x in sent)
    assert all(x.status == 400 for x in sent)


def sdk(stack: Stack, key: str) -> openai.OpenAI:
    # The SDK's default retries: a refusal must not turn into a retry storm.
    return openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=2, timeout=30)


def test_sdk_keeps_openai_semantics_with_a_readable_message(rstack: Stack) -> None:
    key = new_key(rstack, "broke", "site")
    with pytest.raises(openai.RateLimitError) as info:
        sdk(rstack, key["key"]).responses.create(model="gpt-5.1-codex", input="hi")
    assert info.value.status_code == 429
    assert info.value.code == "insufficient_quota"
    text = str(info.value)
    assert "could cost up to" in text and "resets at" in text
    assert "set max_output_tokens to" in text  # a tiny input: a smaller output cap would fit
    assert "web-leads@example.com" in text  # the team's own contact wins
    r = redis.Redis.from_url(rstack.redis_url)
    try:
        wait_for(r, lambda rec: rec.key_id == key["key_id"], "the refused sdk request")
    finally:
        r.close()
    assert len(records_of(rstack, "broke", key["key_id"])) == 1  # x-should-retry: false


def test_other_refusals_name_the_contact_and_keep_their_status(rstack: Stack) -> None:
    narrow = new_key(rstack, "open", "narrow")
    with pytest.raises(openai.PermissionDeniedError) as denied:
        openai.OpenAI(
            base_url=rstack.base_url, api_key=narrow["key"], max_retries=0
        ).with_options().responses.create(model="gpt-5.1-codex", input="hi")
    assert denied.value.code == "model_not_allowed"
    assert "#platform-help" in str(denied.value)

    limited = new_key(rstack, "open", "limited")
    client = openai.OpenAI(base_url=rstack.base_url, api_key=limited["key"], max_retries=0)
    client.responses.create(model="gpt-4o-mini", input="one")
    with pytest.raises(openai.RateLimitError) as rate:
        client.responses.create(model="gpt-4o-mini", input="two")
    assert rate.value.code == "rate_limit_exceeded"
    assert "1 requests per minute" in str(rate.value) and "#platform-help" in str(rate.value)

    # The same refusal for a client that names itself Codex: 400, same type and code.
    codexish = openai.OpenAI(
        base_url=rstack.base_url,
        api_key=narrow["key"],
        max_retries=0,
        default_headers={"originator": "codex_cli_rs"},
    )
    with pytest.raises(openai.BadRequestError) as shaped:
        codexish.responses.create(model="gpt-5.1-codex", input="hi")
    assert shaped.value.code == "model_not_allowed"
    assert shaped.value.body["type"] == "permission_error"  # type: ignore[index]
