"""Property: whatever a client sends, and however the upstream answers, the sidecar answers
in OpenAI's shape, never blames the client with a 5xx, and writes exactly one usage record.

Hypothesis generates request bodies (valid shapes with hostile values, broken JSON, wrong
types, out-of-range numbers, full-width and control characters, lone surrogates) and
headers (content codings, session ids, spoofed attribution, upstream faults), and sends
each through the real stack: Envoy, the sidecar, Redis and the simulator. The example
count is bounded so the run stays within a minute or two on a small machine.

In the suite the examples are derived from the test itself (`derandomize`): the same ones every
run, so a red run is a real regression and reproducible. `make fuzz` is the long randomised
hunt (EXTPROC_FUZZ=hunt, 2,000 examples); whatever it finds becomes an `@example` here.
"""

from __future__ import annotations

import gzip
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from extproc.devstack.stack import Stack
from tests.conftest import all_records, new_key, policy_stack, wait_for

RID = "x-extproc-request-id"
HUNT = os.environ.get("EXTPROC_FUZZ") == "hunt"
# Bounded for the suite; EXTPROC_FUZZ_EXAMPLES overrides either count.
EXAMPLES = int(os.environ.get("EXTPROC_FUZZ_EXAMPLES", "2000" if HUNT else "80"))

POLICY = """
version: 1
timezone: UTC
defaults:
  default_output_cap: 256
workspaces:
  dev:
    budget_usd: 100000
    enforce_output_cap: true
    upstream: {key_env: TEST_UPSTREAM_DEV}
    services:
      fuzz: {}
"""


@pytest.fixture(scope="module")
def fstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with policy_stack(tmp_path_factory, POLICY, {"TEST_UPSTREAM_DEV": "sk-upstream-dev"}) as s:
        yield s


@pytest.fixture(scope="module")
def fkey(fstack: Stack) -> str:
    return new_key(fstack, "dev", "fuzz")["key"]


@pytest.fixture(scope="module")
def fdb(fstack: Stack) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(fstack.redis_url)
    yield r
    r.close()


@pytest.fixture(scope="module")
def http(fstack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fstack.base_url, timeout=60) as client:
        yield client


NASTY_TEXT = st.sampled_from(
    [
        "gpt-4o-mini",
        "gpt-5",
        "\uff47\uff50\uff54-5-mini",
        "gpt-5\r\nx-evil: 1",
        "\x00",
        "\ud800",
        "caf\u00e9",
        "%41%",
        "m" * 5000,
        "",
    ]
)
TEXT = st.one_of(NASTY_TEXT, st.text(max_size=40))
NUMBER = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**63, -1, 10**400]),
    st.floats(allow_nan=False),
)
JSON = st.recursive(
    st.none() | st.booleans() | NUMBER | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": TEXT}),
    min_size=1,
    max_size=3,
)
ENDPOINTS = {
    "/chat/completions": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    "/responses": {"model": "gpt-5-mini", "input": "hi"},
    "/completions": {"model": "gpt-3.5-turbo-instruct", "prompt": "hi"},
    "/embeddings": {"model": "text-embedding-3-small", "input": "hi"},
}
FIELDS = {
    "model": TEXT | JSON,
    "stream": st.booleans() | JSON,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON,
    "max_tokens": NUMBER | JSON,
    "max_completion_tokens": NUMBER,
    "max_output_tokens": NUMBER,
    "n": NUMBER,
    "best_of": NUMBER,
    "temperature": NUMBER,
    "messages": MESSAGES | JSON,
    "input": TEXT | JSON,
    "prompt": TEXT | st.lists(st.integers(0, 50000), max_size=5) | JSON,
    "prompt_cache_key": TEXT | JSON,
    "user": TEXT | JSON,
    "reasoning": st.fixed_dictionaries({"effort": TEXT}) | JSON,
    "tools": st.lists(JSON, max_size=2) | JSON,
}


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    body: dict[str, Any] = dict(ENDPOINTS[path])
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=4, unique=True)):
        if draw(st.booleans()):
            body[name] = draw(FIELDS[name])
        else:
            body.pop(name, None)
    kinds = ["json", "json", "json", "truncated", "junk", "gzip", "badgzip", "huge_number"]
    kind = draw(st.sampled_from(kinds))
    headers: dict[str, str] = {}
    try:
        raw = json.dumps(body).encode()
    except ValueError:  # an integer too long to write: send it as text
        raw = repr(body).encode()
    if kind == "truncated":
        raw = raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif kind == "huge_number" and raw.endswith(b"}"):
        raw = raw[:-1] + b', "top_p": 1e999}'  # parses as infinity; JSON cannot write it back
    elif kind == "junk":
        raw = draw(st.binary(max_size=64))
    elif kind == "gzip":
        raw, headers["content-encoding"] = gzip.compress(raw), "gzip"
    elif kind == "badgzip":
        headers["content-encoding"] = draw(st.sampled_from(["gzip", "zstd", "br", "x, y"]))
    if draw(st.booleans()):
        headers["session_id"] = draw(
            st.text(
                st.characters(min_codepoint=0x21, max_codepoint=0xFF, exclude_characters="\x7f")
            )
        )
    if draw(st.booleans()):
        headers["x-extproc-workspace"] = "prod"
    fault = draw(
        st.sampled_from(
            [None, "status=500", "status=429", "status=400", "cut-after=2", "no-usage",
             "error-event", "event-delay-ms=5"]
        )
    )  # fmt: skip
    if fault:
        headers["x-sim-fault"] = fault
    return path, raw, headers


def _found(path: str, **fields: Any) -> tuple[str, bytes, dict[str, str]]:
    """An input an earlier run found: sent as JSON, as the generator sends it."""
    return path, json.dumps({**ENDPOINTS[path], **fields}).encode(), {}


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not HUNT,
    print_blob=HUNT,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests())
# A lone surrogate the answer echoes: the simulator's SSE writer raised and the client got 500.
@example(request=_found("/responses", prompt_cache_key="\ud800", stream=True))
@example(request=_found("/responses", user="x\udfff", stream=False))
def test_every_request_gets_an_openai_answer_and_exactly_one_record(
    http: httpx.Client, fdb: redis.Redis, fkey: str, request: tuple[str, bytes, dict[str, str]]
) -> None:
    path, raw, headers = request
    # Our own x-request-id (Envoy keeps it): the record is found by it even when the reply
    # never reached the sidecar's response phase (Envoy's own 502 after an upstream cut).
    envoy_id = uuid.uuid4().hex
    headers = {
        "authorization": f"Bearer {fkey}",
        "content-type": "application/json",
        "x-request-id": envoy_id,
        **headers,
    }
    body = b""
    wire = {k: v.encode("latin-1") for k, v in headers.items()}  # bytes: not only ASCII
    with http.stream("POST", path, content=raw, headers=wire) as resp:
        try:
            body = resp.read()
        except httpx.HTTPError:
            assert "cut-after" in headers.get("x-sim-fault", ""), "only an upstream cut breaks"
    status = resp.status_code
    upstream_fault = headers.get("x-sim-fault", "")
    if status >= 500:
        # 5xx only when the upstream itself failed, never for what the client sent.
        assert upstream_fault.startswith(("status=5", "cut-after")), (status, body[:300])
        assert resp.headers["content-type"].startswith("application/json"), body[:300]
    if status >= 400 and resp.headers.get("content-type", "").startswith("application/json"):
        error = json.loads(body)["error"]
        assert {"message", "type", "param", "code"} <= set(error)
    record = wait_for(fdb, lambda rec: rec.envoy_request_id == envoy_id, envoy_id)
    rid = record["request_id"]
    if RID in resp.headers:
        assert resp.headers[RID] == rid
    else:
        assert status == 502 and "cut-after" in upstream_fault, (status, body[:300])
    assert len(all_records(fdb, rid)) == 1
    assert record["workspace"] == "dev"
    if 200 <= status < 300 and not upstream_fault:
        assert record["outcome"] == "completed", record
        assert not record["estimated"]
