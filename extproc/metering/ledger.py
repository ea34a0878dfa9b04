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
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from extproc.metering.prices import usd
from extproc.store.clients import UNAVAILABLE, AsyncClient, ScriptClient
from extproc.store.schema import LEDGERS, REFUSED, UNATTRIBUTED, UNMETERED, ledger_key
from extproc.store.scripts import SETTLE
from extproc.v1.ledger_pb2 import Settlement, UsageRecord

log = logging.getLogger("extproc.metering.ledger")

_BATCH = 256

# Idempotency window: request ids stay in per-minute sets this long after their last write.
# Replays within it are refused by settle.lua; a spool older than it (a long outage) is
# first checked against the ledger stream, so the window only bounds memory, never safety.
SEEN_WINDOW_S = 900
SEEN_BUCKET_MS = 60_000
# How long before the spool's first write an ambiguous batch may have reached Redis.
_REPLAY_LOOKBACK_MS = 300_000


def record_to_dict(record: UsageRecord) -> dict[str, Any]:
    """Plain JSON-ready dict (ints stay ints, unlike protobuf's JSON mapping of int64)."""
    out: dict[str, Any] = {f.name: getattr(record, f.name) for f in record.DESCRIPTOR.fields}
    out["parts"] = [
        {"kind": p.kind, "quantity": p.quantity, "rate": p.rate, "detail": p.detail}
        for p in record.parts
    ]
    out["cost_usd"] = usd(record.cost_nanos)
    return out


class Spool:
    """Append-only file of settlements waiting for Redis; one base64 protobuf per line."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / "ledger.spool"

    @property
    def _started_path(self) -> Path:
        return self.path.with_name("ledger.spool.started")

    def started_ms(self) -> int | None:
        """When the first settlement of this spool was written (None: empty spool)."""
        try:
            return int(self._started_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None if not self.path.exists() else int(self.path.stat().st_mtime * 1000)

    def append(self, records: list[Settlement]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self._started_path.write_text(str(int(time.time() * 1000)))
        with self.path.open("ab") as fh:
            for r in records:
                fh.write(base64.b64encode(r.SerializeToString()) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[Settlement]:
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        return [Settlement.FromString(base64.b64decode(line)) for line in lines if line]

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self._started_path.unlink()


SoftAlert = Callable[[str, list[str]], None]
"""Called with (workspace name, scopes that just crossed their soft limit)."""


def _entry_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


async def unmetered_counts(client: AsyncClient) -> dict[str, int]:
    """Requests seen on paths extproc does not meter, by `METHOD /path/*`."""
    raw = await client.hgetall(UNMETERED)
    return {k.decode(): int(v) for k, v in raw.items()}


async def refused_counts(client: AsyncClient) -> dict[str, int]:
    """Requests refused before authentication, by reason."""
    raw = await client.hgetall(REFUSED)
    return {k.decode(): int(v) for k, v in raw.items()}


async def recent_records(client: AsyncClient, limit: int) -> list[UsageRecord]:
    """The newest records across every workspace's ledger, newest first."""
    streams = sorted(await client.smembers(LEDGERS))
    rows: list[tuple[tuple[int, int], bytes]] = []
    for stream in streams:
        for entry_id, fields in await client.xrevrange(stream, count=limit):
            rows.append((_entry_key(entry_id), fields[b"r"]))
    rows.sort(key=lambda row: row[0], reverse=True)
    return [UsageRecord.FromString(raw) for _key, raw in rows[:limit]]


WAIT_MS = 1000


class NotReplicated(RedisConnectionError):
    """The primary took the batch but too few replicas did: spool it, as if Redis were away."""


class Ledger:
    def __init__(
        self,
        client: ScriptClient,
        *,
        max_records: int = 1_000_000,
        spool_dir: str | Path = ".data/spool",
        retry_seconds: float = 1.0,
        on_soft_alert: SoftAlert | None = None,
        on_settled: Callable[[str, str], None] | None = None,
        wait_replicas: int = 0,
    ) -> None:
        self._redis = client
        # A batch counts as written only once this many replicas have it (WAIT): a primary
        # that dies before replicating must not take acknowledged spend with it. Below the
        # count, the batch is spooled and replayed (settlement is idempotent by request id).
        self._wait_replicas = wait_replicas
        self._max_records = max_records
        self._spool = Spool(spool_dir)
        self._retry_seconds = retry_seconds
        self._on_soft_alert = on_soft_alert
        self._queue: asyncio.Queue[Settlement] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._unmetered: Counter[tuple[str, str]] = Counter()
        self._registered: set[str] = set()
        # Told (prefix, reservation id) once a settlement is in Redis: its hold is released
        # and no longer needs renewing (see Budgets.renew).
        self.on_settled = on_settled
        self._turned = time.monotonic()  # when the writer last went round its loop
        self.written = 0
        self.spooled = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    def submit(self, settlement: Settlement) -> None:
        """Queue a finished request's settlement; never blocks, never raises."""
        self._idle.clear()
        self._queue.put_nowait(settlement)

    def alive(self, max_stall_seconds: float = 60.0) -> bool:
        """False once the writer has died or sat on pending records for `max_stall_seconds`.

        The liveness probe asks this: a sidecar whose event loop still answers but whose
        records no longer reach Redis or the spool is hung where it matters, and only a
        restart (its spool replayed on start) gets the records moving again.
        """
        task = self._task
        if task is None:
            return True
        if task.done():
            return False
        waiting = not self._queue.empty()
        return not waiting or time.monotonic() - self._turned < max_stall_seconds

    def note_unmetered(self, key: str) -> None:
        """Count a request on a path we do not meter; flushed to Redis with the next write."""
        self._unmetered[(UNMETERED, key)] += 1

    def note_refused(self, reason: str) -> None:
        """Count a request refused before authentication; flushed like `note_unmetered`."""
        self._unmetered[(REFUSED, reason)] += 1

    async def drain(self) -> None:
        """Wait until every submitted settlement is in Redis or in the spool."""
        await self._idle.wait()

    async def close(self) -> None:
        await self.drain()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _settle_args(self, s: Settlement) -> list[Any]:
        args: list[Any] = [
            s.record.request_id,
            s.reservation_id,
            s.period,
            s.day,
            s.hour,
            s.record.cost_nanos,
            s.record.SerializeToString(),
            self._max_records,
            len(s.scopes),
        ]
        for scope in s.scopes:
            args += [scope.scope, scope.soft_nanos]
        args += [
            s.hygiene_scope,
            s.prefix_fingerprint,
            s.prefix_tokens,
            s.record.input_tokens,
            s.record.cached_input_tokens,
            s.miss_nanos_per_token,
            s.record.time_ms // SEEN_BUCKET_MS,
            SEEN_WINDOW_S,
        ]
        return args

    async def _write(self, batch: list[Settlement]) -> int:
        unmetered, self._unmetered = self._unmetered, Counter()
        fresh = {s.prefix for s in batch} - self._registered
        try:
            results = await self._pipeline(batch, unmetered, fresh)
        except NoScriptError:
            # Only the scripts failed: the counts and the registration before them are in.
            await SETTLE.load(self._redis)
            results = await self._pipeline(batch, Counter(), set())
        except BaseException:
            self._unmetered.update(unmetered)
            raise
        self._registered |= fresh
        if self.on_settled is not None:
            for s in batch:
                if s.reservation_id:
                    self.on_settled(s.prefix, s.reservation_id)
        written = 0
        for settlement, result in zip(batch, results[len(results) - len(batch) :], strict=True):
            if not result or result[0] != b"ok":
                continue
            written += 1
            crossed = [scope.decode() for scope in result[1:]]
            if crossed and self._on_soft_alert is not None:
                self._on_soft_alert(settlement.record.workspace or UNATTRIBUTED, crossed)
        return written

    async def _pipeline(
        self, batch: list[Settlement], unmetered: Counter[tuple[str, str]], fresh: set[str]
    ) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for (hash_key, key), n in unmetered.items():
                pipe.hincrby(hash_key, key, n)
            if fresh:
                pipe.sadd(LEDGERS, *(ledger_key(prefix) for prefix in fresh))
            for s in batch:
                SETTLE.queue(pipe, [s.prefix], self._settle_args(s))
            if not self._wait_replicas:
                return await pipe.execute()
            pipe.execute_command("WAIT", self._wait_replicas, WAIT_MS)
            results = await pipe.execute()
        acked = results.pop()
        if int(acked) < self._wait_replicas:
            raise NotReplicated(
                f"{acked} of {self._wait_replicas} replicas acknowledged the batch in {WAIT_MS} ms"
            )
        return results

    async def _written_since(self, prefix: str, since_ms: int) -> set[str]:
        """Request ids in a workspace's ledger stream written at or after `since_ms`."""
        ids: set[str] = set()
        start = f"{max(since_ms, 0)}-0"
        while True:
            rows = await self._redis.execute_command(
                "XRANGE", ledger_key(prefix), start, "+", "COUNT", 1000
            )
            for _entry_id, fields in rows:
                raw = fields[b"r"] if isinstance(fields, dict) else dict(zip(
                    fields[::2], fields[1::2], strict=True))[b"r"]  # fmt: skip
                ids.add(UsageRecord.FromString(raw).request_id)
            if len(rows) < 1000:
                return ids
            last = rows[-1][0]
            start = "(" + (last.decode() if isinstance(last, bytes) else last)

    async def _unwritten(self, pending: list[Settlement], started_ms: int) -> list[Settlement]:
        """Drop spooled settlements the ledger already holds: an old spool's ids may have
        left the idempotency window, and its last batch may have reached Redis after all."""
        since = started_ms - _REPLAY_LOOKBACK_MS
        written: set[str] = set()
        for prefix in {s.prefix for s in pending}:
            written |= await self._written_since(prefix, since)
        kept = [s for s in pending if s.record.request_id not in written]
        if len(kept) < len(pending):
            log.warning("ledger: %d spooled settlements were already in the ledger",
                        len(pending) - len(kept))  # fmt: skip
        return kept

    async def _replay_spool(self) -> None:
        pending = self._spool.read()
        if not pending:
            return
        started = self._spool.started_ms()
        if started is not None and time.time() * 1000 - started > (SEEN_WINDOW_S - 60) * 1000:
            pending = await self._unwritten(pending, started)
        for start in range(0, len(pending), _BATCH):
            await self._write(pending[start : start + _BATCH])
        self._spool.clear()
        log.warning("ledger: replayed %d spooled settlements into Redis", len(pending))

    async def _next_batch(self, timeout: float | None) -> list[Settlement]:
        if self._queue.empty():
            # Only an empty queue is waited on (with a timeout, so the spool and the counts
            # still get their turn): arming a timeout costs more than taking a record.
            try:
                async with asyncio.timeout(timeout):
                    batch = [await self._queue.get()]
            except TimeoutError:
                return []
        else:
            batch = [self._queue.get_nowait()]
        while len(batch) < _BATCH and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _try_replay(self) -> bool:
        try:
            await self._replay_spool()
        except UNAVAILABLE as exc:
            log.debug("ledger: redis unavailable: %s", exc)
            return False
        except Exception:
            log.exception("ledger: spool replay failed; will retry")
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
                except UNAVAILABLE as exc:
                    healthy = False
                    log.warning("ledger: redis write failed, spooling (%s)", exc)
                except Exception:
                    # Whatever a client library throws, the writer must live on and the
                    # records must land somewhere: the spool keeps them for the replay.
                    healthy = False
                    log.exception("ledger: unexpected write failure, spooling")
            if batch:
                self._spool.append(batch)
                self.spooled += len(batch)
            self._turned = time.monotonic()
            if self._queue.empty():
                self._idle.set()
            if not healthy:
                healthy = await self._try_replay()
