"""h2grpc against hand-built HTTP/2 frames: flow control, padding, CONTINUATION, protocol errors."""

from __future__ import annotations

import asyncio
import gc
import os
import warnings

import pytest
from h2grpc_support import (
    ECHO,
    RawClient,
    Streams,
    async_test,
    grpc_message,
    request_block,
    serving,
)

from extproc.dataplane.h2grpc import Status
from extproc.dataplane.h2grpc import frames as fr
from extproc.dataplane.h2grpc.hpack import encode_int, encode_literal
from extproc.dataplane.h2grpc.http2 import CONN_WINDOW, MAX_HEADER_LIST, STREAM_WINDOW


@async_test
async def test_raw_handshake_settings_window_and_ping() -> None:
    async with serving({}) as server:
        client = await RawClient.connect(server.port)
        ftype, flags, sid, payload = await client.frame()
        assert (ftype, flags, sid) == (fr.SETTINGS, 0, 0)
        settings = {
            int.from_bytes(payload[i : i + 2], "big"): int.from_bytes(payload[i + 2 : i + 6], "big")
            for i in range(0, len(payload), 6)
        }
        assert settings[fr.SETTINGS_INITIAL_WINDOW_SIZE] == STREAM_WINDOW
        assert settings[fr.SETTINGS_MAX_CONCURRENT_STREAMS] == 100_000
        assert settings[fr.SETTINGS_MAX_FRAME_SIZE] >= 16_384
        assert settings[fr.SETTINGS_MAX_HEADER_LIST_SIZE] == MAX_HEADER_LIST
        ftype, _flags, sid, payload = await client.frame()
        assert (ftype, sid) == (fr.WINDOW_UPDATE, 0)
        assert int.from_bytes(payload, "big") == CONN_WINDOW - 65_535
        assert await client.frame() == (fr.SETTINGS, fr.FLAG_ACK, 0, b"")
        client.send(0xFA, 0xFF, 0, b"unknown frame types are ignored")
        assert await client.barrier() == []
        client.send(fr.GOAWAY, 0, 0, bytes(8))
        assert await client.reader.read() == b""  # peer said goodbye, nothing open: closed


@async_test
async def test_raw_padding_priority_continuation_and_split_messages() -> None:
    streams = Streams()
    async with serving({ECHO: streams.route()}) as server:
        client = await RawClient.connect(server.port)
        block = request_block(ECHO.encode(), huffman=True)
        pad = 7
        first = bytes([pad]) + bytes(5) + block[:5] + bytes(pad)  # PADDED + PRIORITY fields
        client.send(fr.HEADERS, fr.FLAG_PADDED | fr.FLAG_PRIORITY, 1, first)
        client.send(fr.CONTINUATION, 0, 1, block[5:9])
        client.send(fr.CONTINUATION, fr.FLAG_END_HEADERS, 1, block[9:])
        two = grpc_message(b"first") + grpc_message(b"")
        client.send(fr.DATA, fr.FLAG_PADDED, 1, bytes([3]) + two + bytes(3))
        third = grpc_message(b"x" * 40_000)
        client.data(1, third[:3])
        client.send(0xFA, 0, 1, b"ignored between DATA frames")
        client.data(1, third[3:20_000])
        client.data(1, third[20_000:] + grpc_message(b"last"))
        client.data(1, b"", end_stream=True)
        response = await client.response(1)
        client.close()
    assert dict(response.headers) == {b":status": b"200", b"content-type": b"application/grpc"}
    assert response.messages == [b"first", b"", b"x" * 40_000, b"last"]
    assert dict(response.trailers) == {b"grpc-status": b"0"}
    assert all(len(frame) <= 16_384 for frame in response.data_frames)
    assert streams.all[0].ends == [False]


@async_test
async def test_raw_dynamic_table_is_shared_across_streams() -> None:
    streams = Streams()
    async with serving({ECHO: streams.route()}) as server:
        client = await RawClient.connect(server.port)
        client.headers(1, request_block(ECHO.encode(), index_path=True, huffman=True))
        client.data(1, grpc_message(b"one"), end_stream=True)
        assert (await client.response(1)).messages == [b"one"]
        # :path is now entry 62 (content-type and te were not indexed)
        client.headers(3, b"\x83\x86\xbe")
        client.data(3, grpc_message(b"two"), end_stream=True)
        assert (await client.response(3)).messages == [b"two"]
        # A table size update to 0 empties the table: entry 62 must then be gone.
        client.headers(5, b"\x20" + request_block(ECHO.encode()), end_stream=True)
        assert (await client.response(5)).status == 0
        client.headers(7, b"\x83\x86\xbe", end_stream=True)
        _last, code = await client.goaway()
        client.close()
    assert code == fr.ErrorCode.COMPRESSION_ERROR
    assert [seen.messages for seen in streams.all] == [[b"one"], [b"two"], []]


@async_test
async def test_raw_send_flow_control_stream_and_connection() -> None:
    streams = Streams()
    async with serving({ECHO: streams.route()}) as server:
        client = await RawClient.connect(server.port, {fr.SETTINGS_INITIAL_WINDOW_SIZE: 10})
        client.headers(1, request_block(ECHO.encode()))
        client.data(1, grpc_message(bytes(range(100))), end_stream=True)
        sent = await client.barrier()
        data = [p for t, _f, s, p in sent if t == fr.DATA and s == 1]
        assert sum(map(len, data)) == 10
        client.send(fr.WINDOW_UPDATE, 0, 1, (50).to_bytes(4, "big"))
        data += [p for t, _f, s, p in await client.barrier() if t == fr.DATA]
        assert sum(map(len, data)) == 60
        client.send(fr.SETTINGS, 0, 0, (4).to_bytes(2, "big") + (1000).to_bytes(4, "big"))
        rest = await client.response(1)
        assert grpc_message(bytes(range(100))) == b"".join(data) + rest.body
        assert rest.status == 0

        # The connection window (65,535 until the peer raises it) is shared by all streams.
        client2 = await RawClient.connect(server.port, {fr.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20})
        big = os.urandom(100_000)
        client2.headers(1, request_block(ECHO.encode()))
        client2.data(1, grpc_message(big), end_stream=True)
        data = [p for t, _f, s, p in await client2.barrier() if t == fr.DATA]
        assert sum(map(len, data)) == 65_535
        assert max(map(len, data)) == 16_384
        client2.send(fr.WINDOW_UPDATE, 0, 0, (1 << 20).to_bytes(4, "big"))
        rest = await client2.response(1)
        assert b"".join(data) + rest.body == grpc_message(big)
        client.close()
        client2.close()


@async_test
async def test_raw_stream_errors_and_limits() -> None:
    streams = Streams()
    async with serving({ECHO: streams.route()}, max_message_bytes=1000) as server:
        client = await RawClient.connect(server.port)
        client.headers(1, request_block(ECHO.encode()))
        client.data(1, grpc_message(b"zipped", flag=1))
        compressed = await client.response(1)
        client.headers(3, request_block(ECHO.encode()))
        client.data(3, grpc_message(b"ok") + grpc_message(b"x" * 1001)[:100])
        too_big = await client.response(3)
        client.headers(5, request_block(ECHO.encode()))
        client.data(5, grpc_message(b"fine"))
        client.send(fr.RST_STREAM, 0, 5, fr.ErrorCode.CANCEL.to_bytes(4, "big"))
        client.headers(7, request_block(ECHO.encode()))
        client.data(7, grpc_message(b"cut")[:6], end_stream=True)
        truncated = await client.response(7)
        client.headers(9, request_block(b"/not/routed"), end_stream=True)
        unrouted = await client.response(9)
        client.close()
    assert compressed.headers and compressed.status == Status.UNIMPLEMENTED
    assert compressed.data_frames == []
    assert too_big.messages == [b"ok"] and too_big.status == Status.RESOURCE_EXHAUSTED
    assert b"1001" in dict(too_big.trailers)[b"grpc-message"]
    assert truncated.status == Status.INTERNAL
    assert unrouted.status == Status.UNIMPLEMENTED
    assert [seen.ends for seen in streams.all] == [[True], [True], [True], [True]]
    assert streams.all[2].messages == [b"fine"]


PROTOCOL_ERRORS = {
    "data-on-stream-0": (fr.frame(fr.DATA, 0, 0, b"x"), fr.ErrorCode.PROTOCOL_ERROR),
    "data-on-idle-stream": (fr.frame(fr.DATA, 0, 7, b"x"), fr.ErrorCode.PROTOCOL_ERROR),
    "even-stream-id": (
        fr.frame(fr.HEADERS, fr.FLAG_END_HEADERS, 2, request_block(b"/x")),
        fr.ErrorCode.PROTOCOL_ERROR,
    ),
    "frame-too-large": (
        fr.FRAME_HEADER.pack(0x1001, 0, fr.DATA, 0, 1),  # 1 MiB + 256 bytes
        fr.ErrorCode.FRAME_SIZE_ERROR,
    ),
    "ping-length": (fr.frame(fr.PING, 0, 0, bytes(7)), fr.ErrorCode.FRAME_SIZE_ERROR),
    "bad-hpack-index": (
        fr.frame(fr.HEADERS, fr.FLAG_END_HEADERS, 1, b"\xff\x49"),
        fr.ErrorCode.COMPRESSION_ERROR,
    ),
    "interrupted-continuation": (
        fr.frame(fr.HEADERS, 0, 1, b"\x83") + fr.frame(fr.PING, 0, 0, bytes(8)),
        fr.ErrorCode.PROTOCOL_ERROR,
    ),
    "orphan-continuation": (
        fr.frame(fr.CONTINUATION, fr.FLAG_END_HEADERS, 1, b"\x83"),
        fr.ErrorCode.PROTOCOL_ERROR,
    ),
    "window-overflow": (fr.window_update(0, 2**31 - 1), fr.ErrorCode.FLOW_CONTROL_ERROR),
    "initial-window-too-big": (
        fr.settings({fr.SETTINGS_INITIAL_WINDOW_SIZE: 2**31}),
        fr.ErrorCode.FLOW_CONTROL_ERROR,
    ),
    "max-frame-too-small": (
        fr.settings({fr.SETTINGS_MAX_FRAME_SIZE: 100}),
        fr.ErrorCode.PROTOCOL_ERROR,
    ),
    "settings-length": (fr.frame(fr.SETTINGS, 0, 0, bytes(5)), fr.ErrorCode.FRAME_SIZE_ERROR),
    "push-promise": (fr.frame(fr.PUSH_PROMISE, 0, 1, bytes(4)), fr.ErrorCode.PROTOCOL_ERROR),
}


@pytest.mark.parametrize("case", list(PROTOCOL_ERRORS))
@async_test
async def test_raw_protocol_errors_close_with_goaway(case: str) -> None:
    frames, code = PROTOCOL_ERRORS[case]
    streams = Streams()
    async with serving({ECHO: streams.route()}) as server:
        client = await RawClient.connect(server.port)
        client.headers(1, request_block(ECHO.encode()))
        client.data(1, grpc_message(b"open"))
        await client.until(fr.DATA, 1)
        client.writer.write(frames)
        last, got = await client.goaway()
        client.close()
        assert server.connection_count == 0
    assert (last, fr.ErrorCode(got)) == (1, code)
    assert streams.all[0].ends == [True]


@async_test
async def test_raw_bad_preface_is_refused() -> None:
    async with serving({}) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        client = RawClient(reader, writer)
        _last, code = await client.goaway()
        writer.close()
    assert code == fr.ErrorCode.PROTOCOL_ERROR


@async_test
async def test_raw_connection_loss_cancels_every_stream_once() -> None:
    never: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    streams = Streams(lambda data: never)
    async with serving({ECHO: streams.route()}) as server:
        client = await RawClient.connect(server.port)
        for sid in (1, 3, 5):
            client.headers(sid, request_block(ECHO.encode()))
            client.data(sid, grpc_message(b"wait") * 2)
        await client.barrier()
        assert server.active_streams == 3
        client.writer.transport.abort()
        for seen in streams.all:
            await seen.ended.wait()
        assert server.active_streams == 0
    assert [seen.ends for seen in streams.all] == [[True]] * 3
    assert [seen.messages for seen in streams.all] == [[b"wait"]] * 3


@async_test
async def test_reset_before_an_async_reply_starts_leaves_no_stray_coroutine() -> None:
    ran: list[bytes] = []

    async def behave(data: bytes) -> bytes:
        ran.append(data)
        return data

    streams = Streams(behave)
    async with serving({ECHO: streams.route()}) as server:
        client = await RawClient.connect(server.port)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # One write: the server reads the message and the reset in the same step.
            client.writer.write(
                fr.frame(fr.HEADERS, fr.FLAG_END_HEADERS, 1, request_block(ECHO.encode()))
                + fr.frame(fr.DATA, 0, 1, grpc_message(b"never answered"))
                + fr.rst_stream(1, fr.ErrorCode.CANCEL)
            )
            await client.barrier()
            gc.collect()
        client.close()
    assert streams.all[0].messages == [b"never answered"]
    assert streams.all[0].ends == [True]
    assert ran == []
    assert not [w for w in caught if "never awaited" in str(w.message)]


# -- hardening: header limits, malformed requests, GOAWAY, receive windows ---------------


def fields(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"".join(encode_literal(name, value) for name, value in pairs)


_POST, _HTTP = (b":method", b"POST"), (b":scheme", b"http")
_PATH = (b":path", ECHO.encode())
MALFORMED = {
    "no-path": fields(_POST, _HTTP),
    "no-scheme": fields(_POST, _PATH),
    "empty-path": fields(_POST, _HTTP, (b":path", b"")),
    "pseudo-after-regular": fields(_POST, _HTTP, (b"te", b"trailers"), _PATH),
    "response-pseudo": fields(_POST, _HTTP, _PATH, (b":status", b"200")),
    "repeated-path": fields(_POST, _HTTP, _PATH, _PATH),
    "uppercase-name": fields(_POST, _HTTP, _PATH, (b"Content-Type", b"application/grpc")),
    "connection-header": fields(_POST, _HTTP, _PATH, (b"connection", b"keep-alive")),
    "te-not-trailers": fields(_POST, _HTTP, _PATH, (b"te", b"gzip")),
}


@pytest.mark.parametrize("case", list(MALFORMED))
@async_test
async def test_raw_malformed_request_is_a_stream_error(case: str) -> None:
    """RFC 9113 8.1.1: PROTOCOL_ERROR for that stream only; no handler is created, and the
    connection (and its HPACK state) carries on serving."""
    streams = Streams()
    async with serving({ECHO: streams.route()}) as server:
        client = await RawClient.connect(server.port)
        client.headers(1, MALFORMED[case], end_stream=True)
        assert (await client.response(1)).rst == fr.ErrorCode.PROTOCOL_ERROR
        client.headers(3, request_block(ECHO.encode()))
        client.data(3, grpc_message(b"still here"), end_stream=True)
        after = await client.response(3)
        client.close()
    assert after.messages == [b"still here"] and after.status == 0
    assert [seen.messages for seen in streams.all] == [[b"still here"]]


@async_test
async def test_raw_non_post_and_bad_trailers() -> None:
    streams = Streams()
    async with serving({ECHO: streams.route()}) as server:
        client = await RawClient.connect(server.port)
        client.headers(1, fields((b":method", b"GET"), _HTTP, _PATH), end_stream=True)
        get = await client.response(1)
        client.headers(3, request_block(ECHO.encode()))
        client.data(3, grpc_message(b"one"))
        await client.until(fr.DATA, 3)
        client.headers(3, fields((b":path", b"/sneaky")), end_stream=True)
        trailers = await client.response(3)
        client.close()
    assert get.status == Status.UNIMPLEMENTED
    assert trailers.rst == fr.ErrorCode.PROTOCOL_ERROR
    assert streams.all[0].ends == [True]


@async_test
async def test_raw_header_list_over_the_advertised_limit() -> None:
    """Refused with RESOURCE_EXHAUSTED; the block was still decoded, so an indexed field
    added by the refused block is usable on the next stream."""
    streams = Streams()
    async with serving({ECHO: streams.route()}) as server:
        client = await RawClient.connect(server.port)
        huge = b"a" * MAX_HEADER_LIST
        remembered = encode_int(0, 6, 0x40) + encode_literal(b"x-id", b"42")[1:]
        client.headers(1, request_block(ECHO.encode()) + remembered + fields((b"x-big", huge)))
        refused = await client.response(1)
        client.headers(3, request_block(ECHO.encode()) + b"\xbe")  # index 62: x-id: 42
        client.data(3, grpc_message(b"fine"), end_stream=True)
        fine = await client.response(3)
        client.close()
    assert refused.status == Status.RESOURCE_EXHAUSTED
    assert fine.messages == [b"fine"]
    assert len(streams.all) == 1


@async_test
async def test_raw_peer_goaway_finishes_open_streams_then_closes() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[bytes] = loop.create_future()
    streams = Streams(lambda data: gate)
    async with serving({ECHO: streams.route()}) as server:
        client = await RawClient.connect(server.port)
        client.headers(1, request_block(ECHO.encode()))
        client.data(1, grpc_message(b"slow"), end_stream=True)
        client.send(fr.GOAWAY, 0, 0, fr.goaway(0, fr.ErrorCode.NO_ERROR)[9:])
        client.headers(3, request_block(ECHO.encode()), end_stream=True)
        assert (await client.response(3)).rst == fr.ErrorCode.REFUSED_STREAM
        assert server.connection_count == 1
        gate.set_result(b"answered")
        served = await client.response(1)
        assert await client.reader.read() == b""  # nothing open any more: closed
        client.close()
    assert served.messages == [b"answered"] and served.status == 0
    assert streams.all[0].ends == [False]


@async_test
async def test_raw_peer_goaway_with_an_error_cancels_streams() -> None:
    never: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    streams = Streams(lambda data: never)
    async with serving({ECHO: streams.route()}) as server:
        client = await RawClient.connect(server.port)
        client.headers(1, request_block(ECHO.encode()))
        client.data(1, grpc_message(b"wait"))
        await client.barrier()
        client.send(fr.GOAWAY, 0, 0, fr.goaway(1, fr.ErrorCode.INTERNAL_ERROR)[9:])
        await streams.all[0].ended.wait()
        assert await client.reader.read() == b""
        client.close()
        assert server.active_streams == 0
    assert streams.all[0].ends == [True]


def window_updates(frames: list[tuple[int, int, int, bytes]], sid: int) -> int:
    return sum(
        int.from_bytes(p, "big") for t, _f, s, p in frames if t == fr.WINDOW_UPDATE and s == sid
    )


@async_test
async def test_raw_receive_window_holds_bytes_while_the_handler_is_busy() -> None:
    """Back-pressure: a busy stream's window is not credited, so a peer that outruns its
    handler stalls at STREAM_WINDOW queued bytes; the credit comes once they are served.
    A stream whose handler keeps up gets credit as it goes."""
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[bytes] = loop.create_future()
    chunk = grpc_message(b"q" * 60_000)  # 60,005 bytes
    count = STREAM_WINDOW // len(chunk)  # as many as the window allows
    async with serving({ECHO: Streams(lambda d: gate if d == b"first" else b"").route()}) as srv:
        client = await RawClient.connect(srv.port)
        client.headers(1, request_block(ECHO.encode()))
        client.data(1, grpc_message(b"first"))
        for _ in range(count - 1):
            client.data(1, chunk)
        held = await client.barrier()
        assert window_updates(held, 1) == 0
        assert srv.active_streams == 1
        gate.set_result(b"done")
        served = await client.until(fr.WINDOW_UPDATE, 1)
        assert window_updates(served, 1) == (count - 1) * len(chunk) + len(grpc_message(b"first"))
        # Same bytes to a stream that is never busy: credited while they arrive.
        client.headers(3, request_block(ECHO.encode()))
        for _ in range(count - 1):
            client.data(3, grpc_message(b"z" * 60_000))
        flowing = await client.barrier()
        assert window_updates(flowing, 3) >= STREAM_WINDOW // 2
        client.close()
    assert sum(1 for t, _f, s, _p in served if t == fr.DATA and s == 1) >= 1


@async_test
async def test_raw_stream_window_is_enforced() -> None:
    never: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    async with serving({ECHO: Streams(lambda data: never).route()}) as server:
        client = await RawClient.connect(server.port)
        client.headers(1, request_block(ECHO.encode()))
        client.data(1, grpc_message(b"x"))
        payload = bytes(16_000)
        sent = len(grpc_message(b"x"))
        while sent + len(payload) <= STREAM_WINDOW:
            client.data(1, payload)
            sent += len(payload)
        client.data(1, bytes(STREAM_WINDOW - sent + 1))  # one byte past the window
        response = await client.response(1)
        assert response.rst == fr.ErrorCode.FLOW_CONTROL_ERROR
        # The connection window got the stream's held bytes back when the stream went.
        assert server.connection_count == 1
        client.close()
