from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UsageRecord(_message.Message):
    __slots__ = ("request_id", "time_ms", "endpoint", "model_requested", "model_served", "stream", "status", "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens", "counted_input_tokens", "cache_write_tokens", "input_audio_tokens", "output_audio_tokens", "output_image_tokens", "cost_nanos", "price_family", "price_fallback", "price_version", "service_tier", "price_tier", "price_threshold", "price_source", "catalogue_version", "override_version", "price_provisional", "estimated", "outcome", "error_code", "workspace", "team", "service", "key_id", "session_id", "envoy_request_id", "duration_ms", "output_cap", "routing", "rule", "shadow", "web_search_calls", "file_search_calls", "code_interpreter_containers", "image_generations", "parts", "adjustment", "request_fingerprint")
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
    CACHE_WRITE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INPUT_AUDIO_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_AUDIO_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_IMAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_NANOS_FIELD_NUMBER: _ClassVar[int]
    PRICE_FAMILY_FIELD_NUMBER: _ClassVar[int]
    PRICE_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    PRICE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TIER_FIELD_NUMBER: _ClassVar[int]
    PRICE_TIER_FIELD_NUMBER: _ClassVar[int]
    PRICE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PRICE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    CATALOGUE_VERSION_FIELD_NUMBER: _ClassVar[int]
    OVERRIDE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRICE_PROVISIONAL_FIELD_NUMBER: _ClassVar[int]
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
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    WEB_SEARCH_CALLS_FIELD_NUMBER: _ClassVar[int]
    FILE_SEARCH_CALLS_FIELD_NUMBER: _ClassVar[int]
    CODE_INTERPRETER_CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    ADJUSTMENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
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
    cache_write_tokens: int
    input_audio_tokens: int
    output_audio_tokens: int
    output_image_tokens: int
    cost_nanos: int
    price_family: str
    price_fallback: bool
    price_version: str
    service_tier: str
    price_tier: str
    price_threshold: int
    price_source: str
    catalogue_version: str
    override_version: str
    price_provisional: bool
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
    routing: str
    rule: str
    shadow: str
    web_search_calls: int
    file_search_calls: int
    code_interpreter_containers: int
    image_generations: int
    parts: _containers.RepeatedCompositeFieldContainer[CostPart]
    adjustment: str
    request_fingerprint: str
    def __init__(self, request_id: _Optional[str] = ..., time_ms: _Optional[int] = ..., endpoint: _Optional[str] = ..., model_requested: _Optional[str] = ..., model_served: _Optional[str] = ..., stream: _Optional[bool] = ..., status: _Optional[int] = ..., input_tokens: _Optional[int] = ..., cached_input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., reasoning_tokens: _Optional[int] = ..., counted_input_tokens: _Optional[int] = ..., cache_write_tokens: _Optional[int] = ..., input_audio_tokens: _Optional[int] = ..., output_audio_tokens: _Optional[int] = ..., output_image_tokens: _Optional[int] = ..., cost_nanos: _Optional[int] = ..., price_family: _Optional[str] = ..., price_fallback: _Optional[bool] = ..., price_version: _Optional[str] = ..., service_tier: _Optional[str] = ..., price_tier: _Optional[str] = ..., price_threshold: _Optional[int] = ..., price_source: _Optional[str] = ..., catalogue_version: _Optional[str] = ..., override_version: _Optional[str] = ..., price_provisional: _Optional[bool] = ..., estimated: _Optional[bool] = ..., outcome: _Optional[str] = ..., error_code: _Optional[str] = ..., workspace: _Optional[str] = ..., team: _Optional[str] = ..., service: _Optional[str] = ..., key_id: _Optional[str] = ..., session_id: _Optional[str] = ..., envoy_request_id: _Optional[str] = ..., duration_ms: _Optional[int] = ..., output_cap: _Optional[int] = ..., routing: _Optional[str] = ..., rule: _Optional[str] = ..., shadow: _Optional[str] = ..., web_search_calls: _Optional[int] = ..., file_search_calls: _Optional[int] = ..., code_interpreter_containers: _Optional[int] = ..., image_generations: _Optional[int] = ..., parts: _Optional[_Iterable[_Union[CostPart, _Mapping]]] = ..., adjustment: _Optional[str] = ..., request_fingerprint: _Optional[str] = ...) -> None: ...

class CostPart(_message.Message):
    __slots__ = ("kind", "quantity", "rate", "detail")
    KIND_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    kind: str
    quantity: int
    rate: int
    detail: str
    def __init__(self, kind: _Optional[str] = ..., quantity: _Optional[int] = ..., rate: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class ScopeCharge(_message.Message):
    __slots__ = ("scope", "soft_nanos")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    SOFT_NANOS_FIELD_NUMBER: _ClassVar[int]
    scope: str
    soft_nanos: int
    def __init__(self, scope: _Optional[str] = ..., soft_nanos: _Optional[int] = ...) -> None: ...

class Settlement(_message.Message):
    __slots__ = ("prefix", "reservation_id", "period", "day", "hour", "scopes", "record", "hygiene_scope", "prefix_fingerprint", "prefix_tokens", "miss_nanos_per_token")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    DAY_FIELD_NUMBER: _ClassVar[int]
    HOUR_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    HYGIENE_SCOPE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MISS_NANOS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    reservation_id: str
    period: str
    day: str
    hour: str
    scopes: _containers.RepeatedCompositeFieldContainer[ScopeCharge]
    record: UsageRecord
    hygiene_scope: str
    prefix_fingerprint: str
    prefix_tokens: int
    miss_nanos_per_token: int
    def __init__(self, prefix: _Optional[str] = ..., reservation_id: _Optional[str] = ..., period: _Optional[str] = ..., day: _Optional[str] = ..., hour: _Optional[str] = ..., scopes: _Optional[_Iterable[_Union[ScopeCharge, _Mapping]]] = ..., record: _Optional[_Union[UsageRecord, _Mapping]] = ..., hygiene_scope: _Optional[str] = ..., prefix_fingerprint: _Optional[str] = ..., prefix_tokens: _Optional[int] = ..., miss_nanos_per_token: _Optional[int] = ...) -> None: ...
