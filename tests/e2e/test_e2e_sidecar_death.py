"""End to end: a dead sidecar loses nothing, and Envoy answers like OpenAI meanwhile.

kill -9 of the sidecar in the middle of a streamed call: the client's stream breaks (its
metering is gone with the process), but the hold the sidecar made carried an estimated
settlement, and another replica bills it (`outcome: orphaned`) once the hold expires
unrenewed. While no sidecar is reachable, Envoy answers 503 in OpenAI's error shape with
retry advice instead of an empty 500. The local stack restarts a dead sidecar by itself.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import httpx
import openai
import pytest
import redis

from extproc.devstack.stack import Stack, temporary_stack
from tests.conftest import all_records, new_key, wait_record

RID = "x-extproc-request-id"
HOLD_EXPIRY_SECONDS = 2

POLICY = """
version: 1
timezone: UTC
workspaces:
  dev:
    budget_usd: 1000
    upstream: {key_env: TEST_UPSTREAM_DEV}
    services:
      cli: {}
"""


def governed_stack(tmp: pytest.TempPathFactory, *, restart: bool) -> Iterator[Stack]:
    policy = tmp.mktemp("policy") / "policy.yaml"
    policy.write_text(POLICY)
    env = {
        "EXTPROC_POLICY": str(policy),
        "TEST_UPSTREAM_DEV": "sk-upstream-dev",
        "EXTPROC_HOLD_EXPIRY_SECONDS": str(HOLD_EXPIRY_SECONDS),
    }
    with temporary_stack(sidecar_env=env, restart_sidecars=restart) as s:
        s.policy_path = policy  # type: ignore[attr-defined]
        yield s


@pytest.fixture(scope="module")
def lone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One sidecar behind Envoy, never restarted; a second replica shares only Redis."""
    yield from governed_stack(tmp_path_factory, restart=False)


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from governed_stack(tmp_path_factory, restart=True)


def slow_stream(stack: Stack, key: str) -> tuple[httpx.Client, httpx.Response]:
    """A streamed call whose events trickle in: it is still running when we look."""
    client = httpx.Client(timeout=30)
    request = client.build_request(
        "POST",
        f"{stack.base_url}/responses",
        json={"model": "gpt-5-mini", "input": "tell me a long story", "stream": True},
        headers={"authorization": f"Bearer {key}", "x-sim-fault": "event-delay-ms=300"},
    )
    resp = client.send(request, stream=True)
    assert resp.status_code == 200
    return client, resp


def test_kill_9_mid_stream_bills_the_orphaned_hold_and_envoy_answers_503(lone: Stack) -> None:
    r = redis.Redis.from_url(lone.redis_url)
    key = new_key(lone, "dev", "cli")["key"]
    # Another replica: same Redis and policy, not behind this Envoy. It reaps what the
    # killed one leaves behind.
    lone.start_sidecar("replica")
    client, resp = slow_stream(lone, key)
    rid = resp.headers[RID]
    chunks = resp.iter_bytes()  # one iterator: a dropped one would close the response
    assert b"response.created" in next(chunks)
    assert r.zcard("{ws:dev}:resv") == 1
    assert int(r.hget(f"{{ws:dev}}:held:{period(r)}", "ws") or 0) > 0

    lone.children["sidecar"].proc.send_signal(signal.SIGKILL)
    lone.children["sidecar"].proc.wait()
    with pytest.raises(httpx.HTTPError):
        b"".join(chunks)  # the metering process is gone: the stream breaks
    client.close()

    # Meanwhile Envoy refuses in OpenAI's shape, and SDKs are told to retry.
    down = httpx.post(
        f"{lone.base_url}/responses",
        json={"model": "gpt-5-mini", "input": "hi"},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert down.status_code == 503
    assert down.headers["content-type"] == "application/json"
    assert down.headers["x-should-retry"] == "true"
    assert int(down.headers["retry-after"]) >= 1
    err = down.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == "extproc_unavailable"
    sdk = openai.OpenAI(base_url=lone.base_url, api_key=key, max_retries=0, timeout=30)
    with pytest.raises(openai.InternalServerError) as info:
        sdk.responses.create(model="gpt-5-mini", input="hi")
    assert info.value.status_code == 503

    # The hold expires unrenewed; the other replica bills its estimate and releases it.
    rec = wait_record(r, rid, timeout=10 * HOLD_EXPIRY_SECONDS)
    assert rec["outcome"] == "orphaned"
    assert rec["estimated"] is True
    assert rec["workspace"] == "dev" and rec["service"] == "cli"
    assert rec["input_tokens"] == rec["counted_input_tokens"] > 0
    assert rec["cost_nanos"] > 0
    assert rec["stream"] is True
    assert len(all_records(r, rid)) == 1
    assert r.zcard("{ws:dev}:resv") == 0
    assert int(r.hget(f"{{ws:dev}}:held:{period(r)}", "ws") or 0) == 0
    assert int(r.hget(f"{{ws:dev}}:spent:{period(r)}", "ws") or 0) == rec["cost_nanos"]
    r.close()


def period(r: redis.Redis) -> str:
    (key,) = [k.decode() for k in r.keys("{ws:dev}:held:*")] or ["{ws:dev}:held:none"]
    return key.rsplit(":", 1)[1]


def test_a_live_sidecars_long_stream_is_never_orphaned(supervised: Stack) -> None:
    r = redis.Redis.from_url(supervised.redis_url)
    key = new_key(supervised, "dev", "cli")["key"]
    client, resp = slow_stream(supervised, key)
    rid = resp.headers[RID]
    # ~40 events 300 ms apart: the stream outlives its hold's expiry several times over.
    body = b"".join(resp.iter_bytes())
    client.close()
    assert b"response.completed" in body
    rec = wait_record(r, rid)
    assert rec["outcome"] == "completed"
    assert rec["estimated"] is False
    assert rec["duration_ms"] > 2 * HOLD_EXPIRY_SECONDS * 1000
    assert len(all_records(r, rid)) == 1
    r.close()


def test_the_local_stack_restarts_a_killed_sidecar(supervised: Stack) -> None:
    r = redis.Redis.from_url(supervised.redis_url)
    key = new_key(supervised, "dev", "cli")["key"]
    before = len(supervised.restarts)
    supervised.children["sidecar"].proc.send_signal(signal.SIGKILL)
    restarts = supervised.wait_restarted(before + 1)
    assert restarts[-1] == ("sidecar", "signal SIGKILL")
    sdk = openai.OpenAI(base_url=supervised.base_url, api_key=key, max_retries=0, timeout=30)
    raw = sdk.responses.with_raw_response.create(model="gpt-5-mini", input="back?")
    assert raw.http_response.status_code == 200
    assert wait_record(r, raw.headers[RID])["outcome"] == "completed"
    r.close()


def test_liveness_catches_a_hung_sidecar_not_only_a_dead_one(supervised: Stack) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from extproc.dataplane.server import LIVENESS_SERVICE

    addr = supervised.sidecar_addrs[0]
    sidecar = supervised.children["sidecar"]
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        ask = health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE)
        assert stub.Check(ask, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        sidecar.proc.send_signal(signal.SIGSTOP)  # hung: alive, but answers nothing
        try:
            with pytest.raises(grpc.RpcError) as info:
                stub.Check(ask, timeout=2)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            sidecar.proc.send_signal(signal.SIGCONT)
        assert stub.Check(ask, timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_liveness_fails_when_the_ledger_writer_dies() -> None:
    import asyncio

    from extproc.metering.ledger import Ledger

    async def main() -> tuple[bool, bool]:
        ledger = Ledger(redis_client_stub(), spool_dir="/nonexistent")
        await ledger.start()
        before = ledger.alive()
        assert ledger._task is not None
        ledger._task.cancel()  # what an escaped exception would do to the writer
        with contextlib.suppress(asyncio.CancelledError):
            await ledger._task
        return before, ledger.alive()

    assert asyncio.run(main()) == (True, False)


def redis_client_stub() -> object:
    """The writer never reaches Redis in this test: nothing is submitted."""
    return object()
