"""h2grpc behind the real Envoy: the ext_proc filter's gRPC client drives all four phases."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_pb
from h2grpc_support import EXT_PROC, async_test, serving

from extproc.dataplane.h2grpc import Route
from extproc.devstack.stack import envoy_binary, free_port
from extproc.simulator import Simulator

# -- the real Envoy -----------------------------------------------------------------------


def envoy_config(
    listen: int, admin: int, grpc_port: int, upstream_port: int, *, graceful_close: bool
) -> dict[str, Any]:
    def cluster(name: str, port: int, **extra: Any) -> dict[str, Any]:
        endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}
        return {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
            },
            **extra,
        }

    h2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    ext_proc = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "extproc"}, "timeout": "0s"},
        "failure_mode_allow": False,
        "message_timeout": "5s",
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": "BUFFERED",
            "response_header_mode": "SEND",
            "response_body_mode": "STREAMED",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": "test",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                }
            ]
        },
        "http_filters": [
            {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    runtime = {"envoy.reloadable_features.ext_proc_graceful_grpc_close": graceful_close}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": runtime}]},
        "static_resources": {
            "listeners": [
                {
                    "name": "http",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                cluster("extproc", grpc_port, typed_extension_protocol_options=h2),
                cluster("upstream", upstream_port),
            ],
        },
    }


class ExtProcStream:
    """Answers every ext_proc phase with an empty 'continue' and records the phases."""

    def __init__(self, log: list[ExtProcStream]) -> None:
        self.phases: list[str] = []
        self.ends: list[bool] = []
        self.ended = asyncio.Event()
        log.append(self)

    def on_message(self, data: bytes) -> bytes:
        request = ext_pb.ProcessingRequest.FromString(data)
        phase = request.WhichOneof("request")
        assert phase is not None
        self.phases.append(phase)
        if phase.endswith("headers"):
            reply = ext_pb.ProcessingResponse(**{phase: ext_pb.HeadersResponse()})
        elif phase.endswith("body"):
            reply = ext_pb.ProcessingResponse(**{phase: ext_pb.BodyResponse()})
        else:
            reply = ext_pb.ProcessingResponse(**{phase: ext_pb.TrailersResponse()})
        return reply.SerializeToString()

    def on_end(self, cancelled: bool) -> None:
        self.ends.append(cancelled)
        self.ended.set()


async def wait_envoy_ready(admin: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient() as http:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"envoy exited:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"http://127.0.0.1:{admin}/ready")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"envoy not ready:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.05)  # polling a readiness probe, not synchronising on time


@pytest.mark.parametrize("graceful_close", [False, True], ids=["reset", "graceful-close"])
@async_test
async def test_envoy_ext_proc_sees_all_four_phases(tmp_path: Path, graceful_close: bool) -> None:
    """By default Envoy ends every ext_proc stream with RST_STREAM when the HTTP request is
    done (so on_end says cancelled); with its graceful-close runtime guard it half-closes
    and waits for our trailers instead."""
    seen: list[ExtProcStream] = []
    routes = {EXT_PROC: Route(lambda: ExtProcStream(seen))}
    async with serving(routes) as server, Simulator() as simulator:
        listen, admin = free_port(), free_port()
        config = tmp_path / "envoy.yaml"
        config.write_text(
            json.dumps(
                envoy_config(
                    listen, admin, server.port, simulator.port, graceful_close=graceful_close
                )
            )
        )
        log = tmp_path / "envoy.log"
        argv = [envoy_binary(), "-c", str(config), "--concurrency", "1", "--disable-hot-restart"]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*argv, "--log-level", os.environ.get("ENVOY_LOG", "warning")],
                stdout=out,
                stderr=out,
            )
        try:
            await wait_envoy_ready(admin, proc, log)
            body = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}
            url = f"http://127.0.0.1:{listen}/v1/chat/completions"
            async with httpx.AsyncClient(timeout=10) as http:
                plain = await http.post(url, json=body)
                streamed = await http.post(url, json={**body, "stream": True})
            for stream in seen:
                await stream.ended.wait()
        finally:
            proc.terminate()
            proc.wait(10)
    assert plain.status_code == 200, plain.text
    assert plain.json()["object"] == "chat.completion"
    assert streamed.status_code == 200
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert len(seen) == 2
    for stream in seen:
        assert stream.phases[:3] == ["request_headers", "request_body", "response_headers"]
        assert set(stream.phases[3:]) == {"response_body"}
        assert stream.ends == [not graceful_close]
