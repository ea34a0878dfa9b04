from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message

DESCRIPTOR: _descriptor.FileDescriptor

class UsageRecord(_message.Message):
    __slots__ = (
        "cached_input_tokens",
        "cost_nanos",
        "counted_input_tokens",
        "duration_ms",
        "endpoint",
        "envoy_request_id",
        "error_code",
        "estimated",
        "input_tokens",
        "key_id",
        "model_requested",
        "model_served",
        "outcome",
        "output_cap",
        "output_tokens",
        "price_fallback",
        "price_family",
        "price_version",
        "reasoning_tokens",
        "request_id",
        "service",
        "session_id",
        "status",
        "stream",
        "team",
        "time_ms",
        "workspace",
    )
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    MODEL_SERVED_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COUNTED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_NANOS_FIELD_NUMBER: _ClassVar[int]
    PRICE_FAMILY_FIELD_NUMBER: _ClassVar[int]
    PRICE_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    PRICE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ENVOY_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_CAP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    time_ms: int
    endpoint: str
    model_requested: str
    model_served: str
    stream: bool
    status: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    counted_input_tokens: int
    cost_nanos: int
    price_family: str
    price_fallback: bool
    price_version: str
    estimated: bool
    outcome: str
    error_code: str
    workspace: str
    team: str
    service: str
    key_id: str
    session_id: str
    envoy_request_id: str
    duration_ms: int
    output_cap: int
    def __init__(
        self,
        request_id: str | None = ...,
        time_ms: int | None = ...,
        endpoint: str | None = ...,
        model_requested: str | None = ...,
        model_served: str | None = ...,
        stream: bool | None = ...,
        status: int | None = ...,
        input_tokens: int | None = ...,
        cached_input_tokens: int | None = ...,
        output_tokens: int | None = ...,
        reasoning_tokens: int | None = ...,
        counted_input_tokens: int | None = ...,
        cost_nanos: int | None = ...,
        price_family: str | None = ...,
        price_fallback: bool | None = ...,
        price_version: str | None = ...,
        estimated: bool | None = ...,
        outcome: str | None = ...,
        error_code: str | None = ...,
        workspace: str | None = ...,
        team: str | None = ...,
        service: str | None = ...,
        key_id: str | None = ...,
        session_id: str | None = ...,
        envoy_request_id: str | None = ...,
        duration_ms: int | None = ...,
        output_cap: int | None = ...,
    ) -> None: ...
