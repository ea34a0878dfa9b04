"""What a request's headers said, and the refusal every handler answers in the same shape.

`RequestInfo` is made once, at the request headers, and read by whichever handler the
request gets (`opening`) and by its settlement (`settle`): the request id we give it, the
ids and trace the client sent, the task it named, whether it is Codex CLI. The refusal
helpers shape an OpenAI error for the client that will read it (`guard.for_client`) and
carry the headers every answer of ours carries.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane.deps import Deps
from extproc.governance import guard
from extproc.governance.keys import Identity
from extproc.wire.errors import OpenAIError

RID = "x-extproc-request-id"
"""Every answer carries the id of its usage record."""


class RequestInfo:
    """What the request headers said, and when they came."""

    __slots__ = (
        "codex",
        "content_encoding",
        "envoy_request_id",
        "request_id",
        "session_id",
        "start_ns",
        "started",
        "task",
        "time_ms",
        "traceparent",
        "tracestate",
    )

    def __init__(self, h: Mapping[str, str], time_ms: int) -> None:
        # 128 random bits as 32 hex digits, the shape a uuid4 hex had: the id is opaque
        # everywhere (records, headers, Redis), and this costs a third of uuid4().hex.
        self.request_id = os.urandom(16).hex()
        self.envoy_request_id = h.get("x-request-id", "")
        self.session_id = h.get("session_id") or h.get("session-id") or ""
        self.content_encoding = h.get("content-encoding", "")
        self.traceparent = h.get("traceparent")
        self.tracestate = h.get("tracestate")
        self.task = h.get("x-task")
        self.codex = guard.is_codex(h.get("originator", ""), h.get("user-agent", ""))
        self.time_ms = time_ms
        self.start_ns = time.time_ns()
        self.started = time.monotonic()


def for_client(
    deps: Deps, info: RequestInfo, identity: Identity | None, err: OpenAIError
) -> OpenAIError:
    """The refusal as this caller should read it: whom to ask, and Codex's status."""
    contact = guard.contact_of(deps.policy, identity)
    return guard.for_client(err, codex=info.codex, contact=contact)


def refusal_reply(
    info: RequestInfo,
    identity: Identity | None,
    err: OpenAIError,
    headers: Mapping[str, str] | None = None,
) -> msgs.ProcessingResponse:
    """The immediate answer of a refused request (its error already `for_client`)."""
    extra = {RID: info.request_id, **(headers or {})}
    if identity is not None:
        extra.update(guard.visibility_headers(identity, None))
    return msgs.immediate(err.status, err.body(), extra)


def unbilled(
    deps: Deps, info: RequestInfo, err: OpenAIError, reason: str
) -> msgs.ProcessingResponse:
    """Refuse before anyone is identified: a counter, not a ledger record.

    Nothing reached the provider and nobody can be billed, and a flood of bad keys must
    cost the platform one counter increment each, not a ledger write.
    """
    deps.ledger.note_refused(reason)
    return msgs.immediate(err.status, err.body(), {RID: info.request_id})
