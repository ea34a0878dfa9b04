"""Admission as values: each decision before forwarding comes back as `Admitted` or `Refusal`,
never as a callback into a handler.

With small fakes for the budgets (scripted decisions), the real policy, prices, routing and
guard; the overdraft is also run against a real Redis-protocol server and the real
`Budgets`, whose reserve script is the one that decides at the cap.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import redis

from extproc.dataplane import admission
from extproc.dataplane.admission import Admitted, Refusal
from extproc.dataplane.deps import Deps
from extproc.governance.budget import Budgets, Decision, Plan, plan_request
from extproc.governance.keys import Identity
from extproc.governance.policy import parse_policy_text
from extproc.metering.decisions import Observed, PreparedRequest, parse_request
from extproc.metering.passthrough import PassthroughSeen
from extproc.metering.tokens import count_text
from extproc.store.clients import make_client
from extproc.store.schema import held_key, spent_key, workspace_prefix
from extproc.wire.paths import classify
from extproc.wire.spec import CHAT, PRICED
from tests.unit.dataplane.fakes import (
    CALLER,
    POLICY,
    PRICES,
    T0,
    FakeBudgets,
    FakeKeys,
    budget_denial,
    budgets,
    make_deps,
)

CI = Identity("key_ci", "ci", None, "pr-review-bot", None, 0)
IDE = Identity("key_ide", "dev", None, "ide-assistant", None, 0)


def prepared(body: dict[str, object]) -> PreparedRequest:
    assert CHAT.reader is not None
    raw = json.dumps(body).encode()
    return parse_request(CHAT.reader, raw, "", max_body_bytes=1 << 20, count=count_text)


def seen_of(ready: PreparedRequest, session: str = "") -> Observed:
    return Observed(
        request_id="rid-req",
        time_ms=T0,
        spec=CHAT,
        session_id=session,
        facts=ready.facts,
        counted_input_tokens=ready.counted_input_tokens,
    )


def admit(
    deps: Deps, identity: Identity, body: dict[str, object], session: str = ""
) -> Admitted | Refusal:
    ready = prepared(body)
    return asyncio.run(admission.admit(deps, identity, seen_of(ready, session), ready, None))


def chat(model: str = "gpt-5-mini", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "fix the lint"}], **extra}


def test_an_admitted_request_carries_its_route_plan_and_reservation(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    got = admit(deps, CALLER, chat(), session="sess-1")
    assert isinstance(got, Admitted) and got.route is not None
    assert (got.route.model, got.decision.reservation_id, got.output_cap) == (
        "gpt-5-mini",
        "rid-1",
        None,
    )
    fake = budgets(deps)
    assert fake.plans == [got.plan] and fake.sessions == ["sess-1"]
    assert fake.fail_open == [True]  # dev fails open (`on_redis_down: open`)
    orphan = fake.orphan_settlements()[0]
    assert (orphan.record.outcome, orphan.record.estimated, orphan.reservation_id) == (
        "orphaned",
        True,
        "",
    )
    assert orphan.record.model_served == "gpt-5-mini" and orphan.record.key_id == "key_unit"
    assert [s.scope for s in orphan.scopes][:4] == [s.scope for s in got.plan.scopes]


def test_routing_decides_before_the_hold_and_its_refusals_hold_nothing(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    prod = Identity("key_p", "prod", None, "docs-search", None, 0)
    got = admit(deps, prod, chat("o3-pro"))  # prod serves its default for a model it forbids
    assert isinstance(got, Admitted) and got.route is not None and got.route.model == "gpt-5-mini"
    assert budgets(deps).plans == [got.plan] and got.plan.scopes[0].label == "workspace prod"
    huge = admit(deps, IDE, chat(messages=[{"role": "user", "content": "x " * 310_000}]))
    assert isinstance(huge, Refusal) and huge.error.code == "input_tokens_over_limit"
    assert len(budgets(deps).plans) == 1 and huge.plan is None


def test_a_model_nothing_prices_is_refused_when_the_workspace_refuses_them(
    executor: ThreadPoolExecutor,
) -> None:
    policy = parse_policy_text(
        "version: 1\nworkspaces:\n  dev:\n    budget_usd: 10\n"
        "    upstream: {key_env: TEST_UPSTREAM}\n    pricing: {unknown_models: refuse}\n"
    )
    deps = make_deps(executor, policy=policy)
    told: list[tuple[str, str, bool]] = []

    class Sink:
        def seen(self, model: str, workspace: str, *, admitted: bool, price: str = "") -> None:
            told.append((model, workspace, admitted))

    deps.new_models = Sink()
    got = admit(deps, Identity("k", "dev", None, "cli", None, 0), chat("gpt-9-unreleased"))
    assert isinstance(got, Refusal) and got.decision is None and got.plan is None
    assert got.error.code == "model_not_priced"
    assert budgets(deps).plans == [] and told == [("gpt-9-unreleased", "dev", False)]


def test_a_budget_denial_is_a_refusal_that_says_what_would_have_fitted(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor, refuse=True)
    got = admit(deps, CI, chat())
    assert isinstance(got, Refusal) and got.decision is not None and got.plan is not None
    assert (got.error.status, got.error.code) == (429, "insufficient_quota")
    assert got.headers["x-should-retry"] == "false"
    assert got.decision.reason == "budget" and got.plan is budgets(deps).plans[0]


def test_at_the_cap_the_overdraft_model_is_reserved_with_raised_caps(
    executor: ThreadPoolExecutor,
) -> None:
    asked: list[Plan] = []

    def answer(plan: Plan) -> Decision:
        asked.append(plan)
        return budget_denial(plan) if len(asked) == 1 else Decision(True, "ok", "rid-od")

    deps = make_deps(executor, budgets=FakeBudgets(answer=answer))
    got = admit(deps, CALLER, chat("gpt-5-mini"))
    assert isinstance(got, Admitted) and got.route is not None
    first, second = asked
    overdraft = 5 * 10**9  # dev's `overdraft: {model: gpt-5-nano, usd: 5}`
    assert got.route.model == "gpt-5-nano" and got.plan is second
    assert [s.kind for s in got.route.steps][-1] == "overdraft"
    assert second.scopes[0].hard_nanos == (first.scopes[0].hard_nanos or 0) + overdraft
    orphans = [o.record.model_served for o in budgets(deps).orphan_settlements()]
    assert orphans == ["gpt-5-mini", "gpt-5-nano"]  # each hold carries its own route's orphan
    assert budgets(deps).exact == [False, True]  # the overdraft's hold is never a lease's


def test_the_session_guard_refuses_after_the_hold_so_the_refusal_releases_it(
    executor: ThreadPoolExecutor,
) -> None:
    total = 5_000_001  # dev's max_session_input_tokens is 5,000,000; ide-assistant rejects
    deps = make_deps(
        executor,
        budgets=FakeBudgets(
            answer=lambda plan: Decision(True, "ok", "rid-s", session_tokens=total)
        ),
    )
    got = admit(deps, IDE, chat(), session="long")
    assert isinstance(got, Refusal) and got.decision is not None
    assert (got.error.status, got.error.code) == (413, "session_input_tokens_over_limit")
    assert got.decision.reservation_id == "rid-s"  # the refusal's settlement releases it
    downgraded = admit(make_deps(executor, budgets=deps.budgets), CALLER, chat(), session="long")
    assert isinstance(downgraded, Admitted) and downgraded.route is not None  # codex-cli
    assert downgraded.route.model == "gpt-5-nano" and downgraded.route.downgraded


def test_an_enforced_default_output_cap_is_shared_between_outputs(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    got = admit(deps, CI, chat(n=3))
    assert isinstance(got, Admitted)
    assert got.output_cap == POLICY.workspaces["ci"].default_output_cap // 3
    stated = admit(deps, CI, chat(max_completion_tokens=50))
    assert isinstance(stated, Admitted) and stated.output_cap is None  # the caller's own stands


def test_redis_down_refuses_or_passes_as_the_workspace_chooses(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    keys = deps.keys
    assert isinstance(keys, FakeKeys)
    keys.down = True
    assert asyncio.run(admission.revocation(deps, CALLER)) is None  # dev fails open
    closed = asyncio.run(admission.revocation(deps, CI))  # ci fails closed
    assert closed is not None and closed.error.status == 503
    assert closed.headers["retry-after"] == "2"
    assert closed.decision is not None and closed.decision.reason == "redis_down"
    keys.down = False
    keys.revoked = frozenset({"key_ci"})
    revoked = asyncio.run(admission.revocation(deps, CI))
    assert revoked is not None and revoked.error.code == "invalid_api_key"


def test_a_priced_passthrough_call_holds_the_ceiling_and_refuses_unpriced_models(
    executor: ThreadPoolExecutor,
) -> None:
    deps = make_deps(executor)
    spec = PRICED["responses.compact"]
    assert spec.reader is not None
    body = {"model": "gpt-5-mini", "input": "a history"}
    ready = parse_request(
        spec.reader, json.dumps(body).encode(), "", max_body_bytes=1 << 20, count=count_text
    )
    seen = PassthroughSeen("rid-p", T0, classify("POST", spec.path))
    seen.counted_input_tokens = ready.counted_input_tokens
    got = asyncio.run(admission.hold(deps, CALLER, seen, ready.facts))
    assert isinstance(got, Admitted) and got.route is None
    assert got.plan.tokens == ready.counted_input_tokens + (spec.output_ceiling or 0)
    nameless = parse_request(
        spec.reader,
        json.dumps({**body, "model": "gpt-9-unlisted"}).encode(),
        "",
        max_body_bytes=1 << 20,
        count=count_text,
    )
    refused = asyncio.run(admission.hold(deps, CALLER, seen, nameless.facts))
    assert isinstance(refused, Refusal) and refused.error.code == "unpriced_model_not_allowed"
    assert len(budgets(deps).plans) == 1  # nothing held for the refused one


# --- the overdraft against real Redis ---------------------------------------------------


def test_at_the_hard_cap_the_overdraft_admits_only_what_fits_beyond_it(
    r: redis.Redis, redis_url: str, executor: ThreadPoolExecutor, tmp_path: Path
) -> None:
    """The reserve script decides: the overdraft model's hold fits beyond the cap once,
    then what is left of the overdraft no longer holds another."""
    body = chat("gpt-4o", max_completion_tokens=10)
    counted = prepared(body).counted_input_tokens
    text = """
version: 1
timezone: Europe/Berlin
defaults: {hard_limit: 100%, default_output_cap: 100}
workspaces:
  dev:
    budget_usd: "0.0021"
    upstream: {key_env: TEST_UPSTREAM}
    routing: {overdraft: {model: gpt-4o-mini, usd: "OVERDRAFT"}}
    services:
      cli: {}
"""
    who = Identity("key_a", "dev", None, "cli", None, 0)
    draft = parse_policy_text(text.replace("OVERDRAFT", "1"))
    cheap = plan_request(
        draft, who, model="gpt-4o-mini", counted_input=counted, output_cap=10, prices=PRICES,
        now_ms=T0,
    )  # fmt: skip
    overdraft = cheap.reserve_nanos * 3 // 2  # room for one cheap request past the cap
    policy = parse_policy_text(text.replace("OVERDRAFT", str(Decimal(overdraft) / 10**9)))
    hard = policy.workspaces["dev"].hard_nanos
    r.hset(spent_key(workspace_prefix("dev"), cheap.period.id), "ws", hard)  # spent to the cap

    async def main() -> list[Admitted | Refusal]:
        client = make_client(redis_url)
        try:
            deps = make_deps(executor, policy=policy, budgets=Budgets(client))
            out = []
            for _ in range(3):
                ready = prepared(body)
                out.append(await admission.admit(deps, who, seen_of(ready), ready, None))
            return out
        finally:
            await client.aclose()

    first, second, third = asyncio.run(main())
    assert isinstance(first, Admitted) and first.route is not None
    assert first.route.model == "gpt-4o-mini"
    assert first.plan.scopes[0].hard_nanos == hard + overdraft
    for refused in (second, third):
        assert isinstance(refused, Refusal) and refused.decision is not None
        assert refused.decision.reason == "budget" and refused.error.code == "insufficient_quota"
    held = r.hget(held_key(workspace_prefix("dev"), cheap.period.id), "ws")
    assert int(held or 0) == cheap.reserve_nanos
