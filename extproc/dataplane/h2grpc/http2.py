"""The HTTP/2 layer of one server connection (RFC 9113), as a plain `asyncio.Protocol`.

This layer knows frames, settings, stream states and flow control; it knows nothing
about gRPC. The layer above (`rpc.GrpcConnection`) subclasses it and fills in four
hooks: a request's headers arrived (`_open_stream`), payload bytes arrived
(`_stream_data`), the peer half-closed (`_stream_remote_end`), a stream ended
(`_stream_closed`). What is written in one read or loop iteration goes out in one write.

Receive flow control is real: each stream gets `STREAM_WINDOW` bytes and the
connection `CONN_WINDOW`; credit goes back to the peer as bytes are consumed. The layer
above may *hold* bytes it cannot consume yet (its handler is busy, or its output is
blocked), and held bytes are not credited until released, so a peer that outruns its
handler stalls on the window instead of filling our memory. Send windows are the peer's
and honoured strictly: output that does not fit waits per stream for a WINDOW_UPDATE.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from struct import Struct
from typing import cast

from extproc.dataplane.h2grpc import frames as fr
from extproc.dataplane.h2grpc.hpack import Header, HeaderDecoder, HeaderListTooLarge, HpackError

log = logging.getLogger("extproc.dataplane.h2grpc")

STREAM_WINDOW = 1 << 20
CONN_WINDOW = 64 << 20
# Credit goes back once half a window is consumed: small messages never cost an update.
STREAM_REFILL = STREAM_WINDOW // 2
CONN_REFILL = CONN_WINDOW // 2
MAX_RECV_FRAME = 1 << 20
MAX_CONCURRENT_STREAMS = 100_000
# Decoded size (RFC 9113 6.5.2: names + values + 32 per field). Envoy's ext_proc client
# sends a few hundred bytes; 32 KiB leaves room for custom initial metadata.
MAX_HEADER_LIST = 32 << 10
SERVER_SETTINGS = {
    fr.SETTINGS_ENABLE_PUSH: 0,
    fr.SETTINGS_MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
    fr.SETTINGS_INITIAL_WINDOW_SIZE: STREAM_WINDOW,
    fr.SETTINGS_MAX_FRAME_SIZE: MAX_RECV_FRAME,
    fr.SETTINGS_MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
}

_unpack_header = fr.FRAME_HEADER.unpack_from
_pack_header = fr.FRAME_HEADER.pack
_unpack_setting = Struct(">HL").unpack_from
_unpack_u32 = Struct(">L").unpack_from
END_HEADERS_AND_STREAM = fr.FLAG_END_HEADERS | fr.FLAG_END_STREAM

_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":path", b":authority"))
# RFC 9113 8.2.2: connection-specific fields make a request malformed.
_CONNECTION_FIELDS = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)


class ConnectionFailure(Exception):
    """A connection error (RFC 9113 5.4.1): GOAWAY with this code, then close."""

    def __init__(self, code: fr.ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Malformed(ValueError):
    """A malformed request (RFC 9113 8.1.1): a stream error of type PROTOCOL_ERROR."""


def request_head(headers: list[Header]) -> tuple[bytes, bytes]:
    """(:method, :path) of a well-formed request header list, else `Malformed`.

    Pseudo-fields come first, each known one at most once, :method, :scheme and a
    non-empty :path present; names are lowercase; no connection-specific fields.
    """
    seen: dict[bytes, bytes] = {}
    regular = False
    for name, value in headers:
        if name[:1] == b":":
            if regular:
                raise Malformed(f"pseudo-header {name!r} after a regular field")
            if name not in _REQUEST_PSEUDO:
                raise Malformed(f"pseudo-header {name!r} not allowed in a request")
            if name in seen:
                raise Malformed(f"pseudo-header {name!r} repeated")
            seen[name] = value
            continue
        regular = True
        if name.lower() != name or not name:
            raise Malformed(f"header name {name!r} is not lowercase")
        if name in _CONNECTION_FIELDS or (name == b"te" and value != b"trailers"):
            raise Malformed(f"connection-specific header {name!r}")
    method = seen.get(b":method")
    path = seen.get(b":path")
    if method is None or path is None or b":scheme" not in seen:
        raise Malformed("request without :method, :scheme and :path")
    if not path:
        raise Malformed("empty :path")
    return method, path


def check_trailers(headers: list[Header]) -> None:
    for name, _value in headers:
        if name[:1] == b":":
            raise Malformed(f"pseudo-header {name!r} in trailers")
        if name.lower() != name:
            raise Malformed(f"header name {name!r} is not lowercase")


class H2Stream:
    """HTTP/2 state of one stream; the gRPC layer subclasses it with its own slots."""

    __slots__ = (
        "done",
        "headers_sent",
        "held",
        "out",
        "out_off",
        "recv_credit",
        "recv_window",
        "remote_closed",
        "send_window",
        "sid",
        "trailers",
    )

    def __init__(self, sid: int, send_window: int) -> None:
        self.sid = sid
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW
        self.recv_credit = 0  # consumed, not yet given back to the peer
        self.held = 0  # received, not consumed: the layer above is not ready for it
        self.remote_closed = False
        self.headers_sent = False
        self.out: deque[memoryview] = deque()  # output beyond the send window
        self.out_off = 0
        self.trailers: bytes | None = None  # sent once `out` drains
        self.done = False


class H2Connection(asyncio.Protocol):
    _transport: asyncio.Transport  # set by connection_made, before any other callback

    def __init__(
        self,
        registry: set[H2Connection],
        on_stream_closed: Callable[[], None],
        *,
        max_header_list: int = MAX_HEADER_LIST,
    ) -> None:
        self._registry = registry
        self._on_stream_closed = on_stream_closed
        self._max_header_list = max_header_list
        # Huffman can stretch a rare byte to 30 bits: the compressed block may be bigger.
        self._max_header_block = 4 * max_header_list + 4096
        self._closed = False
        self._handshake = 0  # 0: waiting for the preface, 1: for the first SETTINGS, 2: done
        self._buf = bytearray()
        self._need = 0
        self._batch: list[bytes] | None = None
        self._streams: dict[int, H2Stream] = {}
        self._blocked: dict[int, H2Stream] = {}
        self._last_sid = 0
        self._goaway_sid: int | None = None  # we said GOAWAY: no new streams
        self._peer_gone = False  # the peer said GOAWAY: close once our streams end
        self._decoder = HeaderDecoder()
        self._cont_sid = 0
        self._cont_flags = 0
        self._cont_buf = bytearray()
        self._recv_window = CONN_WINDOW
        self._recv_credit = 0
        self._send_window = fr.DEFAULT_WINDOW
        self._peer_initial_window = fr.DEFAULT_WINDOW
        self._peer_max_frame = fr.DEFAULT_MAX_FRAME

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    # -- hooks for the layer above ----------------------------------------------------

    def _open_stream(
        self, sid: int, method: bytes, path: bytes, headers: list[Header], end_stream: bool
    ) -> H2Stream | None:
        """A well-formed request arrived: return its stream, or None having answered it."""
        raise NotImplementedError

    def _refuse_stream(self, sid: int, end_stream: bool, reason: str) -> None:
        """Answer a request we will not serve (its header list is too large)."""
        self._write(fr.rst_stream(sid, fr.ErrorCode.REFUSED_STREAM))

    def _stream_data(self, st: H2Stream, data: bytes, start: int, end: int) -> None:
        """Payload bytes data[start:end] (padding removed) of an open stream."""
        raise NotImplementedError

    def _stream_remote_end(self, st: H2Stream) -> None:
        """The peer half-closed the stream (END_STREAM on DATA or trailers)."""
        raise NotImplementedError

    def _stream_closed(self, st: H2Stream, cancelled: bool) -> None:
        """The stream is gone from the connection (answered, reset or connection lost)."""

    def _ready_for_more(self, st: H2Stream) -> bool:
        """Whether bytes held for `st` may be credited now that its output drained."""
        return True

    # -- transport callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._registry.add(self)
        self._transport.write(
            fr.settings(SERVER_SETTINGS) + fr.window_update(0, CONN_WINDOW - fr.DEFAULT_WINDOW)
        )

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
        if self._batch is None:
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
        """One send() per loop iteration: replies of tasks run back to back (after Redis
        answered, say) share it. Flushed as `data_received` returns, else next iteration."""
        batch = self._batch
        if batch is not None:
            batch.append(data)
        elif not self._closed:
            self._batch = [data]
            asyncio.get_running_loop().call_soon(self._flush_batch)

    def _flush_batch(self) -> None:
        batch = self._batch
        self._batch = None
        if batch and not self._closed:
            self._transport.write(batch[0] if len(batch) == 1 else b"".join(batch))

    @staticmethod
    def _headers(sid: int, block: bytes, flags: int) -> bytes:
        n = len(block)
        return _pack_header(n >> 8, n & 0xFF, fr.HEADERS, flags, sid) + block

    def _queue(self, st: H2Stream, *parts: bytes) -> None:
        """Append DATA payload to the stream's output and send what the windows allow."""
        st.out.extend(memoryview(p) for p in parts)
        self._flush_stream(st)

    def _flush_stream(self, st: H2Stream) -> None:
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
            return
        if st.trailers is not None:
            self._send_trailers(st, st.trailers, cancelled=False)
        elif st.held and self._ready_for_more(st):
            self._release(st)

    def _flush_blocked(self) -> None:
        for st in list(self._blocked.values()):
            if self._send_window <= 0:
                return
            if not st.done:
                self._flush_stream(st)

    def _send_trailers(self, st: H2Stream, block: bytes, *, cancelled: bool) -> None:
        """End the stream with this header block; reset the peer's half if still open."""
        self._write(self._headers(st.sid, block, END_HEADERS_AND_STREAM))
        if not st.remote_closed:
            self._write(fr.rst_stream(st.sid, fr.ErrorCode.NO_ERROR))
        self._close_stream(st, cancelled)

    # -- receive credit -------------------------------------------------------------------

    def _hold(self, st: H2Stream, n: int) -> None:
        """Keep n received bytes of `st` uncredited until `_release`."""
        st.held += n
        st.recv_credit -= n
        self._recv_credit -= n

    def _release(self, st: H2Stream) -> None:
        """The layer above consumed what it held: credit it back to the peer."""
        n = st.held
        st.held = 0
        st.recv_credit += n
        self._recv_credit += n
        self._return_credit(st)

    def _return_credit(self, st: H2Stream | None) -> None:
        if st is not None and st.recv_credit >= STREAM_REFILL and not st.remote_closed:
            self._write(fr.window_update(st.sid, st.recv_credit))
            st.recv_window += st.recv_credit
            st.recv_credit = 0
        if self._recv_credit >= CONN_REFILL:
            self._write(fr.window_update(0, self._recv_credit))
            self._recv_window += self._recv_credit
            self._recv_credit = 0

    # -- stream life ----------------------------------------------------------------------

    def _reset(self, st: H2Stream, code: fr.ErrorCode) -> None:
        self._write(fr.rst_stream(st.sid, code))
        self._close_stream(st, cancelled=True)

    def _close_stream(self, st: H2Stream, cancelled: bool) -> None:
        st.done = True
        st.out.clear()
        if st.held:
            self._recv_credit += st.held  # the stream is gone; the connection gets it back
            st.held = 0
        self._streams.pop(st.sid, None)
        self._blocked.pop(st.sid, None)
        self._stream_closed(st, cancelled)
        self._on_stream_closed()
        if (self._goaway_sid is not None or self._peer_gone) and not self._streams:
            self._close_transport()

    def _close_transport(self) -> None:
        if not self._closed:
            self._flush_batch()
            self._closed = True
            self._transport.close()

    def _cancel_all(self) -> None:
        for st in list(self._streams.values()):
            self._close_stream(st, cancelled=True)

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
        self._recv_credit += length
        st = self._streams.get(sid)
        if st is None:
            if sid == 0 or sid > self._last_sid:
                raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "DATA on an idle stream")
            self._return_credit(None)
            return
        if st.remote_closed:
            self._reset(st, fr.ErrorCode.STREAM_CLOSED)
            return
        st.recv_window -= length
        if st.recv_window < 0:
            self._reset(st, fr.ErrorCode.FLOW_CONTROL_ERROR)
            return
        st.recv_credit += length
        if flags & fr.FLAG_PADDED:
            if length == 0 or data[start] >= length:
                raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "bad DATA padding")
            end -= data[start]
            start += 1
        if start < end:
            self._stream_data(st, data, start, end)
        if flags & fr.FLAG_END_STREAM and not st.done:
            st.remote_closed = True
            self._stream_remote_end(st)
        if st.recv_credit >= STREAM_REFILL or self._recv_credit >= CONN_REFILL:
            self._return_credit(None if st.done else st)

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
        if end - start > self._max_header_block:
            raise ConnectionFailure(fr.ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
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
        if len(self._cont_buf) > self._max_header_block:
            raise ConnectionFailure(fr.ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if flags & fr.FLAG_END_HEADERS:
            block = bytes(self._cont_buf)
            self._cont_sid = 0
            self._cont_buf = bytearray()
            self._on_header_block(sid, block, bool(self._cont_flags & fr.FLAG_END_STREAM))

    def _on_header_block(self, sid: int, block: bytes, end_stream: bool) -> None:
        too_large = False
        try:
            headers = self._decoder.decode(block, self._max_header_list)
        except HeaderListTooLarge:
            headers, too_large = [], True  # decoded in full: the table stays in step
        except HpackError as exc:
            raise ConnectionFailure(fr.ErrorCode.COMPRESSION_ERROR, str(exc)) from None
        st = self._streams.get(sid)
        if st is not None:
            self._on_trailers(st, headers, end_stream, too_large)
            return
        if sid <= self._last_sid:
            return  # a stream we closed already; its block only mattered to the table
        if sid % 2 == 0:
            raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "even stream id from a client")
        self._last_sid = sid
        if self._goaway_sid is not None or self._peer_gone:
            self._write(fr.rst_stream(sid, fr.ErrorCode.REFUSED_STREAM))
            return
        if len(self._streams) >= MAX_CONCURRENT_STREAMS:
            self._write(fr.rst_stream(sid, fr.ErrorCode.REFUSED_STREAM))
            return
        if too_large:
            self._refuse_stream(sid, end_stream, "request header list too large")
            return
        try:
            method, path = request_head(headers)
        except Malformed as bad:  # not `exc`: compiled code keeps one type per name
            log.warning("h2grpc: malformed request on stream %d: %s", sid, bad)
            self._write(fr.rst_stream(sid, fr.ErrorCode.PROTOCOL_ERROR))
            return
        st = self._open_stream(sid, method, path, headers, end_stream)
        if st is None:
            return
        self._streams[sid] = st
        if end_stream:
            st.remote_closed = True
            self._stream_remote_end(st)

    def _on_trailers(
        self, st: H2Stream, headers: list[Header], end_stream: bool, too_large: bool
    ) -> None:
        if not end_stream or st.remote_closed or too_large:
            self._reset(st, fr.ErrorCode.PROTOCOL_ERROR)
            return
        try:
            check_trailers(headers)
        except Malformed:
            self._reset(st, fr.ErrorCode.PROTOCOL_ERROR)
            return
        st.remote_closed = True
        self._stream_remote_end(st)

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
        """The peer opens no more streams. NO_ERROR: serve the open ones, then close;
        an error code: the peer is tearing the connection down, so cancel them now."""
        if sid:
            raise ConnectionFailure(fr.ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if end - start < 8:
            raise ConnectionFailure(fr.ErrorCode.FRAME_SIZE_ERROR, "GOAWAY length")
        code = _unpack_u32(data, start + 4)[0]
        self._peer_gone = True
        if code != fr.ErrorCode.NO_ERROR:
            log.warning(
                "h2grpc: peer sent GOAWAY code %d: %r", code, bytes(data[start + 8 : end])[:200]
            )
            for st in list(self._streams.values()):
                self._close_stream(st, cancelled=True)
        if not self._streams:
            self._close_transport()

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
            self._close_transport()

    def abort(self) -> None:
        """Cancel every remaining stream and close now (end of the shutdown grace)."""
        for st in list(self._streams.values()):
            self._write(fr.rst_stream(st.sid, fr.ErrorCode.CANCEL))
            self._close_stream(st, cancelled=True)
        self._close_transport()

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
