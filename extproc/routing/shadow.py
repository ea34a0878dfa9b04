"""Shadow policy: a candidate evaluated live beside the real one, never enforced.

What-if replays the past; the shadow answers "what would the new policy do to today's
traffic?" without risking anyone's work. For every governed request the sidecar runs the
shadow's routing and budget check on the same caller and request, with the spend the real
reservation just read from Redis, and writes the verdict on the ledger record and the span:
`allow`, `downgrade:<model>` or `refuse:<code>`. Nothing about the request changes.

Rate limits are not shadowed (their counters belong to the real policy's scopes), and a
scope the real policy does not track has no spend figure here: it counts from zero.
"""

from __future__ import annotations

from collections.abc import Mapping

from extproc.governance.budget import plan_request
from extproc.governance.keys import Identity
from extproc.governance.policy import Policy
from extproc.metering.prices import PriceTable
from extproc.routing.decide import BudgetState, decide_route, traits_for
from extproc.v1.ledger_pb2 import UsageRecord
from extproc.wire.endpoints import RequestFacts

ALLOW = "allow"


def verdict(
    shadow: Policy,
    identity: Identity,
    endpoint: str,
    facts: RequestFacts,
    counted_input: int,
    used: Mapping[str, int],
    prices: PriceTable,
    now_ms: int,
    task: str | None = None,
) -> str:
    """What `shadow` would do with this request; `used` is spent + held per scope, now."""
    ws = shadow.workspaces.get(identity.workspace)
    if ws is None or identity.service not in ws.services:
        return "refuse:invalid_api_key"
    traits = traits_for(shadow, identity, endpoint, facts, counted_input, task=task)
    plan = plan_request(
        shadow,
        identity,
        model=facts.model,
        counted_input=counted_input,
        output_cap=facts.output_cap,
        prices=prices,
        now_ms=now_ms,
    )
    soft = any(
        s.soft_nanos is not None and used.get(s.scope, 0) >= s.soft_nanos for s in plan.scopes
    )
    route = decide_route(shadow, identity, traits, BudgetState("soft" if soft else "ok"))
    if route.refuse is not None:
        return f"refuse:{route.refuse.code or 'refused'}"
    if route.model != facts.model:
        plan = plan_request(
            shadow,
            identity,
            model=route.model,
            counted_input=counted_input,
            output_cap=route.max_output_tokens or facts.output_cap,
            prices=prices,
            now_ms=now_ms,
        )
    for s in plan.scopes:
        if s.hard_nanos is not None and used.get(s.scope, 0) + plan.reserve_nanos > s.hard_nanos:
            return "refuse:insufficient_quota"
    return f"downgrade:{route.model}" if route.model != facts.model else ALLOW


def actual(record: UsageRecord) -> str:
    """The real policy's decision on a record, in the shadow's vocabulary."""
    if record.outcome == "rejected":
        return f"refuse:{record.error_code or 'refused'}"
    served = record.model_served or record.model_requested
    if record.routing and record.model_requested and served != record.model_requested:
        return f"downgrade:{served}"
    return ALLOW
