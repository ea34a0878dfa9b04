"""A lean closed-loop HTTP/1.1 load generator.

A general-purpose client (httpx, the openai SDK) would spend more CPU per request than
the sidecar we are measuring, on the same two cores. This one pre-builds the request
bytes, keeps connections alive and parses only the status line and Content-Length.
"""

from __future__ import annotations

import asyncio
import time


def _request(host: str, port: int, path: str, body: bytes, key: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> int:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def run_closed_loop(
    host: str,
    port: int,
    path: str,
    body: bytes,
    requests: int,
    concurrency: int,
    key: str = "sk-bench",
) -> tuple[list[float], float]:
    """Send `requests` requests over `concurrency` connections; (latencies, wall seconds)."""
    req = _request(host, port, path, body, key)
    latencies: list[float] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                status = await _one(reader, writer, req)
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(f"status {status} from port {port}")
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start
