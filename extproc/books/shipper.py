"""`extproc ledger ship`: the Redis ledger streams, copied to daily files, exactly once.

For teams without a log pipeline. The shipper reads every workspace's ledger stream through
one consumer group, appends each record as a JSON line to `usage-YYYY-MM-DD.jsonl` (the UTC
day of the request), fsyncs, and only then acknowledges the entries. What it has not
acknowledged stays in the group's pending entries list, so a shipper killed at any instant
picks up exactly where it was on restart:

- killed before the fsync: the entries are pending and their lines may be missing or cut
  short. A torn last line is cut off when the file is next opened, and the records are
  written again.
- killed after the fsync but before the acknowledgement: the lines are on disk and the
  entries still pending. Before writing a pending record again, the shipper looks for its
  `request_id` among the last lines of its day file, where an unacknowledged batch can only
  be (entries are acknowledged batch by batch, so at most one batch per stream is ever
  pending), and skips the ones already there.

Pending entries of any consumer are claimed at start (XAUTOCLAIM), so a replacement pod
under a new name resumes what the old one left. Run exactly one replica: two shippers in
one group would split the streams between them and each append to the same files.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from extproc.books.records import ledger_streams
from extproc.metering.ledger import record_to_dict
from extproc.v1.ledger_pb2 import UsageRecord

log = logging.getLogger("extproc.books.shipper")

GROUP = "extproc-shipper"
BATCH = 500
TAIL_BYTES = 8 << 20  # comfortably more than one batch of lines
PAUSE_ENV = "EXTPROC_SHIP_TEST_PAUSE"  # tests only: "mid-write" or "before-ack"

Entry = tuple[bytes, UsageRecord]


def day_of(record: UsageRecord) -> str:
    return datetime.fromtimestamp(record.time_ms / 1000, UTC).strftime("%Y-%m-%d")


def file_for(directory: Path, day: str) -> Path:
    return directory / f"usage-{day}.jsonl"


def line_of(record: UsageRecord) -> bytes:
    return json.dumps(record_to_dict(record), separators=(",", ":")).encode() + b"\n"


def cut_torn_tail(path: Path) -> None:
    """A line cut short by a crash mid-write is dropped; its entry is still pending."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with path.open("rb+") as fh:
        fh.seek(max(size - TAIL_BYTES, 0))
        tail = fh.read()
        if tail.endswith(b"\n"):
            return
        keep = size - len(tail) + tail.rfind(b"\n") + 1
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    log.warning("ship: cut a torn last line from %s", path)


def recent_ids(path: Path) -> set[str]:
    """Request ids among the last TAIL_BYTES of a day file (the torn tail already cut)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(size - TAIL_BYTES, 0))
            tail = fh.read()
    except FileNotFoundError:
        return set()
    lines = tail.split(b"\n")
    if size > TAIL_BYTES:
        lines = lines[1:]  # the first one is probably a fragment
    ids = set()
    for line in lines:
        if line:
            ids.add(json.loads(line)["request_id"])
    return ids


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pause(point: str) -> None:
    """Test hook: stop at a named point of a batch so a test can kill -9 us right there."""
    if os.environ.get(PAUSE_ENV) == point:
        print(f"ship: paused at {point}", file=sys.stderr, flush=True)
        threading.Event().wait()


def append_durably(directory: Path, entries: list[Entry], check_ids: bool) -> int:
    """Append the records to their day files and fsync; returns the lines written."""
    by_day: dict[str, list[UsageRecord]] = defaultdict(list)
    for _id, record in entries:
        by_day[day_of(record)].append(record)
    written = 0
    for day, records in sorted(by_day.items()):
        path = file_for(directory, day)
        created = not path.exists()
        cut_torn_tail(path)
        if check_ids:
            present = recent_ids(path)
            records = [r for r in records if r.request_id not in present]
        data = b"".join(line_of(r) for r in records)
        with path.open("ab") as fh:
            half = len(data) // 2  # the test hook's pause point: in the middle of a line
            fh.write(data[:half])
            fh.flush()
            _pause("mid-write")
            fh.write(data[half:])
            fh.flush()
            os.fsync(fh.fileno())
        if created:
            _fsync_dir(directory)
        written += len(records)
    return written


@dataclass
class ShipStats:
    shipped: int = 0  # lines written
    acked: int = 0  # stream entries acknowledged
    skipped: int = 0  # pending records found already on disk


class Shipper:
    """Copies the ledger streams to `directory`; see the module docstring for the guarantees."""

    def __init__(
        self,
        client: Any,
        directory: str | Path,
        *,
        group: str = GROUP,
        consumer: str = "shipper",
        batch: int = BATCH,
    ) -> None:
        self._redis = client
        self.directory = Path(directory)
        self.group = group
        self.consumer = consumer
        self.batch = batch
        self.stats = ShipStats()
        self._joined: set[str] = set()

    def _join(self, stream: str) -> None:
        if stream in self._joined:
            return
        try:
            # From the very first entry: whatever the stream still holds gets shipped.
            self._redis.xgroup_create(stream, self.group, id="0", mkstream=True)
        except Exception as exc:  # BUSYGROUP: the group exists, which is what we want
            if "BUSYGROUP" not in str(exc):
                raise
        self._joined.add(stream)

    def _write_and_ack(self, stream: str, entries: list[Entry], pending: bool) -> None:
        if not entries:
            return
        before = self.stats.shipped
        self.stats.shipped += append_durably(self.directory, entries, check_ids=pending)
        self.stats.skipped += len(entries) - (self.stats.shipped - before)
        _pause("before-ack")
        self.stats.acked += self._redis.xack(stream, self.group, *(i for i, _r in entries))

    def recover(self, stream: str) -> None:
        """Claim every pending entry of the group and finish shipping it."""
        self._join(stream)
        start: Any = "0-0"
        while True:
            reply = self._redis.xautoclaim(
                stream, self.group, self.consumer, min_idle_time=0, start_id=start,
                count=self.batch,
            )  # fmt: skip
            start, claimed = reply[0], reply[1]
            gone = reply[2] if len(reply) > 2 else []
            if gone:  # trimmed away before we shipped them: nothing left to write
                log.error("ship: %d pending entries of %s were trimmed unshipped", len(gone),
                          stream)  # fmt: skip
                self._redis.xack(stream, self.group, *gone)
            entries = [_entry(i, f) for i, f in claimed if f]
            self._write_and_ack(stream, entries, pending=True)
            if start in (b"0-0", "0-0"):
                return

    def ship_new(self, stream: str) -> int:
        """One batch of new entries of one stream; returns how many were read."""
        self._join(stream)
        reply = self._redis.xreadgroup(self.group, self.consumer, {stream: ">"}, count=self.batch)
        entries = [_entry(i, f) for _s, rows in reply or [] for i, f in rows]
        self._write_and_ack(stream, entries, pending=False)
        return len(entries)

    def run(self, stop: threading.Event | None = None, *, once: bool = False,
            poll_seconds: float = 1.0) -> ShipStats:  # fmt: skip
        """Ship until `stop` is set (or, with `once`, until every stream is drained)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        stop = stop or threading.Event()
        for stream in ledger_streams(self._redis):
            self.recover(stream)
        while not stop.is_set():
            streams = ledger_streams(self._redis)
            for stream in streams:
                if stream not in self._joined:
                    self.recover(stream)
            read = sum(self._drain(stream, stop) for stream in streams)
            if once and read == 0:
                break
            if read == 0:
                stop.wait(poll_seconds)  # idle: poll for new streams and entries
        return self.stats

    def _drain(self, stream: str, stop: threading.Event) -> int:
        total = 0
        while not stop.is_set():
            n = self.ship_new(stream)
            total += n
            if n < self.batch:
                break
        return total


def _entry(entry_id: bytes | str, fields: dict[bytes, bytes]) -> Entry:
    raw = entry_id.encode() if isinstance(entry_id, str) else entry_id
    return raw, UsageRecord.FromString(fields[b"r"])


def read_shipped(directory: str | Path) -> Iterable[dict[str, Any]]:
    """Every shipped record, file by file (day order), line by line."""
    for path in sorted(Path(directory).glob("usage-*.jsonl")):
        with path.open("rb") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)
