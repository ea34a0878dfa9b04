"""h2grpc against the `h2` package as a fuzzing client.

Two kinds of conversation, from fixed seeds so a failure replays:
- valid: random streams, message sizes, DATA splits, padding, windows, pings and resets,
  all produced by h2's state machine; h2 must accept everything we answer, and every
  message must come back in order.
- hostile: the same bytes with random corruption, random frames spliced in, truncation.
  Whatever arrives, the server answers with well-formed frames, ends the connection
  when the client goes (no hang), tells every handler `on_end` exactly once, logs no
  internal error, and keeps serving other connections.
"""

from __future__ import annotations

import asyncio
import logging
import random

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from h2grpc_support import ECHO, UNARY, Streams, async_test, grpc_message, serving
from hyperframe.frame import Frame, GoAwayFrame

from extproc.dataplane.h2grpc import Status
from extproc.dataplane.h2grpc import frames as fr
from extproc.dataplane.h2grpc.http2 import SERVER_SETTINGS

SLOW = "/test.Echo/Slow"
READ_TIMEOUT = 10.0


async def _later(data: bytes) -> bytes:
    await asyncio.sleep(0)  # yield once: the reply is awaited, so later messages queue
    return data


def _routes(streams: Streams, slow: Streams, unary: Streams) -> dict[str, object]:
    return {ECHO: streams.route(), SLOW: slow.route(), UNARY: unary.route(unary=True)}


def _client(rng: random.Random) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.local_settings = h2.settings.Settings(
        client=True,
        initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: rng.choice([1, 100, 16_384, 65_535]),
            h2.settings.SettingCodes.HEADER_TABLE_SIZE: rng.choice([0, 256, 4096]),
        },
    )
    conn.initiate_connection()
    return conn


def _plan(rng: random.Random) -> list[tuple[str, list[bytes], bool]]:
    """Streams to open: (path, messages, reset midway)."""
    plan = []
    for _ in range(rng.randrange(1, 8)):
        path = rng.choice([ECHO, ECHO, SLOW, UNARY, "/not/routed"])
        count = 1 if path == UNARY else rng.randrange(0, 6)
        sizes = [rng.choice([0, 1, 7, 300, 5_000, 40_000]) for _ in range(count)]
        plan.append((path, [rng.randbytes(n) for n in sizes], rng.random() < 0.15))
    return plan


def _request(path: str) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", b"fuzz"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]


def _send_plan(
    conn: h2.connection.H2Connection, rng: random.Random, plan: list[tuple[str, list[bytes], bool]]
) -> dict[int, tuple[str, list[bytes], bool]]:
    by_sid = {}
    for path, messages, reset in plan:
        sid = conn.get_next_available_stream_id()
        by_sid[sid] = (path, messages, reset)
        conn.send_headers(sid, _request(path))
        body = b"".join(grpc_message(m) for m in messages)
        pos = 0
        while pos < len(body):
            size = min(rng.randrange(1, 20_000), conn.max_outbound_frame_size - 256)
            pad = rng.choice([None, None, 0, 5, 200])
            conn.send_data(sid, body[pos : pos + size], pad_length=pad)
            pos += size
            if rng.random() < 0.1:
                conn.ping(rng.randbytes(8))
        if reset:
            conn.reset_stream(sid)
        else:
            conn.end_stream(sid)
    return by_sid


@pytest.mark.parametrize("seed", range(12))
@async_test
async def test_h2_client_valid_conversations(seed: int) -> None:
    rng = random.Random(seed)
    streams, slow, unary = Streams(), Streams(_later), Streams()
    async with serving(_routes(streams, slow, unary)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        conn = _client(rng)
        writer.write(conn.data_to_send())
        # Take the server's SETTINGS and window first: our sends need its windows.
        for event in conn.receive_data(await reader.read(65_536)):
            assert not isinstance(event, h2.events.ConnectionTerminated)
        by_sid = _send_plan(conn, rng, _plan(rng))
        writer.write(conn.data_to_send())
        bodies: dict[int, bytearray] = {sid: bytearray() for sid in by_sid}
        statuses: dict[int, int] = {}
        open_sids = {sid for sid, (_p, _m, reset) in by_sid.items() if not reset}
        while open_sids:
            data = await asyncio.wait_for(reader.read(65_536), READ_TIMEOUT)
            assert data, "server closed the connection"
            for event in conn.receive_data(data):
                assert not isinstance(event, h2.events.ConnectionTerminated), event
                if isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    headers = dict(event.headers)
                    if b"grpc-status" in headers:
                        statuses[event.stream_id] = int(headers[b"grpc-status"])
                elif isinstance(event, h2.events.StreamEnded):
                    open_sids.discard(event.stream_id)
                elif isinstance(event, h2.events.StreamReset) and event.stream_id in open_sids:
                    raise AssertionError(f"stream {event.stream_id} reset: {event.error_code}")
            writer.write(conn.data_to_send())
        writer.close()
        for seen in streams.all + slow.all + unary.all:
            await seen.ended.wait()
    for sid, (path, messages, reset) in by_sid.items():
        if reset:
            continue
        if path == "/not/routed":
            assert statuses[sid] == Status.UNIMPLEMENTED
            continue
        assert statuses[sid] == Status.OK, (path, statuses[sid])
        assert bytes(bodies[sid]) == b"".join(grpc_message(m) for m in messages)
    for seen in streams.all + slow.all + unary.all:
        assert len(seen.ends) == 1


def _corrupt(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    preface = len(fr.PREFACE)
    for _ in range(rng.randrange(1, 6)):
        kind = rng.random()
        pos = rng.randrange(preface, max(preface + 1, len(out)))
        if kind < 0.4 and len(out) > preface:
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif kind < 0.8:
            length = rng.choice([0, 1, 4, 5, 8, 9, 100])
            sid = rng.choice([0, 1, 2, 3, 5, 99, 2**31 - 1])
            frame = fr.frame(rng.randrange(0, 12), rng.randrange(256), sid, rng.randbytes(length))
            out[pos:pos] = frame
        elif kind < 0.9:
            del out[pos:]
        else:
            out[pos:pos] = out[preface:pos][-rng.randrange(1, 200) :]
    return bytes(out)


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes; a reset (it closed with our bytes unread) counts."""
    got = bytearray()
    try:
        while chunk := await reader.read(65_536):
            got += chunk
    except ConnectionResetError:
        pass
    return bytes(got)


def _frames(data: bytes) -> list[Frame]:
    frames, pos = [], 0
    while len(data) - pos >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[pos : pos + 9]))
        if pos + 9 + length > len(data):
            break
        frame.parse_body(memoryview(data[pos + 9 : pos + 9 + length]))
        frames.append(frame)
        pos += 9 + length
    return frames


@pytest.mark.parametrize("seed", range(6))
@async_test
async def test_h2_client_hostile_bytes_never_crash_or_hang(
    seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="extproc.dataplane.h2grpc")
    rng = random.Random(1000 + seed)
    streams, slow, unary = Streams(), Streams(_later), Streams()
    async with serving(_routes(streams, slow, unary)) as server:
        goaway_codes = []
        for _ in range(25):
            conn = _client(rng)
            conn.receive_data(fr.settings(SERVER_SETTINGS))  # as if the server had spoken
            conn.receive_data(fr.window_update(0, 1 << 24))
            _send_plan(conn, rng, _plan(rng))
            hostile = _corrupt(rng, conn.data_to_send())
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(hostile)
            writer.write_eof()
            answer = await asyncio.wait_for(_read_all(reader), READ_TIMEOUT)  # no hang
            writer.close()
            frames = _frames(answer)  # well-formed, or hyperframe raises
            goaway_codes += [f.error_code for f in frames if isinstance(f, GoAwayFrame)]
        for seen in streams.all + slow.all + unary.all:
            await seen.ended.wait()
        assert server.active_streams == 0
        # Still serving: a clean conversation on a fresh connection.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        conn = _client(rng)
        writer.write(conn.data_to_send())
        conn.receive_data(await reader.read(65_536))
        conn.send_headers(1, _request(ECHO))
        conn.send_data(1, grpc_message(b"after the storm"), end_stream=True)
        writer.write(conn.data_to_send())
        body = b""
        while True:
            events = conn.receive_data(await asyncio.wait_for(reader.read(65_536), READ_TIMEOUT))
            for event in events:
                if isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
            if any(isinstance(e, h2.events.StreamEnded) for e in events):
                break
            writer.write(conn.data_to_send())
        writer.close()
    assert body == grpc_message(b"after the storm")
    assert all(code in fr.ErrorCode.__members__.values() for code in goaway_codes)
    assert goaway_codes, "no corruption was ever detected: the fuzzer is not reaching the parser"
    for seen in streams.all + slow.all + unary.all:
        assert len(seen.ends) == 1
    internal = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not internal, [r.getMessage() for r in internal]
