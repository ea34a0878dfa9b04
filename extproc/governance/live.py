"""What every request must see within a second of its change: top-up grants and paused keys.

A grant approved in the console, or a key the breaker paused, must count on every replica at
once, yet the request path must not ask Redis about either. Each sidecar process keeps them
here: it re-reads every workspace's grants and paused keys (one pipelined round trip) when
the key channel announces a change (`topup ...`, `pause ...`, `resume ...`, see
`store.schema.KEYS_CHANNEL`) and every `refresh_seconds` whatever happens, so a lost notice
costs at most that long. A grant ends on time without any of this: it counts only while its
`until_ms` is ahead of the clock of the request that reads it.

The request path asks two things, each a dictionary probe: `refusals.get(key_id)` (the
refusal of a paused key, made when the pause was learnt) and `topups(workspace, now_ms)`
(empty for a workspace without grants, which is nearly all).

Budget leases (`governance.lease`) are granted on caps that count these grants, so they
need two more things: `topups_until`, when the first live grant ends (a lease admits no
longer), and `on_withdrawn`, called with a workspace whose grant vanished before its end
(revoked), after the refresh that learnt it: its leases close on this replica then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from extproc.governance import guard
from extproc.governance.pauses import Pause, pauses_from
from extproc.governance.policy import Policy
from extproc.governance.topups import Grant, grants_from, live_topups, wall_ms
from extproc.store.clients import UNAVAILABLE, AsyncClient
from extproc.store.schema import paused_key, topups_key
from extproc.wire.errors import OpenAIError

log = logging.getLogger("extproc.governance.live")

REFRESH_SECONDS = 1.0
NOTICES = frozenset({"topup", "pause", "resume"})
_NONE: Mapping[str, int] = MappingProxyType({})


class LiveState:
    """The grants and pauses of every workspace of the live policy, for this process."""

    def __init__(
        self,
        client: AsyncClient,
        policy: Callable[[], Policy | None],
        *,
        refresh_seconds: float = REFRESH_SECONDS,
        console_url: str = "",
        on_refresh: Callable[[LiveState], None] | None = None,
    ) -> None:
        self._redis = client
        self._policy = policy
        self.refresh_seconds = refresh_seconds
        self.console_url = console_url
        self.on_refresh = on_refresh  # after each refresh (the sidecar reports gauges)
        # A workspace lost a grant before its end (Budgets closes its leases).
        self.on_withdrawn: Callable[[str], object] | None = None
        # Key id -> the pause in force, and the refusal a request with it gets: dicts updated
        # in place, which the request path holds references to.
        self.paused: dict[str, Pause] = {}
        self.refusals: dict[str, OpenAIError] = {}
        self._grants: dict[str, tuple[Grant, ...]] = {}
        self._poke = asyncio.Event()
        self.refreshed = 0  # completed refreshes
        self.ready = asyncio.Event()  # set by the first refresh
        self._changed = asyncio.Event()

    def topups(self, workspace: str, now_ms: int) -> Mapping[str, int]:
        """Scope -> what live grants add to its hard limit now (empty: none)."""
        grants = self._grants.get(workspace)
        if not grants:
            return _NONE
        return live_topups(grants, now_ms)

    def topups_until(self, workspace: str, now_ms: int) -> int:
        """When the first of the workspace's live grants ends (0: none)."""
        for grant in self._grants.get(workspace, ()):  # sorted by until_ms
            if grant.until_ms > now_ms:
                return grant.until_ms
        return 0

    def grants(self, workspace: str) -> tuple[Grant, ...]:
        return self._grants.get(workspace, ())

    def workspaces_with_grants(self) -> list[str]:
        return list(self._grants)

    def on_notice(self, kind: str, _first: str, _second: str) -> None:
        """A change was announced on the key channel: refresh now."""
        if kind in NOTICES:
            self._poke.set()

    def next_refresh(self) -> Any:
        """Completes after the next refresh has been applied (bound when called)."""
        return self._changed.wait()

    async def refresh(self) -> None:
        policy = self._policy()
        if policy is None:
            return
        names = list(policy.workspaces)
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(topups_key(name))
                pipe.hgetall(paused_key(name))
            rows = await pipe.execute()
        grants: dict[str, tuple[Grant, ...]] = {}
        paused: dict[str, Pause] = {}
        for i, name in enumerate(names):
            found = grants_from(rows[2 * i])
            if found:
                grants[name] = found
            paused.update((k, p) for k, p in pauses_from(rows[2 * i + 1]).items() if p.paused)
        before, self._grants = self._grants, grants
        if self.on_withdrawn is not None:
            self._withdrawn(before, grants, wall_ms())
        if paused != self.paused:
            self.paused.clear()
            self.paused.update(paused)
            refusals = {
                k: guard.paused(p, policy.timezone, self.console_url) for k, p in paused.items()
            }
            self.refusals.clear()
            self.refusals.update(refusals)
        self.refreshed += 1
        self.ready.set()
        if self.on_refresh is not None:
            self.on_refresh(self)
        self._changed.set()
        self._changed = asyncio.Event()

    def _withdrawn(
        self, before: dict[str, tuple[Grant, ...]], after: dict[str, tuple[Grant, ...]], now: int
    ) -> None:
        assert self.on_withdrawn is not None
        for workspace, grants in before.items():
            kept = {g.grant_id for g in after.get(workspace, ())}
            if any(g.until_ms > now and g.grant_id not in kept for g in grants):
                self.on_withdrawn(workspace)

    async def run(self) -> None:
        """Refresh on every notice, and every `refresh_seconds` regardless."""
        while True:
            self._poke.clear()
            try:
                await self.refresh()
            except UNAVAILABLE as exc:
                log.warning("live state: redis unavailable (%s); keeping what is known", exc)
            except Exception:
                log.exception("live state: refresh failed; keeping what is known")
            # The refresh period (or the next notice), not synchronisation.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), timeout=self.refresh_seconds)
