"""The OpenTelemetry GenAI client metrics, beside extproc's own.

Dashboards built for the GenAI semantic conventions (Grafana's, Datadog's, the vendors'
LLM views) look for two histograms, whatever the client: `gen_ai.client.token.usage`
(tokens per call, by `gen_ai.token.type` input/output) and
`gen_ai.client.operation.duration` (seconds per call). extproc sees every call to the
provider, so it records both once per request that reached the provider, with the
buckets the conventions advise. In Prometheus they read `gen_ai_client_token_usage_*`
and `gen_ai_client_operation_duration_seconds_*`.

The model attributes carry the names clients and the provider used, not the price-table
family of `extproc_*` metrics, because that is what the conventions mean by them. A
client may send any model name, so each process reports at most `MODEL_NAMES` distinct
names per attribute and folds the rest into `_OTHER` (the conventions' value for "not in
the known set"): a typo loop cannot blow up the series count.
"""

from __future__ import annotations

import threading

from opentelemetry.metrics import Histogram, Meter
from opentelemetry.util.types import AttributeValue

from extproc.v1.ledger_pb2 import UsageRecord

TOKEN_USAGE = "gen_ai.client.token.usage"
OPERATION_DURATION = "gen_ai.client.operation.duration"
TOKEN_BUCKETS = tuple(4**k for k in range(14))  # 1 .. 67,108,864, as the conventions advise
DURATION_BUCKETS_S = tuple(0.01 * 2**k for k in range(14))  # 0.01 .. 81.92 s
MODEL_NAMES = 64
OTHER = "_OTHER"


class BoundedNames:
    """The first `limit` distinct names pass through; later new ones become `_OTHER`."""

    __slots__ = ("_limit", "_lock", "_seen")

    def __init__(self, limit: int = MODEL_NAMES) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._seen: set[str] = set()

    def __call__(self, name: str) -> str:
        if name in self._seen:
            return name
        with self._lock:
            if len(self._seen) >= self._limit:
                return OTHER
            self._seen.add(name)
        return name


def reached_provider(record: UsageRecord) -> bool:
    """Refused by extproc itself (budget, rate, bad input): no provider call to describe."""
    return record.outcome != "rejected"


class GenAIMetrics:
    """The two histograms on `meter`; `record` adds one provider call to both."""

    __slots__ = ("_duration", "_requested", "_served", "_tokens")

    def __init__(self, meter: Meter) -> None:
        self._tokens: Histogram = meter.create_histogram(
            TOKEN_USAGE,
            unit="{token}",
            description="Number of input and output tokens used per provider call.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self._duration: Histogram = meter.create_histogram(
            OPERATION_DURATION,
            unit="s",
            description="Duration of provider calls, from request headers to the last byte.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
        )
        self._requested = BoundedNames()
        self._served = BoundedNames()

    def record(
        self,
        record: UsageRecord,
        *,
        operation: str,
        provider: str,
        duration_s: float,
        error_type: str | None,
    ) -> None:
        if not reached_provider(record):
            return
        attrs: dict[str, AttributeValue] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": provider,
        }
        if record.model_requested:
            attrs["gen_ai.request.model"] = self._requested(record.model_requested)
        if record.model_served:
            attrs["gen_ai.response.model"] = self._served(record.model_served)
        timed = dict(attrs)
        if error_type:
            timed["error.type"] = error_type
        self._duration.record(max(duration_s, 0.0), timed)
        if error_type and not (record.input_tokens or record.output_tokens):
            return  # a failed call with no usage: nothing to describe
        self._tokens.record(record.input_tokens, {**attrs, "gen_ai.token.type": "input"})
        self._tokens.record(record.output_tokens, {**attrs, "gen_ai.token.type": "output"})
