"""The usage ledger: one record per metered request, stored in Redis, never lost.

Writes happen off the request path: the stream handler hands a finished record to
`Ledger.submit` (or, with `submit_later`, what builds it: the settlement is then made by the
writer, after the reply that released the response has left) and moves on; a single writer
task takes whatever has queued up and writes it in one pipelined round trip, one settle
script call per workspace (at most `SETTLE_MAX` settlements each). The script refuses a
request id it has already seen, so a retried write can never bill twice. A call Redis
refuses is split in halves and retried, so one bad settlement cannot hold back the others;
what still fails, and everything while Redis is unreachable, goes to an append-only spool
file and is replayed, in order, when it returns.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from extproc.metering.prices import usd
from extproc.store.clients import UNAVAILABLE, AsyncClient, ScriptClient
from extproc.store.schema import LEDGERS, REFUSED, UNATTRIBUTED, UNMETERED, ledger_key
from extproc.store.scripts import SETTLE
from extproc.v1.ledger_pb2 import Settlement, UsageRecord

log = logging.getLogger("extproc.metering.ledger")

Pending: TypeAlias = Settlement | Callable[[], Settlement]
"""A queued settlement, or what builds it (`Ledger.submit_later`)."""

_BATCH = 256
GATHER_SECONDS = 0.005
"""How long the writer waits for more when all it has are settlements that may wait (leased
requests'): at one request at a time, a few share a settle call and its round trip instead
of one each. Nobody waits for those: their lease covers their worst case until they land."""
SETTLE_MAX = 32
"""Settlements per settle script call. A script runs alone: Redis serves no other client
meanwhile (about 0.1 ms per settlement), so a call is kept short; a writer batch of 256
settlements for one workspace becomes 8 calls in the same round trip."""

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
    raw: dict[bytes, bytes] = await client.hgetall(UNMETERED)  # type: ignore[assignment]
    return {k.decode(): int(v) for k, v in raw.items()}


async def refused_counts(client: AsyncClient) -> dict[str, int]:
    """Requests refused before authentication, by reason."""
    raw: dict[bytes, bytes] = await client.hgetall(REFUSED)  # type: ignore[assignment]
    return {k.decode(): int(v) for k, v in raw.items()}


async def recent_records(client: AsyncClient, limit: int) -> list[UsageRecord]:
    """The newest records across every workspace's ledger, newest first."""
    streams = sorted(await client.smembers(LEDGERS))
    rows: list[tuple[tuple[int, int], bytes]] = []
    for stream in streams:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrevrange(  # type: ignore[assignment]
            stream, count=limit
        )
        for entry_id, fields in entries:
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
        on_settled: Callable[[str, str, str, int], None] | None = None,
        wait_replicas: int = 0,
        gather_seconds: float = GATHER_SECONDS,
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
        self._queue: deque[Pending] = deque()
        # The idle writer's wake-up: set by `submit`, or by the tick every `retry_seconds`
        # (one standing timer, not one armed and cancelled per record).
        self._wakeup: asyncio.Future[None] | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._gather = gather_seconds
        self._gathering = False  # the writer is waiting for more (`GATHER_SECONDS`)
        self._urgent = 0  # queued settlements that may not wait
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._unmetered: Counter[tuple[str, str]] = Counter()
        self._registered: set[str] = set()
        # Told (prefix, reservation id, request id, cost) once a settlement is in Redis: its
        # hold is released and no longer needs renewing, its lease has the worst case it
        # held back, less the cost (see Budgets.settled).
        self.on_settled = on_settled
        self._turned = time.monotonic()  # when the writer last went round its loop
        self._failed: list[Settlement] = []  # refused by Redis one by one: for the spool
        self.written = 0
        self.spooled = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")
        self._tick = asyncio.get_running_loop().call_later(self._retry_seconds, self._on_tick)

    def submit(self, settlement: Settlement) -> None:
        """Queue a finished request's settlement; never blocks, never raises."""
        self._idle.clear()
        self._queue.append(settlement)
        self._urgent += 1
        self._wake()

    def submit_later(self, build: Callable[[], Settlement], *, may_wait: bool = False) -> None:
        """Queue what builds a finished request's settlement: the writer calls it when it
        takes the batch, so building it costs the request's reply nothing. `build` must not
        raise (it falls back to a bare record itself); one that does is logged and skipped,
        its hold's orphan still in Redis for the reaper. `may_wait`: nobody waits for this
        settlement to land (a leased request's), so the writer may gather it with the next
        few, for at most `GATHER_SECONDS`."""
        self._idle.clear()
        queue = self._queue
        queue.append(build)
        if not may_wait:
            self._urgent += 1
        elif self._gathering and len(queue) < SETTLE_MAX:
            return
        self._wake()

    def _wake(self) -> None:
        waiter = self._wakeup
        if waiter is not None:
            self._wakeup = None
            if not waiter.done():
                waiter.set_result(None)

    def _on_tick(self) -> None:
        """Every `retry_seconds`: the idle writer looks at the spool and the counts."""
        self._wake()
        task = self._task
        if task is not None and not task.done():
            self._tick = asyncio.get_running_loop().call_later(self._retry_seconds, self._on_tick)

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
        waiting = bool(self._queue)
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
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @staticmethod
    def _settle_item(s: Settlement) -> list[Any]:
        """One settlement's part of a settle call (see settle.lua's ARGV)."""
        args: list[Any] = [
            s.record.request_id,
            s.reservation_id,
            s.period,
            s.day,
            s.hour,
            s.record.cost_nanos,
            s.record.SerializeToString(),
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
        ]
        return args

    def settle_args(self, settlements: list[Settlement]) -> list[Any]:
        """The arguments of one settle call for these settlements (one workspace)."""
        args: list[Any] = [len(settlements), self._max_records, SEEN_WINDOW_S]
        for s in settlements:
            args += self._settle_item(s)
        return args

    async def _write(self, batch: list[Settlement]) -> int:
        """Write a batch; returns how many records were new. Settlements Redis refused even
        one by one are left in `self._failed` (the caller spools them)."""
        unmetered, self._unmetered = self._unmetered, Counter()
        fresh = {s.prefix for s in batch} - self._registered
        calls = list(_calls(batch))
        try:
            replies = await self._pipeline(calls, unmetered, fresh)
        except BaseException:
            self._unmetered.update(unmetered)
            raise
        self._registered |= fresh
        written, retried = 0, False
        for call, reply in zip(calls, replies, strict=True):
            if isinstance(reply, RedisError):
                written += await self._retry(call, reply)
                retried = True
            else:
                written += self._settled(call, reply)
        if retried and self._wait_replicas:
            await self._wait()
        return written

    def _settled(self, call: list[Settlement], reply: list[Any]) -> int:
        """Book one call's reply: holds no longer to renew, soft limits crossed."""
        statuses = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if self.on_settled is not None:
            for s in call:
                if s.reservation_id:
                    self.on_settled(
                        s.prefix, s.reservation_id, s.record.request_id, s.record.cost_nanos
                    )
        crossed = [scope.decode() for scope in reply[1:]]
        if crossed and self._on_soft_alert is not None:
            self._on_soft_alert(call[0].record.workspace or UNATTRIBUTED, crossed)
        return statuses.count("1")

    async def _retry(self, call: list[Settlement], error: RedisError) -> int:
        """A call Redis refused: once more after reloading the script if it was forgotten,
        else in halves down to single settlements; those still refused wait in the spool."""
        if isinstance(error, NoScriptError):
            await SETTLE.load(self._redis)
        elif type(error) is not ResponseError:
            # Out of memory, read-only, loading...: not about these settlements but Redis
            # itself, which the spool waits out.
            raise error
        else:
            if len(call) == 1:
                log.error("ledger: redis refused the settlement of request %s (%s); spooled",
                          call[0].record.request_id, error)  # fmt: skip
                self._failed.append(call[0])
                return 0
            half = len(call) // 2
            return await self._retry_call(call[:half]) + await self._retry_call(call[half:])
        return await self._retry_call(call)

    async def _retry_call(self, call: list[Settlement]) -> int:
        try:
            reply = await SETTLE(self._redis, [call[0].prefix], self.settle_args(call))
        except ResponseError as exc:
            if type(exc) is not ResponseError:
                raise
            return await self._retry(call, exc)
        return self._settled(call, reply)

    async def _wait(self) -> None:
        acked = await self._redis.execute_command("WAIT", self._wait_replicas, WAIT_MS)
        if int(acked) < self._wait_replicas:
            raise NotReplicated(
                f"{acked} of {self._wait_replicas} replicas acknowledged the batch in {WAIT_MS} ms"
            )

    async def _pipeline(
        self, calls: list[list[Settlement]], unmetered: Counter[tuple[str, str]], fresh: set[str]
    ) -> list[Any]:
        """One round trip: the counts, new ledgers registered, one settle call per workspace
        chunk; the calls' replies (an error reply in place of a call Redis refused)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for (hash_key, key), n in unmetered.items():
                pipe.hincrby(hash_key, key, n)
            if fresh:
                pipe.sadd(LEDGERS, *(ledger_key(prefix) for prefix in fresh))
            for call in calls:
                SETTLE.queue(pipe, [call[0].prefix], self.settle_args(call))
            if self._wait_replicas:
                pipe.execute_command("WAIT", self._wait_replicas, WAIT_MS)
            results = await pipe.execute(raise_on_error=False)
        for result in results[: len(results) - len(calls) - bool(self._wait_replicas)]:
            if isinstance(result, Exception):
                raise result  # the counts or the registration: Redis is unwell
        if self._wait_replicas:
            acked = results.pop()
            if isinstance(acked, Exception):
                raise acked
            if int(acked) < self._wait_replicas:
                raise NotReplicated(
                    f"{acked} of {self._wait_replicas} replicas acknowledged the batch "
                    f"in {WAIT_MS} ms"
                )
        return results[len(results) - len(calls) :]

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
        if self._failed:
            refused, self._failed = len(self._failed), []
            raise RuntimeError(f"{refused} spooled settlements still refused; spool kept")
        self._spool.clear()
        log.warning("ledger: replayed %d spooled settlements into Redis", len(pending))

    async def _next_batch(self) -> list[Settlement]:
        queue = self._queue
        if not queue:
            # Only an empty queue is waited on, until a submission or the tick (so the spool
            # and the counts still get their turn).
            waiter = self._wakeup = asyncio.get_running_loop().create_future()
            await waiter
            if not queue:
                return []
        if self._gather > 0 and not self._urgent and len(queue) < SETTLE_MAX:
            await self._gather_more()
        batch: list[Settlement] = []
        while queue and len(batch) < _BATCH:
            item = queue.popleft()
            if isinstance(item, Settlement):
                batch.append(item)
                continue
            try:
                batch.append(item())
            except Exception:
                log.exception("ledger: building a settlement failed; its orphan stays")
        self._urgent = 1 if queue else 0  # what is left is taken next turn, without waiting
        return batch

    async def _gather_more(self) -> None:
        """All queued settlements may wait: wait for more, until `GATHER_SECONDS` have
        passed, one that may not wait arrives, or a settle call's worth has queued."""
        loop = asyncio.get_running_loop()
        waiter = self._wakeup = loop.create_future()
        timer = loop.call_later(self._gather, self._wake)
        self._gathering = True
        try:
            await waiter
        finally:
            self._gathering = False
            timer.cancel()

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
            batch = await self._next_batch()
            if healthy and (batch or self._unmetered):
                try:
                    self.written += await self._write(batch)
                    batch, self._failed = self._failed, []
                    healthy = not batch
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
            if not self._queue:
                self._idle.set()
            if not healthy:
                healthy = await self._try_replay()


def _calls(batch: list[Settlement]) -> Iterator[list[Settlement]]:
    """The batch as settle calls: by workspace (a call runs in one workspace's slot), in
    submission order within each, at most SETTLE_MAX settlements per call."""
    by_prefix: dict[str, list[Settlement]] = {}
    for s in batch:
        by_prefix.setdefault(s.prefix, []).append(s)
    for group in by_prefix.values():
        for start in range(0, len(group), SETTLE_MAX):
            yield group[start : start + SETTLE_MAX]
