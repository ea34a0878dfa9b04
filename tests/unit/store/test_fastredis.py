"""The lean RESP client against a real Redis: replies, pipelines, errors, outages, the pool.

Pure tests pin the wire format (encoding, parsing, partial replies); the rest run a real
server as a child process, including one that is killed and restarted on the same port.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from redis.exceptions import (
    AuthenticationError,
    NoScriptError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from extproc.devstack.stack import Child, free_port, redis_child
from extproc.governance.budget import Budgets, plan_request
from extproc.governance.keys import Identity
from extproc.governance.policy import parse_policy_text
from extproc.metering.ledger import Ledger
from extproc.metering.prices import PriceTable
from extproc.store.clients import UNAVAILABLE
from extproc.store.fastredis import (
    Endpoint,
    FastRedis,
    encode,
    parse_reply,
    parse_url,
    supports_url,
)
from extproc.store.scripts import RESERVE, SETTLE, LuaScript
from extproc.v1.ledger_pb2 import ScopeCharge, Settlement, UsageRecord

T = TypeVar("T")


def start_redis(port: int, directory: Path, *extra: str) -> Child:
    return redis_child(port, directory, *extra)


def run(url: str, body: Callable[[FastRedis], Awaitable[T]], **options: Any) -> T:
    async def main() -> T:
        client = FastRedis.from_url(url, **options)
        try:
            return await body(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


# --- the wire format (pure) ----------------------------------------------------------------


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert encode(("SET", b"k\r\n", 42)) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n42\r\n"
    assert encode(["EVALSHA", "é", -1]) == b"*3\r\n$7\r\nEVALSHA\r\n$2\r\n\xc3\xa9\r\n$2\r\n-1\r\n"
    with pytest.raises(TypeError, match="float"):
        encode(["INCRBYFLOAT", "k", 0.5])
    with pytest.raises(TypeError, match="bool"):
        encode(["SET", "k", True])


@pytest.mark.parametrize(
    ("wire", "value"),
    [
        (b"+OK\r\n", b"OK"),
        (b":-42\r\n", -42),
        (b"$5\r\nhe\r\nl\r\n", b"he\r\nl"),
        (b"$0\r\n\r\n", b""),
        (b"$-1\r\n", None),
        (b"*-1\r\n", None),
        (b"*0\r\n", []),
        (b"*3\r\n$2\r\nok\r\n*2\r\n:1\r\n$-1\r\n+x\r\n", [b"ok", [1, None], b"x"]),
    ],
)
def test_each_reply_type_parses_whole_and_waits_when_cut_short(wire: bytes, value: Any) -> None:
    assert parse_reply(wire + b"+next\r\n", 0) == (value, len(wire))
    assert parse_reply(b"junk" + wire, 4) == (value, len(wire) + 4)
    for cut in range(len(wire)):
        partial, need = parse_reply(wire[:cut], 0)
        assert partial is not value or value is None
        assert cut < need <= len(wire), (cut, need)


def test_a_large_value_tells_the_reader_how_much_to_wait_for() -> None:
    wire = b"*2\r\n:7\r\n$1000000\r\n" + b"x" * 1000
    _, need = parse_reply(wire, 0)
    assert need == len(b"*2\r\n:7\r\n$1000000\r\n") + 1_000_000 + 2


def test_error_replies_become_redis_py_exceptions() -> None:
    noscript, _ = parse_reply(b"-NOSCRIPT No matching script.\r\n", 0)
    assert type(noscript) is NoScriptError and str(noscript) == "No matching script."
    other, _ = parse_reply(b"-ERR unknown command 'FOO'\r\n", 0)
    assert type(other) is ResponseError and str(other) == "ERR unknown command 'FOO'"
    nested, _ = parse_reply(b"*2\r\n:1\r\n-WRONGTYPE nope\r\n", 0)
    assert nested[0] == 1 and isinstance(nested[1], ResponseError)


def test_urls_name_host_port_db_and_credentials() -> None:
    assert parse_url("redis://127.0.0.1:7000/3") == Endpoint("127.0.0.1", 7000, db=3)
    assert parse_url("redis://u:p%40ss@h") == Endpoint("h", 6379, username="u", password="p@ss")
    assert parse_url("redis://:pw@h:1") == Endpoint("h", 1, password="pw")
    assert parse_url("unix:///run/redis.sock?db=2") == Endpoint(path="/run/redis.sock", db=2)
    assert not supports_url("rediss://h:1/0")
    assert not supports_url("redis+cluster://h:1,h:2")
    assert not supports_url("redis://h:1/0?socket_timeout=3")


# --- against Redis ---------------------------------------------------------------------------


def test_every_reply_type_from_a_real_server(r: redis.Redis, redis_url: str) -> None:
    async def body(c: FastRedis) -> list[Any]:
        return [
            await c.execute_command("SET", "k", "v"),
            await c.execute_command("GET", "k"),
            await c.execute_command("GET", "missing"),
            await c.execute_command("INCRBY", "n", -5),
            await c.execute_command("RPUSH", "l", "a", b"\x00\xff", 3),
            await c.execute_command("LRANGE", "l", 0, -1),
            await c.execute_command("LRANGE", "missing", 0, -1),
            await c.execute_command("EVAL", "return {1, {'x', {}}, false, 'y'}", 0),
            await c.execute_command("BLPOP", "missing", "0.01"),
            await c.execute_command("SET", "e", ""),
            await c.execute_command("GET", "e"),
        ]

    assert run(redis_url, body) == [
        b"OK",
        b"v",
        None,
        -5,
        3,
        [b"a", b"\x00\xff", b"3"],
        [],
        [1, [b"x", []], None, b"y"],
        None,
        b"OK",
        b"",
    ]


def test_error_replies_raise_and_the_connection_stays_usable(
    r: redis.Redis, redis_url: str
) -> None:
    async def body(c: FastRedis) -> tuple[str, str, Any]:
        with pytest.raises(ResponseError) as unknown:
            await c.execute_command("NOSUCHCOMMAND", 1)
        await c.execute_command("SET", "s", "text")
        with pytest.raises(ResponseError) as wrongtype:
            await c.execute_command("HGET", "s", "f")
        return str(unknown.value), str(wrongtype.value), await c.execute_command("GET", "s")

    unknown, wrongtype, after = run(redis_url, body)
    assert unknown.startswith("ERR unknown command")
    assert wrongtype.startswith("WRONGTYPE")
    assert after == b"text"


def test_a_pipeline_of_100_sends_once_and_keeps_errors_in_place(
    r: redis.Redis, redis_url: str
) -> None:
    async def body(c: FastRedis) -> tuple[list[Any], str, list[Any], Any]:
        async with c.pipeline(transaction=False) as pipe:
            for i in range(100):
                if i == 0:
                    pipe.execute_command("SET", "str", "text")
                elif i % 10 == 3:
                    pipe.execute_command("HINCRBY", "str", "f", 1)  # wrong type: an error
                else:
                    pipe.execute_command("INCR", "n")
            kept = await pipe.execute(raise_on_error=False)
        async with c.pipeline(transaction=False) as pipe:
            pipe.hincrby("h", "f", 5).execute_command("HGET", "str", "x").sadd("s", "a", "b")
            with pytest.raises(ResponseError) as raised:
                await pipe.execute()
        async with c.pipeline() as pipe:
            pipe.hincrby("h", "f", 1).sadd("s", "b", "c").execute_command("INCR", "n")
            after = await pipe.execute()
        return kept, str(raised.value), after, await c.pipeline().execute()

    kept, raised, after, empty = run(redis_url, body)
    assert len(kept) == 100
    errors = [i for i, reply in enumerate(kept) if isinstance(reply, ResponseError)]
    assert errors == [i for i in range(100) if i % 10 == 3]
    counts = [reply for i, reply in enumerate(kept) if i and i % 10 != 3]
    assert counts == list(range(1, 90))
    assert raised.startswith("WRONGTYPE")
    # The pipeline that raised still ran every command, and the next one reads its own replies.
    assert after == [6, 1, 90]
    assert r.smembers("s") == {b"a", b"b", b"c"}
    assert empty == []


def test_noscript_is_raised_then_the_script_loads_and_runs(r: redis.Redis, redis_url: str) -> None:
    source = "return {KEYS[1], ARGV[1]}"
    sha = hashlib.sha1(source.encode()).hexdigest()

    async def body(c: FastRedis) -> tuple[str, Any, Any]:
        with pytest.raises(NoScriptError):
            await c.evalsha(sha, 1, "key", "arg")
        loaded = await c.script_load(source)
        ran = await c.evalsha(sha, 1, "key", 7)
        # The production wrapper: Redis forgot the script, the call loads it and retries.
        await c.execute_command("SCRIPT", "FLUSH")
        script = LuaScript("reserve")
        await script.load(c)
        await c.execute_command("SCRIPT", "FLUSH")
        with pytest.raises(ResponseError, match="ERR"):
            await script(c, ["{ws:t}"], [])  # loaded again, then run (bad arguments)
        return loaded, ran, await c.execute_command("SCRIPT", "EXISTS", script.sha)

    loaded, ran, exists = run(redis_url, body)
    assert loaded == sha and isinstance(loaded, str)
    assert ran == [b"key", b"7"]
    assert exists == [1]


def test_a_thousand_concurrent_commands_spread_over_the_pool(
    r: redis.Redis, redis_url: str
) -> None:
    async def body(c: FastRedis) -> tuple[list[Any], list[list[Any]], int, int]:
        async def pipeline(i: int) -> list[Any]:
            async with c.pipeline() as pipe:
                pipe.execute_command("SET", f"p{i}", i).execute_command("GET", f"p{i}")
                return await pipe.execute()

        singles = [c.execute_command("INCR", "n") for _ in range(1000)]
        pipes = [pipeline(i) for i in range(50)]
        results = await asyncio.gather(*singles, *pipes)
        clients = await c.execute_command("CLIENT", "LIST")
        ours = [line for line in clients.splitlines() if not line.startswith(fixture)]
        return results[:1000], results[1000:], c.connection_count, len(ours)

    fixture = b"id=%d " % r.client_id()
    counts, pipelines, pool, server_side = run(redis_url, body)
    assert sorted(counts) == list(range(1, 1001))
    assert pipelines == [[b"OK", str(i).encode()] for i in range(50)]
    assert pool == 8
    assert server_side == 8


def test_sequential_commands_share_one_connection(r: redis.Redis, redis_url: str) -> None:
    async def body(c: FastRedis) -> tuple[list[Any], int]:
        return [await c.execute_command("INCR", "n") for _ in range(50)], c.connection_count

    counts, pool = run(redis_url, body)
    assert counts == list(range(1, 51))
    assert pool == 1


def test_a_five_megabyte_value_arrives_over_many_reads(r: redis.Redis, redis_url: str) -> None:
    big = bytes(range(256)) * (5 * 1024 * 1024 // 256) + b"\r\n$-1\r\n"

    async def body(c: FastRedis) -> tuple[Any, ...]:
        await c.execute_command("SET", "big", big)
        async with c.pipeline() as pipe:
            pipe.execute_command("GET", "big").execute_command("INCR", "n")
            pipe.execute_command("LRANGE", "missing", 0, -1).execute_command("GET", "big")
            replies = await pipe.execute()
        alone = await c.execute_command("GET", "big")
        return (*replies, alone)

    got = run(redis_url, body)
    assert got[0] == big and got[3] == big and got[4] == big
    assert got[1:3] == (1, [])
    assert r.strlen("big") == len(big)


def test_a_killed_server_fails_pending_commands_and_the_client_recovers(tmp_path: Path) -> None:
    port = free_port()
    child = start_redis(port, tmp_path / "a")

    async def body(c: FastRedis) -> None:
        nonlocal child
        blocked = [asyncio.ensure_future(c.execute_command("BLPOP", f"q{i}", 0)) for i in range(3)]
        # The fourth connection stays free to ask whether the three are blocked yet.
        while b"blocked_clients:3" not in await c.execute_command("INFO", "clients"):
            pass
        child.stop(signal.SIGKILL)
        for future in blocked:
            with pytest.raises(RedisConnectionError):
                await future
        assert c.connection_count == 0
        with pytest.raises(RedisConnectionError, match="connecting"):
            await c.execute_command("PING")
        child = start_redis(port, tmp_path / "b")
        assert await c.execute_command("PING") == b"PONG"
        assert await c.evalsha(await c.script_load("return 5"), 0) == 5

    try:
        run(f"redis://127.0.0.1:{port}/0", body, max_connections=4)
    finally:
        child.stop()


def test_a_server_that_stops_answering_times_out_and_frees_the_connection(
    r: redis.Redis, redis_url: str
) -> None:
    async def body(c: FastRedis) -> tuple[float, Any, Any]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RedisTimeoutError):
            await c.execute_command("BLPOP", "never", 0)
        waited = loop.time() - started
        return waited, c.connection_count, await c.execute_command("PING")

    waited, pool, pong = run(redis_url, body, socket_timeout=0.2)
    assert 0.2 <= waited < 1.5
    assert pool == 0
    assert pong == b"PONG"


def test_nothing_listening_is_a_connection_error_callers_treat_as_an_outage() -> None:
    async def body(c: FastRedis) -> None:
        with pytest.raises(RedisConnectionError) as raised:
            await c.evalsha("0" * 40, 0)
        assert isinstance(raised.value, UNAVAILABLE)
        with pytest.raises(RedisConnectionError):
            await c.pipeline().execute_command("PING").execute()

    run(f"redis://127.0.0.1:{free_port()}/0", body)


def test_credentials_and_database_come_from_the_url(tmp_path: Path) -> None:
    port = free_port()
    child = start_redis(port, tmp_path, "--requirepass", "s3cret")
    try:
        url = f"redis://:s3cret@127.0.0.1:{port}/3"
        assert run(url, lambda c: c.execute_command("SET", "where", "db3")) == b"OK"
        user = f"redis://default:s3cret@127.0.0.1:{port}/0"
        assert run(user, lambda c: c.execute_command("GET", "where")) is None

        async def refused(c: FastRedis) -> None:
            with pytest.raises(AuthenticationError):
                await c.execute_command("PING")

        run(f"redis://:wrong@127.0.0.1:{port}/0", refused)
        run(f"redis://127.0.0.1:{port}/0", refused)  # NOAUTH
        check = redis.Redis(port=port, password="s3cret", db=3)
        assert check.get("where") == b"db3"
        check.close()
    finally:
        child.stop()


def test_a_unix_socket_url(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    child = start_redis(0, tmp_path, "--unixsocket", str(sock))
    try:
        assert run(f"unix://{sock}?db=1", lambda c: c.execute_command("PING")) == b"PONG"
    finally:
        child.stop()


# --- the production callers on this client ---------------------------------------------------

POLICY = parse_policy_text(
    """
version: 1
timezone: UTC
defaults:
  default_output_cap: 100
workspaces:
  dev:
    budget_usd: 1
    upstream: {key_env: TEST_UPSTREAM}
    services:
      cli: {}
"""
)


def test_budgets_and_ledger_reserve_and_settle_through_this_client(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    now = int(datetime(2026, 11, 10, 12, tzinfo=UTC).timestamp() * 1000)
    plan = plan_request(
        POLICY,
        Identity("key_a", "dev", None, "cli", None, 0),
        model="gpt-4o-mini",
        counted_input=1000,
        output_cap=None,
        prices=PriceTable.load(),
        now_ms=now,
    )

    def settlement(reservation_id: str, request_id: str) -> Settlement:
        return Settlement(
            prefix=plan.prefix,
            reservation_id=reservation_id,
            period=plan.period.id,
            day="2026-11-10",
            hour="2026-11-10T12",
            scopes=[ScopeCharge(scope=s.scope, soft_nanos=-1) for s in plan.scopes],
            record=UsageRecord(request_id=request_id, cost_nanos=1000, workspace="dev"),
        )

    async def body(c: FastRedis) -> tuple[bool, bool, int]:
        budgets = Budgets(c)
        ledger = Ledger(c, spool_dir=tmp_path / "spool")
        await ledger.start()
        try:
            first = await budgets.reserve(plan, False, now)
            ledger.submit(settlement(first.reservation_id, "req-1"))
            await ledger.drain()
            await c.execute_command("SCRIPT", "FLUSH")  # Redis forgets both scripts
            second = await budgets.reserve(plan, False, now)
            ledger.note_unmetered("GET /v1/models")
            ledger.submit(settlement(second.reservation_id, "req-2"))
            await ledger.drain()
        finally:
            await ledger.close()
        return first.allowed, second.allowed, ledger.written

    first, second, written = run(redis_url, body)
    assert (first, second, written) == (True, True, 2)
    assert r.hget("{ws:dev}:spent:2026-11", "ws") == b"2000"
    assert r.hget("{ws:dev}:held:2026-11", "ws") == b"0"
    assert r.hget("{extproc:ledger}:unmetered", "GET /v1/models") == b"1"
    assert r.script_exists(RESERVE.sha, SETTLE.sha) == [True, True]
