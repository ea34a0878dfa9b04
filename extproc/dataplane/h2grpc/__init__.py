"""A minimal gRPC-over-HTTP/2 server on asyncio, shaped for Envoy's ext_proc traffic.

grpcio's server costs 200-300 us of CPU per message on this workload, more than our whole
per-request budget. Envoy's gRPC client only needs h2c with prior knowledge,
length-prefixed messages and trailers, which fits in a few dozen microseconds per
message (`bench/bench_h2grpc.py` measures both).
"""

from __future__ import annotations

from extproc.dataplane.h2grpc.api import GrpcError, GrpcStream, Route, Status
from extproc.dataplane.h2grpc.health import HEALTH_CHECK_PATH, health_route
from extproc.dataplane.h2grpc.server import GrpcServer

__all__ = [
    "HEALTH_CHECK_PATH",
    "GrpcError",
    "GrpcServer",
    "GrpcStream",
    "Route",
    "Status",
    "health_route",
]
