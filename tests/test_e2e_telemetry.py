"""End to end: a request through Envoy becomes an OTLP span in the caller's trace, and
its tokens reach a real Prometheus through the sidecar's scrape endpoint.

The sidecar exports over OTLP/HTTP (protobuf), and in a second stack over OTLP/gRPC, to a
receiver in this process that decodes what arrives with the official OTLP protobuf types;
Prometheus is Debian's `prometheus` binary scraping the sidecar every second.
"""

from __future__ import annotations

import gzip
import json
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan

from extproc.devstack.stack import Child, Stack, free_port, temporary_stack

UPSTREAM_KEY = "sk-upstream-telemetry"
POLICY = """
version: 1
timezone: UTC
workspaces:
  dev:
    budget_usd: 1000
    upstream: {key_env: TEST_UPSTREAM_DEV}
    teams:
      platform: {}
    services:
      cli: {team: platform}
      prom: {}
"""
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "trace me please"}]}
WAIT_S = 20.0


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs if isinstance(kv, KeyValue)}


@dataclass
class ReceivedSpan:
    resource: dict[str, Any]
    scope: str
    span: OtlpSpan

    @property
    def attributes(self) -> dict[str, Any]:
        return _attrs(self.span.attributes)


@dataclass
class OtlpReceiver:
    """An OTLP/HTTP endpoint: /v1/traces and /v1/metrics, protobuf, gzip or not."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    metric_names: set[str] = field(default_factory=set)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> int:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    receiver.add_traces(ExportTraceServiceRequest.FromString(body))
                    reply = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    receiver.add_metrics(ExportMetricsServiceRequest.FromString(body))
                    reply = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.server.server_address[1]

    def add_traces(self, req: ExportTraceServiceRequest) -> None:
        with self.arrived:
            for rs in req.resource_spans:
                resource = _attrs(rs.resource.attributes)
                for ss in rs.scope_spans:
                    self.spans.extend(ReceivedSpan(resource, ss.scope.name, s) for s in ss.spans)
            self.arrived.notify_all()

    def add_metrics(self, req: ExportMetricsServiceRequest) -> None:
        with self.arrived:
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    self.metric_names.update(m.name for m in sm.metrics)
            self.arrived.notify_all()

    def wait_span(self, trace_id: str) -> ReceivedSpan:
        wanted = bytes.fromhex(trace_id)
        with self.arrived:
            found: list[ReceivedSpan] = []

            def match() -> bool:
                found[:] = [s for s in self.spans if s.span.trace_id == wanted]
                return bool(found)

            assert self.arrived.wait_for(match, WAIT_S), f"no span of trace {trace_id}"
            (span,) = found
            return span

    def wait_metric(self, name: str) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: name in self.metric_names, WAIT_S), sorted(
                self.metric_names
            )


@dataclass
class Telemetered:
    stack: Stack
    otlp: OtlpReceiver
    metrics_port: int
    policy: Path


@pytest.fixture(scope="module")
def telemetered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Telemetered]:
    otlp = OtlpReceiver()
    otlp_port = otlp.start()
    metrics_port = free_port()
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(POLICY)
    env = {
        "EXTPROC_POLICY": str(policy),
        "TEST_UPSTREAM_DEV": UPSTREAM_KEY,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_SERVICE_NAME": "extproc-e2e",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=e2e",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "EXTPROC_PROMETHEUS_PORT": str(metrics_port),
    }
    try:
        with temporary_stack(sidecar_env=env) as stack:
            yield Telemetered(stack, otlp, metrics_port, policy)
    finally:
        otlp.server.shutdown()


def new_key(t: Telemetered, service: str) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "extproc", "keys", "create", "--workspace", "dev",
         "--service", service, "--json", "--redis-url", t.stack.redis_url],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "EXTPROC_POLICY": str(t.policy)},
    )  # fmt: skip
    return json.loads(out.stdout)


def chat(t: Telemetered, key: str, headers: dict[str, str] | None = None) -> httpx.Response:
    resp = httpx.post(
        f"{t.stack.base_url}/chat/completions",
        json=CHAT,
        headers={"authorization": f"Bearer {key}", **(headers or {})},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    return resp


def test_request_span_joins_the_callers_trace(telemetered: Telemetered) -> None:
    key = new_key(telemetered, "cli")
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    before_ns = time.time_ns()
    resp = chat(
        telemetered,
        key["key"],
        {"traceparent": f"00-{trace_id}-{parent_id}-01", "tracestate": "caller=ci"},
    )
    after_ns = time.time_ns()
    usage = resp.json()["usage"]

    got = telemetered.otlp.wait_span(trace_id)
    span, attrs = got.span, got.attributes
    assert span.name == "chat gpt-4o-mini"
    assert span.kind == OtlpSpan.SPAN_KIND_CLIENT
    assert span.parent_span_id == bytes.fromhex(parent_id)
    assert span.trace_state == "caller=ci"
    assert before_ns <= span.start_time_unix_nano <= span.end_time_unix_nano <= after_ns
    assert got.resource["service.name"] == "extproc-e2e"
    assert got.resource["deployment.environment"] == "e2e"
    assert got.scope == "extproc"
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.response.model"] == resp.json()["model"]
    assert attrs["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert attrs["http.response.status_code"] == 200
    assert attrs["extproc.request_id"] == resp.headers["x-extproc-request-id"]
    assert attrs["extproc.cost_nanos"] > 0
    assert attrs["extproc.cost_usd"] == pytest.approx(float(resp.headers["x-extproc-cost-usd"]))
    assert (attrs["extproc.workspace"], attrs["extproc.team"], attrs["extproc.service"]) == (
        "dev",
        "platform",
        "cli",
    )
    assert attrs["extproc.key_id"] == key["key_id"]
    assert attrs["extproc.outcome"] == "completed"
    assert attrs["extproc.decision"] == "allowed"
    assert attrs["extproc.estimated"] is False
    assert key["key"] not in repr(span) and UPSTREAM_KEY not in repr(span)
    assert "trace me please" not in repr(span)
    telemetered.otlp.wait_metric("extproc.tokens")


class GrpcOtlpReceiver(OtlpReceiver):
    """The same receiver behind OTLP/gRPC: the official collector services on a grpcio server."""

    def start(self) -> int:
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> ExportTraceServiceResponse:
                receiver.add_traces(request)
                return ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> ExportMetricsServiceResponse:
                receiver.add_metrics(request)
                return ExportMetricsServiceResponse()

        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.grpc_server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.grpc_server)
        port = self.grpc_server.add_insecure_port("127.0.0.1:0")
        self.grpc_server.start()
        return port


@pytest.fixture(scope="module")
def grpc_otlp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Telemetered]:
    """A stack exporting with OTEL_EXPORTER_OTLP_PROTOCOL=grpc, as to a collector on 4317."""
    otlp = GrpcOtlpReceiver()
    port = otlp.start()
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(POLICY)
    env = {
        "EXTPROC_POLICY": str(policy),
        "TEST_UPSTREAM_DEV": UPSTREAM_KEY,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_SERVICE_NAME": "extproc-grpc",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
    }
    try:
        with temporary_stack(sidecar_env=env) as stack:
            yield Telemetered(stack, otlp, 0, policy)
    finally:
        otlp.grpc_server.stop(grace=None)


def test_otlp_over_grpc_delivers_spans_and_metrics(grpc_otlp: Telemetered) -> None:
    key = new_key(grpc_otlp, "cli")
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    resp = chat(grpc_otlp, key["key"], {"traceparent": f"00-{trace_id}-{parent_id}-01"})
    got = grpc_otlp.otlp.wait_span(trace_id)
    assert got.span.parent_span_id == bytes.fromhex(parent_id)
    assert got.resource["service.name"] == "extproc-grpc"
    assert got.attributes["extproc.request_id"] == resp.headers["x-extproc-request-id"]
    assert got.attributes["gen_ai.usage.output_tokens"] == resp.json()["usage"]["completion_tokens"]
    grpc_otlp.otlp.wait_metric("extproc.tokens")


@dataclass
class Prometheus:
    child: Child
    port: int

    def query(self, promql: str) -> list[dict[str, Any]]:
        resp = httpx.get(
            f"http://127.0.0.1:{self.port}/api/v1/query", params={"query": promql}, timeout=5
        )
        resp.raise_for_status()
        return resp.json()["data"]["result"]

    def wait_for(self, promql: str, expect: float) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            seen = self.query(promql)
            if seen and float(seen[0]["value"][1]) == expect:
                return seen[0]
            time.sleep(0.2)  # polling Prometheus's query API, which has no blocking form
        raise AssertionError(f"{promql} never reached {expect}; last seen {seen}")


@pytest.fixture(scope="module")
def prometheus(
    telemetered: Telemetered, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: apt-get install -y prometheus"
    data = tmp_path_factory.mktemp("prometheus")
    config = data / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: extproc\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{telemetered.metrics_port}']}}]\n"
    )
    port = free_port()
    child = Child(
        "prometheus",
        [binary, f"--config.file={config}", f"--storage.tsdb.path={data / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
    )  # fmt: skip
    try:
        child.wait_for_line("Server is ready to receive web requests")
        yield Prometheus(child, port)
    finally:
        child.stop()


def test_prometheus_scrapes_token_counters(
    telemetered: Telemetered, prometheus: Prometheus
) -> None:
    key = new_key(telemetered, "prom")
    usage = chat(telemetered, key["key"]).json()["usage"]
    series = prometheus.wait_for(
        'extproc_tokens_total{workspace="dev",service="prom",kind="input"}',
        usage["prompt_tokens"],
    )
    assert series["metric"]["model"] == "gpt-4o-mini"
    assert series["metric"]["job"] == "extproc"
    assert "key_id" not in series["metric"]
    output = prometheus.query('extproc_tokens_total{service="prom",kind="output"}')
    assert float(output[0]["value"][1]) == usage["completion_tokens"]
    requests = prometheus.query(
        'extproc_requests_total{service="prom",outcome="completed",decision="allowed"}'
    )
    assert float(requests[0]["value"][1]) == 1
    assert prometheus.query('extproc_request_duration_seconds_count{endpoint="chat.completions"}')
