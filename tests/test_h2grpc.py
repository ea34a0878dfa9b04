"""extproc.dataplane.h2grpc against real HTTP/2 peers: grpcio's client, Envoy, hand-built frames.

grpcio and Envoy are independent HTTP/2 + gRPC implementations, so agreeing with them
is what matters. Hand-built frames reach what neither of them sends: padding,
CONTINUATION, tiny flow-control windows and protocol violations.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import os
import subprocess
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.dataplane.h2grpc import (
    HEALTH_CHECK_PATH,
    GrpcError,
    GrpcServer,
    Route,
    Status,
    health_route,
)
from extproc.dataplane.h2grpc import frames as fr
from extproc.dataplane.h2grpc.hpack import HeaderDecoder, HpackError, encode_int, encode_literal
from extproc.dataplane.h2grpc.huffman import (
    CODES,
    LENGTHS,
    HuffmanError,
    huffman_decode,
    huffman_encode,
)
from extproc.dataplane.h2grpc.responses import percent_encode
from extproc.devstack.stack import envoy_binary, free_port
from extproc.simulator import Simulator

ECHO = "/test.Echo/Chat"
UNARY = "/test.Echo/Once"
EXT_PROC = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
BIG = 64 << 20
TEST_TIMEOUT = 30.0


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), TEST_TIMEOUT))

    return run


# -- handlers -----------------------------------------------------------------------------


Behave = Callable[[bytes], bytes | Awaitable[bytes | None] | None]


@dataclass
class Seen:
    """What one stream's handler was told."""

    messages: list[bytes] = field(default_factory=list)
    ends: list[bool] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class Handler:
    def __init__(self, seen: Seen, behave: Behave) -> None:
        self.seen = seen
        self.behave = behave

    def on_message(self, data: bytes) -> bytes | Awaitable[bytes | None] | None:
        self.seen.messages.append(data)
        return self.behave(data)

    def on_end(self, cancelled: bool) -> None:
        self.seen.ends.append(cancelled)
        self.seen.ended.set()


class Streams:
    """A route whose every stream is recorded, in order of creation."""

    def __init__(self, behave: Behave = lambda data: data) -> None:
        self.behave = behave
        self.all: list[Seen] = []

    def factory(self) -> Handler:
        seen = Seen()
        self.all.append(seen)
        return Handler(seen, self.behave)

    def route(self, *, unary: bool = False) -> Route:
        return Route(self.factory, unary=unary)


@contextlib.asynccontextmanager
async def serving(
    routes: dict[str, Route], listen: str = "127.0.0.1:0", **kwargs: Any
) -> AsyncIterator[GrpcServer]:
    server = GrpcServer(routes, **kwargs)
    await server.start(listen)
    try:
        yield server
    finally:
        await server.close(0)


def open_channel(target: str) -> grpc.aio.Channel:
    options = [("grpc.max_receive_message_length", BIG), ("grpc.max_send_message_length", BIG)]
    return grpc.aio.insecure_channel(target, options=options)


@contextlib.asynccontextmanager
async def echo_server(
    streams: Streams, **kwargs: Any
) -> AsyncIterator[tuple[GrpcServer, grpc.aio.Channel]]:
    routes = {ECHO: streams.route(), UNARY: streams.route(unary=True)}
    async with serving(routes, **kwargs) as server, open_channel(f"127.0.0.1:{server.port}") as ch:
        yield server, ch


# -- HPACK and Huffman --------------------------------------------------------------------

# RFC 7541 Appendix C: C.3 requests without Huffman, C.4 with Huffman (4096-byte table),
# C.6 responses with Huffman and a 256-byte table, where entries get evicted.
RFC_REQUESTS = [
    (":method", "GET"),
    (":scheme", "http"),
    (":path", "/"),
    (":authority", "www.example.com"),
]
RFC_C3 = [
    "828684410f7777772e6578616d706c652e636f6d",
    "828684be58086e6f2d6361636865",
    "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
]
RFC_C4 = [
    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
    "828684be5886a8eb10649cbf",
    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
]
RFC_C6 = [
    "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad1718"
    "63c78f0b97c8e9ae82ae43d3",
    "4883640effc1c0bf",
    "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7"
    "b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
]


def _pairs(block: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(n.decode(), v.decode()) for n, v in block]


@pytest.mark.parametrize("blocks", [RFC_C3, RFC_C4], ids=["plain", "huffman"])
def test_hpack_rfc_request_examples(blocks: list[str]) -> None:
    decoder = HeaderDecoder()
    first, second, third = (decoder.decode(bytes.fromhex(b)) for b in blocks)
    assert _pairs(first) == RFC_REQUESTS
    assert _pairs(second) == [*RFC_REQUESTS, ("cache-control", "no-cache")]
    assert _pairs(third) == [
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ]
    assert decoder.table_size == 164
    assert _pairs(decoder.table) == [
        ("custom-key", "custom-value"),
        ("cache-control", "no-cache"),
        (":authority", "www.example.com"),
    ]


def test_hpack_rfc_response_examples_evict() -> None:
    decoder = HeaderDecoder(256)
    date = "Mon, 21 Oct 2013 20:13:21 GMT"
    loc = "https://www.example.com"
    first, second, third = (decoder.decode(bytes.fromhex(b)) for b in RFC_C6)
    assert _pairs(first) == [
        (":status", "302"),
        ("cache-control", "private"),
        ("date", date),
        ("location", loc),
    ]
    assert _pairs(second) == [
        (":status", "307"),
        ("cache-control", "private"),
        ("date", date),
        ("location", loc),
    ]
    cookie = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
    assert _pairs(third) == [
        (":status", "200"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
        ("location", loc),
        ("content-encoding", "gzip"),
        ("set-cookie", cookie),
    ]
    assert decoder.table_size == 215
    assert [n for n, _ in _pairs(decoder.table)] == ["set-cookie", "content-encoding", "date"]


def test_huffman_code_is_a_complete_prefix_code() -> None:
    assert len(LENGTHS) == 257
    assert sum(2.0**-n for n in LENGTHS) == 1.0
    assert CODES[256] == (1 << 30) - 1  # EOS: thirty ones
    assert (CODES[ord("0")], LENGTHS[ord("0")]) == (0, 5)
    every_byte = bytes(range(256)) * 3
    assert huffman_decode(huffman_encode(every_byte)) == every_byte
    assert huffman_decode(b"") == b""


@pytest.mark.parametrize(
    "raw",
    [
        bytes([0x1F, 0xFF]),  # "a" (00011) then 11 bits of padding: more than 7
        bytes([0x18]),  # "a" then padding 000: not a prefix of EOS
        b"\xff\xff\xff\xfc",  # EOS (thirty ones) inside the string
    ],
    ids=["long-padding", "zero-padding", "eos"],
)
def test_huffman_rejects_bad_padding_and_eos(raw: bytes) -> None:
    with pytest.raises(HuffmanError):
        huffman_decode(raw)


@pytest.mark.parametrize(
    "block",
    [
        b"\xff\x80\x80\x80\x80\x80\x01",  # integer overflow
        b"\xbe",  # dynamic index 62 with an empty table
        b"\x80",  # index 0
        b"\x40\x05ab",  # string shorter than its length
        b"\x3f\xe2\x1f",  # table size update to 4097, above the 4096 limit
        b"\x82\x20",  # size update after a header field
    ],
)
def test_hpack_rejects_malformed_blocks(block: bytes) -> None:
    with pytest.raises(HpackError):
        HeaderDecoder().decode(block)


def test_hpack_size_update_shrinks_table_and_integers_round_trip() -> None:
    decoder = HeaderDecoder()
    decoder.decode(encode_int(0, 6, 0x40) + b"\x03abc\x03def")
    assert decoder.table_size == 38
    decoder.decode(b"\x20")
    assert decoder.table_size == 0
    assert decoder.table == []
    for value in (0, 30, 31, 127, 128, 1337, 1 << 20):
        block = encode_int(value, 5, 0x20)
        assert HeaderDecoder(1 << 21).decode(block) == []
    assert encode_int(1337, 5) == bytes([31, 154, 10])  # RFC 7541 C.1.2


def test_grpc_message_percent_encoding() -> None:
    assert percent_encode("plain text") == b"plain text"
    assert percent_encode("50% é\n") == b"50%25 %C3%A9%0A"


# -- grpcio client ------------------------------------------------------------------------


@async_test
async def test_bidi_echo_many_messages_and_normal_end() -> None:
    streams = Streams()
    messages = [bytes([i % 251]) * (i * 7 % 3000) for i in range(500)]
    async with echo_server(streams) as (_server, ch):
        call = ch.stream_stream(ECHO)(iter(messages))
        replies = [m async for m in call]
        assert await call.code() == grpc.StatusCode.OK
    assert replies == messages
    assert streams.all[0].messages == messages
    assert streams.all[0].ends == [False]


@async_test
async def test_replies_keep_order_around_a_slow_awaitable() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def behave(data: bytes) -> bytes | Awaitable[bytes]:
        if data == b"slow":

            async def later() -> bytes:
                await gate
                return b"SLOW"

            return later()
        return data.upper()

    streams = Streams(behave)
    async with echo_server(streams) as (_server, ch):
        call = ch.stream_stream(ECHO)()
        await call.write(b"a")
        assert await call.read() == b"A"
        for message in (b"slow", b"b", b"c"):
            await call.write(message)
        await call.done_writing()
        # Another stream on the same connection is served while the first one waits,
        # and the first one's later messages are held back until the slow reply is out.
        assert await ch.unary_unary(UNARY)(b"other") == b"OTHER"
        assert streams.all[0].messages == [b"a", b"slow"]
        gate.set_result(None)
        assert [await call.read() for _ in range(3)] == [b"SLOW", b"B", b"C"]
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    assert streams.all[0].messages == [b"a", b"slow", b"b", b"c"]
    assert streams.all[0].ends == [False]


@async_test
async def test_one_hundred_concurrent_streams_on_one_connection() -> None:
    all_open = asyncio.Event()
    opened = 0

    def behave(data: bytes) -> bytes | Awaitable[bytes]:
        nonlocal opened
        if data != b"hello":
            return data

        async def after_everyone() -> bytes:
            await all_open.wait()
            return b"welcome"

        opened += 1
        if opened == 100:
            all_open.set()
        return after_everyone()

    streams = Streams(behave)
    async with echo_server(streams) as (server, ch):
        method = ch.stream_stream(ECHO)

        async def one(i: int) -> None:
            call = method()
            await call.write(b"hello")
            assert await call.read() == b"welcome"
            for j in range(10):
                message = f"{i}:{j}".encode()
                await call.write(message)
                assert await call.read() == message
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK

        await asyncio.gather(*(one(i) for i in range(100)))
        assert server.connection_count == 1
        assert server.active_streams == 0
    assert len(streams.all) == 100
    assert all(seen.ends == [False] for seen in streams.all)


@async_test
async def test_twenty_mib_each_way() -> None:
    streams = Streams(lambda data: data[::-1])
    payload = os.urandom(1 << 20) * 20
    async with echo_server(streams) as (_server, ch):
        reply = await ch.unary_unary(UNARY)(payload)
        call = ch.stream_stream(ECHO)(iter([payload, b"small", payload[:3_000_000]]))
        replies = [m async for m in call]
    assert reply == payload[::-1]
    assert replies == [payload[::-1], b"llams", payload[:3_000_000][::-1]]
    assert [seen.ends for seen in streams.all] == [[False], [False]]


@async_test
async def test_unknown_method_is_unimplemented() -> None:
    streams = Streams()
    async with echo_server(streams) as (_server, ch):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/test.Echo/Missing")(b"x")
        call = ch.stream_stream("/nope.Service/Stream")()
        assert await call.code() == grpc.StatusCode.UNIMPLEMENTED
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/test.Echo/Missing" in (err.value.details() or "")
    assert streams.all == []


@async_test
async def test_handler_exception_is_internal_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    def behave(data: bytes) -> bytes:
        if data == b"boom":
            raise RuntimeError("handler blew up")
        return data

    streams = Streams(behave)
    async with echo_server(streams) as (_server, ch):
        call = ch.stream_stream(ECHO)()
        await call.write(b"fine")
        assert await call.read() == b"fine"
        await call.write(b"boom")
        assert await call.code() == grpc.StatusCode.INTERNAL
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(UNARY)(b"boom")
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert [seen.ends for seen in streams.all] == [[True], [True]]
    failures = [r for r in caplog.records if r.exc_info and "handler blew up" in str(r.exc_info[1])]
    assert len(failures) == 2


@async_test
async def test_async_handler_errors_map_to_status() -> None:
    async def behave(data: bytes) -> bytes:
        if data == b"deny":
            raise GrpcError(Status.PERMISSION_DENIED, "not for you: é 100%")
        raise ValueError("async failure")

    streams = Streams(behave)
    async with echo_server(streams) as (_server, ch):
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await ch.unary_unary(UNARY)(b"deny")
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await ch.unary_unary(UNARY)(b"other")
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denied.value.details() == "not for you: é 100%"
    assert failed.value.code() == grpc.StatusCode.INTERNAL


@async_test
async def test_client_cancel_ends_stream_cancelled_exactly_once() -> None:
    streams = Streams()
    async with echo_server(streams) as (server, ch):
        call = ch.stream_stream(ECHO)()
        await call.write(b"ping")
        assert await call.read() == b"ping"
        call.cancel()
        await streams.all[0].ended.wait()
        # A full round trip afterwards: nothing else arrives for the cancelled stream.
        assert await ch.unary_unary(UNARY)(b"after") == b"after"
        assert server.active_streams == 0
    assert streams.all[0].ends == [True]


@async_test
async def test_health_check() -> None:
    statuses = {"": health_pb2.HealthCheckResponse.SERVING, "ext": 2}

    def status(service: str) -> int:
        return statuses.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    async with (
        serving({HEALTH_CHECK_PATH: health_route(status)}) as server,
        open_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        stub = health_pb2_grpc.HealthStub(ch)
        overall = await stub.Check(health_pb2.HealthCheckRequest())
        ext = await stub.Check(health_pb2.HealthCheckRequest(service="ext"))
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.Check(health_pb2.HealthCheckRequest(service="other"))
        watch = stub.Watch(health_pb2.HealthCheckRequest())
        assert await watch.code() == grpc.StatusCode.UNIMPLEMENTED
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    assert ext.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


@async_test
async def test_unix_socket_listen(tmp_path: Path) -> None:
    streams = Streams()
    path = tmp_path / "h2grpc.sock"
    async with (
        serving({UNARY: streams.route(unary=True)}, f"unix:{path}") as server,
        open_channel(f"unix:{path}") as ch,
    ):
        assert server.port == 0
        assert await ch.unary_unary(UNARY)(b"over unix") == b"over unix"
    assert streams.all[0].ends == [False]


@async_test
async def test_close_lets_an_inflight_stream_finish() -> None:
    streams = Streams()
    server = GrpcServer({ECHO: streams.route()})
    await server.start("127.0.0.1:0")
    async with open_channel(f"127.0.0.1:{server.port}") as ch:
        call = ch.stream_stream(ECHO)()
        await call.write(b"one")
        assert await call.read() == b"one"
        started = time.monotonic()
        closing = asyncio.create_task(server.close(grace=10))
        await call.write(b"two")
        assert await call.read() == b"two"
        assert not closing.done()
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        await closing
        assert time.monotonic() - started < 5
    assert streams.all[0].ends == [False]
    assert server.connection_count == 0


@async_test
async def test_close_cancels_streams_left_after_grace() -> None:
    never: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    streams = Streams(lambda data: never if data == b"hang" else data)
    server = GrpcServer({ECHO: streams.route()})
    await server.start("127.0.0.1:0")
    async with open_channel(f"127.0.0.1:{server.port}") as ch:
        call = ch.stream_stream(ECHO)()
        await call.write(b"hello")
        assert await call.read() == b"hello"
        await call.write(b"hang")
        await server.close(grace=0.2)
        assert streams.all[0].ends == [True]
        assert await call.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert streams.all[0].ends == [True]


# -- hand-built frames --------------------------------------------------------------------


def request_block(path: bytes, *, index_path: bool = False, huffman: bool = False) -> bytes:
    """POST, http, :path (optionally added to the dynamic table), grpc content-type, te."""
    value = huffman_encode(path) if huffman else path
    length = encode_int(len(value), 7, 0x80 if huffman else 0)
    path_field = (encode_int(4, 6, 0x40) if index_path else encode_int(4, 4)) + length + value
    return (
        b"\x83\x86"
        + path_field
        + encode_literal(b"content-type", b"application/grpc")
        + encode_literal(b"te", b"trailers")
    )


def grpc_message(body: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(body).to_bytes(4, "big") + body


@dataclass
class Response:
    headers: list[tuple[bytes, bytes]]
    data_frames: list[bytes]
    trailers: list[tuple[bytes, bytes]]
    rst: int | None = None

    @property
    def body(self) -> bytes:
        return b"".join(self.data_frames)

    @property
    def messages(self) -> list[bytes]:
        body, out = self.body, []
        while body:
            size = int.from_bytes(body[1:5], "big")
            out.append(body[5 : 5 + size])
            body = body[5 + size :]
        return out

    @property
    def status(self) -> int:
        return int(dict(self.trailers or self.headers)[b"grpc-status"])


class RawClient:
    """An HTTP/2 client that sends exactly the frames a test builds, over a real socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = HeaderDecoder()
        self.pending: list[tuple[int, int, int, bytes]] = []

    @classmethod
    async def connect(cls, port: int, settings: dict[int, int] | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        writer.write(fr.PREFACE + fr.settings(settings or {}))
        return client

    def send(self, ftype: int, flags: int, sid: int, payload: bytes = b"") -> None:
        self.writer.write(fr.frame(ftype, flags, sid, payload))

    def headers(self, sid: int, block: bytes, *, end_stream: bool = False) -> None:
        flags = fr.FLAG_END_HEADERS | (fr.FLAG_END_STREAM if end_stream else 0)
        self.send(fr.HEADERS, flags, sid, block)

    def data(self, sid: int, payload: bytes, *, end_stream: bool = False) -> None:
        self.send(fr.DATA, fr.FLAG_END_STREAM if end_stream else 0, sid, payload)

    async def frame(self) -> tuple[int, int, int, bytes]:
        if self.pending:
            return self.pending.pop(0)
        head = await self.reader.readexactly(9)
        length = int.from_bytes(head[:3], "big")
        sid = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        return head[3], head[4], sid, await self.reader.readexactly(length)

    async def until(self, ftype: int, sid: int | None = None) -> list[tuple[int, int, int, bytes]]:
        """Frames up to and including the first of this type (and stream)."""
        seen = []
        while True:
            frame = await self.frame()
            seen.append(frame)
            if frame[0] == ftype and (sid is None or frame[2] == sid):
                return seen

    async def barrier(self) -> list[tuple[int, int, int, bytes]]:
        """Everything the server wrote before answering a PING sent now (it answers in order)."""
        opaque = os.urandom(8)
        self.send(fr.PING, 0, 0, opaque)
        frames = await self.until(fr.PING)
        assert frames[-1] == (fr.PING, fr.FLAG_ACK, 0, opaque)
        return frames[:-1]

    async def response(self, sid: int) -> Response:
        response = Response([], [], [])
        while True:
            ftype, flags, fsid, payload = await self.frame()
            if fsid != sid:
                continue
            if ftype == fr.DATA:
                response.data_frames.append(payload)
            elif ftype == fr.HEADERS:
                block = self.decoder.decode(payload)
                if response.headers:
                    response.trailers = block
                else:
                    response.headers = block
                if flags & fr.FLAG_END_STREAM:
                    return response
            elif ftype == fr.RST_STREAM:
                response.rst = int.from_bytes(payload, "big")
                return response

    async def goaway(self) -> tuple[int, int]:
        """(last stream id, error code) of the server's GOAWAY; the connection then closes."""
        frames = await self.until(fr.GOAWAY)
        payload = frames[-1][3]
        assert await self.reader.read() == b""
        return int.from_bytes(payload[:4], "big"), int.from_bytes(payload[4:8], "big")

    def close(self) -> None:
        self.writer.close()


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
        assert settings[fr.SETTINGS_INITIAL_WINDOW_SIZE] == 2**31 - 1
        assert settings[fr.SETTINGS_MAX_CONCURRENT_STREAMS] == 100_000
        assert settings[fr.SETTINGS_MAX_FRAME_SIZE] >= 16_384
        ftype, _flags, sid, payload = await client.frame()
        assert (ftype, sid) == (fr.WINDOW_UPDATE, 0)
        assert int.from_bytes(payload, "big") == 2**31 - 1 - 65_535
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


@async_test
async def test_on_end_exceptions_are_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def on_message(self, data: bytes) -> bytes:
            return data

        def on_end(self, cancelled: bool) -> None:
            raise RuntimeError("on_end exploded")

    async with (
        serving({UNARY: Route(Broken, unary=True)}) as server,
        open_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        assert await ch.unary_unary(UNARY)(b"a") == b"a"
        assert await ch.unary_unary(UNARY)(b"b") == b"b"
    assert sum("on_end exploded" in str(r.exc_info[1]) for r in caplog.records if r.exc_info) == 2


# -- the real Envoy -----------------------------------------------------------------------


def envoy_config(
    listen: int, admin: int, grpc_port: int, upstream_port: int, *, graceful_close: bool
) -> dict[str, Any]:
    def cluster(name: str, port: int, **extra: Any) -> dict[str, Any]:
        endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}
        return {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
            },
            **extra,
        }

    h2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    ext_proc = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "extproc"}, "timeout": "0s"},
        "failure_mode_allow": False,
        "message_timeout": "5s",
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": "BUFFERED",
            "response_header_mode": "SEND",
            "response_body_mode": "STREAMED",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": "test",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                }
            ]
        },
        "http_filters": [
            {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    runtime = {"envoy.reloadable_features.ext_proc_graceful_grpc_close": graceful_close}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": runtime}]},
        "static_resources": {
            "listeners": [
                {
                    "name": "http",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                cluster("extproc", grpc_port, typed_extension_protocol_options=h2),
                cluster("upstream", upstream_port),
            ],
        },
    }


class ExtProcStream:
    """Answers every ext_proc phase with an empty 'continue' and records the phases."""

    def __init__(self, log: list[ExtProcStream]) -> None:
        self.phases: list[str] = []
        self.ends: list[bool] = []
        self.ended = asyncio.Event()
        log.append(self)

    def on_message(self, data: bytes) -> bytes:
        request = ext_pb.ProcessingRequest.FromString(data)
        phase = request.WhichOneof("request")
        assert phase is not None
        self.phases.append(phase)
        if phase.endswith("headers"):
            reply = ext_pb.ProcessingResponse(**{phase: ext_pb.HeadersResponse()})
        elif phase.endswith("body"):
            reply = ext_pb.ProcessingResponse(**{phase: ext_pb.BodyResponse()})
        else:
            reply = ext_pb.ProcessingResponse(**{phase: ext_pb.TrailersResponse()})
        return reply.SerializeToString()

    def on_end(self, cancelled: bool) -> None:
        self.ends.append(cancelled)
        self.ended.set()


async def wait_envoy_ready(admin: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient() as http:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"envoy exited:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"http://127.0.0.1:{admin}/ready")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"envoy not ready:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.05)  # polling a readiness probe, not synchronising on time


@pytest.mark.parametrize("graceful_close", [False, True], ids=["reset", "graceful-close"])
@async_test
async def test_envoy_ext_proc_sees_all_four_phases(tmp_path: Path, graceful_close: bool) -> None:
    """By default Envoy ends every ext_proc stream with RST_STREAM when the HTTP request is
    done (so on_end says cancelled); with its graceful-close runtime guard it half-closes
    and waits for our trailers instead."""
    seen: list[ExtProcStream] = []
    routes = {EXT_PROC: Route(lambda: ExtProcStream(seen))}
    async with serving(routes) as server, Simulator() as simulator:
        listen, admin = free_port(), free_port()
        config = tmp_path / "envoy.yaml"
        config.write_text(
            json.dumps(
                envoy_config(
                    listen, admin, server.port, simulator.port, graceful_close=graceful_close
                )
            )
        )
        log = tmp_path / "envoy.log"
        argv = [envoy_binary(), "-c", str(config), "--concurrency", "1", "--disable-hot-restart"]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*argv, "--log-level", os.environ.get("ENVOY_LOG", "warning")],
                stdout=out,
                stderr=out,
            )
        try:
            await wait_envoy_ready(admin, proc, log)
            body = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}
            url = f"http://127.0.0.1:{listen}/v1/chat/completions"
            async with httpx.AsyncClient(timeout=10) as http:
                plain = await http.post(url, json=body)
                streamed = await http.post(url, json={**body, "stream": True})
            for stream in seen:
                await stream.ended.wait()
        finally:
            proc.terminate()
            proc.wait(10)
    assert plain.status_code == 200, plain.text
    assert plain.json()["object"] == "chat.completion"
    assert streamed.status_code == 200
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert len(seen) == 2
    for stream in seen:
        assert stream.phases[:3] == ["request_headers", "request_body", "response_headers"]
        assert set(stream.phases[3:]) == {"response_body"}
        assert stream.ends == [not graceful_close]
