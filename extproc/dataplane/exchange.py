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
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial

from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane import selfservice
from extproc.dataplane.deps import Deps, KeyLookup
from extproc.dataplane.passthrough import PassthroughCall
from extproc.dataplane.settling import Settling
from extproc.governance import guard
from extproc.governance.budget import (
    Decision,
    Plan,
    per_choice_cap,
    plan_request,
)
from extproc.governance.credentials import (
    CLIENT_CREDENTIALS,
    MISSING_KEY,
    UPGRADE_HEADERS,
    WEBSOCKET_REFUSED,
    credentials_present,
    is_upgrade,
    presented_key,
)
from extproc.governance.keys import MISSING, Identity
from extproc.governance.models import list_body, models_for, retrieve_body
from extproc.governance.policy import Policy
from extproc.insight.cachehygiene import MIN_CACHEABLE_TOKENS, Prefix, prefix_of
from extproc.metering.decisions import (
    Observed,
    PreparedRequest,
    finalize,
    parse_request,
    prepare_request,
    utf8_text,
)
from extproc.metering.passthrough import PassthroughSeen
from extproc.metering.prices import usd
from extproc.routing.decide import (
    BudgetState,
    RouteDecision,
    decide_route,
    prompt_cache_key,
    traits_for,
)
from extproc.routing.rewrite import apply_route, output_cap_field, set_output_cap
from extproc.v1.ledger_pb2 import UsageRecord
from extproc.wire.endpoints import Endpoint, StreamMeter
from extproc.wire.errors import (
    INTERNAL_ERROR,
    MISSING_BODY,
    OpenAIError,
    unknown_url,
    upstream_credential_missing,
)
from extproc.wire.paths import MODELS_PATH, Kind, Target, classify

log = logging.getLogger("extproc.dataplane.exchange")

Reply = msgs.ProcessingResponse | Awaitable[msgs.ProcessingResponse]

_REQUEST_HEADERS = frozenset(
    {
        ":method", ":path", "authorization", "content-encoding", "x-request-id", "session_id",
        "session-id", "traceparent", "tracestate", "x-task", "originator", "user-agent",
        "content-type", *CLIENT_CREDENTIALS, *UPGRADE_HEADERS,
    }
)  # fmt: skip
ROUTE_HEADER = "x-extproc-route"
_RESPONSE_HEADERS = frozenset({":status", "content-type"})
_RID = "x-extproc-request-id"


class Exchange(Settling):
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
        "_pass",
        "_plan",
        "_prefix",
        "_prepared",
        "_record",
        "_request_chunks",
        "_route_decision",
        "_self",
        "_start_ns",
        "_started",
        "_target",
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
        self.busy_ns = 0  # the sidecar's time on this request's phases (the handler adds)
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
        self._codex = False
        self._target: Target | None = None
        self._pass: PassthroughCall | None = None
        self._self: selfservice.Call | None = None

    # -- request headers: which endpoint, which caller ----------------------------------

    def on_request_headers(self, msg: msgs.pb.HttpHeaders) -> Reply:
        # Attribution headers a client sent itself are collected to be stripped, never trusted.
        h, spoofed = msgs.request_header_map(msg, _REQUEST_HEADERS, "x-extproc-")
        method, path = h.get(":method", ""), h.get(":path", "")
        if path.startswith(selfservice.PREFIX):
            # Answered here, never forwarded: the developer's own pages and calls.
            self._closed = True
            self._self = selfservice.Call(self._deps, method, path, presented_key(h))
            return self._self.on_headers(msg.end_of_stream)
        seen = self.seen
        # 128 random bits as 32 hex digits, the shape a uuid4 hex had: the id is opaque
        # everywhere (records, headers, Redis), and this costs a third of uuid4().hex.
        seen.request_id = os.urandom(16).hex()
        seen.envoy_request_id = h.get("x-request-id", "")
        seen.session_id = h.get("session_id") or h.get("session-id") or ""
        self._content_encoding = h.get("content-encoding", "")
        self._trace = (h.get("traceparent"), h.get("tracestate"))
        self._task = h.get("x-task")
        self._codex = guard.is_codex(h.get("originator", ""), h.get("user-agent", ""))
        if is_upgrade(h):
            return self._refuse_unbilled(WEBSOCKET_REFUSED, "websocket_upgrade")
        target = classify(method, path)
        self._target = target
        seen.endpoint = target.name or "unknown"
        remove = [*spoofed]
        keys = self._deps.keys
        if keys is None or self._deps.policy is None:
            # Metering-only mode (no policy, no keys): nothing to swap, the client's own
            # credential goes upstream. Production deployments always run with a policy.
            return self._route_target(h, remove, {}, end_of_stream=msg.end_of_stream)
        remove += credentials_present(h)
        secret = presented_key(h)
        if not secret:
            return self._refuse_unbilled(MISSING_KEY, "missing_key")
        identity = keys.get(secret)
        if identity is MISSING:
            return self._resolve_then_admit(keys, secret, h, remove, msg.end_of_stream)
        return self._admit(identity, h, remove, msg.end_of_stream)  # type: ignore[arg-type]

    async def _resolve_then_admit(
        self, keys: KeyLookup, secret: str, h: dict[str, str], remove: list[str], eos: bool
    ) -> msgs.ProcessingResponse:
        try:
            identity = await keys.resolve(secret)
        except Exception:  # Redis unreachable: fall back to each workspace's policy later
            log.exception("key lookup failed")
            return self._reject(
                guard.denial(Decision(False, "redis_down"), None, self._deps.timezone)[0]
            )
        reply = self._admit(identity, h, remove, eos)
        return reply if isinstance(reply, msgs.ProcessingResponse) else await reply

    def _admit(
        self, identity: Identity | None, h: dict[str, str], remove: list[str], eos: bool
    ) -> Reply:
        policy = self._deps.policy
        if identity is None or policy is None or identity.workspace not in policy.workspaces:
            return self._refuse_unbilled(guard.UNKNOWN_KEY, "invalid_api_key")
        self._identity = identity
        paused = self._deps.paused.get(identity.key_id) if self._deps.paused else None
        if paused is not None:  # the runaway breaker (or a person) stopped this key
            return self._reject(paused)
        upstream_key = self._deps.upstream_keys.get(identity.workspace)
        if not upstream_key:
            missing = self._deps.upstream_missing.get(identity.workspace, "not configured")
            return self._reject(upstream_credential_missing(identity.workspace, missing))
        return self._route_target(
            h, remove, {"authorization": f"Bearer {upstream_key}"}, end_of_stream=eos
        )

    def _route_target(
        self, h: dict[str, str], remove: list[str], add: dict[str, str], *, end_of_stream: bool
    ) -> Reply:
        """Where the (authenticated) request goes: metered, passed through, answered, refused."""
        target = self._target
        assert target is not None
        if target.kind is Kind.UNKNOWN:
            return self._reject(unknown_url(target.method, target.path))
        if target.forward_path != h.get(":path"):
            # The provider gets the canonical spelling: exactly the endpoint we metered.
            add[":path"] = target.forward_path
        if target.kind is Kind.METERED:
            self._endpoint = target.endpoint
            if end_of_stream:
                # Refused for want of a body only once the caller is known: the record of
                # the refusal is attributed to its key like any other.
                return self._reject(MISSING_BODY)
            if not add and not remove:
                return msgs.CONTINUE_METERED_REQUEST_HEADERS
            return msgs.forward_request_headers(add, ["accept-encoding", *remove])
        api = target.api
        assert api is not None
        identity, policy = self._identity, self._deps.policy
        if identity is not None and policy is not None:
            refusal = policy.workspaces[identity.workspace].passthrough.refusal(api, target.name)
            if refusal is not None:
                return self._reject(refusal)
        seen = self.seen
        self._pass = PassthroughCall(
            PassthroughSeen(
                seen.request_id, seen.time_ms, target, seen.envoy_request_id, seen.session_id
            ),
            governed=identity is not None and self._deps.budgets is not None,
        )
        if identity is not None and policy is not None and target.path.startswith(MODELS_PATH):
            return self._answer_models(policy, identity, target)
        if self._pass.holds and end_of_stream:
            return self._reject(MISSING_BODY)  # nothing to count or price: refused, like metered
        json_body = h.get("content-type", "").startswith("application/json") and not end_of_stream
        reply = self._pass.forward(add, remove, json_body=json_body)
        if identity is None or self._deps.keys is None or self._pass.holds:
            return reply  # a held call's reservation checks revocation itself
        return self._unless_revoked(self._deps.keys, identity, reply)

    async def _unless_revoked(
        self, keys: KeyLookup, identity: Identity, reply: msgs.ProcessingResponse
    ) -> msgs.ProcessingResponse:
        """Free and unpriced passthrough calls hold no reservation, so the budget scripts'
        revocation check never runs for them: ask the revoked set directly, so a revocation
        is immediate here too."""
        try:
            revoked = await keys.is_revoked(identity)
        except Exception:
            log.exception("revocation check failed")
            policy = self._deps.policy
            ws = policy.workspaces.get(identity.workspace) if policy else None
            if ws is not None and ws.on_redis_down == "open":
                return reply
            return self._reject(
                guard.denial(Decision(False, "redis_down"), None, self._deps.timezone)[0]
            )
        if revoked:
            self._pass = None
            return self._reject(guard.UNKNOWN_KEY)
        return reply

    def _answer_models(
        self, policy: Policy, identity: Identity, target: Target
    ) -> msgs.ProcessingResponse:
        models = models_for(policy, identity, self._deps.prices.families())
        if target.path == MODELS_PATH:
            status, body = 200, list_body(models)
        else:
            status, body = retrieve_body(models, target.path.rsplit("/", 1)[1])
        assert self._pass is not None
        self._pass.seen.answered_locally = True
        self.seen.status = self._pass.seen.status = status
        self.seen.response_finished = True
        self._finish()
        headers = {_RID: self.seen.request_id, **guard.visibility_headers(identity, None)}
        return msgs.immediate(status, body, headers)

    def _refuse_unbilled(self, err: OpenAIError, reason: str) -> msgs.ProcessingResponse:
        """Refuse before anyone is identified: a counter, not a ledger record.

        Nothing reached the provider and nobody can be billed, and a flood of bad keys must
        cost the platform one counter increment each, not a ledger write.
        """
        self._closed = True
        self._deps.ledger.note_refused(reason)
        return msgs.immediate(err.status, err.body(), {_RID: self.seen.request_id})

    # -- request body: parse, count, reserve --------------------------------------------

    def on_request_body(self, msg: msgs.pb.HttpBody) -> Reply:
        if self._self is not None:  # a POST to the sidecar's own API (see selfservice)
            return self._self.on_body(msg)  # type: ignore[no-any-return]
        passing = self._pass
        if passing is not None:
            body = passing.on_request_body(msg)
            return msgs.CONTINUE_REQUEST_BODY if body is None else self._hold(passing, body)
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
        unpriced = self._unpriced(route.model)
        if unpriced is not None:
            return self._reject(unpriced)
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
        try:
            prepared = finalize(prepared, rewritten=bool(rewritten))
        except OpenAIError as err:  # a number JSON cannot carry back (1e999), say
            return self._bad_request(err)
        if route.route:
            # A routed request must be re-matched by Envoy against the new header.
            prepared = replace(
                prepared, set_headers={**prepared.set_headers, ROUTE_HEADER: route.route}
            )
        for step in route.downgrades():
            self._deps.telemetry.announce_downgrade(
                self._identity.workspace, self._identity.service, step
            )
        return self._forward(prepared, clear_route_cache=route.route is not None)

    async def _hold(self, passing: PassthroughCall, raw: bytes) -> msgs.ProcessingResponse:
        """Hold a priced passthrough call before it goes, like a metered one (see `hold`)."""
        held = await passing.hold(
            self._deps,
            self._identity,  # type: ignore[arg-type]
            raw,
            self._content_encoding,
            orphan=lambda plan: self._passthrough_orphan(passing, plan),
        )
        if held.bad_input is not None:
            return self._bad_request(held.bad_input)
        if held.plan is None or held.decision is None:
            assert held.refusal is not None
            return self._reject(held.refusal)
        self._plan, self._decision = held.plan, held.decision
        if not held.decision.allowed:
            return self._denied(held.plan, held.decision, held.ask)
        return msgs.CONTINUE_REQUEST_BODY

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
            return self._denied(plan, decision, lambda: self._ask(prepared, route, plan))
        cap = settings.max_session_input_tokens
        if cap is not None and decision.session_tokens > cap:
            # The session's running total is known only now, from the reservation itself.
            before = decision.session_tokens - prepared.counted_input_tokens
            guarded = self._route(prepared, BudgetState(budgets.level(identity)), before)
            if guarded.refuse is not None:
                return self._reject(guarded.refuse)
            route = guarded
        return route

    def _unpriced(self, model: str) -> OpenAIError | None:
        """The refusal of a model nothing prices, if the caller's workspace refuses them."""
        deps, identity = self._deps, self._identity
        assert deps.policy is not None and identity is not None
        refusal = deps.policy.workspaces[identity.workspace].pricing.refusal(model, deps.prices)
        if refusal is not None and deps.new_models is not None:
            deps.new_models.seen(model, identity.workspace, admitted=False)
        return refusal

    def _denied(
        self, plan: Plan, decision: Decision, ask: Callable[[], guard.Ask] | None
    ) -> msgs.ProcessingResponse:
        """Refuse a denied reservation; `ask` says what it would have held (budget only)."""
        assert self._deps.policy is not None
        what = ask() if ask is not None and decision.reason == "budget" else None
        public = self._deps.settings.public_url
        error, headers = guard.denial(decision, plan, self._deps.policy.timezone, what, public)
        if decision.reason == "budget" and decision.first_denial:
            log.warning("hard limit reached: %s", error.message)
        return self._reject(error, headers)

    def _ask(self, prepared: PreparedRequest, route: RouteDecision, plan: Plan) -> guard.Ask:
        """What a refused metered request would have held, for its refusal's text."""
        return guard.ask(
            self._deps.prices,
            plan,
            model=route.model,
            outputs=prepared.facts.choices,
            output_param=output_cap_field(self.seen.endpoint),
            stated=(route.max_output_tokens or prepared.facts.output_cap) is not None,
            source="the workspace's default_output_cap",
        )

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
            service_tier=prepared.facts.service_tier,
            tools=prepared.facts.tools,
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
        if self._pass is not None:
            self._pass.seen.rejected = err
            self._pass.seen.status = err.status
        self.seen.response_finished = True
        self._finish()
        extra = {_RID: self.seen.request_id, **(headers or {})}
        if self._identity is not None:
            extra.update(guard.visibility_headers(self._identity, None))
        return msgs.immediate(err.status, err.body(), extra)

    # -- response -----------------------------------------------------------------------

    def on_response_headers(self, msg: msgs.pb.HttpHeaders) -> Reply:
        if self._pass is not None:
            return self._passthrough_response_headers(msg)
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
            if strip:
                # The usage chunk we asked for is cut out: a declared length would be wrong.
                return msgs.response_headers(headers, stream=True, remove=("content-length",))
        return msgs.response_headers(headers, stream=sse)

    def on_response_body(self, msg: msgs.pb.HttpBody) -> Reply:
        if self._pass is not None:
            return self._passthrough_response_body(msg)
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

    def _passthrough_response_headers(self, msg: msgs.pb.HttpHeaders) -> msgs.ProcessingResponse:
        assert self._pass is not None
        done = self._pass.on_response_headers(msg)
        self.seen.status = self._pass.seen.status
        headers = {_RID: self.seen.request_id}
        if self._identity is not None:
            headers.update(guard.visibility_headers(self._identity, self._decision))
        if done:
            # Nothing more to read: the body (a file download, say) streams straight through.
            self.seen.response_finished = True
            self._finish()
        return msgs.response_headers(headers, stream=False)

    def _passthrough_response_body(self, msg: msgs.pb.HttpBody) -> msgs.ProcessingResponse:
        assert self._pass is not None
        if not self._pass.on_response_body(msg):
            return msgs.CONTINUE_RESPONSE_BODY
        self.seen.response_finished = True
        record = self._finish()
        if record is None:
            return msgs.CONTINUE_RESPONSE_BODY
        return msgs.response_body_headers({"x-extproc-cost-usd": usd(record.cost_nanos)})

    def on_internal_error(self, phase: str) -> msgs.ProcessingResponse:
        """A phase raised: refuse in OpenAI's shape before forwarding, pass through after.

        A request whose headers phase failed is refused whatever it was for: its credentials
        have not been swapped, so continuing would send the caller's key upstream.
        """
        before = phase == "request_headers" or (
            phase == "request_body"
            and (self._endpoint is not None or (self._pass is not None and self._pass.holds))
        )
        if before:
            if self._closed:
                # Already settled (the failure came after a rejection was built).
                return msgs.immediate(500, INTERNAL_ERROR.body(), {_RID: self.seen.request_id})
            return self._reject(INTERNAL_ERROR)
        return msgs.CONTINUE_PHASE.get(phase, msgs.CONTINUE_RESPONSE_BODY)
