"""Every usage record as an OpenTelemetry log event, `extproc.usage`.

The Redis ledger is short-lived by design; a log pipeline is where durable, queryable
history already lives in most platforms. Emitting each record as an OTLP log event lets the
OpenTelemetry Collector route it to whatever store a team runs (ClickHouse, S3, Loki,
BigQuery...) without extproc knowing about any of them. The attributes are the record's
fields under their protobuf names (plus `cost_usd`, the exact decimal), so a row in the
store and a line of `extproc ledger export --format jsonl` have the same columns.

Switched on by the standard `OTEL_LOGS_EXPORTER` (`otlp` or `console`) alone: unlike traces
and metrics, a configured OTLP endpoint is not enough, because one event per request is a
volume an operator should choose. Records leave through a batch processor
on its own thread: the request path only appends to a queue.
"""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.util.types import AttributeValue

from extproc.metering.ledger import record_to_dict
from extproc.v1.ledger_pb2 import UsageRecord

EVENT_NAME = "extproc.usage"
SCOPE = "extproc.usage"


def usage_attributes(record: UsageRecord) -> dict[str, AttributeValue]:
    """The record's fields, every one of them (empty ones too: a store wants fixed columns)."""
    attrs: dict[str, AttributeValue] = dict(record_to_dict(record))
    attrs["event.name"] = EVENT_NAME  # for receivers that predate LogRecord.event_name
    return attrs


class UsageEvents:
    """Emits one log event per finished request; `emit` never raises into the caller."""

    __slots__ = ("_logger", "_provider")

    def __init__(self, provider: LoggerProvider) -> None:
        self._provider = provider
        self._logger = provider.get_logger(SCOPE)

    def emit(self, record: UsageRecord, end_ns: int) -> None:
        self._logger.emit(
            timestamp=end_ns,
            observed_timestamp=end_ns,
            severity_number=SeverityNumber.INFO,
            severity_text="INFO",
            body=EVENT_NAME,
            attributes=usage_attributes(record),
            event_name=EVENT_NAME,
        )

    def shutdown(self) -> None:
        self._provider.shutdown()


def usage_events(
    names: tuple[str, ...],
    resource: Resource,
    otlp: Callable[[], LogRecordExporter],
) -> UsageEvents | None:
    """The emitter for the exporters `names` ("otlp", "console"); None when there are none."""
    if not names:
        return None
    provider = LoggerProvider(resource=resource)
    for name in names:
        if name == "console":
            from opentelemetry.sdk._logs.export import ConsoleLogRecordExporter

            exporter: LogRecordExporter = ConsoleLogRecordExporter()
        else:
            exporter = otlp()
        provider.add_log_record_processor(BatchLogRecordProcessor(exporter))
    return UsageEvents(provider)
