"""The watch behind the runaway breaker and the end of top-ups, off the request path.

Every `breaker_check_seconds` (1 s by default) one replica, the holder of a short lease in
Redis, reads the ledger records written since its last look (one XRANGE per workspace),
feeds them to the breaker's rules (`governance.breaker.Detector`), and acts on each trip:
the key is paused (`governance.pauses`: every sidecar refuses it within a second), its
approvers and the subscribed webhooks are told, and the trip is audited. In `dry_run` it only
tells and audits what would have been paused. A `SET NX` marker per key, rule and window
makes each trip act once even if two replicas believed they held the lease.

The same look ends the top-up grants whose time is up (`TopupStore.expire`: each one once,
whoever deletes it) and tells their requesters. The cap never waits for this: a grant past its
time no longer counts anywhere (`governance.live`).

Nothing on the request path changes: the records are the ones the ledger writes anyway, and
a pause reaches the sidecars through the key channel like a revocation. The cost is one
lease renewal, one pipelined read of the new records and one HGETALL of grants per workspace
per look, on one replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from extproc.governance.breaker import Detector, Seen, Trip
from extproc.governance.keys import KeyStore
from extproc.governance.pauses import Pause, PauseStore
from extproc.governance.policy import Breaker, Policy, Workspace
from extproc.governance.topups import TopupStore
from extproc.insight import notices
from extproc.store.audit import append_audit
from extproc.store.clients import UNAVAILABLE, AsyncClient
from extproc.store.schema import (
    BREAKER_LEADER,
    breaker_tripped_key,
    hour_key,
    key_scope,
    ledger_key,
    paused_key,
    workspace_prefix,
)
from extproc.v1.ledger_pb2 import UsageRecord

log = logging.getLogger("extproc.insight.runaway")

BATCH = 1000
MAX_PER_LOOK = 20_000  # records one look reads per workspace; the rest wait for the next
BASELINE_DAYS = 7
BASELINE_TTL_MS = 3_600_000
BREAKER = "breaker"
SYSTEM = "extproc"  # who ends a grant whose time is up

# KEYS: the lease. ARGV: holder, ttl ms. 1 when `holder` holds it (now or still).
_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _window(ws: Workspace) -> int:
    """The longest look back any rule of the workspace or its services needs."""
    return max([ws.breaker.window_ms, *(s.breaker.window_ms for s in ws.services.values())])


def baseline_hours(now: datetime) -> list[str]:
    """The hour buckets a key's busiest hour is taken from: the last seven days, without the
    current hour and the one before (a runaway is in those)."""
    start = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    hours = [start - timedelta(hours=k) for k in range(BASELINE_DAYS * 24)]
    return [h.strftime("%Y-%m-%dT%H") for h in hours]


class RunawayWatch:
    def __init__(
        self,
        client: AsyncClient,
        policy: Callable[[], Policy | None],
        alerter: Any,
        *,
        telemetry: Any = None,
        console_url: str = "",
        now_ms: Callable[[], int] = _wall_ms,
        lease_ms: int = 5_000,
    ) -> None:
        self._redis = client
        self._policy = policy
        self._alerter = alerter
        self._telemetry = telemetry
        self.console_url = console_url
        self.now_ms = now_ms
        self.lease_ms = lease_ms
        self.holder = f"{os.getpid()}-{os.urandom(6).hex()}"
        self._lease = client.register_script(_LEASE)
        self.pauses = PauseStore(client)
        self.topups = TopupStore(client, now_ms=now_ms)
        self._keys = KeyStore(client)
        self._reset()
        self.looks = 0  # completed looks as leader (tests wait on progress, not on time)
        self.trips: list[Trip] = []  # every trip acted on, newest last (bounded)

    def _reset(self) -> None:
        self.detector = Detector(self._rules)
        self._cursor: dict[str, str] = {}
        self._baselines: dict[str, tuple[int | None, int]] = {}
        self._resumed: dict[str, int] = {}
        self.leading = False

    def _rules(self, workspace: str, service: str) -> Breaker | None:
        policy = self._policy()
        ws = policy.workspaces.get(workspace) if policy else None
        return ws.breaker_for(service) if ws is not None else None

    async def lead(self) -> bool:
        held = bool(await self._lease(keys=[BREAKER_LEADER], args=[self.holder, self.lease_ms]))
        if not held and self.leading:
            log.info("runaway watch: another replica leads now")
            self._reset()
        self.leading = held
        return held

    async def check_once(self) -> list[Trip]:
        """One look (if this replica leads); the trips acted on."""
        policy = self._policy()
        if policy is None or not await self.lead():
            return []
        now = self.now_ms()
        paused = await self._paused(policy)
        trips = []
        for record in await self._new_records(policy, now):
            seen = Seen.of(record)
            if seen is not None and seen.key_id not in paused:
                trips += self.detector.feed(seen)
        for workspace, service, key_id in self.detector.rate_candidates():
            if key_id in paused:
                continue
            baseline = await self._baseline(policy, workspace, key_id, now)
            trip = self.detector.check_rate(workspace, service, key_id, baseline)
            if trip is not None:
                trips.append(trip)
        acted = [t for t in trips if await self._act(policy, t)]
        await self._expire(policy, now)
        longest = max((_window(ws) for ws in policy.workspaces.values()), default=0)
        self.detector.prune(self.detector.now_ms, max(longest, 3_600_000))
        self.looks += 1
        return acted

    async def run(self, interval: float = 1.0) -> None:
        while True:
            try:
                await self.check_once()
            except UNAVAILABLE as exc:
                log.warning("runaway watch: redis unavailable (%s)", exc)
                self._reset()
            except Exception:
                log.exception("runaway watch: unexpected error")
                self._reset()
            await asyncio.sleep(interval)  # the look's period, not synchronisation

    # -- reads ------------------------------------------------------------------------------

    async def _paused(self, policy: Policy) -> set[str]:
        """Keys paused now; a resumed key starts over from its resume (never re-judged on
        the traffic that tripped it)."""
        names = list(policy.workspaces)
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(paused_key(name))
            rows = await pipe.execute()
        paused: set[str] = set()
        for row in rows:
            for value in row.values():
                pause = Pause.from_json(value)
                if pause is None:
                    continue
                if pause.paused:
                    paused.add(pause.key_id)
                elif self._resumed.get(pause.key_id) != pause.resumed_ms:
                    self._resumed[pause.key_id] = pause.resumed_ms
                    self.detector.forget(pause.key_id, pause.resumed_ms)
        return paused

    async def _new_records(self, policy: Policy, now_ms: int) -> list[UsageRecord]:
        """The records each workspace's ledger got since the last look, oldest first. The
        first look reaches back over the longest window any rule needs."""
        out: list[UsageRecord] = []
        for name, ws in policy.workspaces.items():
            stream = ledger_key(workspace_prefix(name))
            start = self._cursor.get(stream)
            if start is None:
                start = f"{now_ms - _window(ws)}-0"
            read = 0
            while read < MAX_PER_LOOK:
                rows = await self._redis.xrange(stream, min=start, count=BATCH)
                if not rows:
                    break
                out += [UsageRecord.FromString(f[b"r"]) for _id, f in rows]
                last = rows[-1][0]
                start = "(" + (last.decode() if isinstance(last, bytes) else str(last))
                read += len(rows)
                if len(rows) < BATCH:
                    break
            self._cursor[stream] = start
        out.sort(key=lambda r: r.time_ms)
        return out

    async def _baseline(
        self, policy: Policy, workspace: str, key_id: str, now_ms: int
    ) -> int | None:
        """The key's busiest hour of the last seven days (None: it spent nothing then)."""
        cached = self._baselines.get(key_id)
        if cached is not None and cached[1] > now_ms:
            return cached[0]
        prefix = workspace_prefix(workspace)
        hours = baseline_hours(datetime.fromtimestamp(now_ms / 1000, policy.timezone))
        scope = key_scope(key_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            for hour in hours:
                pipe.hget(hour_key(prefix, hour), scope)
            values = await pipe.execute()
        busiest = max((int(v) for v in values if v is not None), default=0) or None
        self._baselines[key_id] = (busiest, now_ms + BASELINE_TTL_MS)
        return busiest

    # -- acting -----------------------------------------------------------------------------

    async def _act(self, policy: Policy, trip: Trip) -> bool:
        ws = policy.workspaces.get(trip.workspace)
        if ws is None:
            return False
        window = ws.breaker_for(trip.service).window_ms
        # The record that tripped it names the trip: the same on every replica that reads it.
        marker = breaker_tripped_key(trip.workspace, trip.key_id, trip.rule, trip.at_ms)
        if not await self._redis.set(marker, self.holder, nx=True, px=max(window * 2, 60_000)):
            return False  # another replica acted on it
        info = await self._keys.info(trip.key_id)
        pause = Pause(
            key_id=trip.key_id, workspace=trip.workspace, service=trip.service,
            rule=trip.rule, why=trip.why, since_ms=self.now_ms(), by=BREAKER,
            owner=(info.owner or "") if info else "",
        )  # fmt: skip
        dry = trip.mode == "dry_run"
        if not dry and not await self.pauses.pause(pause):
            return False  # paused already
        action = "breaker.dry_run" if dry else "breaker.pause"
        await append_audit(
            self._redis, BREAKER, BREAKER, action, trip.key_id,
            workspace=trip.workspace, service=trip.service, rule=trip.rule, why=trip.why,
            **trip.details,
        )  # fmt: skip
        svc = ws.services.get(trip.service)
        contact = ws.contact_for(svc.team if svc is not None else None)
        alert = notices.paused(
            pause, policy.timezone, contact=contact, dry_run=dry, console_url=self.console_url
        )
        self._alerter.send(alert, notices.pause_targets(policy, trip.workspace, trip.service))
        halt = getattr(self._telemetry, "halt", None)
        if halt is not None:
            halt.trip(trip.workspace, trip.rule, trip.mode)
        self.trips = [*self.trips[-99:], trip]
        log.warning("runaway breaker (%s): key %s: %s", trip.mode, trip.key_id, trip.why)
        return True

    async def _expire(self, policy: Policy, now_ms: int) -> None:
        for name in policy.workspaces:
            for request in await self.topups.expire(name, now_ms):
                await append_audit(
                    self._redis, SYSTEM, SYSTEM, "topup.expire", request.request_id,
                    workspace=name, scope=request.scope, granted_nanos=request.granted_nanos,
                    until_ms=request.granted_until_ms,
                )  # fmt: skip
                to = [request.notify_url] if request.notify_url else []
                self._alerter.send(notices.expired(request, policy.timezone), to)
