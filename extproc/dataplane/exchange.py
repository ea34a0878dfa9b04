"""One HTTP request's life in the sidecar, phase by phase.

Envoy holds one ext_proc stream per HTTP request and sends us, in order, request headers,
the buffered request body, response headers and the response body (one buffered message
for JSON, many chunks for SSE). `Exchange` keeps the state between those messages and
answers each one; the decisions live in `metering`, `budget` and `guard`, the wire formats
in `wire`. A phase that needs I/O (a key not yet cached, a budget reservation, a huge body
to count off the event loop) returns an awaitable; every other reply is immediate.
Whatever way the stream ends (normal end, rejection, client gone, upstream cut), `close`
guarantees the exchange yields exactly one settlement.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane import selfservice
from extproc.governance import guard
from extproc.governance.budget import (
    Decision,
    Plan,
    charged_scopes,
    per_choice_cap,
    plan_request,
)
from extproc.governance.keys import MISSING, Identity, Lookup
from extproc.governance.periods import period_at
from extproc.governance.policy import Policy
from extproc.insight.cachehygiene import MIN_CACHEABLE_TOKENS, Prefix, prefix_of
from extproc.insight.telemetry import RequestTelemetry, Telemetry
from extproc.insight.telemetry import verdict as request_verdict
from extproc.metering.decisions import (
    Observed,
    PreparedRequest,
    finalize,
    parse_request,
    prepare_request,
    settle,
    utf8_text,
)
from extproc.metering.prices import PriceTable, usd
from extproc.metering.settlement import UNGOVERNED, CachePrefix, Charged, settlement_for
from extproc.routing.decide import (
    BudgetState,
    RouteDecision,
    decide_route,
    prompt_cache_key,
    traits_for,
)
from extproc.routing.rewrite import apply_route, set_output_cap
from extproc.settings import Settings
from extproc.v1.ledger_pb2 import Settlement, UsageRecord
from extproc.wire.endpoints import Endpoint, StreamMeter, endpoint_for
from extproc.wire.errors import OpenAIError

log = logging.getLogger("extproc.dataplane.exchange")

Reply = msgs.ProcessingResponse | Awaitable[msgs.ProcessingResponse]

_REQUEST_HEADERS = frozenset(
    {
        ":method",
        ":path",
        "authorization",
        "content-encoding",
        "x-request-id",
        "session_id",
        "session-id",
        "traceparent",
        "tracestate",
        "x-task",
        "originator",
        "user-agent",
    }
)
ROUTE_HEADER = "x-extproc-route"
DOWNGRADE_STEPS = frozenset({"degrade", "overdraft", "context"})
_ANNOUNCED: set[tuple[str, str, str, str]] = set()
"""Downgrades already logged by this process: one human-readable line per scope and step."""
_RESPONSE_HEADERS = frozenset({":status", "content-type"})
_RID = "x-extproc-request-id"
MISSING_BODY = OpenAIError(
    400,
    "This endpoint needs a JSON request body; the request had none.",
    "invalid_request_error",
    None,
    "missing_body",
)
INTERNAL_ERROR = OpenAIError(
    500,
    "extproc could not process this request; it was not forwarded. Retrying is safe.",
    "server_error",
    None,
    "extproc_internal_error",
)
_CONTINUE_PHASE = {
    "request_headers": msgs.CONTINUE_REQUEST_HEADERS,
    "request_body": msgs.CONTINUE_REQUEST_BODY,
    "response_headers": msgs.CONTINUE_RESPONSE_HEADERS,
    "response_body": msgs.CONTINUE_RESPONSE_BODY,
}


def _now_ms() -> int:
    return int(time.time() * 1000)


class KeyLookup(Protocol):
    """What an exchange asks of the key cache (`governance.keys.KeyCache`)."""

    def get(self, secret: str) -> Lookup: ...

    async def resolve(self, secret: str) -> Identity | None: ...


class BudgetBook(Protocol):
    """What an exchange asks of the budgets (`governance.budget.Budgets`)."""

    def level(self, identity: Identity) -> str: ...

    async def reserve_with_overdraft(
        self,
        plan: Plan,
        fail_open: bool,
        now_ms: int,
        *,
        session: str = "",
        orphan: Callable[[Plan], bytes] | None = None,
        overdraft_nanos: int | None = None,
        fallback: Callable[[int], Plan | None] | None = None,
    ) -> tuple[Plan, Decision, bool]: ...


class SettlementSink(Protocol):
    """Where finished requests go (`metering.ledger.Ledger`): never blocks, never raises."""

    def submit(self, settlement: Settlement) -> None: ...

    def note_unmetered(self, key: str) -> None: ...


@dataclass(slots=True)
class Deps:
    """What every exchange shares. `policy` and `upstream_keys` change on hot reload."""

    settings: Settings
    prices: PriceTable
    count: Callable[[str, str], int]
    ledger: SettlementSink
    executor: Executor
    policy: Policy | None = None
    keys: KeyLookup | None = None
    budgets: BudgetBook | None = None
    upstream_keys: dict[str, str] = field(default_factory=dict)
    # Why a workspace has no key: "environment variable X is not set" (names only).
    upstream_missing: dict[str, str] = field(default_factory=dict)
    now_ms: Callable[[], int] = _now_ms
    telemetry: Telemetry = field(default_factory=Telemetry)
    store: Any = None  # the general Redis client (reads for paths the sidecar answers itself)

    @property
    def timezone(self) -> ZoneInfo:
        return self.policy.timezone if self.policy else ZoneInfo("UTC")


def unmetered_key(method: str, path: str) -> str:
    """Group unmetered traffic by resource, not by id: `GET /v1/responses/*`."""
    parts = path.split("?", 1)[0].split("/")
    if len(parts) > 3:
        parts = [*parts[:3], "*"]
    return f"{method} {'/'.join(parts)[:128]}"


class Exchange:
    __slots__ = (
        "_closed",
        "_codex",
        "_content_encoding",
        "_decision",
        "_deps",
        "_end_ns",
        "_endpoint",
        "_identity",
        "_meter",
        "_no_body",
        "_plan",
        "_prefix",
        "_prepared",
        "_record",
        "_request_chunks",
        "_route_decision",
        "_start_ns",
        "_started",
        "_task",
        "_trace",
        "busy_ns",
        "seen",
    )

    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        self._started = time.monotonic()
        self._start_ns = time.time_ns()
        self._end_ns = 0
        self._trace: tuple[str | None, str | None] = (None, None)
        self._task: str | None = None
        self._route_decision: RouteDecision | None = None
        self._prefix: Prefix | None = None
        self._record: UsageRecord | None = None
        self.busy_ns = (
            0  # time the sidecar spent on this request's phases (the stream handler adds)
        )
        self.seen = Observed(time_ms=deps.now_ms())
        self._endpoint: Endpoint | None = None
        self._prepared: PreparedRequest | None = None
        self._meter: StreamMeter | None = None
        self._identity: Identity | None = None
        self._plan: Plan | None = None
        self._decision: Decision | None = None
        self._content_encoding = ""
        self._request_chunks: list[bytes] = []
        self._closed = False
        self._no_body = False
        self._codex = False

    # -- request headers: which endpoint, which caller ----------------------------------

    def on_request_headers(self, msg: msgs.pb.HttpHeaders) -> Reply:
        # Attribution headers a client sent itself are collected to be stripped, never trusted.
        h, spoofed = msgs.request_header_map(msg, _REQUEST_HEADERS, "x-extproc-")
        method, path = h.get(":method", ""), h.get(":path", "")
        if path.startswith(selfservice.PREFIX):
            # Answered here, never forwarded: the developer's own view (see selfservice).
            self._closed = True
            self._deps.ledger.note_unmetered(unmetered_key(method, path))
            return selfservice.answer(self._deps, method, path, h.get("authorization", ""))
        endpoint = endpoint_for(method, path)
        if endpoint is None:
            self._deps.ledger.note_unmetered(unmetered_key(method, path))
            self._closed = True
            return msgs.SKIP_REST
        self._endpoint = endpoint
        seen = self.seen
        seen.endpoint = endpoint.name
        seen.request_id = uuid.uuid4().hex
        seen.envoy_request_id = h.get("x-request-id", "")
        seen.session_id = h.get("session_id") or h.get("session-id") or ""
        self._content_encoding = h.get("content-encoding", "")
        self._trace = (h.get("traceparent"), h.get("tracestate"))
        self._task = h.get("x-task")
        self._codex = guard.is_codex(h.get("originator", ""), h.get("user-agent", ""))
        # Refused for want of a body only once the caller is known: the record of the
        # refusal is attributed to its key like any other.
        self._no_body = msg.end_of_stream
        keys = self._deps.keys
        if keys is None or self._deps.policy is None:
            if self._no_body:
                return self._reject(MISSING_BODY)
            if spoofed:
                return msgs.forward_request_headers({}, ["accept-encoding", *spoofed])
            return msgs.CONTINUE_METERED_REQUEST_HEADERS
        secret = guard.bearer(h.get("authorization", ""))
        identity = keys.get(secret)
        if identity is MISSING:
            return self._resolve_then_admit(keys, secret, spoofed)
        return self._admit(identity, spoofed)  # type: ignore[arg-type]

    async def _resolve_then_admit(
        self, keys: KeyLookup, secret: str, spoofed: list[str]
    ) -> msgs.ProcessingResponse:
        try:
            identity = await keys.resolve(secret)
        except Exception:  # Redis unreachable: fall back to each workspace's policy later
            log.exception("key lookup failed")
            return self._reject(
                guard.denial(Decision(False, "redis_down"), None, self._deps.timezone)[0]
            )
        return self._admit(identity, spoofed)

    def _admit(self, identity: Identity | None, spoofed: list[str]) -> msgs.ProcessingResponse:
        policy = self._deps.policy
        if identity is None or policy is None or identity.workspace not in policy.workspaces:
            return self._reject(guard.UNKNOWN_KEY)
        upstream_key = self._deps.upstream_keys.get(identity.workspace)
        if not upstream_key:
            # Says what the operator must set (a variable or file name, never a value).
            missing = self._deps.upstream_missing.get(identity.workspace, "not configured")
            return self._reject(
                OpenAIError(
                    503,
                    f"Workspace {identity.workspace} has no upstream credential: {missing}. "
                    "The gateway's operator must provide it where the sidecar runs.",
                    "server_error",
                    None,
                    "upstream_credential_missing",
                )
            )
        self._identity = identity
        if self._no_body:
            return self._reject(MISSING_BODY)
        return msgs.forward_request_headers(
            {"authorization": f"Bearer {upstream_key}"}, ["accept-encoding", *spoofed]
        )

    # -- request body: parse, count, reserve --------------------------------------------

    def on_request_body(self, msg: msgs.pb.HttpBody) -> Reply:
        if self._endpoint is None:
            return msgs.CONTINUE_REQUEST_BODY
        self._request_chunks.append(msg.body)
        if not msg.end_of_stream:
            return msgs.CONTINUE_REQUEST_BODY
        raw = b"".join(self._request_chunks)
        self._request_chunks.clear()
        settings = self._deps.settings
        governed = self._identity is not None
        job = partial(
            parse_request if governed else prepare_request,
            self._endpoint,
            raw,
            self._content_encoding,
            max_body_bytes=settings.max_body_bytes,
            count=self._deps.count,
        )
        if len(raw) > settings.offload_bytes or governed:
            return self._prepare_async(job, offload=len(raw) > settings.offload_bytes)
        try:
            prepared = job()
        except OpenAIError as err:
            return self._bad_request(err)
        return self._forward(prepared)

    async def _prepare_async(
        self, job: Callable[[], PreparedRequest], *, offload: bool
    ) -> msgs.ProcessingResponse:
        try:
            if offload:
                prepared = await asyncio.get_running_loop().run_in_executor(
                    self._deps.executor, job
                )
            else:
                prepared = job()
        except OpenAIError as err:
            return self._bad_request(err)
        if self._identity is None:
            return self._forward(prepared)
        self.seen.facts = prepared.facts
        self.seen.counted_input_tokens = prepared.counted_input_tokens
        if not self.seen.session_id and prepared.facts.prompt_cache_key:
            # No session header: a client-chosen prompt_cache_key marks the conversation.
            self.seen.session_id = utf8_text(f"pck:{prepared.facts.prompt_cache_key}")
        budgets = self._deps.budgets
        assert budgets is not None
        route = self._route(prepared, BudgetState(budgets.level(self._identity)))
        if route.refuse is not None:
            return self._reject(route.refuse)
        route_or_refusal = await self._reserve(prepared, route)
        if isinstance(route_or_refusal, msgs.ProcessingResponse):
            return route_or_refusal
        route = route_or_refusal
        self._route_decision = route
        self.seen.routed_model = route.model
        body = prepared.parsed or {}
        rewritten = route.changed and apply_route(
            self.seen.endpoint,
            body,
            route,
            prompt_cache_key(self._identity, self.seen.session_id),
        )
        ws = self._deps.policy.workspaces[self._identity.workspace]  # type: ignore[union-attr]
        if (
            ws.enforce_output_cap
            and route.max_output_tokens is None
            and not prepared.facts.output_cap
        ):
            # Reserved for default_output_cap over all outputs (`n`, `best_of`): make the
            # upstream stop there too, each output getting its share.
            cap = per_choice_cap(ws.default_output_cap, prepared.facts.choices)
            rewritten = set_output_cap(self.seen.endpoint, body, cap) or rewritten
        self._prefix = await self._fingerprint(prepared)
        prepared = finalize(prepared, rewritten=bool(rewritten))
        if route.route:
            # A routed request must be re-matched by Envoy against the new header.
            prepared = replace(
                prepared, set_headers={**prepared.set_headers, ROUTE_HEADER: route.route}
            )
        self._note_downgrades(route)
        return self._forward(prepared, clear_route_cache=route.route is not None)

    async def _fingerprint(self, prepared: PreparedRequest) -> Prefix | None:
        """The (routed) request's cacheable prefix; hashed off the event loop when big."""
        endpoint, body = self._endpoint, prepared.parsed
        if endpoint is None or body is None or prepared.counted_input_tokens < MIN_CACHEABLE_TOKENS:
            return None
        model = str(body.get("model", ""))
        count = self._deps.count
        job = partial(
            prefix_of, endpoint, body, prepared.counted_input_tokens, lambda t: count(t, model)
        )
        if prepared.counted_input_tokens * 4 > self._deps.settings.offload_bytes:
            return await asyncio.get_running_loop().run_in_executor(self._deps.executor, job)
        return job()

    def _route(
        self, prepared: PreparedRequest, budget: BudgetState, session_tokens: int = 0
    ) -> RouteDecision:
        policy, identity = self._deps.policy, self._identity
        assert policy is not None and identity is not None
        traits = traits_for(
            policy,
            identity,
            self.seen.endpoint,
            prepared.facts,
            prepared.counted_input_tokens,
            task=self._task,
        )
        return decide_route(policy, identity, traits, budget, session_tokens)

    async def _reserve(
        self, prepared: PreparedRequest, route: RouteDecision
    ) -> RouteDecision | msgs.ProcessingResponse:
        """Reserve for the routed request; at the hard limit, try the overdraft model once."""
        deps = self._deps
        policy, identity, budgets = deps.policy, self._identity, deps.budgets
        assert policy is not None and identity is not None and budgets is not None
        now = deps.now_ms()
        ws = policy.workspaces[identity.workspace]
        fail_open = ws.on_redis_down == "open"
        settings = policy.routing_for(identity.workspace, identity.service)
        retried: list[RouteDecision] = []

        def overdraft_plan(left: int) -> Plan | None:
            retry = self._route(prepared, BudgetState("hard", left))
            if retry.refuse is not None:
                return None
            retried.append(retry)
            return self._plan_for(prepared, retry, now)

        plan, decision, used_overdraft = await budgets.reserve_with_overdraft(
            self._plan_for(prepared, route, now),
            fail_open,
            now,
            session=self.seen.session_id,
            # The plan just offered by the fallback, if any, goes with its own route.
            orphan=lambda p: self._orphan(prepared, retried[-1] if retried else route, p),
            overdraft_nanos=settings.overdraft.nanos if settings.overdraft else None,
            fallback=overdraft_plan,
        )
        if used_overdraft:
            route = retried[-1]
        self._plan, self._decision = plan, decision
        if not decision.allowed:
            error, headers = guard.denial(decision, plan, policy.timezone)
            if decision.reason == "budget" and decision.first_denial:
                log.warning("hard limit reached: %s", error.message)
            return self._reject(error, headers)
        cap = settings.max_session_input_tokens
        if cap is not None and decision.session_tokens > cap:
            # The session's running total is known only now, from the reservation itself.
            before = decision.session_tokens - prepared.counted_input_tokens
            guarded = self._route(prepared, BudgetState(budgets.level(identity)), before)
            if guarded.refuse is not None:
                return self._reject(guarded.refuse)
            route = guarded
        return route

    def _orphan(self, prepared: PreparedRequest, route: RouteDecision, plan: Plan) -> bytes:
        """The settlement to write if this request's hold expires unsettled (sidecar died).

        Made now, while everything needed to bill and attribute it is at hand: the input we
        counted, priced for the routed model, marked estimated; output is unknown. The hold
        itself is released by the reaper, so no reservation id.
        """
        ghost = replace(
            self.seen,
            facts=prepared.facts,
            counted_input_tokens=prepared.counted_input_tokens,
            routed_model=route.model,
            status=0,
            response_finished=False,
            stream=None,
            usage=None,
        )
        record = settle(ghost, self._deps.prices, self._deps.count)
        record.outcome = "orphaned"
        if route.steps:
            record.routing = route.header_value()
        return self._settlement(record, plan, reservation_id="").SerializeToString()

    def _plan_for(self, prepared: PreparedRequest, route: RouteDecision, now: int) -> Plan:
        deps = self._deps
        assert deps.policy is not None and self._identity is not None
        return plan_request(
            deps.policy,
            self._identity,
            model=route.model,
            counted_input=prepared.counted_input_tokens,
            output_cap=route.max_output_tokens or prepared.facts.output_cap,
            prices=deps.prices,
            now_ms=now,
            choices=prepared.facts.choices,
        )

    def _note_downgrades(self, route: RouteDecision) -> None:
        identity = self._identity
        assert identity is not None
        for step in route.steps:
            if step.kind in DOWNGRADE_STEPS and step.to_model and step.to_model != step.from_model:
                self._deps.telemetry.downgrade(
                    identity.workspace, identity.service, step.from_model, step.to_model
                )
                key = (identity.workspace, identity.service, step.kind, step.to_model)
                if key not in _ANNOUNCED:
                    _ANNOUNCED.add(key)
                    log.warning(
                        "%s/%s: %s %s -> %s (%s)",
                        identity.workspace,
                        identity.service,
                        step.kind,
                        step.from_model,
                        step.to_model,
                        step.why,
                    )

    def _forward(
        self, prepared: PreparedRequest, *, clear_route_cache: bool = False
    ) -> msgs.ProcessingResponse:
        self._prepared = prepared
        self.seen.facts = prepared.facts
        self.seen.counted_input_tokens = prepared.counted_input_tokens
        if prepared.body is None and not prepared.set_headers:
            return msgs.CONTINUE_REQUEST_BODY
        return msgs.replace_request_body(
            prepared.body,
            prepared.set_headers,
            prepared.remove_headers,
            clear_route_cache=clear_route_cache,
        )

    def _bad_request(self, err: OpenAIError) -> msgs.ProcessingResponse:
        if self._deps.settings.bad_request == "pass":
            log.info("passing through unparseable %s request: %s", self.seen.endpoint, err)
            return msgs.CONTINUE_REQUEST_BODY
        return self._reject(err)

    def _reject(
        self, err: OpenAIError, headers: dict[str, str] | None = None
    ) -> msgs.ProcessingResponse:
        contact = guard.contact_of(self._deps.policy, self._identity)
        err = guard.for_client(err, codex=self._codex, contact=contact)
        self.seen.rejected = err
        self.seen.status = err.status
        self.seen.response_finished = True
        self._finish()
        extra = {_RID: self.seen.request_id, **(headers or {})}
        if self._identity is not None:
            extra.update(guard.visibility_headers(self._identity, None))
        return msgs.immediate(err.status, err.body(), extra)

    # -- response -----------------------------------------------------------------------

    def on_response_headers(self, msg: msgs.pb.HttpHeaders) -> Reply:
        if self._endpoint is None:
            return msgs.CONTINUE_RESPONSE_HEADERS
        h = msgs.header_map(msg, _RESPONSE_HEADERS)
        try:
            self.seen.status = int(h.get(":status", "0"))
        except ValueError:
            self.seen.status = 0
        headers = {_RID: self.seen.request_id}
        if self._identity is not None:
            headers.update(guard.visibility_headers(self._identity, self._decision))
        route = self._route_decision
        if route is not None:
            headers["x-extproc-model-requested"] = route.requested_model
            headers["x-extproc-model-served"] = route.model
            if route.steps:
                headers["x-extproc-routing"] = route.header_value()
        if msg.end_of_stream:
            self.seen.response_finished = True
            self._finish()
            return msgs.response_headers(headers, stream=False)
        sse = h.get("content-type", "").startswith("text/event-stream")
        if sse:
            strip = self._prepared is not None and self._prepared.injected_usage
            self._meter = self._endpoint.stream_meter(strip_usage_chunk=strip)
        return msgs.response_headers(headers, stream=sse)

    def on_response_body(self, msg: msgs.pb.HttpBody) -> Reply:
        if self._endpoint is None:
            return msgs.CONTINUE_RESPONSE_BODY
        meter = self._meter
        if meter is None:
            # Buffered JSON: the whole body in one message; its headers are still held, so
            # the caller can be told what this call cost.
            if self.seen.status < 300:
                self.seen.usage, self.seen.served_model = self._endpoint.usage_from_json(msg.body)
            if not msg.end_of_stream:
                return msgs.CONTINUE_RESPONSE_BODY
            self.seen.response_finished = True
            record = self._finish()
            if record is None:
                return msgs.CONTINUE_RESPONSE_BODY
            cost = {"x-extproc-cost-usd": usd(record.cost_nanos)}
            if record.estimated:
                cost["x-extproc-cost-estimated"] = "true"
            return msgs.response_body_headers(cost)
        out = meter.feed(msg.body, last=msg.end_of_stream)
        if msg.end_of_stream:
            self.seen.response_finished = True
            self._finish()
        if out is msg.body:
            return msgs.CONTINUE_RESPONSE_BODY
        return msgs.replace_response_chunk(out)

    def on_internal_error(self, phase: str) -> msgs.ProcessingResponse:
        """A phase raised: refuse in OpenAI's shape before forwarding, pass through after."""
        if phase in ("request_headers", "request_body") and self._endpoint is not None:
            if self._closed:
                # Already settled (the failure came after a rejection was built).
                return msgs.immediate(500, INTERNAL_ERROR.body(), {_RID: self.seen.request_id})
            return self._reject(INTERNAL_ERROR)
        return _CONTINUE_PHASE.get(phase, msgs.CONTINUE_RESPONSE_BODY)

    # -- end -----------------------------------------------------------------------------

    def _finish(self) -> UsageRecord | None:
        if self._closed:
            return None
        self._closed = True
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
            record = UsageRecord(
                request_id=self.seen.request_id,
                time_ms=self.seen.time_ms,
                endpoint=self.seen.endpoint,
                status=self.seen.status,
                input_tokens=self.seen.counted_input_tokens,
                counted_input_tokens=self.seen.counted_input_tokens,
                estimated=True,
                outcome="error",
                error_code="extproc_internal_error",
            )
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
        record = settle(seen, deps.prices, deps.count)
        route = self._route_decision
        if route is not None and route.steps:
            record.routing = route.header_value()
            record.rule = next((st.rule for st in route.steps if st.kind == "rule" and st.rule), "")
        deps.ledger.submit(self._settlement(record))
        self._record = record
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
        charged: tuple[Charged, ...] = UNGOVERNED
        period_kind = "month"
        if identity is not None:
            record.workspace, record.service, record.key_id = (
                identity.workspace,
                identity.service,
                identity.key_id,
            )
            record.team = identity.team or ""
            ws = deps.policy.workspaces.get(identity.workspace) if deps.policy else None
            if plan is None and ws is not None:
                # Forwarded without a reservation (`bad_request: pass`): still charged to
                # every scope a reservation would have checked, its team's included.
                limits = charged_scopes(ws, identity)
                charged = tuple(Charged(s.scope, s.soft_nanos) for s in limits)
                period_kind = ws.period
        if plan is not None:
            charged = tuple(Charged(s.scope, s.soft_nanos) for s in plan.scopes)
            period_id = plan.period.id
        else:
            period_id = period_at(period_kind, now, tz).id
        if reservation_id is None:
            reservation_id = self._decision.reservation_id if self._decision else ""
        prefix = self._prefix
        return settlement_for(
            record,
            charged,
            period_id=period_id,
            local_time=datetime.fromtimestamp(now / 1000, tz),
            prices=deps.prices,
            reservation_id=reservation_id,
            attributed=identity is not None,
            prefix=None if prefix is None else CachePrefix(prefix.fingerprint, prefix.tokens),
        )

    def _steps(self) -> tuple[Any, ...]:
        return self._route_decision.steps if self._route_decision is not None else ()

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
            downgraded=any(step.kind in DOWNGRADE_STEPS for step in self._steps()),
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
            )
        )
