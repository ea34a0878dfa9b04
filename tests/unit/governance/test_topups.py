"""Top-ups: the request checks (each error names its field), the cap arithmetic, and the
store's decisions against a real Redis (each one atomic, announced, and each expiry once)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest
import redis
import redis.asyncio as aioredis

from extproc.governance.budget import Budgets, plan_request, with_topups
from extproc.governance.keys import Identity
from extproc.governance.policy import parse_policy_text
from extproc.governance.topups import (
    AUTO,
    Grant,
    TopupError,
    TopupRequest,
    TopupStore,
    auto_approvable,
    grants_from,
    live_topups,
    new_request,
    next_weekday,
    parse_until,
    parse_usd,
    scope_team,
)
from extproc.metering.prices import NANOS_PER_DOLLAR, PriceTable
from extproc.store.schema import KEYS_CHANNEL, topup_auto_key, topups_key, workspace_prefix

BERLIN = ZoneInfo("Europe/Berlin")
T = TypeVar("T")
NOW = int(datetime(2026, 12, 4, 16, 30, tzinfo=BERLIN).timestamp() * 1000)  # a Friday
POLICY = parse_policy_text(
    """
version: 1
timezone: Europe/Berlin
defaults: {default_output_cap: 100, hard_limit: 100%}
workspaces:
  dev:
    budget_usd: 100
    upstream: {key_env: X}
    approvers: {people: [lena@example.com], webhook: "https://hooks.slack.com/services/dev"}
    topups:
      max_usd: 50
      max_days: 14
      auto_approve: {services: [ci], under_usd: 5, period_max_usd: 8}
      requester_webhooks: ["https://hooks.slack.com/", "http://127.0.0.1:"]
    teams:
      platform: {budget_usd: 40, approvers: {groups: [leads-platform]}}
    services:
      cli: {team: platform}
      ci: {}
"""
)
CLI = Identity("key_cli", "dev", "platform", "cli", "ana@example.com", 0)
CI = Identity("key_ci", "dev", None, "ci", None, 0)


def ask(identity: Identity = CLI, **changes: Any) -> TopupRequest:
    fields: dict[str, Any] = {
        "scope": "ws",
        "amount_nanos": 20 * NANOS_PER_DOLLAR,
        "until_ms": next_weekday(NOW, BERLIN),
        "reason": "release week",
        "now_ms": NOW,
    }
    fields.update(changes)
    return new_request(POLICY, identity, **fields)


# --- the checks --------------------------------------------------------------------------------


def test_a_request_names_its_budget_amount_time_and_reason() -> None:
    r = ask()
    assert r.request_id.startswith("tu_") and r.status == "pending"
    assert (r.workspace, r.scope, r.label, r.team) == ("dev", "ws", "workspace dev", "platform")
    assert (r.key_id, r.service, r.owner) == ("key_cli", "cli", "ana@example.com")
    monday = datetime.fromtimestamp(r.until_ms / 1000, BERLIN)
    assert (monday.strftime("%A %H:%M"), monday.date().isoformat()) == (
        "Monday 00:00",
        "2026-12-07",
    )
    assert ask(scope="team:platform").label == "team dev/platform"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"scope": "svc:ci"}, "scope: 'svc:ci' is not a budget of this key"),
        ({"scope": "svc:cli"}, "scope: 'svc:cli' is not a budget of this key with a hard limit "
         "(yours: ws, team:platform)"),
        ({"scope": "key:key_cli"}, "scope: 'key:key_cli' is not a budget of this key"),
        ({"amount_nanos": 51 * NANOS_PER_DOLLAR}, "amount_usd: at most $50.00 per request "
         "(workspaces.dev.topups.max_usd)"),
        ({"until_ms": NOW}, "until: must be in the future"),
        ({"until_ms": NOW + 15 * 86_400_000}, "until: at most 14 days ahead "
         "(workspaces.dev.topups.max_days)"),
        ({"reason": "  "}, "reason: say why"),
        ({"reason": "x" * 501}, "reason: at most 500 printable characters"),
        ({"notify_url": "ftp://x"}, "notify_url: must be an http:// or https:// URL"),
        ({"notify_url": "https://evil.example/hook"}, "notify_url: must start with one of "
         "https://hooks.slack.com/, http://127.0.0.1: (workspaces.dev.topups.requester_webhooks)"),
    ],
)  # fmt: skip
def test_each_wrong_field_is_named(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(TopupError) as info:
        ask(**changes)
    assert str(info.value).startswith(message), str(info.value)


def test_amounts_and_times_parse_as_people_write_them() -> None:
    assert parse_usd("20") == parse_usd("$20.00") == parse_usd(20) == 20 * NANOS_PER_DOLLAR
    assert parse_usd("0.000000001") == 1
    wrong = [("0", "more than $0"), ("-3", "more than $0"), ("lots", "not an amount"),
             ("0.0000000001", "more than 9 decimal places"), ("nan", "more than $0")]  # fmt: skip
    for bad, why in wrong:
        with pytest.raises(TopupError, match=f"amount_usd: .*{re.escape(why)}"):
            parse_usd(bad)
    end = 1_800_000_000_000
    assert parse_until("period", BERLIN, end) == parse_until("", BERLIN, end) == end
    assert parse_until("Monday", BERLIN, end, NOW) == next_weekday(NOW, BERLIN)
    assert parse_until("2026-12-07T09:30", BERLIN, end) == int(
        datetime(2026, 12, 7, 9, 30, tzinfo=BERLIN).timestamp() * 1000
    )
    assert parse_until("2026-12-07", BERLIN, end) == next_weekday(NOW, BERLIN)
    assert parse_until("2026-12-07T08:00Z", BERLIN, end) == int(
        datetime(2026, 12, 7, 9, 0, tzinfo=BERLIN).timestamp() * 1000
    )
    with pytest.raises(TopupError, match="until: not a time"):
        parse_until("next tuesday-ish", BERLIN, end)
    # On a Monday, "monday" is the next one, never today's midnight (already past).
    monday_noon = int(datetime(2026, 12, 7, 12, tzinfo=BERLIN).timestamp() * 1000)
    assert datetime.fromtimestamp(next_weekday(monday_noon, BERLIN) / 1000, BERLIN).day == 14


def test_approvers_of_a_scope_are_its_teams() -> None:
    ws = POLICY.workspaces["dev"]
    assert scope_team(ws, "ws") is None
    assert scope_team(ws, "team:platform") == "platform"
    assert scope_team(ws, "svc:cli") == "platform"  # the service's team approves it
    assert scope_team(ws, "svc:ci") is None


def test_auto_approval_needs_the_service_the_line_and_room_this_period() -> None:
    ws = POLICY.workspaces["dev"]
    small = ask(CI, amount_nanos=4 * NANOS_PER_DOLLAR)
    assert auto_approvable(ws, small, [], BERLIN)
    assert not auto_approvable(ws, ask(CI, amount_nanos=5 * NANOS_PER_DOLLAR), [], BERLIN)
    assert not auto_approvable(ws, ask(CLI, amount_nanos=1 * NANOS_PER_DOLLAR), [], BERLIN)
    granted = TopupRequest(
        **_fields(small, decided_by=AUTO, status="approved", granted_nanos=4 * NANOS_PER_DOLLAR)
    )
    assert granted.auto
    assert auto_approvable(ws, small, [granted], BERLIN)  # 4 + 4 <= 8
    assert not auto_approvable(ws, small, [granted, granted], BERLIN)  # 12 > 8
    # Last period's automatic grants do not count against this one.
    old = _fields(granted, created_ms=NOW - 40 * 86_400_000)
    assert auto_approvable(ws, small, [TopupRequest(**old)] * 5, BERLIN)


def _fields(r: TopupRequest, **changes: Any) -> dict[str, Any]:
    return {**{f: getattr(r, f) for f in r.__dataclass_fields__}, **changes}


# --- the cap -------------------------------------------------------------------------------------


def test_live_grants_raise_their_scope_until_their_time() -> None:
    grants = grants_from(
        {
            b"tu_a": b"ws|5000|2000",
            "tu_b": "ws|7000|1000",
            "tu_c": "team:platform|3|5000",
            "tu_bad": "ws|x|1",
        }
    )
    assert [g.grant_id for g in grants] == ["tu_b", "tu_a", "tu_c"]
    assert Grant.decode("tu", "svc:a|b|1") is None
    assert live_topups(grants, 999) == {"ws": 12_000, "team:platform": 3}
    assert live_topups(grants, 1000) == {"ws": 5000, "team:platform": 3}  # ends at until_ms
    assert live_topups(grants, 5000) == {}
    plan = plan_request(
        POLICY, CLI, model="gpt-4o-mini", counted_input=10, output_cap=10,
        prices=PriceTable.load(), now_ms=NOW,
    )  # fmt: skip
    raised = with_topups(plan, {"ws": 5000, "svc:other": 9})
    by = {s.scope: s for s in raised.scopes}
    assert by["ws"].hard_nanos == 100 * NANOS_PER_DOLLAR + 5000 and by["ws"].topup_nanos == 5000
    assert by["team:platform"].hard_nanos == 40 * NANOS_PER_DOLLAR
    assert by["key:key_cli"].hard_nanos is None  # uncapped scopes stay uncapped
    assert with_topups(plan, {}) is plan


# --- the store, on a real Redis ----------------------------------------------------------------


def run(redis_url: str, body: Callable[[TopupStore, Any], Awaitable[T]], now: list[int]) -> T:
    async def main() -> T:
        client = aioredis.from_url(redis_url)
        try:
            return await body(TopupStore(client, now_ms=lambda: now[0]), client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_approve_deny_revoke_and_expire(redis_url: str, r: redis.Redis) -> None:
    now = [NOW]
    notices = r.pubsub()
    notices.subscribe(KEYS_CHANNEL)

    async def body(store: TopupStore, client: Any) -> None:
        a, b, c = ask(), ask(reason="another"), ask(scope="team:platform", notify_url="")
        for req in (a, b, c):
            await store.add(req)
        listed = {x.request_id for x in await store.list("dev")}
        assert listed == {a.request_id, b.request_id, c.request_id}
        until = NOW + 60_000
        done = await store.approve(a.request_id, "lena@example.com", until_ms=until, note="ok")
        assert (done.status, done.granted_nanos, done.granted_until_ms) == (
            "approved",
            20 * NANOS_PER_DOLLAR,
            until,
        )
        with pytest.raises(TopupError, match="is approved, not pending"):
            await store.approve(a.request_id, "someone")
        with pytest.raises(TopupError, match=r"at most the \$20.00 asked"):
            await store.approve(b.request_id, "x", nanos=21 * NANOS_PER_DOLLAR)
        with pytest.raises(TopupError, match="no later than asked"):
            await store.approve(b.request_id, "x", until_ms=b.until_ms + 1)
        denied = await store.deny(b.request_id, "lena@example.com", "not this week")
        assert (denied.status, denied.note) == ("denied", "not this week")
        granted = await store.approve(c.request_id, "lead", nanos=3 * NANOS_PER_DOLLAR)
        assert live_topups(await store.grants("dev"), NOW) == {
            "ws": 20 * NANOS_PER_DOLLAR, "team:platform": 3 * NANOS_PER_DOLLAR}  # fmt: skip
        ended = await store.revoke(granted.request_id, "admin", "enough")
        assert ended.status == "revoked" and ended.ended_ms == NOW
        assert [g.grant_id for g in await store.grants("dev")] == [a.request_id]
        assert await store.expire("dev", until - 1) == []
        now[0] = until
        first = await store.expire("dev", until)
        assert [x.request_id for x in first] == [a.request_id]
        assert first[0].status == "expired" and first[0].ended_ms == until
        assert await store.expire("dev", until) == []  # each expiry is reported once
        assert (await store.get(a.request_id)).state(until) == "expired"  # type: ignore[union-attr]
        assert await store.get("tu_nothing") is None

    run(redis_url, body, now)
    seen = []
    while (m := notices.get_message(timeout=1.0)) is not None:
        if m["type"] == "message":
            seen.append(m["data"].decode())
    # Two grants made, one ended early: each announced (the expiry needs no notice: a grant
    # past its time counts nowhere).
    assert all(n.startswith("topup dev tu_") for n in seen) and len(seen) == 3, seen
    assert r.hgetall(topups_key("dev")) == {}
    assert workspace_prefix("dev") in topups_key("dev")


def test_budgets_reserve_against_the_raised_cap(redis_url: str, r: redis.Redis) -> None:
    """The sidecar's reservation sees a grant the moment its cache has it, and not after."""
    tiny = parse_policy_text(
        "version: 1\ndefaults: {default_output_cap: 100, hard_limit: 100%}\nworkspaces:\n"
        "  dev: {budget_usd: '0.00001', upstream: {key_env: X}, services: {cli: {}}}\n"
    )
    who = Identity("key_a", "dev", None, "cli", None, 0)
    live: dict[str, dict[str, int]] = {}

    async def body(store: TopupStore, client: Any) -> list[str]:
        budgets = Budgets(client, topups=lambda ws, now: live.get(ws, {}))
        plan = plan_request(tiny, who, model="gpt-4o-mini", counted_input=1000, output_cap=100,
                            prices=PriceTable.load(), now_ms=NOW)  # fmt: skip
        out = [(await budgets.reserve(plan, False, NOW)).reason]
        live["dev"] = {"ws": plan.reserve_nanos}
        decision = await budgets.reserve(plan, False, NOW)
        out.append(decision.reason)
        out.append(str(decision.standings[0].scope.topup_nanos == plan.reserve_nanos))
        return out

    assert run(redis_url, body, [NOW]) == ["budget", "ok", "True"]


def test_auto_approval_holds_its_period_ceiling_against_requests_made_together(
    redis_url: str, r: redis.Redis
) -> None:
    """Two replicas each see the period's auto grants below the ceiling and approve at once:
    the approve script counts and checks in one step, so one of them must wait for a person."""
    four = 4 * NANOS_PER_DOLLAR
    ceiling = ("2026-12", 5 * NANOS_PER_DOLLAR, 3600)  # room for one $4 grant, not two

    async def body(store: TopupStore, client: Any) -> list[str]:
        a, b = ask(CI, amount_nanos=four), ask(CI, amount_nanos=four, reason="again")
        for req in (a, b):
            await store.add(req)
        outcomes = await asyncio.gather(
            *(store.approve(x.request_id, AUTO, auto_ceiling=ceiling) for x in (a, b)),
            return_exceptions=True,
        )
        states = [(await store.get(x.request_id)).status for x in (a, b)]  # type: ignore[union-attr]
        assert sorted(type(o).__name__ for o in outcomes) == ["AutoLimitReached", "TopupRequest"]
        return sorted(states)

    assert run(redis_url, body, [NOW]) == ["approved", "pending"]
    assert r.hget(topup_auto_key("dev", "2026-12"), "ws") == str(four).encode()
    assert 0 < r.ttl(topup_auto_key("dev", "2026-12")) <= 3600
