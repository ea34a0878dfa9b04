"""One HTTP/2 connection carrying gRPC calls, server side, as a plain `asyncio.Protocol`.

Envoy keeps a single h2c connection to us and multiplexes one stream per HTTP request,
each stream carrying a handful of small messages that each wait for a reply. So the
work per message must be tiny: frames are parsed straight out of the bytes the transport
hands us (no per-frame objects), a synchronous reply is written as one pre-built DATA
frame, and everything written while handling one read goes out in a single write.

Receive windows are huge (2^31-1) and credited as frames are read: back-pressure comes
from the gRPC layer (Envoy waits for each reply; messages are capped), and one slow
stream can then never starve the others of connection window. Send windows are the
peer's and are honoured strictly: output that does not fit waits per stream until a
WINDOW_UPDATE or SETTINGS change opens the window again.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from inspect import CORO_CREATED
from struct import Struct
from typing import Any, cast

from extproc.dataplane.h2grpc import frames as fr
from extproc.dataplane.h2grpc.api import GrpcError, GrpcStream, Route, Status
from extproc.dataplane.h2grpc.hpack import HeaderDecoder, HpackError
from extproc.dataplane.h2grpc.responses import (
    OK_TRAILERS,
    RESPONSE_HEADERS,
    trailers,
    trailers_only,
)

log = logging.getLogger("extproc.dataplane.h2grpc")

RECV_WINDOW = fr.MAX_WINDOW
WINDOW_REFILL = 1 << 30
MAX_RECV_FRAME = 1 << 20
MAX_CONCURRENT_STREAMS = 100_000
MAX_HEADER_BLOCK = 1 << 20
SERVER_SETTINGS = {
    fr.SETTINGS_ENABLE_PUSH: 0,
    fr.SETTINGS_MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
    fr.SETTINGS_INITIAL_WINDOW_SIZE: RECV_WINDOW,
    fr.SETTINGS_MAX_FRAME_SIZE: MAX_RECV_FRAME,
}
_SERVER_PREFACE = fr.settings(SERVER_SETTINGS) + fr.window_update(
    0, RECV_WINDOW - fr.DEFAULT_WINDOW
)

_unpack_header = fr.FRAME_HEADER.unpack_from
_pack_header = fr.FRAME_HEADER.pack
_pack_data_and_prefix = Struct(">HBBBLBL").pack  # DATA frame header + gRPC message prefix
_pack_prefix = Struct(">BL").pack
_unpack_setting = Struct(">HL").unpack_from
_unpack_u32 = Struct(">L").unpack_from
_END_HEADERS_AND_STREAM = fr.FLAG_END_HEADERS | fr.FLAG_END_STREAM


class ConnectionFailure(Exception):
    """A connection error (RFC 9113 5.4.1): GOAWAY with this code, then close."""

    def __init__(self, code: fr.ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Stream:
    __slots__ = (
        "busy",
        "done",
        "handler",
        "headers_sent",
        "inbox",
        "out",
        "out_off",
        "pending",
        "rbuf",
        "recv_window",
        "remote_closed",
        "send_window",
        "sid",
        "task",
        "trailers",
        "unary",
    )

    def __init__(self, sid: int, handler: GrpcStream, unary: bool, send_window: int) -> None:
        self.sid = sid
        self.handler = handler
        self.unary = unary
        self.send_window = send_window
        self.recv_window = RECV_WINDOW
        self.rbuf: bytearray | None = None  # a gRPC message split across DATA frames
        self.inbox: deque[bytes] = deque()  # messages waiting while a reply is awaited
        self.busy = False
        self.task: asyncio.Task[None] | None = None
        self.pending: Awaitable[Any] | None = None  # what `task` awaits for the handler
        self.remote_closed = False
        self.headers_sent = False
        self.out: deque[memoryview] = deque()  # prefix, body, prefix, body... beyond the window
        self.out_off = 0
        self.trailers: bytes | None = None  # sent once `out` drains
        self.done = False


class H2Connection(asyncio.Protocol):
    _transport: asyncio.Transport  # set by connection_made, before any other callback

    def __init__(
        self,
        routes: dict[bytes, Route],
        max_message_bytes: int,
        registry: set[H2Connection],
        on_stream_closed: Callable[[], None],
    ) -> None:
        self._routes = routes
        self._max_message = max_message_bytes
        self._registry = registry
        self._on_stream_closed = on_stream_closed
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._handshake = 0  # 0: waiting for the preface, 1: for the first SETTINGS, 2: done
        self._buf = bytearray()
        self._need = 0
        self._batch: list[bytes] | None = None
        self._streams: dict[int, _Stream] = {}
        self._blocked: dict[int, _Stream] = {}
        self._last_sid = 0
        self._goaway_sid: int | None = None
        self._decoder = HeaderDecoder()
        self._cont_sid = 0
        self._cont_flags = 0
        self._cont_buf = bytearray()
        self._recv_window = RECV_WINDOW
        self._recv_unacked = 0
        self._send_window = fr.DEFAULT_WINDOW
        self._peer_initial_window = fr.DEFAULT_WINDOW
        self._peer_max_frame = fr.DEFAULT_MAX_FRAME

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    # -- transport callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._registry.add(self)
        self._transport.write(_SERVER_PREFACE)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._registry.discard(self)
        self._cancel_all()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            buf.clear()
        self._batch = []
        try:
            if self._handshake != 2:
                data = self._read_preface(data)
            self._read_frames(data)
        except ConnectionFailure as exc:
            self._abort(exc.code, exc.reason)
        except Exception:
            log.exception("h2grpc: internal error while reading frames")
            self._abort(fr.ErrorCode.INTERNAL_ERROR, "internal error")
        self._flush_batch()

    # -- output -------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._batch is not None:
            self._batch.append(data)
        elif not self._closed:
            self._transport.write(data)

    def _flush_batch(self) -> None:
        batch = self._batch
        self._batch = None
        if batch and not self._closed:
            self._transport.write(batch[0] if len(batch) == 1 else b"".join(batch))

    def _headers(self, sid: int, block: bytes, flags: int) -> bytes:
        n = len(block)
        return _pack_header(n >> 8, n & 0xFF, fr.HEADERS, flags, sid) + block

    def _reply(self, st: _Stream, msg: bytes) -> None:
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
        st.out.append(memoryview(_pack_prefix(0, size - 5)))
        st.out.append(memoryview(msg))
        self._flush_stream(st)

    def _flush_stream(self, st: _Stream) -> None:
        """Send as much queued output of `st` as both windows allow, then its trailers."""
        out = st.out
        parts: list[bytes | memoryview] = []
        sid = st.sid
        while out:
            size = min(st.send_window, self._send_window, self._peer_max_frame)
            if size <= 0:
                break
            pieces: list[memoryview] = []
            got = 0
            while out and got < size:
                item = out[0]
                off = st.out_off
                take = min(len(item) - off, size - got)
                pieces.append(item[off : off + take])
                got += take
                if off + take == len(item):
                    out.popleft()
                    st.out_off = 0
                else:
                    st.out_off = off + take
            st.send_window -= got
            self._send_window -= got
            parts.append(_pack_header(got >> 8, got & 0xFF, fr.DATA, 0, sid))
            parts.extend(pieces)
        if parts:
            self._write(b"".join(parts))
        self._blocked.pop(sid, None)
        if out:
            self._blocked[sid] = st
        elif st.trailers is not None:
            self._send_trailers(st, st.trailers, cancelled=False)

    def _flush_blocked(self) -> None:
        for st in list(self._blocked.values()):
            if self._send_window <= 0:
                return
            if not st.done:
                self._flush_stream(st)

    def _send_trailers(self, st: _Stream, block: bytes, *, cancelled: bool) -> None:
        self._write(self._headers(st.sid, block, _END_HEADERS_AND_STREAM))
        if not st.remote_closed:
            self._write(fr.rst_stream(st.sid, fr.ErrorCode.NO_ERROR))
        self._close_stream(st, cancelled)

    # -- stream life ----------------------------------------------------------------------

    def _finish(self, st: _Stream) -> None:
        """All replies issued: end with grpc-status 0 once the queued output is out."""
        if st.done:
            return
        if not st.headers_sent:
            self._send_trailers(st, RESPONSE_HEADERS + OK_TRAILERS, cancelled=False)
        elif st.out:
            st.trailers = OK_TRAILERS
        else:
            self._send_trailers(st, OK_TRAILERS, cancelled=False)

    def _fail(self, st: _Stream, status: int, message: str) -> None:
        if st.done:
            return
        mid_message = st.out_off > 0 or len(st.out) % 2 == 1
        st.out.clear()
        if mid_message:
            self._write(fr.rst_stream(st.sid, fr.ErrorCode.INTERNAL_ERROR))
            self._close_stream(st, cancelled=True)
        elif st.headers_sent:
            self._send_trailers(st, trailers(status, message), cancelled=True)
        else:
            self._send_trailers(st, trailers_only(status, message), cancelled=True)

    def _reset(self, st: _Stream, code: fr.ErrorCode) -> None:
        self._write(fr.rst_stream(st.sid, code))
        self._close_stream(st, cancelled=True)

    def _close_stream(self, st: _Stream, cancelled: bool) -> None:
        st.done = True
        st.out.clear()
        st.inbox.clear()
        self._streams.pop(st.sid, None)
        self._blocked.pop(st.sid, None)
        task = st.task
        st.task = None
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            pending = st.pending
            if inspect.iscoroutine(pending) and inspect.getcoroutinestate(pending) == CORO_CREATED:
                pending.close()  # the task never started: no "never awaited" warning
        st.pending = None
        try:
            st.handler.on_end(cancelled)
        except Exception:
            log.exception("h2grpc: on_end failed for stream %d", st.sid)
        self._on_stream_closed()
        if self._goaway_sid is not None and not self._streams and not self._closed:
            self._flush_batch()
            self._closed = True
            self._transport.close()

    def _cancel_all(self) -> None:
        for st in list(self._streams.values()):
            self._close_stream(st, cancelled=True)

    def _remote_end(self, st: _Stream) -> None:
        st.remote_closed = True
        if st.trailers is not None:
            return
        if st.rbuf:
            self._fail(st, Status.INTERNAL, "stream ended inside a message")
        elif st.busy:
            return
        elif st.unary:
            self._fail(st, Status.INTERNAL, "unary call without a request message")
        else:
            self._finish(st)

    # -- messages ---------------------------------------------------------------------

    def _messages(self, st: _Stream, data: bytes, pos: int, end: int) -> None:
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

    def _buffered_messages(self, st: _Stream) -> None:
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

    def _refuse_message(self, st: _Stream, flag: int, size: int) -> None:
        if flag:
            self._fail(st, Status.UNIMPLEMENTED, "compressed messages are not supported")
        else:
            self._fail(
                st,
                Status.RESOURCE_EXHAUSTED,
                f"message of {size} bytes exceeds the limit of {self._max_message}",
            )

    def _deliver(self, st: _Stream, msg: bytes) -> None:
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

    async def _drive(self, st: _Stream, pending: Awaitable[Any]) -> None:
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
                    return
        except GrpcError as exc:
            self._fail(st, exc.status, exc.message)
        except Exception:
            if not st.done:
                log.exception("h2grpc: on_message failed on stream %d", st.sid)
                self._fail(st, Status.INTERNAL, "internal error")

    # -- frames -------------------------------------------------------------------------

    def _read_preface(self, data: bytes) -> bytes:
        if self._handshake == 0:
            n = min(len(data), len(fr.PREFACE))
            if data[:n] != fr.PREFACE[:n]:
                raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "bad connection preface")
            if n < len(fr.PREFACE):
                self._keep(data, 0, len(fr.PREFACE))
                return b""
            data = data[n:]
            self._handshake = 1
        if len(data) < 4:
            self._keep(data, 0, 4)
            return b""
        if data[3] != fr.SETTINGS:
            raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "first frame is not SETTINGS")
        self._handshake = 2
        return data

    def _keep(self, data: bytes, pos: int, need: int) -> None:
        self._buf += memoryview(data)[pos:]
        self._need = need

    def _read_frames(self, data: bytes) -> None:
        pos = 0
        n = len(data)
        while n - pos >= 9:
            hi, lo, ftype, flags, sid = _unpack_header(data, pos)
            length = hi << 8 | lo
            if length > MAX_RECV_FRAME:
                raise ConnectionFailure(fr.ErrorCode.FRAME_SIZE_ERROR, "frame too large")
            start = pos + 9
            end = start + length
            if end > n:
                self._keep(data, pos, end - pos)
                return
            sid &= 0x7FFFFFFF
            if self._cont_sid and ftype != fr.CONTINUATION:
                raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "expected CONTINUATION")
            if ftype == fr.DATA:
                self._on_data(flags, sid, data, start, end)
            elif ftype == fr.HEADERS:
                self._on_headers(flags, sid, data, start, end)
            elif ftype == fr.WINDOW_UPDATE:
                self._on_window_update(sid, data, start, end)
            elif ftype == fr.PING:
                self._on_ping(flags, sid, data, start, end)
            elif ftype == fr.SETTINGS:
                self._on_settings(flags, sid, data, start, end)
            elif ftype == fr.RST_STREAM:
                self._on_rst_stream(sid, data, start, end)
            elif ftype == fr.CONTINUATION:
                self._on_continuation(flags, sid, data, start, end)
            elif ftype == fr.GOAWAY:
                self._on_goaway(sid, data, start, end)
            elif ftype == fr.PRIORITY:
                self._on_priority(sid, start, end)
            elif ftype == fr.PUSH_PROMISE:
                raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            if self._closed:
                return
            pos = end
        if pos < n:
            self._keep(data, pos, 9)

    def _on_data(self, flags: int, sid: int, data: bytes, start: int, end: int) -> None:
        length = end - start
        self._recv_window -= length
        if self._recv_window < 0:
            raise ConnectionFailure(fr.ErrorCode.FLOW_CONTROL_ERROR, "connection window exceeded")
        self._recv_unacked += length
        if self._recv_unacked >= WINDOW_REFILL:
            self._write(fr.window_update(0, self._recv_unacked))
            self._recv_window += self._recv_unacked
            self._recv_unacked = 0
        st = self._streams.get(sid)
        if st is None:
            if sid == 0 or sid > self._last_sid:
                raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "DATA on an idle stream")
            return
        if st.remote_closed:
            self._reset(st, fr.ErrorCode.STREAM_CLOSED)
            return
        st.recv_window -= length
        if st.recv_window < RECV_WINDOW - WINDOW_REFILL:
            if st.recv_window < 0:
                self._reset(st, fr.ErrorCode.FLOW_CONTROL_ERROR)
                return
            self._write(fr.window_update(sid, RECV_WINDOW - st.recv_window))
            st.recv_window = RECV_WINDOW
        if flags & fr.FLAG_PADDED:
            if length == 0 or data[start] >= length:
                raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "bad DATA padding")
            end -= data[start]
            start += 1
        if start < end:
            if st.rbuf is None:
                self._messages(st, data, start, end)
            else:
                st.rbuf += memoryview(data)[start:end]
                self._buffered_messages(st)
        if flags & fr.FLAG_END_STREAM and not st.done:
            self._remote_end(st)

    def _on_headers(self, flags: int, sid: int, data: bytes, start: int, end: int) -> None:
        if sid == 0:
            raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & fr.FLAG_PADDED:
            if start == end or data[start] >= end - start:
                raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "bad HEADERS padding")
            end -= data[start]
            start += 1
        if flags & fr.FLAG_PRIORITY:
            if end - start < 5:
                raise ConnectionFailure(fr.ErrorCode.FRAME_SIZE_ERROR, "short HEADERS priority")
            start += 5
        if flags & fr.FLAG_END_HEADERS:
            self._on_header_block(sid, data[start:end], bool(flags & fr.FLAG_END_STREAM))
        else:
            self._cont_sid = sid
            self._cont_flags = flags
            self._cont_buf = bytearray(data[start:end])

    def _on_continuation(self, flags: int, sid: int, data: bytes, start: int, end: int) -> None:
        if not self._cont_sid or sid != self._cont_sid:
            raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "unexpected CONTINUATION")
        self._cont_buf += memoryview(data)[start:end]
        if len(self._cont_buf) > MAX_HEADER_BLOCK:
            raise ConnectionFailure(fr.ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if flags & fr.FLAG_END_HEADERS:
            block = bytes(self._cont_buf)
            self._cont_sid = 0
            self._cont_buf = bytearray()
            self._on_header_block(sid, block, bool(self._cont_flags & fr.FLAG_END_STREAM))

    def _on_header_block(self, sid: int, block: bytes, end_stream: bool) -> None:
        try:
            headers = self._decoder.decode(block)
        except HpackError as exc:
            raise ConnectionFailure(fr.ErrorCode.COMPRESSION_ERROR, str(exc)) from None
        st = self._streams.get(sid)
        if st is not None:
            if not end_stream or st.remote_closed:
                self._reset(st, fr.ErrorCode.PROTOCOL_ERROR)
            else:
                self._remote_end(st)
            return
        if sid <= self._last_sid:
            return
        if sid % 2 == 0:
            raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "even stream id from a client")
        self._last_sid = sid
        if self._goaway_sid is not None or len(self._streams) >= MAX_CONCURRENT_STREAMS:
            self._write(fr.rst_stream(sid, fr.ErrorCode.REFUSED_STREAM))
            return
        path = b""
        for name, value in headers:
            if name == b":path":
                path = value
                break
        route = self._routes.get(path)
        if route is None:
            self._reject(
                sid, end_stream, Status.UNIMPLEMENTED, f"unknown method {path.decode('latin-1')}"
            )
            return
        try:
            handler = route.factory()
        except Exception:
            log.exception("h2grpc: stream factory for %r failed", path)
            self._reject(sid, end_stream, Status.INTERNAL, "internal error")
            return
        st = _Stream(sid, handler, route.unary, self._peer_initial_window)
        self._streams[sid] = st
        if end_stream:
            self._remote_end(st)

    def _reject(self, sid: int, end_stream: bool, status: Status, message: str) -> None:
        self._write(self._headers(sid, trailers_only(status, message), _END_HEADERS_AND_STREAM))
        if not end_stream:
            self._write(fr.rst_stream(sid, fr.ErrorCode.NO_ERROR))

    def _on_window_update(self, sid: int, data: bytes, start: int, end: int) -> None:
        if end - start != 4:
            raise ConnectionFailure(fr.ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        increment = _unpack_u32(data, start)[0] & 0x7FFFFFFF
        if sid == 0:
            if increment == 0:
                raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "zero window increment")
            self._send_window += increment
            if self._send_window > fr.MAX_WINDOW:
                raise ConnectionFailure(fr.ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
            if self._blocked:
                self._flush_blocked()
            return
        st = self._streams.get(sid)
        if st is None:
            if sid > self._last_sid:
                raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE on idle stream")
            return
        if increment == 0:
            self._reset(st, fr.ErrorCode.PROTOCOL_ERROR)
            return
        st.send_window += increment
        if st.send_window > fr.MAX_WINDOW:
            self._reset(st, fr.ErrorCode.FLOW_CONTROL_ERROR)
        elif st.out:
            self._flush_stream(st)

    def _on_settings(self, flags: int, sid: int, data: bytes, start: int, end: int) -> None:
        if sid:
            raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & fr.FLAG_ACK:
            if end != start:
                raise ConnectionFailure(fr.ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with payload")
            return
        if (end - start) % 6:
            raise ConnectionFailure(fr.ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length")
        opened = False
        for pos in range(start, end, 6):
            key, value = _unpack_setting(data, pos)
            if key == fr.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > fr.MAX_WINDOW:
                    raise ConnectionFailure(fr.ErrorCode.FLOW_CONTROL_ERROR, "initial window")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for st in self._streams.values():
                    st.send_window += delta
                    if st.send_window > fr.MAX_WINDOW:
                        raise ConnectionFailure(fr.ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
                opened = opened or delta > 0
            elif key == fr.SETTINGS_MAX_FRAME_SIZE:
                if not fr.DEFAULT_MAX_FRAME <= value <= fr.MAX_FRAME_LIMIT:
                    raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE")
                self._peer_max_frame = value
                opened = True
            elif key == fr.SETTINGS_ENABLE_PUSH and value > 1:
                raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH")
        self._write(fr.SETTINGS_ACK)
        if opened and self._blocked:
            self._flush_blocked()

    def _on_ping(self, flags: int, sid: int, data: bytes, start: int, end: int) -> None:
        if sid:
            raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if end - start != 8:
            raise ConnectionFailure(fr.ErrorCode.FRAME_SIZE_ERROR, "PING length")
        if not flags & fr.FLAG_ACK:
            self._write(fr.ping_ack(data[start:end]))

    def _on_rst_stream(self, sid: int, data: bytes, start: int, end: int) -> None:
        if end - start != 4:
            raise ConnectionFailure(fr.ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM length")
        if sid == 0 or sid > self._last_sid:
            raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
        st = self._streams.get(sid)
        if st is not None:
            self._close_stream(st, cancelled=True)

    def _on_goaway(self, sid: int, data: bytes, start: int, end: int) -> None:
        if sid:
            raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if end - start < 8:
            raise ConnectionFailure(fr.ErrorCode.FRAME_SIZE_ERROR, "GOAWAY length")
        code = _unpack_u32(data, start + 4)[0]
        if code != fr.ErrorCode.NO_ERROR:
            log.warning(
                "h2grpc: peer sent GOAWAY code %d: %r", code, bytes(data[start + 8 : end])[:200]
            )
        if not self._streams:
            self._flush_batch()
            self._closed = True
            self._transport.close()

    def _on_priority(self, sid: int, start: int, end: int) -> None:
        if sid == 0:
            raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if end - start != 5:
            st = self._streams.get(sid)
            self._write(fr.rst_stream(sid, fr.ErrorCode.FRAME_SIZE_ERROR))
            if st is not None:
                self._close_stream(st, cancelled=True)

    # -- shutdown -------------------------------------------------------------------------

    def goaway(self) -> None:
        """Refuse new streams; close once the streams already open have finished."""
        if self._closed or self._goaway_sid is not None:
            return
        self._goaway_sid = self._last_sid
        self._write(fr.goaway(self._last_sid, fr.ErrorCode.NO_ERROR))
        if not self._streams:
            self._closed = True
            self._transport.close()

    def abort(self) -> None:
        """Cancel every remaining stream and close now (end of the shutdown grace)."""
        for st in list(self._streams.values()):
            self._write(fr.rst_stream(st.sid, fr.ErrorCode.CANCEL))
            self._close_stream(st, cancelled=True)
        if not self._closed:
            self._closed = True
            self._transport.close()

    def _abort(self, code: fr.ErrorCode, reason: str) -> None:
        if self._closed:
            return
        if code != fr.ErrorCode.NO_ERROR:
            log.warning("h2grpc: closing connection: %s (%s)", reason, code.name)
        self._write(fr.goaway(self._last_sid, code, reason.encode()[:200]))
        self._flush_batch()
        self._closed = True
        self._cancel_all()
        self._transport.close()
