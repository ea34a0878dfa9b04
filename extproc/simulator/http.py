"""A minimal HTTP/1.1 server on asyncio streams, owned by the simulator.

The simulator is the upstream in a latency benchmark, so it must cost little CPU
per request, and its fault injection needs control no framework offers: writing
half a body or cutting a chunked stream before its last chunk. Both argue for a
few hundred lines of our own over a dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

_MAX_HEAD = 1 << 20
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class BadRequest(Exception):
    """The bytes on the wire are not an HTTP/1.1 request we can answer."""


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    received_at: float = field(default_factory=time.perf_counter)
    # The TLS server name (SNI) the client asked for; None over plain HTTP or without SNI.
    server_name: str | None = None


class Responder:
    """Writes one response; lets the handler finish it cleanly or cut it off."""

    __slots__ = ("_writer", "closed", "keep_alive", "started")

    def __init__(self, writer: asyncio.StreamWriter, keep_alive: bool) -> None:
        self._writer = writer
        self.keep_alive = keep_alive
        self.started = False
        self.closed = False

    @property
    def disconnected(self) -> bool:
        return self._writer.is_closing()

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
        lines.extend(f"{k}: {v}" for k, v in headers)
        if not self.keep_alive:
            lines.append("connection: close")
        lines.append("\r\n")
        self.started = True
        return "\r\n".join(lines).encode("latin-1")

    async def send(
        self, status: int, headers: list[tuple[str, str]], body: bytes, *, truncate_at: int = -1
    ) -> None:
        """Send a Content-Length response; with truncate_at >= 0, stop there and close."""
        head = self._head(status, [*headers, ("content-length", str(len(body)))])
        if truncate_at < 0:
            self._writer.write(head + body)
            await self._drain()
            return
        self._writer.write(head + body[:truncate_at])
        await self.cut()

    async def start_chunked(self, status: int, headers: list[tuple[str, str]]) -> None:
        self._writer.write(self._head(status, [*headers, ("transfer-encoding", "chunked")]))
        await self._drain()

    async def send_chunk(self, data: bytes) -> None:
        if data:
            self._writer.write(b"%x\r\n%b\r\n" % (len(data), data))
            await self._drain()

    async def end_chunked(self) -> None:
        self._writer.write(b"0\r\n\r\n")
        await self._drain()

    async def cut(self) -> None:
        """Flush what was written, then close the connection mid-message."""
        self.closed = True
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError:
            self.closed = True


Handler = Callable[[Request, Responder], Awaitable[None]]


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str], bool]:
    try:
        text = head.decode("latin-1")
        request_line, *header_lines = text[:-4].split("\r\n")
        method, target, version = request_line.split(" ")
    except ValueError as exc:
        raise BadRequest("malformed request line") from exc
    if not version.startswith("HTTP/1."):
        raise BadRequest("unsupported HTTP version")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest("malformed header line")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    path, _, query = target.partition("?")
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    return method, path, query, headers, keep_alive


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise BadRequest("malformed chunk size") from exc
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise BadRequest("malformed chunk terminator")


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader)
    length = headers.get("content-length")
    if not length:
        return b""
    try:
        size = int(length)
    except ValueError as exc:
        raise BadRequest("malformed content-length") from exc
    return await reader.readexactly(size) if size > 0 else b""


def _server_name(writer: asyncio.StreamWriter) -> str | None:
    tls = writer.get_extra_info("ssl_object")
    return getattr(tls, "requested_server_name", None) if tls is not None else None


async def _serve_connection(
    handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    server_name = _server_name(writer)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            method, path, query, headers, keep_alive = _parse_head(head)
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await _read_body(reader, headers)
            responder = Responder(writer, keep_alive)
            request = Request(method, path, query, headers, body, server_name=server_name)
            await handler(request, responder)
            if responder.closed or not keep_alive:
                break
    except BadRequest:
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def tls_context(cert: str, key: str, server_name: str | None = None) -> ssl.SSLContext:
    """A server TLS context; with `server_name`, handshakes asking for another name fail.

    A real provider serves its certificate only for its own name. Refusing any other SNI
    (or none) is how a test proves the gateway sends the provider's name, not an address.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)

    def remember(tls: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> int | None:
        tls.requested_server_name = name  # type: ignore[attr-defined]
        if server_name is not None and name != server_name:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None

    context.sni_callback = remember  # type: ignore[assignment]
    return context


class HttpServer:
    """Accepts connections and tracks them so close() can end keep-alive sessions."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self._handler = handler
        self._tls = tls
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        # A deep accept queue, like the provider's: Envoy opens an upstream connection per
        # streamed call, thousands at once in the memory bench, and asyncio's default of 100
        # dropped SYNs until Envoy's connect timeout failed some of them.
        self._server = await asyncio.start_server(
            self._accept, host, port, limit=_MAX_HEAD, ssl=self._tls, backlog=4096
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await _serve_connection(self._handler, reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
        finally:
            self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
