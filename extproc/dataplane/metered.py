"""A metered exchange: one of the four endpoints whose tokens are counted, routed, reserved
and billed from the answer's usage.

After its headers (`opening`) the request body is read whole, parsed and counted
(`metering.parse_request`, off the event loop when big), admitted (`admission.admit`:
route, plan, reserve) and rewritten for the route before it is forwarded. The response
headers say JSON or SSE; usage is read from the one buffered JSON body (whose reply can
still carry the cost header) or chunk by chunk from the stream. Every refusal is recorded
like a served request. The handler owns what it saw (`seen`); its `Settler` owns the
settlement.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from extproc.dataplane import admission
from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane.admission import Admitted, Refusal
from extproc.dataplane.deps import Deps
from extproc.dataplane.lifecycle import (
    DONE,
    LET_THROUGH,
    REQUEST,
    REQUEST_BODY,
    RESPONSE,
    UPSTREAM,
    Phase,
    Reply,
)
from extproc.dataplane.request import RID, RequestInfo, refusal_reply
from extproc.dataplane.settle import Settler
from extproc.governance import guard
from extproc.governance.keys import Identity
from extproc.metering.cacheprefix import MIN_CACHEABLE_TOKENS, prefix_of
from extproc.metering.decisions import (
    Observed,
    PreparedRequest,
    finalize,
    parse_request,
    settle,
    utf8_text,
)
from extproc.metering.prices import usd
from extproc.metering.settlement import CachePrefix
from extproc.routing import shadow
from extproc.routing.decide import RouteDecision, prompt_cache_key
from extproc.routing.rewrite import apply_route
from extproc.v1.ledger_pb2 import UsageRecord
from extproc.wire.endpoints import Endpoint, StreamMeter
from extproc.wire.errors import INTERNAL_ERROR, OpenAIError
from extproc.wire.spec import EndpointSpec

log = logging.getLogger("extproc.dataplane.metered")

ROUTE_HEADER = "x-extproc-route"
RESPONSE_HEADERS = frozenset({":status", "content-type"})


class MeteredExchange:
    """One metered request, from its body to its last response chunk."""

    __slots__ = (
        "_chunks",
        "_deps",
        "_info",
        "_meter",
        "_reader",
        "_route",
        "_strip_usage",
        "books",
        "identity",
        "seen",
        "state",
    )

    def __init__(
        self, deps: Deps, info: RequestInfo, identity: Identity | None, spec: EndpointSpec
    ) -> None:
        reader = spec.reader
        assert reader is not None
        self._deps = deps
        self._info = info
        self._reader: Endpoint = reader
        self.identity = identity
        self.books = Settler(deps, info, identity, spec.operation)
        self.seen = Observed(
            request_id=info.request_id,
            envoy_request_id=info.envoy_request_id,
            time_ms=info.time_ms,
            spec=spec,
            session_id=info.session_id,
        )
        self.state = REQUEST
        self._chunks: list[bytes] = []
        self._route: RouteDecision | None = None
        self._meter: StreamMeter | None = None
        self._strip_usage = False

    # -- request body: parse, count, admit, rewrite ------------------------------------

    def on_request_body(self, msg: msgs.pb.HttpBody) -> Reply:
        self._chunks.append(msg.body)
        if not msg.end_of_stream:
            return msgs.CONTINUE_REQUEST_BODY
        raw = b"".join(self._chunks)
        self._chunks.clear()
        deps, settings = self._deps, self._deps.settings
        job = partial(
            parse_request,
            self._reader,
            raw,
            self._info.content_encoding,
            max_body_bytes=settings.max_body_bytes,
            count=deps.count,
        )
        offload = len(raw) > settings.offload_bytes
        if offload or self.identity is not None:
            return self._admit(job, offload=offload)
        try:
            prepared = job()
        except OpenAIError as err:
            return self._unreadable(err)
        self._read(prepared)
        return self._forward(finalize(prepared), prepared.encoded)

    async def _admit(
        self, job: partial[PreparedRequest], *, offload: bool
    ) -> msgs.ProcessingResponse:
        deps, seen, identity = self._deps, self.seen, self.identity
        try:
            if offload:
                prepared = await asyncio.get_running_loop().run_in_executor(deps.executor, job)
            else:
                prepared = job()
        except OpenAIError as err:
            return self._unreadable(err)
        self._read(prepared)
        if identity is None:
            return self._forward(finalize(prepared), prepared.encoded)
        if not seen.session_id and prepared.facts.prompt_cache_key:
            # No session header: a client-chosen prompt_cache_key marks the conversation.
            seen.session_id = utf8_text(f"pck:{prepared.facts.prompt_cache_key}")
        admitted = await admission.admit(deps, identity, seen, prepared, self._info.task)
        if isinstance(admitted, Refusal):
            return self._refuse(admitted)
        return await self._go(prepared, admitted, identity)

    def _read(self, prepared: PreparedRequest) -> None:
        seen = self.seen
        seen.facts = prepared.facts
        seen.counted_input_tokens = prepared.counted_input_tokens
        self._strip_usage = prepared.injected_usage

    async def _go(
        self, prepared: PreparedRequest, admitted: Admitted, identity: Identity
    ) -> msgs.ProcessingResponse:
        """Rewrite the admitted request for its route and let it go."""
        route = admitted.route
        assert route is not None
        books, seen, deps = self.books, self.seen, self._deps
        books.held(admitted.plan, admitted.decision)
        books.downgraded = route.downgraded
        self._route = route
        seen.routed_model = route.model
        body = prepared.parsed
        assert body is not None and seen.spec is not None
        rewritten = (route.changed or admitted.output_cap is not None) and apply_route(
            seen.spec,
            body,
            route,
            prompt_cache_key(identity, seen.session_id) if route.inject_prompt_cache_key else None,
            admitted.output_cap,
        )
        books.prefix = await self._fingerprint(prepared)
        try:
            new_body = finalize(prepared, rewritten=bool(rewritten))
        except OpenAIError as err:  # a number JSON cannot carry back (1e999), say
            return self._unreadable(err)
        for step in route.downgrades():
            deps.telemetry.announce_downgrade(identity.workspace, identity.service, step)
        return self._forward(new_body, prepared.encoded, route.route)

    async def _fingerprint(self, prepared: PreparedRequest) -> CachePrefix | None:
        """The (routed) request's cacheable prefix; hashed off the event loop when big."""
        spec, body, counted = self.seen.spec, prepared.parsed, prepared.counted_input_tokens
        if spec is None or body is None or counted < MIN_CACHEABLE_TOKENS:
            return None
        # The tail is counted as `counted` was, with the requested model's encoding: the
        # subtraction stays consistent and every long text is a token-cache hit.
        model = prepared.facts.model
        count = self._deps.count
        job = partial(prefix_of, spec, body, counted, lambda text: count(text, model))
        if counted * 4 > self._deps.settings.offload_bytes:
            return await asyncio.get_running_loop().run_in_executor(self._deps.executor, job)
        return job()

    def _forward(
        self, body: bytes | None, encoded: bool, route: str | None = None
    ) -> msgs.ProcessingResponse:
        """Let the request go: the new body (and the headers that go with it), if any."""
        self.state = UPSTREAM
        if body is None and route is None:
            return msgs.CONTINUE_REQUEST_BODY
        headers: dict[str, str] = {}
        remove: tuple[str, ...] = ()
        if body is not None:
            headers["content-length"] = str(len(body))
            if encoded:
                remove = ("content-encoding",)  # re-serialised, sent uncompressed
        if route is not None:
            # A routed request must be re-matched by Envoy against the new header.
            headers[ROUTE_HEADER] = route
        return msgs.replace_request_body(body, headers, remove, clear_route_cache=route is not None)

    def _unreadable(self, err: OpenAIError) -> msgs.ProcessingResponse:
        refusal = admission.unreadable(self._deps, err)
        if refusal is None:
            log.info("passing through unparseable %s request: %s", self.seen.endpoint, err)
            self.state = UPSTREAM
            return msgs.CONTINUE_REQUEST_BODY
        return self._refuse(refusal)

    def _refuse(self, refusal: Refusal) -> msgs.ProcessingResponse:
        """Answer here, never forwarded; recorded like any request (what was held, released)."""
        err = self.books.refused(refusal.error, refusal.plan, refusal.decision)
        seen = self.seen
        seen.rejected, seen.status, seen.response_finished = err, err.status, True
        self._finish()
        return refusal_reply(self._info, self.identity, err, refusal.headers)

    # -- response -----------------------------------------------------------------------

    def on_response_headers(self, msg: msgs.pb.HttpHeaders) -> msgs.ProcessingResponse:
        h = msgs.header_map(msg, RESPONSE_HEADERS)
        seen = self.seen
        try:
            seen.status = int(h.get(":status", "0"))
        except ValueError:
            seen.status = 0
        headers = {RID: seen.request_id}
        if self.identity is not None:
            headers.update(guard.visibility_headers(self.identity, self.books.decision))
        route = self._route
        if route is not None:
            headers["x-extproc-model-requested"] = route.requested_model
            headers["x-extproc-model-served"] = route.model
            if route.steps:
                headers["x-extproc-routing"] = route.header_value()
        if msg.end_of_stream:
            seen.response_finished = True
            self._finish()
            return msgs.response_headers(headers, stream=False)
        self.state = RESPONSE
        if h.get("content-type", "").startswith("text/event-stream"):
            strip = self._strip_usage
            self._meter = self._reader.stream_meter(strip_usage_chunk=strip)
            if strip:
                # The usage chunk we asked for is cut out: a declared length would be wrong.
                return msgs.response_headers(headers, stream=True, remove=("content-length",))
            return msgs.response_headers(headers, stream=True)
        return msgs.response_headers(headers, stream=False)

    def on_response_body(self, msg: msgs.pb.HttpBody) -> msgs.ProcessingResponse:
        seen, meter = self.seen, self._meter
        if meter is None:
            # Buffered JSON: the whole body in one message; its headers are still held, so
            # the caller can be told what this call cost.
            if seen.status < 300:
                seen.usage, seen.served_model = self._reader.usage_from_json(msg.body)
            if not msg.end_of_stream:
                return msgs.CONTINUE_RESPONSE_BODY
            seen.response_finished = True
            record = self._finish()
            if record is None:
                return msgs.CONTINUE_RESPONSE_BODY
            cost = {"x-extproc-cost-usd": usd(record.cost_nanos)}
            if record.estimated:
                cost["x-extproc-cost-estimated"] = "true"
            return msgs.response_body_headers(cost)
        out = meter.feed(msg.body, last=msg.end_of_stream)
        if msg.end_of_stream:
            seen.response_finished = True
            self._finish()
        if out is msg.body:
            return msgs.CONTINUE_RESPONSE_BODY
        return msgs.replace_response_chunk(out)

    # -- the end ------------------------------------------------------------------------

    def _finish(self) -> UsageRecord | None:
        self.state = DONE
        return self.books.settle(self._record, self.seen)

    def _record(self) -> UsageRecord:
        """The one usage record of what was seen (see `metering.decisions.settle`)."""
        deps, seen = self._deps, self.seen
        meter = self._meter
        if meter is not None and seen.stream is None:
            seen.stream = meter.finish()
            seen.usage = seen.usage or seen.stream.usage
            seen.served_model = seen.served_model or seen.stream.served_model
        seen.duration_ms = self.books.duration_ms
        record = settle(seen, deps.prices, deps.count)
        if deps.shadow is not None:
            record.shadow = self._shadow_verdict()
        route = self._route
        if route is not None and route.steps:
            record.routing = route.header_value()
            record.rule = next((st.rule for st in route.steps if st.kind == "rule" and st.rule), "")
        return record

    def _shadow_verdict(self) -> str:
        """The shadow policy's decision on this request (see routing.shadow), computed
        with the spend the real reservation read; never enforced."""
        identity, facts, deps = self.identity, self.seen.facts, self._deps
        if identity is None or facts is None or deps.shadow is None:
            return ""
        decision = self.books.decision
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
                task=self._info.task,
            )
        except Exception:  # a shadow must never cost the real request anything
            log.exception("shadow policy evaluation failed")
            return "error"

    def on_internal_error(self, phase: Phase) -> msgs.ProcessingResponse:
        if phase is REQUEST_BODY:  # nothing forwarded yet: refuse in OpenAI's shape
            if self.books.settled:
                # Already settled (the failure came after a refusal was built).
                return msgs.immediate(500, INTERNAL_ERROR.body(), {RID: self.seen.request_id})
            return self._refuse(Refusal(INTERNAL_ERROR))
        return LET_THROUGH.get(phase, msgs.CONTINUE_RESPONSE_BODY)

    def close(self, busy_ns: int) -> None:
        if not self.books.settled:
            self._finish()
        self.books.report(busy_ns)
