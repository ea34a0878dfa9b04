"""A test OTLP/HTTP receiver shared by the end-to-end suites: traces, metrics and logs.

It decodes what arrives with the official OTLP protobuf types (gzip or not), keeps it,
and lets a test block until something it expects has arrived.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord as OtlpLogRecord
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan

WAIT_S = 20.0


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs if isinstance(kv, KeyValue)}


@dataclass
class ReceivedSpan:
    resource: dict[str, Any]
    scope: str
    span: OtlpSpan

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes(self.span.attributes)


@dataclass
class ReceivedLog:
    resource: dict[str, Any]
    scope: str
    log: OtlpLogRecord

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes(self.log.attributes)


_SIGNALS: dict[str, tuple[Any, Any, str]] = {
    "/v1/traces": (ExportTraceServiceRequest, ExportTraceServiceResponse, "add_traces"),
    "/v1/metrics": (ExportMetricsServiceRequest, ExportMetricsServiceResponse, "add_metrics"),
    "/v1/logs": (ExportLogsServiceRequest, ExportLogsServiceResponse, "add_logs"),
}


@dataclass
class OtlpReceiver:
    """An OTLP/HTTP endpoint: /v1/traces, /v1/metrics and /v1/logs, protobuf."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    logs: list[ReceivedLog] = field(default_factory=list)
    metric_names: set[str] = field(default_factory=set)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> int:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path not in _SIGNALS:
                    self.send_error(404)
                    return
                request_type, response_type, add = _SIGNALS[self.path]
                getattr(receiver, add)(request_type.FromString(body))
                reply = response_type().SerializeToString()
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
                resource = attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    self.spans.extend(ReceivedSpan(resource, ss.scope.name, s) for s in ss.spans)
            self.arrived.notify_all()

    def add_metrics(self, req: ExportMetricsServiceRequest) -> None:
        with self.arrived:
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    self.metric_names.update(m.name for m in sm.metrics)
            self.arrived.notify_all()

    def add_logs(self, req: ExportLogsServiceRequest) -> None:
        with self.arrived:
            for rl in req.resource_logs:
                resource = attributes(rl.resource.attributes)
                for sl in rl.scope_logs:
                    self.logs.extend(
                        ReceivedLog(resource, sl.scope.name, r) for r in sl.log_records
                    )
            self.arrived.notify_all()

    def _wait(self, found: Callable[[], bool], what: str) -> None:
        with self.arrived:
            assert self.arrived.wait_for(found, WAIT_S), what

    def wait_span(self, trace_id: str) -> ReceivedSpan:
        wanted = bytes.fromhex(trace_id)
        found: list[ReceivedSpan] = []

        def match() -> bool:
            found[:] = [s for s in self.spans if s.span.trace_id == wanted]
            return bool(found)

        self._wait(match, f"no span of trace {trace_id}")
        (span,) = found
        return span

    def wait_log(self, request_id: str) -> ReceivedLog:
        """The one usage event of a request (more than one would be a duplicate)."""
        found: list[ReceivedLog] = []

        def match() -> bool:
            found[:] = [g for g in self.logs if g.attributes.get("request_id") == request_id]
            return bool(found)

        self._wait(match, f"no log event for request {request_id}")
        (log,) = found
        return log

    def wait_metric(self, name: str) -> None:
        self._wait(lambda: name in self.metric_names, f"no metric {name}: {self.metric_names}")

    def stop(self) -> None:
        self.server.shutdown()
