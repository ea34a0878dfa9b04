"""The simulator as an object tests start in-process, and as a command for `make run`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl

from extproc.simulator.app import App, SeenRequest
from extproc.simulator.http import HttpServer, tls_context


class Simulator:
    """A fake OpenAI upstream bound to host:port (port 0 picks a free one); HTTPS with `tls`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_seen: int = 10_000,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.requests_seen: list[SeenRequest] = []
        self._scheme = "https" if tls else "http"
        self._app = App(self.requests_seen, max_seen)
        self._server = HttpServer(self._app.handle, tls)

    @property
    def base_url(self) -> str:
        return f"{self._scheme}://{self.host}:{self.port}/v1"

    async def start(self) -> None:
        self.port = await self._server.start(self.host, self.port)

    async def close(self) -> None:
        await self._server.close()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _serve(host: str, port: int, tls: ssl.SSLContext | None) -> None:
    simulator = Simulator(host, port, max_seen=256, tls=tls)
    await simulator.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"simulator listening on {simulator.base_url.removesuffix('/v1')}", flush=True)
    try:
        await stop.wait()
    finally:
        await simulator.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extproc.simulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    parser.add_argument(
        "--tls-server-name", help="refuse TLS handshakes whose SNI is not this name"
    )
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    tls = tls_context(args.tls_cert, args.tls_key, args.tls_server_name) if args.tls_cert else None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, tls))
    return 0
