"""A request's lifecycle on its ext_proc stream: phases in, states, and what each state
accepts.

Envoy sends a stream's messages in order: request headers, the request body, response
headers, the response body (one buffered message for JSON, many chunks for SSE), maybe
trailers. Each request gets one handler, chosen at its request headers (`opening`), and the
handler moves through the `State`s below as it answers. `ACCEPTS` is the lifecycle as a
table: a phase arriving in a state that does not accept it (Envoy's own reply on a stream
that never had request headers, a second set of headers, a body after the answer) is let
through unchanged by `Stream`, never handed to a handler that did not expect it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from enum import StrEnum
from typing import Protocol, TypeAlias

from extproc.dataplane import envoy_msgs as msgs

log = logging.getLogger("extproc.dataplane.lifecycle")

Reply: TypeAlias = msgs.ProcessingResponse | Awaitable[msgs.ProcessingResponse]


class Phase(StrEnum):
    """One ext_proc message's kind: what Envoy is showing us of the request (str-valued:
    hashed as its name, as cheaply as a string, on every message)."""

    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    RESPONSE_HEADERS = "response_headers"
    RESPONSE_BODY = "response_body"
    REQUEST_TRAILERS = "request_trailers"
    RESPONSE_TRAILERS = "response_trailers"


REQUEST_HEADERS, REQUEST_BODY = Phase.REQUEST_HEADERS, Phase.REQUEST_BODY
RESPONSE_HEADERS, RESPONSE_BODY = Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY
PHASES = {phase.value: phase for phase in Phase}
"""By the name of the ext_proc message's `request` field."""


class State(StrEnum):
    OPEN = "open"  # no request headers yet: no handler
    REQUEST = "request"  # reading the request body; nothing forwarded yet
    UPSTREAM = "upstream"  # forwarded; the response has not begun
    RESPONSE = "response"  # reading the response body
    DONE = "done"  # answered here, or the response is whole: settled


# The hot path names states and phases through these module globals: reading a member off
# an Enum class goes through EnumType's attribute hook (~80 ns, ~9 for a global), and every
# message reads some.
OPEN, REQUEST, UPSTREAM, RESPONSE, DONE = State

ACCEPTS: dict[State, frozenset[Phase]] = {
    State.OPEN: frozenset({Phase.REQUEST_HEADERS}),
    # Envoy may answer before the request body is through (its own 413, an upstream that
    # replies early): response headers are accepted while the body is read.
    State.REQUEST: frozenset({Phase.REQUEST_BODY, Phase.RESPONSE_HEADERS}),
    State.UPSTREAM: frozenset({Phase.RESPONSE_HEADERS}),
    State.RESPONSE: frozenset({Phase.RESPONSE_BODY}),
    State.DONE: frozenset(),
}

TRAILERS = {
    Phase.REQUEST_TRAILERS: msgs.ProcessingResponse(request_trailers=msgs.pb.TrailersResponse()),
    Phase.RESPONSE_TRAILERS: msgs.ProcessingResponse(response_trailers=msgs.pb.TrailersResponse()),
}
LET_THROUGH = {
    Phase.REQUEST_HEADERS: msgs.CONTINUE_REQUEST_HEADERS,
    Phase.REQUEST_BODY: msgs.CONTINUE_REQUEST_BODY,
    Phase.RESPONSE_HEADERS: msgs.CONTINUE_RESPONSE_HEADERS,
    Phase.RESPONSE_BODY: msgs.CONTINUE_RESPONSE_BODY,
    **TRAILERS,
}
"""The reply that lets a phase's message through unchanged."""


class Handler(Protocol):
    """One kind of request's phases after its headers (metered, passthrough, answered)."""

    state: State

    def on_request_body(self, msg: msgs.pb.HttpBody) -> Reply: ...

    def on_response_headers(self, msg: msgs.pb.HttpHeaders) -> Reply: ...

    def on_response_body(self, msg: msgs.pb.HttpBody) -> Reply: ...

    def on_internal_error(self, phase: Phase) -> msgs.ProcessingResponse:
        """A phase raised: refuse in OpenAI's shape before forwarding, pass through after;
        the request still settles exactly once."""
        ...

    def close(self, busy_ns: int) -> None:
        """The stream ended: settle if nothing has yet, then report the request."""
        ...


class Opener(Protocol):
    """Chooses a request's handler from its headers (`opening.Opening`)."""

    def choose(self, msg: msgs.pb.HttpHeaders) -> Chosen | Awaitable[Chosen]: ...

    def failed(self) -> Chosen: ...


Chosen: TypeAlias = tuple[Handler | None, msgs.ProcessingResponse]
"""A request's handler and the reply to its headers (no handler: nothing to record)."""


class Stream:
    """One ext_proc stream: its request's handler, and the phases each state accepts."""

    __slots__ = ("_opener", "_state", "busy_ns", "handler")

    def __init__(self, opener: Opener) -> None:
        self._opener = opener
        self.handler: Handler | None = None
        self._state = OPEN  # without a handler: OPEN, or DONE once answered unrecorded
        self.busy_ns = 0  # CPU time spent on this request's phases (the transport adds)

    @property
    def state(self) -> State:
        handler = self.handler
        return handler.state if handler is not None else self._state

    def on(self, phase: Phase, request: msgs.ProcessingRequest) -> Reply:
        """Hand one message to the phase of the request's handler, if its state accepts it."""
        handler = self.handler
        state = handler.state if handler is not None else self._state
        if phase not in ACCEPTS[state]:
            return self._unexpected(phase, state)
        if handler is None:  # the request headers: the one moment a handler is chosen
            chosen = self._opener.choose(request.request_headers)
            if isinstance(chosen, tuple):
                return self._chosen(chosen)
            return self._later(chosen)
        if phase is RESPONSE_BODY:  # the most frequent: every chunk of a stream
            return handler.on_response_body(request.response_body)
        if phase is REQUEST_BODY:
            return handler.on_request_body(request.request_body)
        return handler.on_response_headers(request.response_headers)

    def _chosen(self, chosen: Chosen) -> msgs.ProcessingResponse:
        handler, reply = chosen
        self.handler = handler
        self._state = DONE
        return reply

    async def _later(self, pending: Awaitable[Chosen]) -> msgs.ProcessingResponse:
        return self._chosen(await pending)

    def _unexpected(self, phase: Phase, state: State) -> msgs.ProcessingResponse:
        if phase in TRAILERS:
            return TRAILERS[phase]
        if state is not OPEN:  # Envoy's own reply on a stream without a request is usual
            log.debug("%s in state %s: let through", phase.value, state.value)
        return LET_THROUGH[phase]

    def on_internal_error(self, phase: Phase) -> msgs.ProcessingResponse:
        """A phase raised (see `Handler.on_internal_error`). A request whose headers phase
        failed is refused whatever it was for: its credentials have not been swapped, so
        continuing would send the caller's key upstream."""
        handler = self.handler
        if handler is not None:
            return handler.on_internal_error(phase)
        if phase is REQUEST_HEADERS:
            return self._chosen(self._opener.failed())
        return LET_THROUGH.get(phase, msgs.CONTINUE_RESPONSE_BODY)

    def close(self) -> None:
        """The stream ended (Envoy resets each one once its request is done)."""
        if self.handler is not None:
            self.handler.close(self.busy_ns)
