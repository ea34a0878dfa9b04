"""One passthrough call's phases: an OpenAI endpoint other than the metered four.

The `Exchange` authenticates the caller and classifies the path; for a passthrough call it
hands each later ext_proc message here. This side only collects what the record needs (the
status, and for calls priced from their answer the request's model and the response body);
`extproc.metering.passthrough` turns that into the record.
"""

from __future__ import annotations

from extproc.dataplane import envoy_msgs as msgs
from extproc.metering.passthrough import PassthroughSeen, request_model
from extproc.wire.paths import Pricing

_STATUS = frozenset({":status"})


class PassthroughCall:
    __slots__ = ("_chunks", "seen")

    def __init__(self, seen: PassthroughSeen) -> None:
        self.seen = seen
        self._chunks: list[bytes] = []

    @property
    def priced(self) -> bool:
        api = self.seen.target.api
        return api is not None and api.pricing is Pricing.USAGE

    def forward(
        self, add: dict[str, str], remove: list[str], *, json_body: bool
    ) -> msgs.ProcessingResponse:
        if self.priced:
            remove.append("accept-encoding")  # the answer's usage must be readable
        return msgs.forward_passthrough(
            add, remove, read_request=self.priced and json_body, read_response=self.priced
        )

    def on_request_body(self, msg: msgs.pb.HttpBody) -> msgs.ProcessingResponse:
        """Only priced JSON requests are read: their `model` names the price row."""
        self._chunks.append(msg.body)
        if msg.end_of_stream:
            self.seen.request_model = request_model(b"".join(self._chunks))
            self._chunks.clear()
        return msgs.CONTINUE_REQUEST_BODY

    def on_response_headers(self, msg: msgs.pb.HttpHeaders) -> bool:
        """Note the status; True when the call is complete (nothing more will be read)."""
        try:
            self.seen.status = int(msgs.header_map(msg, _STATUS).get(":status", "0"))
        except ValueError:
            self.seen.status = 0
        return msg.end_of_stream or not self.priced

    def on_response_body(self, msg: msgs.pb.HttpBody) -> bool:
        """Collect the buffered answer; True once it is whole."""
        self._chunks.append(msg.body)
        if not msg.end_of_stream:
            return False
        self.seen.response_body = b"".join(self._chunks)
        self._chunks.clear()
        return True
