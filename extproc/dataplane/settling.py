"""The end of an exchange: exactly one settlement, whatever way the stream ended, then its
telemetry report.

`Exchange` inherits this: the phases decide, this part books. The attributes named below
are the exchange's own (set in `Exchange.__init__`).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

from extproc.dataplane.deps import Deps
from extproc.dataplane.passthrough import PassthroughCall
from extproc.governance.budget import Decision, Plan, charges_for
from extproc.governance.keys import Identity
from extproc.insight.cachehygiene import Prefix
from extproc.insight.telemetry import RequestTelemetry
from extproc.insight.telemetry import verdict as request_verdict
from extproc.metering.decisions import Observed, PreparedRequest, bare_record, settle
from extproc.metering.orphans import Orphan
from extproc.metering.passthrough import orphaned_passthrough, settle_passthrough
from extproc.metering.settlement import CachePrefix, settlement_for
from extproc.routing import shadow
from extproc.routing.decide import RouteDecision
from extproc.v1.ledger_pb2 import Settlement, UsageRecord
from extproc.wire.endpoints import StreamMeter

log = logging.getLogger("extproc.dataplane.exchange")


class Settling:
    """Settlement and telemetry for an exchange (see the module docstring)."""

    __slots__ = ()

    _deps: Deps
    _closed: bool
    _decision: Decision | None
    _identity: Identity | None
    _meter: StreamMeter | None
    _pass: PassthroughCall | None
    _plan: Plan | None
    _prefix: Prefix | None
    _record: UsageRecord | None
    _route_decision: RouteDecision | None
    _start_ns: int
    _end_ns: int
    _started: float
    _trace: tuple[str | None, str | None]
    _task: str | None
    busy_ns: int
    seen: Observed

    def _shadow_verdict(self) -> str:
        """The shadow policy's decision on this request (see routing.shadow), computed
        with the spend the real reservation read; never enforced."""
        identity, facts, deps = self._identity, self.seen.facts, self._deps
        if identity is None or facts is None or deps.shadow is None:
            return ""
        decision = self._decision
        used = {
            st.scope.scope: st.spent_nanos + st.held_nanos
            for st in (decision.standings if decision else ())
        }
        try:
            return shadow.verdict(
                deps.shadow,
                identity,
                self.seen.endpoint,
                facts,
                self.seen.counted_input_tokens,
                used,
                deps.prices,
                deps.now_ms(),
                task=self._task,
            )
        except Exception:  # a shadow must never cost the real request anything
            log.exception("shadow policy evaluation failed")
            return "error"

    def _orphan(self, prepared: PreparedRequest, route: RouteDecision, plan: Plan) -> Orphan:
        """What this request leaves in Redis before it is forwarded, billed (estimated) by
        any replica if this sidecar dies before settling it (metering.orphans): the input we
        counted, for the routed model; output unknown. Facts only: priced if ever needed."""
        seen, identity, deps = self.seen, self._identity, self._deps
        assert identity is not None
        facts = prepared.facts
        charged = plan.charged or charges_for(deps.policy, identity, plan, 0, deps.timezone)[0]
        return Orphan(
            request_id=seen.request_id,
            time_ms=seen.time_ms,
            endpoint=seen.endpoint,
            model_requested=facts.model,
            model_served=route.model,
            counted_input=prepared.counted_input_tokens,
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

    def _passthrough_orphan(self, passing: PassthroughCall, plan: Plan) -> bytes:
        """A held passthrough call's settlement if its hold expires unsettled (see `_orphan`):
        the counted input at the model's rate, estimated."""
        record = orphaned_passthrough(passing.seen, self._deps.prices)
        return self._settlement(record, plan, reservation_id="").SerializeToString()

    def _finish(self) -> UsageRecord | None:
        if self._closed:
            return None
        self._closed = True
        if not self.seen.request_id:
            # No request headers ever reached us: Envoy opened the stream for its own reply to
            # something that was not a request (a connection broken off mid-headers, say). No
            # request, no record: it was one with an empty id, billed $0 as `client_gone`.
            return None
        # The span ends here, before the reply that releases the response to the client is
        # sent; the ext_proc stream itself closes later, after the client may have its answer.
        self._end_ns = time.time_ns()
        try:
            return self._settle()
        except Exception:
            # The one record must land whatever broke: a bare one, marked, still attributed.
            log.exception(
                "request %s: settling failed; writing a bare record", self.seen.request_id
            )
            record = bare_record(self.seen)
            self._deps.ledger.submit(self._settlement(record))
            self._record = record
            return record

    def _settle(self) -> UsageRecord:
        deps, seen = self._deps, self.seen
        if self._meter is not None and seen.stream is None:
            seen.stream = self._meter.finish()
            seen.usage = seen.usage or seen.stream.usage
            seen.served_model = seen.served_model or seen.stream.served_model
        seen.duration_ms = int((time.monotonic() - self._started) * 1000)
        if self._pass is not None:
            self._pass.seen.duration_ms = seen.duration_ms
            record = settle_passthrough(self._pass.seen, deps.prices)
        else:
            record = settle(seen, deps.prices, deps.count)
            if deps.shadow is not None:
                record.shadow = self._shadow_verdict()
        route = self._route_decision
        if route is not None and route.steps:
            record.routing = route.header_value()
            record.rule = next((st.rule for st in route.steps if st.kind == "rule" and st.rule), "")
        deps.ledger.submit(self._settlement(record))
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

    def _settlement(
        self, record: UsageRecord, plan: Plan | None = None, reservation_id: str | None = None
    ) -> Settlement:
        """Attribute the record and charge it to the scopes its reservation checked."""
        deps, identity, plan = self._deps, self._identity, plan or self._plan
        now = deps.now_ms()
        tz = deps.timezone
        if identity is not None:
            record.workspace, record.service, record.key_id = (
                identity.workspace,
                identity.service,
                identity.key_id,
            )
            record.team = identity.team or ""
        charged, period_id = charges_for(deps.policy, identity, plan, now, tz)
        if reservation_id is None:
            reservation_id = self._decision.reservation_id if self._decision else ""
        p = self._prefix
        return settlement_for(
            record,
            charged,
            period_id=period_id,
            local_time=datetime.fromtimestamp(now / 1000, tz),
            prices=deps.prices,
            reservation_id=reservation_id,
            attributed=identity is not None,
            prefix=None if p is None else CachePrefix(p.fingerprint, p.tokens, p.request),
        )

    def close(self) -> None:
        """The ext_proc stream ended: settle the exchange if nothing has yet, then report it."""
        self._finish()
        record = self._record
        if record is None or not self._deps.telemetry.enabled:
            return
        self._record = None
        decision = self._decision
        denied = decision if decision is not None and not decision.allowed else None
        verdict, reason = request_verdict(
            record,
            rejected=self.seen.rejected is not None,
            denial_reason=denied.reason if denied is not None else None,
            downgraded=self._route_decision is not None and self._route_decision.downgraded,
        )
        self._deps.telemetry.observe(
            RequestTelemetry(
                record=record,
                start_ns=self._start_ns,
                end_ns=self._end_ns,
                traceparent=self._trace[0],
                tracestate=self._trace[1],
                decision=verdict,
                rule=record.rule or None,
                denial_reason=reason,
                denial_scope=denied.denied.scope if denied and denied.denied else None,
                sidecar_overhead_ns=self.busy_ns,
                topup_nanos=_topup(decision),
            )
        )


def _topup(decision: Decision | None) -> int:
    """What top-ups added to the hard limit of the scope that binds (for the span)."""
    binding = decision.binding if decision is not None else None
    return binding.scope.topup_nanos if binding is not None else 0
