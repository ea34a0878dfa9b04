"""Priced passthrough as plain functions of data: how its requests are read and counted, the
policy's output ceiling, and the one record of a call that was held, refused or cut."""

from __future__ import annotations

import json
from typing import Any

import pytest

from extproc.governance.passthrough import DEFAULT, DEFAULT_OUTPUT_CEILING, parse_passthrough
from extproc.governance.policy import PolicyError, parse_policy
from extproc.metering.decisions import parse_request
from extproc.metering.passthrough import (
    PassthroughSeen,
    orphaned_passthrough,
    settle_passthrough,
)
from extproc.metering.prices import PriceTable
from extproc.metering.tokens import count_text
from extproc.wire.endpoints import ENDPOINTS
from extproc.wire.errors import OpenAIError
from extproc.wire.paths import classify
from extproc.wire.priced import IMAGES_DEFAULT_MODEL
from extproc.wire.spec import PASSTHROUGH, PRICED, Pricing
from extproc.wire.usage import Usage

PRICES = PriceTable.load()


def prepare(name: str, body: dict[str, Any]) -> Any:
    raw = json.dumps(body).encode()
    reader = PRICED[name].reader
    assert reader is not None
    return parse_request(reader, raw, "", max_body_bytes=1 << 20, count=count_text)


def test_every_usage_priced_endpoint_has_a_spec_and_only_those() -> None:
    for spec in PASSTHROUGH:
        assert (spec.reader is not None) is (spec.pricing is Pricing.USAGE), spec
        assert (spec.output_ceiling is not None) is (spec.pricing is Pricing.USAGE), spec
    for name, spec in PRICED.items():
        target = classify("POST", spec.path)
        assert target.name == name and target.spec is spec


def test_compact_input_is_counted_as_the_responses_endpoint_counts_it() -> None:
    body = {
        "model": "gpt-5-mini",
        "instructions": "summarise",
        "input": [
            {"role": "user", "content": "first question " * 30},
            {"role": "assistant", "content": [{"type": "output_text", "text": "an answer"}]},
        ],
    }
    compact = prepare("responses.compact", body)
    raw = json.dumps(body).encode()
    metered = parse_request(
        ENDPOINTS["/v1/responses"], raw, "", max_body_bytes=1 << 20, count=count_text
    )
    assert compact.counted_input_tokens == metered.counted_input_tokens > 60
    assert (compact.facts.model, compact.facts.output_cap, compact.facts.choices) == (
        "gpt-5-mini",
        None,
        1,
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": 5, "input": "x"}, "model"),
        ({"model": "gpt-5", "input": 5}, "input"),
        ({"model": "gpt-5", "input": "x", "prompt_cache_key": 1}, "prompt_cache_key"),
    ],
)
def test_compact_bad_input_names_the_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        prepare("responses.compact", body)
    assert (info.value.status, info.value.param) == (400, param)


def test_image_generations_count_the_prompt_and_hold_per_image() -> None:
    prepared = prepare("images.generations", {"prompt": "a red fox in snow", "n": 4})
    assert prepared.facts.model == IMAGES_DEFAULT_MODEL  # what OpenAI serves when none is named
    assert prepared.facts.choices == 4
    assert prepared.counted_input_tokens == count_text("a red fox in snow", IMAGES_DEFAULT_MODEL)
    for bad, param in [({"prompt": 3}, "prompt"), ({"prompt": "x", "n": 11}, "n")]:
        with pytest.raises(OpenAIError) as info:
            prepare("images.generations", {"model": "gpt-image-1", **bad})
        assert info.value.param == param


def _parse(value: Any) -> tuple[Any, list[tuple[str, str]]]:
    problems: list[tuple[str, str]] = []
    parsed = parse_passthrough(
        "defaults.passthrough", value, DEFAULT, lambda p, m: problems.append((p, m))
    )
    return parsed, problems


def test_output_ceiling_defaults_overrides_and_errors_naming_the_field() -> None:
    assert dict(DEFAULT.output_ceiling) == dict(DEFAULT_OUTPUT_CEILING)
    assert set(dict(DEFAULT_OUTPUT_CEILING)) == set(PRICED)
    parsed, problems = _parse({"output_ceiling": {"responses.compact": 2000}})
    assert problems == []
    assert parsed.held_output("responses.compact", None) == 2000
    assert parsed.held_output("images.generations", None) == 6240  # inherited
    assert parsed.held_output("responses.compact", 77) == 77  # a stated cap wins
    _bad, problems = _parse(
        {
            "output_ceiling": {
                "images.generation": 10,
                "responses.compact": 0,
                "images.generations": "lots",
            }
        }
    )
    fields = dict(problems)
    assert (
        'did you mean "images.generations"'
        in fields["defaults.passthrough.output_ceiling.images.generation"]
    )
    assert "positive" in fields["defaults.passthrough.output_ceiling.responses.compact"]
    assert "positive" in fields["defaults.passthrough.output_ceiling.images.generations"]
    _bad, problems = _parse({"output_ceiling": [1, 2]})
    assert problems[0][0] == "defaults.passthrough.output_ceiling"


def test_policy_inherits_the_ceiling_and_names_a_bad_one() -> None:
    doc: dict[str, Any] = {
        "version": 1,
        "defaults": {"passthrough": {"output_ceiling": {"responses.compact": 3000}}},
        "workspaces": {
            "a": {"budget_usd": 1, "upstream": {"key_env": "X"}, "services": {"s": {}}},
            "b": {
                "budget_usd": 1,
                "upstream": {"key_env": "X"},
                "services": {"s": {}},
                "passthrough": {"output_ceiling": {"images.generations": 100}},
            },
        },
    }
    policy = parse_policy(json.loads(json.dumps(doc)))
    a, b = policy.workspaces["a"].passthrough, policy.workspaces["b"].passthrough
    assert a.held_output("responses.compact", None) == 3000
    assert a.held_output("images.generations", None) == 6240
    assert b.held_output("responses.compact", None) == 3000  # field by field
    assert b.held_output("images.generations", None) == 100
    doc["workspaces"]["a"]["passthrough"] = {"output_ceiling": {"responses.compact": -1}}
    with pytest.raises(PolicyError) as info:
        parse_policy(doc)
    assert "workspaces.a.passthrough.output_ceiling.responses.compact" in str(info.value)


def test_unpriced_model_is_refused_unless_allowed() -> None:
    refusal = DEFAULT.unpriced_model("responses.compact", "gpt-9")
    assert refusal is not None
    assert (refusal.status, refusal.code, refusal.param) == (
        403,
        "unpriced_model_not_allowed",
        "model",
    )
    allowed, _ = _parse({"allow_unpriced": True})
    assert allowed.unpriced_model("responses.compact", "gpt-9") is None


def _compact(**fields: Any) -> PassthroughSeen:
    return PassthroughSeen(
        "rid", 1, classify("POST", "/v1/responses/compact"), request_model="gpt-5-mini", **fields
    )


def test_a_refused_call_is_recorded_rejected_at_no_cost() -> None:
    err = OpenAIError(429, "no room", "insufficient_quota", None, "insufficient_quota")
    record = settle_passthrough(_compact(rejected=err, status=429, counted_input_tokens=40), PRICES)
    assert (record.outcome, record.error_code, record.cost_nanos, record.price_family) == (
        "rejected",
        "insufficient_quota",
        0,
        "free",
    )
    assert (record.status, record.counted_input_tokens) == (429, 40)


def test_a_held_call_without_usage_bills_its_counted_input_as_an_estimate() -> None:
    floor = PRICES.charge("gpt-5-mini", Usage(input_tokens=500)).nanos
    cut = settle_passthrough(_compact(held=True, counted_input_tokens=500), PRICES)
    assert (cut.outcome, cut.estimated, cut.cost_nanos) == ("client_gone", True, floor)
    bare = settle_passthrough(
        _compact(held=True, counted_input_tokens=500, status=200, response_body=b"{}"), PRICES
    )
    assert (bare.outcome, bare.estimated, bare.cost_nanos) == ("missing_usage", True, floor)
    # Never held (no governed caller): nothing says the provider ran it.
    free = settle_passthrough(_compact(counted_input_tokens=500), PRICES)
    assert (free.cost_nanos, free.price_family) == (0, "free")
    # The provider refused: no charge, whatever was held.
    failed = settle_passthrough(
        _compact(held=True, counted_input_tokens=500, status=400, response_body=b"{}"), PRICES
    )
    assert (failed.cost_nanos, failed.outcome) == (0, "upstream_error")


def test_the_orphan_of_a_hold_is_its_estimate() -> None:
    seen = _compact(held=True, counted_input_tokens=321, status=200, response_body=b"{}")
    record = orphaned_passthrough(seen, PRICES)
    expected = PRICES.charge("gpt-5-mini", Usage(input_tokens=321)).nanos
    assert (record.outcome, record.estimated, record.cost_nanos) == ("orphaned", True, expected)
    assert seen.status == 200  # the live call's own view is untouched


def test_a_streamed_image_generation_is_billed_from_its_final_event() -> None:
    usage = {"input_tokens": 12, "output_tokens": 4160, "total_tokens": 4172}
    events = [
        {"type": "image_generation.partial_image", "b64_json": "AAAA", "partial_image_index": 0},
        {"type": "image_generation.completed", "b64_json": "BBBB", "usage": usage},
    ]
    body = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()
    seen = PassthroughSeen(
        "rid",
        1,
        classify("POST", "/v1/images/generations"),
        status=200,
        request_model="gpt-5-mini",  # a priced stand-in: the bundled table has no image row
        response_body=body,
        held=True,
        counted_input_tokens=12,
    )
    record = settle_passthrough(seen, PRICES)
    expected = PRICES.charge("gpt-5-mini", Usage(input_tokens=12, output_tokens=4160)).nanos
    assert (record.cost_nanos, record.estimated, record.output_tokens) == (expected, False, 4160)
