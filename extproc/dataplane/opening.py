"""A request's headers: who calls, what for, and so which handler answers it. Chosen once.

Deny by default. Attribution headers a client sent itself are stripped, never trusted; a
request with no key, an unknown one or a revoked one goes nowhere; the caller's credentials
are swapped for its workspace's real key; the path is classified (`wire.paths.classify`)
and forwarded in its canonical spelling, so the provider sees exactly what was metered.
The outcome is one handler (`lifecycle.Handler`) and its reply to these headers:

* `MeteredExchange` for the metered four (`metered`);
* `PassthroughCall` for an endpoint the workspace lets through (`passthrough`);
* `Answered` for what is answered here: the caller's model list, refusals (recorded),
  refusals before anyone is identified (counted only);
* `/extproc/` self-service paths (`selfservice`): answered at the headers, or a
  `selfservice.Call` that answers a top-up request at its body (counted only).

The policy decisions on the way (a paused key, the upstream key, the passthrough policy, a
failed key lookup, a revocation check) are admission's (`admission`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

from extproc.dataplane import admission, answered, selfservice
from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane.admission import Refusal
from extproc.dataplane.deps import Deps, KeyLookup
from extproc.dataplane.lifecycle import Chosen
from extproc.dataplane.metered import MeteredExchange
from extproc.dataplane.passthrough import PassthroughCall
from extproc.dataplane.request import RID, RequestInfo, unbilled
from extproc.governance import guard
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
from extproc.wire.errors import INTERNAL_ERROR, MISSING_BODY, unknown_url
from extproc.wire.paths import Kind, Target, classify
from extproc.wire.spec import MODELS

log = logging.getLogger("extproc.dataplane.opening")

REQUEST_HEADERS = frozenset(
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
        "content-type",
        *CLIENT_CREDENTIALS,
        *UPGRADE_HEADERS,
    }
)
CLAIMED = "x-extproc-"
"""Headers under this prefix are ours to write: whatever a client sent under it is removed."""


class Opening:
    """Reads one request's headers and chooses its handler (see the module docstring).

    What it has learnt so far (the request, the caller, the target) stays here, so a
    headers phase that fails half-way is still refused and recorded as what it was.
    """

    __slots__ = ("_deps", "_handler", "_identity", "_info", "_target")

    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        self._info: RequestInfo | None = None
        self._identity: Identity | None = None
        self._target: Target | None = None
        self._handler: MeteredExchange | PassthroughCall | None = None

    def choose(self, msg: msgs.pb.HttpHeaders) -> Chosen | Awaitable[Chosen]:
        deps = self._deps
        h, spoofed = msgs.request_header_map(msg, REQUEST_HEADERS, CLAIMED)
        method, path = h.get(":method", ""), h.get(":path", "")
        if path.startswith(selfservice.PREFIX):
            # Answered here, never forwarded: the developer's own pages and calls.
            secret = presented_key(h)
            return selfservice.open_call(deps, method, path, secret, msg.end_of_stream)
        info = self._info = RequestInfo(h, deps.now_ms())
        if is_upgrade(h):
            return None, unbilled(deps, info, WEBSOCKET_REFUSED, "websocket_upgrade")
        self._target = classify(method, path)
        remove = [*spoofed]
        keys = deps.keys
        if keys is None or deps.policy is None:
            # Metering-only mode (no policy, no keys): nothing to swap, the client's own
            # credential goes upstream. Production deployments always run with a policy.
            return self._route(h, remove, {}, msg.end_of_stream)
        remove += credentials_present(h)
        secret = presented_key(h)
        if not secret:
            return None, unbilled(deps, info, MISSING_KEY, "missing_key")
        identity = keys.get(secret)
        if identity is MISSING:
            return self._resolve(keys, secret, h, remove, msg.end_of_stream)
        return self._identified(identity, h, remove, msg.end_of_stream)  # type: ignore[arg-type]

    async def _resolve(
        self, keys: KeyLookup, secret: str, h: dict[str, str], remove: list[str], eos: bool
    ) -> Chosen:
        try:
            identity = await keys.resolve(secret)
        except Exception:  # Redis unreachable: nobody is let through unidentified
            log.exception("key lookup failed")
            return self._refused(admission.key_store_down(self._deps))
        chosen = self._identified(identity, h, remove, eos)
        return chosen if isinstance(chosen, tuple) else await chosen

    def _identified(
        self, identity: Identity | None, h: dict[str, str], remove: list[str], eos: bool
    ) -> Chosen | Awaitable[Chosen]:
        deps, info = self._deps, self._info
        assert info is not None and deps.policy is not None
        if identity is None or identity.workspace not in deps.policy.workspaces:
            return None, unbilled(deps, info, guard.UNKNOWN_KEY, "invalid_api_key")
        self._identity = identity
        refusal = admission.paused(deps, identity)
        if refusal is not None:
            return self._refused(refusal)
        key = admission.upstream_key(deps, identity)
        if isinstance(key, Refusal):
            return self._refused(key)
        return self._route(h, remove, {"authorization": f"Bearer {key}"}, eos)

    def _route(
        self, h: dict[str, str], remove: list[str], add: dict[str, str], eos: bool
    ) -> Chosen | Awaitable[Chosen]:
        """Where the (authenticated) request goes: metered, passed through, answered, refused."""
        deps, info, identity, target = self._deps, self._info, self._identity, self._target
        assert info is not None and target is not None
        spec = target.spec
        if spec is None:  # no endpoint we know
            return self._refused(Refusal(unknown_url(target.method, target.path)))
        if target.forward_path != h.get(":path"):
            # The provider gets the canonical spelling: exactly the endpoint we metered.
            add[":path"] = target.forward_path
        if spec.metered:
            if eos:
                # Refused for want of a body only once the caller is known: the record of
                # the refusal is attributed to its key like any other.
                return self._refused(Refusal(MISSING_BODY))
            self._handler = MeteredExchange(deps, info, identity, spec)
            if not add and not remove:
                return self._handler, msgs.CONTINUE_METERED_REQUEST_HEADERS
            return self._handler, msgs.forward_request_headers(add, ["accept-encoding", *remove])
        if identity is not None:
            refusal = admission.passthrough_refusal(deps, identity, spec)
            if refusal is not None:
                return self._refused(refusal)
            if spec is MODELS:
                return answered.models(deps, info, identity, target)
        call = self._handler = PassthroughCall(deps, info, identity, target)
        if call.holds and eos:
            return self._refused(Refusal(MISSING_BODY))  # nothing to count or price
        json_body = h.get("content-type", "").startswith("application/json") and not eos
        reply = call.start(add, remove, json_body=json_body)
        if identity is None or deps.keys is None or call.holds:
            return call, reply  # a held call's reservation checks revocation itself
        return self._unless_revoked(call, identity, reply)

    async def _unless_revoked(
        self, call: PassthroughCall, identity: Identity, reply: msgs.ProcessingResponse
    ) -> Chosen:
        refusal = await admission.revocation(self._deps, identity)
        if refusal is not None:
            return self._refused(refusal)
        return call, reply

    def _refused(self, refusal: Refusal) -> Chosen:
        """Refused at the headers: recorded, in the shape of what was asked for."""
        info, target = self._info, self._target
        assert info is not None
        return answered.refused(
            self._deps,
            info,
            self._identity,
            target or Target(Kind.UNKNOWN, "", ""),
            refusal.error,
            refusal.headers,
            refusal.decision,
        )

    def failed(self) -> Chosen:
        """The headers phase raised. Whatever the request was for, it is refused (its
        credentials may not have been swapped) and recorded once, as far as it was known."""
        info, handler = self._info, self._handler
        if info is None:  # failed before the request was even read: nothing to record
            return None, msgs.immediate(500, INTERNAL_ERROR.body())
        if handler is not None and handler.books.settled:
            return handler, msgs.immediate(500, INTERNAL_ERROR.body(), {RID: info.request_id})
        return answered.failed(self._deps, info, self._identity, self._target)
