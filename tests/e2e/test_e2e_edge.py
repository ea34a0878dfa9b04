"""End to end at the edge: what reaches the provider, and what never does.

The upstream here is the tests' own recording server (it stands in for api.openai.com and
keeps every request it receives, headers and body), not the simulator: the assertions are
about exactly what left the platform. Real Envoy, a real sidecar, real Redis, httpx and the
openai SDK as clients.

Checked across path spellings, methods, endpoints and credential headers:
* the virtual key never appears upstream, and every upstream request carries the workspace key;
* every completion the upstream serves has exactly one ledger record with the upstream's usage;
* whatever is not authenticated, not known, or not allowed is refused and never forwarded.
"""

from __future__ import annotations

import json
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest
import redis

from extproc.devstack.stack import Stack
from extproc.store.schema import LEDGERS, REFUSED, ledger_key, workspace_prefix
from extproc.v1.ledger_pb2 import UsageRecord
from tests.conftest import cli, new_key, policy_stack, wait_for

UPSTREAM_KEY = "sk-upstream-edge-real"
RID = "x-extproc-request-id"

POLICY = """
version: 1
defaults:
  default_output_cap: 64
routing:
  aliases:
    fast: gpt-4o-mini
    deep: o3
workspaces:
  dev:
    budget_usd: 1000
    upstream: {key_env: EDGE_UPSTREAM}
    services:
      cli: {}
      narrow:
        routing: {allowed_models: [gpt-4o-mini, gpt-5-mini]}
  lab:
    budget_usd: 1000
    upstream: {key_env: EDGE_UPSTREAM}
    passthrough: {endpoints: [files, batches, responses], allow_unpriced: true}
    services:
      bot: {}
"""


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    usage: dict[str, int] | None = None


class RecordingUpstream:
    """A stand-in for api.openai.com that answers plausibly and remembers every request.

    Completions carry a fresh random usage each time, remembered with the request, so a
    ledger record can only match if it holds what this upstream actually said.
    """

    def __init__(self) -> None:
        # Usage varies from request to request, the same way every run.
        self.rng = random.Random(19)
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = Seen(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body
                )
                with upstream.lock:
                    upstream.seen.append(seen)
                status, ctype, payload = upstream.reply(seen)
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reply(self, seen: Seen) -> tuple[int, str, bytes]:
        path = seen.path.partition("?")[0]
        request = json.loads(seen.body) if seen.body.startswith(b"{") else {}
        model = request.get("model", "gpt-4o-mini")
        inp, out = self.rng.randint(5, 5000), self.rng.randint(1, 900)
        if path == "/v1/chat/completions":
            seen.usage = {"input": inp, "output": out}
            usage = {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out}
            if request.get("stream"):
                chunks = [
                    {"id": "c1", "object": "chat.completion.chunk", "model": model,
                     "choices": [{"index": 0, "delta": {"content": "hi"}}]},
                    {"id": "c1", "object": "chat.completion.chunk", "model": model,
                     "choices": [], "usage": usage},
                ]  # fmt: skip
                data = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
                return 200, "text/event-stream", data.encode()
            answer = {
                "id": "c1",
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                "usage": usage,
            }
            return 200, "application/json", json.dumps(answer).encode()
        if path in ("/v1/responses", "/v1/responses/compact"):
            seen.usage = {"input": inp, "output": out}
            answer = {
                "id": "resp_1",
                "object": "response",
                "status": "completed",
                "model": model,
                "output": [],
                "usage": {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out},
            }
            return 200, "application/json", json.dumps(answer).encode()
        return 200, "application/json", json.dumps({"object": "ok", "path": path}).encode()

    def count(self) -> int:
        with self.lock:
            return len(self.seen)

    def since(self, start: int) -> list[Seen]:
        with self.lock:
            return self.seen[start:]


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    up = RecordingUpstream()
    yield up
    up.server.shutdown()


@pytest.fixture(scope="module")
def estack(
    upstream: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with policy_stack(
        tmp_path_factory, POLICY, {"EDGE_UPSTREAM": UPSTREAM_KEY}, upstream_url=upstream.url
    ) as s:
        yield s


@pytest.fixture(scope="module")
def r(estack: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(estack.redis_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def dev_key(estack: Stack) -> dict[str, Any]:
    return new_key(estack, "dev", "cli")


def origin(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.config.listen_port}"


def raw_request(
    stack: Stack, method: str, target: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """Send a request line exactly as written (httpx would normalise the path)."""
    lines = [f"{method} {target} HTTP/1.1", "host: api.openai.com", "connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", stack.config.listen_port), timeout=30) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    if found.get("transfer-encoding") == "chunked":
        payload = _dechunk(payload)
    return int(status_line.split()[1]), found, payload


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


def records_for(r: redis.Redis, workspace: str, envoy_request_id: str) -> list[UsageRecord]:
    stream = ledger_key(workspace_prefix(workspace))
    return [
        rec
        for _id, fields in r.xrange(stream)
        if (rec := UsageRecord.FromString(fields[b"r"])).envoy_request_id == envoy_request_id
    ]


def assert_clean_upstream(seen: Seen, virtual_key: str) -> None:
    """The provider got our key only, and no client credential of any kind."""
    assert seen.headers.get("authorization") == f"Bearer {UPSTREAM_KEY}"
    for name in ("api-key", "x-api-key", "cookie", "proxy-authorization", "openai-organization"):
        assert name not in seen.headers, name
    assert virtual_key not in json.dumps(seen.headers)
    assert virtual_key.encode() not in seen.body


CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
CHAT_STREAM = json.dumps(
    {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
)
SPELLINGS = [
    "/v1/chat/completions",
    "/v1/chat/completions/",
    "//v1/chat/completions",
    "/v1//chat/completions/",
    "/v1/./chat/completions",
    "/v1/chat/%63ompletions",
    "/v1/chat/completions?trace=1",
    "/v1/chat/completions/?trace=1",
]
CREDENTIALS = ["bearer", "api-key", "x-api-key", "bearer+api-key", "all+cookie"]


def credential_headers(style: str, key: str) -> dict[str, str]:
    if style == "bearer":
        return {"authorization": f"Bearer {key}"}
    if style == "api-key":
        return {"api-key": key}
    if style == "x-api-key":
        return {"x-api-key": key}
    if style == "bearer+api-key":  # the case: api-key rode along next to Authorization
        return {"authorization": f"Bearer {key}", "api-key": key}
    return {
        "authorization": f"Bearer {key}",
        "x-api-key": key,
        "cookie": f"session={key}",
        "proxy-authorization": f"Basic {key}",
        "openai-organization": "org-client-chosen",
    }


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize(
    ("style", "stream"),
    [*((style, False) for style in CREDENTIALS), ("bearer", True), ("all+cookie", True)],
)
def test_metered_spellings_and_credentials(
    estack: Stack,
    upstream: RecordingUpstream,
    r: redis.Redis,
    dev_key: dict[str, Any],
    spelling: str,
    style: str,
    stream: bool,
) -> None:
    start = upstream.count()
    headers = {"content-type": "application/json", **credential_headers(style, dev_key["key"])}
    body = (CHAT_STREAM if stream else CHAT).encode()
    status, answer_headers, _payload = raw_request(estack, "POST", spelling, headers, body)
    assert status == 200, _payload
    [seen] = upstream.since(start)
    query = spelling.partition("?")[2]
    assert seen.path == "/v1/chat/completions" + (f"?{query}" if query else "")
    assert_clean_upstream(seen, dev_key["key"])
    assert seen.usage is not None
    rec = wait_for(r, lambda x: x.envoy_request_id == seen.headers["x-request-id"], spelling)
    assert (rec["input_tokens"], rec["output_tokens"]) == (
        seen.usage["input"],
        seen.usage["output"],
    )
    assert rec["estimated"] is False and rec["endpoint"] == "chat.completions"
    assert rec["key_id"] == dev_key["key_id"]
    assert rec["request_id"] == answer_headers[RID]
    assert len(records_for(r, "dev", seen.headers["x-request-id"])) == 1


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer "}, {"authorization": "Basic abc"}, {"api-key": ""}],
    ids=["none", "empty-bearer", "basic", "empty-api-key"],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions/", "/v1/models", "/v1/files", "/nope"])
def test_no_key_is_401_and_nothing_is_forwarded(
    estack: Stack, upstream: RecordingUpstream, headers: dict[str, str], path: str
) -> None:
    """Regression: a trailing slash without a key was answered 200 by the upstream."""
    start = upstream.count()
    method = "POST" if "chat" in path else "GET"
    body = CHAT.encode() if method == "POST" else b""
    status, _h, payload = raw_request(estack, method, path, headers, body)
    assert status == 401
    assert json.loads(payload)["error"]["code"] == "invalid_api_key"
    assert upstream.since(start) == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completion"),
        ("POST", "/v1/Chat/Completions"),
        ("POST", "/v1/chat/completions/x/y"),
        ("POST", "/v1/chat%2Fcompletions"),
        ("POST", "/v2/chat/completions"),
        ("POST", "/chat/completions"),
        ("POST", "/v1/responses/resp_1"),
        ("PUT", "/v1/chat/completions"),
        ("PATCH", "/v1/responses"),
        ("GET", "/v1/../../etc/passwd"),
        ("POST", "/v1/chat/completions%00"),
        ("OPTIONS", "/v1/responses"),
    ],
)
def test_lookalikes_are_404_and_never_forwarded(
    estack: Stack, upstream: RecordingUpstream, dev_key: dict[str, Any], method: str, path: str
) -> None:
    start = upstream.count()
    headers = {"authorization": f"Bearer {dev_key['key']}", "content-type": "application/json"}
    status, _h, payload = raw_request(estack, method, path, headers, CHAT.encode())
    # Envoy answers a few itself: 400 for a malformed path, 307 to the unescaped spelling of an
    # encoded slash (path_with_escaped_slashes_action); neither reaches the provider.
    assert status in (307, 400, 404), payload
    if status == 404:
        assert json.loads(payload)["error"]["code"] == "unknown_url"
    assert upstream.since(start) == []


@pytest.mark.parametrize(
    ("method", "path", "endpoint", "family"),
    [
        ("GET", "/v1/responses/resp_1", "responses", "free"),
        ("DELETE", "/v1/responses/resp_1/", "responses", "free"),
        ("GET", "/v1/files", "files", "free"),
        ("DELETE", "/v1/files/file-abc", "files", "free"),
        ("GET", "/v1/chat/completions/chatcmpl-1/messages", "chat.completions", "free"),
        ("POST", "/v1/moderations", "moderations", "free"),
    ],
)
def test_passthrough_is_key_swapped_and_recorded(
    estack: Stack,
    upstream: RecordingUpstream,
    r: redis.Redis,
    dev_key: dict[str, Any],
    method: str,
    path: str,
    endpoint: str,
    family: str,
) -> None:
    """Regression: unmetered paths forwarded the virtual key and left no record."""
    start = upstream.count()
    headers = {"authorization": f"Bearer {dev_key['key']}", "api-key": dev_key["key"]}
    body = b'{"input": "hello"}' if method == "POST" else b""
    if body:
        headers["content-type"] = "application/json"
    status, answer, _payload = raw_request(estack, method, path, headers, body)
    assert status == 200
    [seen] = upstream.since(start)
    assert seen.path == path.rstrip("/")
    assert_clean_upstream(seen, dev_key["key"])
    rec = wait_for(r, lambda x: x.request_id == answer[RID], path)
    assert (rec["endpoint"], rec["price_family"], rec["cost_nanos"]) == (endpoint, family, 0)
    assert (rec["workspace"], rec["key_id"], rec["status"]) == ("dev", dev_key["key_id"], 200)
    assert len(records_for(r, "dev", seen.headers["x-request-id"])) == 1


def test_priced_passthrough_uses_the_answers_usage(
    estack: Stack, upstream: RecordingUpstream, r: redis.Redis, dev_key: dict[str, Any]
) -> None:
    start = upstream.count()
    resp = httpx.post(
        f"{estack.base_url}/responses/compact",
        json={"model": "gpt-5-mini", "input": "a long history"},
        headers={"authorization": f"Bearer {dev_key['key']}"},
        timeout=30,
    )
    assert resp.status_code == 200
    [seen] = upstream.since(start)
    assert_clean_upstream(seen, dev_key["key"])
    rec = wait_for(r, lambda x: x.request_id == resp.headers[RID], "compact")
    assert seen.usage is not None
    assert (rec["input_tokens"], rec["output_tokens"]) == (
        seen.usage["input"],
        seen.usage["output"],
    )
    # gpt-5-mini: $0.25 / $2.00 per 1M tokens = 250 / 2000 nanos per token.
    assert rec["cost_nanos"] == seen.usage["input"] * 250 + seen.usage["output"] * 2000
    assert resp.headers["x-extproc-cost-usd"]


def test_unpriced_needs_the_policy_and_groups_are_per_workspace(
    estack: Stack, upstream: RecordingUpstream, r: redis.Redis, dev_key: dict[str, Any]
) -> None:
    lab = new_key(estack, "lab", "bot")
    start = upstream.count()
    batch = {"input_file_id": "file-1", "endpoint": "/v1/chat/completions"}
    denied = httpx.post(
        f"{estack.base_url}/batches",
        json=batch,
        headers={"authorization": f"Bearer {dev_key['key']}"},
        timeout=30,
    )
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "unpriced_endpoint_not_allowed"
    not_listed = httpx.post(
        f"{estack.base_url}/moderations",
        json={"input": "x"},
        headers={"authorization": f"Bearer {lab['key']}"},
        timeout=30,
    )
    assert not_listed.status_code == 403
    assert not_listed.json()["error"]["code"] == "endpoint_not_allowed"
    assert upstream.since(start) == []
    allowed = httpx.post(
        f"{estack.base_url}/batches",
        json=batch,
        headers={"authorization": f"Bearer {lab['key']}"},
        timeout=30,
    )
    assert allowed.status_code == 200
    [seen] = upstream.since(start)
    assert_clean_upstream(seen, lab["key"])
    rec = wait_for(r, lambda x: x.request_id == allowed.headers[RID], "batch")
    assert (rec["endpoint"], rec["price_family"], rec["workspace"]) == (
        "batches",
        "unpriced",
        "lab",
    )


def test_models_list_is_per_key(estack: Stack, upstream: RecordingUpstream) -> None:
    start = upstream.count()
    narrow = new_key(estack, "dev", "narrow")
    wide = new_key(estack, "dev", "cli")
    ids = [
        m.id for m in openai.OpenAI(base_url=estack.base_url, api_key=narrow["key"]).models.list()
    ]
    assert ids == ["gpt-4o-mini", "gpt-5-mini", "fast"]  # "deep" leads to o3: not allowed
    wide_ids = {
        m.id for m in openai.OpenAI(base_url=estack.base_url, api_key=wide["key"]).models.list()
    }
    assert {"gpt-5", "o3", "fast", "deep"} <= wide_ids
    sdk = openai.OpenAI(base_url=estack.base_url, api_key=narrow["key"], max_retries=0)
    assert sdk.models.retrieve("gpt-5-mini").id == "gpt-5-mini"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("o3")
    assert upstream.since(start) == []


def test_websocket_upgrade_is_refused_with_426(
    estack: Stack, upstream: RecordingUpstream, dev_key: dict[str, Any]
) -> None:
    start = upstream.count()
    headers = {
        "authorization": f"Bearer {dev_key['key']}",
        "upgrade": "websocket",
        "connection": "Upgrade",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
        "sec-websocket-version": "13",
    }
    status, _h, payload = raw_request(estack, "GET", "/v1/responses", headers)
    assert status == 426
    assert json.loads(payload)["error"]["code"] == "websocket_not_supported"
    assert upstream.since(start) == []


def test_bad_keys_cost_a_counter_not_a_record(
    estack: Stack, upstream: RecordingUpstream, r: redis.Redis, dev_key: dict[str, Any]
) -> None:
    before = int(r.hget(REFUSED, "invalid_api_key") or 0)
    streams_before = {s: r.xlen(s) for s in r.smembers(LEDGERS)}
    start = upstream.count()
    bad = "sk-ext-" + "x" * 40
    with httpx.Client(base_url=estack.base_url, timeout=30) as http:
        for i in range(50):
            key = bad if i % 2 else f"sk-ext-{i:040d}"
            resp = http.post(
                "/chat/completions", content=CHAT, headers={"authorization": f"Bearer {key}"}
            )
            assert resp.status_code == 401
    assert upstream.since(start) == []
    # Counters are flushed with the next ledger write: make one, then wait for it.
    ok = httpx.post(
        f"{estack.base_url}/chat/completions",
        content=CHAT,
        headers={"authorization": f"Bearer {dev_key['key']}", "content-type": "application/json"},
        timeout=30,
    )
    wait_for(r, lambda x: x.request_id == ok.headers[RID], "flush")
    assert int(r.hget(REFUSED, "invalid_api_key") or 0) == before + 50
    grown = {s: r.xlen(s) - streams_before.get(s, 0) for s in r.smembers(LEDGERS)}
    assert sum(grown.values()) == 1  # only the valid request's record


def test_revoked_key_is_refused_at_once(estack: Stack, upstream: RecordingUpstream) -> None:
    key = new_key(estack, "dev", "cli")
    headers = {"authorization": f"Bearer {key['key']}"}
    assert httpx.get(f"{estack.base_url}/files", headers=headers, timeout=30).status_code == 200
    cli(estack, "keys", "revoke", key["key_id"])
    start = upstream.count()
    assert httpx.get(f"{estack.base_url}/files", headers=headers, timeout=30).status_code == 401
    assert upstream.since(start) == []
