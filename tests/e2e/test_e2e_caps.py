"""End to end: priced passthrough obeys the caps, and refusals say what is true.

Real Envoy, sidecar, Redis and simulator (which answers `POST /v1/responses/compact` with
usage like OpenAI's); httpx for bursts, the real openai SDK (as itself and as a Codex-like
client naming itself in `originator`) for what a developer reads. Every claim about money is
read back from the ledger and the spend hash, never from timing:

* 200 concurrent compactions against a fresh small cap: every one gets exactly one record,
  the served ones are held before they go, and the settled spend stays under the hard limit
  plus at most one hold;
* a workspace whose spend has reached its hard limit refuses 200 concurrent compactions
  with the refusal a metered call gets, and none of them is served or billed;
* an unpriced model on a priced endpoint is refused with `allow_unpriced: false`;
* a request whose worst case does not fit what is left is told so (cost, tokens, model, the
  remainder of which limit, the output cap that would fit), and that cap does fit;
* `/extproc/v1/me` shows the scope as effectively blocked for that caller.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import redis

from extproc.devstack.stack import Stack
from extproc.metering.prices import PriceTable
from extproc.metering.worstcase import worst_case_nanos
from extproc.store.schema import WORKSPACE_SCOPE, ledger_key, spent_key, workspace_prefix
from extproc.v1.ledger_pb2 import UsageRecord
from tests.conftest import cli, new_key, policy_stack, wait_record

RID = "x-extproc-request-id"
PRICES = PriceTable.load()
CENT = 10_000_000  # nanos

POLICY = """
version: 1
timezone: UTC
defaults: {default_output_cap: 64, hard_limit: 100%}
workspaces:
  burst:
    budget_usd: "0.02"
    upstream: {key_env: TEST_UPSTREAM}
    passthrough: {output_ceiling: {responses.compact: 1000}}
    services: {bot: {}}
  spent:
    budget_usd: "0.01"
    contact: "#platform-help"
    upstream: {key_env: TEST_UPSTREAM}
    passthrough: {output_ceiling: {responses.compact: 500}}
    services: {bot: {}}
  strict:
    budget_usd: 100
    contact: "#platform-help"
    upstream: {key_env: TEST_UPSTREAM}
    services: {bot: {}}
  lenient:
    budget_usd: 100
    upstream: {key_env: TEST_UPSTREAM}
    passthrough: {allow_unpriced: true}
    services:
      bot: {}
      limited: {key_rate_limits: {rpm: 1}}
  tiny:
    budget_usd: "0.02"
    default_output_cap: 4096
    contact: "#platform-help"
    upstream: {key_env: TEST_UPSTREAM}
    services: {codex-cli: {}}
"""
HISTORY = [{"role": "user", "content": "what we discussed so far " * 20}]


@pytest.fixture(scope="module")
def cstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with policy_stack(tmp_path_factory, POLICY, {"TEST_UPSTREAM": "sk-upstream"}) as s:
        yield s


@pytest.fixture(scope="module")
def rc(cstack: Stack) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(cstack.redis_url)
    yield r
    r.close()


def ledger(r: redis.Redis, workspace: str) -> list[UsageRecord]:
    rows = r.xrange(ledger_key(workspace_prefix(workspace)))
    return [UsageRecord.FromString(f[b"r"]) for _id, f in rows]


def spent(r: redis.Redis, workspace: str, rec: UsageRecord) -> int:
    period = rec.time_ms and _period(rec.time_ms)
    raw = r.hget(spent_key(workspace_prefix(workspace), period), WORKSPACE_SCOPE)
    return int(raw or 0)


def _period(time_ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(time_ms / 1000, UTC).strftime("%Y-%m")


def burst(stack: Stack, key: str, count: int) -> list[httpx.Response]:
    body = {"model": "gpt-5-mini", "input": HISTORY}

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            return await asyncio.gather(
                *(
                    http.post(
                        f"{stack.base_url}/responses/compact",
                        json=body,
                        headers={"authorization": f"Bearer {key}"},
                    )
                    for _ in range(count)
                )
            )

    return asyncio.run(run())


def sdk(stack: Stack, key: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=30, **options)


def test_a_burst_of_priced_passthrough_is_held_against_the_cap(
    cstack: Stack, rc: redis.Redis
) -> None:
    key = new_key(cstack, "burst", "bot")
    responses = burst(cstack, key["key"], 200)
    ok = [r for r in responses if r.status_code == 200]
    denied = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(denied) == 200
    assert ok and denied  # the cap let some through and stopped the rest
    assert {r.json()["error"]["code"] for r in denied} == {"insufficient_quota"}
    for resp in responses:
        wait_record(rc, resp.headers[RID])
    records = [r for r in ledger(rc, "burst") if r.key_id == key["key_id"]]
    assert sorted(r.request_id for r in records) == sorted(r.headers[RID] for r in responses)
    served = [r for r in records if r.outcome != "rejected"]
    assert sorted(r.request_id for r in served) == sorted(r.headers[RID] for r in ok)
    assert all(r.outcome == "completed" and r.cost_nanos > 0 for r in served)
    settled = spent(rc, "burst", records[0])
    assert settled == sum(r.cost_nanos for r in served)
    # Overshoot is bounded by one hold: the largest a served call held before it went.
    hold = max(worst_case_nanos(PRICES, "gpt-5-mini", r.counted_input_tokens, 1000) for r in served)
    assert settled <= 2 * CENT + hold
    # Here every call wrote far less than its hold, so the cap itself was never passed.
    assert settled <= 2 * CENT


def test_a_workspace_at_its_hard_limit_refuses_a_burst_like_a_metered_call(
    cstack: Stack, rc: redis.Redis
) -> None:
    key = new_key(cstack, "spent", "bot")
    client = sdk(cstack, key["key"])
    # One compaction writes far more than the ceiling it was held for: it is billed in full
    # (the record is exact), and that one in-flight overshoot takes the workspace to its limit.
    first = client.responses.with_raw_response.compact(
        model="gpt-5-mini", input=HISTORY, extra_headers={"x-sim-output-tokens": "6000"}
    )
    rec = wait_record(rc, first.headers[RID])
    held = worst_case_nanos(PRICES, "gpt-5-mini", rec["counted_input_tokens"], 500)
    assert rec["cost_nanos"] > held and rec["output_tokens"] >= 6000
    before = ledger(rc, "spent")
    at_limit = spent(rc, "spent", before[-1])
    assert at_limit == rec["cost_nanos"] >= 1 * CENT  # spent reached the hard limit
    assert at_limit <= 1 * CENT + rec["cost_nanos"]  # past it by that one call, no more

    last = upstream_saw(cstack)[-1]
    responses = burst(cstack, key["key"], 200)
    assert {r.status_code for r in responses} == {429}
    assert upstream_saw(cstack)[-1] == last  # none reached the provider
    for resp in responses:
        wait_record(rc, resp.headers[RID])
    after = ledger(rc, "spent")[len(before) :]
    assert len(after) == 200
    assert all(r.outcome == "rejected" and r.cost_nanos == 0 for r in after)
    assert spent(rc, "spent", before[-1]) == at_limit  # nothing more was served or billed

    passthrough = responses[0]
    with pytest.raises(openai.RateLimitError) as metered:
        client.chat.completions.create(
            model="gpt-5-mini", messages=[{"role": "user", "content": "hi"}]
        )
    body = passthrough.json()["error"]
    assert (passthrough.status_code, body["type"], body["code"]) == (
        metered.value.status_code,
        metered.value.body["type"],  # type: ignore[index]
        metered.value.code,
    )
    assert (
        passthrough.headers["x-should-retry"]
        == metered.value.response.headers["x-should-retry"]
        == "false"
    )
    exhausted = "Budget exhausted for workspace spent: $0.01 spent of a $0.01 hard limit"
    assert body["message"].startswith(exhausted)
    assert body["message"].endswith("Whom to ask: #platform-help.")
    assert metered.value.body["message"] == body["message"]  # type: ignore[index]


def test_an_unpriced_model_on_a_priced_endpoint_is_refused_unless_allowed(
    cstack: Stack, rc: redis.Redis
) -> None:
    strict = new_key(cstack, "strict", "bot")
    with pytest.raises(openai.PermissionDeniedError) as info:
        sdk(cstack, strict["key"]).responses.compact(model="gpt-9-unlisted", input=HISTORY)
    assert info.value.code == "unpriced_model_not_allowed"
    assert "gpt-9-unlisted" in str(info.value) and "#platform-help" in str(info.value)
    request_id = info.value.response.headers[RID]
    rec = wait_record(rc, request_id)
    assert (rec["outcome"], rec["status"], rec["cost_nanos"]) == ("rejected", 403, 0)
    assert rec["model_requested"] == "gpt-9-unlisted"

    lenient = new_key(cstack, "lenient", "bot")
    served = sdk(cstack, lenient["key"]).responses.with_raw_response.compact(
        model="gpt-9-unlisted", input=HISTORY
    )
    rec = wait_record(rc, served.headers[RID])
    assert (rec["outcome"], rec["price_family"], rec["cost_nanos"]) == ("completed", "unpriced", 0)


def test_a_request_too_big_for_what_is_left_is_told_what_would_fit(
    cstack: Stack, rc: redis.Redis
) -> None:
    key = new_key(cstack, "tiny", "codex-cli")
    client = sdk(cstack, key["key"])
    turn = {"model": "gpt-5", "input": "please review this change " * 50}
    with pytest.raises(openai.RateLimitError) as info:
        client.responses.create(**turn)  # type: ignore[call-overload]
    text = str(info.value)
    assert "exhausted" not in text
    assert re.search(r"This request could cost up to \$0\.04\d* \([\d,]+ input tokens", text)
    assert "up to 4,096 output tokens on gpt-5" in text
    assert "no max_output_tokens was set, so the workspace's default_output_cap is held" in text
    assert "more than the $0.02 left of the $0.02 hard limit of workspace tiny" in text
    assert "use a cheaper model, or ask your platform team to raise the limit" in text
    assert "Whom to ask: #platform-help." in text
    fit = int(re.findall(r"set max_output_tokens to ([\d,]+) or less", text)[0].replace(",", ""))
    assert 0 < fit < 4096

    # A Codex-like client reads the same text in a 400 (the one status Codex prints at once).
    codexish = sdk(cstack, key["key"], default_headers={"originator": "codex_cli_rs"})
    with pytest.raises(openai.BadRequestError) as shaped:
        codexish.responses.create(**turn)  # type: ignore[call-overload]
    assert shaped.value.code == "insufficient_quota"
    assert f"set max_output_tokens to {fit:,} or less" in str(shaped.value)

    # The way out is true: the same turn with that cap fits and is served.
    ok = client.responses.with_raw_response.create(**turn, max_output_tokens=fit)  # type: ignore[call-overload]
    wait_record(rc, ok.headers[RID])

    me = httpx.get(
        cstack.base_url.removesuffix("/v1") + "/extproc/v1/me",
        headers={"authorization": f"Bearer {key['key']}"},
        timeout=10,
    ).json()
    ws = next(b for b in me["budgets"] if b["scope"] == WORKSPACE_SCOPE)
    typical = me["typical_request"]
    assert typical["model"] == "gpt-5" and typical["based_on"] == 3
    assert typical["output_tokens"] == 4096  # two of its three requests held the default cap
    assert int(typical["hold_nanos"]) > ws["hard_nanos"] - ws["spent_nanos"]
    assert (ws["state"], ws["effectively_blocked"], ws["typical_requests_left"]) == (
        "blocked",
        True,
        0,
    )


def test_priced_passthrough_obeys_rate_limits_and_revocation_through_its_hold(
    cstack: Stack, rc: redis.Redis
) -> None:
    limited = new_key(cstack, "lenient", "limited")
    client = sdk(cstack, limited["key"])
    client.responses.compact(model="gpt-5-mini", input=HISTORY)
    with pytest.raises(openai.RateLimitError) as rate:
        client.responses.compact(model="gpt-5-mini", input=HISTORY)
    assert rate.value.code == "rate_limit_exceeded"
    assert "1 requests per minute" in str(rate.value)
    assert int(rate.value.response.headers["retry-after"]) >= 1

    key = new_key(cstack, "lenient", "bot")
    revoked = sdk(cstack, key["key"])
    revoked.responses.compact(model="gpt-5-mini", input=HISTORY)
    cli(cstack, "keys", "revoke", key["key_id"])
    last = upstream_saw(cstack)[-1]
    # Refused by the hold's own revocation check, or (once the revocation notice reached the
    # key cache) as an unknown key: either way at once, and never forwarded.
    with pytest.raises(openai.AuthenticationError) as info:
        revoked.responses.compact(model="gpt-5-mini", input=HISTORY)
    assert info.value.code == "invalid_api_key"
    assert upstream_saw(cstack)[-1] == last


def upstream_saw(stack: Stack) -> list[dict[str, Any]]:
    """The simulator's own log of what reached it (its last 64 requests)."""
    return httpx.get(f"{stack.upstream_url}/_sim/requests", timeout=10).json()["requests"]
