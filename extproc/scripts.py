"""Our Lua scripts, called by SHA so each call ships only its arguments.

redis-py's `Script` checks `SCRIPT EXISTS` before every pipeline, an extra round trip on
the hot path; we load once and reload only when Redis says it forgot (restart, failover).
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError


class LuaScript:
    def __init__(self, name: str) -> None:
        self.name = name
        self.source = resources.files("extproc.lua").joinpath(f"{name}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def load(self, client: Any) -> None:
        await client.script_load(self.source)

    async def __call__(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load(client)
            return await client.evalsha(self.sha, len(keys), *keys, *args)

    def queue(self, pipe: Any, keys: list[str], args: list[Any]) -> None:
        pipe.evalsha(self.sha, len(keys), *keys, *args)


RESERVE = LuaScript("reserve")
SETTLE = LuaScript("settle")
