"""End to end: a request through Envoy becomes an OTLP span in the caller's trace and an
`extproc.usage` log event carrying its usage record, and its tokens reach a real
Prometheus through the sidecar's scrape endpoint.

The sidecar exports over OTLP/HTTP (protobuf), and in a second stack over OTLP/gRPC, to a
receiver in this process that decodes what arrives with the official OTLP protobuf types;
Prometheus is Debian's `prometheus` binary scraping the sidecar every second.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan

from extproc.devstack.stack import Child, Stack, free_port, temporary_stack
from extproc.v1.ledger_pb2 import UsageRecord
from tests.otlp import WAIT_S, OtlpReceiver

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
        "OTEL_LOGS_EXPORTER": "otlp",
        "OTEL_BLRP_SCHEDULE_DELAY": "100",
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
        otlp.stop()


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
    usage = resp.json()["usage"]

    got = telemetered.otlp.wait_span(trace_id)
    # The span ends when Envoy closes the ext_proc stream, which may be just after the
    # client has its response: bound it by the moment the span was seen, not by the reply.
    after_ns = time.time_ns()
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
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceResponse,
        )
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceResponse,
        )

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


def test_usage_record_arrives_as_otlp_log_event(
    telemetered: Telemetered,
) -> None:
    key = new_key(telemetered, "cli")
    resp = chat(telemetered, key["key"])
    request_id = resp.headers["x-extproc-request-id"]
    usage = resp.json()["usage"]

    got = telemetered.otlp.wait_log(request_id)
    attrs = got.attributes
    assert got.log.event_name == "extproc.usage"
    assert got.scope == "extproc.usage"
    assert got.resource["service.name"] == "extproc-e2e"
    assert attrs["event.name"] == "extproc.usage"
    # The record's fields, every one, under their own names; money stays exact.
    record_fields = {f.name for f in UsageRecord.DESCRIPTOR.fields}
    assert record_fields <= attrs.keys()
    assert attrs["input_tokens"] == usage["prompt_tokens"]
    assert attrs["output_tokens"] == usage["completion_tokens"]
    assert attrs["cost_nanos"] > 0
    assert Decimal(attrs["cost_usd"]) == Decimal(attrs["cost_nanos"]).scaleb(-9)
    assert attrs["cost_usd"] == resp.headers["x-extproc-cost-usd"]
    assert (attrs["workspace"], attrs["team"], attrs["service"], attrs["key_id"]) == (
        "dev",
        "platform",
        "cli",
        key["key_id"],
    )
    assert attrs["outcome"] == "completed"
    assert key["key"] not in repr(got.log) and UPSTREAM_KEY not in repr(got.log)


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
