"""Stands for the `otel-collector` Service in a test node: OTLP in, a line per span out.

The Collector's own image cannot run here, so this receives what the pods send it: OTLP/HTTP
on 4318 (the sidecar) and OTLP/gRPC on 4317 (Envoy's tracer), and appends
`{"service": ..., "span": ...}` per span to FILE. Usage: otlp_standin.py FILE
"""

from __future__ import annotations

import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

_lock = threading.Lock()


def record(path: str, request: ExportTraceServiceRequest) -> None:
    lines = []
    for rs in request.resource_spans:
        service = next(
            (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), ""
        )
        for ss in rs.scope_spans:
            lines += [json.dumps({"service": service, "span": s.name}) for s in ss.spans]
    with _lock, open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))


def main(path: str) -> None:
    class Http(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.path == "/v1/traces":
                record(path, ExportTraceServiceRequest.FromString(body))
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    def export(request: ExportTraceServiceRequest, _context: object) -> ExportTraceServiceResponse:
        record(path, request)
        return ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(4))
    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {
            "Export": grpc.unary_unary_rpc_method_handler(
                export,
                request_deserializer=ExportTraceServiceRequest.FromString,
                response_serializer=ExportTraceServiceResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port("0.0.0.0:4317")
    server.start()
    http = ThreadingHTTPServer(("0.0.0.0", 4318), Http)
    print("otlp stand-in listening", flush=True)
    http.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1])
