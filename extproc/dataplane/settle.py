"""The end of a request: exactly one settlement, whatever way its stream ended, then its
telemetry report.

Every handler composes one `Settler`. The handler says what it saw (it makes the usage
record, a plain function of its own state) and what admission held for it; the settler
attributes the record, charges it where the reservation checked, hands it to the ledger
once, and reports the request when its stream closes. The record is made at once (its cost
goes into the reply); its settlement is built by the ledger's writer (`submit_later`), after
that reply has left: at one request at a time it is off the latency path. The orphan
settlements a hold carries (written by any replica if this one dies) are made here too, from
the same parts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial

from extproc.dataplane.deps import Deps
from extproc.dataplane.request import RequestInfo, for_client
from extproc.governance.budget import Decision, Plan, charges_for
from extproc.governance.keys import Identity
from extproc.governance.lease import is_lease
from extproc.insight.telemetry import RequestTelemetry
from extproc.insight.telemetry import verdict as request_verdict
from extproc.metering.decisions import Observed, Seen, bare_record
from extproc.metering.orphans import Orphan
from extproc.metering.passthrough import PassthroughSeen, orphaned_passthrough
from extproc.metering.settlement import CachePrefix, settlement_for
from extproc.routing.decide import RouteDecision
from extproc.v1.ledger_pb2 import Settlement, UsageRecord
from extproc.wire.errors import OpenAIError

log = logging.getLogger("extproc.dataplane.settle")


def settlement_of(
    deps: Deps,
    identity: Identity | None,
    record: UsageRecord,
    plan: Plan | None,
    reservation_id: str,
    cache_prefix: CachePrefix | None = None,
    now_ms: int | None = None,
) -> Settlement:
    """Attribute the record and charge it to the scopes its reservation checked (or would
    have: a request refused or passed through unplanned still counts where it belongs).
    `now_ms`: when the request settled (default: now)."""
    now = deps.now_ms() if now_ms is None else now_ms
    tz = deps.timezone
    attribute(record, identity)
    charged, period_id, prefix = charges_for(deps.policy, identity, plan, now, tz)
    return settlement_for(
        record,
        charged,
        prefix=prefix,
        period_id=period_id,
        local_time=datetime.fromtimestamp(now / 1000, tz),
        prices=deps.prices,
        reservation_id=reservation_id,
        attributed=identity is not None,
        cache_prefix=cache_prefix,
    )


def attribute(record: UsageRecord, identity: Identity | None) -> None:
    """Who the record is billed to: the caller's workspace, service, key and team."""
    if identity is not None:
        record.workspace, record.service, record.key_id = (
            identity.workspace,
            identity.service,
            identity.key_id,
        )
        record.team = identity.team or ""


def metered_orphan(
    deps: Deps, identity: Identity, seen: Observed, route: RouteDecision, plan: Plan
) -> Orphan:
    """What this request leaves in Redis before it is forwarded, billed (estimated) by any
    replica if this sidecar dies before settling it (`metering.orphans`): the input we
    counted, for the routed model, output unknown. Facts only, priced if ever needed; the
    reaper releases the hold itself, so it names no reservation."""
    facts = seen.facts
    assert facts is not None
    charged = charges_for(deps.policy, identity, plan, 0, deps.timezone)[0]
    return Orphan(
        request_id=seen.request_id,
        time_ms=seen.time_ms,
        endpoint=seen.endpoint,
        model_requested=facts.model,
        model_served=route.model,
        counted_input=seen.counted_input_tokens,
        workspace=identity.workspace,
        service=identity.service,
        key_id=identity.key_id,
        team=identity.team or "",
        period=plan.period.id,
        timezone=deps.timezone.key,
        charged=tuple(charged),
        stream=facts.stream,
        output_cap=facts.output_cap or 0,
        session_id=seen.session_id,
        envoy_request_id=seen.envoy_request_id,
        routing=route.header_value() if route.steps else "",
    )


def passthrough_orphan(deps: Deps, identity: Identity, seen: PassthroughSeen, plan: Plan) -> bytes:
    """A held passthrough call's settlement if its hold expires unsettled (see
    `metered_orphan`): the counted input at the model's rate, estimated."""
    record = orphaned_passthrough(seen, deps.prices)
    return settlement_of(deps, identity, record, plan, "").SerializeToString()


class Settler:
    """One request's settlement and report (see the module docstring).

    What it holds is its own: the caller, what admission held (the plan its cost counts
    under and the reservation to release), the prompt prefix the settle script watches,
    and whether the request was refused or downgraded, for the report.
    """

    __slots__ = (
        "_deps",
        "_end_ns",
        "_info",
        "_operation",
        "_record",
        "decision",
        "downgraded",
        "identity",
        "plan",
        "prefix",
        "rejected",
        "settled",
    )

    def __init__(
        self, deps: Deps, info: RequestInfo, identity: Identity | None, operation: str
    ) -> None:
        self._deps = deps
        self._info = info
        self._operation = operation  # the endpoint's telemetry operation (its spec's)
        self.identity = identity
        self.plan: Plan | None = None
        self.decision: Decision | None = None
        self.prefix: CachePrefix | None = None
        self.rejected = False
        self.downgraded = False
        self.settled = False
        self._record: UsageRecord | None = None
        self._end_ns = 0

    def held(self, plan: Plan | None, decision: Decision | None) -> None:
        """What admission reserved (or was refused): where the cost counts, what to release."""
        self.plan, self.decision = plan, decision

    def refused(
        self, error: OpenAIError, plan: Plan | None = None, decision: Decision | None = None
    ) -> OpenAIError:
        """The request is answered here: what was held (this settlement releases it), and
        the error as its caller should read it (`request.for_client`)."""
        if plan is not None or decision is not None:
            self.plan, self.decision = plan, decision
        self.rejected = True
        return for_client(self._deps, self._info, self.identity, error)

    @property
    def duration_ms(self) -> int:
        return int((time.monotonic() - self._info.started) * 1000)

    def settle(self, make: Callable[[], UsageRecord], seen: Seen) -> UsageRecord | None:
        """Write the request's one record (made by `make`); None if it was written already.

        Whatever breaks while making it, one record still lands: a bare one built from
        `seen`, marked, attributed.
        """
        if self.settled:
            return None
        self.settled = True
        # The span ends here, before the reply that releases the response to the client is
        # sent; the ext_proc stream itself closes later, after the client may have its answer.
        self._end_ns = time.time_ns()
        deps = self._deps
        decision = self.decision
        rid = decision.reservation_id if decision is not None else ""
        try:
            record = make()
            attribute(record, self.identity)  # now: the report and the alerts read it
        except Exception:
            log.exception("request %s: settling failed; writing a bare record", seen.request_id)
            record = bare_record(seen)
            deps.ledger.submit(settlement_of(deps, self.identity, record, self.plan, rid))
        else:
            build = partial(self._settlement, record, seen, rid, deps.now_ms())
            deps.ledger.submit_later(build, may_wait=is_lease(rid))
        self._record = record
        if record.price_provisional and deps.new_models is not None:
            deps.new_models.seen(
                record.model_served, record.workspace, admitted=True, price=record.price_family
            )
        if record.estimated or record.price_fallback:
            log.warning(
                "request %s billed %s nanos: outcome=%s estimated=%s fallback_price=%s",
                record.request_id,
                record.cost_nanos,
                record.outcome,
                record.estimated,
                record.price_fallback,
            )
        return record

    def _settlement(self, record: UsageRecord, seen: Seen, rid: str, now_ms: int) -> Settlement:
        """The record's settlement, built by the ledger's writer; a bare record's if that
        fails (never raises but where the bare one fails too)."""
        deps, identity, plan = self._deps, self.identity, self.plan
        try:
            return settlement_of(deps, identity, record, plan, rid, self.prefix, now_ms)
        except Exception:
            log.exception("request %s: settling failed; writing a bare record", seen.request_id)
            return settlement_of(deps, identity, bare_record(seen), plan, rid, now_ms=now_ms)

    def report(self, busy_ns: int) -> None:
        """The stream closed: report the settled request to telemetry, once."""
        record = self._record
        telemetry = self._deps.telemetry
        if record is None or not telemetry.enabled:
            return
        self._record = None
        decision = self.decision
        denied = decision if decision is not None and not decision.allowed else None
        verdict, reason = request_verdict(
            record,
            rejected=self.rejected,
            denial_reason=denied.reason if denied is not None else None,
            downgraded=self.downgraded,
        )
        info = self._info
        telemetry.observe(
            RequestTelemetry(
                record=record,
                operation=self._operation,
                start_ns=info.start_ns,
                end_ns=self._end_ns,
                traceparent=info.traceparent,
                tracestate=info.tracestate,
                decision=verdict,
                rule=record.rule or None,
                denial_reason=reason,
                denial_scope=denied.denied.scope if denied and denied.denied else None,
                sidecar_overhead_ns=busy_ns,
                topup_nanos=_topup(decision),
            )
        )


def _topup(decision: Decision | None) -> int:
    """What top-ups added to the hard limit of the scope that binds (for the span)."""
    binding = decision.binding if decision is not None else None
    return binding.scope.topup_nanos if binding is not None else 0
