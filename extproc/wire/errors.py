"""Errors in OpenAI's own error shape.

Clients of the proxy are OpenAI SDKs: when we refuse a request they must see the same
`{"error": {...}}` body they would get from OpenAI, so their retry and error handling
keeps working. The same value carries errors read from a provider's stream.

A plain class rather than a frozen dataclass: Python's exception machinery (and
contextlib) assigns `__traceback__` and friends, which a frozen dataclass forbids.
"""

from __future__ import annotations

import json
from typing import Any

_STATUS_BY_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "insufficient_quota": 429,
    "rate_limit_exceeded": 429,
    "server_error": 500,
    "service_unavailable": 503,
}
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


class OpenAIError(Exception):
    __slots__ = ("code", "message", "param", "status", "type")

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def _key(self) -> tuple[int, str, str, str | None, str | None]:
        return (self.status, self.message, self.type, self.param, self.code)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OpenAIError):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"OpenAIError(status={self.status!r}, message={self.message!r}, type={self.type!r}, "
            f"param={self.param!r}, code={self.code!r})"
        )

    def __str__(self) -> str:
        return self.message

    def body(self) -> bytes:
        payload = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        return json.dumps(payload).encode("ascii")


def invalid_request(
    message: str, *, param: str | None = None, code: str | None = None, status: int = 400
) -> OpenAIError:
    return OpenAIError(status, message, "invalid_request_error", param, code)


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def error_from_payload(payload: Any, *, default_status: int = 500) -> OpenAIError:
    """Build an error from a provider's error object, whatever its shape.

    Stream errors arrive after a 200 status, so the HTTP status is inferred from the
    error's type or code; malformed payloads still yield a usable error.
    """
    if not isinstance(payload, dict):
        text = payload if isinstance(payload, str) and payload else "An error occurred"
        return OpenAIError(default_status, text, "server_error")
    message = _opt_str(payload.get("message")) or "An error occurred"
    code = _opt_str(payload.get("code"))
    etype = _opt_str(payload.get("type"))
    status = _STATUS_BY_TYPE.get(etype or "") or _STATUS_BY_TYPE.get(code or "") or default_status
    if etype is None:
        etype = _TYPE_BY_STATUS.get(status, "server_error")
    return OpenAIError(status, message, etype, _opt_str(payload.get("param")), code)


# -- the data path's own answers, in OpenAI's shape -----------------------------------------

MISSING_BODY = OpenAIError(
    400,
    "This endpoint needs a JSON request body; the request had none.",
    "invalid_request_error",
    None,
    "missing_body",
)
INTERNAL_ERROR = OpenAIError(
    500,
    "extproc could not process this request; it was not forwarded. Retrying is safe.",
    "server_error",
    None,
    "extproc_internal_error",
)


def unknown_url(method: str, path: str) -> OpenAIError:
    """OpenAI's answer for a path it does not serve; we refuse what we cannot classify."""
    return OpenAIError(
        404, f"Invalid URL ({method} {path[:200]})", "invalid_request_error", None, "unknown_url"
    )


def upstream_credential_missing(workspace: str, missing: str = "not configured") -> OpenAIError:
    """`missing` says what the operator must set: a variable or file name, never a value."""
    return OpenAIError(
        503,
        f"Workspace {workspace} has no upstream credential: {missing}. "
        "The gateway's operator must provide it where the sidecar runs.",
        "server_error",
        None,
        "upstream_credential_missing",
    )
