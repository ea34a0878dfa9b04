"""OpenTelemetry spans and metrics for every metered request, built after the fact.

The ledger in Redis is the bill; this is the view operators already have dashboards
and trace search for. Each request becomes one CLIENT span (GenAI semantic conventions,
parented on the caller's W3C `traceparent`, so a Codex turn shows up inside the trace of
whatever started it) and a handful of metric points. Nothing is timed live: `observe`
runs once, after the response ended, with the finished `UsageRecord` and the request's
start and end times, and creates the span retroactively. Spans leave through a batch
processor on its own thread and metrics are aggregated in memory, so the request path
pays for building a few dicts and appending to a queue, never for a network call.

Metric labels are chosen to stay few whatever the traffic: workspace, service, team
scopes and downgrade models come from the policy file, `model` is the model's real name as
the provider served it (only calls the provider billed carry one, so invented names never
become labels; past MODEL_LABELS distinct names a process reports the rest as "other"),
a model the price table does not know is flagged `provisional="true"` beside its real
name, and key ids never become labels (a key scope is reported as plain "key"). Token
counts follow OpenAI's accounting: `cached_input` and `cache_write` are part of `input`
and `reasoning` is part of `output`, so summing every
`kind` double counts.

`Telemetry()` with no providers, or `EXTPROC_TELEMETRY=off`, is a no-op.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from extproc.books.events import UsageEvents, usage_events
from extproc.governance.guard import PAUSED_CODE
from extproc.insight.genai import GenAIMetrics
from extproc.insight.haltmetrics import HaltMetrics
from extproc.routing.decide import Step
from extproc.settings import ConfigError
from extproc.store.schema import is_key_scope
from extproc.v1.ledger_pb2 import UsageRecord

log = logging.getLogger("extproc.insight.telemetry")
_ANNOUNCED: set[tuple[str, str, str, str]] = set()
"""Downgrades already logged by this process: one human-readable line per scope and step."""

SCOPE = "extproc"
DEFAULT_SERVICE_NAME = "extproc"
PROVIDER = "openai"

OPERATIONS = {
    "responses": "chat",
    "chat.completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}
ERROR_OUTCOMES = frozenset({"error", "cut", "failed"})
TOKEN_KINDS = ("input", "cached_input", "cache_write", "output", "reasoning")

# Streamed agent turns run for minutes; the sidecar's own work is measured in microseconds.
DURATION_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OVERHEAD_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
)  # fmt: skip

WORKER_METRICS_ENV = "EXTPROC_WORKER_METRICS"
"""Set by the worker supervisor: serve metrics on an ephemeral loopback port and announce it
(`METRICS_LINE`), for the supervisor to merge into the pod's one scrape (`insight.fanin`)."""
METRICS_LINE = "extproc metrics on"

_PROPAGATOR = TraceContextTextMapPropagator()
_EXPORTER_CHOICES = ("otlp", "console", "none")
_OFF = frozenset({"off", "false", "0", "no", "disabled"})


@dataclass(frozen=True, slots=True)
class RequestTelemetry:
    record: UsageRecord
    start_ns: int  # time.time_ns() when the request headers arrived
    end_ns: int
    traceparent: str | None
    tracestate: str | None
    decision: str  # "allowed" | "denied" | "downgraded" | "estimated"
    rule: str | None
    denial_reason: str | None  # "budget" | "rate" | "revoked" | "redis_down" | "bad_request"
    denial_scope: str | None
    sidecar_overhead_ns: int
    topup_nanos: int = 0  # what top-ups added to the binding scope's hard limit


def verdict(
    record: UsageRecord,
    *,
    rejected: bool,
    denial_reason: str | None,
    downgraded: bool,
) -> tuple[str, str | None]:
    """How a finished request is reported: (decision, denial reason).

    `denial_reason` is set when a budget decision refused the request; `rejected` when
    the data path answered it itself for any reason (then without a budget decision it
    was the request that was bad).
    """
    if denial_reason is None and rejected:
        return "denied", "paused" if record.error_code == PAUSED_CODE else "bad_request"
    if denial_reason is not None:
        return "denied", denial_reason
    if downgraded:
        return "downgraded", None
    return ("estimated" if record.estimated else "allowed"), None


# -- what a request looks like as a span: plain functions of the record ---------------------


def operation_name(endpoint: str) -> str:
    return OPERATIONS.get(endpoint, "chat")


def span_name(record: UsageRecord) -> str:
    op = operation_name(record.endpoint)
    return f"{op} {record.model_requested}" if record.model_requested else op


def is_error(record: UsageRecord) -> bool:
    return record.status >= 500 or record.outcome in ERROR_OUTCOMES


def error_type(record: UsageRecord) -> str:
    if record.error_code:
        return record.error_code
    return str(record.status) if record.status >= 500 else record.outcome


def parent_context(traceparent: str | None, tracestate: str | None) -> Context:
    """The caller's trace, or an empty context (never an ambient span of the sidecar)."""
    if not traceparent:
        return Context()
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return _PROPAGATOR.extract(carrier, context=Context())


def span_attributes(t: RequestTelemetry) -> dict[str, AttributeValue]:
    """GenAI semantic-convention attributes plus ours; no request or response content."""
    r = t.record
    attrs: dict[str, AttributeValue] = {
        "gen_ai.operation.name": operation_name(r.endpoint),
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.system": PROVIDER,
        "gen_ai.request.stream": r.stream,
        "gen_ai.usage.input_tokens": r.input_tokens,
        "gen_ai.usage.output_tokens": r.output_tokens,
        "extproc.request_id": r.request_id,
        "extproc.endpoint": r.endpoint,
        "extproc.outcome": r.outcome,
        "extproc.decision": t.decision,
        "extproc.estimated": r.estimated,
        "extproc.cost_nanos": r.cost_nanos,
        "extproc.cost_usd": r.cost_nanos / 1e9,
    }
    optional: tuple[tuple[str, AttributeValue | None], ...] = (
        ("gen_ai.request.model", r.model_requested),
        ("gen_ai.response.model", r.model_served if r.outcome != "rejected" else None),
        ("gen_ai.request.max_tokens", r.output_cap),
        ("gen_ai.usage.cache_read.input_tokens", r.cached_input_tokens),
        ("gen_ai.usage.reasoning.output_tokens", r.reasoning_tokens),
        ("gen_ai.conversation.id", r.session_id),
        ("http.response.status_code", r.status),
        ("extproc.workspace", r.workspace),
        ("extproc.team", r.team),
        ("extproc.service", r.service),
        ("extproc.key_id", r.key_id),
        ("extproc.session_id", r.session_id),
        ("extproc.envoy_request_id", r.envoy_request_id),
        ("extproc.price_family", r.price_family),
        ("extproc.price_tier", r.price_tier),
        ("extproc.price_version", r.price_version),
        ("extproc.price_provisional", r.price_provisional or r.price_fallback),
        ("gen_ai.openai.response.service_tier", r.service_tier),
        ("gen_ai.usage.cache_write.input_tokens", r.cache_write_tokens),
        ("extproc.web_search_calls", r.web_search_calls),
        ("extproc.file_search_calls", r.file_search_calls),
        ("extproc.code_interpreter_containers", r.code_interpreter_containers),
        ("extproc.image_generations", r.image_generations),
        ("extproc.rule", t.rule),
        ("extproc.shadow.decision", r.shadow),
        ("extproc.denial_reason", t.denial_reason),
        ("extproc.denial_scope", t.denial_scope),
        ("extproc.topup_usd", t.topup_nanos / 1e9 if t.topup_nanos else None),
    )
    for key, value in optional:
        if value:
            attrs[key] = value
    if is_error(r):
        attrs["error.type"] = error_type(r)
    return attrs


# -- metric labels that stay bounded ---------------------------------------------------------


MODEL_LABELS = 512
"""Distinct model names one process reports as labels; any further name is "other"."""
_MODELS: set[str] = set()


def model_label(record: UsageRecord) -> str:
    """The model's real name as served (dated snapshots included): never a price row or a
    flag in its place. Names only reach here on calls the provider billed."""
    name = record.model_served or record.model_requested or "unknown"
    if name in _MODELS:
        return name
    if len(_MODELS) >= MODEL_LABELS:
        return "other"
    _MODELS.add(name)
    return name


def provisional_label(record: UsageRecord) -> str:
    return "true" if record.price_provisional or record.price_fallback else "false"


def scope_label(scope: str | None) -> str:
    if not scope:
        return ""
    return "key" if is_key_scope(scope) else scope


def token_counts(record: UsageRecord) -> tuple[tuple[str, int], ...]:
    return tuple(
        (kind, n)
        for kind, n in zip(
            TOKEN_KINDS,
            (
                record.input_tokens,
                record.cached_input_tokens,
                record.cache_write_tokens,
                record.output_tokens,
                record.reasoning_tokens,
            ),
            strict=True,
        )
        if n
    )


class Tally:
    """A cumulative counter kept in a plain dict and read by an observable instrument.

    An SDK `Counter.add` validates and sorts its attributes on every call (several
    microseconds each, six per request); a dict update under a lock costs a fraction of
    that, and the SDK does the same work once per label set per collection instead.
    """

    __slots__ = ("_keys", "_lock", "_sums")

    def __init__(self, *keys: str) -> None:
        self._keys = keys
        self._lock = threading.Lock()
        self._sums: dict[tuple[str, ...], float] = {}

    def add(self, amount: float, *labels: str) -> None:
        with self._lock:
            self._sums[labels] = self._sums.get(labels, 0) + amount

    def observe(self, _options: CallbackOptions) -> list[Observation]:
        with self._lock:
            items = list(self._sums.items())
        return [
            Observation(total, dict(zip(self._keys, labels, strict=True)))
            for labels, total in items
        ]


class _Instruments:
    """Instrument names chosen so Prometheus exports exactly `extproc_*_total` etc."""

    __slots__ = (
        "burn_rate",
        "cost",
        "denials",
        "downgrades",
        "duration",
        "genai",
        "halt",
        "overhead",
        "requests",
        "tokens",
        "utilization",
    )

    def __init__(self, provider: MeterProvider) -> None:
        meter = provider.get_meter(SCOPE)

        def counter(name: str, unit: str, description: str, *keys: str) -> Tally:
            tally = Tally(*keys)
            meter.create_observable_counter(
                name, callbacks=[tally.observe], unit=unit, description=description
            )
            return tally

        self.tokens = counter(
            "extproc.tokens",
            "{token}",
            "Tokens billed; cached_input is part of input, reasoning part of output.",
            *("workspace", "service", "model", "kind", "provisional"),
        )
        self.cost = counter(
            "extproc.cost.usd",
            "{USD}",
            "Cost of metered requests in USD.",
            *("workspace", "service", "model", "provisional"),
        )
        self.requests = counter(
            "extproc.requests",
            "{request}",
            "Metered requests, by outcome and budget decision.",
            *("workspace", "service", "endpoint", "outcome", "decision"),
        )
        self.denials = counter(
            "extproc.denials",
            "{request}",
            "Requests the sidecar refused.",
            *("workspace", "reason", "scope"),
        )
        self.downgrades = counter(
            "extproc.downgrades",
            "{request}",
            "Requests routed to a cheaper model than the one asked for.",
            *("workspace", "service", "from_model", "to_model"),
        )
        self.duration = meter.create_histogram(
            "extproc.request.duration",
            unit="s",
            description="Time from request headers to the end of the response.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
        )
        self.overhead = meter.create_histogram(
            "extproc.sidecar.overhead",
            unit="s",
            description="Time the sidecar itself spent on a request's phases.",
            explicit_bucket_boundaries_advisory=OVERHEAD_BUCKETS_S,
        )
        self.utilization = meter.create_gauge(
            "extproc.budget.utilization.ratio",
            unit="1",
            description="Share of the period's budget spent, per budgeted scope.",
        )
        self.burn_rate = meter.create_gauge(
            "extproc.burn_rate.ratio",
            unit="1",
            description="Today's projected spend divided by a usual day (trailing same weekdays).",
        )
        self.genai = GenAIMetrics(meter)
        self.halt = HaltMetrics(meter)


class Telemetry:
    """One per sidecar process. Without providers every method returns at once."""

    __slots__ = (
        "_closers",
        "_events",
        "_meter_provider",
        "_metrics",
        "_tracer",
        "_tracer_provider",
        "capture_content",
        "enabled",
        "metrics_address",
    )

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        capture_content: bool = False,
        usage_events: UsageEvents | None = None,
    ) -> None:
        self._tracer_provider = tracer_provider
        self._events = usage_events
        self._meter_provider = meter_provider
        self._tracer = tracer_provider.get_tracer(SCOPE) if tracer_provider else None
        self._metrics = _Instruments(meter_provider) if meter_provider else None
        self._closers: list[Callable[[], None]] = []
        # Prompts and completions never reach this module; the flag is kept for callers
        # that might one day pass content and must ask first.
        self.capture_content = capture_content
        self.enabled = (
            self._tracer is not None or self._metrics is not None or self._events is not None
        )
        self.metrics_address = ""  # host:port of this process's scrape endpoint, if any

    @classmethod
    def from_env(cls) -> Telemetry:
        """Configure from the standard OTEL_* variables plus EXTPROC_PROMETHEUS_PORT.

        Unlike the OpenTelemetry default, nothing is exported over OTLP unless an OTLP
        endpoint (or an explicit OTEL_*_EXPORTER) is set: a sidecar started without a
        collector must not retry into the void on every batch.
        """
        env = os.environ
        if telemetry_off(env):
            return cls()
        traces = exporter_names(env, "TRACES")
        metrics = exporter_names(env, "METRICS")
        # One event per request is a volume to opt into: logs need OTEL_LOGS_EXPORTER itself.
        logs = exporter_names(env, "LOGS") if env.get("OTEL_LOGS_EXPORTER", "").strip() else ()
        prometheus = pod_metrics_address(env)
        if env.get(WORKER_METRICS_ENV) == "1":
            prometheus = ("127.0.0.1", 0)
        if not traces and not metrics and not logs and prometheus is None:
            return cls()
        resource = service_resource()
        events = usage_events(logs, resource, lambda: _otlp_exporter("LOGS", env))
        tracer_provider = None
        if traces:
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            tracer_provider = TracerProvider(resource=resource)
            for name in traces:
                tracer_provider.add_span_processor(BatchSpanProcessor(_span_exporter(name, env)))
        readers: list[MetricReader] = [_metric_reader(name, env) for name in metrics]
        closers: list[Callable[[], None]] = []
        address = ""
        if prometheus is not None:
            reader, close, address = _prometheus(*prometheus)
            readers.append(reader)
            closers.append(close)
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        telemetry = cls(
            tracer_provider=tracer_provider, meter_provider=meter_provider, usage_events=events
        )
        telemetry._closers = closers
        telemetry.metrics_address = address
        return telemetry

    # -- the request path -------------------------------------------------------------------

    def observe(self, t: RequestTelemetry) -> None:
        if not self.enabled:
            return
        try:
            if self._tracer is not None:
                self._span(t)
            if self._metrics is not None:
                self._record(t)
            if self._events is not None:
                self._events.emit(t.record, t.end_ns)
        except Exception:
            log.exception("telemetry for request %s dropped", t.record.request_id)

    def _span(self, t: RequestTelemetry) -> None:
        assert self._tracer is not None
        record = t.record
        span = self._tracer.start_span(
            span_name(record),
            context=parent_context(t.traceparent, t.tracestate),
            kind=SpanKind.CLIENT,
            attributes=span_attributes(t),
            start_time=t.start_ns,
        )
        if is_error(record):
            span.set_status(Status(StatusCode.ERROR, error_type(record)))
        span.end(end_time=max(t.end_ns, t.start_ns))

    def _record(self, t: RequestTelemetry) -> None:
        m = self._metrics
        assert m is not None
        r = t.record
        ws, svc, endpoint = r.workspace, r.service, r.endpoint
        m.requests.add(1, ws, svc, endpoint, r.outcome, t.decision)
        where = {"endpoint": endpoint}
        seconds = max(t.end_ns - t.start_ns, 0) / 1e9
        m.duration.record(seconds, where)
        m.overhead.record(max(t.sidecar_overhead_ns, 0) / 1e9, where)
        model, flag = model_label(r), provisional_label(r)
        for kind, n in token_counts(r):
            m.tokens.add(n, ws, svc, model, kind, flag)
        if r.cost_nanos > 0:
            m.cost.add(r.cost_nanos / 1e9, ws, svc, model, flag)
        if t.denial_reason:
            m.denials.add(1, ws, t.denial_reason, scope_label(t.denial_scope))
        m.genai.record(
            r,
            operation=operation_name(endpoint),
            provider=PROVIDER,
            duration_s=seconds,
            error_type=error_type(r) if is_error(r) else None,
        )

    # -- state the sidecar learns elsewhere -------------------------------------------------

    def downgrade(self, workspace: str, service: str, from_model: str, to_model: str) -> None:
        if self._metrics is not None:
            self._metrics.downgrades.add(1, workspace, service, from_model, to_model)

    def announce_downgrade(self, workspace: str, service: str, step: Step) -> None:
        """Count a downgrade; log it in words once per process, scope, step and model."""
        self.downgrade(workspace, service, step.from_model, step.to_model or "")
        key = (workspace, service, step.kind, step.to_model or "")
        if key not in _ANNOUNCED:
            _ANNOUNCED.add(key)
            log.warning(
                "%s/%s: %s %s -> %s (%s)",
                workspace,
                service,
                step.kind,
                step.from_model,
                step.to_model,
                step.why,
            )

    def budget_utilization(self, workspace: str, scope: str, ratio: float) -> None:
        """Per budgeted scope; key scopes carry no budget and are not reported."""
        if self._metrics is not None and not is_key_scope(scope):
            self._metrics.utilization.set(ratio, {"workspace": workspace, "scope": scope})

    @property
    def halt(self) -> HaltMetrics | None:
        """Top-up and breaker metrics (`insight.haltmetrics`); None without metrics."""
        return self._metrics.halt if self._metrics is not None else None

    def burn_rate(self, workspace: str, service: str, ratio: float) -> None:
        if self._metrics is not None:
            self._metrics.burn_rate.set(ratio, {"workspace": workspace, "service": service})

    def shutdown(self) -> None:
        """Flush what is queued and stop the exporters' threads and the scrape endpoint."""
        self.enabled = False
        self._tracer = None
        self._metrics = None
        tracer_provider, self._tracer_provider = self._tracer_provider, None
        meter_provider, self._meter_provider = self._meter_provider, None
        events, self._events = self._events, None
        if events is not None:
            events.shutdown()
        if tracer_provider is not None:
            tracer_provider.shutdown()
        if meter_provider is not None:
            meter_provider.shutdown()
        closers, self._closers = self._closers, []
        for close in closers:
            close()


# -- configuration from the environment ------------------------------------------------------


def exporter_names(env: Mapping[str, str], signal: str) -> tuple[str, ...]:
    """OTEL_{signal}_EXPORTER as a list; unset means otlp only if an endpoint is configured."""
    var = f"OTEL_{signal}_EXPORTER"
    raw = env.get(var, "").strip()
    if not raw:
        has_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
            f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
        )
        return ("otlp",) if has_endpoint else ()
    names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    for name in names:
        if name not in _EXPORTER_CHOICES:
            raise ConfigError(f"{var}: must be one of {', '.join(_EXPORTER_CHOICES)}, got {name!r}")
    return tuple(n for n in names if n != "none")


def prometheus_address(value: str) -> tuple[str, int] | None:
    """EXTPROC_PROMETHEUS_PORT: "9464" (loopback) or "0.0.0.0:9464"; empty or 0 is off."""
    value = value.strip()
    if not value:
        return None
    host, _, port = value.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"EXTPROC_PROMETHEUS_PORT: must be a port or host:port, got {value!r}")
    if int(port) == 0:
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def telemetry_off(env: Mapping[str, str]) -> bool:
    """EXTPROC_TELEMETRY=off or OTEL_SDK_DISABLED=true: no spans, metrics or scrape port."""
    return env.get("EXTPROC_TELEMETRY", "").strip().lower() in _OFF or (
        env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    )


def pod_metrics_address(env: Mapping[str, str]) -> tuple[str, int] | None:
    """Where this process's scrape endpoint listens (EXTPROC_PROMETHEUS_PORT), or None."""
    if telemetry_off(env):
        return None
    return prometheus_address(env.get("EXTPROC_PROMETHEUS_PORT", ""))


def service_resource() -> Resource:
    """OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME, with service.name "extproc" by default."""
    from_env = OTELResourceDetector().detect().attributes
    if from_env.get(SERVICE_NAME):
        return Resource.create()
    return Resource.create({SERVICE_NAME: DEFAULT_SERVICE_NAME})


_OTLP_PACKAGES = {"http/protobuf": "http", "grpc": "grpc"}
_OTLP_CLASSES = {
    "TRACES": ("trace_exporter", "OTLPSpanExporter"),
    "METRICS": ("metric_exporter", "OTLPMetricExporter"),
    "LOGS": ("_log_exporter", "OTLPLogExporter"),
}


def _otlp_exporter(signal: str, env: Mapping[str, str]) -> Any:
    """The OTLP exporter for OTEL_EXPORTER_OTLP[_{signal}]_PROTOCOL; it reads its own env."""
    var = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
    if not env.get(var):
        var = "OTEL_EXPORTER_OTLP_PROTOCOL"
    protocol = env.get(var, "").strip() or "http/protobuf"
    package = _OTLP_PACKAGES.get(protocol)
    if package is None:
        raise ConfigError(f"{var}: must be http/protobuf or grpc, got {protocol!r}")
    module_name, class_name = _OTLP_CLASSES[signal]
    try:
        module = importlib.import_module(
            f"opentelemetry.exporter.otlp.proto.{package}.{module_name}"
        )
    except ImportError:
        raise ConfigError(
            f"{var}: {protocol} needs the opentelemetry-exporter-otlp-proto-{package} package"
        ) from None
    return getattr(module, class_name)()


def _span_exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    exporter: SpanExporter = _otlp_exporter("TRACES", env)
    return exporter


def _metric_reader(name: str, env: Mapping[str, str]) -> MetricReader:
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        MetricExporter,
        PeriodicExportingMetricReader,
    )

    exporter: MetricExporter = (
        ConsoleMetricExporter() if name == "console" else _otlp_exporter("METRICS", env)
    )
    return PeriodicExportingMetricReader(exporter)


def _prometheus(host: str, port: int) -> tuple[MetricReader, Callable[[], None], str]:
    """A scrape endpoint on its own registry, so nothing global leaks into /metrics; port 0
    picks a free one. Returns the reader, its closer and the address it listens on."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=True)
    reader = PrometheusMetricReader(registry=registry, scope_info_enabled=False)
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"EXTPROC_PROMETHEUS_PORT: cannot listen on {host}:{port}: {exc.strerror}"
        ) from None
    port = server.server_port
    log.info("prometheus metrics on http://%s:%d/metrics", host, port)

    def close() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return reader, close, f"{host}:{port}"
