"""Unit tests for the sidecar's hardening against hostile input (issue 8, items 5 and 6).

Pure functions only: header encoding, parameter bounds, reservations for `n` / `best_of`,
text that protobuf and Redis refuse. The end-to-end proofs are in test_e2e_resilience.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from extproc.dataplane.envoy_msgs import MAX_HEADER_VALUE, header_mutation, header_value
from extproc.governance.budget import per_choice_cap, plan_request
from extproc.governance.keys import Identity
from extproc.governance.policy import parse_policy_text
from extproc.metering.decisions import Observed, settle, utf8_text
from extproc.metering.prices import PriceTable
from extproc.v1.ledger_pb2 import UsageRecord
from extproc.wire.endpoints import ENDPOINTS, INT32_MAX, RequestFacts
from extproc.wire.errors import OpenAIError
from extproc.wire.spec import RESPONSES as RESPONSES_SPEC
from extproc.wire.usage import Usage

CHAT = ENDPOINTS["/v1/chat/completions"]
COMPLETIONS = ENDPOINTS["/v1/completions"]
RESPONSES = ENDPOINTS["/v1/responses"]
PRICES = PriceTable.load()


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **extra}


# --- headers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        ("gpt-5-mini", b"gpt-5-mini"),
        ("\uff47\uff50\uff54-5-mini", b"%EF%BD%87%EF%BD%90%EF%BD%94-5-mini"),
        ("café", b"caf%C3%A9"),
        ("a\r\nx-injected: 1", b"a%0D%0Ax-injected: 1"),
        ("tab\there", b"tab%09here"),
        ("\ud800", b"%ED%A0%80"),
        ("100%\u00e9", b"100%25%C3%A9"),
    ],
)
def test_header_values_are_always_visible_ascii(value: str, wire: bytes) -> None:
    assert header_value(value) == wire
    assert all(0x20 <= b < 0x7F for b in wire)


def test_long_echoed_values_are_cut() -> None:
    out = header_value("m" * 100_000)
    assert len(out) == MAX_HEADER_VALUE + 3
    mutation = header_mutation({"x-extproc-model-requested": "\uff4d" * 5000})
    assert len(mutation.set_headers[0].header.raw_value) <= (MAX_HEADER_VALUE + 3) * 9


# --- parameter bounds -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "body", "param", "code"),
    [
        (CHAT, chat(max_tokens=INT32_MAX + 1), "max_tokens", "integer_above_max_value"),
        (
            CHAT,
            chat(max_completion_tokens=2**70),
            "max_completion_tokens",
            "integer_above_max_value",
        ),
        (CHAT, chat(n=0), "n", "integer_below_min_value"),
        (CHAT, chat(n=129), "n", "integer_above_max_value"),
        (CHAT, chat(n=2.5), "n", "invalid_type"),
        (CHAT, chat(stream=True, stream_options="yes"), "stream_options", "invalid_type"),
        (CHAT, chat(stream_options=[]), "stream_options", "invalid_type"),
        (
            COMPLETIONS,
            {"model": "gpt-3.5-turbo-instruct", "prompt": "x", "best_of": 10**9},
            "best_of",
            "integer_above_max_value",
        ),
        (
            COMPLETIONS,
            {"model": "gpt-3.5-turbo-instruct", "prompt": "x", "stream_options": 1},
            "stream_options",
            "invalid_type",
        ),
        (
            RESPONSES,
            {"model": "gpt-5", "input": "x", "max_output_tokens": 2**31},
            "max_output_tokens",
            "integer_above_max_value",
        ),
    ],
)
def test_out_of_range_numbers_are_400_naming_the_param(
    endpoint: Any, body: dict[str, Any], param: str, code: str
) -> None:
    with pytest.raises(OpenAIError) as info:
        endpoint.facts(body)
    assert info.value.status == 400
    assert info.value.param == param
    assert info.value.code == code


def test_int32_max_is_still_accepted() -> None:
    assert CHAT.facts(chat(max_tokens=INT32_MAX)).output_cap == INT32_MAX


def test_choices_come_from_n_and_best_of() -> None:
    assert CHAT.facts(chat()).choices == 1
    assert CHAT.facts(chat(n=50)).choices == 50
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "x", "n": 2, "best_of": 5}
    assert COMPLETIONS.facts(body).choices == 5
    assert RESPONSES.facts({"model": "gpt-5", "input": "x"}).choices == 1


# --- reservations cover every output ----------------------------------------------------

POLICY = parse_policy_text(
    """
version: 1
defaults:
  default_output_cap: 1000
workspaces:
  loose:
    budget_usd: 10
    upstream: {key_env: TEST_UPSTREAM}
    services: {cli: {}}
  strict:
    budget_usd: 10
    enforce_output_cap: true
    upstream: {key_env: TEST_UPSTREAM}
    services: {cli: {}}
""",
    "inline",
)


def reserve(workspace: str, output_cap: int | None, choices: int) -> int:
    plan = plan_request(
        POLICY,
        Identity(
            key_id="k1", workspace=workspace, team=None, service="cli", owner=None, expires_ms=0
        ),
        model="gpt-4o-mini",
        counted_input=100,
        output_cap=output_cap,
        prices=PRICES,
        now_ms=1_700_000_000_000,
        choices=choices,
    )
    return plan.reserve_nanos


def charge(input_tokens: int, output_tokens: int) -> int:
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    return PRICES.charge("gpt-4o-mini", usage).nanos


def test_reservation_multiplies_the_output_cap_by_choices() -> None:
    assert reserve("loose", 200, 1) == charge(100, 200)
    assert reserve("loose", 200, 50) == charge(100, 200 * 50)
    # Without a cap the default is a guess per output...
    assert reserve("loose", None, 4) == charge(100, 4000)
    # ...unless the workspace enforces it: then it bounds the whole request.
    assert reserve("strict", None, 4) == charge(100, 1000)
    assert reserve("strict", None, 3) == charge(100, 999)


@pytest.mark.parametrize(("total", "choices", "each"), [(1000, 1, 1000), (1000, 3, 333), (5, 9, 1)])
def test_per_choice_cap_keeps_the_total_within_the_cap(total: int, choices: int, each: int) -> None:
    assert per_choice_cap(total, choices) == each
    assert each * choices <= total or each == 1


# --- text protobuf and Redis refuse --------------------------------------------------------


def test_utf8_text_replaces_lone_surrogates() -> None:
    assert utf8_text("gpt-5") == "gpt-5"
    assert utf8_text("\uff47\uff50\uff54") == "\uff47\uff50\uff54"
    assert utf8_text("a\ud800b") == "a\ufffdb"


def test_a_record_settles_whatever_the_model_name() -> None:
    facts = RequestFacts("gpt\udfff-5", False, 2**31 - 1, None, None, None, False)
    seen = Observed(request_id="r1", spec=RESPONSES_SPEC, facts=facts, session_id="pck:\ud800")
    seen.status, seen.response_finished = 200, True
    seen.usage = Usage(input_tokens=3, output_tokens=4)
    record = settle(seen, PRICES, lambda text, model: 0)
    again = UsageRecord.FromString(record.SerializeToString())
    assert again.model_requested == "gpt\ufffd-5"
    assert again.session_id == "pck:\ufffd"
    assert again.output_cap == 2**31 - 1


def test_a_number_beyond_a_double_is_400_naming_the_param_when_rewritten() -> None:
    from extproc.wire.bodies import encode_json, parse_json_object

    body = parse_json_object(b'{"model": "gpt-4o-mini", "messages": [], "temperature": 1e999}')
    with pytest.raises(OpenAIError) as info:
        encode_json(body)
    assert (info.value.status, info.value.param) == (400, "temperature")
    assert info.value.code == "number_out_of_range"


def test_every_integer_field_of_the_ledger_is_64_bit() -> None:
    from google.protobuf.descriptor import FieldDescriptor

    from extproc.v1.ledger_pb2 import ScopeCharge, Settlement

    narrow = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_SINT32}
    for message in (UsageRecord, ScopeCharge, Settlement):
        fields = message.DESCRIPTOR.fields
        assert not [f.name for f in fields if f.type in narrow], message.DESCRIPTOR.name
    record = UsageRecord(output_cap=2**31, status=2**40)
    assert UsageRecord.FromString(record.SerializeToString()).output_cap == 2**31
