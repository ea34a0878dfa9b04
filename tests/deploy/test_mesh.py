"""deploy/mesh/: the three ways into extproc besides its Service, checked with the real tools.

* The generated manifests (Envoy Gateway policies, Istio EnvoyFilter) are what
  extproc.devstack.mesh makes from envoy/envoy.yaml today: they cannot drift from it.
* The settings inside them are turned back into an Envoy config (Envoy Gateway's fields by an
  inverse written here, independently of the generator; the EnvoyFilter's patches applied as
  Istio would) and validated by Envoy itself; the Envoy Gateway inverse must give back our own
  ext_proc settings.
* Every kustomization is rendered by kubectl and its seams checked: names, namespaces, ports
  and hosts agree with each other and with the extproc overlay they sit next to.
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.devstack import mesh
from extproc.devstack.envoy_config import ENVOY_YAML
from tests.deploy.test_deploy import (
    Rendered,
    declared_port,
    env_of,
    envoy_binary,
    envoy_config,
    gateway,
    host_port,
    kustomize_build,
    render,
    service_backend,
)

MESH = mesh.MESH
NAMES = mesh.Names()
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
PROD = "prod"  # the overlay the mesh manifests sit next to (namespace extproc-prod)


def kustomize(directory: str) -> Rendered:
    return kustomize_build(MESH, directory)


def named(r: Rendered, kind: str, name: str, namespace: str) -> dict[str, Any]:
    found = [
        o
        for o in r.all(kind)
        if o["metadata"]["name"] == name and o["metadata"].get("namespace") == namespace
    ]
    assert len(found) == 1, f"{r.overlay}: want one {kind} {namespace}/{name}"
    return found[0]


def selects_extproc(selector: dict[str, str]) -> bool:
    """Whether `selector` picks exactly the gateway Deployment of the extproc overlay."""
    chosen = render(PROD).selected(selector)
    return [w["metadata"]["name"] for w in chosen] == ["extproc"]


def sidecar_port() -> int:
    _, _, sidecar = gateway(render(PROD))
    return host_port(env_of(sidecar)["EXTPROC_LISTEN"])[1]


def validate(config: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "assembled.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warning"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr + path.read_text()
    assert "OK" in result.stdout


# ---------------------------------------------------------------------------------------------
# One source of truth


def test_generated_manifests_are_current() -> None:
    for path, text in mesh.render().items():
        assert path.exists(), f"{path} missing: run python -m extproc.devstack.mesh"
        assert path.read_text() == text, (
            f"{path.relative_to(mesh.REPO)} is stale against envoy/envoy.yaml: "
            "run python -m extproc.devstack.mesh"
        )
        head = text[: text.index("apiVersion:")]
        assert all(line.startswith("#") for line in head.splitlines()), head


def test_generator_notes_what_a_target_cannot_carry(tmp_path: Path) -> None:
    # A setting with no Envoy Gateway field must be named, not silently dropped.
    config = yaml.safe_load(ENVOY_YAML.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    for f in hcm["typed_config"]["http_filters"]:
        if f["name"] == mesh.EXT_PROC:
            f["typed_config"]["processing_mode"]["request_trailer_mode"] = "SEND"
            f["typed_config"]["observability_mode"] = True
    changed = tmp_path / "envoy.yaml"
    changed.write_text(yaml.safe_dump(config))
    _, notes = mesh.envoy_gateway(mesh.load_source(changed))
    assert any(n.startswith("processing_mode.request_trailer_mode = SEND") for n in notes)
    assert any(n.startswith("ext_proc.observability_mode = true") for n in notes)
    # The EnvoyFilter carries Envoy's own config verbatim: nothing of the filter is lost.
    (doc,), _ = mesh.istio_envoyfilter(mesh.load_source(changed))
    inserted = next(p for p in doc["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER")
    assert inserted["patch"]["value"]["typed_config"]["observability_mode"] is True


def test_check_mode_reports_stale_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "policies.yaml"
    stale.write_text("old\n")
    monkeypatch.setattr(mesh, "render", lambda: {stale: "new\n"})
    monkeypatch.setattr(mesh, "REPO", tmp_path)
    assert mesh.main(["--check"]) == 1
    assert stale.read_text() == "old\n"
    assert mesh.main([]) == 0
    assert stale.read_text() == "new\n"
    assert mesh.main(["--check"]) == 0


# ---------------------------------------------------------------------------------------------
# Envoy Gateway: its fields turned back into Envoy's, independently of the generator


def _seconds(duration: str) -> str:
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", duration)
    assert match, duration
    value, unit = int(match[1]), match[2]
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    total = value * factor
    return f"{int(total)}s" if total == int(total) else f"{total}s"


def _bytes(quantity: str | int) -> int:
    text = str(quantity)
    for unit, factor in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if text.endswith(unit):
            return int(text.removesuffix(unit)) * factor
    return int(text)


BODY = {
    "Buffered": "BUFFERED",
    "Streamed": "STREAMED",
    "BufferedPartial": "BUFFERED_PARTIAL",
    "FullDuplexStreamed": "FULL_DUPLEX_STREAMED",
}
CIRCUIT = {
    "maxConnections": "max_connections",
    "maxPendingRequests": "max_pending_requests",
    "maxParallelRequests": "max_requests",
    "maxParallelRetries": "max_retries",
}


def eg_policies() -> dict[str, dict[str, Any]]:
    r = kustomize("envoy-gateway")
    kinds = ("EnvoyExtensionPolicy", "BackendTrafficPolicy", "ClientTrafficPolicy")
    return {kind: r.all(kind)[0]["spec"] for kind in kinds}


def eg_as_envoy(cluster_name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(ext_proc filter config, sidecar cluster settings, listener settings) per the policies."""
    specs = eg_policies()
    (ext,) = specs["EnvoyExtensionPolicy"]["extProc"]
    mode = ext["processingMode"]
    processing: dict[str, Any] = {}
    for direction in ("request", "response"):
        # Envoy Gateway sends a direction's headers when the direction is set, never trailers.
        if direction in mode:
            processing[f"{direction}_header_mode"] = "SEND"
            body = mode[direction].get("body")
            processing[f"{direction}_body_mode"] = BODY[body] if body else "NONE"
        else:
            processing[f"{direction}_header_mode"] = "SKIP"
        processing[f"{direction}_trailer_mode"] = "SKIP"
    filter_config = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster_name}},
        "failure_mode_allow": ext.get("failOpen", False),
        "message_timeout": _seconds(ext.get("messageTimeout", "200ms")),
        "processing_mode": processing,
        "allow_mode_override": mode.get("allowModeOverride", False),
    }
    settings = ext.get("backendSettings", {})
    cluster: dict[str, Any] = {}
    if "timeout" in settings:
        cluster["connect_timeout"] = _seconds(settings["timeout"]["tcp"]["connectTimeout"])
    if "http2" in settings:
        h2 = settings["http2"]
        options = {
            k: _bytes(h2[src])
            for k, src in (
                ("initial_stream_window_size", "initialStreamWindowSize"),
                ("initial_connection_window_size", "initialConnectionWindowSize"),
            )
            if src in h2
        }
        cluster["typed_extension_protocol_options"] = {
            HTTP_OPTIONS: {
                "@type": f"type.googleapis.com/{HTTP_OPTIONS}",
                "explicit_http_config": {"http2_protocol_options": options},
            }
        }
    if "circuitBreaker" in settings:
        cluster["circuit_breakers"] = {
            "thresholds": [{CIRCUIT[k]: v for k, v in settings["circuitBreaker"].items()}]
        }
    client = specs["ClientTrafficPolicy"]
    listener = {"per_connection_buffer_limit_bytes": _bytes(client["connection"]["bufferLimit"])}
    return filter_config, cluster, listener


def drop(config: dict[str, Any], dotted: str) -> None:
    """Remove the setting at `dotted` ("grpc_service.timeout") from `config`, if there."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        config = config.get(key, {})
    config.pop(leaf, None)


def default_priority(cluster: dict[str, Any]) -> dict[str, Any]:
    """`cluster` with `priority: DEFAULT` left implicit, as Envoy Gateway's thresholds are."""
    out = copy.deepcopy(cluster)
    for threshold in out.get("circuit_breakers", {}).get("thresholds", []):
        if threshold.get("priority") == "DEFAULT":
            del threshold["priority"]
    return out


def test_envoy_gateway_policies_carry_our_ext_proc_settings() -> None:
    source = mesh.load_source()
    filter_config, cluster, listener = eg_as_envoy(mesh.SIDECAR_CLUSTER)
    ours = copy.deepcopy(source.ext_proc)
    # Everything must round-trip except what the file's header names as not carried.
    _, notes = mesh.envoy_gateway(source)
    uncarried = [note.split(" = ")[0] for note in notes]
    sidecar = default_priority(source.sidecar)
    for path in uncarried:
        if path.startswith("ext_proc."):
            drop(ours, path.removeprefix("ext_proc."))
            drop(filter_config, path.removeprefix("ext_proc."))
        elif path.startswith("processing_mode."):
            drop(ours, path)
            drop(filter_config, path)
        elif path.startswith(f"{mesh.SIDECAR_CLUSTER}."):
            drop(sidecar, path.removeprefix(f"{mesh.SIDECAR_CLUSTER}."))
    assert "ext_proc.grpc_service.timeout" in uncarried  # Envoy Gateway sets its own
    assert filter_config == ours
    assert cluster == sidecar
    assert listener == source.listener
    specs = eg_policies()
    backend = specs["BackendTrafficPolicy"]
    assert _bytes(backend["connection"]["bufferLimit"]) == int(
        source.upstream["per_connection_buffer_limit_bytes"]
    )
    assert (
        _seconds(backend["timeout"]["tcp"]["connectTimeout"]) == source.upstream["connect_timeout"]
    )
    if "circuit_breakers" in source.upstream:
        thresholds = default_priority(source.upstream)["circuit_breakers"]["thresholds"]
        inverse = {CIRCUIT[k]: v for k, v in backend["circuitBreaker"].items()}
        assert [inverse] == thresholds
    http = backend["timeout"]["http"]
    assert _seconds(http["requestTimeout"]) == source.route["timeout"]
    assert _seconds(http["streamIdleTimeout"]) == source.route["idle_timeout"]
    client = specs["ClientTrafficPolicy"]
    assert (
        _seconds(client["timeout"]["http"]["streamIdleTimeout"])
        == source.hcm["stream_idle_timeout"]
    )
    assert client["path"] == {
        "disableMergeSlashes": not source.hcm["merge_slashes"],
        "escapedSlashesAction": "UnescapeAndRedirect",
    }
    # The header no client may route by is removed before routing there too.
    (early,) = source.hcm["early_header_mutation_extensions"]
    removed = [m["remove"] for m in early["typed_config"]["mutations"]]
    assert (
        client["headers"]["earlyRequestHeaders"]
        == {"remove": removed}
        == {"remove": ["x-extproc-route"]}
    )
    assert source.hcm["http_protocol_options"]["accept_http_10"] is True
    assert client["http1"] == {"http10": {"useDefaultHost": True}}
    h2 = source.hcm["http2_protocol_options"]
    assert client["http2"]["maxConcurrentStreams"] == h2["max_concurrent_streams"]
    assert _bytes(client["http2"]["initialStreamWindowSize"]) == h2["initial_stream_window_size"]
    assert source.hcm["path_with_escaped_slashes_action"] == "UNESCAPE_AND_REDIRECT"


def test_envoy_validates_the_envoy_gateway_settings(tmp_path: Path) -> None:
    filter_config, cluster, listener = eg_as_envoy("extproc")
    validate(assembled(filter_config, listener, {}, cluster, {}, "extproc", "provider"), tmp_path)


# ---------------------------------------------------------------------------------------------
# Istio EnvoyFilter: the patches applied to a gateway-like config, then validated by Envoy


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Istio's MERGE: maps merge key by key, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def assembled(
    ext_proc: dict[str, Any],
    listener: dict[str, Any],
    hcm: dict[str, Any],
    sidecar: dict[str, Any],
    upstream: dict[str, Any],
    sidecar_name: str,
    upstream_name: str,
) -> dict[str, Any]:
    """A gateway's Envoy as its control plane would have it, with extproc's settings in place."""

    def cluster(name: str, host: str, port: int, settings: dict[str, Any]) -> dict[str, Any]:
        base = {
            "name": name,
            "type": "STRICT_DNS",
            "connect_timeout": "10s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": host, "port_value": port}
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
        if name == sidecar_name:  # what any control plane sets for a gRPC backend
            base["typed_extension_protocol_options"] = {
                HTTP_OPTIONS: {
                    "@type": f"type.googleapis.com/{HTTP_OPTIONS}",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
        return merge(base, settings)

    manager = merge(
        {
            "@type": mesh.HCM_TYPE,
            "stat_prefix": "gateway",
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "provider",
                        "domains": [NAMES.provider],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": upstream_name}}],
                    }
                ]
            },
            "http_filters": [
                {"name": mesh.EXT_PROC, "typed_config": ext_proc},
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": ROUTER},
                },
            ],
        },
        hcm,
    )
    return {
        "static_resources": {
            "listeners": [
                merge(
                    {
                        "name": "gateway",
                        "address": {
                            "socket_address": {
                                "address": "127.0.0.1",
                                "port_value": NAMES.egress_port,
                            }
                        },
                        "filter_chains": [
                            {"filters": [{"name": mesh.HCM, "typed_config": manager}]}
                        ],
                    },
                    listener,
                )
            ],
            "clusters": [
                cluster(sidecar_name, NAMES.grpc_host, NAMES.grpc_port, sidecar),
                cluster(upstream_name, NAMES.provider, 443, upstream),
            ],
        }
    }


def envoyfilter() -> dict[str, Any]:
    (doc,) = kustomize("istio-egressgateway").all("EnvoyFilter")
    return doc


def envoyfilter_gateway() -> tuple[dict[str, Any], dict[str, Any], str, str]:
    """An egress gateway's Envoy with the EnvoyFilter's patches applied as Istio applies them.

    Returns the config, the inserted ext_proc filter config, and the sidecar's and provider's
    cluster names (Istio's names for them).
    """
    patches = envoyfilter()["spec"]["configPatches"]
    by_kind = {
        (p["applyTo"], p["patch"]["operation"]): p for p in patches if p["applyTo"] != "CLUSTER"
    }
    clusters = {p["match"]["cluster"]["service"]: p for p in patches if p["applyTo"] == "CLUSTER"}
    assert set(by_kind) == {
        ("LISTENER", "MERGE"),
        ("NETWORK_FILTER", "MERGE"),
        ("HTTP_FILTER", "INSERT_BEFORE"),
    }
    for patch in patches:
        assert patch["match"]["context"] == "GATEWAY"
        if "listener" in patch["match"]:
            assert patch["match"]["listener"]["portNumber"] == NAMES.egress_port
    inserted = by_kind["HTTP_FILTER", "INSERT_BEFORE"]
    assert inserted["match"]["listener"]["filterChain"]["filter"]["subFilter"] == {
        "name": "envoy.filters.http.router"
    }
    ext_proc = inserted["patch"]["value"]["typed_config"]
    sidecar_cluster = ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"]
    # Istio's name for the Service's cluster: outbound|port||host.
    assert sidecar_cluster == f"outbound|{NAMES.grpc_port}||{NAMES.grpc_host}"
    upstream_cluster = f"outbound|443||{NAMES.provider}"
    config = assembled(
        ext_proc,
        by_kind["LISTENER", "MERGE"]["patch"]["value"],
        by_kind["NETWORK_FILTER", "MERGE"]["patch"]["value"]["typed_config"],
        clusters[NAMES.grpc_host]["patch"]["value"],
        clusters[NAMES.provider]["patch"]["value"],
        sidecar_cluster,
        upstream_cluster,
    )
    return config, ext_proc, sidecar_cluster, upstream_cluster


def test_envoy_validates_the_envoyfilter_patches(tmp_path: Path) -> None:
    config, ext_proc, sidecar_cluster, _ = envoyfilter_gateway()
    validate(config, tmp_path)
    # And it is our filter, setting for setting, other than where it sends its gRPC.
    ours = copy.deepcopy(mesh.load_source().ext_proc)
    ours["grpc_service"]["envoy_grpc"]["cluster_name"] = sidecar_cluster
    assert ext_proc == ours
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    for key, value in mesh.load_source().hcm.items():
        assert manager["typed_config"][key] == value, key


# ---------------------------------------------------------------------------------------------
# Seams: the rendered manifests agree with each other and with the extproc overlay


def test_grpc_service_reaches_the_sidecar_port() -> None:
    r = kustomize("extproc-grpc")
    prod = render(PROD)
    svc = named(r, "Service", NAMES.grpc_service, prod.namespace)
    assert selects_extproc(svc["spec"]["selector"])
    (port,) = svc["spec"]["ports"]
    assert port["port"] == NAMES.grpc_port
    _, _, sidecar = gateway(prod)
    assert declared_port(sidecar, port["targetPort"]) == sidecar_port()
    assert port["appProtocol"] == "grpc"
    policy = named(r, "NetworkPolicy", "extproc-grpc", prod.namespace)
    assert selects_extproc(policy["spec"]["podSelector"]["matchLabels"])
    (rule,) = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [sidecar_port()]
    namespaces = {
        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in rule["from"]
    }
    assert namespaces == {"envoy-gateway-system", NAMES.istio_namespace}
    istio_peer = next(p for p in rule["from"] if "istio" in p["podSelector"]["matchLabels"])
    assert istio_peer["podSelector"]["matchLabels"] == dict(NAMES.egress_selector)


def test_envoy_gateway_policy_calls_the_grpc_service_it_is_granted() -> None:
    r = kustomize("envoy-gateway")
    (policy,) = r.all("EnvoyExtensionPolicy")
    (ref,) = policy["spec"]["extProc"][0]["backendRefs"]
    svc = named(r, "Service", ref["name"], ref["namespace"])
    assert ref["port"] in [p["port"] for p in svc["spec"]["ports"]]
    assert ref["namespace"] == render(PROD).namespace
    (grant,) = r.all("ReferenceGrant")
    assert grant["metadata"]["namespace"] == ref["namespace"]
    assert {"group": "gateway.envoyproxy.io", "kind": "EnvoyExtensionPolicy",
            "namespace": policy["metadata"]["namespace"]} in grant["spec"]["from"]  # fmt: skip
    assert {"group": "", "kind": "Service", "name": ref["name"]} in grant["spec"]["to"]


def test_envoy_gateway_policies_attach_to_the_provider_route_and_its_listener() -> None:
    r = kustomize("envoy-gateway")
    (route,) = r.all("HTTPRoute")
    namespace = route["metadata"]["namespace"]
    assert route["spec"]["hostnames"] == [NAMES.provider]
    for kind in ("EnvoyExtensionPolicy", "BackendTrafficPolicy"):
        (policy,) = r.all(kind)
        assert policy["metadata"]["namespace"] == namespace
        assert policy["spec"]["targetRefs"] == [
            {
                "group": "gateway.networking.k8s.io",
                "kind": "HTTPRoute",
                "name": route["metadata"]["name"],
            }
        ]
    (client,) = r.all("ClientTrafficPolicy")
    assert client["metadata"]["namespace"] == namespace
    (target,) = client["spec"]["targetRefs"]
    (parent,) = route["spec"]["parentRefs"]
    assert (target["kind"], target["name"], target["sectionName"]) == (
        "Gateway", parent["name"], parent["sectionName"],
    )  # fmt: skip
    (rule,) = route["spec"]["rules"]
    (backend_ref,) = rule["backendRefs"]
    backend = named(r, "Backend", backend_ref["name"], namespace)
    (endpoint,) = backend["spec"]["endpoints"]
    assert endpoint["fqdn"] == {"hostname": NAMES.provider, "port": backend_ref["port"]}
    # TLS to the provider: its name as SNI, checked against the system CAs, as our own Envoy does.
    assert backend["spec"]["tls"] == {"sni": NAMES.provider, "wellKnownCACertificates": "System"}


def test_istio_routes_provider_traffic_to_the_extproc_service() -> None:
    r = kustomize("istio")
    prod = render(PROD)
    (vs,) = r.all("VirtualService")
    assert vs["spec"]["hosts"] == [NAMES.provider] and vs["spec"]["exportTo"] == ["*"]
    assert "gateways" not in vs["spec"], "applies to the workloads' sidecars (mesh)"
    (route,) = vs["spec"]["http"]
    assert route["match"] == [{"port": 80}]
    (dest,) = route["route"]
    host = dest["destination"]["host"]
    name, namespace, *rest = host.split(".")
    assert (namespace, rest) == (prod.namespace, ["svc", "cluster", "local"])
    container, port = service_backend(prod, name, dest["destination"]["port"]["number"])
    assert container["name"] == "envoy"
    # extproc's Envoy serves the provider's name on the port the Service reaches.
    egress = envoy_config(prod)["static_resources"]["listeners"][0]
    assert egress["address"]["socket_address"]["port_value"] == port
    domains = egress["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"
    ][0]["domains"]
    assert NAMES.provider in domains
    assert route["timeout"] == "0s" and route["retries"] == {"attempts": 0}
    (rule,) = r.all("DestinationRule")
    assert rule["spec"]["host"] == host and rule["metadata"]["namespace"] == prod.namespace
    assert rule["spec"]["trafficPolicy"]["tls"] == {"mode": "ISTIO_MUTUAL"}


def test_istio_workloads_see_the_provider_on_http_only() -> None:
    r = kustomize("istio")
    prod = render(PROD)
    entries = {e["metadata"]["name"]: e for e in r.all("ServiceEntry")}
    assert set(entries) == {"openai", "openai-provider"}
    shared, private = entries["openai"]["spec"], entries["openai-provider"]["spec"]
    assert shared["hosts"] == private["hosts"] == [NAMES.provider]
    assert shared["exportTo"] == ["*"]
    assert [(p["number"], p["protocol"]) for p in shared["ports"]] == [(80, "HTTP")]
    # Port 443 only where the gateway runs; its Envoy originates that TLS itself.
    assert private["exportTo"] == ["."]
    assert entries["openai-provider"]["metadata"]["namespace"] == prod.namespace
    upstream = next(
        c
        for c in envoy_config(prod)["static_resources"]["clusters"]
        if c["name"] == "openai_upstream"
    )
    address = upstream["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert [(p["number"], p["protocol"]) for p in private["ports"]] == [
        (address["socket_address"]["port_value"], "TLS")
    ]
    assert address["socket_address"]["address"] == NAMES.provider


def test_istio_authorization_admits_mesh_callers_and_metrics_but_not_ext_proc() -> None:
    r = kustomize("istio")
    prod = render(PROD)
    (policy,) = r.all("AuthorizationPolicy")
    assert policy["metadata"]["namespace"] == prod.namespace
    assert selects_extproc(policy["spec"]["selector"]["matchLabels"])
    assert policy["spec"]["action"] == "ALLOW"
    ports = {
        int(p)
        for rule in policy["spec"]["rules"]
        for to in rule["to"]
        for p in to["operation"]["ports"]
    }
    _, client_port = service_backend(prod, "extproc", 10000)
    annotations = prod.get("Deployment", "extproc")["spec"]["template"]["metadata"]["annotations"]
    _, envoy, _ = gateway(prod)
    ops = declared_port(envoy, envoy["readinessProbe"]["httpGet"]["port"])
    assert ports == {client_port, int(annotations["prometheus.io/port"]), ops}
    assert sidecar_port() not in ports
    client_rule = next(rule for rule in policy["spec"]["rules"] if "from" in rule)
    assert client_rule["from"] == [{"source": {"principals": ["*"]}}]  # mTLS identities only


def test_istio_lockdown_blocks_direct_egress() -> None:
    r = kustomize("istio/lockdown")
    (sidecar,) = r.all("Sidecar")
    assert sidecar["spec"]["outboundTrafficPolicy"] == {"mode": "REGISTRY_ONLY"}
    assert "workloadSelector" not in sidecar["spec"], "the whole namespace"
    (policy,) = r.all("NetworkPolicy")
    assert policy["metadata"]["namespace"] == sidecar["metadata"]["namespace"]
    assert policy["spec"]["podSelector"] == {} and policy["spec"]["policyTypes"] == ["Egress"]
    peers = [peer for rule in policy["spec"]["egress"] for peer in rule["to"]]
    assert peers and all("ipBlock" not in peer for peer in peers), "nothing outside the cluster"


def test_istio_egressgateway_filter_and_routing_agree() -> None:
    r = kustomize("istio-egressgateway")
    prod = render(PROD)
    doc = envoyfilter()
    assert doc["metadata"]["namespace"] == NAMES.istio_namespace
    selector = doc["spec"]["workloadSelector"]["labels"]
    (gw,) = r.all("Gateway")
    assert gw["spec"]["selector"] == selector
    (server,) = gw["spec"]["servers"]
    assert server["hosts"] == [NAMES.provider] and server["port"]["protocol"] == "HTTP"
    (entry,) = r.all("ServiceEntry")
    assert entry["spec"]["hosts"] == [NAMES.provider]
    ports = {p["number"]: p["protocol"] for p in entry["spec"]["ports"]}
    assert ports == {server["port"]["number"]: "HTTP", 443: "HTTPS"}
    (vs,) = r.all("VirtualService")
    assert set(vs["spec"]["gateways"]) == {"mesh", gw["metadata"]["name"]}
    to_gateway, to_provider = vs["spec"]["http"]
    assert to_gateway["match"][0]["gateways"] == ["mesh"]
    assert to_provider["match"][0]["gateways"] == [gw["metadata"]["name"]]
    assert to_provider["route"][0]["destination"] == {
        "host": NAMES.provider,
        "port": {"number": 443},
    }
    tls_rule = named(r, "DestinationRule", "openai-tls", NAMES.istio_namespace)
    (port_tls,) = tls_rule["spec"]["trafficPolicy"]["portLevelSettings"]
    assert port_tls == {"port": {"number": 443}, "tls": {"mode": "SIMPLE", "sni": NAMES.provider}}
    # The filter reaches the sidecars through the gRPC Service, over mTLS, and only it may.
    grpc_rule = named(r, "DestinationRule", "extproc-grpc", NAMES.istio_namespace)
    assert grpc_rule["spec"]["host"] == NAMES.grpc_host
    assert named(r, "Service", NAMES.grpc_service, prod.namespace)
    access = named(r, "AuthorizationPolicy", "extproc-grpc", prod.namespace)
    assert selects_extproc(access["spec"]["selector"]["matchLabels"])
    gateway_rule = next(rule for rule in access["spec"]["rules"] if "from" in rule)
    assert gateway_rule["to"] == [{"operation": {"ports": [str(sidecar_port())]}}]
    (principal,) = gateway_rule["from"][0]["source"]["principals"]
    assert principal.startswith(f"cluster.local/ns/{NAMES.istio_namespace}/sa/")
