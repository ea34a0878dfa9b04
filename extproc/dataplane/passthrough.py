"""A passthrough call: an OpenAI endpoint other than the metered four, as its spec prices it.

After its headers (`opening`: caller known, key swapped, the workspace lets the group
through) the call reads only what its record needs: the status always; for a call priced
from its answer's usage, the request's model and the response body. A priced call of a
governed caller is held: its whole request body is read, counted and reserved
(`admission.hold`) like a metered request before it is let go. `metering.passthrough` turns
what was seen into the record; the `Settler` writes it once.
"""

from __future__ import annotations

import asyncio
from functools import partial

from extproc.dataplane import admission
from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane.admission import Refusal
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
from extproc.metering.decisions import PreparedRequest, parse_request, utf8_text
from extproc.metering.passthrough import PassthroughSeen, request_model, settle_passthrough
from extproc.metering.prices import usd
from extproc.v1.ledger_pb2 import UsageRecord
from extproc.wire.errors import INTERNAL_ERROR, OpenAIError
from extproc.wire.paths import Target
from extproc.wire.spec import USAGE

_STATUS = frozenset({":status"})


class PassthroughCall:
    """One passthrough call, from its headers' reply to its settlement."""

    __slots__ = (
        "_chunks",
        "_deps",
        "_info",
        "_priced",
        "books",
        "holds",
        "identity",
        "seen",
        "state",
    )

    def __init__(
        self, deps: Deps, info: RequestInfo, identity: Identity | None, target: Target
    ) -> None:
        spec = target.spec
        assert spec is not None
        self._deps = deps
        self._info = info
        self.identity = identity
        self.seen = PassthroughSeen(
            info.request_id, info.time_ms, target, info.envoy_request_id, info.session_id
        )
        self.books = Settler(deps, info, identity, spec.operation)
        self._priced = spec.pricing is USAGE
        # Held against the budget before it is forwarded: priced, and a caller to charge.
        self.holds = self._priced and identity is not None and deps.budgets is not None
        self._chunks: list[bytes] = []
        self.state = REQUEST

    def start(
        self, set_headers: dict[str, str], remove: list[str], *, json_body: bool
    ) -> msgs.ProcessingResponse:
        """The reply to the call's headers: key swapped, and only the phases its record needs.
        Uploads and downloads of any size stream through untouched otherwise."""
        read_request = self.holds or (self._priced and json_body)
        if self._priced:
            remove.append("accept-encoding")  # the answer's usage must be readable
        self.state = REQUEST if read_request else UPSTREAM
        return msgs.forward_passthrough(
            set_headers, remove, read_request=read_request, read_response=self._priced
        )

    # -- request body: only priced calls are read; held ones are counted and reserved ---

    def on_request_body(self, msg: msgs.pb.HttpBody) -> Reply:
        self._chunks.append(msg.body)
        if not msg.end_of_stream:
            return msgs.CONTINUE_REQUEST_BODY
        body = b"".join(self._chunks)
        self._chunks.clear()
        if self.holds:
            return self._hold(body)
        self.seen.request_model = request_model(body)  # its `model` names the price row
        self.state = UPSTREAM
        return msgs.CONTINUE_REQUEST_BODY

    async def _hold(self, raw: bytes) -> msgs.ProcessingResponse:
        """Count and reserve the call before it goes, with the metered path's own parser."""
        deps, seen, identity = self._deps, self.seen, self.identity
        reader = seen.target.spec.reader  # type: ignore[union-attr]
        assert reader is not None and identity is not None
        settings = deps.settings
        job = partial(
            parse_request,
            reader,
            raw,
            self._info.content_encoding,
            max_body_bytes=settings.max_body_bytes,
            count=deps.count,
        )
        try:
            if len(raw) > settings.offload_bytes:
                prepared: PreparedRequest = await asyncio.get_running_loop().run_in_executor(
                    deps.executor, job
                )
            else:
                prepared = job()
        except OpenAIError as err:
            refusal = admission.unreadable(deps, err)
            if refusal is None:
                self.state = UPSTREAM
                return msgs.CONTINUE_REQUEST_BODY
            return self._refuse(refusal)
        facts = prepared.facts
        seen.request_model = utf8_text(facts.model)
        seen.counted_input_tokens = prepared.counted_input_tokens
        held = await admission.hold(deps, identity, seen, facts)
        if isinstance(held, Refusal):
            return self._refuse(held)
        self.books.held(held.plan, held.decision)
        seen.held = True
        self.state = UPSTREAM
        return msgs.CONTINUE_REQUEST_BODY

    def _refuse(self, refusal: Refusal) -> msgs.ProcessingResponse:
        """Answer here, never forwarded; recorded (what was held, released)."""
        err = self.books.refused(refusal.error, refusal.plan, refusal.decision)
        self.seen.rejected, self.seen.status = err, err.status
        self._finish()
        return refusal_reply(self._info, self.identity, err, refusal.headers)

    # -- response -----------------------------------------------------------------------

    def on_response_headers(self, msg: msgs.pb.HttpHeaders) -> msgs.ProcessingResponse:
        seen = self.seen
        try:
            seen.status = int(msgs.header_map(msg, _STATUS).get(":status", "0"))
        except ValueError:
            seen.status = 0
        headers = {RID: seen.request_id}
        if self.identity is not None:
            headers.update(guard.visibility_headers(self.identity, self.books.decision))
        if msg.end_of_stream or not self._priced:
            # Nothing more to read: the body (a file download, say) streams straight through.
            self._finish()
        else:
            self.state = RESPONSE
        return msgs.response_headers(headers, stream=False)

    def on_response_body(self, msg: msgs.pb.HttpBody) -> msgs.ProcessingResponse:
        """Collect the buffered answer; once whole, settle and say what it cost."""
        self._chunks.append(msg.body)
        if not msg.end_of_stream:
            return msgs.CONTINUE_RESPONSE_BODY
        self.seen.response_body = b"".join(self._chunks)
        self._chunks.clear()
        record = self._finish()
        if record is None:
            return msgs.CONTINUE_RESPONSE_BODY
        return msgs.response_body_headers({"x-extproc-cost-usd": usd(record.cost_nanos)})

    # -- the end ------------------------------------------------------------------------

    def _finish(self) -> UsageRecord | None:
        self.state = DONE
        return self.books.settle(self._record, self.seen)

    def _record(self) -> UsageRecord:
        self.seen.duration_ms = self.books.duration_ms
        return settle_passthrough(self.seen, self._deps.prices)

    def on_internal_error(self, phase: Phase) -> msgs.ProcessingResponse:
        if phase is REQUEST_BODY and self.holds:  # held before forwarding: refuse
            if self.books.settled:
                return msgs.immediate(500, INTERNAL_ERROR.body(), {RID: self.seen.request_id})
            return self._refuse(Refusal(INTERNAL_ERROR))
        return LET_THROUGH.get(phase, msgs.CONTINUE_RESPONSE_BODY)

    def close(self, busy_ns: int) -> None:
        if not self.books.settled:
            self._finish()
        self.books.report(busy_ns)
