"""Where a hold and its orphan live, and what the scripts write only when a key is new.

The reserve and settle scripts were cut to fewer Redis calls per request (README, Redis
layout): a hold's orphan settlement is a second field of the hold in `:resv:data`, the
minute's rate hash and the day and hour hashes get their expiry when they are created. These
tests hold the layout, the exact money, and the upgrade: holds written by the previous
reserve script (orphan in `:resv:orphan`) are still settled and reaped correctly. Everything
runs through the production path (`Budgets`, `Ledger`, `tend_once`) against a real server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import redis

from extproc.governance.budget import RESERVATION_TTL_MS, Budgets, Decision, Plan, plan_request
from extproc.governance.holds import tend_once
from extproc.governance.keys import Identity
from extproc.governance.policy import parse_policy_text
from extproc.metering.ledger import Ledger
from extproc.metering.prices import PriceTable, nanos_per_token
from extproc.metering.settlement import CachePrefix, Charged, settlement_for
from extproc.store.clients import make_client
from extproc.store.schema import ledger_key
from extproc.v1.ledger_pb2 import Settlement, UsageRecord

T = TypeVar("T")
PRICES = PriceTable.load()
POLICY = parse_policy_text(
    """
version: 1
timezone: UTC
defaults: {key_rate_limits: {rpm: 1000}}
workspaces:
  dev:
    budget_usd: 10
    upstream: {key_env: TEST_UPSTREAM}
    services:
      cli: {}
"""
)
NOW = int(datetime(2026, 11, 10, 12, 0, 15, tzinfo=UTC).timestamp() * 1000)
TTL = RESERVATION_TTL_MS
DATA, LEGACY = "{ws:dev}:resv:data", "{ws:dev}:resv:orphan"
HELD, SPENT = "{ws:dev}:held:2026-11", "{ws:dev}:spent:2026-11"


def plan(workspace: str = "dev", service: str = "cli", now_ms: int = NOW) -> Plan:
    return plan_request(
        POLICY,
        Identity("key_a", workspace, None, service, None, 0),
        model="gpt-4o-mini",
        counted_input=1000,
        output_cap=100,
        prices=PRICES,
        now_ms=now_ms,
    )


def settlement(
    p: Plan,
    rid: str,
    cost: int,
    request_id: str,
    prefix: CachePrefix | None = None,
    cached: int = 0,
) -> Settlement:
    record = UsageRecord(
        request_id=request_id,
        cost_nanos=cost,
        workspace=p.workspace,
        service=p.service,
        model_served="gpt-4o-mini",
        input_tokens=1000,
        cached_input_tokens=cached,
    )
    return settlement_for(
        record,
        [Charged(s.scope, s.soft_nanos) for s in p.scopes],
        prefix=p.prefix,
        period_id=p.period.id,
        local_time=datetime.fromtimestamp(NOW / 1000, POLICY.timezone),
        prices=PRICES,
        reservation_id=rid,
        attributed=True,
        cache_prefix=prefix,
    )


class Books:
    def __init__(self, budgets: Budgets, ledger: Ledger) -> None:
        self.budgets, self.ledger = budgets, ledger

    async def settle(self, s: Settlement) -> None:
        self.ledger.submit(s)
        await self.ledger.drain()

    async def reap(self, now_ms: int) -> int:
        reaped = await tend_once(self.budgets, ["{ws:dev}"], self.ledger.submit, now_ms)
        await self.ledger.drain()
        return reaped


def run(url: str, tmp_path: Path, body: Callable[[Books], Awaitable[T]]) -> T:
    async def main() -> T:
        client = make_client(url)
        ledger = Ledger(client, spool_dir=tmp_path / "spool")
        await ledger.start()
        try:
            return await body(Books(Budgets(client), ledger))
        finally:
            await ledger.close()
            await client.aclose()

    return asyncio.run(main())


def nanos(r: redis.Redis, key: str, field: str) -> int:
    return int(r.hget(key, field) or 0)


def orphan_of(p: Plan, request_id: str) -> bytes:
    ghost = settlement(p, "", 4_321, request_id)
    ghost.record.outcome = "orphaned"
    return ghost.SerializeToString()


def records(r: redis.Redis) -> list[tuple[str, str, int]]:
    rows = r.xrange(ledger_key("{ws:dev}"))
    found = [UsageRecord.FromString(fields[b"r"]) for _id, fields in rows]
    return [(x.request_id, x.outcome, x.cost_nanos) for x in found]


def hold_value(p: Plan) -> str:
    """What a hold holds: "period|nanos|scope|scope..." over the capped scopes."""
    capped = "|".join(s.scope for s in p.scopes if s.hard_nanos is not None)
    return f"{p.period.id}|{p.reserve_nanos}|{capped}"


def old_reserve(r: redis.Redis, p: Plan, rid: str, orphan: bytes) -> None:
    """What the previous reserve.lua left for one hold: the orphan in its own hash."""
    for s in p.scopes:
        if s.hard_nanos is not None:
            r.hincrby(HELD, s.scope, p.reserve_nanos)
    r.zadd("{ws:dev}:resv", {rid: NOW + TTL})
    r.hset(DATA, rid, hold_value(p))
    r.hset(LEGACY, rid, orphan)


def test_a_hold_carries_its_orphan_beside_it_and_settle_drops_both(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan()
    seen: dict[str, object] = {}

    async def body(books: Books) -> None:
        d = await books.budgets.reserve(p, False, NOW, orphan=orphan_of(p, "req-1"))
        seen["data"] = r.hgetall(DATA)
        seen["rid"] = d.reservation_id
        seen["held"] = nanos(r, HELD, "ws")
        await books.settle(settlement(p, d.reservation_id, 123_456, "req-1"))

    run(redis_url, tmp_path, body)
    rid = str(seen["rid"]).encode()
    assert seen["data"] == {
        rid: hold_value(p).encode(),
        rid + b":o": orphan_of(p, "req-1"),
    }
    assert seen["held"] == p.reserve_nanos
    assert not r.exists(LEGACY, DATA, "{ws:dev}:resv")
    assert nanos(r, HELD, "ws") == nanos(r, HELD, "svc:cli") == 0
    assert nanos(r, SPENT, "ws") == nanos(r, SPENT, "svc:cli") == 123_456
    assert records(r) == [("req-1", "", 123_456)]


def test_an_expired_hold_is_reaped_with_the_orphan_kept_beside_it(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan()

    async def body(books: Books) -> list[int]:
        dead = await books.budgets.reserve(p, False, NOW, orphan=orphan_of(p, "crashed"))
        books.budgets.settled(p.prefix, dead.reservation_id)  # its sidecar died
        early = await books.reap(NOW + TTL - 1)
        reaped = await books.reap(NOW + TTL)
        # The dead sidecar's own settlement, had it come back, is a duplicate now.
        await books.settle(settlement(p, dead.reservation_id, 9_999, "crashed"))
        return [early, reaped]

    assert run(redis_url, tmp_path, body) == [0, 1]
    assert records(r) == [("crashed", "orphaned", 4_321)]
    assert nanos(r, HELD, "ws") == 0 and nanos(r, SPENT, "ws") == 4_321
    assert not r.exists(DATA, LEGACY, "{ws:dev}:resv")


def test_a_hold_from_the_previous_script_is_settled_and_its_legacy_orphan_dropped(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan()
    old_reserve(r, p, "old-1", orphan_of(p, "req-old"))
    assert nanos(r, HELD, "ws") == p.reserve_nanos

    async def body(books: Books) -> None:
        await books.settle(settlement(p, "old-1", 7_000, "req-old"))

    run(redis_url, tmp_path, body)
    assert nanos(r, HELD, "ws") == nanos(r, HELD, "svc:cli") == 0
    assert nanos(r, SPENT, "ws") == 7_000
    assert not r.exists(DATA, LEGACY, "{ws:dev}:resv")
    assert records(r) == [("req-old", "", 7_000)]


def test_a_hold_from_the_previous_script_is_reaped_and_its_legacy_orphan_billed(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan()
    old_reserve(r, p, "old-1", orphan_of(p, "crashed-old"))

    async def body(books: Books) -> int:
        # A new-layout hold in flight beside it is left alone until its own expiry.
        live = await books.budgets.reserve(p, False, NOW + 1, orphan=orphan_of(p, "live"))
        books.budgets.settled(p.prefix, live.reservation_id)
        reaped = await books.reap(NOW + TTL)
        assert r.hlen(DATA) == 2 and nanos(r, HELD, "ws") == p.reserve_nanos
        return reaped + await books.reap(NOW + 1 + TTL)

    assert run(redis_url, tmp_path, body) == 2
    assert records(r) == [("crashed-old", "orphaned", 4_321), ("live", "orphaned", 4_321)]
    assert nanos(r, HELD, "ws") == 0 and nanos(r, SPENT, "ws") == 2 * 4_321
    assert not r.exists(DATA, LEGACY, "{ws:dev}:resv")


def test_a_hold_without_an_orphan_is_released_whoever_releases_it(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan()

    async def body(books: Books) -> int:
        settled = await books.budgets.reserve(p, False, NOW)
        await books.settle(settlement(p, settled.reservation_id, 1_000, "req-a"))
        dead = await books.budgets.reserve(p, False, NOW)
        books.budgets.settled(p.prefix, dead.reservation_id)
        return await books.reap(NOW + TTL)

    assert run(redis_url, tmp_path, body) == 0  # nothing to bill: no orphan was given
    assert nanos(r, HELD, "ws") == 0 and nanos(r, SPENT, "ws") == 1_000
    assert not r.exists(DATA, LEGACY, "{ws:dev}:resv")


def test_day_and_hour_hashes_get_their_expiry_when_created_and_keep_it(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan()
    day, hour = "{ws:dev}:day:2026-11-10", "{ws:dev}:hour:2026-11-10T12"
    ttls: list[tuple[int, int]] = []

    async def body(books: Books) -> None:
        await books.settle(settlement(p, "", 1_000, "req-1"))
        ttls.append((r.ttl(day), r.ttl(hour)))
        r.expire(day, 500)  # an existing key (e.g. the previous script's) keeps its expiry
        r.expire(hour, 400)
        await books.settle(settlement(p, "", 2_000, "req-2"))
        ttls.append((r.ttl(day), r.ttl(hour)))
        r.delete(day, hour)  # gone (expired): the next write makes it anew, with an expiry
        await books.settle(settlement(p, "", 3_000, "req-3"))
        ttls.append((r.ttl(day), r.ttl(hour)))

    run(redis_url, tmp_path, body)
    first, kept, anew = ttls
    # 40 days (14 days) after the day (hour) ends: one day (hour) more from the first write.
    assert 41 * 86_400 - 5 <= first[0] <= 41 * 86_400
    assert 14 * 86_400 + 3_600 - 5 <= first[1] <= 14 * 86_400 + 3_600
    assert 495 <= kept[0] <= 500 and 395 <= kept[1] <= 400
    assert anew[0] >= 41 * 86_400 - 5 and anew[1] >= 14 * 86_400 + 3_600 - 5
    assert nanos(r, day, "ws") == nanos(r, hour, "svc:cli") == 3_000
    assert nanos(r, SPENT, "ws") == 6_000 and nanos(r, SPENT, "#requests") == 3


def test_the_minute_rate_hash_gets_its_expiry_once(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan()
    rl = f"{{ws:dev}}:rl:{NOW // 60_000}"
    pttls: list[int] = []

    async def body(books: Books) -> None:
        await books.budgets.reserve(p, False, NOW)
        pttls.append(r.pttl(rl))
        r.pexpire(rl, 90_000)
        await books.budgets.reserve(p, False, NOW + 10)
        pttls.append(r.pttl(rl))

    run(redis_url, tmp_path, body)
    assert 115_000 < pttls[0] <= 120_000
    assert 85_000 < pttls[1] <= 90_000
    assert r.hget(rl, "key:key_a:r") == b"2" and r.hget(rl, "key:key_a:t") == b"2200"


def test_a_plan_with_no_capped_scope_reserves_with_none_to_read(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    capped = plan()
    p = replace(capped, scopes=tuple(replace(s, hard_nanos=None) for s in capped.scopes))

    async def body(books: Books) -> Decision:
        d = await books.budgets.reserve(p, False, NOW)
        await books.settle(settlement(p, d.reservation_id, 500, "req-open"))
        return d

    d = run(redis_url, tmp_path, body)
    assert (d.allowed, d.reason, d.standings) == (True, "ok", ())
    assert nanos(r, SPENT, "ws") == 500 and nanos(r, HELD, "ws") == 0
    assert not r.exists(DATA, "{ws:dev}:resv")


def test_prompt_cache_counters_are_exact_and_a_zero_cached_count_writes_nothing(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan()
    prefix = CachePrefix("fp1", 800)
    zero_cached: list[bool] = []

    async def body(books: Books) -> None:
        await books.settle(settlement(p, "", 100, "req-1", prefix))  # first seen
        await books.settle(settlement(p, "", 100, "req-2", prefix))  # seen, nothing cached
        # Readers (the spend report) take a missing counter for 0.
        zero_cached.append(bool(r.hexists(SPENT, "cached_tokens:svc:cli")))
        await books.settle(settlement(p, "", 100, "req-3", prefix, cached=300))

    run(redis_url, tmp_path, body)
    assert zero_cached == [False]
    price = PRICES.price_for("gpt-4o-mini")[0]
    per_token = nanos_per_token(price.input) - nanos_per_token(price.cached_input)
    spent = {k.decode(): int(v) for k, v in r.hgetall(SPENT).items()}
    assert {k: v for k, v in spent.items() if k.endswith(":svc:cli")} == {
        "input_tokens:svc:cli": 3_000,
        "cached_tokens:svc:cli": 300,
        "repeat_tokens:svc:cli": 1_600,
        "cachemiss_tokens:svc:cli": 800 + 500,
        "cachemiss_nanos:svc:cli": (800 + 500) * per_token,
    }
