from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import pytest

from extproc.metering.tokens import count_text
from extproc.wire.endpoints import (
    ENDPOINTS,
    Endpoint,
    RequestFacts,
    StreamOutcome,
    count_input_tokens,
)
from extproc.wire.errors import OpenAIError
from extproc.wire.paths import Kind, classify
from extproc.wire.spec import METERED
from extproc.wire.usage import Usage

RESPONSES = ENDPOINTS["/v1/responses"]
CHAT = ENDPOINTS["/v1/chat/completions"]
COMPLETIONS = ENDPOINTS["/v1/completions"]
EMBEDDINGS = ENDPOINTS["/v1/embeddings"]

SHELL_ARGS = json.dumps(
    {"command": ["bash", "-lc", "pytest -q tests/test_io.py"], "workdir": "/repo"}
)
SHELL_OUT = json.dumps({"output": "1 failed, 12 passed", "metadata": {"exit_code": 1}})
PATCH = "*** Begin Patch\n*** Update File: src/io.py\n@@\n-    return None\n+    return 0\n"
SHELL_TOOL = {
    "type": "function",
    "name": "shell",
    "description": "Runs a shell command and returns its output.",
    "strict": False,
    "parameters": {
        "type": "object",
        "properties": {
            "command": {"type": "array", "items": {"type": "string"}},
            "workdir": {"type": "string"},
        },
        "required": ["command"],
        "additionalProperties": False,
    },
}
PATCH_TOOL = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Edit files with a patch.",
    "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch hunk+"},
}


def codex_body() -> dict[str, Any]:
    return {
        "model": "gpt-5-codex",
        "instructions": "You are Codex, a coding agent running in a terminal.",
        "input": [
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "<environment_context>cwd=/repo"}],
            },
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Fix the failing test."}],
            },
            {
                "type": "reasoning",
                "id": "rs_0a1",
                "summary": [{"type": "summary_text", "text": "**Running the tests**"}],
                "content": None,
                "encrypted_content": "gAAAAABo" + "Q" * 400,
            },
            {
                "type": "function_call",
                "id": "fc_0a2",
                "name": "shell",
                "arguments": SHELL_ARGS,
                "call_id": "call_A1",
            },
            {"type": "function_call_output", "call_id": "call_A1", "output": SHELL_OUT},
            {
                "type": "custom_tool_call",
                "id": "ctc_0a3",
                "status": "completed",
                "call_id": "call_A2",
                "name": "apply_patch",
                "input": PATCH,
            },
            {"type": "custom_tool_call_output", "call_id": "call_A2", "output": "Done!"},
            {
                "type": "message",
                "role": "assistant",
                "id": "msg_0a4",
                "content": [{"type": "output_text", "text": "Fixed.", "annotations": []}],
            },
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Thanks, what about this?"},
                    {
                        "type": "input_image",
                        "image_url": "data:image/png;base64,iVBOR",
                        "detail": "auto",
                    },
                ],
            },
        ],
        "tools": [SHELL_TOOL, PATCH_TOOL],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "high", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199c5a0-7d3e-7a61-9a52-3f0e2c1b4d5a",
        "max_output_tokens": 4096,
    }


def compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
ANSWER_SCHEMA = {
    "name": "answer",
    "strict": True,
    "schema": {"type": "object", "properties": {"text": {"type": "string"}}},
}


def chat_body() -> dict[str, Any]:
    return {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {
                "role": "user",
                "name": "alice",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://x.test/a.png", "detail": "high"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18°C, cloudy"},
        ],
        "tools": [WEATHER_TOOL],
        "response_format": {"type": "json_schema", "json_schema": ANSWER_SCHEMA},
        "stream": True,
        "max_completion_tokens": 500,
        "reasoning_effort": "low",
        "prompt_cache_key": "k1",
    }


# --- routing ------------------------------------------------------------------------


def test_endpoint_table() -> None:
    assert {s.name for s in METERED} == {
        "responses",
        "chat.completions",
        "completions",
        "embeddings",
    }
    assert {s.path: s.reader for s in METERED} == ENDPOINTS


@pytest.mark.parametrize(
    ("method", "path", "name"),
    [
        ("POST", "/v1/responses", "responses"),
        ("POST", "/v1/responses?stream=true&x=1", "responses"),
        ("POST", "/v1/chat/completions", "chat.completions"),
        ("POST", "/v1/completions?", "completions"),
        ("POST", "/v1/embeddings", "embeddings"),
        ("GET", "/v1/responses", None),
        ("post", "/v1/responses", None),
        ("POST", "/v1/responses/resp_1", None),
        ("POST", "/v1/responses/", "responses"),  # the same resource, canonically
        ("POST", "/v1/models", None),
    ],
)
def test_metered_paths(method: str, path: str, name: str | None) -> None:
    target = classify(method, path)
    assert (target.name if target.kind is Kind.METERED else None) == name


# --- facts and validation -----------------------------------------------------------


def test_responses_facts() -> None:
    assert RESPONSES.facts(codex_body()) == RequestFacts(
        model="gpt-5-codex",
        stream=True,
        output_cap=4096,
        prompt_cache_key="0199c5a0-7d3e-7a61-9a52-3f0e2c1b4d5a",
        previous_response_id=None,
        reasoning_effort="high",
        has_tools=True,
    )
    minimal = RESPONSES.facts({"model": "o3", "input": "hi", "previous_response_id": "resp_9"})
    assert minimal == RequestFacts("o3", False, None, None, "resp_9", None, False)


def test_chat_facts() -> None:
    assert CHAT.facts(chat_body()) == RequestFacts("gpt-4o", True, 500, "k1", None, "low", True)
    legacy = {"model": "gpt-3.5-turbo", "messages": [], "max_tokens": 20, "functions": [{}]}
    assert CHAT.facts(legacy) == RequestFacts("gpt-3.5-turbo", False, 20, None, None, None, True)


def test_completions_and_embeddings_facts() -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi", "max_tokens": 7, "stream": True}
    assert COMPLETIONS.facts(body) == RequestFacts(
        "gpt-3.5-turbo-instruct", True, 7, None, None, None, False
    )
    emb = {"model": "text-embedding-3-small", "input": ["a", "b"]}
    assert EMBEDDINGS.facts(emb) == RequestFacts(
        "text-embedding-3-small", False, None, None, None, None, False
    )


def _rejects(endpoint: Endpoint, body: dict[str, Any]) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        endpoint.facts(body)
    err = info.value
    assert (err.status, err.type) == (400, "invalid_request_error")
    return err


@pytest.mark.parametrize("endpoint", list(ENDPOINTS.values()), ids=lambda e: type(e).__name__)
@pytest.mark.parametrize(
    ("model", "code"),
    [(None, "missing_required_parameter"), (4, "invalid_type"), ("", "invalid_value")],
)
def test_model_is_required_string(endpoint: Endpoint, model: Any, code: str) -> None:
    body = {"model": model, "input": "x", "messages": [], "prompt": "x"}
    if model is None:
        del body["model"]
    err = _rejects(endpoint, body)
    assert (err.param, err.code) == ("model", code)


def test_missing_model_message_is_openai_style() -> None:
    err = _rejects(RESPONSES, {"input": "x"})
    assert err.message == "Missing required parameter: 'model'."
    err = _rejects(RESPONSES, {"model": ["gpt-5"], "input": "x"})
    assert err.message == "Invalid type for 'model': expected a string, but got an array instead."


@pytest.mark.parametrize(
    ("endpoint", "extra", "param", "code"),
    [
        (RESPONSES, {"stream": "true"}, "stream", "invalid_type"),
        (RESPONSES, {"max_output_tokens": -1}, "max_output_tokens", "integer_below_min_value"),
        (RESPONSES, {"max_output_tokens": 10.0}, "max_output_tokens", "invalid_type"),
        (RESPONSES, {"max_output_tokens": True}, "max_output_tokens", "invalid_type"),
        (RESPONSES, {"input": 5}, "input", "invalid_type"),
        (RESPONSES, {"input": {"role": "user"}}, "input", "invalid_type"),
        (RESPONSES, {"reasoning": "high"}, "reasoning", "invalid_type"),
        (RESPONSES, {"reasoning": {"effort": 3}}, "reasoning.effort", "invalid_type"),
        (RESPONSES, {"prompt_cache_key": 12}, "prompt_cache_key", "invalid_type"),
        (RESPONSES, {"previous_response_id": {}}, "previous_response_id", "invalid_type"),
        (RESPONSES, {"tools": {"type": "function"}}, "tools", "invalid_type"),
        (CHAT, {"stream": 1}, "stream", "invalid_type"),
        (CHAT, {"max_completion_tokens": "9"}, "max_completion_tokens", "invalid_type"),
        (CHAT, {"max_tokens": -5}, "max_tokens", "integer_below_min_value"),
        (CHAT, {"messages": None}, "messages", "missing_required_parameter"),
        (CHAT, {"messages": "hello"}, "messages", "invalid_type"),
        (CHAT, {"reasoning_effort": ["low"]}, "reasoning_effort", "invalid_type"),
        (COMPLETIONS, {"prompt": {"text": "x"}}, "prompt", "invalid_type"),
        (COMPLETIONS, {"prompt": [1.5]}, "prompt", "invalid_type"),
        (COMPLETIONS, {"max_tokens": 2.5}, "max_tokens", "invalid_type"),
        (EMBEDDINGS, {"input": None}, "input", "missing_required_parameter"),
        (EMBEDDINGS, {"input": 42}, "input", "invalid_type"),
        (EMBEDDINGS, {"input": [{"text": "x"}]}, "input", "invalid_type"),
    ],
)
def test_validation_errors_name_the_parameter(
    endpoint: Endpoint, extra: dict[str, Any], param: str, code: str
) -> None:
    body = {"model": "m", "messages": [], "input": "x", **extra}
    err = _rejects(endpoint, body)
    assert (err.param, err.code) == (param, code)


def test_zero_output_cap_is_allowed() -> None:
    assert RESPONSES.facts({"model": "m", "max_output_tokens": 0}).output_cap == 0


# --- input text ---------------------------------------------------------------------


def test_responses_input_texts_on_a_codex_body() -> None:
    assert list(RESPONSES.input_texts(codex_body())) == [
        "You are Codex, a coding agent running in a terminal.",
        "developer",
        "<environment_context>cwd=/repo",
        "user",
        "Fix the failing test.",
        "**Running the tests**",
        "shell",
        SHELL_ARGS,
        SHELL_OUT,
        "apply_patch",
        PATCH,
        "Done!",
        "assistant",
        "Fixed.",
        "user",
        "Thanks, what about this?",
        compact(SHELL_TOOL),
        compact(PATCH_TOOL),
    ]


def test_responses_string_input_and_schema() -> None:
    fmt = {"type": "json_schema", "name": "a", "schema": {"type": "object"}}
    body = {"model": "m", "input": "Hello", "text": {"format": fmt}}
    assert list(RESPONSES.input_texts(body)) == ["Hello", compact(fmt)]
    assert RESPONSES.input_overhead(body) == 3 + 4


def test_responses_overhead_counts_items() -> None:
    body = codex_body()
    assert RESPONSES.input_overhead(body) == 3 + 4 + 3 * len(body["input"])


def test_responses_function_call_output_as_content_parts() -> None:
    body = {
        "model": "m",
        "input": [
            {
                "type": "function_call_output",
                "call_id": "c",
                "output": [
                    {"type": "input_text", "text": "stdout"},
                    {"type": "input_file", "file_data": "JVBERi0", "filename": "r.pdf"},
                ],
            },
            {"type": "item_reference", "id": "msg_1"},
        ],
    }
    assert list(RESPONSES.input_texts(body)) == ["stdout", "r.pdf"]


def test_chat_input_texts_with_parts_tools_and_names() -> None:
    assert list(CHAT.input_texts(chat_body())) == [
        "system",
        "You are helpful.",
        "user",
        "alice",
        "What is in this image?",
        "assistant",
        "get_weather",
        '{"city":"Paris"}',
        "tool",
        "18°C, cloudy",
        compact(WEATHER_TOOL),
        compact(ANSWER_SCHEMA),
    ]
    assert CHAT.input_overhead(chat_body()) == 4 * 3 + 1 + 3


def test_chat_token_count_matches_openai_accounting() -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]}
    total = count_input_tokens(CHAT, body, lambda text: count_text(text, "gpt-4o"))
    assert total == 8  # what the API reports as prompt_tokens for this request


def test_completions_texts_and_token_arrays() -> None:
    body = {"model": "m", "prompt": ["Say this is a test", "Another"], "suffix": "end"}
    assert list(COMPLETIONS.input_texts(body)) == ["Say this is a test", "Another", "end"]
    assert COMPLETIONS.input_overhead(body) == 0
    tokens = {"model": "m", "prompt": [[1, 2, 3], [4, 5]]}
    assert list(COMPLETIONS.input_texts(tokens)) == []
    assert COMPLETIONS.input_overhead(tokens) == 5
    assert COMPLETIONS.input_overhead({"model": "m", "prompt": [9, 8, 7, 6]}) == 4


def test_embeddings_texts_and_token_arrays() -> None:
    body = {"model": "m", "input": ["first doc", "", "second doc"]}
    assert list(EMBEDDINGS.input_texts(body)) == ["first doc", "second doc"]
    assert EMBEDDINGS.input_overhead(body) == 0
    assert list(EMBEDDINGS.input_texts({"model": "m", "input": "one"})) == ["one"]
    assert EMBEDDINGS.input_overhead({"model": "m", "input": [[1, 2], [3]]}) == 3


def test_count_input_tokens_adds_overhead() -> None:
    body = codex_body()
    texts = list(RESPONSES.input_texts(body))
    assert count_input_tokens(RESPONSES, body, len) == sum(map(len, texts)) + 34


def test_input_texts_tolerate_odd_shapes() -> None:
    odd = {"model": "m", "input": [None, 3, "loose", {"type": "message", "content": 5}]}
    assert list(RESPONSES.input_texts(odd)) == ["loose"]
    assert list(CHAT.input_texts({"model": "m", "messages": [None, {"content": [None]}]})) == []


def test_deeply_nested_input_does_not_recurse() -> None:
    nested: Any = "deep"
    for _ in range(5000):
        nested = [nested]
    assert list(RESPONSES.input_texts({"model": "m", "input": [nested]})) == ["deep"]


# --- prepare_upstream ---------------------------------------------------------------


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS], ids=lambda e: type(e).__name__)
def test_streaming_choices_requests_get_include_usage(endpoint: Endpoint) -> None:
    body = {"model": "m", "messages": [], "prompt": "x", "stream": True}
    assert endpoint.prepare_upstream(body, endpoint.facts(body))
    assert body["stream_options"] == {"include_usage": True}

    body = {
        "model": "m",
        "messages": [],
        "stream": True,
        "stream_options": {"include_obfuscation": False},
    }
    assert endpoint.prepare_upstream(body, endpoint.facts(body))
    assert body["stream_options"] == {"include_obfuscation": False, "include_usage": True}

    body = {
        "model": "m",
        "messages": [],
        "stream": True,
        "stream_options": {"include_usage": False},
    }
    assert endpoint.prepare_upstream(body, endpoint.facts(body))
    assert body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        (
            CHAT,
            {
                "model": "m",
                "messages": [],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ),
        (CHAT, {"model": "m", "messages": []}),
        (COMPLETIONS, {"model": "m", "prompt": "x", "stream": False}),
        (RESPONSES, {"model": "m", "input": "x", "stream": True}),
        (EMBEDDINGS, {"model": "m", "input": "x"}),
    ],
)
def test_prepare_upstream_leaves_other_bodies_alone(
    endpoint: Endpoint, body: dict[str, Any]
) -> None:
    before = copy.deepcopy(body)
    assert not endpoint.prepare_upstream(body, endpoint.facts(body))
    assert body == before


# --- usage from JSON ----------------------------------------------------------------

CHAT_COMPLETION = {
    "id": "chatcmpl-Bx1",
    "object": "chat.completion",
    "created": 1754000000,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Paris.",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 1450,
        "completion_tokens": 230,
        "total_tokens": 1680,
        "prompt_tokens_details": {"cached_tokens": 1280, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 64,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_07871e2ad8",
}
RESPONSE = {
    "id": "resp_68a1",
    "object": "response",
    "created_at": 1754000000,
    "status": "completed",
    "error": None,
    "incomplete_details": None,
    "instructions": None,
    "max_output_tokens": None,
    "model": "gpt-5-codex-2025-09-15",
    "output": [
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Done.", "annotations": []}],
        },
    ],
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "reasoning": {"effort": "medium", "summary": None},
    "store": True,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "usage": {
        "input_tokens": 9120,
        "input_tokens_details": {"cached_tokens": 8960},
        "output_tokens": 712,
        "output_tokens_details": {"reasoning_tokens": 640},
        "total_tokens": 9832,
    },
    "user": None,
    "metadata": {},
}
TEXT_COMPLETION = {
    "id": "cmpl-7",
    "object": "text_completion",
    "created": 1754000000,
    "model": "gpt-3.5-turbo-instruct",
    "choices": [
        {"text": "\n\nThis is a test.", "index": 0, "logprobs": None, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}
EMBEDDING = {
    "object": "list",
    "data": [{"object": "embedding", "embedding": [0.0023, -0.0093], "index": 0}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_usage_from_real_shaped_responses() -> None:
    assert CHAT.usage_from_json(_json(CHAT_COMPLETION)) == (
        Usage(1450, 1280, 230, 64, service_tier="default"),
        "gpt-4o-2024-08-06",
    )
    assert RESPONSES.usage_from_json(_json(RESPONSE)) == (
        Usage(9120, 8960, 712, 640),
        "gpt-5-codex-2025-09-15",
    )
    assert COMPLETIONS.usage_from_json(_json(TEXT_COMPLETION)) == (
        Usage(5, 0, 7, 0),
        "gpt-3.5-turbo-instruct",
    )
    assert EMBEDDINGS.usage_from_json(_json(EMBEDDING)) == (
        Usage(8, 0, 0, 0),
        "text-embedding-3-small",
    )


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (None, None),
        ("lots", None),
        ({}, None),
        ({"prompt_tokens": "10", "completion_tokens": None}, None),
        ({"prompt_tokens": True, "completion_tokens": 3}, Usage(0, 0, 3, 0)),
        ({"prompt_tokens": 10, "completion_tokens": -2}, Usage(10, 0, 0, 0)),
        ({"prompt_tokens": 10.0, "completion_tokens": 4}, Usage(0, 0, 4, 0)),
        (
            {
                "prompt_tokens": 10,
                "completion_tokens": 4,
                "prompt_tokens_details": {"cached_tokens": 99},
                "completion_tokens_details": {"reasoning_tokens": 9},
            },
            Usage(10, 10, 4, 4),
        ),
        (
            {
                "prompt_tokens": 10,
                "completion_tokens": 4,
                "prompt_tokens_details": None,
                "completion_tokens_details": [1],
            },
            Usage(10, 0, 4, 0),
        ),
    ],
)
def test_malformed_usage_never_raises(usage: Any, expected: Usage | None) -> None:
    body = dict(CHAT_COMPLETION, usage=usage)
    if expected is not None:  # the answer's service tier goes with any usage it reports
        expected = dataclasses.replace(expected, service_tier="default")
    assert CHAT.usage_from_json(_json(body)) == (expected, "gpt-4o-2024-08-06")


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[1, 2]", b'{"model": 5}', b"\xff\xfe", b"[" * 50_000, b'{"usage": 1}'],
)
@pytest.mark.parametrize("endpoint", list(ENDPOINTS.values()), ids=lambda e: type(e).__name__)
def test_usage_from_garbage_is_none(endpoint: Endpoint, body: bytes) -> None:
    assert endpoint.usage_from_json(body) == (None, None)


def test_error_body_has_no_usage() -> None:
    err = {
        "error": {"message": "Rate limit", "type": "rate_limit_error", "param": None, "code": None}
    }
    assert RESPONSES.usage_from_json(_json(err)) == (None, None)


# --- streams ------------------------------------------------------------------------


def _data(obj: Any) -> bytes:
    text = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def _chunk(choices: list[Any], usage: Any = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-Cx9",
        "object": "chat.completion.chunk",
        "created": 1754000000,
        "model": "gpt-4o-mini-2024-07-18",
        "service_tier": "default",
        "system_fingerprint": "fp_560af6e559",
        "choices": choices,
        "usage": usage,
        **extra,
    }


def _delta(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


CHAT_USAGE = {
    "prompt_tokens": 31,
    "completion_tokens": 12,
    "total_tokens": 43,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}
CHAT_EVENTS = [
    _data(_chunk([_delta({"role": "assistant", "content": "", "refusal": None})])),
    _data(_chunk([_delta({"content": "Bonjour"})])),
    _data(_chunk([_delta({"content": " à tous 👋"})])),
    _data(
        _chunk(
            [
                _delta(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_9",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": ""},
                            }
                        ]
                    }
                )
            ]
        )
    ),
    _data(_chunk([_delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]})])),
    _data(_chunk([_delta({"tool_calls": [{"index": 0, "function": {"arguments": '"Nice"}'}}]})])),
    _data(_chunk([_delta({}, "tool_calls")])),
]
USAGE_EVENT = _data(_chunk([], CHAT_USAGE))
DONE = b"data: [DONE]\n\n"
CHAT_TEXT = 'Bonjour à tous 👋get_weather{"city":"Nice"}'


def _run(meter: Any, chunks: list[bytes]) -> tuple[bytes, StreamOutcome]:
    out = b"".join(meter.feed(chunk) for chunk in chunks)
    return out, meter.finish()


def test_chat_stream_with_usage_chunk() -> None:
    stream = b"".join([*CHAT_EVENTS, USAGE_EVENT, DONE])
    out, outcome = _run(CHAT.stream_meter(strip_usage_chunk=False), [stream])
    assert out == stream
    assert outcome == StreamOutcome(
        usage=Usage(31, 0, 12, 0, service_tier="default"),
        served_model="gpt-4o-mini-2024-07-18",
        output_text=CHAT_TEXT,
        terminal="completed",
        error=None,
    )


def test_chat_stream_without_usage_chunk() -> None:
    stream = b"".join([*CHAT_EVENTS, DONE])
    meter = CHAT.stream_meter(strip_usage_chunk=False)
    assert meter.feed(stream) is stream
    outcome = meter.finish()
    assert outcome.usage is None
    assert outcome.output_text == CHAT_TEXT
    assert outcome.terminal == "completed"


def test_forwarded_chunks_are_the_same_objects_when_unchanged() -> None:
    for strip in (False, True):
        meter = CHAT.stream_meter(strip_usage_chunk=strip)
        for event in CHAT_EVENTS:
            assert meter.feed(event) is event


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_strip_usage_chunk_removes_exactly_that_event_at_any_split(newline: bytes) -> None:
    events = [e.replace(b"\n", newline) for e in [*CHAT_EVENTS[:2], USAGE_EVENT, DONE]]
    stream = b"".join(events)
    expected = stream.replace(events[2], b"")
    for cut in range(len(stream) + 1):
        out, outcome = _run(CHAT.stream_meter(strip_usage_chunk=True), [stream[:cut], stream[cut:]])
        assert out == expected, cut
        assert outcome.usage == Usage(31, 0, 12, 0, service_tier="default")
    bytewise = [stream[i : i + 1] for i in range(len(stream))]
    out, _ = _run(CHAT.stream_meter(strip_usage_chunk=True), bytewise)
    assert out == expected


def test_strip_never_delays_complete_events() -> None:
    stream = b"".join([*CHAT_EVENTS, USAGE_EVENT, DONE])
    forwarded = b""
    for size in (5, 97, 300, 1000, 4096):
        forwarded = b""
        meter = CHAT.stream_meter(strip_usage_chunk=True)
        for i in range(0, len(stream), size):
            forwarded += meter.feed(stream[i : i + size])
            seen = stream[: i + size]
            complete = seen[: seen.rfind(b"\n\n") + 2] if b"\n\n" in seen else b""
            assert forwarded == complete.replace(USAGE_EVENT, b"")
    assert forwarded == stream.replace(USAGE_EVENT, b"")


def test_strip_keeps_usage_on_a_content_chunk() -> None:
    mixed = _data(_chunk([_delta({"content": "x"}, "stop")], CHAT_USAGE))
    meter = CHAT.stream_meter(strip_usage_chunk=True)
    assert meter.feed(mixed + DONE) == mixed + DONE
    assert meter.finish().usage == Usage(31, 0, 12, 0, service_tier="default")


def test_last_chunk_releases_held_bytes() -> None:
    meter = CHAT.stream_meter(strip_usage_chunk=True)
    assert meter.feed(CHAT_EVENTS[1] + b'data: {"cut') == CHAT_EVENTS[1]
    assert meter.feed(b" off", last=True) == b'data: {"cut off'
    assert meter.finish().terminal is None


def test_chat_stream_error_event() -> None:
    error = {"error": {"message": "The server had an error", "type": "server_error", "code": None}}
    stream = b"".join([*CHAT_EVENTS[:2], _data(error)])
    _, outcome = _run(CHAT.stream_meter(strip_usage_chunk=False), [stream])
    assert outcome.terminal == "error"
    assert outcome.error == OpenAIError(500, "The server had an error", "server_error")
    assert outcome.output_text == "Bonjour"


def test_chat_stream_cut_or_unfinished() -> None:
    _, cut = _run(CHAT.stream_meter(strip_usage_chunk=False), [b"".join(CHAT_EVENTS[:3])])
    assert (cut.terminal, cut.usage, cut.output_text) == (None, None, "Bonjour à tous 👋")
    _, unfinished = _run(CHAT.stream_meter(strip_usage_chunk=False), [CHAT_EVENTS[1], DONE])
    assert unfinished.terminal == "incomplete"


def test_chat_stream_tolerates_garbage_events() -> None:
    stream = b'data: {not json\n\ndata: [1,2]\n\ndata: {"choices": 5, "usage": "x"}\n\n' + DONE
    _, outcome = _run(CHAT.stream_meter(strip_usage_chunk=True), [stream])
    assert outcome == StreamOutcome(None, None, "", "incomplete", None)


def test_completions_stream() -> None:
    def piece(text: str, finish: str | None = None) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return _data(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "model": "gpt-3.5-turbo-instruct",
                "choices": [choice],
            }
        )

    usage = _data(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "model": "gpt-3.5-turbo-instruct",
            "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3},
        }
    )
    stream = piece("This") + piece(" is") + piece(" a", "length") + usage + DONE
    out, outcome = _run(COMPLETIONS.stream_meter(strip_usage_chunk=True), [stream])
    assert out == stream.replace(usage, b"")
    assert outcome == StreamOutcome(
        Usage(5, 0, 3, 0), "gpt-3.5-turbo-instruct", "This is a", "completed", None
    )


def _ev(kind: str, **fields: Any) -> bytes:
    data = json.dumps({"type": kind, "sequence_number": 0, **fields}, ensure_ascii=False)
    return f"event: {kind}\ndata: {data}\n\n".encode()


def _response(status: str, usage: Any = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1754000000,
        "status": status,
        "model": "gpt-5-codex-2025-09-15",
        "output": [],
        "usage": usage,
        **extra,
    }


RESPONSE_USAGE = RESPONSE["usage"]
RESPONSE_EVENTS = [
    _ev("response.created", response=_response("in_progress")),
    _ev("response.in_progress", response=_response("in_progress")),
    _ev(
        "response.output_item.added",
        output_index=0,
        item={"id": "rs_1", "type": "reasoning", "summary": []},
    ),
    _ev(
        "response.reasoning_summary_text.delta",
        item_id="rs_1",
        output_index=0,
        summary_index=0,
        delta="**Plan**",
    ),
    _ev(
        "response.reasoning_summary_text.done",
        item_id="rs_1",
        output_index=0,
        summary_index=0,
        text="**Plan**",
    ),
    _ev(
        "response.output_item.added",
        output_index=1,
        item={
            "id": "fc_1",
            "type": "function_call",
            "name": "shell",
            "arguments": "",
            "call_id": "call_1",
        },
    ),
    _ev(
        "response.function_call_arguments.delta",
        item_id="fc_1",
        output_index=1,
        delta='{"command":',
    ),
    _ev("response.function_call_arguments.delta", item_id="fc_1", output_index=1, delta='["ls"]}'),
    _ev(
        "response.custom_tool_call_input.delta",
        item_id="ctc_1",
        output_index=2,
        delta="*** Begin Patch",
    ),
    _ev(
        "response.output_text.delta",
        item_id="msg_1",
        output_index=3,
        content_index=0,
        delta="Voilà ",
        logprobs=[],
    ),
    _ev("response.refusal.delta", item_id="msg_1", output_index=3, content_index=1, delta="no"),
    _ev(
        "response.output_text.done",
        item_id="msg_1",
        output_index=3,
        content_index=0,
        text="SHOULD NOT COUNT",
        logprobs=[],
    ),
]
RESPONSE_TEXT = '**Plan**{"command":["ls"]}*** Begin PatchVoilà no'


def test_responses_stream_completed() -> None:
    stream = b"".join(
        [
            *RESPONSE_EVENTS,
            _ev("response.completed", response=_response("completed", RESPONSE_USAGE)),
        ]
    )
    meter = RESPONSES.stream_meter(strip_usage_chunk=False)
    assert meter.feed(stream) is stream
    assert meter.finish() == StreamOutcome(
        usage=Usage(9120, 8960, 712, 640),
        served_model="gpt-5-codex-2025-09-15",
        output_text=RESPONSE_TEXT,
        terminal="completed",
        error=None,
    )


def test_responses_stream_at_every_split_point() -> None:
    stream = b"".join(
        [
            *RESPONSE_EVENTS,
            _ev("response.completed", response=_response("completed", RESPONSE_USAGE)),
        ]
    )
    expected = _run(RESPONSES.stream_meter(strip_usage_chunk=False), [stream])[1]
    for cut in range(0, len(stream) + 1, 3):
        out, outcome = _run(
            RESPONSES.stream_meter(strip_usage_chunk=False), [stream[:cut], stream[cut:]]
        )
        assert outcome == expected
        assert out == stream


def test_responses_stream_incomplete() -> None:
    terminal = _ev(
        "response.incomplete",
        response=_response(
            "incomplete",
            {"input_tokens": 50, "output_tokens": 16},
            incomplete_details={"reason": "max_output_tokens"},
        ),
    )
    _, outcome = _run(RESPONSES.stream_meter(strip_usage_chunk=False), [*RESPONSE_EVENTS, terminal])
    assert (outcome.terminal, outcome.usage, outcome.error) == (
        "incomplete",
        Usage(50, 0, 16, 0),
        None,
    )


def test_responses_stream_failed() -> None:
    failure = {"code": "server_error", "message": "The model failed to generate a response."}
    terminal = _ev("response.failed", response=_response("failed", None, error=failure))
    _, outcome = _run(
        RESPONSES.stream_meter(strip_usage_chunk=False), [*RESPONSE_EVENTS[:4], terminal]
    )
    assert outcome.terminal == "failed"
    assert outcome.usage is None
    assert outcome.output_text == "**Plan**"
    assert outcome.error == OpenAIError(
        500, failure["message"], "server_error", None, "server_error"
    )


def test_responses_stream_error_event() -> None:
    error = _ev("error", code="rate_limit_exceeded", message="Rate limit reached", param=None)
    _, outcome = _run(
        RESPONSES.stream_meter(strip_usage_chunk=False), [*RESPONSE_EVENTS[:2], error]
    )
    assert outcome.terminal == "error"
    assert outcome.served_model == "gpt-5-codex-2025-09-15"
    assert outcome.error == OpenAIError(
        429, "Rate limit reached", "rate_limit_error", None, "rate_limit_exceeded"
    )
    nested = _data(
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "bad",
                "param": "input",
                "code": None,
            },
        }
    )
    _, outcome = _run(RESPONSES.stream_meter(strip_usage_chunk=False), [nested])
    assert outcome.error == OpenAIError(400, "bad", "invalid_request_error", "input", None)


def test_responses_stream_cut_before_terminal() -> None:
    stream = b"".join(RESPONSE_EVENTS) + b'event: response.output_text.delta\ndata: {"type"'
    meter = RESPONSES.stream_meter(strip_usage_chunk=False)
    out, outcome = _run(meter, [stream[:500], stream[500:]])
    assert out == stream
    assert outcome == StreamOutcome(None, "gpt-5-codex-2025-09-15", RESPONSE_TEXT, None, None)


def test_responses_events_without_event_names() -> None:
    bare = [e.split(b"\n", 1)[1] for e in RESPONSE_EVENTS]
    terminal = _data(
        {"type": "response.completed", "response": _response("completed", RESPONSE_USAGE)}
    )
    _, outcome = _run(RESPONSES.stream_meter(strip_usage_chunk=False), [*bare, terminal])
    assert (outcome.output_text, outcome.terminal) == (RESPONSE_TEXT, "completed")


def test_embeddings_never_stream() -> None:
    meter = EMBEDDINGS.stream_meter(strip_usage_chunk=False)
    chunk = b"data: {}\n\n"
    assert meter.feed(chunk) is chunk
    assert meter.finish() == StreamOutcome(None, None, "", None, None)


def test_tools_sent_as_an_input_item_are_counted_like_top_level_tools() -> None:
    """Codex 0.171 sends its tool definitions to newer models as an `additional_tools`
    input item: counted as their JSON (schemas included), as top-level `tools` are."""
    tool = {"type": "function", "name": "exec", "parameters": {"type": "object",
            "properties": {"cmd": {"type": "string"}}}}  # fmt: skip
    as_item = {"model": "gpt-6.2-sol", "input": [
        {"type": "additional_tools", "role": "developer", "tools": [tool]}, "hi"]}  # fmt: skip
    top_level = {"model": "gpt-6.2-sol", "tools": [tool], "input": ["hi"]}
    texts = list(RESPONSES.input_texts(as_item))
    assert texts == [json.dumps(tool, separators=(",", ":")), "hi"]
    assert sorted(texts) == sorted(RESPONSES.input_texts(top_level))
