"""End to end with two sidecar worker processes (and two Envoy threads).

Each worker is an endpoint of its own in Envoy's cluster (its own port), and they share
one port for probes. They share nothing but Redis, so what must hold is what holds for
one process: every request metered exactly, once. On top: both Envoy threads' streams
reach both workers, a worker that dies is replaced while the other keeps serving, and
SIGTERM to the supervisor drains in-flight streams in every worker before it exits.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import redis

from extproc.devstack.stack import Stack, temporary_stack
from tests.conftest import (
    METERING_ONLY,
    SLOW_STREAM,
    SLOW_STREAM_HEADERS,
    all_records,
    wait_record,
)
from tests.e2e.test_e2e_metering import RID, assert_exact, chat_usage

WORKERS = 2


def worker_pids(stack: Stack) -> list[int]:
    parent = stack.children["sidecar"].proc.pid
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return sorted(int(pid) for pid in children)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with temporary_stack(
        sidecar_workers=WORKERS, envoy_concurrency=WORKERS, sidecar_env=METERING_ONLY
    ) as s:
        yield s


@pytest.fixture(scope="module")
def r(stack: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis_url)
    yield client
    client.close()


def one_request(stack: Stack, i: int, retries: int = 0) -> tuple[str, str, object]:
    client = openai.OpenAI(
        base_url=stack.base_url, api_key="sk-test", max_retries=retries, timeout=30
    )
    model = "gpt-4o-mini"
    messages = [{"role": "user", "content": f"request {i}: say something"}]
    if i % 2:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(raw.parse())
        usage = chunks[-1].usage
    else:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages)  # type: ignore[arg-type]
        usage = raw.parse().usage
    return raw.headers[RID], model, usage


def test_two_workers_meter_every_request_exactly_once(stack: Stack, r: redis.Redis) -> None:
    assert len(worker_pids(stack)) == WORKERS
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: one_request(stack, i), range(40)))
    assert len({rid for rid, _m, _u in results}) == 40
    for rid, model, usage in results:
        assert_exact(wait_record(r, rid), model, chat_usage(usage))
        assert len(all_records(r, rid)) == 1


def extproc_hosts(stack: Stack) -> dict[str, dict[str, object]]:
    """Envoy's view of its `extproc` cluster, by endpoint: health and request counters."""
    url = f"http://127.0.0.1:{stack.admin_port}/clusters?format=json"
    clusters = httpx.get(url, timeout=10).json()["cluster_statuses"]
    (cluster,) = [c for c in clusters if c["name"] == "extproc"]
    hosts = {}
    for host in cluster["host_statuses"]:
        sock = host["address"]["socket_address"]
        stats = {st["name"]: int(st.get("value", 0)) for st in host["stats"]}
        hosts[f"{sock['address']}:{sock['port_value']}"] = {
            "healthy": host["health_status"].get("eds_health_status") == "HEALTHY"
            and not host["health_status"].get("failed_active_health_check", False),
            **stats,
        }
    return hosts


def test_every_worker_is_an_endpoint_and_both_envoy_threads_reach_both(
    stack: Stack, r: redis.Redis
) -> None:
    """Streams are balanced per request over the workers' own ports: the kernel's random
    spreading of Envoy's two connections (one per thread) can leave a worker idle."""
    shared = stack.config.sidecar_port
    hosts = extproc_hosts(stack)
    assert len(hosts) == WORKERS and stack.sidecar_addrs == sorted(hosts)
    assert all(h["healthy"] for h in hosts.values()), hosts
    ready = [line for line in stack.children["sidecar"].lines if ") ready on " in line]
    assert {line.rsplit(" on ", 1)[1] for line in ready} >= set(hosts)
    assert shared is None or f"127.0.0.1:{shared}" not in hosts
    before = {addr: h["rq_total"] for addr, h in hosts.items()}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: one_request(stack, i), range(300, 380)))
    after = extproc_hosts(stack)
    served = {addr: int(after[addr]["rq_total"]) - int(n) for addr, n in before.items()}  # type: ignore[call-overload]
    # Streams only (health checks are not counted): each worker took a real share of 80.
    assert all(n >= 16 for n in served.values()), served
    assert all(int(h["cx_active"]) >= 1 for h in after.values()), after  # type: ignore[call-overload]
    for rid, model, usage in results:
        assert_exact(wait_record(r, rid), model, chat_usage(usage))
        assert len(all_records(r, rid)) == 1


def test_a_dead_worker_is_replaced_and_traffic_goes_on(stack: Stack, r: redis.Redis) -> None:
    before = worker_pids(stack)
    sidecar = stack.children["sidecar"]
    seen = len(sidecar.lines)
    os.kill(before[0], signal.SIGKILL)
    sidecar.wait_for_line("exited with -9")
    assert any("restarting" in line for line in sidecar.lines[seen:])
    # While it is down its port refuses, and Envoy sends the streams to the other worker
    # (a client retrying Envoy's 503, as the SDKs do, at worst once).
    for i in range(6):
        rid, model, usage = one_request(stack, 150 + i, retries=2)
        assert_exact(wait_record(r, rid), model, chat_usage(usage))
    sidecar.wait_for_line(f"extproc worker 0 (pid {_next_pid(stack, before)}) ready")
    after = worker_pids(stack)
    assert len(after) == WORKERS and before[0] not in after and before[1] in after
    for i in range(6):
        rid, model, usage = one_request(stack, 100 + i)
        assert_exact(wait_record(r, rid), model, chat_usage(usage))


def test_a_hung_worker_is_found_and_replaced() -> None:
    """A worker whose event loop stops (SIGSTOP: it neither dies nor answers) is killed and
    replaced by the supervisor: a health probe through the shared port could not find it."""
    env = {**METERING_ONLY, "EXTPROC_WORKER_HANG_SECONDS": "3"}
    with temporary_stack(
        sidecar_workers=WORKERS, envoy_concurrency=WORKERS, sidecar_env=env
    ) as stack:
        before = worker_pids(stack)
        sidecar = stack.children["sidecar"]
        os.kill(before[0], signal.SIGSTOP)
        sidecar.wait_for_line(f"(pid {before[0]}) sent no heartbeat for")
        sidecar.wait_for_line("exited with -9")
        fresh = _next_pid(stack, before)
        sidecar.wait_for_line(f"(pid {fresh}) ready")
        after = worker_pids(stack)
        assert len(after) == WORKERS and before[0] not in after and before[1] in after
        # The healthy worker was left alone, and traffic goes on through both.
        assert not any(f"(pid {before[1]}) sent no heartbeat" in line for line in sidecar.lines)
        client = redis.Redis.from_url(stack.redis_url)
        try:
            for i in range(6):
                rid, model, usage = one_request(stack, 200 + i)
                assert_exact(wait_record(client, rid), model, chat_usage(usage))
        finally:
            client.close()


def _next_pid(stack: Stack, before: list[int]) -> int:
    """The replacement's pid, once the supervisor has forked it."""
    for _ in range(600):
        fresh = [pid for pid in worker_pids(stack) if pid not in before]
        if fresh:
            return fresh[0]
        threading.Event().wait(0.05)  # polling the process table for the new child
    raise AssertionError("no replacement worker was started")


def test_sigterm_drains_every_worker() -> None:
    with temporary_stack(
        sidecar_workers=WORKERS, envoy_concurrency=WORKERS, sidecar_env=METERING_ONLY
    ) as stack:
        sidecar = stack.children["sidecar"]
        workers = worker_pids(stack)
        first_events = threading.Semaphore(0)
        done: list[tuple[dict[str, str], list[str]]] = []

        def stream() -> None:
            body, hdrs = SLOW_STREAM, SLOW_STREAM_HEADERS
            lines: list[str] = []
            url = f"{stack.base_url}/chat/completions"
            with httpx.stream("POST", url, json=body, headers=hdrs, timeout=30) as resp:
                for line in resp.iter_lines():
                    lines.append(line)
                    if len(lines) == 1:
                        first_events.release()
                done.append((dict(resp.headers), lines))

        clients = [threading.Thread(target=stream) for _ in range(6)]
        for client in clients:
            client.start()
        for _ in clients:
            assert first_events.acquire(timeout=15)
        sidecar.proc.send_signal(signal.SIGTERM)  # the supervisor only: it forwards
        for client in clients:
            client.join(30)
            assert not client.is_alive()
        assert sidecar.proc.wait(30) == 0
        assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
        assert len(done) == 6
        r = redis.Redis.from_url(stack.redis_url)
        try:
            for headers, lines in done:
                assert [line for line in lines if line][-1] == "data: [DONE]"
                rec = wait_record(r, headers[RID])
                assert rec["outcome"] == "completed" and rec["estimated"] is False
                assert rec["output_tokens"] == 20
        finally:
            r.close()
