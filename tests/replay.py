"""A replay upstream: recorded OpenAI answers served back, for billing tests.

Each fixture is one answer as the OpenAI API returns it (shapes from the API reference:
`usage` and its details, `service_tier`, output items such as `web_search_call`), as JSON
or as the SSE stream that carries it. The test names the fixture in an `x-replay` request
header, which Envoy and the sidecar pass through untouched; the server answers with it and
remembers what it was asked, so a test can tell a refused request never reached it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REPLAY_HEADER = "x-replay"


@dataclass
class Fixture:
    name: str
    path: str  # "/v1/responses" or "/v1/chat/completions"
    request: dict[str, Any]  # what the client sends (the sidecar reads its tools, tier)
    answer: dict[str, Any]  # the whole answer object
    stream: bool = False

    def body(self) -> tuple[str, bytes]:
        if not self.stream:
            return "application/json", json.dumps(self.answer).encode()
        if self.path == "/v1/responses":
            events = [
                ("response.created", {"type": "response.created",
                                      "response": {**self.answer, "status": "in_progress",
                                                   "output": [], "usage": None}}),
                ("response.output_text.delta", {"type": "response.output_text.delta",
                                                "delta": "Done."}),
                ("response.completed", {"type": "response.completed", "response": self.answer}),
            ]  # fmt: skip
            text = "".join(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events)
        else:
            chunk = {k: v for k, v in self.answer.items() if k not in ("choices", "usage")}
            chunk["object"] = "chat.completion.chunk"
            parts = [
                {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"},
                                       "finish_reason": None}]},
                {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                {**chunk, "choices": [], "usage": self.answer["usage"]},
            ]  # fmt: skip
            text = "".join(f"data: {json.dumps(p)}\n\n" for p in parts) + "data: [DONE]\n\n"
        return "text/event-stream", text.encode()


@dataclass
class Replay:
    fixtures: dict[str, Fixture]
    port: int = 0
    asked: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def replay_upstream(fixtures: list[Fixture]) -> Iterator[Replay]:
    replay = Replay({f.name: f for f in fixtures})
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            name = self.headers.get(REPLAY_HEADER, "")
            with lock:
                replay.asked.append(name)
            fixture = replay.fixtures.get(name)
            if fixture is None or fixture.path != self.path.split("?")[0]:
                self._send(404, "application/json", b'{"error": {"message": "no fixture"}}')
                return
            self._send(200, *fixture.body())

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    replay.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield replay
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# -- the recorded answers ---------------------------------------------------------------------


def response(
    model: str,
    usage: dict[str, Any],
    *,
    tier: str = "default",
    output: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A Responses API object (`object: response`) as OpenAI returns it."""
    message = {
        "type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": "Done.", "annotations": []}],
    }  # fmt: skip
    return {
        "id": "resp_replay",
        "object": "response",
        "created_at": 1765000000,
        "status": "completed",
        "error": None,
        "model": model,
        "output": [*(output or []), message],
        "service_tier": tier,
        "usage": {**usage, "total_tokens": usage["input_tokens"] + usage["output_tokens"]},
    }


def responses_usage(
    inp: int, out: int, *, cached: int = 0, write: int = 0, reasoning: int = 0
) -> dict[str, Any]:
    details: dict[str, int] = {"cached_tokens": cached}
    if write:
        details["cache_write_tokens"] = write
    return {
        "input_tokens": inp,
        "input_tokens_details": details,
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": reasoning},
    }


def chat_completion(model: str, usage: dict[str, Any], *, tier: str = "default") -> dict[str, Any]:
    return {
        "id": "chatcmpl-replay",
        "object": "chat.completion",
        "created": 1765000000,
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Hi", "refusal": None}}],
        "usage": usage,
        "service_tier": tier,
        "system_fingerprint": "fp_replay",
    }  # fmt: skip


def chat_usage(
    prompt: int,
    completion: int,
    *,
    cached: int = 0,
    audio_in: int = 0,
    audio_out: int = 0,
    reasoning: int = 0,
) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": audio_in},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning, "audio_tokens": audio_out,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
        },
    }  # fmt: skip


def web_search_call(n: int) -> dict[str, Any]:
    return {"type": "web_search_call", "id": f"ws_{n}", "status": "completed",
            "action": {"type": "search", "query": f"query {n}"}}  # fmt: skip


def file_search_call(n: int) -> dict[str, Any]:
    return {"type": "file_search_call", "id": f"fs_{n}", "status": "completed",
            "queries": ["pricing"], "results": None}  # fmt: skip


def code_interpreter_call(n: int, container: str) -> dict[str, Any]:
    return {"type": "code_interpreter_call", "id": f"ci_{n}", "status": "completed",
            "code": "print(2 + 2)", "container_id": container, "outputs": None}  # fmt: skip


def image_generation_call(size: str, quality: str) -> dict[str, Any]:
    return {"type": "image_generation_call", "id": "ig_1", "status": "completed",
            "result": "iVBORw0KGgo=", "revised_prompt": "a cat", "size": size,
            "quality": quality, "output_format": "png", "background": "opaque"}  # fmt: skip
