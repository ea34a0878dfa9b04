"""Temporary top-ups: a scope's hard limit raised for a while, read by every replica.

A top-up is stored in Redis, not the policy file, so it takes effect on every replica at
once and ends by itself: `{ws:W}:topups`, field = scope (`ws`, `team:T`, `svc:S`), value =
"nanos@expires_ms" entries joined by ','. The reserve and lease scripts add every entry of
a scope that has not expired to its hard limit (store/lua/caps.lua), so a top-up is part of
"the cap" for exact holds and lease grants alike, and a lease counting on one ends no later
than it expires.

Raising a limit needs nothing more. Lowering one (removing a top-up before its time, or a
policy cap cut) must reach leases already granted: `remove_topups` publishes the `leases`
notice on the key channel, which closes the workspace's leases on every replica at once;
if a notice is lost, each lease's next refresh (at most a second away) finds the cap
exceeded and closes it. Expiry needs no notice at all.

This is the writing side the approval flow (issue 22) builds on: `add_topup` when a request
is approved, `remove_topups` when one is withdrawn.
"""

from __future__ import annotations

from typing import Any

from extproc.store.schema import KEYS_CHANNEL, LEASES_NOTICE, topups_key

# Prune expired entries and append one, atomically: HGET + HSET in one script.
_ADD = """
local value = redis.call('HGET', KEYS[1], ARGV[1])
local now, kept = tonumber(ARGV[4]), {}
if value then
  for nanos, expires in string.gmatch(value, '(%d+)@(%d+)') do
    if tonumber(expires) > now then kept[#kept + 1] = nanos .. '@' .. expires end
  end
end
kept[#kept + 1] = ARGV[2] .. '@' .. ARGV[3]
redis.call('HSET', KEYS[1], ARGV[1], table.concat(kept, ','))
return #kept
"""


def topup_entries(value: str | bytes | None, now_ms: int) -> list[tuple[int, int]]:
    """(nanos, expires_ms) of every entry that still counts, as the scripts read them."""
    if not value:
        return []
    text = value.decode() if isinstance(value, bytes) else value
    out = []
    for entry in text.split(","):
        nanos, _, expires = entry.partition("@")
        if nanos.isdigit() and expires.isdigit() and int(expires) > now_ms:
            out.append((int(nanos), int(expires)))
    return out


async def add_topup(
    client: Any, workspace: str, scope: str, nanos: int, expires_ms: int, *, now_ms: int = 0
) -> int:
    """Raise `scope`'s hard limit by `nanos` until `expires_ms`; returns the live entries."""
    if nanos <= 0 or expires_ms <= now_ms:
        raise ValueError("a top-up raises a limit by a positive amount, until a later time")
    reply = await client.eval(_ADD, 1, topups_key(workspace), scope, nanos, expires_ms, now_ms)
    return int(reply)


async def remove_topups(client: Any, workspace: str, scope: str, *, notify: bool = True) -> None:
    """Withdraw every top-up of `scope` now (a lowered limit): the workspace's leases close
    on every replica at once (the notice), or at their next refresh if it is lost."""
    await client.hdel(topups_key(workspace), scope)
    if notify:
        await client.publish(KEYS_CHANNEL, f"{LEASES_NOTICE} {workspace} lowered")
