"""`grpc.health.v1.Health/Check` on our server, for Envoy's and Kubernetes' gRPC probes.

The application keeps the truth about its own health (a function of the service name);
this only speaks the protocol. `Watch` is left unrouted and so answers UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from extproc.dataplane.h2grpc.api import GrpcError, Route, Status

HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"
_SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class _HealthCheck:
    __slots__ = ("_status",)

    def __init__(self, status: Callable[[str], int]) -> None:
        self._status = status

    def on_message(self, data: bytes) -> bytes:
        try:
            request = health_pb2.HealthCheckRequest.FromString(data)
        except DecodeError:
            raise GrpcError(Status.INVALID_ARGUMENT, "bad HealthCheckRequest") from None
        status = self._status(request.service)
        if status == _SERVICE_UNKNOWN:
            raise GrpcError(Status.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status).SerializeToString()  # type: ignore[arg-type]

    def on_end(self, cancelled: bool) -> None:
        pass


def health_route(status: Callable[[str], int]) -> Route:
    """A unary route answering with `status(service)` (a HealthCheckResponse.ServingStatus)."""
    return Route(lambda: _HealthCheck(status), unary=True)
