"""Both Redis clients the sidecar uses satisfy the one interface budgets and the ledger need."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from extproc.store.clients import Pipeline, ScriptClient
from extproc.store.fastredis import FastRedis


async def _clients() -> list[object]:
    # Neither connects before its first command, so no server is needed to inspect them.
    return [
        FastRedis.from_url("redis://127.0.0.1:1/0"),
        aioredis.Redis.from_url("redis://127.0.0.1:1/0"),
    ]


@pytest.mark.parametrize("index", [0, 1], ids=["FastRedis", "redis-py"])
def test_client_and_its_pipeline_satisfy_the_protocol(index: int) -> None:
    async def check() -> None:
        client = (await _clients())[index]
        assert isinstance(client, ScriptClient)
        assert isinstance(client.pipeline(transaction=False), Pipeline)  # type: ignore[attr-defined]
        await client.aclose()  # type: ignore[attr-defined]

    asyncio.run(check())


def test_an_object_missing_a_method_does_not_satisfy_it() -> None:
    class Partial:
        async def evalsha(self, sha: str, numkeys: int, *keys_and_args: object) -> None: ...

    assert not isinstance(Partial(), ScriptClient)
