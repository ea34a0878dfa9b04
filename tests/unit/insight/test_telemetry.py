"""Spans and metrics for metered requests: names, attributes, parents, values, cost."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry, generate_latest

from extproc.devstack.stack import free_port
from extproc.insight.telemetry import RequestTelemetry, Telemetry, prometheus_address
from extproc.settings import ConfigError
from extproc.v1.ledger_pb2 import UsageRecord
from extproc.wire.spec import PASSTHROUGH, metered

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
START_NS = 1_760_000_000_000_000_000


def record(**fields: Any) -> UsageRecord:
    base: dict[str, Any] = {
        "request_id": "rid-1",
        "endpoint": "chat.completions",
        "model_requested": "gpt-4o-mini",
        "model_served": "gpt-4o-mini-2024-07-18",
        "status": 200,
        "stream": True,
        "input_tokens": 1200,
        "cached_input_tokens": 1024,
        "output_tokens": 300,
        "reasoning_tokens": 128,
        "cost_nanos": 123_456,
        "price_family": "gpt-4o-mini",
        "outcome": "completed",
        "workspace": "dev",
        "team": "platform",
        "service": "cli",
        "key_id": "key_ab12",
        "session_id": "sess-9",
        "envoy_request_id": "envoy-7",
        "output_cap": 512,
    }
    return UsageRecord(**{**base, **fields})


def observed(rec: UsageRecord | None = None, **fields: Any) -> RequestTelemetry:
    rec = rec or record()
    base: dict[str, Any] = {
        "record": rec,
        "operation": fields.get("operation") or metered(rec.endpoint).operation,
        "start_ns": START_NS,
        "end_ns": START_NS + 2_500_000_000,
        "traceparent": TRACEPARENT,
        "tracestate": "vendor=abc",
        "decision": "allowed",
        "rule": None,
        "denial_reason": None,
        "denial_scope": None,
        "sidecar_overhead_ns": 750_000,
    }
    return RequestTelemetry(**{**base, **fields})


@dataclass
class Harness:
    telemetry: Telemetry
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    def span(self) -> ReadableSpan:
        (span,) = self.spans.get_finished_spans()
        return span

    def points(self) -> dict[str, dict[frozenset[tuple[str, Any]], Any]]:
        """metric name -> {attribute set: value (or the histogram point)}."""
        data = self.metrics.get_metrics_data()
        out: dict[str, dict[frozenset[tuple[str, Any]], Any]] = {}
        assert data is not None
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    out[metric.name] = {
                        frozenset(p.attributes.items()): (
                            p if isinstance(p, HistogramDataPoint) else p.value
                        )
                        for p in metric.data.data_points
                    }
        return out


@pytest.fixture
def harness() -> Iterator[Harness]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(
        tracer_provider=tracer_provider, meter_provider=MeterProvider(metric_readers=[reader])
    )
    yield Harness(telemetry, spans, reader)
    telemetry.shutdown()


def labels(**kv: str) -> frozenset[tuple[str, str]]:
    return frozenset(kv.items())


# -- spans --------------------------------------------------------------------------------------


def test_span_is_a_child_of_the_callers_trace_with_the_request_times(harness: Harness) -> None:
    harness.telemetry.observe(observed())
    span = harness.span()
    assert span.name == "chat gpt-4o-mini"
    assert span.kind is SpanKind.CLIENT
    assert (span.start_time, span.end_time) == (START_NS, START_NS + 2_500_000_000)
    assert span.context.trace_id == int(TRACE_ID, 16)
    assert span.parent is not None and span.parent.is_remote
    assert span.parent.span_id == int(PARENT_ID, 16)
    assert span.context.trace_state.get("vendor") == "abc"
    assert span.status.status_code is StatusCode.UNSET


def test_span_attributes_follow_genai_conventions_and_carry_attribution(
    harness: Harness,
) -> None:
    harness.telemetry.observe(observed(decision="downgraded", rule="cheap-for-ci"))
    assert dict(harness.span().attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.request.max_tokens": 512,
        "gen_ai.request.stream": True,
        "gen_ai.usage.input_tokens": 1200,
        "gen_ai.usage.output_tokens": 300,
        "gen_ai.usage.cache_read.input_tokens": 1024,
        "gen_ai.usage.reasoning.output_tokens": 128,
        "gen_ai.conversation.id": "sess-9",
        "http.response.status_code": 200,
        "extproc.request_id": "rid-1",
        "extproc.envoy_request_id": "envoy-7",
        "extproc.endpoint": "chat.completions",
        "extproc.workspace": "dev",
        "extproc.team": "platform",
        "extproc.service": "cli",
        "extproc.key_id": "key_ab12",
        "extproc.session_id": "sess-9",
        "extproc.outcome": "completed",
        "extproc.decision": "downgraded",
        "extproc.rule": "cheap-for-ci",
        "extproc.estimated": False,
        "extproc.price_family": "gpt-4o-mini",
        "extproc.cost_nanos": 123_456,
        "extproc.cost_usd": pytest.approx(0.000123456),
    }


def test_denied_request_names_the_reason_and_claims_no_served_model(harness: Harness) -> None:
    rec = record(
        outcome="rejected",
        status=429,
        input_tokens=0,
        cached_input_tokens=0,
        output_tokens=0,
        reasoning_tokens=0,
        cost_nanos=0,
        error_code="budget_exceeded",
    )
    harness.telemetry.observe(
        observed(rec, decision="denied", denial_reason="budget", denial_scope="ws")
    )
    attrs = harness.span().attributes or {}
    assert "gen_ai.response.model" not in attrs
    assert "gen_ai.usage.cache_read.input_tokens" not in attrs
    assert attrs["extproc.denial_reason"] == "budget"
    assert attrs["extproc.denial_scope"] == "ws"
    assert attrs["gen_ai.usage.input_tokens"] == 0
    assert harness.span().status.status_code is StatusCode.UNSET


@pytest.mark.parametrize(
    ("status", "outcome", "error_code", "error_type"),
    [
        (502, "upstream_error", "", "502"),
        (200, "cut", "", "cut"),
        (200, "error", "server_error", "server_error"),
        (200, "failed", "", "failed"),
        (503, "rejected", "upstream_credential_missing", "upstream_credential_missing"),
    ],
)
def test_server_errors_and_broken_streams_mark_the_span_as_error(
    harness: Harness, status: int, outcome: str, error_code: str, error_type: str
) -> None:
    rec = record(status=status, outcome=outcome, error_code=error_code, estimated=True)
    harness.telemetry.observe(observed(rec))
    span = harness.span()
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == error_type


@pytest.mark.parametrize(
    ("endpoint", "model", "name"),
    [
        ("responses", "gpt-5-codex", "chat gpt-5-codex"),
        ("completions", "gpt-3.5-turbo-instruct", "text_completion gpt-3.5-turbo-instruct"),
        ("embeddings", "text-embedding-3-small", "embeddings text-embedding-3-small"),
        ("chat.completions", "", "chat"),
    ],
)
def test_span_name_is_operation_then_model(
    harness: Harness, endpoint: str, model: str, name: str
) -> None:
    harness.telemetry.observe(observed(record(endpoint=endpoint, model_requested=model)))
    span = harness.span()
    assert span.name == name
    assert (span.attributes or {})["gen_ai.operation.name"] == name.split()[0]


def test_a_passthrough_call_is_named_by_its_own_operation_not_chat(harness: Harness) -> None:
    """Regression: every endpoint but the metered four used to be reported as "chat"."""
    files = next(s for s in PASSTHROUGH if s.name == "files")
    rec = record(endpoint=files.name, model_requested="")
    harness.telemetry.observe(observed(rec, operation=files.operation))
    span = harness.span()
    assert span.name == "files"
    assert (span.attributes or {})["gen_ai.operation.name"] == "files"


@pytest.mark.parametrize("traceparent", [None, "", "00-not-a-trace-01"])
def test_without_a_usable_traceparent_the_span_starts_a_trace(
    harness: Harness, traceparent: str | None
) -> None:
    harness.telemetry.observe(observed(traceparent=traceparent))
    span = harness.span()
    assert span.parent is None
    assert span.context.trace_id != int(TRACE_ID, 16)


def test_callers_sampling_decision_is_respected(harness: Harness) -> None:
    harness.telemetry.observe(observed(traceparent=f"00-{TRACE_ID}-{PARENT_ID}-00"))
    assert harness.spans.get_finished_spans() == ()


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_accumulate_over_requests(harness: Harness) -> None:
    tel = harness.telemetry
    tel.observe(observed())
    tel.observe(
        observed(
            record(input_tokens=100, cached_input_tokens=0, output_tokens=50, reasoning_tokens=0),
            end_ns=START_NS + 500_000_000,
            sidecar_overhead_ns=250_000,
        )
    )
    tel.observe(
        observed(
            record(
                outcome="rejected",
                status=429,
                input_tokens=0,
                cached_input_tokens=0,
                output_tokens=0,
                reasoning_tokens=0,
                cost_nanos=0,
            ),
            decision="denied",
            denial_reason="rate",
            denial_scope="key:key_ab12",
        )
    )
    tel.observe(observed(record(endpoint="embeddings", workspace="ops", service="rag")))
    tel.downgrade("dev", "cli", "gpt-5", "gpt-5-mini")
    tel.budget_utilization("dev", "ws", 0.4)
    tel.budget_utilization("dev", "ws", 0.42)
    tel.budget_utilization("dev", "key:key_ab12", 0.9)
    tel.burn_rate("dev", "cli", 1.5)
    p = harness.points()

    # The model's real name as served, never the price row; the provisional flag beside it.
    dev = {"workspace": "dev", "service": "cli", "model": "gpt-4o-mini-2024-07-18",
           "provisional": "false"}  # fmt: skip
    assert p["extproc.tokens"][labels(**dev, kind="input")] == 1300
    assert p["extproc.tokens"][labels(**dev, kind="cached_input")] == 1024
    assert p["extproc.tokens"][labels(**dev, kind="output")] == 350
    assert p["extproc.tokens"][labels(**dev, kind="reasoning")] == 128
    assert p["extproc.tokens"][
        labels(**{**dev, "workspace": "ops", "service": "rag"}, kind="input")
    ]
    assert p["extproc.cost.usd"][labels(**dev)] == pytest.approx(2 * 0.000123456)

    requests = p["extproc.requests"]
    common = {"workspace": "dev", "service": "cli", "endpoint": "chat.completions"}
    assert requests[labels(**common, outcome="completed", decision="allowed")] == 2
    assert requests[labels(**common, outcome="rejected", decision="denied")] == 1
    assert sum(requests.values()) == 4

    assert p["extproc.denials"] == {labels(workspace="dev", reason="rate", scope="key"): 1}
    assert p["extproc.downgrades"] == {
        labels(workspace="dev", service="cli", from_model="gpt-5", to_model="gpt-5-mini"): 1
    }
    assert p["extproc.budget.utilization.ratio"] == {labels(workspace="dev", scope="ws"): 0.42}
    assert p["extproc.burn_rate.ratio"] == {labels(workspace="dev", service="cli"): 1.5}

    duration = p["extproc.request.duration"][labels(endpoint="chat.completions")]
    assert duration.count == 3
    assert duration.sum == pytest.approx(2.5 + 0.5 + 2.5)
    overhead = p["extproc.sidecar.overhead"][labels(endpoint="chat.completions")]
    assert overhead.sum == pytest.approx(0.00075 + 0.00025 + 0.00075)
    assert overhead.max == pytest.approx(0.00075)


def test_prometheus_names_and_labels_are_exactly_the_documented_ones() -> None:
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry, scope_info_enabled=False)
    tel = Telemetry(meter_provider=MeterProvider(metric_readers=[reader]))
    tel.observe(observed(decision="denied", denial_reason="budget", denial_scope="team:platform"))
    tel.downgrade("dev", "cli", "gpt-5", "gpt-5-mini")
    tel.budget_utilization("dev", "ws", 0.5)
    tel.burn_rate("dev", "cli", 2.0)
    text = generate_latest(registry).decode()
    tel.shutdown()
    samples = {line for line in text.splitlines() if not line.startswith("#")}
    expected = {
        'extproc_tokens_total{kind="input",model="gpt-4o-mini-2024-07-18",provisional="false",'
        'service="cli",workspace="dev"} 1200.0',
        'extproc_cost_usd_total{model="gpt-4o-mini-2024-07-18",provisional="false",service="cli",'
        'workspace="dev"} 0.000123456',
        'extproc_requests_total{decision="denied",endpoint="chat.completions",'
        'outcome="completed",service="cli",workspace="dev"} 1.0',
        'extproc_request_duration_seconds_count{endpoint="chat.completions"} 1.0',
        'extproc_sidecar_overhead_seconds_count{endpoint="chat.completions"} 1.0',
        'extproc_denials_total{reason="budget",scope="team:platform",workspace="dev"} 1.0',
        'extproc_downgrades_total{from_model="gpt-5",service="cli",to_model="gpt-5-mini",'
        'workspace="dev"} 1.0',
        'extproc_budget_utilization_ratio{scope="ws",workspace="dev"} 0.5',
        'extproc_burn_rate_ratio{service="cli",workspace="dev"} 2.0',
    }
    assert expected <= samples, sorted(samples)
    assert "key_ab12" not in text
    assert "otel_scope" not in text


# -- configuration ------------------------------------------------------------------------------


def _clear_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_TRACES_EXPORTER",
        "OTEL_METRICS_EXPORTER",
        "OTEL_SDK_DISABLED",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "EXTPROC_PROMETHEUS_PORT",
        "EXTPROC_TELEMETRY",
    ):
        monkeypatch.delenv(var, raising=False)


def test_disabled_telemetry_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_otel_env(monkeypatch)
    monkeypatch.setenv("EXTPROC_TELEMETRY", "off")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    port = free_port()
    monkeypatch.setenv("EXTPROC_PROMETHEUS_PORT", str(port))
    for tel in (Telemetry.from_env(), Telemetry()):
        assert not tel.enabled
        tel.observe(observed())
        tel.downgrade("dev", "cli", "a", "b")
        tel.budget_utilization("dev", "ws", 1.0)
        tel.burn_rate("dev", "cli", 1.0)
        tel.shutdown()
    with socket.socket() as s:  # no scrape endpoint was opened
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_nothing_is_exported_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_otel_env(monkeypatch)
    assert not Telemetry.from_env().enabled
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    assert not Telemetry.from_env().enabled


def test_prometheus_scrape_endpoint_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_otel_env(monkeypatch)
    port = free_port()
    monkeypatch.setenv("EXTPROC_PROMETHEUS_PORT", str(port))
    monkeypatch.setenv("OTEL_SERVICE_NAME", "extproc-test")
    tel = Telemetry.from_env()
    try:
        assert tel.enabled
        tel.observe(observed())
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'extproc_tokens_total{kind="output",model="gpt-4o-mini-2024-07-18"' in body
        assert 'service_name="extproc-test"' in body
    finally:
        tel.shutdown()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_default_service_name_is_extproc(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_otel_env(monkeypatch)
    port = free_port()
    monkeypatch.setenv("EXTPROC_PROMETHEUS_PORT", f"127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    tel = Telemetry.from_env()
    try:
        tel.observe(observed())
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'service_name="extproc"' in body
        assert 'deployment_environment="test"' in body
    finally:
        tel.shutdown()


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("OTEL_TRACES_EXPORTER", "zipkin", "OTEL_TRACES_EXPORTER"),
        ("OTEL_METRICS_EXPORTER", "prometheus", "OTEL_METRICS_EXPORTER"),
        ("EXTPROC_PROMETHEUS_PORT", "nine", "EXTPROC_PROMETHEUS_PORT"),
        ("EXTPROC_PROMETHEUS_PORT", "70000", "EXTPROC_PROMETHEUS_PORT"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ],
)
def test_bad_settings_stop_startup_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, message: str
) -> None:
    _clear_otel_env(monkeypatch)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=message):
        Telemetry.from_env()


def test_prometheus_address_forms() -> None:
    assert prometheus_address("") is None
    assert prometheus_address("0") is None
    assert prometheus_address("9464") == ("127.0.0.1", 9464)
    assert prometheus_address("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert prometheus_address("[::1]:9464") == ("::1", 9464)


# -- cost on the request path -------------------------------------------------------------------


def test_observe_exports_every_span_through_the_batch_processor() -> None:
    """Production shape: batch span processor (export off-thread) and in-memory metrics.

    What telemetry costs per request is a benchmark figure (`make bench`: sidecar CPU per
    request, with and without telemetry), not a timed assertion here.
    """
    provider = TracerProvider()
    spans = InMemorySpanExporter()
    provider.add_span_processor(BatchSpanProcessor(spans, max_queue_size=10_000))
    tel = Telemetry(
        tracer_provider=provider,
        meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
    )
    t = observed()
    for _ in range(2500):
        tel.observe(t)
    disabled = Telemetry()
    assert not disabled.enabled
    disabled.observe(t)
    tel.shutdown()
    assert len(spans.get_finished_spans()) == 2500


def test_usage_log_events_need_their_own_exporter_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An OTLP endpoint alone exports no per-request log events; OTEL_LOGS_EXPORTER does."""
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_LOGS_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("EXTPROC_PROMETHEUS_PORT", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    assert not Telemetry.from_env().enabled
    monkeypatch.setenv("OTEL_LOGS_EXPORTER", "otlp")
    telemetry = Telemetry.from_env()
    try:
        assert telemetry.enabled
    finally:
        telemetry.shutdown()
    monkeypatch.setenv("OTEL_LOGS_EXPORTER", "bogus")
    with pytest.raises(ConfigError, match="OTEL_LOGS_EXPORTER"):
        Telemetry.from_env()


def test_an_unknown_model_keeps_its_name_and_is_flagged(harness: Harness) -> None:
    """A provisionally priced model is labelled by its real name, flagged beside it; the
    price row ("provisional:sol") never stands in for the model."""
    tel = harness.telemetry
    rec = record(
        model_requested="gpt-6.3-sol",
        model_served="gpt-6.3-sol",
        price_family="provisional:sol",
        price_fallback=True,
        price_provisional=True,
    )
    tel.observe(observed(rec))
    p = harness.points()
    flagged = {"workspace": "dev", "service": "cli", "model": "gpt-6.3-sol", "provisional": "true"}
    assert p["extproc.cost.usd"][labels(**flagged)] == pytest.approx(0.000123456)
    assert all(dict(k)["model"] != "provisional:sol" for k in p["extproc.tokens"])
    attrs = harness.span().attributes or {}
    assert attrs["gen_ai.response.model"] == "gpt-6.3-sol"
    assert attrs["extproc.price_provisional"] is True
