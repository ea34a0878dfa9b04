"""End to end, the way a service mesh delivers traffic: `Host: api.openai.com`, TLS onward.

In Istio's egress TLS origination pattern the workload speaks plain HTTP to api.openai.com,
the mesh hands the request to our Envoy with that Host, and Envoy opens TLS to the provider.
Here the provider is the simulator serving HTTPS with a certificate from a CA made for the
test; it refuses any handshake whose SNI is not api.openai.com, so a request that gets an
answer proves Envoy sent the provider's name and checked the certificate against the CA.
"""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from extproc.devstack.envoy_config import tls_transport_socket
from extproc.devstack.stack import (
    Child,
    ProviderTls,
    Stack,
    envoy_binary,
    free_port,
    temporary_stack,
)
from extproc.metering.prices import PriceTable
from extproc.wire.usage import Usage
from tests.conftest import all_records, new_key, wait_record
from tests.deploy.test_mesh import envoyfilter_gateway

PROVIDER = "api.openai.com"
UPSTREAM_KEY = "sk-upstream-mesh"
RID = "x-extproc-request-id"
MARKER = "x-mesh-test-marker"  # an ordinary header, passed through to the provider
POLICY = """
version: 1
workspaces:
  prod:
    budget_usd: 100
    upstream: {key_env: MESH_UPSTREAM_KEY}
    services:
      mesh-workload: {}
"""
MESSAGES = [{"role": "user", "content": "Review: def add(a, b): return a - b"}]


# ---------------------------------------------------------------------------------------------
# A test CA and the provider's certificate, made at test time


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_pki(directory: Path, label: str, dns_name: str = PROVIDER) -> Pki:
    """A CA and a server certificate it signed for `dns_name`, as PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"extproc test CA {label}"))
        .issuer_name(_name(f"extproc test CA {label}"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pki = Pki(*(directory / f"{label}-{part}.pem" for part in ("ca", "cert", "key")))
    pki.ca.write_bytes(ca_cert.public_bytes(pem))
    pki.cert.write_bytes(cert.public_bytes(pem))
    pki.key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return pki


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pki")


def mesh_stack(directory: Path, served: Pki, trusted: Path) -> Iterator[Stack]:
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    env = {"EXTPROC_POLICY": str(policy), "MESH_UPSTREAM_KEY": UPSTREAM_KEY}
    tls = ProviderTls(cert=served.cert, key=served.key, ca=trusted)
    with temporary_stack(sidecar_env=env, provider_tls=tls) as s:
        s.policy_path = policy  # type: ignore[attr-defined]
        yield s


@pytest.fixture(scope="module")
def mstack(pki_dir: Path) -> Iterator[Stack]:
    pki = make_pki(pki_dir, "good")
    yield from mesh_stack(pki_dir, pki, pki.ca)


# ---------------------------------------------------------------------------------------------
# Helpers


def provider_requests(stack: Stack, ca: Path) -> list[dict[str, Any]]:
    """What the simulator received, asked over TLS as api.openai.com (its only name)."""
    assert stack.upstream_connect
    host, _, port = stack.upstream_connect.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=PROVIDER) as conn,
    ):
        conn.sendall(
            f"GET /_sim/requests HTTP/1.1\r\nHost: {PROVIDER}\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return list(json.loads(body)["requests"])


def seen_for(stack: Stack, ca: Path, marker: str) -> dict[str, Any]:
    """The upstream's view of the one request the client tagged with `marker`."""
    found = [r for r in provider_requests(stack, ca) if r["headers"].get(MARKER) == marker]
    assert len(found) == 1, f"{marker}: the provider saw it {len(found)} times"
    return found[0]


def chat_usage(u: Any) -> Usage:
    details = u.prompt_tokens_details
    return Usage(
        input_tokens=u.prompt_tokens,
        cached_input_tokens=(details.cached_tokens if details else 0) or 0,
        output_tokens=u.completion_tokens,
        reasoning_tokens=(
            u.completion_tokens_details.reasoning_tokens if u.completion_tokens_details else 0
        )
        or 0,
    )


def metered(rec: dict[str, Any]) -> dict[str, Any]:
    """The fields that say who paid how much for what, nothing request-specific."""
    keys = ("endpoint", "model_requested", "workspace", "service", "key_id", "outcome", "status")
    keys += ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens")
    keys += ("counted_input_tokens", "cost_nanos", "estimated", "stream")
    return {k: rec[k] for k in keys}


# ---------------------------------------------------------------------------------------------
# Tests


def test_mesh_host_is_metered_like_the_gateways_own_name(mstack: Stack, pki_dir: Path) -> None:
    key = new_key(mstack, "prod", "mesh-workload")
    ca = pki_dir / "good-ca.pem"
    r = redis.Redis.from_url(mstack.redis_url)
    records: dict[str, dict[str, Any]] = {}
    try:
        # What the mesh delivers (Host: api.openai.com), then what a Service caller sends.
        for host in (PROVIDER, f"127.0.0.1:{mstack.config.listen_port}"):
            client = openai.OpenAI(
                base_url=mstack.base_url,
                api_key=key["key"],
                max_retries=0,
                timeout=30,
                default_headers={"Host": host},
            )
            marker = uuid.uuid4().hex
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=MESSAGES, extra_headers={MARKER: marker}
            )
            usage = chat_usage(raw.parse().usage)
            request_id = raw.headers[RID]
            rec = wait_record(r, request_id)
            assert len(all_records(r, request_id)) == 1
            # Exact: the provider's own usage, priced by the table, charged to the key's owner.
            assert (rec["workspace"], rec["service"], rec["key_id"]) == (
                "prod", "mesh-workload", key["key_id"],
            )  # fmt: skip
            assert rec["estimated"] is False and rec["outcome"] == "completed"
            assert (rec["input_tokens"], rec["output_tokens"]) == (
                usage.input_tokens, usage.output_tokens,
            )  # fmt: skip
            assert rec["cost_nanos"] == PriceTable.load().charge("gpt-4o-mini", usage).nanos > 0
            seen = seen_for(mstack, ca, marker)
            # The virtual key never leaves the gateway; the provider got the workspace key,
            # under its own name, over TLS negotiated for that name.
            assert seen["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
            assert key["key"] not in json.dumps(seen)
            assert seen["headers"]["host"] == PROVIDER
            assert seen["server_name"] == PROVIDER
            records[host] = rec
    finally:
        r.close()
    mesh, own = records.values()
    assert mesh["request_id"] != own["request_id"]
    assert metered(mesh) == metered(own)


def test_mesh_host_with_a_provider_key_is_refused(mstack: Stack, pki_dir: Path) -> None:
    # A workload that somehow holds the real key still cannot use it through the mesh route.
    client = openai.OpenAI(
        base_url=mstack.base_url,
        api_key=UPSTREAM_KEY,
        max_retries=0,
        timeout=30,
        default_headers={"Host": PROVIDER},
    )
    marker = uuid.uuid4().hex
    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={MARKER: marker}
        )
    assert refused.value.code == "invalid_api_key"
    seen = provider_requests(mstack, pki_dir / "good-ca.pem")
    assert not [r for r in seen if r["headers"].get(MARKER) == marker]


def test_mesh_host_streams_over_tls_and_is_billed(mstack: Stack, pki_dir: Path) -> None:
    key = new_key(mstack, "prod", "mesh-workload")
    client = openai.OpenAI(
        base_url=mstack.base_url,
        api_key=key["key"],
        max_retries=0,
        timeout=30,
        default_headers={"Host": PROVIDER},
    )
    marker = uuid.uuid4().hex
    with client.responses.with_streaming_response.create(
        model="gpt-4o-mini", input="Say hello", stream=True, extra_headers={MARKER: marker}
    ) as response:
        request_id = response.headers[RID]
        events = [
            json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")
        ]
    done = [e for e in events if e.get("type") == "response.completed"]
    assert len(done) == 1, [e.get("type") for e in events]
    usage = done[0]["response"]["usage"]
    r = redis.Redis.from_url(mstack.redis_url)
    try:
        rec = wait_record(r, request_id)
    finally:
        r.close()
    assert rec["stream"] is True and rec["endpoint"] == "responses"
    assert (rec["input_tokens"], rec["output_tokens"]) == (
        usage["input_tokens"], usage["output_tokens"],
    )  # fmt: skip
    expected = Usage(
        input_tokens=usage["input_tokens"],
        cached_input_tokens=usage["input_tokens_details"]["cached_tokens"],
        output_tokens=usage["output_tokens"],
        reasoning_tokens=usage["output_tokens_details"]["reasoning_tokens"],
    )
    assert rec["cost_nanos"] == PriceTable.load().charge("gpt-4o-mini", expected).nanos > 0
    assert seen_for(mstack, pki_dir / "good-ca.pem", marker)["server_name"] == PROVIDER


def test_envoy_refuses_a_provider_certificate_from_another_ca(pki_dir: Path) -> None:
    # The simulator's certificate is genuine for api.openai.com but signed by a CA Envoy does
    # not trust (as if someone on the path answered for the provider): nothing may reach it.
    impostor = make_pki(pki_dir, "impostor")
    trusted = make_pki(pki_dir, "trusted")
    for stack in mesh_stack(pki_dir, impostor, trusted.ca):
        key = new_key(stack, "prod", "mesh-workload")
        client = openai.OpenAI(
            base_url=stack.base_url,
            api_key=key["key"],
            max_retries=0,
            timeout=30,
            default_headers={"Host": PROVIDER},
        )
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert failed.value.status_code >= 500
        assert provider_requests(stack, impostor.ca) == []


def test_simulator_refuses_a_handshake_for_another_name(mstack: Stack, pki_dir: Path) -> None:
    # The check the other tests rely on: a client asking for another name gets no answer.
    assert mstack.upstream_connect
    host, _, port = mstack.upstream_connect.rpartition(":")
    context = ssl.create_default_context(cafile=str(pki_dir / "good-ca.pem"))
    context.check_hostname = False
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        pytest.raises(ssl.SSLError),
    ):
        context.wrap_socket(raw, server_hostname="example.com")
    # The same client asking for the provider's name is answered.
    assert isinstance(provider_requests(mstack, pki_dir / "good-ca.pem"), list)


def _point(cluster: dict[str, Any], address: str, hostname: str | None = None) -> None:
    host, _, port = address.rpartition(":")
    endpoint: dict[str, Any] = {
        "address": {"socket_address": {"address": host, "port_value": int(port)}}
    }
    if hostname:
        endpoint["hostname"] = hostname
    cluster["type"] = "STATIC"
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [{"endpoint": endpoint}]}]


def test_istio_egress_gateway_with_the_envoyfilter_meters_exactly(
    mstack: Stack, pki_dir: Path, tmp_path: Path
) -> None:
    # Another team's Envoy, configured as Istio configures its egress gateway plus exactly what
    # deploy/mesh/istio-egressgateway/envoyfilter.yaml patches in: our sidecar is its filter.
    config, _, sidecar_cluster, upstream_cluster = envoyfilter_gateway()
    admin, port = free_port(), free_port()
    config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}}
    config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = port
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    _point(clusters[sidecar_cluster], mstack.sidecar_addrs[0])
    assert mstack.upstream_connect
    upstream = clusters[upstream_cluster]
    _point(upstream, mstack.upstream_connect, PROVIDER)
    # TLS origination as the egress gateway's DestinationRule (SIMPLE, sni) sets it up.
    upstream["transport_socket"] = tls_transport_socket(PROVIDER, str(pki_dir / "good-ca.pem"))
    path = tmp_path / "egressgateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    envoy = Child("egressgateway", [envoy_binary(), "-c", str(path), "--disable-hot-restart"])
    try:
        ready = f"http://127.0.0.1:{admin}/ready"
        deadline = time.monotonic() + 30
        while not _ok(ready):
            assert envoy.proc.poll() is None, envoy.output()
            assert time.monotonic() < deadline, envoy.output()
            time.sleep(0.05)  # polling a readiness probe, not synchronising on time
        key = new_key(mstack, "prod", "mesh-workload")
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key=key["key"],
            max_retries=0,
            timeout=30,
            default_headers={"Host": PROVIDER},
        )
        marker = uuid.uuid4().hex
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={MARKER: marker}
        )
        usage = chat_usage(raw.parse().usage)
        r = redis.Redis.from_url(mstack.redis_url)
        try:
            rec = wait_record(r, raw.headers[RID])
            assert len(all_records(r, rec["request_id"])) == 1
        finally:
            r.close()
    finally:
        envoy.stop()
    assert (rec["workspace"], rec["service"], rec["key_id"]) == (
        "prod", "mesh-workload", key["key_id"],
    )  # fmt: skip
    assert rec["estimated"] is False and rec["outcome"] == "completed"
    assert (rec["input_tokens"], rec["output_tokens"]) == (usage.input_tokens, usage.output_tokens)
    assert rec["cost_nanos"] == PriceTable.load().charge("gpt-4o-mini", usage).nanos > 0
    seen = seen_for(mstack, pki_dir / "good-ca.pem", marker)
    assert seen["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert seen["server_name"] == PROVIDER


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False
