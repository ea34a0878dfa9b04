"""End to end: Redis goes away mid-traffic and comes back.

Each workspace picks its answer to an outage: `closed` refuses with a 503 the SDKs retry,
`open` keeps serving on local books and says so in a header. Either way the sidecar must
keep answering promptly, and every settlement it could not write must reach Redis exactly
once when Redis returns (the spool is replayed; the settle script refuses duplicates).
Real Envoy, two sidecar replicas, the simulator, a real Redis stopped and restarted on the
same port and data directory (AOF on, so what was written before the outage survives).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
import redis

from extproc.devstack.stack import Stack
from extproc.store.schema import workspace_prefix
from tests.conftest import all_records, new_key, policy_stack, wait_record
from tests.e2e.test_e2e_workers import extproc_hosts

RID = "x-extproc-request-id"
REQUEST_TIMEOUT = 10.0
# Envoy gives the sidecar 5 s per ext_proc message; an answer must come well before that.
PROMPT = 4.0

POLICY = """
version: 1
timezone: UTC
defaults:
  period: month
  default_output_cap: 64
workspaces:
  shut:
    budget_usd: 1000
    on_redis_down: closed
    upstream: {key_env: TEST_UPSTREAM_KEY}
    services:
      bot: {}
  flow:
    budget_usd: 1000
    on_redis_down: open
    upstream: {key_env: TEST_UPSTREAM_KEY}
    services:
      bot: {}
"""

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture(scope="module")
def ostack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with policy_stack(
        tmp_path_factory, POLICY, {"TEST_UPSTREAM_KEY": "sk-upstream-outage"}, sidecars=2
    ) as s:
        yield s


def post(stack: Stack, key: dict, *, stream: bool = False) -> tuple[httpx.Response, float]:
    """One chat request, read to the end; returns the response and how long it took."""
    body = {**CHAT, "stream": True} if stream else CHAT
    started = time.monotonic()
    resp = httpx.post(
        f"{stack.base_url}/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key['key']}"},
        timeout=REQUEST_TIMEOUT,
    )
    return resp, time.monotonic() - started


def spent(r: redis.Redis, workspace: str) -> int:
    period = datetime.now(UTC).strftime("%Y-%m")
    return int(r.hget(f"{workspace_prefix(workspace)}:spent:{period}", "ws") or 0)


def test_outage_fails_closed_or_open_per_workspace_and_the_spool_replays(
    ostack: Stack,
) -> None:
    shut, flow, cold = (new_key(ostack, ws, "bot") for ws in ("shut", "flow", "flow"))
    before = redis.Redis.from_url(ostack.redis_url)
    try:
        for key in (shut, flow):  # until both replicas have served (and cached) both keys
            served = {addr: 0 for addr in extproc_hosts(ostack)}
            while min(served.values()) == 0:
                assert sum(served.values()) < 60, served  # Envoy picks at random: never
                counts = {a: int(h["rq_total"]) for a, h in extproc_hosts(ostack).items()}
                resp, _took = post(ostack, key)
                assert resp.status_code == 200
                wait_record(before, resp.headers[RID])
                for addr, host in extproc_hosts(ostack).items():
                    served[addr] += int(host["rq_total"]) - counts[addr]
        spent_before = spent(before, "flow")
    finally:
        before.close()

    sidecars = [c for name, c in ostack.children.items() if name.startswith("sidecar")]
    said_before = [len(c.lines) for c in sidecars]
    ostack.stop_redis()
    try:
        burst = [post(ostack, shut) for _ in range(30)]
        refused = [post(ostack, shut) for _ in range(4)]
        admitted = [post(ostack, flow) for _ in range(4)]
        streamed = [post(ostack, flow, stream=True) for _ in range(2)]
        unknown, unknown_took = post(ostack, cold)
    finally:
        ostack.restart_redis()

    for resp, took in [*refused, *admitted, *streamed, (unknown, unknown_took)]:
        assert took < PROMPT, (resp.status_code, took)
    assert {resp.status_code for resp, _took in burst} == {503}
    # 40 reservations failed on the two replicas; each said so once per workspace and error,
    # not once per request.
    said = [line for c, n in zip(sidecars, said_before, strict=True) for line in c.lines[n:]]
    unavailable = [line for line in said if "redis unavailable for" in line]
    assert 2 <= len(unavailable) <= 8, "\n".join(unavailable)
    assert sum("key lookup failed" in line for line in said) <= 2
    for resp, _took in refused:
        assert resp.status_code == 503
        error = resp.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "budget_store_unavailable")
        assert resp.headers["retry-after"] == "2"
    for resp, _took in [*admitted, *streamed]:
        assert resp.status_code == 200
        assert "budget store unavailable" in resp.headers["x-extproc-budget-warning"]
    for resp, _took in streamed:
        assert resp.text.rstrip().endswith("data: [DONE]")
    assert unknown.status_code == 503  # an uncached key cannot be checked at all
    assert unknown.json()["error"]["code"] == "budget_store_unavailable"

    after = redis.Redis.from_url(ostack.redis_url)
    try:
        records = [
            wait_record(after, resp.headers[RID], timeout=30)
            for resp, _took in [*refused, *admitted, *streamed]
        ]
        for resp, _took in [*refused, *admitted, *streamed]:
            assert len(all_records(after, resp.headers[RID])) == 1
        for record in records[: len(refused)]:
            assert (record["workspace"], record["outcome"], record["cost_nanos"]) == (
                "shut",
                "rejected",
                0,
            )
        served = records[len(refused) :]
        assert {r["workspace"] for r in served} == {"flow"}
        assert all(r["cost_nanos"] > 0 for r in served)
        assert spent(after, "flow") == spent_before + sum(r["cost_nanos"] for r in served)
        resp, _took = post(ostack, shut)  # and the closed workspace is back
        assert resp.status_code == 200
    finally:
        after.close()
