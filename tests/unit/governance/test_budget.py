"""Budgets against a real Redis: the reserve and settle scripts, rate limits, outages.

Everything goes through the production path (`plan_request`, `Budgets.reserve`, the
`Ledger` writer and its settle script); the clock is injected through `now_ms`, so TTLs,
minute windows and period rollovers are driven exactly, without sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar
from zoneinfo import ZoneInfo

import redis

from extproc.devstack.stack import Child, free_port, redis_child
from extproc.governance.budget import (
    RESERVATION_TTL_MS,
    Budgets,
    Decision,
    Plan,
    RateScope,
    plan_request,
)
from extproc.governance.holds import tend_once
from extproc.governance.keys import Identity
from extproc.governance.policy import RateLimits, load_policy, parse_policy_text
from extproc.metering.ledger import Ledger
from extproc.metering.prices import PriceTable
from extproc.metering.settlement import Charged, settlement_for
from extproc.store.clients import AsyncClient, make_client
from extproc.store.schema import ledger_key, session_key, workspace_prefix
from extproc.v1.ledger_pb2 import Settlement, UsageRecord
from extproc.wire.usage import Usage

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = load_policy(ROOT / "examples" / "policy.yaml")
PRICES = PriceTable.load()
BERLIN = ZoneInfo("Europe/Berlin")
T = TypeVar("T")

R = 210_000  # 1000 input + 100 output tokens of gpt-4o-mini: 1000 * 150 + 100 * 600 nanos
POLICY = parse_policy_text(
    """
version: 1
timezone: Europe/Berlin
defaults:
  hard_limit: 100%
  default_output_cap: 100
  key_rate_limits: {rpm: 1000}
workspaces:
  dev:
    budget_usd: "0.0021"
    on_redis_down: open
    upstream: {key_env: TEST_UPSTREAM}
    teams:
      platform: {budget_usd: "0.0021"}
    services:
      cli: {team: platform}
      slow: {rate_limits: {rpm: 3}}
      thin: {key_rate_limits: {tpm: 2500}}
  ci:
    budget_usd: "0.0021"
    upstream: {key_env: TEST_UPSTREAM}
    services:
      runner: {}
"""
)
TTL = RESERVATION_TTL_MS
NOV_10 = int(datetime(2026, 11, 10, 12, 0, 15, tzinfo=BERLIN).timestamp() * 1000)


def who(workspace: str, service: str, team: str | None = None, key: str = "key_a") -> Identity:
    return Identity(key, workspace, team, service, None, 0)


def plan(
    identity: Identity,
    now_ms: int = NOV_10,
    *,
    model: str = "gpt-4o-mini",
    counted: int = 1000,
    cap: int | None = None,
) -> Plan:
    return plan_request(
        POLICY,
        identity,
        model=model,
        counted_input=counted,
        output_cap=cap,
        prices=PRICES,
        now_ms=now_ms,
    )


def settlement(
    p: Plan, decision: Decision, cost: int, request_id: str, now_ms: int = NOV_10
) -> Settlement:
    """What the exchange hands the ledger when a request finishes."""
    record = UsageRecord(
        request_id=request_id, cost_nanos=cost, workspace=p.workspace, model_served="gpt-4o-mini"
    )
    return settlement_for(
        record,
        [Charged(s.scope, s.soft_nanos) for s in p.scopes],
        prefix=p.prefix,
        period_id=p.period.id,
        local_time=datetime.fromtimestamp(now_ms / 1000, POLICY.timezone),
        prices=PRICES,
        reservation_id=decision.reservation_id,
    )


# --- plan_request (pure) -----------------------------------------------------------------


def test_plan_charges_workspace_team_service_and_key_with_scaled_limits() -> None:
    p = plan_request(
        EXAMPLE,
        who("dev", "codex-cli", key="key_x"),
        model="gpt-4o-mini",
        counted_input=1000,
        output_cap=500,
        prices=PRICES,
        now_ms=NOV_10,
    )
    assert p.prefix == "{ws:dev}"
    assert p.period.id == "2026-11"
    limits = {s.scope: (s.budget_nanos, s.soft_nanos, s.hard_nanos) for s in p.scopes}
    usd = 1_000_000_000
    # dev: $500 at 75% / 110%; the team and the service at the same fractions of their own.
    assert limits == {
        "ws": (500 * usd, 375 * usd, 550 * usd),
        "team:platform": (200 * usd, 150 * usd, 220 * usd),
        "svc:codex-cli": (100 * usd, 75 * usd, 110 * usd),
        "key:key_x": (None, None, None),
    }
    assert p.reserve_nanos == 1000 * 150 + 500 * 600
    assert p.tokens == 1500


def test_plan_reserves_the_default_output_cap_when_the_request_sets_none() -> None:
    for workspace, service, cap in (("dev", "codex-cli", 4096), ("prod", "docs-search", 2048)):
        p = plan_request(
            EXAMPLE,
            who(workspace, service),
            model="gpt-4o-mini",
            counted_input=1000,
            output_cap=None,
            prices=PRICES,
            now_ms=NOV_10,
        )
        expected = PRICES.charge("gpt-4o-mini", Usage(input_tokens=1000, output_tokens=cap))
        assert p.reserve_nanos == expected.nanos == 1000 * 150 + cap * 600
        assert p.tokens == 1000 + cap


def test_plan_rate_limits_are_shared_per_scope_and_inherited_per_key() -> None:
    def rates(workspace: str, service: str, team: str | None = None) -> dict[str, RateLimits]:
        p = plan_request(
            EXAMPLE,
            who(workspace, service, team, key="key_k"),
            model="gpt-5",
            counted_input=10,
            output_cap=10,
            prices=PRICES,
            now_ms=NOV_10,
        )
        return {r.scope: RateLimits(r.rpm, r.tpm) for r in p.rates}

    assert rates("dev", "codex-cli") == {
        "ws": RateLimits(600, 2_000_000),
        "team:platform": RateLimits(300, None),
        "svc:codex-cli": RateLimits(60, 500_000),
        "key:key_k": RateLimits(30, 400_000),  # the service sets rpm; tpm from the defaults
    }
    assert rates("dev", "ide-assistant")["key:key_k"] == RateLimits(120, 400_000)
    assert rates("ci", "test-fixer")["key:key_k"] == RateLimits(20, 200_000)
    assert rates("prod", "ticket-summarizer")["key:key_k"] == RateLimits(300, 4_000_000)
    # A service gone from the policy: the workspace's key limits, the key's own team.
    gone = rates("dev", "retired-bot", team="web")
    assert gone["key:key_k"] == RateLimits(120, 400_000)
    assert "svc:retired-bot" not in gone


def test_plan_takes_the_team_from_the_policy_over_the_key() -> None:
    p = plan_request(
        EXAMPLE,
        who("dev", "codex-cli", team="web"),
        model="gpt-5",
        counted_input=1,
        output_cap=1,
        prices=PRICES,
        now_ms=NOV_10,
    )
    assert [s.scope for s in p.scopes][:3] == ["ws", "team:platform", "svc:codex-cli"]


# --- against Redis -----------------------------------------------------------------------


def start_redis(port: int, directory: Path) -> Child:
    return redis_child(port, directory)


class Books:
    """A Budgets and a running Ledger on one client: what a sidecar holds."""

    def __init__(self, client: AsyncClient, spool: Path) -> None:
        self.budgets = Budgets(client)
        self.ledger = Ledger(client, spool_dir=spool)

    async def settle(self, *settlements: Settlement) -> None:
        for s in settlements:
            self.ledger.submit(s)
        await self.ledger.drain()


def run(url: str, tmp_path: Path, body: Callable[[Books], Awaitable[T]]) -> T:
    async def main() -> T:
        client = make_client(url)
        books = Books(client, tmp_path / "spool")
        await books.ledger.start()
        try:
            return await body(books)
        finally:
            await books.ledger.close()
            await client.aclose()

    return asyncio.run(main())


def nanos(r: redis.Redis, key: str, field: str) -> int:
    return int(r.hget(key, field) or 0)


def test_reserve_holds_the_worst_case_and_settle_swaps_it_for_the_actual_cost(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan(who("dev", "cli"))
    held: dict[str, int] = {}

    async def body(books: Books) -> Decision:
        d = await books.budgets.reserve(p, False, NOV_10)
        held.update({f: nanos(r, "{ws:dev}:held:2026-11", f) for f in ("ws", "team:platform")})
        await books.settle(settlement(p, d, 123_456, "req-1"))
        return d

    d = run(redis_url, tmp_path, body)
    assert (d.allowed, d.reason) == (True, "ok")
    assert [(s.scope.scope, s.spent_nanos, s.held_nanos) for s in d.standings] == [
        ("ws", 0, 0),
        ("team:platform", 0, 0),
    ]
    assert p.reserve_nanos == R
    assert held == {"ws": R, "team:platform": R}
    assert r.hgetall("{ws:dev}:held:2026-11") == {b"ws": b"0", b"team:platform": b"0"}
    spent = r.hgetall("{ws:dev}:spent:2026-11")
    assert spent == {
        b"ws": b"123456",
        b"team:platform": b"123456",
        b"svc:cli": b"123456",
        b"key:key_a": b"123456",
        b"model:gpt-4o-mini": b"123456",
        b"#requests": b"1",
    }
    assert r.hget("{ws:dev}:day:2026-11-10", "ws") == b"123456"
    assert r.hget("{ws:dev}:hour:2026-11-10T12", "svc:cli") == b"123456"
    assert r.zcard("{ws:dev}:resv") == 0 and r.hlen("{ws:dev}:resv:data") == 0


def test_concurrent_reserves_grant_exactly_what_the_cap_has_room_for(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan(who("dev", "cli"))
    assert POLICY.workspaces["dev"].hard_nanos == 10 * p.reserve_nanos

    async def body(books: Books) -> list[Decision]:
        return await asyncio.gather(*(books.budgets.reserve(p, False, NOV_10) for _ in range(100)))

    decisions = run(redis_url, tmp_path, body)
    granted = [d for d in decisions if d.allowed]
    assert len(granted) == 10
    assert len({d.reservation_id for d in granted}) == 10
    assert {d.reason for d in decisions if not d.allowed} == {"budget"}
    assert nanos(r, "{ws:dev}:held:2026-11", "ws") == 10 * R
    assert r.zcard("{ws:dev}:resv") == 10


def test_an_unsettled_hold_is_reaped_after_its_expiry_and_its_orphan_billed(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan(who("dev", "cli"))
    orphan = settlement(p, Decision(True, "ok"), 4_321, "crashed")
    orphan.record.outcome = "orphaned"

    async def body(books: Books) -> list[object]:
        seen: list[object] = []
        # Its sidecar dies right after this: nobody renews or settles the hold.
        crashed = await books.budgets.reserve(p, False, NOV_10, orphan=orphan.SerializeToString())
        books.budgets.settled(p.prefix, crashed.reservation_id)  # forget it: "dead"
        seen.append(nanos(r, "{ws:dev}:held:2026-11", "ws"))
        early = await tend_once(books.budgets, [p.prefix], books.ledger.submit, NOV_10 + TTL - 1)
        seen.append(early)
        later = await books.budgets.reserve(p, False, NOV_10 + TTL - 1)
        seen.append(nanos(r, "{ws:dev}:held:2026-11", "ws"))
        reaped = await tend_once(books.budgets, [p.prefix], books.ledger.submit, NOV_10 + TTL)
        await books.ledger.drain()
        seen.append(reaped)
        seen.append(nanos(r, "{ws:dev}:held:2026-11", "ws"))
        # The live sidecar's hold was renewed in the same round, so it survives the next.
        await tend_once(books.budgets, [p.prefix], books.ledger.submit, NOV_10 + 2 * TTL - 2)
        seen.append(nanos(r, "{ws:dev}:held:2026-11", "ws"))
        # A settlement arriving after its orphan was billed is a duplicate: billed once.
        await books.settle(settlement(p, crashed, 5_000, "crashed"))
        await books.settle(settlement(p, later, 7_000, "b"))
        seen.append(nanos(r, "{ws:dev}:held:2026-11", "ws"))
        return seen

    # Not a millisecond early; then the crashed one goes and only the live one is left.
    assert run(redis_url, tmp_path, body) == [R, 0, 2 * R, 1, R, R, 0]
    assert r.zcard("{ws:dev}:resv") == 0
    assert r.hlen("{ws:dev}:resv:orphan") == 0
    assert nanos(r, "{ws:dev}:spent:2026-11", "ws") == 4_321 + 7_000
    records = [UsageRecord.FromString(f[b"r"]) for _id, f in r.xrange(ledger_key(p.prefix))]
    assert [(x.request_id, x.outcome) for x in records] == [("crashed", "orphaned"), ("b", "")]


def test_spend_of_one_month_does_not_count_against_the_next(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # Nov 30 23:59:59.999 and Dec 1 00:00 in Berlin, i.e. around 23:00 UTC.
    first_ms = int(datetime(2026, 12, 1, tzinfo=BERLIN).timestamp() * 1000)
    last_ms = first_ms - 1
    assert datetime.fromtimestamp(first_ms / 1000, UTC).isoformat() == "2026-11-30T23:00:00+00:00"
    nov, dec = plan(who("dev", "cli"), last_ms), plan(who("dev", "cli"), first_ms)
    assert (nov.period.id, dec.period.id) == ("2026-11", "2026-12")

    async def body(books: Books) -> tuple[Decision, Decision]:
        full = Decision(True, "ok")  # no reservation: spent straight up to the hard cap
        await books.settle(settlement(nov, full, 10 * R, "november", last_ms))
        return (
            await books.budgets.reserve(nov, False, last_ms),
            await books.budgets.reserve(dec, False, first_ms),
        )

    before, after = run(redis_url, tmp_path, body)
    assert (before.allowed, before.reason, before.retry_after_ms) == (False, "budget", 1)
    assert before.standings[0].spent_nanos == 10 * R
    assert (after.allowed, after.reason) == (True, "ok")
    assert after.standings[0].spent_nanos == 0
    assert nanos(r, "{ws:dev}:held:2026-12", "ws") == R
    assert nanos(r, "{ws:dev}:held:2026-11", "ws") == 0


def test_a_revoked_key_is_refused_and_holds_nothing(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    r.sadd("{ws:dev}:revoked", "key_gone")
    p = plan(who("dev", "cli", key="key_gone"))

    async def body(books: Books) -> tuple[Decision, Decision]:
        other = plan(who("dev", "cli", key="key_fine"))
        return await books.budgets.reserve(p, False, NOV_10), await books.budgets.reserve(
            other, False, NOV_10
        )

    revoked, fine = run(redis_url, tmp_path, body)
    assert (revoked.allowed, revoked.reason) == (False, "revoked")
    assert (fine.allowed, fine.reason) == (True, "ok")
    assert nanos(r, "{ws:dev}:held:2026-11", "ws") == R


def test_a_session_belongs_to_the_key_that_sends_it(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """Another key of the workspace naming the same session id neither reads nor grows it."""
    owner, prober = plan(who("dev", "cli", key="key_own")), plan(who("dev", "cli", key="key_prb"))

    async def body(books: Books) -> list[int]:
        totals = []
        for p in (owner, owner, prober, owner):
            d = await books.budgets.reserve(p, False, NOV_10, session="sess-shared")
            totals.append(d.session_tokens)
        return totals

    assert run(redis_url, tmp_path, body) == [1000, 2000, 1000, 3000]
    prefix = workspace_prefix("dev")
    assert r.get(session_key(prefix, "key_own", "sess-shared")) == b"3000"
    assert r.get(session_key(prefix, "key_prb", "sess-shared")) == b"1000"
    # A client's session id is bounded before it names a key.
    long_id = "L" * 10_000

    async def long(books: Books) -> Decision:
        return await books.budgets.reserve(owner, False, NOV_10, session=long_id)

    assert run(redis_url, tmp_path, long).session_tokens == 1000
    assert r.get(session_key(prefix, "key_own", long_id)) == b"1000"
    assert not [k for k in r.keys("*") if len(k) > 200]


def test_requests_per_minute_deny_until_the_next_minute(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    minute = NOV_10 - NOV_10 % 60_000
    at = minute + 15_000
    p = plan(who("dev", "slow"), at)

    async def body(books: Books) -> list[Decision]:
        out = [await books.budgets.reserve(p, False, at) for _ in range(4)]
        out.append(await books.budgets.reserve(p, False, minute + 60_000))
        return out

    decisions = run(redis_url, tmp_path, body)
    assert [d.allowed for d in decisions] == [True, True, True, False, True]
    denied = decisions[3]
    assert (denied.reason, denied.limit_kind, denied.limit) == ("rate", "rpm", 3)
    assert denied.retry_after_ms == 45_000
    assert isinstance(denied.denied, RateScope) and denied.denied.scope == "svc:slow"
    counts = r.hgetall(f"{{ws:dev}}:rl:{minute // 60_000}")
    assert counts[b"svc:slow:r"] == b"3" and counts[b"svc:slow:t"] == b"3300"
    assert r.hgetall(f"{{ws:dev}}:rl:{minute // 60_000 + 1}")[b"svc:slow:r"] == b"1"
    assert 0 < r.pttl(f"{{ws:dev}}:rl:{minute // 60_000}") <= 120_000
    # A denied request holds nothing: three reservations from the first minute, one after.
    assert nanos(r, "{ws:dev}:held:2026-11", "ws") == 4 * R


def test_tokens_per_minute_count_input_and_output_cap(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    at = NOV_10 - NOV_10 % 60_000 + 59_000
    p = plan(who("dev", "thin", key="key_t"), at)
    assert p.tokens == 1100

    async def body(books: Books) -> list[Decision]:
        return [await books.budgets.reserve(p, False, at) for _ in range(3)]

    decisions = run(redis_url, tmp_path, body)
    assert [d.allowed for d in decisions] == [True, True, False]
    denied = decisions[2]
    assert (denied.reason, denied.limit_kind, denied.limit) == ("rate", "tpm", 2500)
    assert denied.retry_after_ms == 1_000
    assert isinstance(denied.denied, RateScope) and denied.denied.scope == "key:key_t"


def test_a_settlement_delivered_twice_bills_once(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    p = plan(who("dev", "cli"))

    async def body(books: Books) -> None:
        d = await books.budgets.reserve(p, False, NOV_10)
        s = settlement(p, d, 99_000, "once")
        await books.settle(s)
        await books.settle(s)
        await books.settle(s, s)

    run(redis_url, tmp_path, body)
    spent = r.hgetall("{ws:dev}:spent:2026-11")
    assert spent[b"ws"] == b"99000" and spent[b"svc:cli"] == b"99000"
    assert spent[b"#requests"] == b"1"
    assert r.xlen(ledger_key("{ws:dev}")) == 1
    assert nanos(r, "{ws:dev}:held:2026-11", "ws") == 0


def test_a_zero_cost_reservation_settles_and_expires_cleanly(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # An embeddings call with empty input reserves $0 (embeddings output is free).
    p = plan(who("dev", "cli"), model="text-embedding-3-small", counted=0)
    assert p.reserve_nanos == 0

    async def body(books: Books) -> list[Decision]:
        settled = await books.budgets.reserve(p, False, NOV_10)
        await books.settle(settlement(p, settled, 0, "empty"))
        await books.budgets.reserve(p, False, NOV_10)  # never settled
        later = await books.budgets.reserve(plan(who("dev", "cli")), False, NOV_10 + 10**9)
        return [settled, later]

    settled, later = run(redis_url, tmp_path, body)
    assert (settled.reason, later.reason) == ("ok", "ok")
    assert r.xlen(ledger_key("{ws:dev}")) == 1
    assert r.hget("{ws:dev}:spent:2026-11", "#requests") == b"1"
    assert nanos(r, "{ws:dev}:held:2026-11", "ws") == R


def test_an_outage_is_bridged_by_local_books_only_up_to_the_hard_cap(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    dev, ci = plan(who("dev", "cli")), plan(who("ci", "runner"))
    child = start_redis(port, tmp_path)
    try:

        async def body(books: Books) -> dict[str, list[str]]:
            nonlocal child
            spent = settlement(dev, Decision(True, "ok"), 5 * R, "before")
            await books.settle(spent)
            seen: dict[str, list[str]] = {"up": [], "down": [], "closed": [], "again": []}
            for p in (dev, ci):
                seen["up"].append((await books.budgets.reserve(p, True, NOV_10)).reason)
            child.stop()
            # Last known: 5R spent + 1R held; local admissions fill the cap of 10R.
            for _ in range(5):
                seen["down"].append((await books.budgets.reserve(dev, True, NOV_10)).reason)
            seen["closed"].append((await books.budgets.reserve(dev, False, NOV_10)).reason)
            child = start_redis(port, tmp_path)
            seen["up"].append((await books.budgets.reserve(ci, True, NOV_10)).reason)
            child.stop()
            # Fresh figures for ci must not wipe what dev admitted while Redis was away.
            seen["again"].append((await books.budgets.reserve(dev, True, NOV_10)).reason)
            return seen

        seen = run(url, tmp_path, body)
    finally:
        child.stop()
    assert seen == {
        "up": ["ok", "ok", "ok"],
        "down": ["ok_local"] * 4 + ["budget"],
        "closed": ["redis_down"],
        "again": ["budget"],
    }


def test_fail_closed_and_fail_open_with_redis_never_reached(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens here
    p = plan(who("dev", "cli"))

    async def body(books: Books) -> list[Decision]:
        return [
            await books.budgets.reserve(p, False, NOV_10),
            *[await books.budgets.reserve(p, True, NOV_10) for _ in range(11)],
        ]

    decisions = run(url, tmp_path, body)
    assert (decisions[0].allowed, decisions[0].reason) == (False, "redis_down")
    assert [d.reason for d in decisions[1:]] == ["ok_local"] * 10 + ["budget"]
    last = decisions[-1]
    assert last.denied is not None and last.standings[0].spent_nanos == 10 * R
