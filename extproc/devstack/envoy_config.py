"""Render `envoy/envoy.yaml` for a concrete stack: ports, sidecar address, upstream.

The checked-in file stays a complete, valid Envoy config that people can read and
validate; this module changes only addresses (and, for the benchmark, adds a second
listener without the ext_proc filter so both paths run in one Envoy).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

_TLS_CONTEXT = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
# Debian's and Ubuntu's bundle of the public CAs, the one the envoyproxy/envoy image carries too.
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
ENVOY_YAML = Path(__file__).resolve().parents[2] / "envoy" / "envoy.yaml"


@dataclass(frozen=True, slots=True)
class EnvoyPorts:
    listen: int
    admin: int
    sidecars: tuple[str, ...]  # "host:port" or "unix:/path", one per replica
    upstream_url: str  # http://127.0.0.1:8080 or https://api.openai.com
    direct: int | None = None  # a listener without ext_proc, for the benchmark
    # More upstream clusters by name, reachable through the sidecar's x-extproc-route.
    routes: tuple[tuple[str, str], ...] = ()
    # The CA bundle that verifies the provider's certificate (https upstreams); None: the system's.
    upstream_ca: str | None = None
    # "host:port" to connect to instead of the URL's host, which still names the provider for
    # SNI, certificate check and Host (tests: a simulator on loopback posing as api.openai.com).
    upstream_connect: str | None = None
    # Concurrent streams each cluster admits (circuit breakers); None keeps envoy.yaml's.
    max_streams: int | None = None


_CONNECTIONS = "envoy.resource_monitors.global_downstream_max_connections"


def _size_breakers(cluster: dict[str, Any], max_streams: int) -> None:
    """Every in-flight call holds one request (and one HTTP/1.1 connection) per cluster."""
    for threshold in cluster.get("circuit_breakers", {}).get("thresholds", []):
        for key in ("max_connections", "max_pending_requests", "max_requests"):
            threshold[key] = max_streams


def connection_ceiling(max_streams: int) -> int:
    """Client connections Envoy accepts for `max_streams` streams: an eighth more, so that past
    the circuit breakers callers get the OpenAI-shaped 503 before a refused connection."""
    return max_streams + max(max_streams // 8, 64)


def _size_connections(config: dict[str, Any], max_streams: int) -> None:
    for monitor in config.get("overload_manager", {}).get("resource_monitors", []):
        if monitor["name"] == _CONNECTIONS:
            ceiling = connection_ceiling(max_streams)
            monitor["typed_config"]["max_active_downstream_connections"] = ceiling


def _address(target: str) -> dict[str, Any]:
    if target.startswith("unix:"):
        return {"pipe": {"path": target.removeprefix("unix:")}}
    host, _, port = target.rpartition(":")
    return {"socket_address": {"address": host, "port_value": int(port)}}


def _upstream_cluster(
    cluster: dict[str, Any], url: str, ca: str | None = None, connect: str | None = None
) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"UPSTREAM_URL must be http(s)://host[:port], got {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    endpoint: dict[str, Any] = {
        "address": _address(connect)
        if connect
        else {"socket_address": {"address": parts.hostname, "port_value": port}}
    }
    if connect:
        # auto_host_rewrite takes the endpoint's hostname: the provider's name, not loopback.
        endpoint["hostname"] = parts.hostname
        cluster["type"] = "STATIC"
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [{"endpoint": endpoint}]
    if tls:
        cluster["transport_socket"] = tls_transport_socket(parts.hostname, ca or SYSTEM_CA_BUNDLE)


def tls_transport_socket(server_name: str, ca_file: str) -> dict[str, Any]:
    """TLS to the provider: SNI `server_name`, certificate chained to `ca_file` and naming it."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TLS_CONTEXT,
            "sni": server_name,
            "common_tls_context": {
                "validation_context": {
                    "trusted_ca": {"filename": ca_file},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": server_name}}
                    ],
                }
            },
        },
    }


def render(ports: EnvoyPorts, template: Path = ENVOY_YAML) -> dict[str, Any]:
    config = yaml.safe_load(template.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = ports.admin
    static = config["static_resources"]
    listener = static["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = ports.listen
    clusters = {c["name"]: c for c in static["clusters"]}
    clusters["extproc"]["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": _address(addr)}} for addr in ports.sidecars
    ]
    upstream_type = clusters["openai_upstream"]["type"]
    _upstream_cluster(
        clusters["openai_upstream"], ports.upstream_url, ports.upstream_ca, ports.upstream_connect
    )
    for name, url in ports.routes:
        extra = copy.deepcopy(clusters["openai_upstream"])
        extra["name"] = extra["load_assignment"]["cluster_name"] = name
        extra.pop("transport_socket", None)
        extra["type"] = upstream_type
        _upstream_cluster(extra, url, ports.upstream_ca)
        static["clusters"].append(extra)
    if ports.max_streams is not None:
        for cluster in static["clusters"]:
            _size_breakers(cluster, ports.max_streams)
        _size_connections(config, ports.max_streams)
    if urlsplit(ports.upstream_url).scheme == "https":
        for vh in _hcm(listener)["route_config"]["virtual_hosts"]:
            for route in vh["routes"]:
                route["route"]["auto_host_rewrite"] = True
    if ports.direct is not None:
        direct = copy.deepcopy(listener)
        direct["name"] = "openai_direct"
        direct["address"]["socket_address"]["port_value"] = ports.direct
        hcm = _hcm(direct)
        hcm["stat_prefix"] = "openai_direct"
        hcm["http_filters"] = [
            f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"
        ]
        static["listeners"].append(direct)
    return config


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def write(ports: EnvoyPorts, path: Path) -> Path:
    path.write_text(yaml.safe_dump(render(ports), sort_keys=False))
    return path
