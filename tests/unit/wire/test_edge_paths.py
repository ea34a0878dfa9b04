"""Unit tests: path canonicalisation, endpoint classification, the passthrough policy and
the passthrough record. Plain functions of data, no stack."""

from __future__ import annotations

import json
from typing import Any

import pytest

from extproc.governance.credentials import credentials_present, is_upgrade, presented_key
from extproc.governance.passthrough import DEFAULT, parse_passthrough
from extproc.governance.policy import PolicyError, parse_policy
from extproc.metering.passthrough import PassthroughSeen, settle_passthrough
from extproc.metering.prices import PriceTable
from extproc.wire import paths
from extproc.wire.paths import Kind, canonical_path, classify
from extproc.wire.spec import GROUPS

PRICES = PriceTable.load()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/v1/responses", ("/v1/responses", "")),
        ("/v1/responses/", ("/v1/responses", "")),
        ("//v1//responses//", ("/v1/responses", "")),
        ("/v1/./responses", ("/v1/responses", "")),
        ("/v1/x/../responses", ("/v1/responses", "")),
        ("/v1/%72esponses", ("/v1/responses", "")),
        ("/v1/responses?api-version=1&x=%2F", ("/v1/responses", "api-version=1&x=%2F")),
        ("/v1/responses#frag", ("/v1/responses", "")),
        ("/v1/chat%2fcompletions", ("/v1/chat%2Fcompletions", "")),
        ("/", ("/", "")),
    ],
)
def test_canonical_path(raw: str, expected: tuple[str, str]) -> None:
    assert canonical_path(raw) == expected


@pytest.mark.parametrize(
    "raw", ["", "v1/responses", "/../v1/responses", "/v1/%zz", "/v1/%4", "/v1/re sponses", "/v1/é"]
)
def test_unusable_paths(raw: str) -> None:
    assert canonical_path(raw) is None
    assert classify("POST", raw).kind is Kind.UNKNOWN


@pytest.mark.parametrize(
    ("method", "raw", "kind", "name"),
    [
        ("POST", "/v1/chat/completions/", Kind.METERED, "chat.completions"),
        ("POST", "/v1/responses?x=1", Kind.METERED, "responses"),
        ("POST", "/v1/embeddings/", Kind.METERED, "embeddings"),
        ("GET", "/v1/chat/completions", Kind.PASSTHROUGH, "chat.completions"),
        ("GET", "/v1/responses/resp_1/", Kind.PASSTHROUGH, "responses"),
        ("POST", "/v1/responses/compact", Kind.PASSTHROUGH, "responses.compact"),
        ("POST", "/v1/responses/resp_1", Kind.UNKNOWN, ""),
        ("GET", "/v1/models", Kind.PASSTHROUGH, "models"),
        ("POST", "/v1/models", Kind.UNKNOWN, ""),
        ("POST", "/v1/images/generations", Kind.PASSTHROUGH, "images.generations"),
        ("POST", "/v1/audio/speech", Kind.PASSTHROUGH, "audio.speech"),
        ("GET", "/v1/files/file-1/content", Kind.PASSTHROUGH, "files"),
        ("POST", "/v1/vector_stores/vs_1/files", Kind.PASSTHROUGH, "vector_stores"),
        ("POST", "/v1/Chat/Completions", Kind.UNKNOWN, ""),
        ("POST", "/v1/chat/completion", Kind.UNKNOWN, ""),
        ("PUT", "/v1/responses", Kind.UNKNOWN, ""),
        ("post", "/v1/responses", Kind.UNKNOWN, ""),
    ],
)
def test_classify(method: str, raw: str, kind: Kind, name: str) -> None:
    target = classify(method, raw)
    assert (target.kind, target.name) == (kind, name)


def test_forward_path_keeps_the_query() -> None:
    target = classify("POST", "//v1/responses/?api-version=2025")
    assert target.forward_path == "/v1/responses?api-version=2025"


def test_credentials() -> None:
    assert presented_key({"authorization": "Bearer  sk-ext-a "}) == "sk-ext-a"
    assert presented_key({"authorization": "Basic x", "api-key": "sk-ext-b"}) == "sk-ext-b"
    assert presented_key({"x-api-key": "sk-ext-c"}) == "sk-ext-c"
    assert presented_key({"authorization": "Bearer "}) == ""
    found = credentials_present({"authorization": "x", "api-key": "y", "cookie": "z", "a": "b"})
    assert sorted(found) == ["api-key", "authorization", "cookie"]
    assert is_upgrade({"upgrade": "websocket"})
    assert is_upgrade({"connection": "keep-alive, Upgrade"})
    assert not is_upgrade({"connection": "keep-alive"})


def _parse(value: Any) -> tuple[Any, list[str]]:
    problems: list[str] = []
    parsed = parse_passthrough("p", value, DEFAULT, lambda path, msg: problems.append(msg))
    return parsed, problems


def test_passthrough_policy_defaults_and_validation() -> None:
    assert DEFAULT.endpoints == frozenset(GROUPS) and DEFAULT.allow_unpriced is False
    parsed, problems = _parse({"endpoints": ["files"], "allow_unpriced": True})
    assert (parsed.endpoints, parsed.allow_unpriced, problems) == (frozenset({"files"}), True, [])
    _parsed, problems = _parse({"endpoints": ["filez"], "allow_unpriced": "yes", "other": 1})
    assert any('did you mean "files"' in p for p in problems)
    assert any("true or false" in p for p in problems)
    assert any("unknown field" in p for p in problems)


def test_passthrough_refusals() -> None:
    files = classify("GET", "/v1/files")
    batch = classify("POST", "/v1/batches")
    assert files.spec is not None and batch.spec is not None
    assert DEFAULT.refusal(files.spec) is None
    refused = DEFAULT.refusal(batch.spec)
    assert refused is not None and refused.code == "unpriced_endpoint_not_allowed"
    narrow, _ = _parse({"endpoints": ["batches"], "allow_unpriced": True})
    assert narrow.refusal(batch.spec) is None
    denied = narrow.refusal(files.spec)
    assert denied is not None and (denied.status, denied.code) == (403, "endpoint_not_allowed")


POLICY: dict[str, Any] = {
    "version": 1,
    "defaults": {"passthrough": {"endpoints": ["files", "models"]}},
    "workspaces": {
        "a": {"budget_usd": 10, "upstream": {"key_env": "X"}, "services": {"s": {}}},
        "b": {
            "budget_usd": 10,
            "upstream": {"key_env": "X"},
            "services": {"s": {}},
            "passthrough": {"allow_unpriced": True},
        },
    },
}


def test_policy_inherits_passthrough_field_by_field() -> None:
    policy = parse_policy(json.loads(json.dumps(POLICY)))
    a, b = policy.workspaces["a"].passthrough, policy.workspaces["b"].passthrough
    assert a.endpoints == b.endpoints == frozenset({"files", "models"})
    assert (a.allow_unpriced, b.allow_unpriced) == (False, True)


def test_policy_names_the_bad_passthrough_field() -> None:
    doc = json.loads(json.dumps(POLICY))
    doc["workspaces"]["a"]["passthrough"] = {"endpoints": ["bogus"]}
    with pytest.raises(PolicyError) as info:
        parse_policy(doc)
    assert "workspaces.a.passthrough.endpoints" in str(info.value)


def _seen(
    method: str, path: str, status: int, body: Any = None, model: str = ""
) -> PassthroughSeen:
    seen = PassthroughSeen("rid", 1, classify(method, path), status=status, request_model=model)
    seen.response_body = json.dumps(body).encode() if body is not None else None
    return seen


def test_passthrough_records() -> None:
    free = settle_passthrough(_seen("GET", "/v1/files", 200), PRICES)
    assert (free.endpoint, free.price_family, free.cost_nanos, free.outcome) == (
        "files",
        "free",
        0,
        "completed",
    )
    unpriced = settle_passthrough(_seen("POST", "/v1/batches", 200), PRICES)
    assert (unpriced.price_family, unpriced.cost_nanos) == ("unpriced", 0)
    failed = settle_passthrough(_seen("POST", "/v1/batches", 400), PRICES)
    assert (failed.price_family, failed.outcome) == ("free", "upstream_error")
    usage = {"input_tokens": 1000, "output_tokens": 10}
    compact = settle_passthrough(
        _seen("POST", "/v1/responses/compact", 200, {"model": "gpt-5-mini", "usage": usage}),
        PRICES,
    )
    assert (compact.input_tokens, compact.output_tokens) == (1000, 10)
    assert compact.cost_nanos == 1000 * 250 + 10 * 2000
    # Images: the model is only in the request; its output tokens are image tokens, billed
    # at the image model's output rate ($5 per 1M text input, $40 per 1M image output).
    image = settle_passthrough(
        _seen("POST", "/v1/images/generations", 200, {"data": [], "usage": usage}, "gpt-image-1"),
        PRICES,
    )
    assert (image.price_family, image.cost_nanos, image.model_served) == (
        "gpt-image-1",
        1000 * 5_000 + 10 * 40_000,
        "gpt-image-1",
    )
    assert (image.output_tokens, image.output_image_tokens) == (10, 10)
    # A model without a price row stays unpriced: a passthrough call is never guessed.
    unknown = settle_passthrough(
        _seen("POST", "/v1/images/generations", 200, {"data": [], "usage": usage}, "img-9"),
        PRICES,
    )
    assert (unknown.price_family, unknown.cost_nanos) == ("unpriced", 0)
    with_image_input = {**usage, "input_tokens_details": {"image_tokens": 5, "text_tokens": 995}}
    edited = settle_passthrough(
        _seen(
            "POST", "/v1/responses/compact", 200, {"model": "gpt-5-mini", "usage": with_image_input}
        ),
        PRICES,
    )
    assert (edited.price_family, edited.cost_nanos) == ("unpriced", 0)


def test_classify_remembers_answers_within_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pure function asked on every request: its answers are kept, never past the bound
    (paths with ids, or a flood of odd ones, cost memory only up to it)."""
    monkeypatch.setattr(paths, "_SEEN", {})
    monkeypatch.setattr(paths, "_SEEN_MAX", 3)
    first = classify("POST", "/v1/responses/")
    assert classify("POST", "/v1/responses/") is first  # remembered
    assert first == paths._classify("POST", "/v1/responses/")  # the same answer, computed
    for i in range(10):
        assert classify("GET", f"/v1/files/file-{i}").name == "files"
        assert len(paths._SEEN) <= 3
