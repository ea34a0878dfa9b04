"""Budget leases: a busy caller's requests admitted without a script call each.

Without leases every request holds its worst case in Redis before it is forwarded
(reserve.lua): one script call, awaited. A caller that sends many requests a second gets a
*lease* instead: lease.lua checks the same caps once and holds a slice of their room for
this replica, which then admits that caller's requests against the slice locally. Per
request the only write before forwarding is its compact orphan (`HSET`, awaited, so the
request is billable by any replica's reaper if this one dies), pipelined with the session
counter when there is a session. Settlement is unchanged: one record per request, in the
batched settle call, which moves each request's actual cost out of the lease.

Rules (docs/budgets.md, "Leases", states the bound they give):

* A lease is granted only while it fits: `spent + held + lease <= cap` for every capped
  scope (cap: hard limit plus live top-ups, as `Budgets` gives them: the plan's
  `with_topups`), and it takes at most a quarter of the room
  left, so replicas never take it all. Its size is about a second of this caller's spend
  on this replica, at least `LEASE_LEAST` worst cases; with less room than that the caller
  is held exactly, per request (near the cap: `reserve.lua`, as without leases).
* A request is admitted under a lease only if its worst case fits in what the lease has
  left (`left -= worst`); it hands back `worst - actual` when it settles. So the worst
  cases admitted under a lease never exceed it, and `held` in Redis covers them.
* A lease admits for at most `LEASE_VALID_MS` (1 s) after its grant or last refresh, less if
  a top-up its caps count ends sooner. A refresh (one script call, at most one a second per
  lease) re-checks the caps as they are now, the key's revocation, and takes a fresh
  rate-limit chunk: so a revoked key reaches every replica within a second even if its
  notice is lost. A withdrawn top-up closes the workspace's leases as soon as the live
  cache learns it (its `topup` notice, or its refresh every second: `governance.live`); a
  grant or refresh under way when they are closed is closed too. A policy cap cut makes
  new plans, hence new callers and leases; the old ones idle out. The `leases <workspace>`
  notice on the key channel (room asked for at a cap) closes them at once.
* Rate limits are leased with the budget: a grant counts a chunk of the minute's requests
  and tokens up front (at most a quarter of what is left); a chunk lapses with its minute.
  A lease's requests never exceed its chunk, so limits are never exceeded; unused chunks
  are handed back when the lease ends within its minute.
* A lease closes when it is exhausted, idle for `LEASE_IDLE_MS`, over a cap, revoked, or
  told so; it is handed back (`held -= what it still holds`) once its last request has
  settled. If its replica dies, its expiry lapses and any replica's reaper gives the rest
  back and bills its requests' orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from extproc.store.clients import UNAVAILABLE, ScriptClient
from extproc.store.schema import bounded_session, lease_orphans_key, session_key
from extproc.store.scripts import LEASE

if TYPE_CHECKING:  # budget imports this module: its types are for annotations only here
    from extproc.governance.budget import Plan, RateScope, ScopeLimit, Standing

log = logging.getLogger("extproc.governance.lease")

StandingsOf = Callable[["tuple[ScopeLimit, ...]", Sequence[bytes]], "tuple[Standing, ...]"]
"""Turns a grant's or refresh's figures (spent, held per capped scope) into the
standings decisions carry (`budget.standings_of`)."""

LEASE_VALID_MS = 1000
"""How long a lease admits after its grant or last refresh (a lowered limit's delay)."""
LEASE_SECONDS = 1.0
"""A lease is sized to about this long of the caller's spend on this replica."""
LEASE_SHARE = 4
"""A grant takes at most 1/LEASE_SHARE of the room (and of a rate limit's) left."""
LEASE_LEAST = 2
"""Worst cases: a lease smaller than this is not worth it; the caller is held exactly."""
LEASE_AFTER = 4
"""Requests a caller made on this replica in the last second before it gets a lease: a
slower caller's lease would idle out between its requests, and each would pay a grant and
an orphan write where one exact hold does."""
LEASE_IDLE_MS = 200
"""A lease unused this long is closed and handed back."""
EXACT_BACKOFF_S = 0.2
"""After a grant answered 'exact' (near a cap or a rate limit), ask again only this late."""
_SWEEP_S = 0.1


def new_lease_id() -> str:
    """Lease ids start with 'L': the settle and reap scripts tell them from holds by it."""
    return "L" + os.urandom(16).hex()


def is_lease(reservation_id: str) -> bool:
    """Whether a decision's reservation is a lease (its requests' settlements are awaited by
    nobody: the lease covers their worst case until they land) rather than an exact hold."""
    return reservation_id[:1] == "L"


def _chunk_tokens(plan: Plan) -> int:
    return plan.tokens if plan.rates else 0


@dataclass(slots=True)
class Lease:
    """One lease this replica holds for one caller (what Redis holds for it, as known here)."""

    id: str
    prefix: str
    period_id: str
    key_id: str
    capped: tuple[ScopeLimit, ...]
    rates: tuple[RateScope, ...]
    granted: int
    left: int  # granted, less the worst cases in flight, less what settled requests cost
    valid_until: float  # loop time
    minute: int  # the rate chunk's minute
    requests: int  # of the rate chunk, left
    tokens: int
    standings: tuple[Standing, ...]
    granted_at: float = 0.0
    chunk: int = 0  # requests in the last rate chunk taken, and when
    chunk_at: float = 0.0
    last_used: float = 0.0
    last_ms: int = 0  # the clock of its last admission (its rate chunk's minute is on it)
    closed: bool = False
    returning: bool = False
    inflight: dict[str, int] = field(default_factory=dict)  # request id -> worst case


@dataclass(slots=True)
class Caller:
    """One caller on this replica: how busy it is, and its open lease."""

    scopes: tuple[ScopeLimit, ...]  # the plan's own tuples: kept alive, they key the caller
    rates: tuple[RateScope, ...]
    second: int = 0  # the loop second the counts below are for
    count: int = 0
    nanos: int = 0
    last_count: int = 0  # the second before
    last_nanos: int = 0
    lease: Lease | None = None
    exact_until: float = 0.0
    busy: asyncio.Future[None] | None = None  # a grant or refresh under way
    seen: float = 0.0


class Leases:
    """The leases of one replica (see the module docstring)."""

    def __init__(
        self,
        client: ScriptClient,
        *,
        hold_ttl_ms: int,
        owned: Callable[[str, str, bool], None],
        standings: StandingsOf,
        valid_ms: int = LEASE_VALID_MS,
    ) -> None:
        self._redis = client
        self._ttl_ms = hold_ttl_ms
        self._owned = owned  # (prefix, lease id, alive): renewed like a hold while alive
        self._standings = standings
        self.valid_ms = valid_ms
        self._callers: dict[tuple[int, int, str], Caller] = {}
        self._by_id: dict[str, Lease] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._epochs: dict[str, int] = {}  # prefix -> how often its leases were closed

    # -- admission ---------------------------------------------------------------------------

    async def admit(
        self,
        plan: Plan,
        now_ms: int,
        orphan: bytes,
        request_id: str,
        session: str,
        *,
        base: Plan | None = None,
        until_ms: int = 0,
    ) -> tuple[Lease, int] | None:
        """Admit `plan` under this caller's lease (granting one if the caller is busy): the
        lease and the session's running input total; None: hold it exactly. Raises what
        Redis raises when it is away (the orphan could not be written; nothing admitted).

        `plan`'s hard limits are the caps (with live top-ups); `base` is the same plan
        before top-ups, whose scopes name the caller (top-ups make a new plan per request);
        `until_ms`: when the first top-up counted in the caps ends (0: none), after which
        no lease granted or refreshed now may admit."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        caller = self._caller(base or plan, now)
        worst = plan.reserve_nanos
        lease = caller.lease
        for _ in range(3):
            if lease is not None and self._fits(lease, plan, now_ms, now):
                break
            if caller.busy is not None:  # someone is granting or refreshing: wait for it
                await asyncio.shield(caller.busy)
                now, lease = loop.time(), caller.lease
                continue
            if lease is not None and not lease.closed and lease.left >= worst:
                lease = await self._refresh(caller, lease, plan, now_ms, until_ms)
            elif caller.last_count + caller.count >= LEASE_AFTER and now >= caller.exact_until:
                if lease is not None:
                    self._close(lease)
                lease = await self._grant(caller, plan, now_ms, until_ms)
            else:
                return None
            now = loop.time()
            if lease is None or not self._fits(lease, plan, now_ms, now):
                if lease is not None:  # renewed, yet no room for this one: no rate chunk
                    self._close(lease)
                caller.exact_until = now + EXACT_BACKOFF_S
                return None
            break
        else:
            return None
        lease.left -= worst
        if lease.rates:
            lease.requests -= 1
            lease.tokens -= plan.tokens
        lease.inflight[request_id] = worst
        lease.last_used, lease.last_ms = now, now_ms
        try:
            total = await self._write_orphan(lease, plan, request_id, orphan, session)
        except BaseException:
            self._unadmit(lease, plan, request_id)
            raise
        return lease, total

    def _fits(self, lease: Lease, plan: Plan, now_ms: int, now: float) -> bool:
        if lease.closed or now >= lease.valid_until or lease.left < plan.reserve_nanos:
            return False
        if lease.rates:
            return (
                lease.minute == now_ms // 60000
                and lease.requests >= 1
                and lease.tokens >= plan.tokens
            )
        return True

    def _unadmit(self, lease: Lease, plan: Plan, request_id: str) -> None:
        worst = lease.inflight.pop(request_id, None)
        if worst is None:
            return
        lease.left += worst
        if lease.rates:
            lease.requests += 1
            lease.tokens += plan.tokens
        self._maybe_return(lease)

    async def _write_orphan(
        self, lease: Lease, plan: Plan, request_id: str, orphan: bytes, session: str
    ) -> int:
        """The request's orphan under its lease, durable before it is forwarded; with a
        session, its running input total (one round trip for both)."""
        orphans = lease_orphans_key(lease.prefix, lease.id)
        if not session:
            await self._redis.execute_command("HSET", orphans, request_id, orphan)
            return 0
        key = session_key(plan.prefix, plan.key_id, bounded_session(session))
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.execute_command("HSET", orphans, request_id, orphan)
            pipe.execute_command("INCRBY", key, plan.counted_input)
            pipe.execute_command("EXPIRE", key, 86400)
            replies = await pipe.execute()
        return int(replies[1])

    def _caller(self, plan: Plan, now: float) -> Caller:
        key = (id(plan.scopes), id(plan.rates), plan.period.id)
        caller = self._callers.get(key)
        if caller is None or caller.scopes is not plan.scopes or caller.rates is not plan.rates:
            caller = Caller(plan.scopes, plan.rates)
            self._callers[key] = caller
            self._start_sweeper()
        second = int(now)
        if second != caller.second:
            gap = second - caller.second
            caller.last_count, caller.last_nanos = (
                (caller.count, caller.nanos) if gap == 1 else (0, 0)
            )
            caller.second, caller.count, caller.nanos = second, 0, 0
        caller.count += 1
        caller.nanos += plan.reserve_nanos
        caller.seen = now
        return caller

    # -- grant, refresh, return --------------------------------------------------------------

    def _valid_ms(self, now_ms: int, until_ms: int) -> int:
        """How long a lease granted or refreshed now may admit: `valid_ms`, and no longer
        than the first top-up its caps count (`until_ms`, 0: none) lasts."""
        if until_ms and until_ms - now_ms < self.valid_ms:
            return max(until_ms - now_ms, 0)
        return self.valid_ms

    async def _grant(
        self, caller: Caller, plan: Plan, now_ms: int, until_ms: int = 0
    ) -> Lease | None:
        loop = asyncio.get_running_loop()
        caller.busy = loop.create_future()
        epoch = self._epochs.get(plan.prefix, 0)
        try:
            lease = await self._do_grant(caller, plan, now_ms, self._valid_ms(now_ms, until_ms))
            if lease is not None and self._epochs.get(plan.prefix, 0) != epoch:
                # The workspace's leases were closed while this grant was on its way: it
                # may count a cap that is gone (a top-up withdrawn meanwhile).
                self._close(lease)
                return None
            return lease
        finally:
            busy, caller.busy = caller.busy, None
            busy.set_result(None)

    async def _do_grant(
        self, caller: Caller, plan: Plan, now_ms: int, valid_ms: int
    ) -> Lease | None:
        worst = max(plan.reserve_nanos, 1)
        rate_nanos = max(caller.nanos, caller.last_nanos)
        want = max(int(rate_nanos * LEASE_SECONDS), LEASE_LEAST * worst)
        previous = caller.lease
        loop = asyncio.get_running_loop()
        if previous is not None and loop.time() - previous.granted_at < LEASE_SECONDS:
            # The last one ran out within its second: a burst starting, faster than the
            # per-second count can tell. Double it (the script still takes at most a quarter
            # of the room).
            want = max(want, 2 * previous.granted)
        want_requests = self._chunk_wanted(caller, previous)
        capped = tuple(s for s in plan.scopes if s.hard_nanos is not None)
        lease_id = new_lease_id()
        args: list[Any] = [
            "grant", now_ms, lease_id, want, LEASE_LEAST * worst, LEASE_SHARE, self._ttl_ms,
            plan.period.id, plan.key_id, valid_ms, len(capped),
        ]  # fmt: skip
        for s in capped:
            args += [s.scope, s.hard_nanos]
        args += self._rate_args(plan, want_requests)
        reply = await LEASE(self._redis, [plan.prefix], args)
        if reply[0] != b"ok":
            caller.exact_until = loop.time() + EXACT_BACKOFF_S
            return None
        amount, valid_ms, requests, tokens, minute = (int(x) for x in reply[1:6])
        lease = Lease(
            lease_id, plan.prefix, plan.period.id, plan.key_id, capped, plan.rates,
            granted=amount, left=amount, valid_until=loop.time() + valid_ms / 1000,
            granted_at=loop.time(), chunk=requests, chunk_at=loop.time(),
            minute=minute, requests=requests, tokens=tokens,
            standings=self._standings(capped, reply[6:]),
        )  # fmt: skip
        self._owned(plan.prefix, lease_id, True)
        self._by_id[lease_id] = lease
        caller.lease = lease
        return lease

    async def _refresh(
        self, caller: Caller, lease: Lease, plan: Plan, now_ms: int, until_ms: int = 0
    ) -> Lease | None:
        loop = asyncio.get_running_loop()
        caller.busy = loop.create_future()
        epoch = self._epochs.get(lease.prefix, 0)
        try:
            renewed = await self._do_refresh(
                caller, lease, plan, now_ms, self._valid_ms(now_ms, until_ms)
            )
            if renewed is not None and self._epochs.get(lease.prefix, 0) != epoch:
                self._close(renewed)  # closed meanwhile (see _grant)
                return None
            return renewed
        finally:
            busy, caller.busy = caller.busy, None
            busy.set_result(None)

    @staticmethod
    def _chunk_wanted(caller: Caller, lease: Lease | None) -> int:
        """Requests to count up front: about a second of this caller's here, doubled when
        the last chunk ran out within its second (a burst outruns the per-second count)."""
        rate = max(caller.count, caller.last_count)
        wanted = max(math.ceil(rate * LEASE_SECONDS), LEASE_LEAST)
        if lease is not None and lease.chunk_at and lease.chunk_at > caller.seen - LEASE_SECONDS:
            wanted = max(wanted, 2 * lease.chunk)
        return wanted

    async def _do_refresh(
        self, caller: Caller, lease: Lease, plan: Plan, now_ms: int, valid_ms: int
    ) -> Lease | None:
        """Renew `lease` against the caps as they are now (`plan`'s: the policy's limits
        and the live top-ups), which may be lower than at its grant."""
        chunk_spent = lease.rates and (
            lease.minute != now_ms // 60000 or lease.requests < 1 or lease.tokens < plan.tokens
        )
        want_requests = self._chunk_wanted(caller, lease) if chunk_spent else 0
        capped = tuple(s for s in plan.scopes if s.hard_nanos is not None)
        if tuple(s.scope for s in capped) != tuple(s.scope for s in lease.capped):
            self._close(lease)  # not the same scopes (cannot happen for one caller)
            return None
        args: list[Any] = [
            "refresh", now_ms, lease.id, lease.key_id, lease.period_id, valid_ms,
            LEASE_SHARE, len(capped),
        ]  # fmt: skip
        for s in capped:
            args += [s.scope, s.hard_nanos]
        args += self._rate_args(plan, want_requests)
        reply = await LEASE(self._redis, [lease.prefix], args)
        kind = reply[0]
        if kind != b"ok":
            log.info("lease %s of %s closed at refresh: %s", lease.id, lease.prefix,
                     b" ".join(reply).decode(errors="replace"))  # fmt: skip
            if kind == b"gone":  # reaped: nothing left to hand back
                lease.returning = True
                self._forget(lease)
            self._close(lease)
            return None
        valid_ms, requests, tokens, minute = (int(x) for x in reply[1:5])
        now = asyncio.get_running_loop().time()
        lease.valid_until = now + valid_ms / 1000
        if requests:
            lease.chunk, lease.chunk_at = requests, now
            if minute == lease.minute:
                lease.requests += requests
                lease.tokens += tokens
            else:  # the old minute's chunk lapsed with its minute
                lease.minute, lease.requests, lease.tokens = minute, requests, tokens
        lease.capped = capped
        lease.standings = self._standings(capped, reply[5:])
        return lease

    @staticmethod
    def _rate_args(plan: Plan, want_requests: int) -> list[Any]:
        args: list[Any] = [len(plan.rates)]
        for r in plan.rates:
            args += [r.scope, -1 if r.rpm is None else r.rpm, -1 if r.tpm is None else r.tpm]
        return [*args, want_requests, _chunk_tokens(plan)]

    def _close(self, lease: Lease) -> None:
        lease.closed = True
        self._maybe_return(lease)

    def _maybe_return(self, lease: Lease) -> None:
        if lease.closed and not lease.inflight and not lease.returning:
            lease.returning = True
            task = asyncio.get_running_loop().create_task(self._return(lease))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _return(self, lease: Lease) -> None:
        """Hand back what the lease still holds (and its unused rate chunk); if Redis is
        away, leave it: its expiry lapses and a reaper hands it back."""
        # The chunk goes back only within its minute, as the clock that admitted it sees it.
        now_ms = max(lease.last_ms, int(time.time() * 1000)) if not lease.last_ms else lease.last_ms
        args: list[Any] = ["return", lease.id, now_ms, lease.minute, len(lease.rates)]
        for r in lease.rates:
            args += [r.scope, max(lease.requests, 0), max(lease.tokens, 0)]
        try:
            reply = await LEASE(self._redis, [lease.prefix], args)
        except UNAVAILABLE as exc:
            log.debug("lease %s: not handed back now (%s); it expires", lease.id, exc)
            lease.returning = False  # the sweeper tries again
            return
        except Exception:  # a hand-back that fails must not go unseen, nor stop the next
            log.exception("lease %s: handing it back failed; it expires", lease.id)
            lease.returning = False
            return
        if reply[0] == b"busy":  # an orphan is still there: a settlement not yet landed
            lease.returning = False
            return
        self._forget(lease)

    def _forget(self, lease: Lease) -> None:
        self._by_id.pop(lease.id, None)
        self._owned(lease.prefix, lease.id, False)

    # -- settlement, notices, upkeep ---------------------------------------------------------

    def settled(self, lease_id: str, request_id: str, cost_nanos: int) -> None:
        """A request admitted under `lease_id` has its settlement in Redis."""
        lease = self._by_id.get(lease_id)
        if lease is None:
            return
        worst = lease.inflight.pop(request_id, None)
        if worst is not None:
            lease.left += worst - cost_nanos
        self._maybe_return(lease)

    def close_workspace(self, prefix: str) -> int:
        """Close every lease of a workspace (a limit was lowered, or room is asked for)."""
        self._epochs[prefix] = self._epochs.get(prefix, 0) + 1
        closing = [lease for lease in self._by_id.values() if lease.prefix == prefix]
        for lease in closing:
            lease.closed = True
        if closing:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to hand back yet
                for lease in closing:
                    self._maybe_return(lease)
        return len(closing)

    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)  # the upkeep's period, not synchronisation
            try:
                self.sweep(asyncio.get_running_loop().time())
            except Exception:
                log.exception("leases: upkeep failed; retrying")

    def sweep(self, now: float) -> None:
        """Close idle leases, hand back closed ones, forget callers long gone."""
        idle = LEASE_IDLE_MS / 1000
        for lease in list(self._by_id.values()):
            if not lease.closed and now - lease.last_used >= idle:
                lease.closed = True
            self._maybe_return(lease)
        for key, caller in list(self._callers.items()):
            held = caller.lease
            if held is not None and held.closed and held.id not in self._by_id:
                caller.lease = None
            if caller.lease is None and caller.busy is None and now - caller.seen > 10.0:
                del self._callers[key]

    @property
    def open(self) -> int:
        return sum(1 for lease in self._by_id.values() if not lease.closed)

    async def close(self) -> None:
        """Shutting down: hand back every lease (their requests have settled by now)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for lease in list(self._by_id.values()):
            lease.closed = True
            if not lease.inflight and not lease.returning:
                lease.returning = True
                await self._return(lease)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
