"""Shared fixtures: one real stack (Redis, simulator, sidecar, Envoy) for the end-to-end suite."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
import redis
import redis.asyncio as aioredis

from extproc.devstack.stack import Stack, free_port, redis_child, temporary_stack
from extproc.metering.ledger import record_to_dict
from extproc.store.schema import LEDGERS, ledger_key, workspace_prefix
from extproc.v1.ledger_pb2 import UsageRecord

# Small enough to test the limit cheaply, still well above Envoy's 1 MiB default buffer.
E2E_MAX_BODY = 8 * 1024 * 1024

# -- the suite cleans up after itself ---------------------------------------------------------

_RUN_TMP: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Every temporary file of the run, ours and our children's, under one directory that is
    removed at the end: pytest's tmp_path, `tempfile` here, TMPDIR in every process started.
    EXTPROC_KEEP_TMP=1 keeps it (its path is printed) to look at after a failure."""
    global _RUN_TMP
    if config.option.basetemp is not None:
        return
    _RUN_TMP = Path(tempfile.mkdtemp(prefix="extproc-tests-"))
    config.option.basetemp = str(_RUN_TMP / "pytest")
    tempfile.tempdir = str(_RUN_TMP)
    os.environ["TMPDIR"] = str(_RUN_TMP)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _RUN_TMP is None:
        return
    if os.environ.get("EXTPROC_KEEP_TMP"):
        print(f"\nextproc tests: temporary files kept in {_RUN_TMP}", file=sys.stderr)
        return
    shutil.rmtree(_RUN_TMP, ignore_errors=True)


def _live_children() -> dict[int, str]:
    """This process's children that are still running (not zombies), with their commands."""
    found: dict[int, str] = {}
    me = os.getpid()
    for task in Path(f"/proc/{me}/task").glob("*"):
        with suppress(OSError):
            for pid in map(int, (task / "children").read_text().split()):
                with suppress(OSError):
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                        found[pid] = cmd.decode(errors="replace").strip()
    return found


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running() -> Iterator[None]:
    """After the last test, no process the suite started may still run: one that does is
    killed and named, and the run fails (a sidecar once outlived the suite)."""
    before = set(_live_children())
    yield
    left = {pid: cmd for pid, cmd in _live_children().items() if pid not in before}
    for pid in left:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes the tests left running (now killed): {left}"


@contextmanager
def policy_stack(
    tmp_path_factory: pytest.TempPathFactory, policy: str, env: dict[str, str], **options: Any
) -> Iterator[Stack]:
    """A stack of its own running `policy` (written to a file), for a module's own fixture.

    `env` adds to the sidecar's environment (the upstream key variable the policy names);
    `options` go to `temporary_stack`. The stack remembers the file as `policy_path`, which
    `cli` hands to `extproc` as an operator would.
    """
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(policy)
    with temporary_stack(sidecar_env={"EXTPROC_POLICY": str(path), **env}, **options) as s:
        s.policy_path = path  # type: ignore[attr-defined]
        yield s


# A chat stream of 20 chunks 40 ms apart (the simulator's fault header): it stays open for
# most of a second, long enough for a test to stop or kill something while it runs.
SLOW_STREAM: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "a long answer please"}],
    "stream": True,
    "stream_options": {"include_usage": True},
}
SLOW_STREAM_HEADERS = {"x-sim-fault": "event-delay-ms=40", "x-sim-output-tokens": "20"}


# Two workspaces, two teams, three services: the policy the console's tests look at.
CONSOLE_POLICY = """
version: 1
timezone: UTC
defaults: {default_output_cap: 64}
workspaces:
  dev:
    budget_usd: 100
    upstream: {key_env: TEST_UPSTREAM}
    teams:
      platform: {budget_usd: 40}
      data: {}
    services:
      cli: {team: platform}
      etl: {team: data}
  prod:
    budget_usd: 500
    upstream: {key_env: TEST_UPSTREAM}
    services:
      api: {}
"""


# Metering only, said so: no policy, no keys, the client's own credential goes upstream. The
# sidecar refuses to start without a policy unless this is set.
METERING_ONLY = {"EXTPROC_METERING_ONLY": "1"}


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The shared metering-only stack (module fixtures run their own with a policy)."""
    env = {"EXTPROC_MAX_BODY_BYTES": str(E2E_MAX_BODY), **METERING_ONLY}
    with temporary_stack(sidecar_env=env) as s:
        yield s


@pytest.fixture
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="sk-test", max_retries=0, timeout=30)


@pytest.fixture(scope="session")
def redis_client(stack: Stack) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(stack.redis_url)
    yield r
    r.close()


def _records(rows: list[Any]) -> list[tuple[bytes, UsageRecord]]:
    return [(entry_id, UsageRecord.FromString(fields[b"r"])) for entry_id, fields in rows]


UNATTRIBUTED_LEDGER = ledger_key(workspace_prefix("")).encode()


def _streams(r: redis.Redis) -> list[bytes]:
    return sorted(r.smembers(LEDGERS))


def all_records(r: redis.Redis, request_id: str) -> list[dict[str, Any]]:
    return [
        record_to_dict(rec)
        for stream in _streams(r)
        for _id, rec in _records(r.xrange(stream))
        if rec.request_id == request_id
    ]


def wait_for(
    r: redis.Redis, match: Callable[[UsageRecord], bool], what: str, timeout: float = 15.0
) -> dict[str, Any]:
    """The ledger is written asynchronously: block on the Redis streams until a record matches."""
    deadline = time.monotonic() + timeout
    last: dict[bytes, bytes] = {}
    while True:
        for stream in _streams(r):
            for entry_id, rec in _records(r.xrange(stream, min=last.get(stream, b"0"))):
                if match(rec):
                    return record_to_dict(rec)
                last[stream] = entry_id
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no ledger record for {what} within {timeout}s")
        # Wake on the next write to any known ledger; new ledgers are picked up each turn.
        watch = {UNATTRIBUTED_LEDGER: b"0", **last}
        r.xread(watch, block=max(1, int(min(left, 0.5) * 1000)))


def wait_record(r: redis.Redis, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
    return wait_for(r, lambda rec: rec.request_id == request_id, request_id, timeout)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A bare Redis-protocol server of its own for a test module (no stack around it)."""
    port = free_port()
    child = redis_child(port, tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        child.stop()


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the module's bare Redis, emptied (data and scripts) before each test."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.script_flush()
    yield client
    client.close()


class Hooks:
    """A real webhook receiver: records every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []  # the path each body was POSTed to, in the same order
        self.arrived = threading.Condition()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with hooks.arrived:
                    hooks.bodies.append(json.loads(body))
                    hooks.paths.append(self.path)
                    hooks.arrived.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.bodies) >= count, timeout), self.bodies
            return list(self.bodies)

    def wait_event(
        self, path: str, event: str, match: Callable[[dict[str, Any]], bool] = lambda b: True,
        timeout: float = 15.0,
    ) -> dict[str, Any]:  # fmt: skip
        """The first body POSTed to `path` for `event` that `match`es (waiting for it)."""

        def found() -> dict[str, Any] | None:
            for p, b in zip(self.paths, self.bodies, strict=True):
                if p == path and b.get("extproc", {}).get("event") == event and match(b):
                    return b
            return None

        with self.arrived:
            assert self.arrived.wait_for(lambda: found() is not None, timeout), (
                path, event, list(zip(self.paths, self.bodies, strict=True)))  # fmt: skip
            body = found()
            assert body is not None
            return body


@pytest.fixture(scope="module")
def hooks() -> Iterator[Hooks]:
    """A webhook receiver for the module's policy to point its alerts at."""
    h = Hooks()
    yield h
    h.server.shutdown()


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `extproc ...` against a stack's Redis and policy, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args, "--redis-url", stack.redis_url],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "EXTPROC_POLICY": str(stack.policy_path)},  # type: ignore[attr-defined]
    )


def new_key(stack: Stack, workspace: str, service: str) -> dict[str, Any]:
    out = cli(stack, "keys", "create", "--workspace", workspace, "--service", service, "--json")
    return json.loads(out.stdout)


T = TypeVar("T")


def run_with_redis(redis_url: str, body: Callable[[Any], Awaitable[T]]) -> T:
    """Run `body(client)` on a fresh asyncio Redis client, closed afterwards."""

    async def main() -> T:
        client = aioredis.from_url(redis_url)
        try:
            return await body(client)
        finally:
            await client.aclose()

    return asyncio.run(main())
