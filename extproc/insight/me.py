"""A developer's own view: `GET /extproc/v1/me` on the gateway, answered by the sidecar.

Developers should not need the platform team's console to learn why a call was refused or
how much room is left. The sidecar already knows the caller (the virtual key) and the
policy, so it answers from the same Redis hashes the budget scripts keep: every scope that
binds the key with spent / soft / hard / remaining and when the period resets, the rate
limits and this minute's usage, and the key's own last requests. Nothing about another key,
team or service is ever read into the answer: records are filtered by the caller's key id.

A scope can stop the caller before its money is gone: every request must hold its worst
case (counted input plus every output token it may write) before it is sent, so a remainder
smaller than what the caller's requests hold refuses them all. Each budget therefore says
whether it is `effectively_blocked` for this caller: its remainder is less than the hold of
a *typical* request of theirs, the median worst-case hold of their last requests (see
`typical_request`).

Top-ups and pauses show here too: each budget's hard limit includes its live grants (and
says how much of it they are), with the link to ask for more; the answer lists the caller's
own top-up requests and, when the runaway breaker paused the key, why, since when and how
it is resumed.

`me_view` is a pure function of what was read (tested without Redis); `read_me` does the
reads in one pipelined round trip plus one bounded ledger scan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

from extproc.governance.budget import Plan, plan_request, remaining_nanos, with_topups
from extproc.governance.keys import Identity
from extproc.governance.pauses import Pause
from extproc.governance.policy import Policy, Workspace
from extproc.governance.topups import Grant, TopupRequest, grants_from, live_topups
from extproc.metering.ledger import record_to_dict
from extproc.metering.prices import PriceTable, usd
from extproc.metering.worstcase import worst_case_nanos
from extproc.store.schema import (
    held_key,
    ledger_key,
    paused_key,
    rate_field,
    rate_minute_key,
    session_key,
    session_scope,
    spent_key,
    team_of,
    topups_key,
    workspace_prefix,
)
from extproc.v1.ledger_pb2 import UsageRecord
from extproc.wire.endpoints import ENDPOINTS
from extproc.wire.priced import PRICED

RECENT = 20
SCAN_LIMIT = 2_000
"""Ledger entries examined for the caller's last requests: bounds the cost of one call on a
busy workspace (a key idle for longer than that shows fewer than 20)."""

ME_PATH = "/extproc/v1/me"
ME_PAGE_PATH = "/extproc/me"
TOPUP_PAGE_PATH = "/extproc/topup/"


def _usd(nanos: int | None) -> str | None:
    return None if nanos is None else usd(nanos)


@dataclass(frozen=True, slots=True)
class MeReads:
    """Everything `me_view` needs, as read from Redis."""

    spent: Mapping[str, int]
    held: Mapping[str, int]
    rate_usage: Mapping[str, int]
    records: Sequence[UsageRecord]
    session_tokens: Mapping[str, int]
    grants: tuple[Grant, ...] = ()
    pause: Pause | None = None


def plan_for(policy: Policy, identity: Identity, prices: PriceTable, now_ms: int) -> Plan:
    """The scopes and rate limits that bind the key (the same plan a request would get)."""
    return plan_request(
        policy, identity, model="", counted_input=0, output_cap=0, prices=prices, now_ms=now_ms
    )


_METERED = frozenset(e.name for e in ENDPOINTS.values())


@dataclass(frozen=True, slots=True)
class Typical:
    """A typical request of one caller, as a budget sees it: what it holds before it goes."""

    hold_nanos: int
    model: str
    input_tokens: int
    output_tokens: int
    based_on: int  # how many of the caller's recent requests it was chosen from

    def to_dict(self) -> dict[str, Any]:
        return {
            "hold_usd": usd(self.hold_nanos),
            "hold_nanos": self.hold_nanos,
            "model": self.model,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "based_on": self.based_on,
        }


def typical_request(
    records: Sequence[UsageRecord], ws: Workspace, prices: PriceTable
) -> Typical | None:
    """The median worst-case hold of the caller's recent requests, priced now.

    A request's hold is what the budget reserved (or would have) before sending it: its
    counted input plus its output cap (the workspace's `default_output_cap` when it set
    none; `passthrough.output_ceiling` for priced passthrough calls), all at the rates of
    the model it named or was routed to. Only requests whose input the sidecar counted take
    part (metered calls and priced passthrough, refused ones included: a blocked caller's
    attempts are what they typically send); free calls hold nothing. The median is the lower
    one, so the typical request is one the caller really sent. None without such requests.
    """
    holds: list[tuple[int, str, int, int]] = []
    for r in records:
        if not r.counted_input_tokens:
            continue
        if r.endpoint in _METERED:
            output = r.output_cap or ws.default_output_cap
        elif r.endpoint in PRICED:
            output = ws.passthrough.held_output(r.endpoint, None)
        else:
            continue
        model = r.model_served or r.model_requested
        hold = worst_case_nanos(prices, model, r.counted_input_tokens, output)
        holds.append((hold, model, r.counted_input_tokens, output))
    if not holds:
        return None
    holds.sort()
    hold, model, inp, out = holds[(len(holds) - 1) // 2]
    return Typical(hold, model, inp, out, len(holds))


def standing_state(
    spent: int, held: int, hard: int | None, soft: int | None, typical: Typical | None
) -> str:
    """`exhausted` (the hard limit is spent), `blocked` (what is left, after the holds of
    requests in flight, cannot hold a typical request of this caller), `soft` (past the
    soft limit) or `ok`."""
    if hard is not None and spent >= hard:
        return "exhausted"
    if hard is not None:
        remaining = hard - spent - held
        if remaining <= 0 or (typical is not None and remaining < typical.hold_nanos):
            return "blocked"
    if soft is not None and spent >= soft:
        return "soft"
    return "ok"


def _why(record: UsageRecord) -> str | None:
    if record.outcome == "rejected":
        return record.error_code or "rejected"
    if record.routing:
        return record.routing
    return None


def request_row(record: UsageRecord, tz: tzinfo) -> dict[str, Any]:
    """One of the caller's requests, as the developer sees it (times in the policy's zone)."""
    return {
        "request_id": record.request_id,
        "time": datetime.fromtimestamp(record.time_ms / 1000, tz).isoformat(),
        "time_ms": record.time_ms,
        "endpoint": record.endpoint,
        "model_requested": record.model_requested,
        "model_served": record.model_served,
        "input_tokens": record.input_tokens,
        "cached_input_tokens": record.cached_input_tokens,
        "output_tokens": record.output_tokens,
        "cost_usd": _usd(record.cost_nanos),
        "cost_nanos": record.cost_nanos,
        "status": record.status,
        "outcome": record.outcome,
        "why": _why(record),
        "session_id": record.session_id,
    }


def me_view(
    policy: Policy,
    identity: Identity,
    plan: Plan,
    reads: MeReads,
    now_ms: int,
    typical: Typical | None = None,
    requests: Sequence[TopupRequest] = (),
) -> dict[str, Any]:
    """The JSON answer of `/extproc/v1/me`: a pure function of the policy and the reads.

    `typical` (see `typical_request`) lets each budget say whether it is effectively
    blocked for this caller, and how many more typical requests it can hold. `requests`
    are the caller's own top-up requests.
    """
    tz = policy.timezone
    ws = policy.workspaces[identity.workspace]
    plan = with_topups(plan, live_topups(reads.grants, now_ms))
    budgets = []
    for s in plan.scopes:
        spent = reads.spent.get(s.scope, 0)
        held = reads.held.get(s.scope, 0)
        remaining = None if s.hard_nanos is None else remaining_nanos(s.hard_nanos, spent, held)
        state = standing_state(spent, held, s.hard_nanos, s.soft_nanos, typical)
        fits = None
        if remaining is not None and typical is not None and typical.hold_nanos:
            fits = remaining // typical.hold_nanos
        budgets.append(
            {
                "scope": s.scope,
                "label": s.label,
                "period": plan.period.id,
                "spent_usd": _usd(spent),
                "held_usd": _usd(held),
                "budget_usd": _usd(s.budget_nanos),
                "soft_usd": _usd(s.soft_nanos),
                "hard_usd": _usd(s.hard_nanos),
                "topup_usd": _usd(s.topup_nanos) if s.topup_nanos else None,
                "topup_page": TOPUP_PAGE_PATH + s.scope if s.hard_nanos is not None else None,
                "remaining_usd": _usd(remaining),
                "spent_nanos": spent,
                "hard_nanos": s.hard_nanos,
                "over_soft": s.soft_nanos is not None and spent >= s.soft_nanos,
                "state": state,
                "effectively_blocked": state in ("exhausted", "blocked"),
                "typical_requests_left": fits,
                "resets_at": plan.period.end.isoformat(),
            }
        )
    minute_end = (now_ms // 60000 + 1) * 60000
    rates = []
    for r in plan.rates:
        rates.append(
            {
                "scope": r.scope,
                "label": r.label,
                "rpm": r.rpm,
                "tpm": r.tpm,
                "requests_this_minute": reads.rate_usage.get(rate_field(r.scope, "r"), 0),
                "tokens_this_minute": reads.rate_usage.get(rate_field(r.scope, "t"), 0),
                "resets_at": datetime.fromtimestamp(minute_end / 1000, tz).isoformat(),
            }
        )
    mine = [r for r in reads.records if r.key_id == identity.key_id][:RECENT]
    live = {g.grant_id for g in reads.grants if g.until_ms > now_ms}
    sessions: dict[str, dict[str, Any]] = {}
    for record in mine:
        if record.session_id and record.session_id not in sessions:
            sid = record.session_id
            sessions[sid] = {
                "session_id": sid,
                "spent_usd": _usd(reads.spent.get(session_scope(identity.key_id, sid), 0)),
                "input_tokens": reads.session_tokens.get(sid, 0),
            }
    contact = ws.contact_for(plan_team(plan))
    return {
        "identity": {
            "key_id": identity.key_id,
            "workspace": identity.workspace,
            "team": plan_team(plan),
            "service": identity.service,
            "owner": identity.owner,
            "expires_at": (
                datetime.fromtimestamp(identity.expires_ms / 1000, tz).isoformat()
                if identity.expires_ms
                else None
            ),
        },
        "contact": contact,
        "period": {
            "id": plan.period.id,
            "start": plan.period.start.isoformat(),
            "resets_at": plan.period.end.isoformat(),
        },
        "budgets": budgets,
        "typical_request": typical.to_dict() if typical is not None else None,
        "rate_limits": rates,
        "sessions": list(sessions.values()),
        "recent_requests": [request_row(r, tz) for r in mine],
        "topups": [{**r.to_dict(tz, now_ms), "live": r.request_id in live} for r in requests],
        "paused": reads.pause.to_dict(tz) if reads.pause and reads.pause.paused else None,
    }


def plan_team(plan: Plan) -> str | None:
    return next((team for s in plan.scopes if (team := team_of(s.scope))), None)


def _ints(raw: Sequence[Any], names: Sequence[str]) -> dict[str, int]:
    return {n: int(v) for n, v in zip(names, raw, strict=True) if v is not None}


async def read_me(
    client: Any, policy: Policy, identity: Identity, plan: Plan, now_ms: int
) -> MeReads:
    """The reads behind `me_view`: one pipeline for the hashes, one bounded ledger scan."""
    prefix = workspace_prefix(identity.workspace)
    fields = [s.scope for s in plan.scopes]
    rate_fields = [rate_field(r.scope, k) for r in plan.rates for k in ("r", "t")]
    async with client.pipeline(transaction=False) as pipe:
        pipe.hmget(spent_key(prefix, plan.period.id), fields)
        pipe.hmget(held_key(prefix, plan.period.id), fields)
        if rate_fields:
            pipe.hmget(rate_minute_key(prefix, now_ms), rate_fields)
        pipe.hgetall(topups_key(identity.workspace))
        pipe.hget(paused_key(identity.workspace), identity.key_id)
        pipe.xrevrange(ledger_key(prefix), count=SCAN_LIMIT)
        results = await pipe.execute()
    spent, held = _ints(results[0], fields), _ints(results[1], fields)
    rate_usage = _ints(results[2], rate_fields) if rate_fields else {}
    grants = grants_from(results[-3])
    pause = Pause.from_json(results[-2]) if results[-2] is not None else None
    records = [UsageRecord.FromString(f[b"r"]) for _id, f in results[-1]]
    mine = [r for r in records if r.key_id == identity.key_id][:RECENT]
    sids = list(dict.fromkeys(r.session_id for r in mine if r.session_id))
    session_tokens: dict[str, int] = {}
    if sids:
        sess_fields = [session_scope(identity.key_id, sid) for sid in sids]
        async with client.pipeline(transaction=False) as pipe:
            pipe.hmget(spent_key(prefix, plan.period.id), sess_fields)
            for sid in sids:
                pipe.get(session_key(prefix, identity.key_id, sid))
            more = await pipe.execute()
        spent.update(_ints(more[0], sess_fields))
        session_tokens = {sid: int(v) for sid, v in zip(sids, more[1:], strict=True) if v}
    return MeReads(spent, held, rate_usage, mine, session_tokens, grants, pause)


def record_dicts(records: Sequence[UsageRecord]) -> list[dict[str, Any]]:
    return [record_to_dict(r) for r in records]
