"""A lean HTTP/1.1 load generator: closed loops, and many long streams held open.

A general-purpose client (httpx, the openai SDK) would spend more CPU per request than
the sidecar we are measuring, on the same two cores. This one pre-builds the request
bytes, keeps connections alive and parses only what it must: the status line and
Content-Length, or the chunked framing Envoy uses for a server-sent event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

# The request every bench sends: a small chat completion, whole (JSON) or streamed (SSE,
# with the usage chunk the sidecar meters). One definition, so all figures are comparable.
_MESSAGES = [{"role": "user", "content": "Fix the lint error in utils.py line 3."}]
CHAT_REQUEST: dict[str, Any] = {
    "model": "gpt-5-mini",
    "messages": _MESSAGES,
    "max_completion_tokens": 16,
}
SSE_REQUEST: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": _MESSAGES,
    "stream": True,
    "stream_options": {"include_usage": True},
}
SSE_OUTPUT_TOKENS = 46
"""Role, 46 deltas, finish, usage and [DONE]: 50 events."""


def build_request(
    host: str,
    port: int,
    path: str,
    body: bytes,
    key: str,
    headers: dict[str, str] | None = None,
) -> bytes:
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nAuthorization: Bearer {key}\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_head(reader: asyncio.StreamReader) -> tuple[int, int | None]:
    """(status, content-length or None for a chunked body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length: int | None = None
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, length


async def read_body(reader: asyncio.StreamReader, length: int | None) -> int:
    """Consume one body; returns its size. Chunked: until the zero-size chunk."""
    if length is not None:
        if length:
            await reader.readexactly(length)
        return length
    total = 0
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers: the blank line
            return total
        await reader.readexactly(size + 2)
        total += size


async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> int:
    writer.write(req)
    status, length = await read_head(reader)
    await read_body(reader, length)
    return status


async def run_closed_loop(
    host: str, port: int, request: bytes, requests: int, concurrency: int
) -> tuple[list[float], float]:
    """Send `requests` requests over `concurrency` connections; (latencies, wall seconds).

    Latency is to the last byte of the response, so for a stream it covers every event.
    """
    latencies: list[float] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                status = await one(reader, writer, request)
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(f"status {status} from port {port}")
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start


@contextlib.asynccontextmanager
async def streams_held_open(
    host: str, port: int, request: bytes, count: int, timeout: float = 120.0
) -> AsyncIterator[list[asyncio.Task[int]]]:
    """Open `count` streams and yield once every one has its response headers (all open).

    On exit the streams are read to their end; each task's result is its status.
    """
    opened = asyncio.Semaphore(0)

    async def stream() -> int:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request)
            status, length = await read_head(reader)
            opened.release()
            await read_body(reader, length)
            return status
        finally:
            writer.close()

    tasks = [asyncio.create_task(stream()) for _ in range(count)]
    try:
        async with asyncio.timeout(timeout):
            for _ in range(count):
                await opened.acquire()
        yield tasks
        await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
