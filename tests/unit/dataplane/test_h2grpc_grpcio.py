"""h2grpc against grpcio's client: an independent HTTP/2 + gRPC stack must agree with us."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from h2grpc_support import ECHO, UNARY, Streams, async_test, echo_server, open_channel, serving

from extproc.dataplane.h2grpc import (
    HEALTH_CHECK_PATH,
    GrpcError,
    GrpcServer,
    Route,
    Status,
    health_route,
)


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
