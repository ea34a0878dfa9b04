"""End to end: the runaway breaker on a real stack (Envoy, sidecar, Redis, simulator).

First 30 minutes of ordinary traffic in the shapes real clients send (`tests.traffic`: four
developers in Codex with growing histories and tool calls, a CI bot's review waves with
retries, a batch of small calls), played twenty times faster than recorded, trip nothing.
Then a script sends one 20k-token request in a loop: it is paused after the 21st copy (the
default rule: more than 20 in 10 minutes), plus what was in flight while the watch looked;
its refusal says why, since when and how to resume; the spend it caused is stated. The
compression only makes ordinary traffic look *more* like a runaway (more requests per
minute), never less, so a quiet compressed run is a fair test of the uncompressed one.

Two sidecar replicas run, each with a watch; one holds the lease and acts, and the pause it
writes reaches both (Envoy sends the loop's requests to each in turn). The order is the
synchronisation: the watch reads the ledger in order, so once it has paused the loop it has
read every record before it, the ordinary ones included.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from decimal import Decimal

import httpx
import openai
import pytest
import redis

from extproc.devstack.stack import Stack
from extproc.governance.pauses import Pause
from extproc.store.schema import AUDIT, ledger_key, paused_key, workspace_prefix
from extproc.v1.ledger_pb2 import UsageRecord
from tests.conftest import Hooks, cli, new_key, policy_stack
from tests.traffic import normal_traffic, play, runaway_loop, text

SPEED = 20
POLICY = """
version: 1
timezone: UTC
defaults: {{default_output_cap: 2000}}
alerts:
  webhooks: [{{url: "http://127.0.0.1:{port}/alerts", events: [key_paused, key_resumed]}}]
workspaces:
  dev:
    budget_usd: 1000
    contact: "#dev-help"
    upstream: {{key_env: TEST_UPSTREAM}}
    services:
      codex-cli: {{}}
      ci-bot: {{}}
      batch: {{}}
      nightly-script: {{}}
"""
SENDERS = {"dev1": "codex-cli", "dev2": "codex-cli", "dev3": "codex-cli", "dev4": "codex-cli",
           "ci-bot": "ci-bot", "batch": "batch"}  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, hooks: Hooks) -> Iterator[Stack]:
    policy = POLICY.format(port=hooks.port)
    # Two replicas: two watches, one lease; the pause must reach both.
    with policy_stack(tmp_path_factory, policy, {"TEST_UPSTREAM": "sk-upstream"}, sidecars=2) as s:
        yield s


def _records(r: redis.Redis, key_id: str) -> list[UsageRecord]:
    rows = r.xrange(ledger_key(workspace_prefix("dev")))
    return [rec for _id, f in rows if (rec := UsageRecord.FromString(f[b"r"])).key_id == key_id]


def _billed(r: redis.Redis, key_id: str, served: int, timeout: float = 15.0) -> list[UsageRecord]:
    """The key's records of served requests, once `served` of them are in: the ledger is
    written off the request path (a leased request's settlement may wait a few ms for
    company), so this blocks on the stream until they land, or the timeout."""
    stream = ledger_key(workspace_prefix("dev"))
    deadline = time.monotonic() + timeout
    while True:
        billed = [rec for rec in _records(r, key_id) if rec.outcome != "rejected"]
        if len(billed) >= served or time.monotonic() > deadline:
            return billed
        last = r.xrevrange(stream, count=1)
        r.xread({stream: last[0][0] if last else b"0"}, block=500)


def test_ordinary_traffic_trips_nothing_and_a_loop_is_paused(world: Stack, hooks: Hooks) -> None:
    keys = {who: new_key(world, "dev", svc)["key"] for who, svc in SENDERS.items()}
    calls = normal_traffic()
    played = play(calls, world.base_url, keys, speed=SPEED)
    assert len(played) == len(calls)
    assert {status for _c, status in played} == {200}, [s for _c, s in played if s != 200][:5]

    loop = new_key(world, "dev", "nightly-script")
    client = openai.OpenAI(base_url=world.base_url, api_key=loop["key"], max_retries=0)
    request = runaway_loop(0, 1)[0]
    messages = [{"role": "system", "content": text(*request.items[0])},
                {"role": "user", "content": text(*request.items[1])}]  # fmt: skip
    done: list[float] = []  # when each copy was answered
    started = time.monotonic()
    with pytest.raises(openai.PermissionDeniedError) as refused:
        while time.monotonic() - started < 120:
            client.chat.completions.create(model=request.model, messages=messages)
            done.append(time.monotonic())
    paused_at = time.monotonic()
    served = len(done)
    # The 21st copy trips the rule (more than 20 in 10 minutes). The watch reads the ledger
    # every second, off the request path, so what the loop sends meanwhile is served too:
    # the pause must land within a few seconds of the 21st copy, whatever the loop's pace.
    assert served >= 21
    lag = paused_at - done[20]
    assert lag < 3.0, (lag, served)
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "key_paused"
    message = error["message"]
    assert f"Key {loop['key_id']} is paused: the runaway breaker paused it at 20" in message
    assert re.search(r"the same 20,0\d\d-token request on gpt-4o-mini was sent 21 times", message)
    assert f"`extproc keys resume {loop['key_id']}`" in message and "#dev-help" in message

    r = redis.Redis.from_url(world.redis_url)
    try:
        pauses = {k.decode(): Pause.from_json(v) for k, v in r.hgetall(paused_key("dev")).items()}
        actions = [(e[b"action"], e[b"target"].decode()) for _id, e in r.xrange(AUDIT)
                   if e[b"action"].startswith(b"breaker.")]  # fmt: skip
        billed = _billed(r, loop["key_id"], served)
    finally:
        r.close()
    # Only the loop: the ordinary traffic before it tripped nothing.
    assert list(pauses) == [loop["key_id"]], pauses
    assert actions == [(b"breaker.pause", loop["key_id"])]
    alerts = [b for b in hooks.wait_for(1) if b["extproc"]["event"] == "key_paused"]
    assert len(alerts) == 1 and loop["key_id"] in alerts[0]["text"]
    assert len(billed) == served
    caused = sum(rec.cost_nanos for rec in billed)
    print(
        f"\nrunaway loop: {served} copies of a 20k-token request served in "
        f"{paused_at - started:.1f}s, paused {lag:.2f}s after the 21st; they cost "
        f"${Decimal(caused) / 10**9:.4f} "
        f"(${Decimal(caused) / served / 10**9:.5f} each); ordinary traffic: {len(calls)} "
        f"requests ({sum(c.input_tokens for c in calls):,} input tokens) played x{SPEED}"
    )

    # One action resumes it (the CLI here; the console and its API do the same).
    out = cli(world, "keys", "resume", loop["key_id"])
    assert "resumed" in out.stdout
    deadline = time.monotonic() + 5
    while True:
        try:
            hello = [{"role": "user", "content": "hi"}]
            client.chat.completions.create(model="gpt-4o-mini", messages=hello)
            break
        except openai.PermissionDeniedError:
            assert time.monotonic() < deadline, "still paused 5 s after the resume"
    resumed = [b for b in hooks.wait_for(2) if b["extproc"]["event"] == "key_resumed"]
    assert resumed and "resumed by cli:" in resumed[0]["text"]
    me = httpx.get(world.base_url.removesuffix("/v1") + "/extproc/v1/me",
                   headers={"authorization": f"Bearer {loop['key']}"}).json()  # fmt: skip
    assert me["paused"] is None
    assert json.loads(json.dumps(me))["identity"]["key_id"] == loop["key_id"]
