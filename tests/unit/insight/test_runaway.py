"""The runaway watch and the live cache against a real Redis: records in the ledger stream,
pauses written and announced once (two watches, one lease), a resume starting the key over,
grants ending on time, and each sidecar's cache seeing all of it."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import redis

from extproc.governance import guard
from extproc.governance.keys import KeyStore
from extproc.governance.live import LiveState
from extproc.governance.pauses import Pause, PauseStore
from extproc.governance.policy import parse_policy_text
from extproc.governance.topups import TopupStore, new_request
from extproc.insight.alerts import Alert
from extproc.insight.cachehygiene import prefix_of
from extproc.insight.runaway import RunawayWatch, baseline_hours
from extproc.metering.tokens import count_text
from extproc.store.schema import (
    AUDIT,
    BREAKER_LEADER,
    KEYS_CHANNEL,
    ledger_key,
    paused_key,
    workspace_prefix,
)
from extproc.wire.endpoints import ENDPOINTS
from tests.conftest import run_with_redis
from tests.traffic import record, runaway_loop

POLICY = parse_policy_text(
    """
version: 1
timezone: UTC
workspaces:
  dev:
    budget_usd: 100
    contact: "#dev-help"
    upstream: {key_env: X}
    approvers: {people: [lena@example.com], webhook: "http://127.0.0.1:9/approvers"}
    services:
      loop: {}
      quiet: {breaker: {mode: dry_run}}
"""
)


class Sent:
    """The alerter's seam: what would be delivered, and to which extra URLs."""

    def __init__(self) -> None:
        self.alerts: list[tuple[Alert, list[str]]] = []

    def send(self, alert: Alert, to: Any = ()) -> None:
        self.alerts.append((alert, list(to)))


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def _write_loop(r: redis.Redis, key_id: str, service: str, count: int, t0_ms: int) -> None:
    for call in runaway_loop(0, count, every_s=0.5):
        rec = record(call, t0_ms, service=service)
        rec.key_id = key_id
        r.xadd(ledger_key(workspace_prefix("dev")), {"r": rec.SerializeToString()})


def test_the_request_fingerprint_tells_copies_from_look_alikes() -> None:
    chat = ENDPOINTS["/v1/chat/completions"]
    count = lambda t: count_text(t, "gpt-4o-mini")  # noqa: E731
    words = " ".join(["word"] * 1500)
    one = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": words + " a"}]}
    same = json.loads(json.dumps(one))
    other = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": words + " b"}]}
    a, b, c = (prefix_of(chat, x, 1600, count) for x in (one, same, other))
    assert a is not None and b is not None and c is not None
    assert a.request == b.request != c.request  # same size, other text: not a copy
    assert a.fingerprint == "" and a.tokens == 0  # one item: no cacheable prefix
    two = {
        **one,
        "messages": [{"role": "system", "content": words}, {"role": "user", "content": "x"}],
    }
    three = {**two, "messages": [two["messages"][0], {"role": "user", "content": "y"}]}
    p2, p3 = prefix_of(chat, two, 1600, count), prefix_of(chat, three, 1600, count)
    assert p2 is not None and p3 is not None
    assert p2.fingerprint == p3.fingerprint != "" and p2.request != p3.request
    assert prefix_of(chat, one, 900, count) is None


def test_a_loop_is_paused_once_announced_audited_and_told(redis_url: str, r: redis.Redis) -> None:
    notices = r.pubsub()
    notices.subscribe(KEYS_CHANNEL)
    t0 = 1_796_000_000_000
    clock = Clock(t0 + 60_000)

    async def body(client: Any) -> tuple[list[Any], list[Any], Sent]:
        _secret, identity = await KeyStore(client).create("dev", "loop", owner="bot@example.com")
        _write_loop(r, identity.key_id, "loop", 25, t0)
        sent = Sent()
        one = RunawayWatch(client, lambda: POLICY, sent, now_ms=clock)
        two = RunawayWatch(client, lambda: POLICY, sent, now_ms=clock)
        first = await one.check_once()
        second = await two.check_once()  # stands by: the lease is the first's
        assert (one.leading, two.leading) == (True, False)
        again = await one.check_once()  # nothing new
        return first, second + again, sent

    first, rest, sent = run_with_redis(redis_url, body)
    assert [t.rule for t in first] == ["repeats"] and rest == []
    pause = Pause.from_json(r.hget(paused_key("dev"), first[0].key_id))
    assert pause is not None and pause.paused and pause.rule == "repeats"
    assert (pause.by, pause.owner, pause.since_ms) == ("breaker", "bot@example.com", clock.ms)
    [(alert, to)] = sent.alerts
    assert alert.event == "key_paused" and to == ["http://127.0.0.1:9/approvers"]
    assert "owner bot@example.com" in alert.text and "#dev-help" in alert.text
    assert f"extproc keys resume {first[0].key_id}" in alert.text
    entries = [e for _id, e in r.xrange(AUDIT)]
    assert [(e[b"action"], e[b"who"]) for e in entries] == [(b"breaker.pause", b"breaker")]
    detail = json.loads(entries[0][b"detail"])
    assert detail["rule"] == "repeats" and detail["count"] == 21
    messages = [m for m in iter(lambda: notices.get_message(timeout=1.0), None)]
    pauses = [m["data"] for m in messages if m["type"] == "message" and b"pause" in m["data"]]
    assert pauses == [f"pause {first[0].key_id} dev".encode()]
    refusal = guard.paused(pause, POLICY.timezone, "http://console")
    assert refusal.status == 403 and refusal.code == "key_paused"
    assert "paused it at 2026-" in refusal.message and "was sent 21 times" in refusal.message
    assert "http://console/keys" in refusal.message


def test_dry_run_tells_and_audits_but_pauses_nothing(redis_url: str, r: redis.Redis) -> None:
    r.flushall()
    t0 = 1_796_000_000_000

    async def body(client: Any) -> Sent:
        _secret, identity = await KeyStore(client).create("dev", "quiet")
        _write_loop(r, identity.key_id, "quiet", 30, t0)
        sent = Sent()
        watch = RunawayWatch(client, lambda: POLICY, sent, now_ms=Clock(t0 + 60_000))
        assert [t.mode for t in await watch.check_once()] == ["dry_run"]
        return sent

    sent = run_with_redis(redis_url, body)
    assert r.hlen(paused_key("dev")) == 0
    assert "dry run: the runaway breaker would have paused" in sent.alerts[0][0].text
    assert [e[b"action"] for _id, e in r.xrange(AUDIT)] == [b"breaker.dry_run"]


def test_a_resumed_key_starts_over(redis_url: str, r: redis.Redis) -> None:
    r.flushall()
    t0 = time.time_ns() // 1_000_000 - 60_000  # a resume is stamped with the wall clock
    clock = Clock(t0 + 60_000)

    async def body(client: Any) -> list[int]:
        _secret, identity = await KeyStore(client).create("dev", "loop")
        _write_loop(r, identity.key_id, "loop", 25, t0)
        watch = RunawayWatch(client, lambda: POLICY, Sent(), now_ms=clock)
        counts = [len(await watch.check_once())]
        await PauseStore(client).resume("dev", identity.key_id, "lena@example.com")
        counts.append(len(await watch.check_once()))  # the old copies no longer count
        _write_loop(r, identity.key_id, "loop", 25, time.time_ns() // 1_000_000 + 1)  # new do
        counts.append(len(await watch.check_once()))
        return counts

    assert run_with_redis(redis_url, body) == [1, 0, 1]


def test_grants_end_on_time_and_the_requester_hears(redis_url: str, r: redis.Redis) -> None:
    r.flushall()
    t0 = 1_796_000_000_000
    clock = Clock(t0)

    async def body(client: Any) -> tuple[Sent, list[str], dict[str, int], dict[str, int]]:
        _secret, identity = await KeyStore(client).create("dev", "loop")
        store = TopupStore(client, now_ms=clock)
        ask = new_request(POLICY, identity, scope="ws", amount_nanos=10**9, until_ms=t0 + 5000,
                          reason="demo", now_ms=t0, notify_url="")  # fmt: skip
        ask = type(ask)(**{**{f: getattr(ask, f) for f in ask.__dataclass_fields__},
                           "notify_url": "http://127.0.0.1:9/me"})  # fmt: skip
        await store.add(ask)
        await store.approve(ask.request_id, "lena@example.com")
        live = LiveState(client, lambda: POLICY)
        await live.refresh()
        before = dict(live.topups("dev", t0 + 4999))
        after = dict(live.topups("dev", t0 + 5000))  # ends on time, swept or not
        sent = Sent()
        watch = RunawayWatch(client, lambda: POLICY, sent, now_ms=clock)
        await watch.check_once()
        assert sent.alerts == []
        clock.ms = t0 + 5000
        await watch.check_once()
        await live.refresh()
        assert live.grants("dev") == ()
        return sent, [e[b"action"].decode() for _id, e in r.xrange(AUDIT)], before, after

    sent, actions, before, after = run_with_redis(redis_url, body)
    assert before == {"ws": 10**9} and after == {}
    [(alert, to)] = sent.alerts
    assert alert.event == "topup_expired" and to == ["http://127.0.0.1:9/me"]
    assert "its hard limit is the policy's again" in alert.text
    assert actions == ["topup.expire"]


def test_the_live_cache_follows_notices_and_builds_refusals(redis_url: str, r: redis.Redis) -> None:
    r.flushall()

    async def body(client: Any) -> list[int]:
        live = LiveState(client, lambda: POLICY, refresh_seconds=60, console_url="http://c")
        keys = KeyStore(client)
        from extproc.governance.keys import KeyCache

        cache = KeyCache(keys)
        cache.on_notice = live.on_notice
        tasks = [asyncio.ensure_future(cache.run()), asyncio.ensure_future(live.run())]
        try:
            await asyncio.wait_for(cache.ready.wait(), 10)
            await asyncio.wait_for(live.ready.wait(), 10)
            seen = [len(live.refusals)]
            _s, identity = await keys.create("dev", "loop")
            pause = Pause(identity.key_id, "dev", "loop", "manual", "testing", 1, "ops")
            waiting = live.next_refresh()
            assert await PauseStore(client).pause(pause)
            await asyncio.wait_for(waiting, 10)  # the notice, not the 60 s refresh
            seen.append(len(live.refusals))
            assert live.refusals[identity.key_id].code == "key_paused"
            assert "http://c/keys" in live.refusals[identity.key_id].message
            waiting = live.next_refresh()
            await PauseStore(client).resume("dev", identity.key_id, "ops")
            await asyncio.wait_for(waiting, 10)
            seen.append(len(live.refusals))
            return seen
        finally:
            for task in tasks:
                task.cancel()

    assert run_with_redis(redis_url, body) == [0, 1, 0]


def test_another_replica_takes_over_when_the_lease_lapses(redis_url: str, r: redis.Redis) -> None:
    r.flushall()
    t0 = 1_796_000_000_000

    async def body(client: Any) -> list[bool]:
        _secret, identity = await KeyStore(client).create("dev", "loop")
        one = RunawayWatch(client, lambda: POLICY, Sent(), now_ms=Clock(t0 + 60_000))
        two = RunawayWatch(client, lambda: POLICY, Sent(), now_ms=Clock(t0 + 60_000))
        await one.check_once()
        await two.check_once()
        r.delete(BREAKER_LEADER)  # the first replica stopped renewing (it died): it lapses
        _write_loop(r, identity.key_id, "loop", 25, t0)
        trips = await two.check_once()  # the second leads now, from the window back
        await one.check_once()  # and the first, back, stands by
        return [two.leading, one.leading, len(trips) == 1]

    assert run_with_redis(redis_url, body) == [True, False, True]


def test_the_baseline_is_the_last_week_without_the_runaway_hours() -> None:
    from datetime import UTC, datetime

    hours = baseline_hours(datetime(2026, 12, 7, 14, 35, tzinfo=UTC))
    assert len(hours) == 168 and hours[0] == "2026-12-07T12" and hours[-1] == "2026-11-30T13"
