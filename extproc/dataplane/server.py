"""The gRPC side: Envoy's ExternalProcessor service, health, and orderly shutdown.

The stream handler only orchestrates: it routes each ext_proc message to the handler its
request was given at its headers (`lifecycle`, `opening`) and sends back what that
returns. On SIGTERM the health service turns
NOT_SERVING first (so Envoy and Kubernetes stop sending new streams), in-flight
streams get `grace_seconds` to finish, and the ledger is drained before exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import NamedTuple, cast

from grpc_health.v1 import health_pb2

from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane import logrepeat
from extproc.dataplane.deps import Deps
from extproc.dataplane.h2grpc import HEALTH_CHECK_PATH, GrpcServer, Route, health_route
from extproc.dataplane.lifecycle import PHASES, Phase, Reply, Stream
from extproc.dataplane.opening import Opening
from extproc.dataplane.workers import heartbeat_fd, own_address, send_heartbeats
from extproc.governance.budget import Budgets
from extproc.governance.credentials import simulated_upstream_key
from extproc.governance.holds import tend_forever
from extproc.governance.keys import KeyCache, KeyStore
from extproc.governance.live import LiveState
from extproc.governance.policy import Policy, PolicyError, PolicyWatcher, load_policy
from extproc.insight.alerts import Alert, Alerter, record_alert
from extproc.insight.burn import BurnWatch
from extproc.insight.newmodels import NewModels
from extproc.insight.runaway import RunawayWatch
from extproc.insight.telemetry import METRICS_LINE, Telemetry
from extproc.insight.topupdesk import TopupDesk
from extproc.metering.ledger import Ledger
from extproc.metering.prices import PriceTable, usd_for_people
from extproc.metering.pricewatch import PriceWatcher
from extproc.metering.tokens import count_text
from extproc.settings import Settings, check_mode
from extproc.store.clients import AsyncClient, ScriptClient, is_cluster, make_client
from extproc.store.fastredis import FastRedis, supports_url
from extproc.store.schema import WORKSPACE_SCOPE, workspace_prefix

log = logging.getLogger("extproc.dataplane.server")

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
LIVENESS_SERVICE = "extproc.liveness"
"""Health service name for liveness probes: SERVING while the data path makes progress."""
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def dispatch(stream: Stream, request: msgs.ProcessingRequest) -> Reply:
    """Route one ext_proc message to its request's handler (see `lifecycle.Stream`).

    No exception leaves a phase: a bug or an input nobody foresaw must not turn into a
    broken gRPC stream, which Envoy answers with an empty 500 (after the provider may
    already have served, and billed, the request). The handler answers instead: an
    OpenAI-shaped 500 before forwarding, the response unchanged after; and it still
    settles exactly once.
    """
    kind = request.WhichOneof("request") or ""
    phase = PHASES.get(kind)
    if phase is None:  # a message kind this Envoy knows and we do not: let it be
        return msgs.CONTINUE_RESPONSE_BODY
    try:
        reply = stream.on(phase, request)
    except Exception:
        log.exception("extproc: %s phase failed", kind)
        return stream.on_internal_error(phase)
    if isinstance(reply, msgs.ProcessingResponse):
        return reply
    return _guarded(stream, reply, phase)


async def _guarded(
    stream: Stream, pending: Awaitable[msgs.ProcessingResponse], phase: Phase
) -> msgs.ProcessingResponse:
    try:
        return await pending
    except Exception:
        log.exception("extproc: %s phase failed", phase.value)
        return stream.on_internal_error(phase)


def open_stream(deps: Deps) -> Stream:
    """A new ext_proc stream: its handler is chosen at the request headers."""
    return Stream(Opening(deps))


_PROCESS_PATH = f"/{SERVICE_NAME}/Process"
_CONSTANT_REPLIES = {
    id(reply): reply.SerializeToString()
    for reply in (
        msgs.CONTINUE_REQUEST_HEADERS,
        msgs.CONTINUE_METERED_REQUEST_HEADERS,
        msgs.CONTINUE_REQUEST_BODY,
        msgs.CONTINUE_RESPONSE_HEADERS,
        msgs.CONTINUE_RESPONSE_BODY,
        msgs.SKIP_REST,
    )
}


def _serialize(reply: msgs.ProcessingResponse) -> bytes:
    return _CONSTANT_REPLIES.get(id(reply)) or reply.SerializeToString()


class ExtProcStream:
    """One ext_proc stream on our own HTTP/2 transport: bytes in, bytes out."""

    __slots__ = ("stream",)

    def __init__(self, deps: Deps) -> None:
        self.stream = open_stream(deps)

    def on_message(self, data: bytes) -> bytes | Awaitable[bytes]:
        began = time.perf_counter_ns()
        reply = dispatch(self.stream, msgs.ProcessingRequest.FromString(data))
        if isinstance(reply, msgs.ProcessingResponse):
            out = _serialize(reply)
            self.stream.busy_ns += time.perf_counter_ns() - began
            return out
        return self._later(reply, began)

    async def _later(self, pending: Awaitable[msgs.ProcessingResponse], began: int) -> bytes:
        out = _serialize(await pending)
        self.stream.busy_ns += time.perf_counter_ns() - began
        return out

    def on_end(self, cancelled: bool) -> None:
        # Envoy ends every ext_proc stream with RST_STREAM once the HTTP request is done, so
        # `cancelled` is the normal case; the handler itself knows whether it finished.
        self.stream.close()


class H2Transport:
    """Our HTTP/2 gRPC server: about 30 µs of CPU per message where grpcio's took ~240.

    grpcio's server was kept for a while as `transport: grpcio` and tested nowhere; it
    is gone. grpcio remains a test-only oracle client (and a dependency of xds-protos).
    """

    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        self._serving = True
        self._server = GrpcServer(
            {
                _PROCESS_PATH: Route(lambda: ExtProcStream(deps)),
                HEALTH_CHECK_PATH: health_route(self._health),
            },
            max_message_bytes=deps.settings.max_body_bytes * 2 + (1 << 20),
        )

    def _health(self, service: str) -> int:
        if service == LIVENESS_SERVICE:
            # Draining is no reason to restart; a dead or wedged ledger writer is. A sidecar
            # whose event loop is stuck does not answer at all: the probe's timeout catches it.
            alive = self._deps.ledger.alive()
            return health_pb2.HealthCheckResponse.SERVING if alive else NOT_SERVING
        if service not in ("", SERVICE_NAME):
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        if self._serving:
            return health_pb2.HealthCheckResponse.SERVING
        return health_pb2.HealthCheckResponse.NOT_SERVING

    async def start(self, settings: Settings, *, reuse_port: bool = False) -> None:
        await self._server.start(settings.listen, reuse_port=reuse_port)
        own = own_address() if reuse_port else None
        if own is not None:  # a worker: its own port too, Envoy's endpoint for it
            await self._server.start(own, reuse_port=True)

    async def stop(self, grace: float) -> None:
        self._serving = False
        await self._server.close(grace)


def upstream_keys(policy: Policy, simulated: bool = False) -> tuple[dict[str, str], dict[str, str]]:
    """Each workspace's real provider key, read once per policy load (never logged), and
    for each workspace without one, where it was looked for (for the 503 and the log).
    `simulated` (settings `upstream_keys`): every workspace gets its simulated key, so one
    added to the live policy works at once against the local simulator."""
    keys: dict[str, str] = {}
    missing: dict[str, str] = {}
    for name, ws in policy.workspaces.items():
        if simulated:
            keys[name] = simulated_upstream_key(name)
            continue
        try:
            keys[name] = ws.upstream.read_key()
        except PolicyError as exc:
            missing[name] = str(exc).removeprefix("upstream key: ")
            log.error("workspace %s: %s; its requests will get 503", name, exc)
    return keys, missing


class Governor:
    """Holds the live policy, hands each new one to its subscribers, and turns the soft-limit
    crossings the ledger reports into alerts.

    It owns its own copy of the policy, so the ledger can report to it before the exchanges'
    shared `Deps` exist (no half-built object patched afterwards).
    """

    def __init__(self, *, record: Callable[[Alert], Awaitable[None]] | None = None) -> None:
        self.policy: Policy | None = None
        self.alerter = Alerter(self.webhooks, record=record)
        self._subscribers: list[Callable[[Policy], None]] = []

    def subscribe(self, on_policy: Callable[[Policy], None]) -> None:
        self._subscribers.append(on_policy)

    def apply(self, policy: Policy) -> None:
        for on_policy in self._subscribers:
            on_policy(policy)
        self.policy = policy
        log.info("policy loaded: %s (%d workspaces)", policy.source, len(policy.workspaces))
        for warning in policy.warnings:
            log.warning("policy: %s", warning)

    def webhooks(self, event: str) -> list[str]:
        policy = self.policy
        if policy is None:
            return []
        return [w.url for w in policy.webhooks if not w.events or event in w.events]

    def on_soft_alert(self, workspace: str, scopes: list[str]) -> None:
        policy = self.policy
        ws = policy.workspaces.get(workspace) if policy else None
        for scope in scopes:
            if scope == WORKSPACE_SCOPE and ws is not None:
                text = (
                    f"extproc: workspace {workspace} crossed its soft limit "
                    f"({usd_for_people(ws.soft_nanos)} of a {usd_for_people(ws.budget_nanos)} "
                    f"{ws.period}ly budget). Traffic keeps flowing; hard limit at "
                    f"{usd_for_people(ws.hard_nanos)}."
                )
            else:
                text = f"extproc: {scope} in workspace {workspace} crossed its soft limit."
            self.alerter.send(Alert("soft_limit", workspace, scope, text, {}))


class Sidecar(NamedTuple):
    """The shared parts of a running sidecar, with the concrete types the server drives."""

    deps: Deps
    governor: Governor
    ledger: Ledger
    keys: KeyCache | None
    budgets: Budgets | None
    live: LiveState | None = None  # top-up grants and paused keys (governance.live)


def build_deps(settings: Settings, client: AsyncClient, hot: FastRedis | None = None) -> Sidecar:
    """Every shared part, each built whole before the one `Deps` that holds them.

    `hot` serves the two calls on every request (reserve, settle); `client` all the rest.
    Later, only hot reloads change `Deps` (the policy and the upstream keys through the
    governor, the prices and the shadow policy through their watchers, in `serve`).
    """
    check_mode(settings)  # the CLI checked already; a library caller gets the same guard
    if settings.metering_only:
        log.warning(
            "metering-only mode (EXTPROC_METERING_ONLY): no policy and no virtual keys; "
            "clients' own credentials reach the provider"
        )
    simulated = settings.upstream_keys == "simulated"
    if simulated:
        log.info("upstream keys are simulated (upstream_keys: simulated): local simulator only")
    governor = Governor(record=lambda alert: record_alert(client, alert))
    # redis-py's clients provide every call the budgets and the ledger make (ScriptClient).
    scripts = cast(ScriptClient, hot or client)
    deps: Deps  # read by the closures below once it exists
    telemetry = Telemetry.from_env()
    policy = shadow = None
    keys, budgets, live, desk = None, None, None, None
    if settings.policy:
        policy = load_policy(settings.policy)
        governor.apply(policy)
        # Top-up grants and paused keys, kept current for the request path (its policy is
        # the live one, read through `deps` once that exists).
        live = LiveState(
            client,
            lambda: deps.policy,
            console_url=settings.console_url,
            on_refresh=partial(report_live, telemetry),
        )
        budgets = Budgets(
            scripts,
            hold_ttl_ms=max(int(settings.hold_expiry_seconds * 1000), 1),
            topups=live.topups,
            topups_until=live.topups_until,
            leases=settings.budget_leases,
        )
        keys = KeyCache(
            KeyStore(client, hot=hot),
            on_notice=live.on_notice,
            on_leases=budgets.close_workspace,  # room asked for, or a hard limit lowered
        )
        # A top-up gone before its time closes the workspace's leases (the live cache and
        # the budgets need each other: this one link is made after both exist).
        live.on_withdrawn = budgets.close_workspace
        desk = TopupDesk(
            client, lambda: deps.policy, governor.alerter, console_url=settings.console_url
        )
        if settings.shadow_policy:
            shadow = load_policy(settings.shadow_policy)
            log.info("shadow policy loaded: %s (never enforced)", settings.shadow_policy)
    ledger = Ledger(
        scripts,
        max_records=settings.ledger_max_records,
        spool_dir=settings.spool_dir,
        on_soft_alert=governor.on_soft_alert,
        on_settled=budgets.settled if budgets is not None else None,
        wait_replicas=settings.redis_wait_replicas,
    )
    live_keys, missing = upstream_keys(policy, simulated) if policy else ({}, {})
    deps = Deps(
        settings=settings,
        prices=PriceTable.load(settings.prices or None),
        count=count_text,
        ledger=ledger,
        executor=ThreadPoolExecutor(max_workers=2, thread_name_prefix="extproc-count"),
        telemetry=telemetry,
        policy=policy,
        keys=keys,
        budgets=budgets,
        upstream_keys=live_keys,
        upstream_missing=missing,
        store=client if policy is not None else None,
        shadow=shadow,
        # Asked for the price table's version when it alerts: the one in force then.
        new_models=NewModels(client, governor.alerter, lambda: deps.prices.version),
        # The request path's one probe for a paused key: updated in place by `live`.
        paused=live.refusals if live is not None else {},
        halt=desk,
    )

    def reload(new: Policy) -> None:
        deps.upstream_keys, deps.upstream_missing = upstream_keys(new, simulated)
        deps.policy = new

    governor.subscribe(reload)
    return Sidecar(deps, governor, ledger, keys, budgets, live)


def report_live(telemetry: Telemetry, live: LiveState) -> None:
    """The gauges of live top-ups and paused keys, after each refresh of the cache."""
    halt = telemetry.halt
    if halt is None:
        return
    now = time.time_ns() // 1_000_000
    topups: dict[tuple[str, str], float] = {}
    for workspace in live.workspaces_with_grants():
        for scope, nanos in live.topups(workspace, now).items():
            topups[(workspace, scope)] = nanos / 1e9
    paused: dict[str, int] = {}
    for pause in live.paused.values():
        paused[pause.workspace] = paused.get(pause.workspace, 0) + 1
    halt.live(topups, paused)


def _prefixes(deps: Deps) -> list[str]:
    """Every workspace whose expired holds this replica reaps (all of the policy's)."""
    policy = deps.policy
    return [workspace_prefix(name) for name in policy.workspaces] if policy else []


async def serve(
    settings: Settings, *, stop: asyncio.Event | None = None, reuse_port: bool = False
) -> None:
    """Run the sidecar until SIGTERM/SIGINT (or `stop` is set).

    `reuse_port`: this process is one of several workers sharing the port
    (`dataplane.workers`); each runs this same function and shares only Redis.
    """
    logrepeat.install()  # an outage must not log once per request
    client = make_client(settings.redis_url, socket_connect_timeout=1.0, socket_timeout=2.0)
    hot = None
    if not is_cluster(settings.redis_url) and supports_url(settings.redis_url):
        hot = FastRedis.from_url(settings.redis_url, socket_connect_timeout=1.0, socket_timeout=2.0)
    deps, governor, ledger, keys, budgets, live = build_deps(settings, client, hot)
    if deps.telemetry.metrics_address:
        # Before the ready line: a worker's supervisor learns here where to scrape it.
        print(f"{METRICS_LINE} {deps.telemetry.metrics_address}", flush=True)
    count_text("warm up the tokenizer", "gpt-5")
    count_text("warm up the tokenizer", "gpt-3.5-turbo")
    await ledger.start()
    prices = PriceWatcher(settings.prices or None, deps.prices, partial(setattr, deps, "prices"))
    background: list[asyncio.Task[None]] = [asyncio.create_task(prices.run(), name="prices")]
    if keys is not None:
        background.append(asyncio.create_task(keys.run(), name="key-cache"))
        watcher = PolicyWatcher(settings.policy, governor.apply)
        background.append(asyncio.create_task(watcher.run(), name="policy-watcher"))
        if settings.shadow_policy:
            shadow = PolicyWatcher(settings.shadow_policy, lambda p: setattr(deps, "shadow", p))
            background.append(asyncio.create_task(shadow.run(), name="shadow-watcher"))
        burn = BurnWatch(client, lambda: deps.policy, governor.alerter, deps.telemetry)
        burn_every = max(settings.burn_check_seconds, 0.5)
        background.append(asyncio.create_task(burn.run(burn_every), name="burn-watch"))
        assert budgets is not None and live is not None
        holds = tend_forever(
            budgets, lambda: _prefixes(deps), ledger.submit, deps.now_ms, lambda: deps.prices
        )
        background.append(asyncio.create_task(holds, name="holds"))
        background.append(asyncio.create_task(live.run(), name="live-state"))
        runaway = RunawayWatch(
            client,
            lambda: deps.policy,
            governor.alerter,
            telemetry=deps.telemetry,
            console_url=settings.console_url,
            lease_ms=max(5_000, int(settings.breaker_check_seconds * 5_000)),
        )
        every = max(settings.breaker_check_seconds, 0.1)
        background.append(asyncio.create_task(runaway.run(every), name="runaway-watch"))

    beat_fd = heartbeat_fd() if reuse_port else None
    if beat_fd is not None:  # a worker: tell the supervisor the event loop turns
        beats = send_heartbeats(beat_fd, ledger.alive)
        background.append(asyncio.create_task(beats, name="heartbeats"))

    transport = H2Transport(deps)
    await transport.start(settings, reuse_port=reuse_port)
    # The log line must not read as the ready line: with several workers, only the
    # supervisor's "extproc listening" (every worker ready) may tell a waiting caller to go.
    log.info("serving ext_proc on %s", settings.listen)
    print(f"extproc listening on {settings.listen}", flush=True)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("shutting down: draining in-flight streams for up to %ss", settings.grace_seconds)
    await transport.stop(settings.grace_seconds)
    await ledger.close()
    if budgets is not None:
        await budgets.close()  # its leases handed back: their requests have all settled
    for task in background:
        task.cancel()
    await governor.alerter.drain()
    deps.telemetry.shutdown()
    await client.aclose()
    if hot is not None:
        await hot.aclose()
    deps.executor.shutdown(wait=False)
