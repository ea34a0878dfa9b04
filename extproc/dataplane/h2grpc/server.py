"""The listening side: accepts h2c connections and shuts them down in order.

Shutdown follows what Envoy expects from a draining upstream: GOAWAY tells it which
streams we will still serve (so it retries later ones elsewhere), those streams get the
grace period, and whatever is left is cancelled so every handler still hears `on_end`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from extproc.dataplane.h2grpc.api import Route
from extproc.dataplane.h2grpc.http2 import H2Connection
from extproc.dataplane.h2grpc.rpc import GrpcConnection


def parse_listen(listen: str) -> tuple[str | None, int]:
    """Split 'host:port', '[v6]:port' or ':port' (all interfaces) into (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address must be host:port or unix:/path, got {listen!r}")
    host = host.removeprefix("[").removesuffix("]")
    return host or None, int(port)


def unix_path(listen: str) -> str:
    path = listen.removeprefix("unix:")
    return path[2:] if path.startswith("//") else path


class GrpcServer:
    """Routes by exact `:path`; paths not in `routes` answer UNIMPLEMENTED.

    `port` is the bound port of the first listening socket (0 for a unix socket), so
    with port 0 give a numeric host rather than a name that resolves to several addresses.
    `start` may be called again to listen on more addresses (a worker's own port beside the
    shared one, see `dataplane.workers`); they serve the same routes and close together.
    """

    def __init__(self, routes: dict[str, Route], *, max_message_bytes: int = 64 << 20) -> None:
        self._routes = {path.encode(): route for path, route in routes.items()}
        self.max_message_bytes = max_message_bytes
        self.port = 0
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[H2Connection] = set()
        self._drained: asyncio.Event | None = None

    @property
    def active_streams(self) -> int:
        return sum(conn.stream_count for conn in self._connections)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def _connection(self) -> GrpcConnection:
        return GrpcConnection(
            self._routes, self.max_message_bytes, self._connections, self._stream_closed
        )

    def _stream_closed(self) -> None:
        if self._drained is not None and self.active_streams == 0:
            self._drained.set()

    async def start(self, listen: str, *, reuse_port: bool = False) -> None:
        """Listen on `listen`; `reuse_port` joins other processes bound with SO_REUSEPORT."""
        loop = asyncio.get_running_loop()
        if listen.startswith("unix:"):
            server = await loop.create_unix_server(self._connection, unix_path(listen))
            port = 0
        else:
            host, port = parse_listen(listen)
            server = await loop.create_server(
                self._connection, host, port, reuse_address=True, reuse_port=reuse_port or None
            )
            # A list under uvloop, a tuple under asyncio (typed tuple: compiled code checks).
            untyped: Any = server
            port = untyped.sockets[0].getsockname()[1]
        if not self._servers:
            self.port = port
        self._servers.append(server)

    async def close(self, grace: float) -> None:
        """Stop accepting, GOAWAY every connection, wait up to `grace` s, cancel the rest."""
        for server in self._servers:
            server.close()
        self._drained = asyncio.Event()
        for conn in list(self._connections):
            conn.goaway()
        if self.active_streams:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace)
        for conn in list(self._connections):
            conn.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
