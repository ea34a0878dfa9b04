"""End to end on a 3-node Redis Cluster: the sidecar, the CLI and the ledger across nodes.

The workspaces are named so that their hash tags land on three different primaries: one
ledger write batch then spans every node, which is what a cluster client has to split.
Real Envoy, two sidecar replicas, the simulator upstream, three real Redis processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import openai
import pytest
import redis

from extproc.devstack.stack import Child, Stack, start_cluster
from extproc.governance.budget import Budgets, Plan, ScopeLimit
from extproc.governance.keys import KeyCache, KeyStore
from extproc.governance.periods import period_at
from extproc.metering.ledger import Ledger
from extproc.store.clients import UNAVAILABLE, make_client, make_sync_client, parse_cluster_url
from extproc.store.schema import LEDGERS, ledger_key, workspace_prefix
from extproc.v1.ledger_pb2 import ScopeCharge, Settlement, UsageRecord
from tests.conftest import cli, new_key, policy_stack

RID = "x-extproc-request-id"
WORKSPACES = ("ops", "dev", "burst")  # {ws:ops}, {ws:dev}, {ws:burst}: three slot ranges

POLICY = """
version: 1
timezone: UTC
defaults:
  period: month
  default_output_cap: 64
workspaces:
  ops:
    budget_usd: 1000
    upstream: {key_env: TEST_UPSTREAM_KEY}
    services:
      cli: {}
  dev:
    budget_usd: 1000
    upstream: {key_env: TEST_UPSTREAM_KEY}
    services:
      cli: {}
  burst:
    budget_usd: "0.000348"
    upstream: {key_env: TEST_UPSTREAM_KEY}
    services:
      bot: {}
"""

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture(scope="module")
def cstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with policy_stack(
        tmp_path_factory,
        POLICY,
        {"TEST_UPSTREAM_KEY": "sk-upstream-cluster"},
        sidecars=2,
        redis_cluster_nodes=3,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def rc(cstack: Stack) -> Iterator[redis.RedisCluster]:
    r = make_sync_client(cstack.redis_url, socket_timeout=30)
    assert isinstance(r, redis.RedisCluster)
    yield r
    r.close()


def auth(key: dict) -> dict[str, str]:
    return {"authorization": f"Bearer {key['key']}"}


def ledger_records(r: redis.RedisCluster, workspace: str) -> list[UsageRecord]:
    stream = ledger_key(workspace_prefix(workspace))
    return [UsageRecord.FromString(fields[b"r"]) for _id, fields in r.xrange(stream)]


def wait_ledger(
    r: redis.RedisCluster, workspace: str, request_id: str, timeout: float = 15.0
) -> UsageRecord:
    """Block on one workspace's ledger (one stream, one slot: an XREAD a cluster accepts)."""
    stream = ledger_key(workspace_prefix(workspace))
    deadline = time.monotonic() + timeout
    last: bytes | str = "0"
    while (left := deadline - time.monotonic()) > 0:
        for _stream, entries in r.xread({stream: last}, block=max(1, int(left * 1000))) or []:
            for entry_id, fields in entries:
                record = UsageRecord.FromString(fields[b"r"])
                if record.request_id == request_id:
                    return record
                last = entry_id
    raise AssertionError(f"no ledger record for {request_id} in {workspace} within {timeout}s")


def period() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def test_workspaces_live_on_three_different_primaries(
    cstack: Stack, rc: redis.RedisCluster
) -> None:
    cluster = parse_cluster_url(cstack.redis_url)
    assert cluster is not None and len(cluster.nodes) == 3
    assert len(rc.get_primaries()) == 3
    owners = {rc.get_node_from_key(workspace_prefix(ws)).name for ws in WORKSPACES}
    assert len(owners) == 3


def test_traffic_to_every_node_is_billed_once_where_its_slot_lives(
    cstack: Stack, rc: redis.RedisCluster
) -> None:
    keys = {ws: new_key(cstack, ws, "cli") for ws in ("ops", "dev")}

    async def traffic() -> list[tuple[str, httpx.Response]]:
        async with httpx.AsyncClient(timeout=30) as http:
            plan = [ws for _ in range(6) for ws in keys]
            responses = await asyncio.gather(
                *(
                    http.post(
                        f"{cstack.base_url}/chat/completions", json=CHAT, headers=auth(keys[ws])
                    )
                    for ws in plan
                )
            )
        return list(zip(plan, responses, strict=True))

    sent = asyncio.run(traffic())
    assert [r.status_code for _ws, r in sent] == [200] * len(sent)
    for ws, resp in sent:
        assert resp.headers["x-extproc-workspace"] == ws
        record = wait_ledger(rc, ws, resp.headers[RID])
        assert record.key_id == keys[ws]["key_id"]
        assert record.cost_nanos > 0

    assert {ledger_key(workspace_prefix(ws)).encode() for ws in keys} <= rc.smembers(LEDGERS)
    for ws, key in keys.items():
        node = rc.get_node_from_key(workspace_prefix(ws))
        direct = redis.Redis(host=node.host, port=node.port)
        try:
            stream = ledger_key(workspace_prefix(ws))
            on_node = [UsageRecord.FromString(f[b"r"]) for _id, f in direct.xrange(stream)]
            spent = direct.hget(f"{workspace_prefix(ws)}:spent:{period()}", f"key:{key['key_id']}")
        finally:
            direct.close()
        mine = [rec for rec in on_node if rec.key_id == key["key_id"]]
        ids = sorted(rec.request_id for rec in mine)
        assert ids == sorted(r.headers[RID] for w, r in sent if w == ws)
        assert int(spent) == sum(rec.cost_nanos for rec in mine) > 0


def test_burst_never_settles_past_the_hard_cap(cstack: Stack, rc: redis.RedisCluster) -> None:
    key = new_key(cstack, "burst", "bot")

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            return await asyncio.gather(
                *(
                    http.post(f"{cstack.base_url}/chat/completions", json=CHAT, headers=auth(key))
                    for _ in range(80)
                )
            )

    responses = asyncio.run(burst())
    ok = [r for r in responses if r.status_code == 200]
    denied = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(denied) == 80
    assert 5 <= len(ok) <= 40
    assert denied[0].json()["error"]["code"] == "insufficient_quota"
    for r in ok:
        wait_ledger(rc, "burst", r.headers[RID])
    records = [r for r in ledger_records(rc, "burst") if r.outcome != "rejected"]
    assert sorted(r.request_id for r in records) == sorted(r.headers[RID] for r in ok)
    settled = int(rc.hget(f"{workspace_prefix('burst')}:spent:{period()}", "ws"))
    assert settled == sum(r.cost_nanos for r in records)
    assert settled <= 348_000


def test_revocation_reaches_every_replica(cstack: Stack) -> None:
    key = new_key(cstack, "dev", "cli")
    client = openai.OpenAI(base_url=cstack.base_url, api_key=key["key"], max_retries=0, timeout=30)
    for _ in range(4):  # warm both replicas' caches (round robin)
        client.chat.completions.create(**CHAT)
    cli(cstack, "keys", "revoke", key["key_id"])
    for _ in range(4):
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(**CHAT)


def test_change_notices_cross_nodes_to_every_cache(cstack: Stack) -> None:
    # A rotation with no overlap expires the old key at once, and only the change notice
    # (published on the keys' node, subscribed on any node) can tell a cache that already
    # holds the key; without it the cached entry would keep working for a minute.
    key = new_key(cstack, "ops", "cli")
    for _ in range(4):
        resp = httpx.post(
            f"{cstack.base_url}/chat/completions", json=CHAT, headers=auth(key), timeout=30
        )
        assert resp.status_code == 200
    cli(cstack, "keys", "rotate", key["key_id"], "--overlap", "0s")
    deadline = time.monotonic() + 10
    statuses: list[int] = []
    while statuses[-4:] != [401] * 4 and time.monotonic() < deadline:
        statuses.append(
            httpx.post(
                f"{cstack.base_url}/chat/completions", json=CHAT, headers=auth(key), timeout=30
            ).status_code
        )
    assert statuses[-4:] == [401] * 4, statuses


def test_cli_reads_the_cluster(cstack: Stack, rc: redis.RedisCluster) -> None:
    created = new_key(cstack, "ops", "cli")
    resp = httpx.post(
        f"{cstack.base_url}/chat/completions", json=CHAT, headers=auth(created), timeout=30
    )
    assert resp.status_code == 200
    wait_ledger(rc, "ops", resp.headers[RID])
    listed = json.loads(cli(cstack, "keys", "list", "--json").stdout)
    assert created["key_id"] in {k["key_id"] for k in listed}
    assert {k["workspace"] for k in listed} <= set(WORKSPACES)
    text = cli(cstack, "keys", "list", "--workspace", "ops").stdout
    assert created["key_id"] in text
    total = sum(rc.xlen(stream) for stream in rc.smembers(LEDGERS))
    rows = json.loads(cli(cstack, "usage", "--json", "--limit", "1000").stdout)
    assert len(rows) == total
    assert {r["workspace"] for r in rows} >= {"ops", "dev", "burst"}
    assert rows[0]["request_id"] == resp.headers[RID]


def _settlement(workspace: str, request_id: str) -> Settlement:
    record = UsageRecord(request_id=request_id, workspace=workspace, cost_nanos=1_000)
    return Settlement(
        prefix=workspace_prefix(workspace),
        period=period(),
        day="d",
        hour="h",
        scopes=[ScopeCharge(scope="ws", soft_nanos=-1)],
        record=record,
    )


def _plan(workspace: str) -> Plan:
    now = int(time.time() * 1000)
    scope = ScopeLimit("ws", f"workspace {workspace}", 10**9, None, 10**9)
    return Plan(
        workspace=workspace,
        prefix=workspace_prefix(workspace),
        period=period_at("month", now, ZoneInfo("UTC")),
        key_id="key_outage",
        scopes=(scope,),
        rates=(),
        reserve_nanos=1_000,
        tokens=10,
    )


async def _await_ledger(client: object, workspace: str, request_id: str) -> None:
    deadline = time.monotonic() + 45
    stream = ledger_key(workspace_prefix(workspace))
    while time.monotonic() < deadline:
        with contextlib.suppress(*UNAVAILABLE):
            rows = await client.xread({stream: "0"}, block=500)  # type: ignore[attr-defined]
            for _stream, entries in rows or []:
                if any(
                    UsageRecord.FromString(f[b"r"]).request_id == request_id for _i, f in entries
                ):
                    return
    raise AssertionError(f"{request_id} never reached {workspace}'s ledger")


async def _ride_out(nodes: list[Child], url: str, spool: Path) -> None:
    """Stop every node, check each component copes, restart them (appended to `nodes`)."""
    client = make_client(url, socket_connect_timeout=1.0, socket_timeout=2.0)
    ledger = Ledger(client, spool_dir=spool, retry_seconds=0.2)
    cache = KeyCache(KeyStore(client), ping_seconds=1.0)
    listener = asyncio.create_task(cache.run())
    await ledger.start()
    try:
        await asyncio.wait_for(cache.ready.wait(), 30)
        for node in nodes:
            node.stop()
        resubscribed = cache.next_change()
        for ws in ("ops", "dev", "burst"):  # one settlement per node
            ledger.submit(_settlement(ws, f"during-{ws}"))
        await asyncio.wait_for(ledger.drain(), 30)  # hangs if the writer task died
        assert ledger.spooled == 3
        budgets = Budgets(client)
        assert (await budgets.reserve(_plan("ops"), False, int(time.time() * 1000))).reason == (
            "redis_down"
        )
        local = await budgets.reserve(_plan("ops"), True, int(time.time() * 1000))
        assert (local.allowed, local.reason) == (True, "ok_local")

        for node in list(nodes):
            nodes.append(Child(node.name, node.argv))
            nodes[-1].wait_for_line("Ready to accept connections")
        for ws in ("ops", "dev", "burst"):
            await _await_ledger(client, ws, f"during-{ws}")
        await asyncio.wait_for(resubscribed, 45)
        assert not listener.done() and ledger.spooled == 3
    finally:
        listener.cancel()
        with contextlib.suppress(TimeoutError):  # a dead writer never drains
            await asyncio.wait_for(ledger.close(), 5)
        await client.aclose()


def test_a_whole_cluster_outage_is_ridden_out(tmp_path: Path) -> None:
    # A cluster with no reachable node raises RedisClusterException, not a RedisError: the
    # ledger writer, the budget check and the key listener must all treat it as "away".
    nodes, url = start_cluster(tmp_path / "cluster")
    try:
        asyncio.run(_ride_out(nodes, url, tmp_path / "spool"))
    finally:
        for node in nodes:
            node.stop()
