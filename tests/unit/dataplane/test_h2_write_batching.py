"""h2 transport: writes issued in one event-loop iteration leave in one socket write.

Under load the sidecar's replies that waited on Redis come from many tasks the loop runs
back to back; a send() each was the largest self-time item of the sidecar's profile.
These tests pin the batching with a transport that records writes.
"""

from __future__ import annotations

import asyncio

from extproc.dataplane.h2grpc.http2 import H2Connection


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


async def _next_iteration() -> None:
    """Resume after every callback the loop already holds (one full turn), not by timing."""
    turned = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(turned.set_result, None)
    await turned


def test_h2_writes_outside_a_read_share_one_send() -> None:
    async def scenario() -> tuple[list[bytes], list[bytes]]:
        conn = H2Connection(set(), lambda: None)
        transport = RecordingTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        transport.writes.clear()  # our SETTINGS
        conn._write(b"reply-1")
        conn._write(b"reply-2")
        before = list(transport.writes)
        await _next_iteration()
        conn._write(b"reply-3")
        await _next_iteration()
        return before, transport.writes

    before, after = asyncio.run(scenario())
    assert before == []
    assert after == [b"reply-1reply-2", b"reply-3"]


def test_h2_close_flushes_what_is_queued() -> None:
    async def scenario() -> list[bytes]:
        conn = H2Connection(set(), lambda: None)
        transport = RecordingTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        transport.writes.clear()
        conn._write(b"last words")
        conn.goaway()  # no streams open: closes at once
        await _next_iteration()
        return transport.writes

    writes = asyncio.run(scenario())
    assert len(writes) == 1 and writes[0].startswith(b"last words")
