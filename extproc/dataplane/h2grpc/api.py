"""What an application hands the server: a handler object per RPC, and routes by path.

The handler sees raw message bytes, not protobuf objects, so the server never pays for
(de)serialisation it does not need and the application decides when to parse. A reply
returned synchronously is written in the same event-loop step that read the request;
an awaitable costs a task, so return one only when the reply really has to wait.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol


class Status(IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class GrpcError(Exception):
    """Raise from `on_message` to end the RPC with this status (no traceback is logged)."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


class GrpcStream(Protocol):
    """One RPC. Created per stream by the route's factory."""

    def on_message(self, data: bytes) -> bytes | Awaitable[bytes | None] | None:
        """One complete request message (serialized protobuf, gRPC prefix removed).

        Return the reply message bytes, None for no reply, or an awaitable of either.
        While an awaitable is pending, later messages of the same stream wait in order;
        replies are always sent in request order.
        """
        ...

    def on_end(self, cancelled: bool) -> None:
        """Called exactly once when the RPC ends.

        cancelled=False: the client half-closed and every reply (and the trailers) went out.
        cancelled=True: RST_STREAM, connection loss, server shutdown, or the RPC failed
        (handler exception, oversized or compressed message).
        """
        ...


@dataclass(frozen=True)
class Route:
    factory: Callable[[], GrpcStream]
    unary: bool = False  # after the first message's reply, send trailers and end the stream
