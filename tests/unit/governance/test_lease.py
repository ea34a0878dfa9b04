"""Budget leases against a real server: grant, local admission, settlement, hand-back, reaping,
top-ups, revocation, rate limits and the overshoot bound (docs/budgets.md, "Leases").

Everything goes through the production path: `Budgets.reserve` with compact orphans (what
the data plane hands it), the `Ledger` writer and its settle script, `tend_once`. Two
`Budgets` on two clients of one server are two replicas.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import redis

from extproc.governance import lease as lease_module
from extproc.governance.budget import RESERVATION_TTL_MS, Budgets, Decision, Plan, plan_request
from extproc.governance.holds import tend_once
from extproc.governance.keys import Identity
from extproc.governance.live import LiveState
from extproc.governance.policy import parse_policy_text
from extproc.governance.topups import Grant, wall_ms
from extproc.metering.ledger import Ledger
from extproc.metering.orphans import Orphan
from extproc.metering.prices import PriceTable
from extproc.metering.settlement import Charged, settlement_for
from extproc.store.clients import AsyncClient, make_client
from extproc.store.schema import ledger_key
from extproc.store.scripts import LEASE
from extproc.v1.ledger_pb2 import Settlement, UsageRecord

T = TypeVar("T")
PRICES = PriceTable.load()
POLICY = parse_policy_text(
    """
version: 1
timezone: UTC
defaults: {hard_limit: 100%, default_output_cap: 100}
workspaces:
  dev:
    budget_usd: "0.021"
    upstream: {key_env: TEST_UPSTREAM}
    services:
      cli: {}
      paced: {key_rate_limits: {rpm: 30}}
"""
)
NOW = int(datetime(2026, 11, 10, 12, 0, 15, tzinfo=UTC).timestamp() * 1000)
WORST = 210_000  # 1000 input + 100 output tokens of gpt-4o-mini
CAP = 21_000_000  # the workspace's hard limit: 100 worst cases
HELD, SPENT, LEASES = "{ws:dev}:held:2026-11", "{ws:dev}:spent:2026-11", "{ws:dev}:leases"


def plan(service: str = "cli", key: str = "key_a") -> Plan:
    return plan_request(
        POLICY,
        Identity(key, "dev", None, service, None, 0),
        model="gpt-4o-mini",
        counted_input=1000,
        output_cap=100,
        prices=PRICES,
        now_ms=NOW,
    )


def orphan(p: Plan, request_id: str) -> Orphan:
    return Orphan(
        request_id=request_id, time_ms=NOW, endpoint="chat.completions",
        model_requested="gpt-4o-mini", model_served="gpt-4o-mini", counted_input=1000,
        workspace="dev", service=p.service, key_id=p.key_id, team="", period=p.period.id,
        timezone="UTC", charged=tuple(Charged(s.scope, s.soft_nanos) for s in p.scopes),
    )  # fmt: skip


def settlement(p: Plan, decision: Decision, request_id: str, cost: int) -> Settlement:
    record = UsageRecord(
        request_id=request_id, time_ms=NOW, cost_nanos=cost, workspace="dev",
        service=p.service, key_id=p.key_id, model_served="gpt-4o-mini",
    )  # fmt: skip
    return settlement_for(
        record,
        [Charged(s.scope, s.soft_nanos) for s in p.scopes],
        prefix=p.prefix,
        period_id=p.period.id,
        local_time=datetime.fromtimestamp(NOW / 1000, UTC),
        prices=PRICES,
        reservation_id=decision.reservation_id,
        attributed=True,
    )


class Replica:
    """What one sidecar holds: its client, budgets with leases, and a running ledger."""

    def __init__(self, client: AsyncClient, spool: Path) -> None:
        self.client = client
        # Top-ups reach budgets as in the sidecar: through the live cache (governance.live).
        self.live = LiveState(client, lambda: POLICY)
        self.budgets = Budgets(client, topups=self.live.topups, topups_until=self.live.topups_until)
        self.live.on_withdrawn = self.budgets.close_workspace
        self.ledger = Ledger(client, spool_dir=spool)
        self.ledger.on_settled = self.budgets.settled

    async def admit(self, p: Plan, request_id: str, **kw: Any) -> Decision:
        return await self.budgets.reserve(p, False, NOW, orphan=orphan(p, request_id), **kw)

    async def settle(self, *items: tuple[Plan, Decision, str, int]) -> None:
        for p, d, rid, cost in items:
            self.ledger.submit(settlement(p, d, rid, cost))
        await self.ledger.drain()


def run(url: str, tmp_path: Path, body: Callable[..., Awaitable[T]], replicas: int = 1) -> T:
    async def main() -> T:
        made = []
        for i in range(replicas):
            replica = Replica(make_client(url), tmp_path / f"spool{i}")
            await replica.ledger.start()
            made.append(replica)
        try:
            return await body(*made)
        finally:
            for replica in made:
                await replica.ledger.close()
                await replica.budgets.close()
                await replica.client.aclose()

    return asyncio.run(main())


def nanos(r: redis.Redis, key: str, field: str = "ws") -> int:
    return int(r.hget(key, field) or 0)


def test_a_busy_caller_gets_a_lease_and_its_requests_need_no_script_call(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan()

    async def body(one: Replica) -> dict[str, Any]:
        first = await one.admit(p, "r0")  # the first ones: held exactly
        exact = [await one.admit(p, f"e{i}") for i in range(2)]
        r.script_load(LEASE.source)  # loaded once per server: not a request's cost
        r.config_resetstat()
        more = [await one.admit(p, f"r{i}") for i in range(1, 20)]  # busy now: leased
        leases = {d.reservation_id for d in more}
        stats = r.info("commandstats")
        out = {
            "first": first, "exact": exact, "more": more, "leases": leases,
            "granted": sum(nanos(r, LEASES, lease) for lease in leases),
            "grants": {lease: nanos(r, LEASES, lease) for lease in leases},
            "scripts": int(stats["cmdstat_evalsha"]["calls"]),
            "hset": int(stats["cmdstat_hset"]["calls"]),
            "orphans": sum(r.hlen(f"{{ws:dev}}:orphans:{lease}") for lease in leases),
            "held": nanos(r, HELD),
            # What replicas from before leases read: no lease among the holds they reap.
            "resv": [x.decode() for x in r.zrange("{ws:dev}:resv", 0, -1)],
            "expiring": {x.decode() for x in r.zrange("{ws:dev}:leases:exp", 0, -1)},
        }  # fmt: skip
        await one.settle(
            (p, first, "r0", 100_000),
            *((p, d, f"e{i}", 1) for i, d in enumerate(exact)),
            *((p, d, f"r{i}", 150_000) for i, d in enumerate(more, 1)),
        )
        # Each request's cost moved out of its lease: what they still hold is what is held.
        per = {x: sum(d.reservation_id == x for d in more) for x in leases}
        out["left"] = sorted(nanos(r, LEASES, x) for x in leases if r.hexists(LEASES, x))
        out["expected_left"] = sorted(
            out["grants"][x] - 150_000 * per[x] for x in leases if r.hexists(LEASES, x)
        )
        out["held_settled"] = nanos(r, HELD) - sum(out["left"])
        await one.budgets.close()
        out["after"] = (nanos(r, HELD), nanos(r, SPENT), r.hlen(LEASES), r.zcard("{ws:dev}:resv"))
        return out

    out = run(redis_url, tmp_path, body)
    assert not out["first"].reservation_id.startswith("L")
    assert len(out["resv"]) == 3 and not any(x.startswith("L") for x in out["resv"])
    assert out["expiring"] == out["leases"]
    assert not any(d.reservation_id.startswith("L") for d in out["exact"])
    assert all(lease.startswith("L") for lease in out["leases"])
    # A lease is about a second of the caller's spend: a burst doubles them as they run
    # out (4, 8, 16 worst cases): 3 script calls for 19 requests, one HSET each besides.
    assert out["scripts"] == len(out["leases"]) == 3
    assert out["hset"] == 19 + 2 * 3  # orphans; a grant's hold and lease fields
    assert out["orphans"] == 19  # one per request admitted under a lease, until it settles
    # Held: the exact hold and what the leases still hold (the ones run out included).
    assert out["held"] == 3 * WORST + out["granted"]
    assert out["left"] == out["expected_left"] and out["left"]
    assert out["held_settled"] == 0
    assert out["after"] == (0, 100_000 + 2 + 19 * 150_000, 0, 0)
    assert r.keys("{ws:dev}:orphans:*") == []


def test_concurrent_bursts_on_two_replicas_never_admit_past_the_cap(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """The bound with limits fixed: the worst cases admitted and not yet settled, plus what
    is spent, never exceed the cap, leases or not; so nothing settles past it while each
    request costs at most its worst case. And the cap is used: with the leases handed
    back, less than one worst case of it is left."""
    p = plan()
    rng = random.Random(21)

    async def body(a: Replica, b: Replica) -> tuple[int, int, int, bool]:
        n, admitted = 0, 0
        for _wave in range(15):  # bursts, each settling before the next
            tasks = []
            for _ in range(40):
                replica = a if rng.random() < 0.5 else b
                rid = f"q{n}"
                n += 1
                tasks.append((replica, rid, asyncio.create_task(replica.admit(p, rid))))
            wave = [(rep, await t, rid) for rep, rid, t in tasks]
            ok = [(rep, d, rid) for rep, d, rid in wave if d.allowed]
            assert {d.reason for _r, d, _id in wave if not d.allowed} <= {"budget"}
            # Every worst case admitted and not settled is held, and all of it within the cap.
            assert nanos(r, SPENT) + nanos(r, HELD) <= CAP
            admitted += len(ok)
            for rep in (a, b):
                mine = [(p, d, rid, rng.randint(1, WORST)) for x, d, rid in ok if x is rep]
                await rep.settle(*mine)
        await a.budgets.close()
        await b.budgets.close()
        # With every lease handed back, one more exact hold is refused: the cap is used up.
        exact = await Budgets(a.client, leases=False).reserve(p, False, NOW, orphan=b"")
        return admitted, nanos(r, SPENT), nanos(r, HELD), exact.allowed

    admitted, spent, held, more = run(redis_url, tmp_path, body, replicas=2)
    assert held == 0 and spent <= CAP
    assert admitted < 600 and (spent + WORST > CAP) == (not more)
    assert not more  # the bursts used the cap up to less than one request
    assert r.hlen(LEASES) == 0 and r.keys("{ws:dev}:orphans:*") == []


def test_a_dead_replicas_lease_is_reaped_its_requests_billed_once(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan()
    ttl = RESERVATION_TTL_MS

    async def body(dead: Replica, live: Replica) -> list[Any]:
        decisions = [await dead.admit(p, f"d{i}") for i in range(4)]  # d3 is the first leased
        lease = decisions[3].reservation_id
        assert lease.startswith("L") and not decisions[2].reservation_id.startswith("L")
        await dead.settle((p, decisions[2], "d2", 7_000))  # one finished before it died
        held = nanos(r, HELD)
        # It dies: no renewal, no hand-back. Its lease outlives it until it expires.
        leases = dead.budgets.leases
        assert leases is not None and leases._sweeper is not None
        leases._sweeper.cancel()
        dead.budgets.leases = None
        dead.budgets._owned.clear()
        early = await tend_once(live.budgets, ["{ws:dev}"], live.ledger.submit, NOW + ttl - 1)
        reaped = await tend_once(live.budgets, ["{ws:dev}"], live.ledger.submit, NOW + ttl + 1)
        await live.ledger.drain()
        # A settlement that arrives late (it was only paused) is a duplicate.
        await dead.settle((p, decisions[3], "d3", 9_000))
        await dead.settle((p, decisions[1], "d1", 9_000))
        return [held, early, reaped, lease]

    held, early, reaped, lease = run(redis_url, tmp_path, body, replicas=2)
    assert held >= 4 * WORST  # the hold and the leases the burst doubled
    assert early == 0
    assert reaped == 3  # the holds of d0 and d1, and d3 under the lease (d2 had settled)
    assert nanos(r, HELD) == 0 and r.hlen(LEASES) == 0
    records = [UsageRecord.FromString(f[b"r"]) for _i, f in r.xrange(ledger_key("{ws:dev}"))]
    by_id = {x.request_id: x for x in records}
    assert sorted(by_id) == ["d0", "d1", "d2", "d3"] and len(records) == 4
    assert [by_id[x].outcome for x in ("d0", "d1", "d3")] == ["orphaned"] * 3
    # Priced by the reaper: the counted input at the routed model's rate, estimated.
    assert by_id["d1"].cost_nanos == 1000 * 150 and by_id["d1"].estimated
    assert by_id["d1"].workspace == "dev" and by_id["d1"].key_id == "key_a"
    assert nanos(r, SPENT) == 7_000 + 3 * 150_000
    assert r.keys("{ws:dev}:orphans:*") == [] and lease


def grant(r: redis.Redis, grant_id: str, nanos: int, until_ms: int) -> None:
    """A granted top-up, as governance.topups stores an approved one."""
    r.hset("{ws:dev}:topups", grant_id, Grant(grant_id, "ws", nanos, until_ms).encode())


def test_a_top_up_raises_the_cap_once_and_its_revocation_closes_the_leases_counting_it(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """A grant counts in the cap of exact holds and lease grants alike, once (the scripts
    check the caps Python gives them); revoked, the live cache's next refresh (on the
    `topup` notice, or its periodic one when the notice is lost) closes the leases that
    counted on it, and the next request is refused."""
    p = plan()
    r.hset(SPENT, "ws", CAP)  # the month is spent to its hard limit

    async def body(one: Replica) -> list[Any]:
        refused = await one.admit(p, "x0")
        grant(r, "t1", 50 * WORST, wall_ms() + 600_000)
        await one.live.refresh()
        first = await one.admit(p, "x1")
        await one.admit(p, "xw")  # busy from the fourth request in a second
        second = await one.admit(p, "x2")
        lease = one.budgets.leases._by_id[second.reservation_id]  # type: ignore[union-attr]
        granted = nanos(r, LEASES, lease.id)
        # Revoked (the hash entry gone; no notice): the cache's refresh finds it and the
        # lease closes before its second is up.
        r.hdel("{ws:dev}:topups", "t1")
        await one.live.refresh()
        closed = lease.closed
        after = await one.admit(p, "x3")
        return [refused, first, second, granted, closed, after, second.standings]

    refused, first, second, granted, closed, after, standings = run(redis_url, tmp_path, body)
    assert (refused.allowed, refused.reason) == (False, "budget")
    assert refused.standings[0].scope.topup_nanos == 0
    assert first.allowed and first.standings[0].scope.topup_nanos == 50 * WORST
    assert second.reservation_id.startswith("L")
    assert standings[0].scope.topup_nanos == 50 * WORST
    assert 0 < granted <= (50 * WORST - 2 * WORST) // lease_module.LEASE_SHARE
    assert closed and (after.allowed, after.reason) == (False, "budget")


def test_a_grant_counts_once_for_holds_and_leases(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """Spent to the cap, a grant of 10 worst cases admits at most 10 requests in flight,
    leased or held (counted twice, in Python and in a script, it would admit 20)."""
    p = plan()
    r.hset(SPENT, "ws", CAP)

    async def body(one: Replica) -> tuple[int, int]:
        grant(r, "t3", 10 * WORST, wall_ms() + 600_000)
        await one.live.refresh()
        allowed = [(await one.admit(p, f"z{i}")).allowed for i in range(30)]
        return sum(allowed), nanos(r, SPENT) + nanos(r, HELD)

    allowed, used = run(redis_url, tmp_path, body)
    assert allowed == 10 and used == CAP + 10 * WORST  # used up, and not one more


def test_a_lease_lasts_no_longer_than_the_top_up_it_counts_on(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan()
    r.hset(SPENT, "ws", CAP)

    async def body(one: Replica) -> float:
        grant(r, "t2", 50 * WORST, NOW + 300)  # 0.3 s left at the requests' clock
        await one.live.refresh()
        for i in range(3):
            await one.admit(p, f"y{i}")
        d = await one.admit(p, "y3")
        lease = one.budgets.leases._by_id[d.reservation_id]  # type: ignore[union-attr]
        return lease.valid_until - asyncio.get_running_loop().time()

    assert 0 < run(redis_url, tmp_path, body) <= 0.3


def test_a_revoked_key_stops_at_the_next_refresh(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan()

    async def body(one: Replica) -> list[Decision]:
        loop = asyncio.get_running_loop()
        out = [await one.admit(p, f"k{i}") for i in range(4)]
        r.sadd("{ws:dev}:revoked", "key_a")  # the key cache's notice lost
        lease = one.budgets.leases._by_id[out[3].reservation_id]  # type: ignore[union-attr]
        out.append(await one.admit(p, "k4"))  # within the lease's second: admitted
        lease.valid_until = loop.time()
        out.append(await one.admit(p, "k5"))
        return out

    decisions = run(redis_url, tmp_path, body)
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert decisions[4].reservation_id == decisions[3].reservation_id
    assert decisions[5].reason == "revoked"


def test_leased_rate_limits_never_admit_past_the_limit(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """A key limited to 30 requests a minute, asked 80 times on two replicas: 30 pass,
    whether counted in chunks under leases or one by one near the limit."""
    p = plan("paced")

    async def body(a: Replica, b: Replica) -> list[Decision]:
        tasks = [asyncio.create_task((a, b)[i % 2].admit(p, f"p{i}")) for i in range(80)]
        return list(await asyncio.gather(*tasks))

    decisions = run(redis_url, tmp_path, body, replicas=2)
    allowed = [d for d in decisions if d.allowed]
    assert {d.reason for d in decisions if not d.allowed} == {"rate"}
    assert len(allowed) <= 30
    assert len(allowed) >= 30 - 2 * 2  # chunks handed back when their leases ended
    assert any(d.reservation_id.startswith("L") for d in allowed)


def test_a_session_total_is_counted_under_a_lease(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan()

    async def body(one: Replica) -> list[Decision]:
        return [await one.admit(p, f"s{i}", session="conv-1") for i in range(4)]

    decisions = run(redis_url, tmp_path, body)
    assert [d.session_tokens for d in decisions] == [1000, 2000, 3000, 4000]
    assert decisions[-1].reservation_id.startswith("L")


def test_without_leases_every_request_is_held_exactly(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan()

    async def body(one: Replica) -> list[Decision]:
        one.budgets.leases = None
        return [await one.admit(p, f"n{i}") for i in range(4)]

    decisions = run(redis_url, tmp_path, body)
    assert not any(d.reservation_id.startswith("L") for d in decisions)
    assert nanos(r, HELD) == 4 * WORST


class _ClosesDuringGrant:
    """The replica's client, except that the workspace's leases are closed (a revoked grant
    learnt) while a lease grant's reply is on its way back."""

    def __init__(self, client: AsyncClient, budgets: Budgets) -> None:
        self._client, self._budgets, self.grants = client, budgets, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        reply = await self._client.evalsha(sha, numkeys, *keys_and_args)
        if sha == LEASE.sha and keys_and_args[numkeys] == "grant":
            self.grants += 1
            self._budgets.close_workspace("dev")
        return reply


def test_a_lease_granted_while_the_workspace_closes_its_leases_is_closed_on_arrival(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """Its grant may have counted a cap that is gone: it admits nothing, and is handed back."""
    p = plan()

    async def body(one: Replica) -> tuple[list[Decision], int]:
        leases = one.budgets.leases
        assert leases is not None
        proxy = _ClosesDuringGrant(one.client, one.budgets)
        leases._redis = proxy  # type: ignore[assignment]
        decisions = [await one.admit(p, f"w{i}") for i in range(6)]
        await one.settle(*((p, d, f"w{i}", 1) for i, d in enumerate(decisions)))
        await one.budgets.close()
        return decisions, proxy.grants

    decisions, grants = run(redis_url, tmp_path, body)
    assert grants >= 1 and all(d.allowed for d in decisions)
    assert not any(d.reservation_id.startswith("L") for d in decisions)
    assert nanos(r, HELD) == 0 and r.hlen(LEASES) == 0


def test_the_live_cache_reports_a_grant_gone_before_its_end_not_one_that_ended(
    r: redis.Redis, redis_url: str
) -> None:
    async def main() -> list[str]:
        client = make_client(redis_url)
        live = LiveState(client, lambda: POLICY)
        told: list[str] = []
        live.on_withdrawn = told.append
        try:
            grant(r, "ended", WORST, wall_ms() - 1)  # over: its sweep is no revocation
            grant(r, "live", WORST, wall_ms() + 600_000)
            await live.refresh()
            until = live.topups_until("dev", wall_ms())
            r.hdel("{ws:dev}:topups", "ended")
            await live.refresh()
            told.append(f"until {until == int(r.hget('{ws:dev}:topups', 'live').split(b'|')[-1])}")
            r.hdel("{ws:dev}:topups", "live")
            await live.refresh()
            return told
        finally:
            await client.aclose()

    assert asyncio.run(main()) == ["until True", "dev"]
