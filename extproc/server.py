"""The gRPC side: Envoy's ExternalProcessor service, health, and orderly shutdown.

The stream handler only orchestrates: it routes each ext_proc message to the request's
`Exchange` and sends back what that returns. On SIGTERM the health service turns
NOT_SERVING first (so Envoy and Kubernetes stop sending new streams), in-flight
streams get `grace_seconds` to finish, and the ledger is drained before exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import redis.asyncio as aioredis
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from extproc import envoy_msgs as msgs
from extproc.exchange import Deps, Exchange
from extproc.ledger import Ledger
from extproc.prices import PriceTable
from extproc.settings import Settings
from extproc.tokens import count_text

log = logging.getLogger("extproc.server")

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


class ExternalProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):
    def __init__(self, deps: Deps) -> None:
        self._deps = deps

    async def Process(
        self,
        request_iterator: AsyncIterator[msgs.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[msgs.ProcessingResponse]:
        exchange = Exchange(self._deps)
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("request")
                if kind == "request_headers":
                    yield exchange.on_request_headers(request.request_headers)
                elif kind == "request_body":
                    yield await exchange.on_request_body(request.request_body)
                elif kind == "response_headers":
                    yield exchange.on_response_headers(request.response_headers)
                elif kind == "response_body":
                    yield exchange.on_response_body(request.response_body)
                elif kind == "request_trailers":
                    yield msgs.ProcessingResponse(request_trailers=msgs.pb.TrailersResponse())
                elif kind == "response_trailers":
                    yield msgs.ProcessingResponse(response_trailers=msgs.pb.TrailersResponse())
        finally:
            exchange.close()


def build_deps(settings: Settings, client: aioredis.Redis) -> Deps:
    prices = PriceTable.load(settings.prices or None)
    ledger = Ledger(client, max_records=settings.ledger_max_records, spool_dir=settings.spool_dir)
    return Deps(
        settings=settings,
        prices=prices,
        count=count_text,
        ledger=ledger,
        executor=ThreadPoolExecutor(max_workers=2, thread_name_prefix="extproc-count"),
    )


def _grpc_options(settings: Settings) -> list[tuple[str, int]]:
    # Envoy sends a buffered body as one gRPC message; gRPC's default 4 MiB cap would
    # reject real Codex requests before our own limit could answer them properly.
    limit = settings.max_body_bytes * 2 + (1 << 20)
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),
    ]


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run the sidecar until SIGTERM/SIGINT (or `stop` is set)."""
    client = aioredis.from_url(settings.redis_url, socket_connect_timeout=1.0, socket_timeout=2.0)
    deps = build_deps(settings, client)
    count_text("warm up the tokenizer", "gpt-5")
    count_text("warm up the tokenizer", "gpt-3.5-turbo")
    await deps.ledger.start()

    server = grpc.aio.server(options=_grpc_options(settings))
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
        ExternalProcessor(deps), server
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(settings.listen)
    if port == 0 and not settings.listen.startswith("unix:"):
        raise OSError(f"cannot listen on {settings.listen}")
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    await health.set("", serving)
    await health.set(SERVICE_NAME, serving)
    log.info("extproc listening on %s", settings.listen)
    print(f"extproc listening on {settings.listen}", flush=True)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("shutting down: draining in-flight streams for up to %ss", settings.grace_seconds)
    await health.enter_graceful_shutdown()
    await server.stop(settings.grace_seconds)
    await deps.ledger.close()
    await client.aclose()
    deps.executor.shutdown(wait=False)
