"""Every overlay's pods, started the way the kubelet would start them, and used.

`test_deploy.py` checks that the rendered manifests agree with each other; this runs them.
For each overlay the test renders it with kubectl's kustomize, gives it a test node
(`kubelet.Node`: a network namespace, so the manifests' fixed ports are theirs; Service names
resolved to the local processes; a read-only root) and starts every workload's containers
with their own command, args, env, volumes and user (`kubelet.Pod`), then:

* waits on each container's startup and readiness probes, as the kubelet gates traffic;
* sends OpenAI traffic through the gateway's Envoy with a key made by `kubectl exec`
  (stream, JSON, a repeated long prompt for the prompt cache, a bad request, a
  downgrade past the soft limit; each made to happen by construction, see `traffic`)
  to the simulator posing as api.openai.com over TLS;
* scrapes every port a pod annotation or the PodMonitor (deploy/prometheus) names, with a
  real Prometheus inside the node, and requires every series a Grafana panel
  (deploy/grafana) or an alert rule queries to exist;
* checks that the ledger shipper wrote the requests out, the console answers its admin
  API with the token from its Secret, and the spans reached the `otel-collector` name.

What does not run: the OpenTelemetry Collector (its image's binary is not available
here); `otlp_standin.py` receives what the pods send to its Service name instead.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import yaml

from extproc.devstack.stack import Child
from extproc.governance.periods import period_at
from extproc.governance.policy import Policy, load_policy
from extproc.store.schema import day_key, service_scope, spent_key, workspace_prefix
from tests.deploy.kubelet import (
    VENV_BIN,
    Container,
    Node,
    Pod,
    envoy_image,
    extproc_image,
    readable_by,
    valkey_image,
)
from tests.deploy.test_deploy import (
    DASHBOARDS,
    DEPLOY,
    OVERLAYS,
    label_values,
    promql_for_promtool,
    queries,
    render,
    variable_queries,
    with_secrets,
)
from tests.e2e.test_e2e_mesh import make_pki

PROVIDER = "api.openai.com"
PROMETHEUS_PORT = 9090
ENVOY_ADMIN_PORT = 9901  # the pod's Envoy admin API, on loopback (deploy/base/envoy.yaml)
STOOD_IN = {"otel-collector"}  # workloads not started; a stand-in serves their Service
# The workspace and service each overlay's key is made for (its own workspace's key only).
CALLER = {
    "dev": ("dev", "codex-cli"),
    "ci": ("ci", "pr-review-bot"),
    "prod": ("prod", "support-assistant"),
}
# Series a policy cannot produce: prod degrades nothing (routing.degrade_past_soft is off).
CANNOT = {"prod": {"extproc_downgrades_total"}}
CACHED_MODEL = "gpt-5-nano"  # allowed everywhere and the ladder's bottom: never rerouted
LONG_PROMPT = "Refactor this module for clarity. " + "def f(x): return x * 2\n" * 400
USD = 1_000_000_000


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "rules.yaml").read_text())
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def podmonitor() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "prometheus" / "podmonitor.yaml").read_text())  # type: ignore[no-any-return]


@dataclass
class Cluster:
    overlay: str
    node: Node
    pods: dict[str, Pod]
    policy: Policy
    key: str
    prometheus: Child
    spans: Path

    def container(self, workload: str, name: str) -> Container:
        return self.pods[workload].containers[name]

    def openai(self) -> openai.OpenAI:
        http = httpx.Client(transport=httpx.HTTPTransport(uds=self.node.portal(10000)))
        return openai.OpenAI(
            base_url="http://extproc:10000/v1", api_key=self.key, http_client=http, max_retries=0
        )

    def query(self, promql: str) -> list[dict[str, Any]]:
        with self.node.http(PROMETHEUS_PORT) as client:
            resp = client.get("/api/v1/query", params={"query": promql})
        resp.raise_for_status()
        return resp.json()["data"]["result"]  # type: ignore[no-any-return]


def scrape_targets(r: Any) -> list[tuple[str, int, str]]:
    """(job, port, path) for every pod annotation and PodMonitor endpoint, as Prometheus'
    kubernetes-pods job and the Operator would scrape them."""
    targets = []
    for workload in r.workloads():
        meta = workload["spec"]["template"]["metadata"]
        notes = meta.get("annotations", {})
        if notes.get("prometheus.io/scrape") == "true":
            name = workload["metadata"]["name"]
            targets.append((name, int(notes["prometheus.io/port"]), notes["prometheus.io/path"]))
    monitor = podmonitor()["spec"]
    (gateway,) = r.selected(monitor["selector"]["matchLabels"])
    containers = gateway["spec"]["template"]["spec"]["containers"]
    for endpoint in monitor["podMetricsEndpoints"]:
        port = next(
            p["containerPort"]
            for c in containers
            for p in c.get("ports", [])
            if p["name"] == endpoint["port"]
        )
        targets.append((f"podmonitor-{endpoint['port']}", int(port), endpoint["path"]))
    return targets


def seed(client: redis.Redis, policy: Policy, workspace: str, service: str) -> None:
    """What a running month leaves in Redis: a usual day behind every scope (so the burn
    watch has a baseline) and the workspace past its soft limit (so degrading policies
    downgrade), written with the schema's own key names."""
    ws = policy.workspaces[workspace]
    prefix = workspace_prefix(workspace)
    now = datetime.now(policy.timezone)
    scopes = {"ws": 2 * USD, service_scope(service): USD}
    for back in range(1, 8):
        client.hset(
            day_key(prefix, (now - timedelta(days=back)).date().isoformat()), mapping=scopes
        )
    period = period_at(ws.period, int(now.timestamp() * 1000), policy.timezone)
    past_soft = ws.soft_nanos + (ws.hard_nanos - ws.soft_nanos) // 4
    client.hset(spent_key(prefix, period.id), mapping={"ws": past_soft})


@pytest.fixture(scope="module", params=OVERLAYS)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    overlay: str = request.param
    # Not under pytest's base directory (0700): the containers run as their own users.
    root = Path(tempfile.mkdtemp(prefix=f"extproc-node-{overlay}-"))
    root.chmod(0o755)
    # As an operator deploys it: the shipped placeholder admin token replaced by a secret.
    r = with_secrets(
        overlay,
        root / "operator" / overlay,
        {"extproc-admin-tokens": {"tokens": f"platform:{secrets.token_hex(24)}"}},
    )
    pki = make_pki(root, "provider")
    images = {
        "extproc": extproc_image(root / "image-extproc"),
        "envoyproxy/envoy": envoy_image(),
        "valkey/valkey": valkey_image(root / "image-valkey"),
    }
    workloads = {w["metadata"]["name"]: w for w in r.workloads()}
    services = [s["metadata"]["name"] for s in r.all("Service")]
    for svc in r.all("Service"):  # one address: every Service port is its container's port
        for port in svc["spec"]["ports"]:
            assert port["port"] == next(
                p["containerPort"]
                for w in r.selected(svc["spec"]["selector"])
                for c in w["spec"]["template"]["spec"]["containers"]
                for p in c.get("ports", [])
                if port.get("targetPort", port["port"]) in (p.get("name"), p["containerPort"])
            )
    names = [*services, *(f"{s}.{r.namespace}.svc.cluster.local" for s in services), PROVIDER]
    ports = [
        p["containerPort"]
        for w in workloads.values()
        for c in w["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
    ]
    started: list[Pod] = []
    standins: list[Child] = []
    node: Node | None = None

    def standin(name: str, argv: list[str], ready: str) -> Child:
        assert node is not None
        child = Child(name, [*node.enter(), *argv])
        standins.append(child)
        child.wait_for_line(ready)
        return child

    try:
        node = Node(root / "node", names, [*ports, 443, PROMETHEUS_PORT, ENVOY_ADMIN_PORT], pki.ca)
        assert set(workloads) - STOOD_IN == {
            "extproc", "extproc-console", "extproc-ledger-shipper", "extproc-redis",
        }  # fmt: skip
        pods = {n: Pod(r, w, node, images) for n, w in workloads.items() if n not in STOOD_IN}
        redis_pod = pods["extproc-redis"]
        started.append(redis_pod)
        redis_pod.start()
        for container in redis_pod.containers.values():
            container.wait_ready()
        gateway = pods["extproc"]
        gateway.make_volumes()
        env = Container(gateway, gateway.container_spec("extproc"), start=False).env
        policy = load_policy(Path(env["EXTPROC_POLICY"]))
        workspace, service = CALLER[overlay]
        store = redis.Redis(unix_socket_path=node.portal(6379), password=env["REDIS_PASSWORD"])
        seed(store, policy, workspace, service)
        store.close()
        spans = node.root / "spans.jsonl"
        standin(
            "provider",
            [str(VENV_BIN / "python"), "-m", "extproc.simulator", "--host", "0.0.0.0",
             "--port", "443", "--tls-cert", str(pki.cert), "--tls-key", str(pki.key),
             "--tls-server-name", PROVIDER],
            "listening",
        )  # fmt: skip
        standin(
            "otel-collector",
            [
                str(VENV_BIN / "python"),
                str(Path(__file__).with_name("otlp_standin.py")),
                str(spans),
            ],
            "otlp stand-in listening",
        )
        for name in ("extproc", "extproc-console", "extproc-ledger-shipper"):
            started.append(pods[name])
            pods[name].start()
        for pod in started:
            for container in pod.containers.values():
                container.wait_ready()
        made = gateway.containers["extproc"].exec(
            ["extproc", "keys", "create", "--workspace", workspace, "--service", service, "--json"]
        )
        assert made.returncode == 0, made.stdout + made.stderr
        key = json.loads(made.stdout)["key"]
        config = node.root / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": job, "metrics_path": path,
                         "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                        for job, port, path in scrape_targets(r)
                        if job not in STOOD_IN
                    ],
                }
            )
        )  # fmt: skip
        binary = shutil.which("prometheus")
        assert binary, "no prometheus: apt-get install -y prometheus (make system-tools)"
        prometheus = standin(
            "prometheus",
            [binary, f"--config.file={config}", f"--storage.tsdb.path={node.root / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"],
            "Server is ready to receive web requests",
        )  # fmt: skip
        yield Cluster(overlay, node, pods, policy, key, prometheus, spans)
    finally:
        for pod in reversed(started):
            pod.stop()
        for child in standins:
            child.stop()
        if node is not None:
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def traffic(cluster: Cluster) -> dict[str, Any]:
    """The calls every test below looks at: their request ids by kind."""
    client = cluster.openai()
    model = "gpt-5-mini"
    ids: dict[str, Any] = {}
    raw = client.responses.with_raw_response.create(model=model, input="say hello")
    ids["json"] = raw.headers["x-extproc-request-id"]
    ids["headers"] = dict(raw.headers)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "stream a haiku"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    assert [c for c in stream if c.usage]
    # The prompt-cache pair. The provider caches per model (and prompt_cache_key), so both
    # calls must be served by one model whatever the budget level the worker that routes
    # each one believes in (a worker learns that its caller is past the soft limit from
    # its own first reservation): the bottom of the ladder, which no stage changes.
    served = []
    for _ in range(2):
        raw_chat = client.chat.completions.with_raw_response.create(
            model=CACHED_MODEL, messages=[{"role": "user", "content": LONG_PROMPT}]
        )
        served.append(raw_chat.headers["x-extproc-model-served"])
        usage = raw_chat.parse().usage
    assert served == [CACHED_MODEL] * 2, served
    assert usage and usage.prompt_tokens_details and usage.prompt_tokens_details.cached_tokens
    if "extproc_downgrades_total" not in CANNOT.get(cluster.overlay, set()):
        # Past the soft limit: once every worker has made one reservation for this caller,
        # the next gpt-5-mini call is downgraded, so workers + 1 calls always see one.
        workers = int(cluster.container("extproc", "extproc").env["EXTPROC_WORKERS"])
        trails = []
        for _ in range(workers + 1):
            raw = client.responses.with_raw_response.create(model=model, input="and again")
            trails.append(raw.headers.get("x-extproc-routing", ""))
        assert any("degrade>" in t for t in trails), trails
    with httpx.Client(transport=httpx.HTTPTransport(uds=cluster.node.portal(10000))) as http:
        bad = http.post(
            "http://extproc:10000/v1/responses",
            headers={"authorization": f"Bearer {cluster.key}", "content-type": "application/json"},
            content=b"{not json",
        )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    return ids


def test_every_container_started_and_passed_its_probes(cluster: Cluster) -> None:
    for pod in cluster.pods.values():
        for container in pod.containers.values():
            assert container.proc.poll() is None, container.output()
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                if kind in container.spec:
                    assert container.probe(kind), f"{container.name}: {kind}"


def test_every_mounted_file_is_readable_by_its_containers_user(cluster: Cluster) -> None:
    """The kubelet writes ConfigMap and Secret files as root with the volume's mode and the
    pod's fsGroup: a 0400 Secret is unreadable to a non-root user without an fsGroup."""
    checked = 0
    for pod in cluster.pods.values():
        for container in pod.containers.values():
            for mount in container.spec.get("volumeMounts", []):
                for path in pod.volumes[mount["name"]].iterdir():
                    if path.is_file():
                        checked += 1
                        assert readable_by(path, container.user), (container.name, path.name)
    assert checked >= 5


def test_the_sidecar_runs_every_worker_of_its_manifest(cluster: Cluster) -> None:
    sidecar = cluster.container("extproc", "extproc")
    workers = int(sidecar.env["EXTPROC_WORKERS"])
    assert workers >= 2
    out = sidecar.output()
    assert f"({workers} workers: " in out, out
    assert "exited" not in out, out


def extproc_endpoints(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """The pod's Envoy's `extproc` endpoints: health and streams sent, by address."""
    with cluster.node.http(ENVOY_ADMIN_PORT) as admin:
        statuses = admin.get("/clusters", params={"format": "json"}).json()["cluster_statuses"]
    (extproc,) = [c for c in statuses if c["name"] == "extproc"]
    out = {}
    for host in extproc["host_statuses"]:
        sock = host["address"]["socket_address"]
        stats = {st["name"]: int(st.get("value", 0)) for st in host["stats"]}
        out[f"{sock['address']}:{sock['port_value']}"] = {
            "health": host["health_status"],
            "rq_total": stats.get("rq_total", 0),
        }
    return out


def test_envoy_balances_streams_over_every_sidecar_worker(cluster: Cluster) -> None:
    """Each worker is an endpoint of the pod's Envoy on its own port, health-checked, and
    both take streams (the kernel's spreading of 2 connections would idle one on half the
    pods)."""
    sidecar = cluster.container("extproc", "extproc")
    workers = int(sidecar.env["EXTPROC_WORKERS"])
    ready = re.findall(r"extproc worker \d+ \(pid \d+\) ready on (\S+)", sidecar.output())
    before = extproc_endpoints(cluster)
    assert sorted(before) == sorted(ready) and len(ready) == workers, (before, ready)
    # Envoy started before the workers listened, so its first checks failed; the next
    # round (every 2 s) must find each worker healthy.
    deadline = time.monotonic() + 15
    while any(h["health"].get("failed_active_health_check") for h in before.values()):
        assert time.monotonic() < deadline, before
        time.sleep(0.2)  # polling Envoy's view of its endpoints, not synchronising on time
        before = extproc_endpoints(cluster)
    assert all(h["health"].get("eds_health_status") == "HEALTHY" for h in before.values())
    client = cluster.openai()
    # Envoy hands health changes to its threads in one batch a second (the cluster's update
    # merge window): until then a thread may still route around a worker it saw failing.
    deadline = time.monotonic() + 15
    while True:
        for _ in range(10):
            client.models.list()
        now = extproc_endpoints(cluster)
        if all(now[a]["rq_total"] > before[a]["rq_total"] for a in before):
            break
        assert time.monotonic() < deadline, (before, now)
    for _ in range(40):
        client.models.list()
    after = extproc_endpoints(cluster)
    took = {a: after[a]["rq_total"] - now[a]["rq_total"] for a in now}
    # Per stream, at random between equally busy workers: each takes a fair share of 40.
    assert all(n >= 5 for n in took.values()) and sum(took.values()) >= 40, took


def test_traffic_through_envoy_is_metered(cluster: Cluster, traffic: dict[str, Any]) -> None:
    headers = traffic["headers"]
    workspace, _service = CALLER[cluster.overlay]
    assert headers["x-extproc-workspace"] == workspace
    assert float(headers["x-extproc-cost-usd"]) > 0


def test_every_annotated_and_monitored_port_is_scraped(
    cluster: Cluster, traffic: dict[str, Any]
) -> None:
    deadline = time.monotonic() + 60
    while True:
        up = {s["metric"]["job"]: s["value"][1] for s in cluster.query("up")}
        if (
            up
            and all(v == "1" for v in up.values())
            and len(up)
            == len([t for t in scrape_targets(render(cluster.overlay)) if t[0] not in STOOD_IN])
        ):
            break
        assert time.monotonic() < deadline, f"scrape targets not all up: {up}"
        time.sleep(0.5)  # polling Prometheus, which has no blocking query
    assert {"extproc", "podmonitor-metrics", "podmonitor-envoy-ops"} <= up.keys()


def series_wanted() -> dict[str, str]:
    """Every PromQL a dashboard panel, a dashboard variable or an alert rule evaluates, by
    where it comes from; Grafana's variables replaced as Prometheus would see them."""
    wanted = {}
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for i, (expr, _legend) in enumerate(queries(dashboard)):
            wanted[f"{path.name} panel query {i}"] = promql_for_promtool(expr).replace(
                "[5m]", "[1m]"
            )
        for query in variable_queries(dashboard):
            wanted[f"{path.name} variable {query}"] = promql_for_promtool(label_values(query)[0])
    for rule in rules():
        # An alert's condition is empty while it does not fire: its series must still exist.
        for i, selector in enumerate(
            re.findall(r"[a-z_]+_(?:ratio|total|bucket)\b(?:\{[^}]*\})?", rule["expr"])
        ):
            wanted[f"alert {rule['alert']} series {i}"] = selector
    return wanted


def test_every_series_a_dashboard_or_alert_queries_exists(
    cluster: Cluster, traffic: dict[str, Any]
) -> None:
    cannot = CANNOT.get(cluster.overlay, set())
    wanted = {
        where: expr for where, expr in series_wanted().items() if not any(c in expr for c in cannot)
    }
    # Series that need a particular event: each appears only where traffic made it.
    rare = {"redis_down", "upstream_error", 'reason="budget"'}
    wanted = {w: e for w, e in wanted.items() if not any(r in e for r in rare)}
    # All present 3-5 s after the traffic (two 1 s scrapes fill a rate window); the bound
    # only ends a run that would never pass.
    deadline = time.monotonic() + 90
    missing = dict(wanted)
    while missing:
        missing = {w: e for w, e in missing.items() if not cluster.query(e)}
        if not missing:
            break
        assert time.monotonic() < deadline, f"no data for: {json.dumps(missing, indent=1)}"
        time.sleep(1)  # waiting for scrapes and rate windows; polling, not synchronisation
    for metric in (
        "gen_ai_client_token_usage_bucket",
        "gen_ai_client_operation_duration_seconds_bucket",
    ):
        assert cluster.query(metric), metric


def test_the_shipper_writes_the_requests_out(cluster: Cluster, traffic: dict[str, Any]) -> None:
    shipper = cluster.pods["extproc-ledger-shipper"]
    books = shipper.volumes["books"]
    deadline = time.monotonic() + 60
    while not any(traffic["json"] in f.read_text() for f in books.glob("**/*.jsonl")):
        assert time.monotonic() < deadline, shipper.containers["shipper"].output()
        time.sleep(0.5)  # the shipper's poll; not synchronisation


def test_the_console_serves_its_admin_api_with_the_secrets_token(
    cluster: Cluster, traffic: dict[str, Any]
) -> None:
    console = cluster.pods["extproc-console"]
    tokens = (console.volumes["admin-tokens"] / "tokens").read_text()
    token = tokens.splitlines()[0].split(":", 1)[1]
    with cluster.node.http(10080) as client:
        resp = client.get("/admin/v1/spend", headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text


def test_spans_reach_the_collectors_service_name(cluster: Cluster, traffic: dict[str, Any]) -> None:
    deadline = time.monotonic() + 30
    while True:
        seen = (
            {json.loads(line)["service"] for line in cluster.spans.read_text().splitlines()}
            if cluster.spans.exists()
            else set()
        )
        if {"extproc", "extproc-envoy"} <= seen:
            break
        assert time.monotonic() < deadline, f"spans from {seen}"
        time.sleep(0.5)  # the exporters batch every few seconds
