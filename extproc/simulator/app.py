"""Routing, request recording and fault injection for the simulated OpenAI API.

Builders decide what the answer says; this module decides how it is delivered:
on time or late, whole or cut, with or without the closing events. Keeping the two
apart lets every fault combine with every endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from extproc.simulator import chat, compact, completions, embeddings, responses
from extproc.simulator.admin import COSTS_PATH, USAGE_PATHS, AdminError, UsageBook
from extproc.simulator.bodies import BodyError, decode_body, parse_json_object
from extproc.simulator.caching import PromptCache
from extproc.simulator.faults import HEADER, Faults, FaultSyntaxError, error_body, parse_faults
from extproc.simulator.http import Request, Responder
from extproc.simulator.plan import SERVED_MODEL_HEADER, Plan, plan_request
from extproc.simulator.prompt import plain_inputs
from extproc.simulator.sse import EventStream, dumps, new_id

log = logging.getLogger(__name__)

MODELS = (
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-codex",
    "gpt-4.1",
    "gpt-4o",
    "gpt-4o-mini",
    "o3",
    "o4-mini",
    "gpt-3.5-turbo-instruct",
    "text-embedding-3-small",
    "text-embedding-3-large",
)
_MODELS_CREATED = 1_700_000_000
_JSON = ("content-type", "application/json")
_SSE = ("content-type", "text/event-stream; charset=utf-8")

Builder = Callable[[dict[str, Any], Plan, Faults], dict[str, Any]]
Streamer = Callable[[dict[str, Any], Plan, Faults], EventStream]
_GENERATIVE: dict[str, tuple[str, Builder, Streamer]] = {
    "/v1/responses": ("responses", responses.build, responses.stream),
    "/v1/chat/completions": ("chat", chat.build, chat.stream),
    "/v1/completions": ("completions", completions.build, completions.stream),
}
_REQUIRED = {"chat": "messages", "completions": "prompt"}


@dataclass(frozen=True, slots=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    model: str | None
    query: str = ""
    raw_body: bytes = field(default=b"", repr=False)
    server_name: str | None = None  # the TLS SNI the request arrived under

    @property
    def json(self) -> dict[str, Any] | None:
        return self.body


_date_cache: list[Any] = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, formatdate(now, usegmt=True)]
    return str(_date_cache[1])


def _headers(request: Request, kind: tuple[str, str], tokens: int = 0) -> list[tuple[str, str]]:
    elapsed_ms = int((time.perf_counter() - request.received_at) * 1000)
    return [
        kind,
        ("date", _http_date()),
        ("x-request-id", new_id("req_")),
        ("openai-version", "2020-10-01"),
        ("openai-processing-ms", str(elapsed_ms)),
        ("x-ratelimit-limit-requests", "10000"),
        ("x-ratelimit-limit-tokens", "30000000"),
        ("x-ratelimit-remaining-requests", "9999"),
        ("x-ratelimit-remaining-tokens", str(max(30_000_000 - tokens, 0))),
        ("x-ratelimit-reset-requests", "6ms"),
        ("x-ratelimit-reset-tokens", "0s"),
    ]


class App:
    """The request handler behind one Simulator: shared prompt cache, request log."""

    def __init__(self, seen: list[SeenRequest], max_seen: int = 10_000) -> None:
        self.seen = seen
        self.max_seen = max_seen
        self.cache = PromptCache()
        self.book = UsageBook()

    async def handle(self, request: Request, out: Responder) -> None:
        try:
            await self._handle(request, out)
        except Exception:
            log.exception("simulator failed on %s %s", request.method, request.path)
            if out.started:
                await out.cut()
            else:
                await self._error(request, out, 500)

    def _record(self, request: Request, body: dict[str, Any] | None) -> None:
        if self.max_seen <= 0:
            return
        model = body.get("model") if body else None
        self.seen.append(
            SeenRequest(
                request.method,
                request.path,
                request.headers,
                body,
                model if isinstance(model, str) else None,
                request.query,
                request.body,
                request.server_name,
            )
        )
        if len(self.seen) > self.max_seen:
            del self.seen[: len(self.seen) - self.max_seen // 2]

    async def _error(
        self,
        request: Request,
        out: Responder,
        status: int,
        code: str | None = None,
        message: str | None = None,
        param: str | None = None,
    ) -> None:
        headers = _headers(request, _JSON)
        if status == 429:
            headers.append(("retry-after", "1"))
            headers.append(("retry-after-ms", "1000"))
        await out.send(status, headers, dumps(error_body(status, code, message, param)))

    async def _json(
        self, request: Request, out: Responder, payload: Any, faults: Faults, tokens: int = 0
    ) -> None:
        data = dumps(payload)
        cut = len(data) // 2 if faults.cut_after is not None else -1
        await out.send(200, _headers(request, _JSON, tokens), data, truncate_at=cut)

    async def _handle(self, request: Request, out: Responder) -> None:
        body: dict[str, Any] | None = None
        body_error: str | None = None
        if request.method == "POST":
            try:
                raw = decode_body(request.headers.get("content-encoding", ""), request.body)
                body = parse_json_object(raw)
            except BodyError as exc:
                body_error = str(exc)
        if request.path != "/_sim/requests":
            self._record(request, body)
        try:
            faults = parse_faults(request.headers.get(HEADER))
        except FaultSyntaxError as exc:
            return await self._error(request, out, 400, message=f"x-sim-fault: {exc}")
        if faults.delay_ms:
            await asyncio.sleep(faults.delay_ms / 1000)
        path = request.path.rstrip("/") or "/"
        if request.method == "GET":
            return await self._get(request, out, path, faults)
        known = path in _GENERATIVE or path in ("/v1/embeddings", compact.PATH)
        if request.method != "POST" or not known:
            message = f"Invalid URL ({request.method} {request.path})"
            return await self._error(request, out, 404, message=message)
        if body is None:
            return await self._error(request, out, 400, message=body_error)
        if faults.status is not None:
            return await self._error(request, out, faults.status, faults.code)
        if not isinstance(body.get("model"), str) or not body["model"]:
            message = "you must provide a model parameter"
            return await self._error(request, out, 400, message=message)
        if path == "/v1/embeddings":
            return await self._embeddings(request, out, body, faults)
        if path == compact.PATH:
            return await self._compact(request, out, body, faults)
        kind, build, stream = _GENERATIVE[path]
        required = _REQUIRED.get(kind)
        if required and body.get(required) is None:
            message = f"Missing required parameter: '{required}'."
            return await self._error(
                request, out, 400, "missing_required_parameter", message, required
            )
        plan = plan_request(kind, body, request.headers, self.cache)
        self._book(request, plan)
        if body.get("stream") is True:
            return await self._stream(request, out, stream(body, plan, faults), faults, plan)
        await self._json(request, out, build(body, plan, faults), faults, plan.input_tokens)

    def _book(self, request: Request, plan: Plan) -> None:
        """What the provider's Usage and Costs APIs will report for this answer."""
        self.book.record(
            "completions",
            request.headers.get("authorization", ""),
            plan.model,
            plan.input_tokens,
            plan.cached_tokens,
            plan.output_tokens,
        )

    async def _compact(
        self, request: Request, out: Responder, body: dict[str, Any], faults: Faults
    ) -> None:
        plan = plan_request("responses", body, request.headers, self.cache)
        self._book(request, plan)
        answer = compact.build(body, plan, faults)
        await self._json(request, out, answer, faults, plan.input_tokens)

    async def _embeddings(
        self, request: Request, out: Responder, body: dict[str, Any], faults: Faults
    ) -> None:
        if body.get("input") is None:
            message = "Missing required parameter: 'input'."
            return await self._error(
                request, out, 400, "missing_required_parameter", message, "input"
            )
        inputs = plain_inputs(body["input"], body["model"])
        served = request.headers.get(SERVED_MODEL_HEADER) or body["model"]
        answer = embeddings.build(body, inputs, served, faults)
        tokens = sum(map(len, inputs))
        self.book.record(
            "embeddings", request.headers.get("authorization", ""), served, tokens, 0, 0
        )
        await self._json(request, out, answer, faults, sum(map(len, inputs)))

    async def _get(self, request: Request, out: Responder, path: str, faults: Faults) -> None:
        if path == "/healthz":
            return await self._json(request, out, {"status": "ok"}, faults)
        if path == "/v1/models":
            data = [_model(m) for m in MODELS]
            return await self._json(request, out, {"object": "list", "data": data}, faults)
        if path == "/_sim/requests":
            # Test introspection: what the upstream actually received (headers, model).
            recent = [
                {
                    "method": r.method,
                    "path": r.path,
                    "headers": r.headers,
                    "model": r.model,
                    "body": r.body,
                    "server_name": r.server_name,
                }
                for r in self.seen[-64:]
            ]
            return await self._json(request, out, {"requests": recent}, faults)
        if path in USAGE_PATHS or path == COSTS_PATH:
            try:
                answer = self.book.answer(
                    path, request.query, request.headers.get("authorization", "")
                )
            except AdminError as exc:
                return await self._error(request, out, exc.status, message=exc.message,
                                         param=exc.param)  # fmt: skip
            return await self._json(request, out, answer, faults)
        if path.startswith("/v1/models/"):
            return await self._json(request, out, _model(path.removeprefix("/v1/models/")), faults)
        await self._error(request, out, 404, message=f"Invalid URL (GET {request.path})")

    async def _stream(
        self, request: Request, out: Responder, events: EventStream, faults: Faults, plan: Plan
    ) -> None:
        await out.start_chunked(200, _headers(request, _SSE, plan.input_tokens))
        frames = events.frames
        if faults.cut_after is not None:
            frames = frames[: min(faults.cut_after, events.terminal_at)]
        for i, frame in enumerate(frames):
            if i and faults.event_delay_ms:
                await asyncio.sleep(faults.event_delay_ms / 1000)
            if out.closed or out.disconnected:
                out.closed = True
                return
            await out.send_chunk(frame)
        if faults.cut_after is not None:
            await out.cut()
        elif not out.closed:
            await out.end_chunked()


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": _MODELS_CREATED, "owned_by": "system"}
