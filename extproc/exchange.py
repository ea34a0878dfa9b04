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
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from zoneinfo import ZoneInfo

from extproc import envoy_msgs as msgs
from extproc import guard
from extproc.budget import Budgets, Decision, Plan, plan_request
from extproc.keys import MISSING, Identity, KeyCache
from extproc.ledger import Ledger, prefix_for
from extproc.metering import Observed, PreparedRequest, prepare_request, settle
from extproc.periods import period_at
from extproc.policy import Policy
from extproc.prices import PriceTable
from extproc.settings import Settings
from extproc.telemetry import RequestTelemetry, Telemetry
from extproc.v1.ledger_pb2 import ScopeCharge, Settlement, UsageRecord
from extproc.wire.endpoints import Endpoint, StreamMeter, endpoint_for
from extproc.wire.errors import OpenAIError

log = logging.getLogger("extproc.exchange")

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
    }
)
_RESPONSE_HEADERS = frozenset({":status", "content-type"})
_RID = "x-extproc-request-id"


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class Deps:
    """What every exchange shares. `policy` and `upstream_keys` change on hot reload."""

    settings: Settings
    prices: PriceTable
    count: Callable[[str, str], int]
    ledger: Ledger
    executor: Executor
    policy: Policy | None = None
    keys: KeyCache | None = None
    budgets: Budgets | None = None
    upstream_keys: dict[str, str] = field(default_factory=dict)
    now_ms: Callable[[], int] = _now_ms
    telemetry: Telemetry = field(default_factory=Telemetry)

    @property
    def timezone(self) -> ZoneInfo:
        return self.policy.timezone if self.policy else ZoneInfo("UTC")


def unmetered_key(method: str, path: str) -> str:
    """Group unmetered traffic by resource, not by id: `GET /v1/responses/*`."""
    parts = path.split("?", 1)[0].split("/")
    if len(parts) > 3:
        parts = [*parts[:3], "*"]
    return f"{method} {'/'.join(parts)[:128]}"


def _spoofed(msg: msgs.pb.HttpHeaders) -> list[str]:
    """Attribution headers a client sent itself: stripped, never trusted."""
    return [h.key for h in msg.headers.headers if h.key.startswith("x-extproc-")]


class Exchange:
    __slots__ = (
        "_closed",
        "_content_encoding",
        "_decision",
        "_deps",
        "_endpoint",
        "_identity",
        "_meter",
        "_plan",
        "_prepared",
        "_record",
        "_request_chunks",
        "_start_ns",
        "_started",
        "_trace",
        "busy_ns",
        "seen",
    )

    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        self._started = time.monotonic()
        self._start_ns = time.time_ns()
        self._trace: tuple[str | None, str | None] = (None, None)
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

    # -- request headers: which endpoint, which caller ----------------------------------

    def on_request_headers(self, msg: msgs.pb.HttpHeaders) -> Reply:
        h = msgs.header_map(msg, _REQUEST_HEADERS)
        method, path = h.get(":method", ""), h.get(":path", "")
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
        if msg.end_of_stream:
            return self._reject(
                OpenAIError(
                    400,
                    "This endpoint needs a JSON request body; the request had none.",
                    "invalid_request_error",
                    None,
                    "missing_body",
                )
            )
        keys = self._deps.keys
        if keys is None or self._deps.policy is None:
            return msgs.CONTINUE_METERED_REQUEST_HEADERS
        secret = guard.bearer(h.get("authorization", ""))
        identity = keys.get(secret)
        if identity is MISSING:
            return self._resolve_then_admit(keys, secret, _spoofed(msg))
        return self._admit(identity, _spoofed(msg))  # type: ignore[arg-type]

    async def _resolve_then_admit(
        self, keys: KeyCache, secret: str, spoofed: list[str]
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
            return self._reject(
                OpenAIError(
                    503,
                    f"Workspace {identity.workspace} has no upstream credential configured.",
                    "server_error",
                    None,
                    "upstream_credential_missing",
                )
            )
        self._identity = identity
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
        job = partial(
            prepare_request,
            self._endpoint,
            raw,
            self._content_encoding,
            max_body_bytes=settings.max_body_bytes,
            count=self._deps.count,
        )
        if len(raw) > settings.offload_bytes or self._identity is not None:
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
        if self._identity is not None:
            refusal = await self._reserve(prepared)
            if refusal is not None:
                return refusal
        return self._forward(prepared)

    async def _reserve(self, prepared: PreparedRequest) -> msgs.ProcessingResponse | None:
        deps = self._deps
        policy, identity, budgets = deps.policy, self._identity, deps.budgets
        assert policy is not None and identity is not None and budgets is not None
        now = deps.now_ms()
        facts = prepared.facts
        self.seen.facts = facts
        self.seen.counted_input_tokens = prepared.counted_input_tokens
        plan = plan_request(
            policy,
            identity,
            model=facts.model,
            counted_input=prepared.counted_input_tokens,
            output_cap=facts.output_cap,
            prices=deps.prices,
            now_ms=now,
        )
        ws = policy.workspaces[identity.workspace]
        decision = await budgets.reserve(plan, ws.on_redis_down == "open", now)
        self._plan, self._decision = plan, decision
        if decision.allowed:
            return None
        error, headers = guard.denial(decision, plan, policy.timezone)
        if decision.reason == "budget" and decision.first_denial:
            log.warning("hard limit reached: %s", error.message)
        return self._reject(error, headers)

    def _forward(self, prepared: PreparedRequest) -> msgs.ProcessingResponse:
        self._prepared = prepared
        self.seen.facts = prepared.facts
        self.seen.counted_input_tokens = prepared.counted_input_tokens
        if prepared.body is None:
            return msgs.CONTINUE_REQUEST_BODY
        return msgs.replace_request_body(
            prepared.body, prepared.set_headers, prepared.remove_headers
        )

    def _bad_request(self, err: OpenAIError) -> msgs.ProcessingResponse:
        if self._deps.settings.bad_request == "pass":
            log.info("passing through unparseable %s request: %s", self.seen.endpoint, err)
            return msgs.CONTINUE_REQUEST_BODY
        return self._reject(err)

    def _reject(
        self, err: OpenAIError, headers: dict[str, str] | None = None
    ) -> msgs.ProcessingResponse:
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
            cost = {"x-extproc-cost-usd": guard.usd_exact(record.cost_nanos)}
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

    # -- end -----------------------------------------------------------------------------

    def _finish(self) -> UsageRecord | None:
        if self._closed:
            return None
        self._closed = True
        deps, seen = self._deps, self.seen
        if self._meter is not None and seen.stream is None:
            seen.stream = self._meter.finish()
            seen.usage = seen.usage or seen.stream.usage
            seen.served_model = seen.served_model or seen.stream.served_model
        seen.duration_ms = int((time.monotonic() - self._started) * 1000)
        record = settle(seen, deps.prices, deps.count)
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

    def _settlement(self, record: UsageRecord) -> Settlement:
        deps = self._deps
        now = deps.now_ms()
        tz = deps.timezone
        identity, plan = self._identity, self._plan
        scopes: list[ScopeCharge] = []
        if identity is not None:
            record.workspace, record.service, record.key_id = (
                identity.workspace,
                identity.service,
                identity.key_id,
            )
            record.team = identity.team or ""
        if plan is not None:
            scopes = [
                ScopeCharge(scope=s.scope, soft_nanos=-1 if s.soft_nanos is None else s.soft_nanos)
                for s in plan.scopes
            ]
            period = plan.period
        else:
            kind = "month"
            if deps.policy is not None and identity is not None:
                ws = deps.policy.workspaces.get(identity.workspace)
                kind = ws.period if ws else kind
                scopes = [ScopeCharge(scope="ws", soft_nanos=-1)]
                if identity.service:
                    scopes.append(ScopeCharge(scope=f"svc:{identity.service}", soft_nanos=-1))
                scopes.append(ScopeCharge(scope=f"key:{identity.key_id}", soft_nanos=-1))
            else:
                scopes = [ScopeCharge(scope="ws", soft_nanos=-1)]
            period = period_at(kind, now, tz)
        if record.model_served or record.model_requested:
            scopes.append(
                ScopeCharge(
                    scope=f"model:{record.model_served or record.model_requested}", soft_nanos=-1
                )
            )
        local = datetime.fromtimestamp(now / 1000, tz)
        return Settlement(
            prefix=prefix_for(record.workspace),
            reservation_id=self._decision.reservation_id if self._decision else "",
            period=period.id,
            day=local.strftime("%Y-%m-%d"),
            hour=local.strftime("%Y-%m-%dT%H"),
            scopes=scopes,
            record=record,
        )

    def close(self) -> None:
        """The ext_proc stream ended: settle the exchange if nothing has yet, then report it."""
        self._finish()
        record = self._record
        if record is None:
            return
        self._record = None
        decision = self._decision
        denied = decision if decision is not None and not decision.allowed else None
        if denied is None and self.seen.rejected is not None:
            verdict, reason = "denied", "bad_request"
        elif denied is not None:
            verdict, reason = "denied", denied.reason
        else:
            verdict, reason = ("estimated" if record.estimated else "allowed"), None
        self._deps.telemetry.observe(
            RequestTelemetry(
                record=record,
                start_ns=self._start_ns,
                end_ns=time.time_ns(),
                traceparent=self._trace[0],
                tracestate=self._trace[1],
                decision=verdict,
                rule=None,
                denial_reason=reason,
                denial_scope=denied.denied.scope if denied and denied.denied else None,
                sidecar_overhead_ns=self.busy_ns,
            )
        )
