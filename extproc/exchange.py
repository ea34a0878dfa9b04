"""One HTTP request's life in the sidecar, phase by phase.

Envoy holds one ext_proc stream per HTTP request and sends us, in order, request headers,
the buffered request body, response headers and the response body (one buffered message
for JSON, many chunks for SSE). `Exchange` keeps the state between those messages and
answers each one; the decisions themselves live in `metering`, the wire formats in `wire`.
Whatever way the stream ends (normal end, rejection, client gone, upstream cut), `close`
guarantees the exchange yields exactly one usage record.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial

from extproc import envoy_msgs as msgs
from extproc.ledger import Ledger
from extproc.metering import Observed, PreparedRequest, prepare_request, settle
from extproc.prices import PriceTable
from extproc.settings import Settings
from extproc.wire.endpoints import Endpoint, StreamMeter, endpoint_for
from extproc.wire.errors import OpenAIError

log = logging.getLogger("extproc.exchange")

_REQUEST_HEADERS = frozenset(
    {":method", ":path", "content-encoding", "x-request-id", "session_id", "session-id"}
)
_RESPONSE_HEADERS = frozenset({":status", "content-type"})


@dataclass(slots=True)
class Deps:
    """What every exchange shares: configuration, prices, the tokenizer and the ledger."""

    settings: Settings
    prices: PriceTable
    count: Callable[[str, str], int]
    ledger: Ledger
    executor: Executor


def unmetered_key(method: str, path: str) -> str:
    """Group unmetered traffic by resource, not by id: `GET /v1/responses/*`."""
    parts = path.split("?", 1)[0].split("/")
    if len(parts) > 3:
        parts = [*parts[:3], "*"]
    return f"{method} {'/'.join(parts)[:128]}"


class Exchange:
    __slots__ = (
        "_closed",
        "_content_encoding",
        "_deps",
        "_endpoint",
        "_meter",
        "_prepared",
        "_request_chunks",
        "_started",
        "seen",
    )

    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        self._started = time.monotonic()
        self.seen = Observed(time_ms=int(time.time() * 1000))
        self._endpoint: Endpoint | None = None
        self._prepared: PreparedRequest | None = None
        self._meter: StreamMeter | None = None
        self._content_encoding = ""
        self._request_chunks: list[bytes] = []
        self._closed = False

    # -- request -------------------------------------------------------------------------

    def on_request_headers(self, msg: msgs.pb.HttpHeaders) -> msgs.ProcessingResponse:
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
        return msgs.CONTINUE_METERED_REQUEST_HEADERS

    async def on_request_body(self, msg: msgs.pb.HttpBody) -> msgs.ProcessingResponse:
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
        try:
            if len(raw) > settings.offload_bytes:
                loop = asyncio.get_running_loop()
                prepared = await loop.run_in_executor(self._deps.executor, job)
            else:
                prepared = job()
        except OpenAIError as err:
            if settings.bad_request == "pass":
                log.info("passing through unparseable %s request: %s", self.seen.endpoint, err)
                return msgs.CONTINUE_REQUEST_BODY
            return self._reject(err)
        self._prepared = prepared
        self.seen.facts = prepared.facts
        self.seen.counted_input_tokens = prepared.counted_input_tokens
        if prepared.body is None:
            return msgs.CONTINUE_REQUEST_BODY
        return msgs.replace_request_body(
            prepared.body, prepared.set_headers, prepared.remove_headers
        )

    def _reject(self, err: OpenAIError) -> msgs.ProcessingResponse:
        self.seen.rejected = err
        self.seen.status = err.status
        self.seen.response_finished = True
        self._finish()
        return msgs.immediate(
            err.status, err.body(), {"x-extproc-request-id": self.seen.request_id}
        )

    # -- response ------------------------------------------------------------------------

    def on_response_headers(self, msg: msgs.pb.HttpHeaders) -> msgs.ProcessingResponse:
        if self._endpoint is None:
            return msgs.CONTINUE_RESPONSE_HEADERS
        h = msgs.header_map(msg, _RESPONSE_HEADERS)
        try:
            self.seen.status = int(h.get(":status", "0"))
        except ValueError:
            self.seen.status = 0
        ids = {"x-extproc-request-id": self.seen.request_id}
        if msg.end_of_stream:
            self.seen.response_finished = True
            self._finish()
            return msgs.response_headers(ids, stream=False)
        sse = h.get("content-type", "").startswith("text/event-stream")
        if sse:
            strip = self._prepared is not None and self._prepared.injected_usage
            self._meter = self._endpoint.stream_meter(strip_usage_chunk=strip)
        return msgs.response_headers(ids, stream=sse)

    def on_response_body(self, msg: msgs.pb.HttpBody) -> msgs.ProcessingResponse:
        if self._endpoint is None:
            return msgs.CONTINUE_RESPONSE_BODY
        meter = self._meter
        if meter is None:
            # Buffered JSON: Envoy sends the whole body once, with end_of_stream.
            if self.seen.status < 300:
                self.seen.usage, self.seen.served_model = self._endpoint.usage_from_json(msg.body)
            if msg.end_of_stream:
                self.seen.response_finished = True
                self._finish()
            return msgs.CONTINUE_RESPONSE_BODY
        out = meter.feed(msg.body, last=msg.end_of_stream)
        if msg.end_of_stream:
            self.seen.response_finished = True
            self._finish()
        if out is msg.body:
            return msgs.CONTINUE_RESPONSE_BODY
        return msgs.replace_response_chunk(out)

    # -- end -----------------------------------------------------------------------------

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        seen = self.seen
        if self._meter is not None and seen.stream is None:
            seen.stream = self._meter.finish()
            seen.usage = seen.usage or seen.stream.usage
            seen.served_model = seen.served_model or seen.stream.served_model
        seen.duration_ms = int((time.monotonic() - self._started) * 1000)
        record = settle(seen, self._deps.prices, self._deps.count)
        self._deps.ledger.submit(record)
        if record.estimated or record.price_fallback:
            log.warning(
                "request %s billed %s: outcome=%s estimated=%s fallback_price=%s",
                record.request_id,
                record.cost_nanos,
                record.outcome,
                record.estimated,
                record.price_fallback,
            )

    def close(self) -> None:
        """The ext_proc stream ended: record the exchange if nothing has yet."""
        self._finish()
