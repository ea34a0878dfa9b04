"""Paused keys: what the runaway breaker (or a person) stopped, and resuming them.

A pause stops one key, not its workspace: the rest of the team keeps working while the
script that ran away waits for its owner. It is enforced like a revocation, through the key
cache: the pause is written to `{ws:W}:paused` and announced on the key channel, every
sidecar's cache (`governance.live`) holds the paused key ids, and the request path refuses
a paused key with one dictionary probe, saying why, since when and how to resume. Resuming
is one action (console, CLI, API) by a person; the entry stays, marked resumed, so the
breaker counts the key's traffic from then on and the history shows what happened.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from extproc.store.clients import AsyncClient
from extproc.store.schema import KEYS_CHANNEL, paused_key

MAX_WHY = 500

# KEYS: paused hash. ARGV: key id, new JSON, channel, workspace, expected state or "" (new).
# Writes only if the entry is in the expected state: a pause never overwrites a pause, and
# a resume only ends a pause that is still there.
_SWAP = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
local state = ''
if old then state = cjson.decode(old).state or '' end
if ARGV[5] == 'new' then
  if state == 'paused' then return 'paused' end
elseif state ~= ARGV[5] then
  return state == '' and 'unknown' or state
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], cjson.decode(ARGV[2]).state == 'paused' and
  ('pause ' .. ARGV[1] .. ' ' .. ARGV[4]) or ('resume ' .. ARGV[1] .. ' ' .. ARGV[4]))
return 'ok'
"""


class PauseError(ValueError):
    """A pause or resume was refused; the message says which key and why."""


@dataclass(frozen=True, slots=True)
class Pause:
    key_id: str
    workspace: str
    service: str
    rule: str  # "repeats", "spend_rate", "session_growth" or "manual"
    why: str
    since_ms: int
    by: str  # "breaker" or the person who paused it
    state: str = "paused"  # "paused" | "resumed"
    resumed_ms: int = 0
    resumed_by: str = ""
    owner: str = ""

    @property
    def paused(self) -> bool:
        return self.state == "paused"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: Any) -> Pause | None:
        try:
            data = json.loads(text)
            return Pause(**{k: data[k] for k in Pause.__dataclass_fields__ if k in data})
        except (ValueError, TypeError, KeyError):
            return None

    def to_dict(self, tz: ZoneInfo) -> dict[str, Any]:
        def when(ms: int) -> str | None:
            return datetime.fromtimestamp(ms / 1000, tz).isoformat() if ms else None

        return {
            "key_id": self.key_id,
            "workspace": self.workspace,
            "service": self.service,
            "owner": self.owner or None,
            "state": self.state,
            "rule": self.rule,
            "why": self.why,
            "since": when(self.since_ms),
            "by": self.by,
            "resumed_at": when(self.resumed_ms),
            "resumed_by": self.resumed_by or None,
        }


def pauses_from(raw: Mapping[Any, Any]) -> dict[str, Pause]:
    """Key id -> its entry, from one `{ws:W}:paused` hash as read."""
    out = {}
    for value in raw.values():
        pause = Pause.from_json(value)
        if pause is not None:
            out[pause.key_id] = pause
    return out


class PauseStore:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self._swap = client.register_script(_SWAP)

    async def all(self, workspace: str) -> dict[str, Pause]:
        return pauses_from(await self.client.hgetall(paused_key(workspace)))

    async def get(self, workspace: str, key_id: str) -> Pause | None:
        raw = await self.client.hget(paused_key(workspace), key_id)
        return None if raw is None else Pause.from_json(raw)

    async def pause(self, pause: Pause) -> bool:
        """Pause the key; False when it is paused already (nothing changes)."""
        pause = replace(pause, why=pause.why[:MAX_WHY], state="paused")
        result = await self._write(pause, "new")
        return result == "ok"

    async def resume(self, workspace: str, key_id: str, by: str) -> Pause:
        """Let a paused key spend again; PauseError if it is not paused."""
        current = await self.get(workspace, key_id)
        if current is None:
            raise PauseError(f"{key_id} is not paused")
        if not current.paused:
            raise PauseError(f"{key_id} is not paused (resumed already)")
        now = time.time_ns() // 1_000_000
        resumed = replace(current, state="resumed", resumed_ms=now, resumed_by=by)
        result = await self._write(resumed, "paused")
        if result != "ok":
            raise PauseError(f"{key_id} is not paused ({result})")
        return resumed

    async def _write(self, pause: Pause, expected: str) -> str:
        reply = await self._swap(
            keys=[paused_key(pause.workspace)],
            args=[pause.key_id, pause.to_json(), KEYS_CHANNEL, pause.workspace, expected],
        )
        return reply.decode() if isinstance(reply, bytes) else str(reply)
