"""The gRPC layer of a connection: length-prefixed messages, handlers, status trailers.

Envoy keeps one h2c connection per worker thread to us and runs one stream per HTTP
request, each carrying a handful of small messages that each wait for a reply. So the
work per message must be tiny: messages are cut straight out of the bytes the transport
hands us, a synchronous reply goes out as one pre-built DATA frame in the same write as
the read that caused it, and only a reply that really waits costs an asyncio task.

Back-pressure: while a stream's handler is awaiting a reply (or its output is waiting
for the peer's window), the bytes that keep arriving are held, not credited, so the
peer stalls on its stream window instead of filling the inbox without bound.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from inspect import CORO_CREATED
from struct import Struct
from typing import Any

from extproc.dataplane.h2grpc import frames as fr
from extproc.dataplane.h2grpc.api import GrpcError, GrpcStream, Route, Status
from extproc.dataplane.h2grpc.hpack import Header
from extproc.dataplane.h2grpc.http2 import END_HEADERS_AND_STREAM, H2Connection, H2Stream
from extproc.dataplane.h2grpc.responses import (
    OK_TRAILERS,
    RESPONSE_HEADERS,
    trailers,
    trailers_only,
)

log = logging.getLogger("extproc.dataplane.h2grpc")

_pack_data_and_prefix = Struct(">HBBBLBL").pack  # DATA frame header + gRPC message prefix
_pack_prefix = Struct(">BL").pack
_unpack_u32 = Struct(">L").unpack_from


class Call(H2Stream):
    """One RPC: the HTTP/2 stream plus its handler and message state."""

    __slots__ = ("busy", "handler", "inbox", "pending", "rbuf", "task", "unary")

    def __init__(self, sid: int, handler: GrpcStream, unary: bool, send_window: int) -> None:
        super().__init__(sid, send_window)
        self.handler = handler
        self.unary = unary
        self.rbuf: bytearray | None = None  # a gRPC message split across DATA frames
        self.inbox: deque[bytes] = deque()  # messages waiting while a reply is awaited
        self.busy = False
        self.task: asyncio.Task[None] | None = None
        self.pending: Awaitable[Any] | None = None  # what `task` awaits for the handler


class GrpcConnection(H2Connection):
    def __init__(
        self,
        routes: dict[bytes, Route],
        max_message_bytes: int,
        registry: set[H2Connection],
        on_stream_closed: Callable[[], None],
    ) -> None:
        super().__init__(registry, on_stream_closed)
        self._routes = routes
        self._max_message = max_message_bytes
        self._loop = asyncio.get_running_loop()

    # -- HTTP/2 hooks ---------------------------------------------------------------------

    def _open_stream(
        self, sid: int, method: bytes, path: bytes, headers: list[Header], end_stream: bool
    ) -> Call | None:
        if method != b"POST":
            self._reject(sid, end_stream, Status.UNIMPLEMENTED, "gRPC calls are POST requests")
            return None
        route = self._routes.get(path)
        if route is None:
            self._reject(
                sid, end_stream, Status.UNIMPLEMENTED, f"unknown method {path.decode('latin-1')}"
            )
            return None
        try:
            handler = route.factory()
        except Exception:
            log.exception("h2grpc: stream factory for %r failed", path)
            self._reject(sid, end_stream, Status.INTERNAL, "internal error")
            return None
        return Call(sid, handler, route.unary, self._peer_initial_window)

    def _refuse_stream(self, sid: int, end_stream: bool, reason: str) -> None:
        self._reject(sid, end_stream, Status.RESOURCE_EXHAUSTED, reason)

    def _stream_data(self, st: H2Stream, data: bytes, start: int, end: int) -> None:
        call: Call = st  # type: ignore[assignment]  # every stream here is a Call
        if call.busy or call.out:
            self._hold(call, end - start)
        if call.rbuf is None:
            self._messages(call, data, start, end)
        else:
            call.rbuf += memoryview(data)[start:end]
            self._buffered_messages(call)

    def _stream_remote_end(self, st: H2Stream) -> None:
        call: Call = st  # type: ignore[assignment]
        if call.trailers is not None or call.done:
            return
        if call.rbuf:
            self._fail(call, Status.INTERNAL, "stream ended inside a message")
        elif call.busy:
            return
        elif call.unary:
            self._fail(call, Status.INTERNAL, "unary call without a request message")
        else:
            self._finish(call)

    def _stream_closed(self, st: H2Stream, cancelled: bool) -> None:
        call: Call = st  # type: ignore[assignment]
        call.inbox.clear()
        task = call.task
        call.task = None
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            pending = call.pending
            if inspect.iscoroutine(pending) and inspect.getcoroutinestate(pending) == CORO_CREATED:
                pending.close()  # the task never started: no "never awaited" warning
        call.pending = None
        try:
            call.handler.on_end(cancelled)
        except Exception:
            log.exception("h2grpc: on_end failed for stream %d", call.sid)

    def _ready_for_more(self, st: H2Stream) -> bool:
        return not st.busy  # type: ignore[attr-defined]

    # -- replies and endings --------------------------------------------------------------

    def _reply(self, st: Call, msg: bytes) -> None:
        size = len(msg) + 5
        if (
            not st.out
            and size <= st.send_window
            and size <= self._send_window
            and size <= self._peer_max_frame
        ):
            st.send_window -= size
            self._send_window -= size
            frame = _pack_data_and_prefix(size >> 8, size & 0xFF, fr.DATA, 0, st.sid, 0, size - 5)
            if st.headers_sent:
                self._write(frame + msg)
            else:
                st.headers_sent = True
                self._write(
                    b"".join(
                        (self._headers(st.sid, RESPONSE_HEADERS, fr.FLAG_END_HEADERS), frame, msg)
                    )
                )
            return
        if not st.headers_sent:
            st.headers_sent = True
            self._write(self._headers(st.sid, RESPONSE_HEADERS, fr.FLAG_END_HEADERS))
        self._queue(st, _pack_prefix(0, size - 5), msg)

    def _finish(self, st: Call) -> None:
        """All replies issued: end with grpc-status 0 once the queued output is out."""
        if st.done:
            return
        if not st.headers_sent:
            self._send_trailers(st, RESPONSE_HEADERS + OK_TRAILERS, cancelled=False)
        elif st.out:
            st.trailers = OK_TRAILERS
        else:
            self._send_trailers(st, OK_TRAILERS, cancelled=False)

    def _fail(self, st: Call, status: int, message: str) -> None:
        if st.done:
            return
        mid_message = st.out_off > 0 or len(st.out) % 2 == 1
        st.out.clear()
        if mid_message:
            self._reset(st, fr.ErrorCode.INTERNAL_ERROR)
        elif st.headers_sent:
            self._send_trailers(st, trailers(status, message), cancelled=True)
        else:
            self._send_trailers(st, trailers_only(status, message), cancelled=True)

    def _reject(self, sid: int, end_stream: bool, status: Status, message: str) -> None:
        self._write(self._headers(sid, trailers_only(status, message), END_HEADERS_AND_STREAM))
        if not end_stream:
            self._write(fr.rst_stream(sid, fr.ErrorCode.NO_ERROR))

    # -- messages ---------------------------------------------------------------------

    def _messages(self, st: Call, data: bytes, pos: int, end: int) -> None:
        """Deliver the complete gRPC messages in data[pos:end]; keep a partial tail."""
        while pos < end:
            if end - pos < 5:
                st.rbuf = bytearray(data[pos:end])
                return
            flag = data[pos]
            size = _unpack_u32(data, pos + 1)[0]
            if flag or size > self._max_message:
                self._refuse_message(st, flag, size)
                return
            stop = pos + 5 + size
            if stop > end:
                st.rbuf = bytearray(data[pos:end])
                return
            self._deliver(st, data[pos + 5 : stop])
            if st.done:
                return
            pos = stop

    def _buffered_messages(self, st: Call) -> None:
        rbuf = st.rbuf
        assert rbuf is not None
        while len(rbuf) >= 5:
            flag = rbuf[0]
            size = _unpack_u32(rbuf, 1)[0]
            if flag or size > self._max_message:
                self._refuse_message(st, flag, size)
                return
            stop = 5 + size
            if len(rbuf) < stop:
                return
            msg = bytes(rbuf[5:stop])
            del rbuf[:stop]
            self._deliver(st, msg)
            if st.done:
                return
        if not rbuf:
            st.rbuf = None

    def _refuse_message(self, st: Call, flag: int, size: int) -> None:
        if flag:
            self._fail(st, Status.UNIMPLEMENTED, "compressed messages are not supported")
        else:
            self._fail(
                st,
                Status.RESOURCE_EXHAUSTED,
                f"message of {size} bytes exceeds the limit of {self._max_message}",
            )

    def _deliver(self, st: Call, msg: bytes) -> None:
        if st.busy:
            st.inbox.append(msg)
            return
        if st.trailers is not None:
            return
        try:
            result = st.handler.on_message(msg)
        except GrpcError as exc:
            self._fail(st, exc.status, exc.message)
            return
        except Exception:
            log.exception("h2grpc: on_message failed on stream %d", st.sid)
            self._fail(st, Status.INTERNAL, "internal error")
            return
        if type(result) is bytes:
            self._reply(st, result)
            if st.unary:
                self._finish(st)
            return
        if result is None or isinstance(result, bytes | bytearray | memoryview):
            if result is not None:
                self._reply(st, bytes(result))
            if st.unary:
                self._finish(st)
            return
        st.busy = True
        st.pending = result
        st.task = self._loop.create_task(self._drive(st, result))

    async def _drive(self, st: Call, pending: Awaitable[Any]) -> None:
        """Await one reply, then keep serving queued messages in order until none is left."""
        try:
            while True:
                result = await pending
                if st.done:
                    return
                if result is not None:
                    self._reply(st, bytes(result))
                if st.unary:
                    self._finish(st)
                    return
                while st.inbox:
                    result = st.handler.on_message(st.inbox.popleft())
                    if result is not None and not isinstance(
                        result, bytes | bytearray | memoryview
                    ):
                        pending = st.pending = result
                        break
                    if result is not None:
                        self._reply(st, bytes(result))
                else:
                    st.busy = False
                    st.task = None
                    st.pending = None
                    if st.remote_closed:
                        self._finish(st)
                    elif st.held and not st.out:
                        self._release(st)
                    return
        except GrpcError as exc:
            self._fail(st, exc.status, exc.message)
        except Exception:
            if not st.done:
                log.exception("h2grpc: on_message failed on stream %d", st.sid)
                self._fail(st, Status.INTERNAL, "internal error")
