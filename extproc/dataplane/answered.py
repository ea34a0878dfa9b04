"""Requests answered here at their headers: the model list, refusals before anything was
read, a headers phase that failed.

Nothing more of such a request is expected: the handler is `DONE` from the start, so the
stream lets any later message through. A governed caller's `GET /v1/models` is answered
from the policy and recorded as the passthrough call it is (`answered`); a refusal is
recorded in its endpoint's own shape (a metered record, or a passthrough one). Refusals
before anyone is identified are not recorded at all (`request.unbilled`), and paths under
`/extproc/` are the self-service pages (`selfservice`).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane.deps import Deps
from extproc.dataplane.lifecycle import DONE, LET_THROUGH, Phase
from extproc.dataplane.request import RID, RequestInfo, refusal_reply
from extproc.dataplane.settle import Settler
from extproc.governance import guard
from extproc.governance.budget import Decision
from extproc.governance.keys import Identity
from extproc.governance.models import list_body, models_for, retrieve_body
from extproc.metering.decisions import Observed, settle
from extproc.metering.passthrough import PassthroughSeen, settle_passthrough
from extproc.wire.errors import INTERNAL_ERROR, OpenAIError
from extproc.wire.paths import Kind, Target
from extproc.wire.spec import MODELS_PATH


class Answered:
    """A request answered at its headers; `books` is None when nothing is recorded."""

    __slots__ = ("books", "state")

    def __init__(self, books: Settler | None) -> None:
        self.books = books
        self.state = DONE

    def on_request_body(self, msg: msgs.pb.HttpBody) -> msgs.ProcessingResponse:
        return msgs.CONTINUE_REQUEST_BODY

    def on_response_headers(self, msg: msgs.pb.HttpHeaders) -> msgs.ProcessingResponse:
        return msgs.CONTINUE_RESPONSE_HEADERS

    def on_response_body(self, msg: msgs.pb.HttpBody) -> msgs.ProcessingResponse:
        return msgs.CONTINUE_RESPONSE_BODY

    def on_internal_error(self, phase: Phase) -> msgs.ProcessingResponse:
        return LET_THROUGH.get(phase, msgs.CONTINUE_RESPONSE_BODY)

    def close(self, busy_ns: int) -> None:
        if self.books is not None:
            self.books.report(busy_ns)


def refused(
    deps: Deps,
    info: RequestInfo,
    identity: Identity | None,
    target: Target,
    err: OpenAIError,
    headers: Mapping[str, str] | None = None,
    decision: Decision | None = None,
) -> tuple[Answered, msgs.ProcessingResponse]:
    """Refuse at the headers, recorded in the shape of what was asked for: a passthrough
    record for a passthrough endpoint, a metered one otherwise (an unknown path included).
    `decision`: the budgets' (a key store that could not be asked), for the report."""
    spec = target.spec
    books = Settler(deps, info, identity, spec.operation if spec else "unknown")
    err = books.refused(err, None, decision)
    if spec is not None and not spec.metered:
        call = _passthrough_seen(info, target)
        call.rejected, call.status = err, err.status
        call.duration_ms = books.duration_ms
        books.settle(partial(settle_passthrough, call, deps.prices), call)
    else:
        seen = Observed(
            request_id=info.request_id,
            envoy_request_id=info.envoy_request_id,
            time_ms=info.time_ms,
            spec=spec,
            session_id=info.session_id,
            status=err.status,
            response_finished=True,
            rejected=err,
            duration_ms=books.duration_ms,
        )
        books.settle(partial(settle, seen, deps.prices, deps.count), seen)
    return Answered(books), refusal_reply(info, identity, err, headers)


def failed(
    deps: Deps, info: RequestInfo, identity: Identity | None, target: Target | None
) -> tuple[Answered, msgs.ProcessingResponse]:
    """The headers phase raised: an OpenAI-shaped 500, recorded once."""
    return refused(deps, info, identity, target or Target(Kind.UNKNOWN, "", ""), INTERNAL_ERROR)


def models(
    deps: Deps, info: RequestInfo, identity: Identity, target: Target
) -> tuple[Answered, msgs.ProcessingResponse]:
    """`GET /v1/models[/id]` for a governed caller: the models its policy lets it use, not
    the provider's list. Recorded as the free passthrough call it is, answered locally."""
    policy = deps.policy
    assert policy is not None and target.spec is not None
    allowed = models_for(policy, identity, deps.prices.families())
    if target.path == MODELS_PATH:
        status, body = 200, list_body(allowed)
    else:
        status, body = retrieve_body(allowed, target.path.rsplit("/", 1)[1])
    books = Settler(deps, info, identity, target.spec.operation)
    call = _passthrough_seen(info, target)
    call.answered_locally, call.status = True, status
    call.duration_ms = books.duration_ms
    books.settle(partial(settle_passthrough, call, deps.prices), call)
    headers = {RID: info.request_id, **guard.visibility_headers(identity, None)}
    return Answered(books), msgs.immediate(status, body, headers)


def _passthrough_seen(info: RequestInfo, target: Target) -> PassthroughSeen:
    return PassthroughSeen(
        info.request_id, info.time_ms, target, info.envoy_request_id, info.session_id
    )
