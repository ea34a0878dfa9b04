"""Per-request fault selection from the `x-sim-fault` header.

Tests drive upstream misbehaviour request by request, so the fault plan is a pure
function of one header and travels with the request; nothing is global.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HEADER = "x-sim-fault"


@dataclass(frozen=True, slots=True)
class Faults:
    status: int | None = None
    code: str | None = None
    delay_ms: int = 0
    cut_after: int | None = None
    no_usage: bool = False
    error_event: bool = False
    event_delay_ms: int = 0


class FaultSyntaxError(ValueError):
    """The header names a fault we do not know, or gives it a bad value."""


_INT_KEYS = {"status", "delay-ms", "cut-after", "event-delay-ms"}
_FLAGS = {"no-usage": "no_usage", "error-event": "error_event"}


def parse_faults(header: str | None) -> Faults:
    if not header:
        return Faults()
    values: dict[str, Any] = {}
    for raw in header.split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if key in _FLAGS and not sep:
            values[_FLAGS[key]] = True
        elif key in _INT_KEYS and sep:
            try:
                number = int(value)
            except ValueError as exc:
                raise FaultSyntaxError(f"{key} needs an integer, got {value!r}") from exc
            if number < 0:
                raise FaultSyntaxError(f"{key} must not be negative")
            values[key.replace("-", "_")] = number
        elif key == "code" and sep:
            values["code"] = value.strip()
        else:
            raise FaultSyntaxError(f"unknown fault {item!r}")
    return Faults(**values)


_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests. Please try again in 1s.",
    ),
    500: (
        "server_error",
        "server_error",
        "The server had an error while processing your request. Sorry about that!",
    ),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_QUOTA = (
    "insufficient_quota",
    "insufficient_quota",
    "You exceeded your current quota, please check your plan and billing details.",
)


def error_body(
    status: int, code: str | None = None, message: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope for `status`, optionally with a chosen `code`."""
    if status == 429 and code == "insufficient_quota":
        kind, default_code, default_message = _QUOTA
    else:
        kind, default_code, default_message = _ERRORS.get(
            status, ("server_error" if status >= 500 else "invalid_request_error", None, "Error.")
        )
    return {
        "error": {
            "message": message or default_message,
            "type": kind,
            "param": param,
            "code": code if code is not None else default_code,
        }
    }
