"""`make run` (`extproc stack`): one developer's local stack, safe to start twice.

What a person at a terminal needs from it, in order: a refusal before anything starts
when the port is taken (Envoy would otherwise share it silently through SO_REUSEPORT);
state of its own per port (`.data/<port>/`, locked while in use) so two stacks in one
checkout never write the same Redis files; a record in the per-user state directory so
the CLI finds the stack from any directory; a warning, before the first request fails,
for every workspace whose upstream credential is missing; the sidecar's and Envoy's
warnings and errors shown live; and the same demo key on every start instead of a new,
never-revoked one each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from extproc.devstack import state

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_POLICY = ROOT / "examples" / "policy.yaml"
DEFAULT_PORT = 10000
DATA_ROOT = Path(".data")

ENV_HELP = """\
environment:
  EXTPROC_PORT     Envoy's port for clients (default 10000); each port has its own
                   state in .data/<port>/ and its own record for the CLI
  UPSTREAM_URL     a real upstream, e.g. https://api.openai.com (default: the local
                   simulator, which accepts any credential)
  EXTPROC_POLICY   budget policy file (default: examples/policy.yaml)
  EXTPROC_CONFIG   sidecar settings file (optional)
  EXTPROC_WORKERS  sidecar worker processes and Envoy threads (default: one per CPU)
  EXTPROC_CONSOLE_PORT  web console and admin API (default: EXTPROC_PORT + 80; 0: none)
  EXTPROC_SIDECAR_PORT  the sidecar's gRPC port; its workers' own ports follow it (default: free)
  EXTPROC_REDIS_PORT    the embedded Redis-protocol server (default: free)
  EXTPROC_SIMULATOR_PORT  the OpenAI simulator, without UPSTREAM_URL (default: free)
  EXTPROC_ENVOY_ADMIN_PORT  Envoy's admin API on 127.0.0.1 (default: free)
  EXTPROC_PROMETHEUS_PORT   the sidecar's /metrics, port or host:port (default: off)
  EXTPROC_ADMIN_TOKENS  admin API tokens, name:token,... (default: a fresh one per run)
  UPSTREAM_CA_FILE CA bundle for an https UPSTREAM_URL other than the system's
  OTEL_*           OpenTelemetry exporters for the sidecar (see README)
Ctrl-C stops everything; `rm -rf .data/<port>` afterwards resets that stack's data."""


INTERNAL_PORTS = (
    "EXTPROC_SIDECAR_PORT",
    "EXTPROC_REDIS_PORT",
    "EXTPROC_SIMULATOR_PORT",
    "EXTPROC_ENVOY_ADMIN_PORT",
)
"""Ports of the stack's inner parts, free ones unless pinned (firewalls, other tools)."""


class StackRefused(Exception):
    """The stack cannot start here; the message says why and what to do."""


def port_problem(port: int, host: str = "127.0.0.1", var: str = "EXTPROC_PORT") -> str | None:
    """Why `port` cannot be ours, or None.

    The probe binds without SO_REUSEPORT, so it fails exactly when another listener holds
    the port, including an Envoy that would happily have shared it with ours.
    SO_REUSEADDR keeps a previous run's connections in TIME_WAIT from counting as taken.
    """
    if not 0 < port < 65536:
        return f"{var}={port} is not a TCP port (1-65535)"
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"port {port} is already in use (another `make run`, or another program); "
                    f"stop it, or pick another port: {var}={port + 1} make run"
                )
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


class DataLock:
    """An exclusive lock on a stack's data directory, naming its holder when refused."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "stack.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise StackRefused(
                f"{self.path.parent} is in use by {holder}; stop that stack first "
                "(two stacks must not share one Redis data directory)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def credential_warnings(policy: Any, env: dict[str, str] | None = None) -> list[str]:
    """One line per workspace whose real provider key cannot be read, naming where."""
    from extproc.governance.policy import PolicyError

    lines = []
    for name, ws in policy.workspaces.items():
        try:
            ws.upstream.read_key(env)
        except PolicyError as exc:
            where = str(exc).removeprefix("upstream key: ")
            fix = f"export {ws.upstream.key_env}=sk-..." if ws.upstream.key_env else "fix the file"
            lines.append(
                f"warning: workspace {name}: {where}; its requests will get 503 "
                f"upstream_credential_missing ({fix} and restart)"
            )
    return lines


# Sidecar lines are "<date> <time> LEVEL logger: message"; Envoy's "[time][tid][level][...]".
_SIDECAR_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+ (\w+) ")
_ENVOY_LINE = re.compile(r"^\[[^\]]+\]\[\d+\]\[(\w+)\]")
_LOUD = frozenset({"WARNING", "ERROR", "CRITICAL", "warning", "error", "critical"})


class LogEcho:
    """Passes warnings and errors (with their traceback lines) of one child to the terminal."""

    def __init__(self, name: str, out: Callable[[str], None]) -> None:
        self.name = name
        self._out = out
        self._echoing = False

    def __call__(self, line: str) -> None:
        match = _SIDECAR_LINE.match(line) or _ENVOY_LINE.match(line)
        if match:
            self._echoing = match[1] in _LOUD
        elif "Traceback (most recent call last)" in line:
            self._echoing = True
        if self._echoing:
            self._out(f"[{self.name}] {line}")


def _printer(stream: IO[str]) -> Callable[[str], None]:
    lock = threading.Lock()

    def out(line: str) -> None:
        with lock:
            print(line, file=stream, flush=True)

    return out


def demo_key(redis_url: str, policy: Any, data_dir: Path) -> tuple[str, str, str, bool]:
    """(secret, workspace, service, reused): the key kept in `data_dir` while it still works.

    The secret is kept (mode 0600) next to the Redis data it belongs to, so a restart shows
    the same key and wiping `.data/<port>` forgets both together.
    """
    from extproc.governance.keys import KeyStore
    from extproc.store.clients import make_client

    ws = next(iter(policy.workspaces.values()))
    service = next(iter(ws.services), "demo")
    saved_path = data_dir / "demo-key.json"
    saved: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(saved_path.read_text())

    async def go() -> tuple[str, str, str, bool]:
        client = make_client(redis_url)
        try:
            store = KeyStore(client)
            if saved.get("key") and saved.get("key_id"):
                identity = await store.lookup(saved["key"])
                if identity is not None and identity.workspace in policy.workspaces:
                    return saved["key"], identity.workspace, identity.service, True
            secret, identity = await store.create(ws.name, service, policy=policy)
        finally:
            await client.aclose()
        fd = os.open(saved_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"key": secret, "key_id": identity.key_id}, f)
        return secret, identity.workspace, identity.service, False

    return asyncio.run(go())


def _console_lines(stack: Any, admin_tokens: str) -> str:
    if not getattr(stack, "console_url", ""):
        return ""
    token = admin_tokens.split(",")[0].partition(":")[2] or admin_tokens
    return (
        f"  console         : {stack.console_login}   (one-time login link)\n"
        f"  admin API       : {stack.console_url}/admin/v1 with 'Authorization: Bearer {token}'\n"
    )


def main(env: dict[str, str] | None = None) -> int:
    """Run the stack until Ctrl-C or SIGTERM. Exit 2: refused before anything started."""
    from extproc.devstack.stack import Stack, StackConfig
    from extproc.governance.policy import PolicyError, load_policy

    env = dict(os.environ if env is None else env)
    err = _printer(sys.stderr)
    raw_port = env.get("EXTPROC_PORT") or str(DEFAULT_PORT)
    if not raw_port.isdigit():
        err(f"extproc: EXTPROC_PORT must be a port number, got {raw_port!r}")
        return 2
    port = int(raw_port)
    upstream = env.get("UPSTREAM_URL") or None
    policy_path = Path(env.get("EXTPROC_POLICY") or DEFAULT_POLICY).resolve()
    try:
        policy = load_policy(policy_path)
    except PolicyError as exc:
        err(f"extproc: the policy is invalid (EXTPROC_POLICY={policy_path}):\n{exc}")
        return 2
    raw_console = env.get("EXTPROC_CONSOLE_PORT") or str(port + 80)
    if not raw_console.isdigit():
        err(f"extproc: EXTPROC_CONSOLE_PORT must be a port number, got {raw_console!r}")
        return 2
    console_port = int(raw_console)
    wanted = [(port, "EXTPROC_PORT")] + [(console_port, "EXTPROC_CONSOLE_PORT")] * bool(
        console_port
    )
    internal: dict[str, int] = {}
    for var in INTERNAL_PORTS:
        raw = env.get(var, "").strip()
        if not raw:
            continue
        if not raw.isdigit():
            err(f"extproc: {var} must be a port number, got {raw!r}")
            return 2
        internal[var] = int(raw)
        wanted.append((int(raw), var))
    seen: dict[int, str] = {}
    for taken, var in wanted:
        if taken in seen:
            err(f"extproc: {var} and {seen[taken]} are both {taken}; give each its own port")
            return 2
        seen[taken] = var
    for taken, var in wanted:
        problem = port_problem(taken, var=var)
        if problem:
            err(f"extproc: {problem}")
            return 2
    data_dir = (DATA_ROOT / str(port)).resolve()
    lock = DataLock(data_dir)
    try:
        lock.acquire()
    except StackRefused as exc:
        err(f"extproc: {exc}")
        return 2
    try:
        return _run(
            Stack,
            StackConfig,
            policy,
            policy_path,
            (port, console_port),
            internal,
            upstream,
            data_dir,
            env,
            err,
        )
    finally:
        lock.release()


def _run(
    stack_cls: Any,
    config_cls: Any,
    policy: Any,
    policy_path: Path,
    ports: tuple[int, int],
    internal: dict[str, int],
    upstream: str | None,
    data_dir: Path,
    env: dict[str, str],
    err: Callable[[str], None],
) -> int:
    sidecar_env = {"EXTPROC_POLICY": str(policy_path)}
    if env.get("EXTPROC_CONFIG"):
        sidecar_env["EXTPROC_CONFIG"] = str(Path(env["EXTPROC_CONFIG"]).resolve())
    if upstream is None:
        # The simulator accepts any credential: every workspace, one added to the live
        # policy too, gets a simulated key instead of the real ones nobody has locally.
        sidecar_env["EXTPROC_UPSTREAM_KEYS"] = "simulated"
    else:
        for line in credential_warnings(policy, env):
            err(line)
    port, console_port = ports
    from extproc.dataplane.workers import available_cpus

    # One sidecar worker and one Envoy worker thread per usable CPU, unless told otherwise.
    raw_workers = env.get("EXTPROC_WORKERS") or "0"
    workers = (int(raw_workers) if raw_workers.isdigit() else 0) or available_cpus()
    # The admin API needs a token: a fresh one per local stack unless the operator set one.
    admin_tokens = env.get("EXTPROC_ADMIN_TOKENS") or f"local:{secrets.token_urlsafe(24)}"
    stack = stack_cls(
        config_cls(
            listen_port=port,
            upstream_url=upstream,
            data_dir=data_dir,
            sidecar_env=sidecar_env,
            sidecar_workers=workers,
            envoy_concurrency=workers,
            console_port=console_port,
            console_env={"EXTPROC_ADMIN_TOKENS": admin_tokens},
            # A CA bundle for an https UPSTREAM_URL other than the system's (a corporate proxy).
            upstream_ca=env.get("UPSTREAM_CA_FILE") or None,
            log_echo=lambda name: LogEcho(name, err),
            sidecar_port=internal.get("EXTPROC_SIDECAR_PORT"),
            redis_port=internal.get("EXTPROC_REDIS_PORT"),
            simulator_port=internal.get("EXTPROC_SIMULATOR_PORT"),
            admin_port=internal.get("EXTPROC_ENVOY_ADMIN_PORT"),
        )
    )
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    try:
        stack.start()
    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
        err(f"extproc: the stack did not start: {exc}")
        return 1
    try:
        state.write(
            state.StackState(
                port=port,
                pid=os.getpid(),
                base_url=stack.base_url,
                redis_url=stack.redis_url,
                policy=str(policy_path),
                data_dir=str(data_dir),
                upstream_url=stack.upstream_url,
                simulated=upstream is None,
            )
        )
        secret, workspace, service, reused = demo_key(stack.redis_url, policy, data_dir)
        exe = Path(sys.executable).parent / "extproc"
        print(
            f"\nextproc stack is up.\n"
            f"  OpenAI base URL : {stack.base_url}\n"
            f"  upstream        : {stack.upstream_url}\n"
            f"  policy          : {policy_path}\n"
            f"  redis           : {stack.redis_url}\n"
            f"  data            : {data_dir} (delete it while stopped to reset)\n"
            f"  demo key        : {secret}   (workspace {workspace}, service {service}"
            f"{', same as last run' if reused else ''})\n"
            f"  more keys       : {exe} keys create --workspace W --service S\n"
            f"  usage / spend   : {exe} usage --limit 10 ; {exe} spend\n"
            f"{_console_lines(stack, admin_tokens)}"
            f"  my usage        : {stack.base_url.removesuffix('/v1')}/extproc/me"
            f" (ask for a top-up there; `{exe} topup list` to decide)\n"
            f"Warnings and errors of the sidecar and Envoy appear below. Ctrl-C stops everything.",
            flush=True,
        )
        stopped.wait()
    finally:
        print("stopping…", flush=True)
        stack.stop()
        state.remove(port, os.getpid())
    return 0
