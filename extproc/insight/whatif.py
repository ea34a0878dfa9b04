"""Policy what-if: replay the ledger under a candidate policy.

A platform team changing a budget or a routing rule wants to know, before it bites: how
many requests would have been refused or moved to another model, what the period would
have cost, and on which day each budget would have crossed its soft and its hard limit.
The ledger has every request that was served, with its tokens, so the candidate's budget
plans and routing decisions (the same functions the data path calls) can be run over it in
time order, with the candidate's own running spend.

`replay` is a pure function of the candidate policy, the records and the price table.
What it cannot know, it says: requests the current policy refused have no tokens from the
provider (counted, never replayed), and a refused request's cost simply disappears from
the candidate's spend (a developer may well have retried on a cheaper model; we do not
guess). Reservations are checked as the reserve script checks them (spent plus the
request's worst case against the hard limit, raised by the top-ups granted at the time),
one request at a time.

The candidate's runaway breaker (`breaker:`) runs over the same records with their own
clock: the replay lists which keys it would have paused, when and why, and what those keys
spent afterwards (at most what the pause would have saved: nobody knows when a person
would have resumed them). Keys the policy in force paused are among `already_refused`.

A change is measured against what actually happened, not against what was asked for: a
request the policy in force already served on a cheaper model, and the candidate would
serve on that same model, is no change (counted as `already_rerouted`); one the candidate
would serve on another model than it was served on is reported from the served model to
the candidate's, and repriced.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from extproc.governance.breaker import Detector, Seen, Trip
from extproc.governance.budget import plan_request, with_topups
from extproc.governance.keys import Identity
from extproc.governance.periods import period_at
from extproc.governance.policy import Policy, model_key
from extproc.governance.topups import TopupRequest
from extproc.metering.prices import PriceTable
from extproc.routing.decide import BudgetState, Traits, decide_route
from extproc.store.schema import UNATTRIBUTED, team_of
from extproc.v1.ledger_pb2 import UsageRecord
from extproc.wire.usage import Usage

DOWNGRADES = frozenset({"degrade", "overdraft", "context", "rule", "ceiling", "alias"})


@dataclass
class ScopeOutcome:
    workspace: str
    scope: str
    label: str
    period: str
    soft_nanos: int | None
    hard_nanos: int | None
    spent_nanos: int = 0
    soft_crossed: str | None = None  # local date the soft limit was crossed
    hard_crossed: str | None = None  # local date the hard limit stopped a request (or was met)

    def to_dict(self) -> dict[str, Any]:
        return {
            "workspace": self.workspace,
            "scope": self.scope,
            "label": self.label,
            "period": self.period,
            "spent_nanos": self.spent_nanos,
            "soft_nanos": self.soft_nanos,
            "hard_nanos": self.hard_nanos,
            "soft_crossed_on": self.soft_crossed,
            "hard_crossed_on": self.hard_crossed,
        }


@dataclass
class WhatIf:
    replayed: int = 0
    refused: int = 0
    refused_by: Counter[str] = field(default_factory=Counter)
    downgraded: Counter[tuple[str, str]] = field(default_factory=Counter)
    already_refused: int = 0  # refused by the policy in force: no usage to replay
    already_rerouted: int = 0  # served on another model than asked, as the candidate would
    actual_nanos: int = 0
    candidate_nanos: int = 0
    scopes: dict[tuple[str, str, str], ScopeOutcome] = field(default_factory=dict)
    trips: list[Trip] = field(default_factory=list)
    after_trip_nanos: Counter[str] = field(default_factory=Counter)  # key id -> spent after

    def to_dict(self) -> dict[str, Any]:
        return {
            "replayed_requests": self.replayed,
            "refused_requests": self.refused,
            "refused_by": dict(self.refused_by),
            "downgraded_requests": sum(self.downgraded.values()),
            "downgrades": [
                {"from": a, "to": b, "requests": n} for (a, b), n in self.downgraded.most_common()
            ],
            "already_refused_requests": self.already_refused,
            "already_rerouted_requests": self.already_rerouted,
            "actual_nanos": self.actual_nanos,
            "candidate_nanos": self.candidate_nanos,
            "difference_nanos": self.candidate_nanos - self.actual_nanos,
            "scopes": [
                s.to_dict()
                for s in sorted(
                    self.scopes.values(), key=lambda s: (s.workspace, s.period, s.scope)
                )
                if s.hard_nanos is not None or s.soft_nanos is not None
            ],
            "breaker_trips": [
                {
                    "workspace": t.workspace,
                    "key_id": t.key_id,
                    "service": t.service,
                    "rule": t.rule,
                    "mode": t.mode,
                    "at_ms": t.at_ms,
                    "why": t.why,
                    "spent_after_nanos": self.after_trip_nanos[t.key_id],
                }
                for t in self.trips
            ],
        }


def _identity(record: UsageRecord) -> Identity:
    return Identity(
        key_id=record.key_id or "unknown",
        workspace=record.workspace,
        team=record.team or None,
        service=record.service,
        owner=None,
        expires_ms=0,
    )


def _usage(record: UsageRecord) -> Usage:
    return Usage(
        input_tokens=record.input_tokens,
        cached_input_tokens=record.cached_input_tokens,
        output_tokens=record.output_tokens,
        reasoning_tokens=record.reasoning_tokens,
    )


def granted_at(topups: Iterable[TopupRequest], workspace: str, time_ms: int) -> dict[str, int]:
    """Scope -> what top-ups granted in `workspace` added to its hard limit at `time_ms`."""
    out: dict[str, int] = {}
    for r in topups:
        if r.workspace != workspace or not r.granted_nanos or r.status == "denied":
            continue
        ends = min(r.granted_until_ms, r.ended_ms or r.granted_until_ms)
        if r.decided_ms <= time_ms < ends:
            out[r.scope] = out.get(r.scope, 0) + r.granted_nanos
    return out


def replay(
    candidate: Policy,
    records: Iterable[UsageRecord],
    prices: PriceTable,
    topups: Sequence[TopupRequest] = (),
) -> WhatIf:
    """What `candidate` would have done with `records` (any order; replayed oldest first),
    with the top-ups `topups` granted (their amounts, from approval to end)."""
    tz = candidate.timezone
    out = WhatIf()
    breaker = Detector(
        lambda ws, svc: (
            candidate.workspaces[ws].breaker_for(svc) if ws in candidate.workspaces else None
        )
    )
    tripped: set[str] = set()
    for record in sorted(records, key=lambda r: (r.time_ms, r.request_id)):
        if not record.workspace or record.workspace == UNATTRIBUTED:
            continue
        if record.outcome == "rejected":
            out.already_refused += 1
            continue
        _breaker(out, breaker, record, tripped)
        out.replayed += 1
        out.actual_nanos += record.cost_nanos
        ws = candidate.workspaces.get(record.workspace)
        if ws is None or record.service not in ws.services:
            out.refused += 1
            out.refused_by["unknown_key"] += 1
            continue
        identity = _identity(record)
        day = datetime.fromtimestamp(record.time_ms / 1000, tz).date().isoformat()
        requested = record.model_requested or record.model_served
        plan = plan_request(
            candidate,
            identity,
            model=requested,
            counted_input=record.counted_input_tokens or record.input_tokens,
            output_cap=record.output_cap or None,
            prices=prices,
            now_ms=record.time_ms,
        )
        granted = granted_at(topups, record.workspace, record.time_ms) if topups else {}
        period = period_at(ws.period, record.time_ms, tz).id
        states = []
        for s in plan.scopes:
            key = (record.workspace, period, s.scope)
            state = out.scopes.get(key)
            if state is None:
                state = ScopeOutcome(
                    record.workspace, s.scope, s.label, period, s.soft_nanos, s.hard_nanos
                )
                out.scopes[key] = state
            states.append(state)
        level = (
            "soft"
            if any(st.soft_nanos is not None and st.spent_nanos >= st.soft_nanos for st in states)
            else "ok"
        )
        traits = Traits(
            endpoint=record.endpoint,
            workspace=record.workspace,
            team=plan_team(plan.scopes),
            service=record.service,
            model=requested,
            input_tokens=record.counted_input_tokens or record.input_tokens,
            stream=record.stream,
            output_cap=record.output_cap or None,
        )
        route = decide_route(candidate, identity, traits, BudgetState(level))
        if route.refuse is not None:
            out.refused += 1
            out.refused_by[route.refuse.code or "refused"] += 1
            continue
        if route.model != requested:
            plan = plan_request(
                candidate,
                identity,
                model=route.model,
                counted_input=traits.input_tokens,
                output_cap=route.max_output_tokens or traits.output_cap,
                prices=prices,
                now_ms=record.time_ms,
            )
        # The cap then: the candidate's hard limit plus the top-ups granted at the time.
        cap = {s.scope: s.hard_nanos for s in with_topups(plan, granted).scopes}
        over = [
            st
            for st in states
            if (limit := cap.get(st.scope)) is not None
            and st.spent_nanos + plan.reserve_nanos > limit
        ]
        if over:
            out.refused += 1
            out.refused_by["insufficient_quota"] += 1
            for st in over:
                st.hard_crossed = st.hard_crossed or day
            continue
        cost = record.cost_nanos
        served = record.model_served or requested
        if model_key(route.model) != model_key(served):
            cost = prices.charge(route.model, _usage(record)).nanos
            out.downgraded[(served, route.model)] += 1
        elif model_key(served) != model_key(requested):
            out.already_rerouted += 1
        out.candidate_nanos += cost
        for st in states:
            st.spent_nanos += cost
            if st.soft_nanos is not None and st.spent_nanos >= st.soft_nanos:
                st.soft_crossed = st.soft_crossed or day
            if (limit := cap.get(st.scope)) is not None and st.spent_nanos >= limit:
                st.hard_crossed = st.hard_crossed or day
    return out


def _breaker(out: WhatIf, breaker: Detector, record: UsageRecord, tripped: set[str]) -> None:
    """Feed the candidate's breaker; what it trips, and what tripped keys spend after."""
    if record.key_id in tripped:
        out.after_trip_nanos[record.key_id] += record.cost_nanos
    seen = Seen.of(record)
    if seen is None:
        return
    for trip in breaker.feed(seen):
        if trip.key_id not in tripped:
            out.trips.append(trip)
            tripped.add(trip.key_id)


def plan_team(scopes: Iterable[Any]) -> str | None:
    for s in scopes:
        team = team_of(s.scope)
        if team is not None:
            return team
    return None


async def topups_of(client: Any, policy: Policy) -> list[TopupRequest]:
    """Every top-up request on record in the policy's workspaces (the replay needs the
    granted ones: their amounts, from approval to end)."""
    from extproc.governance.topups import TopupStore

    store = TopupStore(client)
    return [r for ws in policy.workspaces for r in await store.list(ws, limit=1000)]


async def ledger_since(client: Any, since_ms: int, limit: int = 1_000_000) -> list[UsageRecord]:
    """Every ledger record since `since_ms`, from every workspace's stream."""
    from extproc.store.schema import LEDGERS

    out: list[UsageRecord] = []
    for stream in sorted(await client.smembers(LEDGERS)):
        start = f"{since_ms}-0"
        while len(out) < limit:
            rows = await client.xrange(stream, min=start, count=5000)
            if not rows:
                break
            out += [UsageRecord.FromString(f[b"r"]) for _id, f in rows]
            last = rows[-1][0].decode() if isinstance(rows[-1][0], bytes) else rows[-1][0]
            start = f"({last}"
            if len(rows) < 5000:
                break
    return out


def render_text(result: WhatIf, since_days: int) -> str:
    """What-if, for people."""
    from extproc.insight.spend.text import dollars

    d = result.to_dict()
    lines = [
        f"replayed {d['replayed_requests']} requests of the last {since_days} days "
        f"({d['already_refused_requests']} refused by the policy in force, not replayed)",
        f"  would be refused   : {d['refused_requests']}"
        + (
            f" ({', '.join(f'{k} {v}' for k, v in d['refused_by'].items())})"
            if d["refused_by"]
            else ""
        ),
        f"  would change model : {d['downgraded_requests']} (from the model that served it; "
        f"{d['already_rerouted_requests']} served on another model already, as now)",
    ]
    lines += [f"      {x['from']} -> {x['to']}: {x['requests']}" for x in d["downgrades"]]
    diff = d["difference_nanos"]
    lines.append(
        f"  spend              : {dollars(d['actual_nanos'])} actual, "
        f"{dollars(d['candidate_nanos'])} under the candidate "
        f"({'-' if diff < 0 else '+'}{dollars(abs(diff))})"
    )
    trips = d["breaker_trips"]
    lines.append(f"  breaker would pause: {len(trips)} key{'' if len(trips) == 1 else 's'}")
    lines += [
        f"      {t['key_id']} ({t['workspace']}/{t['service']}, {t['mode']}): {t['why']}; "
        f"{dollars(t['spent_after_nanos'])} spent after"
        for t in trips
    ]
    lines.append("")
    lines.append("SCOPE                          PERIOD    SPENT        SOFT CROSSED  HARD CROSSED")
    for s in d["scopes"]:
        lines.append(
            f"{s['label'][:30]:30} {s['period']:9} {dollars(s['spent_nanos']):>12} "
            f"{s['soft_crossed_on'] or '-':13} {s['hard_crossed_on'] or '-'}"
        )
    return "\n".join(lines)
