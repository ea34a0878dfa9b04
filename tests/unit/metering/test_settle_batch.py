"""One settle call per workspace and loop turn: the same effects as one call per request.

The ledger writer sends each workspace's settlements in calls of at most `SETTLE_MAX`. What
must hold is that batching changes nothing Redis ends up with: the same records in the same
order, the same money in every counter, holds released, duplicates refused, soft limits
reported once, prompt-cache counters and key expiries alike. The oracle is the same
production path with one settlement per call. Everything runs against a real server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from extproc.governance.budget import Budgets, plan_request
from extproc.governance.keys import Identity
from extproc.governance.policy import parse_policy_text
from extproc.metering import ledger as ledger_module
from extproc.metering.ledger import SEEN_BUCKET_MS, Ledger, Spool
from extproc.metering.prices import PriceTable
from extproc.metering.settlement import CachePrefix, Charged, settlement_for
from extproc.store.clients import make_client
from extproc.store.schema import UNMETERED, ledger_key, workspace_prefix
from extproc.v1.ledger_pb2 import Settlement, UsageRecord

PRICES = PriceTable.load()
POLICY = parse_policy_text(
    """
version: 1
timezone: UTC
defaults: {soft_limit: 50%, hard_limit: 100%}
workspaces:
  dev:
    budget_usd: "0.008"
    upstream: {key_env: TEST_UPSTREAM}
    teams:
      web: {budget_usd: "0.004"}
    services:
      cli: {team: web}
      bot: {}
  ci:
    budget_usd: 10
    upstream: {key_env: TEST_UPSTREAM}
    services:
      runner: {}
"""
)
NOW = int(datetime(2026, 11, 30, 23, 59, 30, tzinfo=UTC).timestamp() * 1000)


def who(workspace: str, service: str, key: str = "key_a") -> Identity:
    return Identity(key, workspace, None, service, None, 0)


def settlement(
    workspace: str,
    service: str,
    request_id: str,
    cost: int,
    *,
    at_ms: int = NOW,
    reservation: str = "",
    cached: int = 0,
    prefix: CachePrefix | None = None,
    session: str = "",
) -> Settlement:
    identity = who(workspace, service)
    plan = plan_request(
        POLICY, identity, model="gpt-4o-mini", counted_input=10, output_cap=10, prices=PRICES,
        now_ms=at_ms,
    )  # fmt: skip
    record = UsageRecord(
        request_id=request_id, time_ms=at_ms, cost_nanos=cost, workspace=workspace,
        service=service, key_id=identity.key_id, model_served="gpt-4o-mini",
        input_tokens=1200, cached_input_tokens=cached, session_id=session,
    )  # fmt: skip
    return settlement_for(
        record,
        [Charged(s.scope, s.soft_nanos) for s in plan.scopes],
        period_id=plan.period.id,
        local_time=datetime.fromtimestamp(at_ms / 1000, UTC),
        prices=PRICES,
        reservation_id=reservation,
        attributed=True,
        prefix=plan.prefix,
        cache_prefix=prefix,
    )


def scenario(budgets: Budgets) -> Awaitable[list[Settlement]]:
    """Settlements of two workspaces over a month's end (two periods, days, hours), with
    holds to release, a repeat inside the batch and one of something already settled,
    scopes crossing their soft limits mid-batch, and prompt prefixes seen before, within
    the batch and never."""

    async def make() -> list[Settlement]:
        out = []
        for i in range(12):
            service = ("cli", "bot")[i % 2]
            at = NOW + i * 5_000  # the last ones fall in December
            p = plan_request(
                POLICY, who("dev", service), model="gpt-4o-mini", counted_input=10,
                output_cap=10, prices=PRICES, now_ms=at,
            )  # fmt: skip
            held = await budgets.reserve(p, False, at)
            assert held.allowed
            fp = CachePrefix(f"fp{i % 3}", 1000) if i % 4 else None
            out.append(
                settlement(
                    "dev",
                    service,
                    f"d{i}",
                    700_000 + 1_000 * i,
                    at_ms=at,
                    reservation=held.reservation_id,
                    cached=300 * (i % 2),
                    prefix=fp,
                    session=f"s{i % 2}",
                )
            )
        out.insert(5, out[2])  # a repeat inside the batch
        out.append(settlement("dev", "cli", "old", 5_000))  # settled before: a duplicate
        out += [settlement("ci", "runner", f"c{i}", 9_000 + i) for i in range(4)]
        return out

    return make()


def snapshot(r: redis.Redis) -> dict[str, Any]:
    """Every key's value (streams as their records, in order) and whether it expires."""
    out: dict[str, Any] = {}
    for raw in r.scan_iter(count=1000):
        key = raw.decode()
        kind = r.type(raw).decode()
        if kind == "hash":
            value: Any = {k.decode(): v.decode() for k, v in r.hgetall(raw).items()}
        elif kind == "set":
            value = sorted(m.decode() for m in r.smembers(raw))
        elif kind == "zset":
            value = r.zcard(raw)  # reservations: ids are random; all gone is what matters
        elif kind == "stream":
            value = [UsageRecord.FromString(f[b"r"]).request_id for _i, f in r.xrange(raw)]
        else:
            value = r.get(raw)
        out[key] = (kind, value, r.ttl(raw) > 0)
    return out


def run_ledger(
    redis_url: str, spool: Path, body: Callable[[Budgets, Ledger], Awaitable[Any]], **kw: Any
) -> Any:
    async def main() -> Any:
        client = make_client(redis_url)
        ledger = Ledger(client, spool_dir=spool, **kw)
        await ledger.start()
        try:
            return await body(Budgets(client), ledger)
        finally:
            await ledger.close()
            await client.aclose()

    return asyncio.run(main())


def settle_all(
    redis_url: str, tmp_path: Path, alerts: list[tuple[str, list[str]]]
) -> tuple[int, list[Settlement]]:
    async def body(budgets: Budgets, ledger: Ledger) -> tuple[int, list[Settlement]]:
        ledger.submit(settlement("dev", "cli", "old", 5_000))
        await ledger.drain()
        batch = await scenario(budgets)
        for s in batch:  # submitted together: the writer takes them in one turn
            ledger.submit(s)
        await ledger.drain()
        return ledger.written, batch

    return run_ledger(  # type: ignore[no-any-return]
        redis_url, tmp_path, body, on_soft_alert=lambda ws, scopes: alerts.append((ws, scopes))
    )


def test_a_batch_has_the_effects_of_settling_each_on_its_own(
    r: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_by_one: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(ledger_module, "SETTLE_MAX", 1)
    written_one, batch = settle_all(redis_url, tmp_path / "one", one_by_one)
    expected = snapshot(r)
    r.flushall()
    monkeypatch.setattr(ledger_module, "SETTLE_MAX", 64)
    batched: list[tuple[str, list[str]]] = []
    written_batched, _ = settle_all(redis_url, tmp_path / "batched", batched)
    assert snapshot(r) == expected
    assert written_one == written_batched == len(batch) - 2 + 1  # 2 duplicates; "old" first
    # The same soft limits reported, once each (order aside: a batch reports per call).
    assert sorted((ws, s) for ws, scopes in one_by_one for s in scopes) == sorted(
        (ws, s) for ws, scopes in batched for s in scopes
    )
    # November's and December's: each period's soft limit is reported in that period.
    assert sorted(s for _ws, scopes in batched for s in scopes) == [
        "team:web",
        "team:web",
        "ws",
        "ws",
    ]
    # What it all came to, spelled out once.
    nov, dec = "{ws:dev}:spent:2026-11", "{ws:dev}:spent:2026-12"
    ids = [s.record.request_id for s in batch if s.record.workspace == "dev"]
    assert expected["{ws:dev}:ledger"][1] == ["old", *dict.fromkeys(x for x in ids if x != "old")]
    costs = {s.record.request_id: s.record.cost_nanos for s in batch}
    in_nov = [f"d{i}" for i in range(12) if NOW + i * 5_000 < NOW + 30_000]
    assert int(expected[nov][1]["ws"]) == 5_000 + sum(costs[x] for x in in_nov)
    assert int(expected[dec][1]["ws"]) == sum(costs[f"d{i}"] for i in range(12)) - sum(
        costs[x] for x in in_nov
    )
    assert all(v == "0" for k, v in expected["{ws:dev}:held:2026-11"][1].items())
    assert "{ws:dev}:resv" not in expected and "{ws:dev}:resv:data" not in expected
    assert expected["{ws:dev}:day:2026-12-01"][2] and expected["{ws:dev}:hour:2026-12-01T00"][2]


def test_a_workspaces_settlements_go_in_calls_of_at_most_settle_max(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    many = [settlement("ci", "runner", f"c{i}", 1_000 + i) for i in range(100)]
    few = [settlement("dev", "bot", f"d{i}", 2_000 + i) for i in range(5)]

    async def body(_budgets: Budgets, ledger: Ledger) -> int:
        ledger.submit(few[0])  # scripts loaded, ledgers registered: count only the batch
        await ledger.drain()
        r.config_resetstat()
        for s in many + few[1:]:
            ledger.submit(s)
        await ledger.drain()
        return ledger.written

    assert run_ledger(redis_url, tmp_path, body) == 105
    calls = r.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert calls == -(-100 // ledger_module.SETTLE_MAX) + 1 == 5
    stream = ledger_key(workspace_prefix("ci"))
    assert [UsageRecord.FromString(f[b"r"]).request_id for _i, f in r.xrange(stream)] == [
        s.record.request_id for s in many
    ]
    assert int(r.hget("{ws:ci}:spent:2026-11", "ws") or 0) == sum(s.record.cost_nanos for s in many)


def test_a_settlement_redis_refuses_is_split_out_spooled_and_replayed(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """One settlement Redis refuses (its idempotency set is not a set: a damaged key) fails
    its call before anything is written; the writer splits the call and retries, the other
    nine land exactly once, and the refused one waits in the spool until Redis takes it."""
    later = NOW - 120_000  # another minute, so another idempotency set
    poisoned = f"{workspace_prefix('ci')}:seen:{later // SEEN_BUCKET_MS}"
    r.set(poisoned, "not a set")
    batch = [settlement("ci", "runner", f"c{i}", 1_000 + i) for i in range(10)]
    batch[6] = settlement("ci", "runner", "c6", 1_006, at_ms=later)
    spool = tmp_path / "spool"

    async def body(_budgets: Budgets, ledger: Ledger) -> list[int]:
        for s in batch:
            ledger.submit(s)
        await ledger.drain()
        first = [ledger.written, ledger.spooled]
        assert Spool(spool).read() == [batch[6]]
        r.delete(poisoned)  # the operator repairs the key; the writer's replay gets it in
        deadline = asyncio.get_running_loop().time() + 15
        while Spool(spool).read():
            assert asyncio.get_running_loop().time() < deadline, "spool never replayed"
            await asyncio.sleep(0.05)  # polling the spool file, not synchronising on time
        return first

    assert run_ledger(redis_url, spool, body, retry_seconds=0.05) == [9, 1]
    stream = ledger_key(workspace_prefix("ci"))
    ids = [UsageRecord.FromString(f[b"r"]).request_id for _i, f in r.xrange(stream)]
    assert sorted(ids) == sorted(s.record.request_id for s in batch) and len(ids) == 10
    assert int(r.hget("{ws:ci}:spent:2026-11", "ws") or 0) == sum(
        s.record.cost_nanos for s in batch
    )


def test_one_call_reports_duplicates_and_refuses_a_batch_that_does_not_fit(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    from extproc.store.scripts import SETTLE

    items = [settlement("ci", "runner", f"x{i}", 10) for i in range(3)]
    ledger = Ledger(None, spool_dir=tmp_path)  # type: ignore[arg-type]

    async def call(args: list[Any]) -> Any:
        client = make_client(redis_url)
        try:
            return await SETTLE(client, [workspace_prefix("ci")], args)
        finally:
            await client.aclose()

    first = asyncio.run(call(ledger.settle_args([items[0], items[1], items[0]])))
    assert first == [b"110"]
    again = asyncio.run(call(ledger.settle_args(items)))
    assert again == [b"001"]
    short = ledger.settle_args(items)[:-1]
    with pytest.raises(redis.exceptions.ResponseError, match="do not fit"):
        asyncio.run(call(short))
    stream = ledger_key(workspace_prefix("ci"))
    assert r.xlen(stream) == 3


def test_the_writer_builds_deferred_settlements_in_order_and_skips_one_that_fails(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """`submit_later`: what a handler hands over is built by the writer, in submission order
    with the ready ones; a builder that raises is logged and skipped, the others land once.
    With nothing submitted, the writer's tick still flushes the counts."""
    batch = [settlement("ci", "runner", f"d{i}", 2_000 + i) for i in range(4)]
    built: list[str] = []

    def later(s: Settlement) -> Callable[[], Settlement]:
        def build() -> Settlement:
            built.append(s.record.request_id)
            return s

        return build

    def broken() -> Settlement:
        raise RuntimeError("a bug in building one settlement")

    async def body(_budgets: Budgets, ledger: Ledger) -> int:
        ledger.submit(batch[0])
        ledger.submit_later(later(batch[1]))
        ledger.submit_later(broken)
        ledger.submit(batch[2])
        ledger.submit_later(later(batch[3]))
        await ledger.drain()
        assert built == ["d1", "d3"]
        ledger.note_unmetered("/v1/other")
        deadline = asyncio.get_running_loop().time() + 15
        while not r.hget(UNMETERED, "/v1/other"):
            assert asyncio.get_running_loop().time() < deadline, "counts never flushed"
            await asyncio.sleep(0.02)  # polling Redis, not synchronising on time
        return ledger.written

    assert run_ledger(redis_url, tmp_path / "spool", body, retry_seconds=0.05) == 4
    stream = ledger_key(workspace_prefix("ci"))
    ids = [UsageRecord.FromString(f[b"r"]).request_id for _i, f in r.xrange(stream)]
    assert ids == ["d0", "d1", "d2", "d3"]


def test_leased_settlements_wait_for_company_and_one_that_may_not_wait_sends_them_all(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """Settlements nobody waits for (`may_wait`: leased requests') are gathered into one
    settle call; a settlement that may not wait (an exact hold's) ends the gathering at
    once, however long it was allowed to last, and everything goes in one call."""
    warm = settlement("ci", "runner", "warm", 1)
    batch = [settlement("ci", "runner", f"g{i}", 3_000 + i) for i in range(4)]

    def calls() -> int:
        return int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    async def body(_budgets: Budgets, ledger: Ledger) -> int:
        loop = asyncio.get_running_loop()
        ledger.submit(warm)  # the script loaded, the ledger registered
        await ledger.drain()
        before = calls()
        ledger.submit_later(lambda: batch[0], may_wait=True)
        for _ in range(100):  # let the writer take it and start gathering
            if ledger._gathering:
                break
            await asyncio.sleep(0)
        assert ledger._gathering
        ledger.submit_later(lambda: batch[1], may_wait=True)
        ledger.submit_later(lambda: batch[2], may_wait=True)
        assert ledger._gathering  # still gathering: nothing woke it
        started = loop.time()
        ledger.submit_later(lambda: batch[3])
        await ledger.drain()
        assert loop.time() - started < 30  # woken by the last one, not by the clock
        assert calls() - before == 1
        return ledger.written

    assert run_ledger(redis_url, tmp_path / "spool", body, gather_seconds=60.0) == 5
    stream = ledger_key(workspace_prefix("ci"))
    ids = [UsageRecord.FromString(f[b"r"]).request_id for _i, f in r.xrange(stream)]
    assert ids == ["warm", "g0", "g1", "g2", "g3"]
