"""The usage ledger: one record per metered request, stored in Redis, never lost.

Writes happen off the request path: the stream handler hands a finished record to
`Ledger.submit` and moves on; a single writer task batches records into one pipelined
round trip. Each record is written by a Lua script that refuses a request id it has
already seen, so a retried write can never bill twice. When Redis is unreachable the
records go to an append-only spool file and are replayed, in order, when it returns.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from extproc.prices import NANOS_PER_DOLLAR
from extproc.v1.ledger_pb2 import UsageRecord

log = logging.getLogger("extproc.ledger")

# One hash tag for the ledger keys: the script touches them together, so on Redis Cluster
# they must live in one slot.
STREAM_KEY = "{extproc:ledger}:records"
SEEN_PREFIX = "{extproc:ledger}:seen:"
UNMETERED_KEY = "{extproc:ledger}:unmetered"
SEEN_TTL_SECONDS = 7 * 24 * 3600

_WRITE = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'r', ARGV[1])
  return 1
end
return 0
"""

_BATCH = 256


def record_to_dict(record: UsageRecord) -> dict[str, Any]:
    """Plain JSON-ready dict (ints stay ints, unlike protobuf's JSON mapping of int64)."""
    out: dict[str, Any] = {f.name: getattr(record, f.name) for f in record.DESCRIPTOR.fields}
    out["cost_usd"] = str(Decimal(record.cost_nanos) / NANOS_PER_DOLLAR)
    return out


class Spool:
    """Append-only file of records waiting for Redis; one base64 protobuf per line."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / "ledger.spool"

    def append(self, records: list[UsageRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as fh:
            for r in records:
                fh.write(base64.b64encode(r.SerializeToString()) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[UsageRecord]:
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        return [UsageRecord.FromString(base64.b64decode(line)) for line in lines if line]

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Ledger:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        max_records: int = 1_000_000,
        spool_dir: str | Path = ".data/spool",
        retry_seconds: float = 1.0,
    ) -> None:
        self._redis = client
        self._script = client.register_script(_WRITE)
        self._max_records = max_records
        self._spool = Spool(spool_dir)
        self._retry_seconds = retry_seconds
        self._queue: asyncio.Queue[UsageRecord] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._unmetered: Counter[str] = Counter()
        self.written = 0
        self.spooled = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    def submit(self, record: UsageRecord) -> None:
        """Queue a finished record; never blocks, never raises."""
        self._idle.clear()
        self._queue.put_nowait(record)

    def note_unmetered(self, key: str) -> None:
        """Count a request on a path we do not meter; flushed to Redis with the next write."""
        self._unmetered[key] += 1

    async def unmetered(self) -> dict[str, int]:
        raw = await self._redis.hgetall(UNMETERED_KEY)
        return {k.decode(): int(v) for k, v in raw.items()}

    async def drain(self) -> None:
        """Wait until every submitted record is in Redis or in the spool."""
        await self._idle.wait()

    async def close(self) -> None:
        await self.drain()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def recent(self, limit: int) -> list[UsageRecord]:
        rows = await self._redis.xrevrange(STREAM_KEY, count=limit)
        return [UsageRecord.FromString(fields[b"r"]) for _id, fields in rows]

    async def _write(self, records: list[UsageRecord]) -> int:
        unmetered, self._unmetered = self._unmetered, Counter()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, n in unmetered.items():
                    pipe.hincrby(UNMETERED_KEY, key, n)
                for r in records:
                    await self._script(
                        keys=[STREAM_KEY, SEEN_PREFIX + r.request_id],
                        args=[r.SerializeToString(), self._max_records, SEEN_TTL_SECONDS],
                        client=pipe,
                    )
                results = await pipe.execute()
        except BaseException:
            self._unmetered.update(unmetered)
            raise
        return sum(1 for x in results[len(unmetered) :] if x == 1)

    async def _replay_spool(self) -> None:
        pending = self._spool.read()
        if not pending:
            return
        for start in range(0, len(pending), _BATCH):
            await self._write(pending[start : start + _BATCH])
        self._spool.clear()
        log.warning("ledger: replayed %d spooled records into Redis", len(pending))

    async def _next_batch(self, timeout: float | None) -> list[UsageRecord]:
        try:
            async with asyncio.timeout(timeout):
                batch = [await self._queue.get()]
        except TimeoutError:
            return []
        while len(batch) < _BATCH and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _try_replay(self) -> bool:
        try:
            await self._replay_spool()
        except (RedisError, OSError) as exc:
            log.debug("ledger: redis unavailable: %s", exc)
            return False
        return True

    async def _run(self) -> None:
        healthy = await self._try_replay()
        while True:
            batch = await self._next_batch(self._retry_seconds)
            if healthy and (batch or self._unmetered):
                try:
                    self.written += await self._write(batch)
                    batch = []
                except (RedisError, OSError) as exc:
                    healthy = False
                    log.warning("ledger: redis write failed, spooling (%s)", exc)
            if batch:
                self._spool.append(batch)
                self.spooled += len(batch)
            if self._queue.empty():
                self._idle.set()
            if not healthy:
                healthy = await self._try_replay()
