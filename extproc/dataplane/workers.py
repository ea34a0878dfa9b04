"""Several sidecar processes, each an endpoint of its own, so every core does work.

One Python process runs on one core; Envoy runs one worker thread per core. With
`workers: N` (default: the CPUs this process may use, cgroup limit included) the
`extproc serve` process becomes a supervisor: it starts N worker processes that share
nothing but Redis. Each worker listens on two ports:

- **its own port** (`worker_listen`, worker i on its port + i; by default the loopback
  port right after `listen`'s): Envoy's `extproc` cluster lists every worker as an
  endpoint of its own and balances streams across them by load (least request), and
  health-checks each one. This is how the pod's Envoy reaches the workers. Spreading by
  the kernel cannot do that: Envoy opens one HTTP/2 connection per Envoy thread, and
  SO_REUSEPORT hashes each connection to a worker at random, so with 2 threads and 2
  workers half the pods put both connections, and all of the load, on one worker;
- **the shared port** (`listen`), joined by all of them with SO_REUSEPORT: for the
  kubelet's probes and for proxies outside the pod (a mesh gateway reaching the sidecars
  through a Service), whose many connections the kernel spreads well enough.

The supervisor serves no traffic. It:

- holds every port for its whole life (a bound, non-listening socket each), so a worker
  that restarts gets its own port back and nothing else can take it meanwhile (while a
  worker is down its port refuses connections, and Envoy moves on to the others);
- relays the workers' output and says "extproc listening" once every worker is ready;
- restarts a worker that dies (backing off if it keeps dying at once), and kills and
  replaces one that hangs: each worker sends a heartbeat down a pipe from its event loop
  while its ledger writer is healthy; silence for `worker_hang_seconds` means hung;
- forwards SIGTERM/SIGINT, waits for the workers to drain (each turns its health
  check NOT_SERVING and finishes in-flight streams), and exits once they have.

SO_REUSEPORT lets any process of the same user join a port silently, so the supervisor
first binds every port *without* it: if something already listens there, it stops with
an error naming the setting instead of sharing traffic with a stranger.

Metrics: with `EXTPROC_PROMETHEUS_PORT` set, the supervisor (not the workers) listens on
it, and each scrape there merges what every worker counted (`insight.fanin`); workers
serve theirs on ephemeral loopback ports they announce. So the pod has one scrape
address, as its annotation and PodMonitor say, whatever the number of workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from extproc.dataplane.h2grpc.server import parse_listen
from extproc.insight import fanin
from extproc.insight.telemetry import METRICS_LINE, WORKER_METRICS_ENV, pod_metrics_address
from extproc.settings import ConfigError, Settings

log = logging.getLogger("extproc.dataplane.workers")

READY_LINE = "extproc listening on"
WORKER_ENV = "EXTPROC_WORKER_ID"
OWN_ADDRESS_ENV = "EXTPROC_WORKER_ADDRESS"  # a worker's own port, bound by it alone
READY_TIMEOUT = 60.0
_RESTART_BACKOFF_MAX = 5.0
_QUICK_DEATH = 5.0  # a worker dying sooner than this after start counts as crash-looping


def available_cpus() -> int:
    """CPUs this process may run on, capped by a cgroup v2 CPU quota (a pod's limit)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cpus)


def worker_count(settings: Settings) -> int:
    """`workers`, or one per usable CPU; a unix socket cannot be shared, so 1 there."""
    if settings.workers:
        return settings.workers
    return 1 if settings.listen.startswith("unix:") else available_cpus()


def reserve_port(listen: str, setting: str = "listen") -> tuple[str, socket.socket]:
    """Check nobody listens on `listen`, pick the port if it is 0, and hold it for the workers.

    Returns the concrete host:port and a bound (not listening) SO_REUSEPORT socket that
    keeps the port ours until the workers have joined it. `setting` names the setting the
    address came from in the error.
    """
    if listen.startswith("unix:"):
        raise ConfigError(f"workers > 1 needs a TCP listen address (host:port), got {listen!r}")
    host, port = parse_listen(listen)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _type, _proto, _name, address = infos[0]
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.bind(address)  # no SO_REUSEPORT: fails if anyone holds the port
    except OSError as exc:
        probe.close()
        raise ConfigError(f"{setting}: cannot bind {listen}: {exc.strerror}") from None
    port = probe.getsockname()[1]
    probe.close()
    held = socket.socket(family, socket.SOCK_STREAM)
    # SO_REUSEPORT only: the workers (same user, the option set) may join the port; a socket
    # with SO_REUSEADDR alone may not, not even while no worker listens (Linux lets two
    # SO_REUSEADDR sockets share a port that nobody listens on).
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind((address[0], port, *address[2:]))
    shown = f"[{address[0]}]" if family == socket.AF_INET6 else address[0]
    return f"{shown}:{port}", held


_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def worker_addresses(settings: Settings, count: int, shared: str) -> list[str]:
    """Each worker's own address: `worker_listen`'s port + i, by default on loopback
    right after the shared port (`shared`, concrete). Port 0: a free port each."""
    base = settings.worker_listen
    if not base:
        host, port = parse_listen(shared)
        host = _LOOPBACK.get(host or "", host or "")
        base = f"{host}:{port + 1}"
    try:
        host, port = parse_listen(base)
    except ValueError:
        raise ConfigError(f"worker_listen: must be host:port, got {base!r}") from None
    if port and port + count - 1 > 65535:
        raise ConfigError(f"worker_listen: {count} ports from {port} go past 65535")
    _shared_host, shared_port = parse_listen(shared)
    if port and port <= shared_port < port + count:
        raise ConfigError(
            f"worker_listen: ports {port}-{port + count - 1} include the shared port "
            f"{shared_port} (listen)"
        )
    shown = f"[{host}]" if host and ":" in host else (host or "")
    return [f"{shown}:{port + i if port else 0}" for i in range(count)]


def own_address() -> str | None:
    """This worker's own address (set by its supervisor), else None (a single process)."""
    return os.environ.get(OWN_ADDRESS_ENV) or None


class Worker:
    """One worker process and the task relaying its output."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.started = 0.0
        self.relay: asyncio.Task[None] | None = None
        self.beats: Heartbeats | None = None


class Supervisor:
    def __init__(self, settings: Settings, count: int, config_path: str | None) -> None:
        self.settings = settings
        self.count = count
        self.config_path = config_path
        self.listen = settings.listen
        self.workers = [Worker(i) for i in range(count)]
        # Each worker's own address, concrete (`worker_addresses`, reserved by `supervise`).
        self.addresses: list[str] = []
        self.stopping = False
        self._crashes = 0
        # The pod's one scrape endpoint, when metrics are on (see the module docstring).
        self.metrics: fanin.FanIn | None = None
        self._close_metrics: Callable[[], None] | None = None

    def serve_metrics(self, address: tuple[str, int] | None) -> None:
        """Listen on the pod's metrics address (None: metrics off) before any worker starts."""
        if address is None:
            return
        self.metrics = fanin.FanIn()
        try:
            self._close_metrics = fanin.serve(self.metrics, *address)
        except OSError as exc:
            self.metrics = None
            raise ConfigError(
                f"EXTPROC_PROMETHEUS_PORT: cannot listen on {address[0]}:{address[1]}: "
                f"{exc.strerror}"
            ) from None

    def _argv(self) -> list[str]:
        argv = [sys.executable, "-m", "extproc", "serve", "--workers", "1", "--reuse-port"]
        if self.config_path:
            argv += ["--config", self.config_path]
        return argv

    def _env(self, worker: Worker) -> dict[str, str]:
        env = {
            **os.environ,
            "EXTPROC_LISTEN": self.listen,
            "EXTPROC_WORKERS": "1",
            WORKER_ENV: str(worker.index),
            "PYTHONUNBUFFERED": "1",
        }
        if self.addresses:
            env[OWN_ADDRESS_ENV] = self.addresses[worker.index]
        if self.metrics is not None:
            # The pod's port is ours; each worker serves on loopback for us to merge.
            env.pop("EXTPROC_PROMETHEUS_PORT", None)
            env[WORKER_METRICS_ENV] = "1"
        return env

    async def _spawn(self, worker: Worker) -> None:
        worker.ready.clear()
        worker.started = time.monotonic()
        if worker.beats is not None:
            worker.beats.close()
        worker.beats = Heartbeats()
        env = {**self._env(worker), HEARTBEAT_ENV: str(worker.beats.write_fd)}
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                *self._argv(),
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                pass_fds=(worker.beats.write_fd,),
            )
        finally:
            worker.beats.listen()  # the worker holds its end now
        worker.relay = asyncio.create_task(self._relay(worker, worker.proc))

    async def _relay(self, worker: Worker, proc: asyncio.subprocess.Process) -> None:
        """Copy the worker's output to ours, line by line, and notice its ready line."""
        assert proc.stdout is not None
        out = sys.stdout
        while line := await proc.stdout.readline():
            text = line.decode("utf-8", "replace")
            if text.startswith(METRICS_LINE) and self.metrics is not None:
                self.metrics.attach(worker.index, text[len(METRICS_LINE) :].strip())
                continue
            if text.startswith(READY_LINE):
                worker.ready.set()
                if worker.beats is not None:
                    worker.beats.last = time.monotonic()  # it beats from now on
                own = f" on {self.addresses[worker.index]}" if self.addresses else ""
                text = f"extproc worker {worker.index} (pid {proc.pid}) ready{own}\n"
            out.write(text)
            out.flush()

    async def start(self) -> None:
        for worker in self.workers:
            await self._spawn(worker)
        all_ready = asyncio.ensure_future(asyncio.gather(*(w.ready.wait() for w in self.workers)))
        exits = [asyncio.create_task(w.proc.wait()) for w in self.workers if w.proc]
        await asyncio.wait(
            [all_ready, *exits], timeout=READY_TIMEOUT, return_when="FIRST_COMPLETED"
        )
        for task in (all_ready, *exits):
            task.cancel()
        # Collect what was cancelled, or asyncio logs "exception was never retrieved".
        await asyncio.gather(all_ready, *exits, return_exceptions=True)
        if not all(w.ready.is_set() for w in self.workers):
            exited = any(w.proc and w.proc.returncode is not None for w in self.workers)
            await self.stop(grace=5.0)
            what = "exited" if exited else "did not start"
            raise RuntimeError(f"a sidecar worker {what} before it was ready")

    async def watch(self) -> None:
        """Restart any worker that dies while we are not stopping."""
        while not self.stopping:
            procs = {asyncio.create_task(w.proc.wait()): w for w in self.workers if w.proc}
            done, pending = await asyncio.wait(procs, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if self.stopping:
                return
            for task in done:
                worker = procs[task]
                code = task.result()
                lived = time.monotonic() - worker.started
                self._crashes = self._crashes + 1 if lived < _QUICK_DEATH else 0
                delay = min(_RESTART_BACKOFF_MAX, 0.1 * 2 ** max(0, self._crashes - 1))
                log.error(
                    "sidecar worker %d (pid %s) exited with %s after %.1fs; restarting in %.1fs",
                    worker.index, worker.proc.pid if worker.proc else "?", code, lived, delay,
                )  # fmt: skip
                await asyncio.sleep(delay)  # back-off between restarts, not synchronisation
                if self.stopping:
                    return
                await self._spawn(worker)

    async def watch_hangs(self) -> None:
        """Kill any ready worker that has sent no heartbeat for `worker_hang_seconds`;
        `watch` then restarts it like any worker that died."""
        limit = self.settings.worker_hang_seconds
        if limit <= 0:
            return
        while not self.stopping:
            await asyncio.sleep(min(1.0, limit / 4))  # the check's period, not synchronisation
            now = time.monotonic()
            for worker in self.workers:
                proc, beats = worker.proc, worker.beats
                if proc is None or proc.returncode is not None or beats is None:
                    continue
                silent = now - beats.last
                if self.stopping or not worker.ready.is_set() or silent < limit:
                    continue
                log.error(
                    "sidecar worker %d (pid %s) sent no heartbeat for %.1fs: hung; killing it",
                    worker.index, proc.pid, silent,
                )  # fmt: skip
                beats.last = now  # once: `watch` restarts it when it has died
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    def signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)

    async def stop(self, grace: float) -> None:
        """Forward SIGTERM; workers drain for up to `grace`; kill whatever outlives that."""
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        procs = [w.proc for w in self.workers if w.proc is not None]
        waits = [asyncio.create_task(p.wait()) for p in procs]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=grace + 10.0)
            if pending:
                self.signal_all(signal.SIGKILL)
                await asyncio.wait(pending)
        relays = [w.relay for w in self.workers if w.relay is not None]
        if relays:
            await asyncio.wait(relays, timeout=5.0)
        if self._close_metrics is not None:
            self._close_metrics()
            self._close_metrics = None


# -- hung workers: heartbeats from each worker's event loop ------------------------------

HEARTBEAT_ENV = "EXTPROC_HEARTBEAT_FD"
HEARTBEAT_SECONDS = 1.0


class Heartbeats:
    """The supervisor's end of one worker's heartbeat pipe: when it last heard a beat.

    A pipe, not a probe: through the shared port a probe reaches whichever worker the kernel
    picks, never a chosen one. The worker writes a byte a second from its event loop
    (`send_heartbeats`); a loop that is stuck writes nothing.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.last = time.monotonic()
        self._listening = False

    def listen(self) -> None:
        """Close our copy of the worker's end and note every beat that arrives."""
        os.close(self.write_fd)
        asyncio.get_running_loop().add_reader(self.read_fd, self._on_readable)
        self._listening = True

    def _on_readable(self) -> None:
        try:
            data = os.read(self.read_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.last = time.monotonic()
        else:  # the worker exited: nothing more will come
            self.close()

    def close(self) -> None:
        if self.read_fd < 0:
            return
        if self._listening:
            asyncio.get_running_loop().remove_reader(self.read_fd)
        os.close(self.read_fd)
        self.read_fd = -1


def heartbeat_fd() -> int | None:
    """The pipe this worker's supervisor listens on, if it has one."""
    value = os.environ.get(HEARTBEAT_ENV, "")
    return int(value) if value.isdigit() else None


async def send_heartbeats(fd: int, alive: Callable[[], bool]) -> None:
    """A worker's side: one byte a second while `alive()` (the liveness check) holds."""
    os.set_blocking(fd, False)
    try:
        while True:
            if alive():
                with contextlib.suppress(BlockingIOError):  # a full pipe: the beat can wait
                    os.write(fd, b".")
            await asyncio.sleep(HEARTBEAT_SECONDS)  # the beat's period, not synchronisation
    except (BrokenPipeError, OSError):
        return  # the supervisor is gone; PR_SET_PDEATHSIG stops this worker
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM if the supervisor dies, so none is left orphaned."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def reserve_ports(settings: Settings, count: int) -> tuple[str, list[str], list[socket.socket]]:
    """The shared address and every worker's own, concrete, each held by a socket of ours.

    The shared port's socket is let go once the workers listen on it; the workers' own
    ports stay held for the supervisor's life (see the module docstring).
    """
    listen, held = reserve_port(settings.listen)
    sockets = [held]
    addresses: list[str] = []
    try:
        for wanted in worker_addresses(settings, count, listen):
            address, sock = reserve_port(wanted, "worker_listen")
            sockets.append(sock)
            addresses.append(address)
    except (ConfigError, OSError):
        for sock in sockets:
            sock.close()
        raise
    return listen, addresses, sockets


async def supervise(settings: Settings, count: int, config_path: str | None) -> int:
    listen, addresses, held = reserve_ports(settings, count)
    shared, own = held[0], held[1:]
    supervisor = Supervisor(settings, count, config_path)
    supervisor.listen = listen
    supervisor.addresses = addresses
    try:
        supervisor.serve_metrics(pod_metrics_address(os.environ))
    except ConfigError:
        for sock in held:
            sock.close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await supervisor.start()
    except RuntimeError as exc:
        for sock in held:
            sock.close()
        print(f"extproc: {exc}", file=sys.stderr, flush=True)
        return 1
    shared.close()  # the workers hold the shared port now
    log.info("extproc listening on %s with %d workers (%s)", listen, count, ", ".join(addresses))
    print(f"{READY_LINE} {listen} ({count} workers: {' '.join(addresses)})", flush=True)
    watcher = asyncio.create_task(supervisor.watch())
    hangs = asyncio.create_task(supervisor.watch_hangs())
    await stop.wait()
    log.info("shutting down: %d workers draining for up to %ss", count, settings.grace_seconds)
    await supervisor.stop(settings.grace_seconds)
    for task in (watcher, hangs):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for worker in supervisor.workers:
        if worker.beats is not None:
            worker.beats.close()
    for sock in own:
        sock.close()
    return 0
