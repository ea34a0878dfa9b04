"""Server CPU per gRPC message: grpcio's aio server, grpclib and `extproc.dataplane.h2grpc`.

Why: the sidecar's budget is about 1 ms added per HTTP request and grpcio alone costs more
than that. This measures only the gRPC server's process (user + system CPU from /proc),
so the load generator and Envoy sharing the two cores do not count against it.

Two drivers:
  envoy (default)  the real Envoy (a minimal config with the sidecar's processing modes:
                   headers SEND, bodies BUFFERED), ext_proc pointed at the server under
                   test, the simulator upstream, a lean HTTP/1.1 load generator; each
                   HTTP request is one ext_proc stream of 4 messages.
  grpc             a grpcio client, each RPC a bidi stream of 4 small messages answered
                   one at a time (Envoy's pattern), without Envoy.

    .venv/bin/python bench/bench_h2grpc.py [--driver envoy|grpc] [--requests N]
        [--impl all|ours|grpcio|grpclib]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loadgen import CHAT_REQUEST, build_request, run_closed_loop  # noqa: E402
from extproc.devstack.stack import Child, envoy_binary, free_port  # noqa: E402

MESSAGES_PER_CALL = 4
ECHO_PATH = "/bench.Echo/Chat"
EXT_PROC_PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
CHAT_BODY = json.dumps(CHAT_REQUEST).encode()


# -- the servers under test (run in a child process) ----------------------------------


def ext_proc_reply(data: bytes) -> bytes:
    """The empty ProcessingResponse matching a ProcessingRequest: what both servers do."""
    request = pb.ProcessingRequest.FromString(data)
    kind = request.WhichOneof("request")
    if kind in ("request_headers", "response_headers"):
        response = pb.ProcessingResponse(**{kind: pb.HeadersResponse()})
    elif kind in ("request_body", "response_body"):
        response = pb.ProcessingResponse(**{kind: pb.BodyResponse()})
    else:
        response = pb.ProcessingResponse(**{kind: pb.TrailersResponse()})
    return response.SerializeToString()


class _Counter:
    messages = 0


class _OursEcho:
    __slots__ = ()

    def on_message(self, data: bytes) -> bytes:
        _Counter.messages += 1
        return data

    def on_end(self, cancelled: bool) -> None:
        pass


class _OursExtProc:
    __slots__ = ()

    def on_message(self, data: bytes) -> bytes:
        _Counter.messages += 1
        return ext_proc_reply(data)

    def on_end(self, cancelled: bool) -> None:
        pass


async def _serve_ours(listen: str, stop: asyncio.Event) -> None:
    from extproc.dataplane.h2grpc import GrpcServer, Route

    server = GrpcServer({ECHO_PATH: Route(_OursEcho), EXT_PROC_PATH: Route(_OursExtProc)})
    await server.start(listen)
    print("ready", flush=True)
    await stop.wait()
    await server.close(0)


async def _serve_grpcio(listen: str, stop: asyncio.Event) -> None:
    import grpc

    async def echo(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
        async for message in requests:
            _Counter.messages += 1
            yield message

    async def ext_proc(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
        async for message in requests:
            _Counter.messages += 1
            yield ext_proc_reply(message)

    def service(path: str, handler: object) -> grpc.GenericRpcHandler:
        name, method = path.strip("/").split("/")
        return grpc.method_handlers_generic_handler(
            name, {method: grpc.stream_stream_rpc_method_handler(handler)}
        )

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((service(ECHO_PATH, echo), service(EXT_PROC_PATH, ext_proc)))
    server.add_insecure_port(listen)
    await server.start()
    print("ready", flush=True)
    await stop.wait()
    await server.stop(0)


async def _serve_grpclib(listen: str, stop: asyncio.Event) -> None:
    """grpclib: pure-Python HTTP/2 (the `h2` package) and gRPC, the other asyncio option."""
    from grpclib.const import Cardinality, Handler
    from grpclib.encoding.base import CodecBase
    from grpclib.server import Server, Stream

    class RawCodec(CodecBase):
        """Bytes in, bytes out: neither server under test parses protobuf in the echo case."""

        __content_subtype__ = "proto"

        def encode(self, message: Any, message_type: Any) -> bytes:
            return message

        def decode(self, data: bytes, message_type: Any) -> Any:
            return data

    async def echo(stream: Stream[bytes, bytes]) -> None:
        async for message in stream:
            _Counter.messages += 1
            await stream.send_message(message)

    async def ext_proc(stream: Stream[bytes, bytes]) -> None:
        async for message in stream:
            _Counter.messages += 1
            await stream.send_message(ext_proc_reply(message))

    class Service:
        def __mapping__(self) -> dict[str, Handler]:
            bidi = Cardinality.STREAM_STREAM
            return {
                ECHO_PATH: Handler(echo, bidi, bytes, bytes),
                EXT_PROC_PATH: Handler(ext_proc, bidi, bytes, bytes),
            }

    host, port = listen.rsplit(":", 1)
    server = Server([Service()], codec=RawCodec())
    await server.start(host, int(port))
    print("ready", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


_SERVERS = {"ours": _serve_ours, "grpcio": _serve_grpcio, "grpclib": _serve_grpclib}


def serve(impl: str, listen: str, loop_kind: str) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await _SERVERS[impl](listen, stop)
        print(f"messages {_Counter.messages}", flush=True)

    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


# -- drivers (in this process) --------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive_grpc(port: int, calls: int, concurrency: int) -> None:
    import grpc

    payload = b"x" * 300
    remaining = calls
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = channel.stream_stream(ECHO_PATH)

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                call = method()
                for _ in range(MESSAGES_PER_CALL):
                    await call.write(payload)
                    assert await call.read() == payload
                await call.done_writing()
                assert await call.read() is grpc.aio.EOF

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def envoy_config(listen: int, admin: int, grpc_port: int, upstream_port: int) -> dict[str, Any]:
    """A minimal Envoy: one listener, ext_proc with the sidecar's processing modes, a router."""

    def address(port: int) -> dict[str, Any]:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    def cluster(name: str, port: int, **extra: Any) -> dict[str, Any]:
        endpoints = [{"lb_endpoints": [{"endpoint": {"address": address(port)}}]}]
        load_assignment = {"cluster_name": name, "endpoints": endpoints}
        return {"name": name, "type": "STATIC", "load_assignment": load_assignment, **extra}

    types = "type.googleapis.com/envoy.extensions"
    ext_proc = {
        "@type": f"{types}.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "extproc"}, "timeout": "0s"},
        "message_timeout": "5s",
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": "BUFFERED",
            "response_header_mode": "SEND",
            "response_body_mode": "BUFFERED",
        },
    }
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]
    hcm = {
        "@type": f"{types}.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": [
            {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": f"{types}.filters.http.router.v3.Router"},
            },
        ],
    }
    h2 = {
        "@type": f"{types}.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
    network_filter = {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
    return {
        "admin": {"address": address(admin)},
        "static_resources": {
            "listeners": [
                {
                    "name": "http",
                    "address": address(listen),
                    "filter_chains": [{"filters": [network_filter]}],
                }
            ],
            "clusters": [
                cluster(
                    "extproc",
                    grpc_port,
                    typed_extension_protocol_options={
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": h2
                    },
                ),
                cluster("upstream", upstream_port),
            ],
        },
    }


@contextlib.contextmanager
def envoy_in_front(sidecar_port: int, tmp: Path) -> Iterator[int]:
    sim_port, listen, admin = free_port(), free_port(), free_port()
    sim = Child("simulator", [sys.executable, "-m", "extproc.simulator", "--port", str(sim_port)])
    envoy: Child | None = None
    try:
        sim.wait_for_line("listening")
        path = tmp / "envoy.yaml"
        path.write_text(json.dumps(envoy_config(listen, admin, sidecar_port, sim_port)))
        argv = [envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart"]
        envoy = Child("envoy", [*argv, "--log-level", "warning"])
        wait_ready(admin, envoy)
        yield listen
    finally:
        if envoy is not None:
            envoy.stop()
        sim.stop()


def wait_ready(admin: int, envoy: Child, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        url = f"http://127.0.0.1:{admin}/ready"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                return
        if envoy.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"envoy not ready:\n{envoy.output()}")
        time.sleep(0.05)  # polling a readiness probe


def measure(impl: str, args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    argv = [sys.executable, __file__, "--serve", impl, "--port", str(port), "--loop", args.loop]
    server = Child(f"server-{impl}", argv)
    try:
        server.wait_for_line("ready")
        with tempfile.TemporaryDirectory() as tmp:
            if args.driver == "envoy":
                with envoy_in_front(port, Path(tmp)) as listen:
                    req = build_request(
                        "127.0.0.1", listen, "/v1/chat/completions", CHAT_BODY, "sk-bench"
                    )
                    asyncio.run(run_closed_loop("127.0.0.1", listen, req, 200, args.concurrency))
                    before = cpu_seconds(server.proc.pid)
                    t0 = time.perf_counter()
                    latencies, _wall = asyncio.run(
                        run_closed_loop("127.0.0.1", listen, req, args.requests, args.concurrency)
                    )
                    wall = time.perf_counter() - t0
                    cpu = cpu_seconds(server.proc.pid) - before
            else:
                asyncio.run(drive_grpc(port, 200, args.concurrency))
                before = cpu_seconds(server.proc.pid)
                t0 = time.perf_counter()
                asyncio.run(drive_grpc(port, args.requests, args.concurrency))
                wall = time.perf_counter() - t0
                cpu = cpu_seconds(server.proc.pid) - before
                latencies = []
    finally:
        server.stop()
    line = next((ln for ln in server.lines if ln.startswith("messages ")), "messages 0")
    total_messages = int(line.split()[1])
    expected = (args.requests + 200) * MESSAGES_PER_CALL
    result = {
        "cpu_us_per_message": cpu / (args.requests * MESSAGES_PER_CALL) * 1e6,
        "cpu_us_per_call": cpu / args.requests * 1e6,
        "calls_per_s": args.requests / wall,
        "messages_seen": total_messages,
        "messages_expected": expected,
    }
    if latencies:
        latencies.sort()
        result["p50_ms"] = latencies[len(latencies) // 2] * 1e3
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--driver", choices=("envoy", "grpc"), default="envoy")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--impl", choices=("all", *_SERVERS), default="all")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--serve", choices=tuple(_SERVERS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, f"127.0.0.1:{args.port}", args.loop)
        return 0
    impls = ("grpcio", "grpclib", "ours") if args.impl == "all" else (args.impl,)
    for impl in impls:
        result = measure(impl, args)
        figures = "  ".join(
            f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
        )
        print(f"{impl:8s} driver={args.driver} loop={args.loop}  {figures}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
