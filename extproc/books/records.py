"""Reading the ledger back: the records of a time window, filtered, in time order.

Each workspace's ledger is a Redis stream whose entry ids are the write time. A record is
written after its request ended (seconds later for a long stream, much later when it waited
in the spool), so an entry id is never earlier than the record's own `time_ms`: a window
starting at `since` is found by reading each stream from `since` on, and keeping the records
whose own time falls in the window. Readers that must not miss a late record pass a larger
`until` margin; by default the scan runs to the end of each stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from extproc.store.schema import LEDGERS
from extproc.v1.ledger_pb2 import UsageRecord

PAGE = 1000


@dataclass(frozen=True, slots=True)
class RecordFilter:
    """Keep only records matching every field given (None: any)."""

    workspace: str | None = None
    team: str | None = None
    service: str | None = None
    key_id: str | None = None
    model: str | None = None  # the served model, else the requested one

    def __call__(self, r: UsageRecord) -> bool:
        return (
            (self.workspace is None or r.workspace == self.workspace)
            and (self.team is None or r.team == self.team)
            and (self.service is None or r.service == self.service)
            and (self.key_id is None or r.key_id == self.key_id)
            and (self.model is None or model_of(r) == self.model)
        )


def model_of(r: UsageRecord) -> str:
    return r.model_served or r.model_requested


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def parse_instant(text: str) -> datetime:
    """A date ("2026-11-30", midnight UTC) or an ISO 8601 time (UTC unless it has an offset)."""
    value = datetime.fromisoformat(text.strip())
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def ledger_streams(client: Any) -> list[str]:
    return sorted(_text(s) for s in client.smembers(LEDGERS))


def stream_records(client: Any, stream: str, since_ms: int) -> Iterator[UsageRecord]:
    """Every record of one ledger stream written at or after `since_ms`, oldest first."""
    start = f"{max(since_ms, 0)}-0"
    while True:
        rows = client.xrange(stream, min=start, count=PAGE)
        for _entry_id, fields in rows:
            yield UsageRecord.FromString(fields[b"r"])
        if len(rows) < PAGE:
            return
        start = "(" + _text(rows[-1][0])


def records_between(
    client: Any,
    since: datetime,
    until: datetime,
    where: RecordFilter | None = None,
) -> list[UsageRecord]:
    """Records with `since <= time < until`, across every workspace, in time order.

    `client` is a synchronous redis-py client (single node or cluster)."""
    lo, hi = ms(since), ms(until)
    keep = where or RecordFilter()
    found = [
        r
        for stream in ledger_streams(client)
        for r in stream_records(client, stream, lo)
        if lo <= r.time_ms < hi and keep(r)
    ]
    found.sort(key=lambda r: (r.time_ms, r.request_id))
    return found


def total_nanos(records: Iterable[UsageRecord]) -> int:
    return sum(r.cost_nanos for r in records)
