"""Shared pieces of the h2grpc tests: recording handlers, a server fixture, a raw client.

The raw client sends exactly the frames a test builds over a real socket, to reach what
no well-behaved peer sends: padding, CONTINUATION, tiny windows and protocol violations.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc

from extproc.dataplane.h2grpc import GrpcServer, Route
from extproc.dataplane.h2grpc import frames as fr
from extproc.dataplane.h2grpc.hpack import HeaderDecoder, encode_int, encode_literal
from extproc.dataplane.h2grpc.huffman import huffman_encode

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
