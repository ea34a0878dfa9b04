"""The OpenAI upstream simulator, driven by the official SDK and by raw HTTP."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import zstandard
from openai import OpenAI

from extproc.metering.tokens import count_text, get_encoding
from extproc.simulator import Simulator
from extproc.simulator.caching import BLOCK, PromptCache
from extproc.simulator.faults import Faults, FaultSyntaxError, parse_faults
from extproc.simulator.plan import output_budget
from extproc.simulator.text import WORDS, output_text

RESPONSE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 24,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    simulator = Simulator()
    asyncio.run_coroutine_threadsafe(simulator.start(), loop).result(5)
    yield simulator
    asyncio.run_coroutine_threadsafe(simulator.close(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.fixture(scope="module")
def client(sim: Simulator) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"http://127.0.0.1:{sim.port}/v1", api_key="sk-test", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def http(sim: Simulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{sim.port}", timeout=10) as c:
        yield c


def _zstd_stream(raw: bytes) -> bytes:
    compressor = zstandard.ZstdCompressor().compressobj()
    return compressor.compress(raw) + compressor.flush()


COMPRESSORS = {"gzip": gzip.compress, "zstd": _zstd_stream}


def fault(spec: str) -> dict[str, str]:
    return {"x-sim-fault": spec}


def long_prompt(tag: str, words: int = 1500) -> str:
    return tag + " " + " ".join(WORDS[i % len(WORDS)] + str(i % 7) for i in range(words))


# --- pure parts ---------------------------------------------------------------------------


def test_output_words_are_one_token_each_in_both_encodings() -> None:
    for name in ("o200k_base", "cl100k_base"):
        encoding = get_encoding(name)
        for n in (1, 7, 24, 100):
            assert len(encoding.encode_ordinary(output_text(n))) == n


def test_output_budget_spends_reasoning_first() -> None:
    assert output_budget(24, 64, None) == (64, 24, False)
    assert output_budget(24, 64, 70) == (64, 6, True)
    assert output_budget(24, 64, 30) == (30, 0, True)
    assert output_budget(24, 0, 24) == (0, 24, False)


def test_prompt_cache_reports_shared_prefix_in_blocks() -> None:
    cache = PromptCache()
    prompt = list(range(3000))
    assert cache.lookup_and_store("s", prompt) == 0
    assert cache.lookup_and_store("s", prompt) == (3000 // BLOCK) * BLOCK
    assert cache.lookup_and_store("s", [*prompt[:1300], *range(9000, 10000)]) == 1280
    assert cache.lookup_and_store("s", [*prompt[:1000], *range(20000, 21000)]) == 0
    assert cache.lookup_and_store("other", prompt) == 0
    assert cache.lookup_and_store("s", prompt[:1000]) == 0


def test_prompt_cache_forgets_least_recently_used() -> None:
    cache = PromptCache(max_blocks=10)
    cache.lookup_and_store("s", list(range(1280)))
    cache.lookup_and_store("s", list(range(5000, 6280)))
    assert cache.lookup_and_store("s", list(range(1280))) == 0


def test_fault_header_parsing() -> None:
    assert parse_faults(None) == Faults()
    assert parse_faults("status=429, code=insufficient_quota,delay-ms=5") == Faults(
        status=429, code="insufficient_quota", delay_ms=5
    )
    assert parse_faults("cut-after=3,no-usage,error-event,event-delay-ms=2") == Faults(
        cut_after=3, no_usage=True, error_event=True, event_delay_ms=2
    )
    for bad in ("status=abc", "explode", "cut-after=-1", "no-usage=1"):
        with pytest.raises(FaultSyntaxError):
            parse_faults(bad)


# --- Responses API ------------------------------------------------------------------------


def test_responses_non_streaming(client: OpenAI, sim: Simulator) -> None:
    response = client.responses.create(model="gpt-4o", input="Tell me about foxes")
    assert response.status == "completed"
    assert response.id.startswith("resp_")
    assert response.model == "gpt-4o"
    assert response.usage is not None
    assert response.usage.output_tokens == count_text(response.output_text, "gpt-4o") == 24
    assert response.usage.input_tokens == count_text("Tell me about foxes", "gpt-4o") + 7
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    usage = response.usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    seen = sim.requests_seen[-1]
    assert (seen.method, seen.path, seen.model) == ("POST", "/v1/responses", "gpt-4o")
    assert seen.body is not None and seen.body["input"] == "Tell me about foxes"
    assert seen.headers["authorization"] == "Bearer sk-test"


def test_responses_streaming_event_sequence(client: OpenAI) -> None:
    events = list(client.responses.create(model="gpt-4.1", input="hi", stream=True))
    assert [e.type for e in events] == RESPONSE_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text
    assert final.usage is not None
    assert final.usage.output_tokens == count_text(text, "gpt-4.1")
    assert events[0].response.usage is None
    assert events[0].response.status == "in_progress"


def test_responses_output_cap_makes_response_incomplete(client: OpenAI) -> None:
    response = client.responses.create(model="gpt-4o", input="hi", max_output_tokens=5)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 5
    assert count_text(response.output_text, "gpt-4o") == 5
    events = list(
        client.responses.create(model="gpt-4o", input="hi", max_output_tokens=5, stream=True)
    )
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.usage.output_tokens == 5


@pytest.mark.parametrize(
    ("effort", "reasoning"), [(None, 64), ("minimal", 0), ("low", 16), ("high", 256)]
)
def test_responses_reasoning_tokens(client: OpenAI, effort: str | None, reasoning: int) -> None:
    extra: dict[str, Any] = {"reasoning": {"effort": effort}} if effort else {}
    response = client.responses.create(model="gpt-5-codex", input="fix the bug", **extra)
    assert response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens == reasoning
    visible = count_text(response.output_text, "gpt-5-codex")
    assert response.usage.output_tokens == reasoning + visible
    assert response.output[0].type == "reasoning"


def test_served_model_and_output_token_headers(client: OpenAI) -> None:
    response = client.responses.create(
        model="gpt-4o",
        input="hi",
        extra_headers={"x-sim-served-model": "gpt-4o-2024-08-06", "x-sim-output-tokens": "40"},
    )
    assert response.model == "gpt-4o-2024-08-06"
    assert response.usage is not None and response.usage.output_tokens == 40
    assert count_text(response.output_text, "gpt-4o") == 40


def test_responses_cached_tokens_on_repeated_long_prompt(client: OpenAI) -> None:
    prompt = long_prompt("responses-cache")
    first = client.responses.create(model="gpt-5-mini", input=prompt)
    second = client.responses.create(model="gpt-5-mini", input=prompt)
    assert first.usage is not None and second.usage is not None
    assert first.usage.input_tokens >= 1024
    assert first.usage.input_tokens_details.cached_tokens == 0
    cached = second.usage.input_tokens_details.cached_tokens
    assert cached >= 1024 and cached % 128 == 0
    assert second.usage.input_tokens - cached < 128 + 8
    scoped = client.responses.create(model="gpt-5-mini", input=prompt, prompt_cache_key="other")
    assert scoped.usage is not None and scoped.usage.input_tokens_details.cached_tokens == 0


def test_responses_input_items_and_instructions_are_counted(client: OpenAI) -> None:
    plain = client.responses.create(model="gpt-4o", input="What is up?")
    rich = client.responses.create(
        model="gpt-4o",
        instructions="Be brief.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "What is up?"}]}],
    )
    assert plain.usage is not None and rich.usage is not None
    extra = 3 + count_text("developer", "gpt-4o") + count_text("Be brief.", "gpt-4o")
    assert rich.usage.input_tokens == plain.usage.input_tokens + extra


# --- Chat Completions ---------------------------------------------------------------------


def test_chat_non_streaming(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].finish_reason == "stop"
    content = completion.choices[0].message.content
    assert content is not None
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 8
    assert completion.usage.completion_tokens == count_text(content, "gpt-4o-mini")
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    assert completion.usage.completion_tokens_details is not None
    assert completion.usage.completion_tokens_details.reasoning_tokens == 0


def test_chat_length_and_reasoning_effort(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="o4-mini",
        messages=[{"role": "user", "content": "hi"}],
        reasoning_effort="low",
        max_completion_tokens=20,
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 20
    assert completion.usage.completion_tokens_details is not None
    assert completion.usage.completion_tokens_details.reasoning_tokens == 16
    assert count_text(completion.choices[0].message.content or "", "o4-mini") == 4


def test_chat_streaming_usage_only_when_asked(client: OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    plain = list(client.chat.completions.create(model="gpt-4o", messages=messages, stream=True))
    assert all(chunk.usage is None for chunk in plain)
    assert plain[-1].choices[0].finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert last.usage.completion_tokens == count_text(text, "gpt-4o") == 24
    assert last.usage.prompt_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_cached_tokens(client: OpenAI) -> None:
    messages: Any = [
        {"role": "system", "content": long_prompt("chat-cache")},
        {"role": "user", "content": "question one"},
    ]
    first = client.chat.completions.create(model="gpt-4.1", messages=messages)
    messages[1]["content"] = "a different question"
    second = client.chat.completions.create(model="gpt-4.1", messages=messages)
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 1024 and cached % 128 == 0
    assert cached <= second.usage.prompt_tokens


# --- Completions and Embeddings -----------------------------------------------------------


def test_completions(client: OpenAI) -> None:
    completion = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon")
    assert completion.object == "text_completion"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == count_text("Once upon", "gpt-3.5-turbo-instruct")
    assert completion.usage.completion_tokens == count_text(
        completion.choices[0].text, "gpt-3.5-turbo-instruct"
    )
    tokens = client.completions.create(model="davinci-002", prompt=[1, 2, 3, 4, 5], max_tokens=3)
    assert tokens.usage is not None and tokens.usage.prompt_tokens == 5
    assert tokens.choices[0].finish_reason == "length"


def test_completions_streaming_with_usage(client: OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="gpt-3.5-turbo-instruct",
            prompt="Once upon",
            stream=True,
            max_tokens=6,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert chunks[-2].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks[:-1]) == output_text(6)
    bare = list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x", stream=True))
    assert all(c.usage is None for c in bare)


def test_embeddings_float_and_base64_agree(client: OpenAI) -> None:
    inputs = ["first text", "second"]
    default = client.embeddings.create(model="text-embedding-3-small", input=inputs)
    floats = client.embeddings.create(
        model="text-embedding-3-small", input=inputs, encoding_format="float"
    )
    assert [len(e.embedding) for e in default.data] == [1536, 1536]
    assert [e.embedding for e in default.data] == [e.embedding for e in floats.data]
    expected = sum(count_text(t, "text-embedding-3-small") for t in inputs)
    assert default.usage.prompt_tokens == default.usage.total_tokens == expected
    large = client.embeddings.create(model="text-embedding-3-large", input=[[1, 2, 3]])
    assert len(large.data[0].embedding) == 3072
    assert large.usage.prompt_tokens == 3
    short = client.embeddings.create(model="text-embedding-3-small", input="x", dimensions=64)
    assert len(short.data[0].embedding) == 64


# --- faults -------------------------------------------------------------------------------


def test_status_faults_raise_sdk_errors(client: OpenAI) -> None:
    args: dict[str, Any] = {"model": "gpt-4o", "input": "hi"}
    with pytest.raises(openai.RateLimitError) as limited:
        client.responses.create(**args, extra_headers=fault("status=429"))
    assert limited.value.code == "rate_limit_exceeded"
    assert limited.value.response.headers["retry-after"] == "1"
    with pytest.raises(openai.RateLimitError) as quota:
        client.responses.create(**args, extra_headers=fault("status=429,code=insufficient_quota"))
    assert quota.value.code == "insufficient_quota" and quota.value.type == "insufficient_quota"
    with pytest.raises(openai.InternalServerError) as broken:
        client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "x"}],
            extra_headers=fault("status=500"),
        )
    assert broken.value.status_code == 500 and broken.value.type == "server_error"
    with pytest.raises(openai.InternalServerError) as overloaded:
        client.embeddings.create(
            model="text-embedding-3-small", input="x", extra_headers=fault("status=503")
        )
    assert overloaded.value.status_code == 503


def test_delay_fault_slows_first_byte(client: OpenAI) -> None:
    started = time.perf_counter()
    client.responses.create(model="gpt-4o", input="hi", extra_headers=fault("delay-ms=150"))
    assert time.perf_counter() - started >= 0.15


def test_cut_stream_ends_without_terminal_event(client: OpenAI) -> None:
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        stream = client.responses.create(
            model="gpt-4o", input="hi", stream=True, extra_headers=fault("cut-after=5")
        )
        received.extend(event.type for event in stream)
    assert received == RESPONSE_EVENTS[:5]


def test_cut_beyond_stream_length_still_withholds_terminal_events(http: httpx.Client) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": True}
    lines: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        http.stream("POST", "/v1/chat/completions", json=body, headers=fault("cut-after=999")) as r,
    ):
        lines.extend(r.iter_lines())
    payloads = [line for line in lines if line.startswith("data: ")]
    assert len(payloads) == 26
    assert "data: [DONE]" not in payloads


def test_cut_non_streaming_body(client: OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "x"}],
            extra_headers=fault("cut-after=0"),
        )


def test_no_usage_fault(client: OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "x"}]
    completion = client.chat.completions.create(
        model="gpt-4o", messages=messages, extra_headers=fault("no-usage")
    )
    assert completion.usage is None and completion.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=fault("no-usage"),
        )
    )
    assert all(c.usage is None and c.choices for c in chunks)
    events = list(
        client.responses.create(
            model="gpt-4o", input="x", stream=True, extra_headers=fault("no-usage")
        )
    )
    assert events[-1].type == "response.completed" and events[-1].response.usage is None


def test_error_event_fault_in_responses_stream(client: OpenAI) -> None:
    events = list(
        client.responses.create(
            model="gpt-5", input="x", stream=True, extra_headers=fault("error-event")
        )
    )
    types = [e.type for e in events]
    assert types[-2:] == ["error", "response.failed"]
    assert types.count("response.output_text.delta") == 2
    error, failed = events[-2], events[-1]
    assert error.code == "server_error" and error.message
    assert failed.response.status == "failed"
    assert failed.response.usage is not None
    assert failed.response.usage.output_tokens == 64 + 2
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_error_event_fault_in_chat_stream(client: OpenAI) -> None:
    deltas: list[str] = []
    with pytest.raises(openai.APIError) as failure:
        stream = client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            extra_headers=fault("error-event"),
        )
        deltas.extend(c.choices[0].delta.content or "" for c in stream)
    assert "".join(deltas) == output_text(2)
    assert failure.value.body == {
        "message": failure.value.message,
        "type": "server_error",
        "param": None,
        "code": "server_error",
    }


def test_event_delay_spaces_out_events(client: OpenAI) -> None:
    stamps: list[float] = []
    stream = client.responses.create(
        model="gpt-4o",
        input="x",
        stream=True,
        extra_headers={**fault("event-delay-ms=20"), "x-sim-output-tokens": "2"},
    )
    for _ in stream:
        stamps.append(time.perf_counter())
    assert len(stamps) == 10
    assert stamps[-1] - stamps[0] >= 9 * 0.02


def test_client_disconnect_mid_stream_leaves_server_healthy(
    client: OpenAI, http: httpx.Client
) -> None:
    stream = client.responses.create(
        model="gpt-4o", input="x", stream=True, extra_headers=fault("event-delay-ms=30")
    )
    assert next(iter(stream)).type == "response.created"
    stream.close()
    assert http.get("/healthz").status_code == 200


# --- raw HTTP -----------------------------------------------------------------------------


def test_responses_sse_framing(http: httpx.Client) -> None:
    body = {"model": "gpt-4o", "input": "hi", "stream": True}
    response = http.post("/v1/responses", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["transfer-encoding"] == "chunked"
    frames = response.text.split("\n\n")
    assert frames[-1] == ""
    for frame in frames[:-1]:
        event_line, data_line = frame.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        assert json.loads(data_line.removeprefix("data: "))["type"] == event_line[7:]


def test_chat_sse_framing(http: httpx.Client) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": True}
    frames = http.post("/v1/chat/completions", json=body).text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    for frame in frames[:-2]:
        assert frame.startswith("data: ") and "\n" not in frame
        assert json.loads(frame[6:])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field", ["prompt_cache_key", "user"])
def test_a_lone_surrogate_is_echoed_not_a_500(http: httpx.Client, field: str, stream: bool) -> None:
    """The property test's find: `"\\ud800"` in a field the answer echoes has no UTF-8 form."""
    # json.dumps escapes the surrogate, as a JSON client would send it.
    raw = json.dumps({"model": "gpt-5-mini", "input": "hi", "stream": stream, field: "a\ud800b"})
    response = http.post(
        "/v1/responses", content=raw.encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    response.content.decode("utf-8")  # valid UTF-8 on the wire
    if stream:
        events = [
            json.loads(line.removeprefix("data: "))
            for line in response.text.splitlines()
            if line.startswith("data: ")
        ]
        echoed = events[-1]["response"][field]
    else:
        echoed = response.json()[field]
    assert echoed == "a\ud800b"


def test_json_response_headers(http: httpx.Client) -> None:
    body = {"model": "gpt-4o", "input": "hi"}
    response = http.post("/v1/responses", json=body)
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"].startswith("req_")
    assert int(response.headers["openai-processing-ms"]) >= 0
    assert int(response.headers["x-ratelimit-remaining-tokens"]) > 0
    assert int(response.headers["content-length"]) == len(response.content)


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
def test_compressed_request_bodies(http: httpx.Client, sim: Simulator, encoding: str) -> None:
    raw = json.dumps({"model": "gpt-4o", "input": f"compressed with {encoding}"}).encode()
    data = COMPRESSORS[encoding](raw)
    headers = {"content-encoding": encoding, "content-type": "application/json"}
    response = http.post("/v1/responses", content=data, headers=headers)
    assert response.status_code == 200
    expected = count_text(f"compressed with {encoding}", "gpt-4o") + 7
    assert response.json()["usage"]["input_tokens"] == expected
    seen = sim.requests_seen[-1]
    assert seen.body == json.loads(raw) and seen.raw_body == data


def test_chunked_request_body(http: httpx.Client, sim: Simulator) -> None:
    raw = json.dumps({"model": "gpt-4o", "input": "sent in chunks"}).encode()
    response = http.post("/v1/responses", content=iter([raw[:10], raw[10:]]))
    assert response.status_code == 200
    assert sim.requests_seen[-1].headers["transfer-encoding"] == "chunked"
    assert sim.requests_seen[-1].body == json.loads(raw)


def test_malformed_json_is_400_in_openai_shape(http: httpx.Client, client: OpenAI) -> None:
    response = http.post("/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    bad_zstd = http.post("/v1/responses", content=b"nope", headers={"content-encoding": "zstd"})
    assert bad_zstd.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o", messages=None)  # type: ignore[arg-type]


def test_unknown_path_is_404_and_models_list(http: httpx.Client, client: OpenAI) -> None:
    missing = http.post("/v1/nothing", json={})
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "Invalid URL (POST /v1/nothing)"
    assert http.get("/healthz").status_code == 200
    assert "gpt-4o" in [m.id for m in client.models.list()]
    assert client.models.retrieve("gpt-5").id == "gpt-5"


def test_connection_close_and_keep_alive(sim: Simulator) -> None:
    with socket.create_connection(("127.0.0.1", sim.port), timeout=5) as sock:
        request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
        sock.sendall(request + request[:-2] + b"connection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert data.endswith(b'{"status":"ok"}')


def test_command_line_entry_point() -> None:
    command = [sys.executable, "-m", "extproc.simulator", "--host", "127.0.0.1", "--port", "0"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line.startswith("simulator listening on http://127.0.0.1:")
            assert httpx.get(line.rsplit(" ", 1)[1] + "/healthz", timeout=5).status_code == 200
        finally:
            proc.terminate()
        assert proc.wait(timeout=10) == 0
