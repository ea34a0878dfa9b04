"""Our Lua scripts, called by SHA so each call ships only its arguments.

redis-py's `Script` checks `SCRIPT EXISTS` before every pipeline, an extra round trip on
the hot path; we load once and reload only when Redis says it forgot (restart, failover).
On a Redis Cluster, SCRIPT LOAD goes to every primary (redis-py routes it so), so a script
is known wherever its keys live.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from extproc.store.clients import Pipeline, ScriptClient


def _lua(name: str) -> str:
    return resources.files("extproc.store.lua").joinpath(f"{name}.lua").read_text()


class LuaScript:
    """One script, loaded by SHA; `includes` are fragments (local functions) put before it.

    Redis gives a script no way to load another, so code two scripts share lives in a
    fragment of its own and is joined in here: the SHA covers the joined source.
    """

    def __init__(self, name: str, includes: tuple[str, ...] = ()) -> None:
        self.name = name
        self.source = "".join(_lua(part) for part in (*includes, name))
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def load(self, client: ScriptClient) -> None:
        await client.script_load(self.source)

    async def __call__(self, client: ScriptClient, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load(client)
            return await client.evalsha(self.sha, len(keys), *keys, *args)

    def queue(self, pipe: Pipeline, keys: list[str], args: list[Any]) -> None:
        # The raw command: redis-py's cluster pipeline blocks its `evalsha` method (a guard
        # for scripts it would have to load on the right node), yet routes EVALSHA by its
        # keys like any command, and we load and reload our scripts ourselves.
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


RESERVE = LuaScript("reserve")
SETTLE = LuaScript("settle")
REAP = LuaScript("reap", includes=("release",))
LEASE = LuaScript("lease")
