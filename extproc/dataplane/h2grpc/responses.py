"""The header blocks a gRPC server sends, encoded once.

Each block uses only static-table indexes and literals without indexing, so sending it
never touches the peer's dynamic table and any number of streams can share the bytes.
"""

from __future__ import annotations

from extproc.dataplane.h2grpc.hpack import encode_int, encode_literal

_STATUS_200 = b"\x88"  # indexed field 8 of the static table
_CONTENT_TYPE = encode_int(31, 4) + encode_int(16, 7) + b"application/grpc"
MAX_GRPC_MESSAGE = 1024

RESPONSE_HEADERS = _STATUS_200 + _CONTENT_TYPE
_UNRESERVED = frozenset(range(0x20, 0x7F)) - {ord("%")}


def percent_encode(message: str) -> bytes:
    """grpc-message encoding: UTF-8, then %XX for bytes outside printable ASCII and '%'."""
    raw = message.encode("utf-8", "replace")[:MAX_GRPC_MESSAGE]
    if all(b in _UNRESERVED for b in raw):
        return raw
    return b"".join(bytes((b,)) if b in _UNRESERVED else b"%%%02X" % b for b in raw)


def trailers(status: int, message: str = "") -> bytes:
    block = encode_literal(b"grpc-status", str(int(status)).encode())
    if message:
        block += encode_literal(b"grpc-message", percent_encode(message))
    return block


def trailers_only(status: int, message: str = "") -> bytes:
    """A whole response in one HEADERS frame, for RPCs that fail before any reply."""
    return RESPONSE_HEADERS + trailers(status, message)


OK_TRAILERS = trailers(0)
