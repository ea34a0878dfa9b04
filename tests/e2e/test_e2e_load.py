"""End to end under load: thousands of long-lived streams, and what happens past the limit.

Every LLM stream holds one ext_proc stream and one upstream request in Envoy for its whole
life, so Envoy's default circuit breakers (1,024 requests per cluster) used to cut the
1,025th concurrent call with a bare 500. Here 2,000 streamed calls are held open at once
through one Envoy and one sidecar on this small machine: each completes and is metered
exactly once. Past a (deliberately small) configured limit, callers get a 503 in OpenAI's
shape that SDKs retry.

The client is raw asyncio HTTP/1.1, one connection per call: a full HTTP client per stream
would spend the machine's two cores on itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis

from extproc.devstack.stack import Stack, raise_fd_limit
from extproc.store.schema import LEDGERS
from extproc.v1.ledger_pb2 import UsageRecord
from tests.conftest import new_key, policy_stack

STREAMS = 2_000
RID = "x-extproc-request-id"

POLICY = """
version: 1
timezone: UTC
workspaces:
  dev:
    budget_usd: 100000
    upstream: {key_env: TEST_UPSTREAM_DEV}
    services:
      load: {}
"""


@dataclass
class Call:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str = ""


@dataclass
class Gauge:
    """Streams that have started answering and not yet ended, and the most at once."""

    open: int = 0
    peak: int = 0

    def up(self) -> None:
        self.open += 1
        self.peak = max(self.peak, self.open)


async def call(
    port: int, key: str, body: bytes, extra: str, gauge: Gauge, answered: asyncio.Event
) -> Call:
    try:
        return await _call(port, key, body, extra, gauge, answered)
    finally:
        answered.set()


async def _call(
    port: int, key: str, body: bytes, extra: str, gauge: Gauge, answered: asyncio.Event
) -> Call:
    out = Call()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        out.error = f"connect: {exc}"
        return out
    started = False
    try:
        writer.write(
            (
                "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                f"authorization: Bearer {key}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n"
            ).encode()
            + body
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        out.status = int(lines[0].split()[1])
        out.headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }
        first = await reader.read(65536)
        answered.set()
        if first:
            started = True
            gauge.up()
        out.body = first + await reader.read()  # connection: close, so EOF ends it
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        out.error = repr(exc)
    finally:
        if started:
            gauge.open -= 1
        writer.close()
    return out


def dechunk(raw: bytes) -> bytes:
    out, pos = [], 0
    while True:
        end = raw.index(b"\r\n", pos)
        size = int(raw[pos:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(raw[end + 2 : end + 2 + size])
        pos = end + 2 + size + 2


def usage_of(call_: Call) -> dict:
    text = dechunk(call_.body).decode()
    usage = [
        json.loads(line[6:])["usage"]
        for line in text.splitlines()
        if line.startswith("data: {") and '"usage":{' in line
    ]
    assert text.rstrip().endswith("data: [DONE]"), text[-300:]
    return usage[-1]


async def run_calls(
    port: int, key: str, n: int, extra: str, *, ramp: int = 200
) -> tuple[list[Call], Gauge]:
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "stream to me slowly"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    gauge = Gauge()
    tasks = []
    for start in range(0, n, ramp):
        # Open a batch, and the next only once this one is answering: thousands of calls
        # arriving in the same millisecond on a shared 2-core machine would be a test of
        # message_timeout, not of how many streams stay open at once.
        batch = [asyncio.Event() for _ in range(min(ramp, n - start))]
        tasks += [
            asyncio.create_task(call(port, key, body, extra, gauge, answered)) for answered in batch
        ]
        for answered in batch:
            await answered.wait()
    return list(await asyncio.gather(*tasks)), gauge


def ledger(r: redis.Redis) -> dict[str, list[UsageRecord]]:
    found: dict[str, list[UsageRecord]] = {}
    for stream in r.smembers(LEDGERS):
        for _id, fields in r.xrange(stream):
            rec = UsageRecord.FromString(fields[b"r"])
            found.setdefault(rec.request_id, []).append(rec)
    return found


def wait_ledger(r: redis.Redis, ids: set[str], timeout: float = 60.0) -> dict:
    """Block on the ledger stream until every id has a record (it is written asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        found = ledger(r)
        if ids <= found.keys() or time.monotonic() > deadline:
            return found
        r.xread({b"{ws:dev}:ledger": b"$"}, block=500)


def governed(tmp: pytest.TempPathFactory, **config: object) -> Iterator[Stack]:
    with policy_stack(tmp, POLICY, {"TEST_UPSTREAM_DEV": "sk-upstream-dev"}, **config) as s:
        yield s


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    assert raise_fd_limit() >= 4 * STREAMS, "the open-file limit is too low for this test"
    yield from governed(tmp_path_factory)


def test_two_thousand_concurrent_streams_complete_and_are_metered_once(big: Stack) -> None:
    key = new_key(big, "dev", "load")["key"]
    # ~20 chunks 3 s apart: every stream lasts about a minute, far longer than opening them
    # all in batches of 100.
    extra = "x-sim-fault: event-delay-ms=3000\r\nx-sim-output-tokens: 16\r\n"
    calls, gauge = asyncio.run(run_calls(big.config.listen_port, key, STREAMS, extra, ramp=100))
    failed = [c for c in calls if c.error or c.status != 200]
    assert not failed, f"{len(failed)} failed, e.g. {failed[0]}"
    assert gauge.peak == STREAMS  # all of them open at the same moment
    ids = {c.headers[RID] for c in calls}
    assert len(ids) == STREAMS
    r = redis.Redis.from_url(big.redis_url)
    try:
        found = wait_ledger(r, ids)
    finally:
        r.close()
    assert {i: len(found.get(i, [])) for i in ids} == dict.fromkeys(ids, 1)
    for c in calls:
        (rec,) = found[c.headers[RID]]
        usage = usage_of(c)
        assert rec.outcome == "completed" and not rec.estimated
        assert (rec.input_tokens, rec.output_tokens) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from governed(tmp_path_factory, max_streams=40)


def test_past_the_stream_limit_callers_get_an_openai_503(small: Stack) -> None:
    key = new_key(small, "dev", "load")["key"]
    extra = "x-sim-fault: event-delay-ms=500\r\nx-sim-output-tokens: 8\r\n"
    calls, _gauge = asyncio.run(run_calls(small.config.listen_port, key, 100, extra, ramp=100))
    assert not [c for c in calls if c.error]
    served = [c for c in calls if c.status == 200]
    refused = [c for c in calls if c.status != 200]
    assert 0 < len(served) <= 40
    assert refused
    for c in refused:
        assert c.status == 503, c
        assert c.headers["x-should-retry"] == "true"
        assert c.headers["content-type"] == "application/json"
        err = json.loads(c.body)["error"]
        assert err["type"] == "server_error"
        assert err["code"] in ("extproc_unavailable", "upstream_unavailable")
    r = redis.Redis.from_url(small.redis_url)
    try:
        found = wait_ledger(r, {c.headers[RID] for c in served})
    finally:
        r.close()
    for c in served:
        assert [rec.outcome for rec in found[c.headers[RID]]] == ["completed"]
