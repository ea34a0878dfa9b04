"""Paths the sidecar answers itself: a developer's own view and calls under `/extproc/`.

`GET /extproc/v1/me` (JSON) and `GET /extproc/me` (a page for people) are answered from the
request-headers phase with an immediate response: they never reach the provider, and the
JSON one is authenticated by the caller's virtual key like any metered call, presented the same
ways the gateway accepts it (`authorization: Bearer`, `x-api-key`, `api-key`). The page holds
no data: it asks for the key in a form and fetches the JSON with it in a header, so the key
never appears in a URL, a log line or the browser's history.

Top-ups the same way: `GET /extproc/topup/<scope>` is the page a budget refusal links to (a
form: how much, until when, why, and the key); `POST /extproc/v1/topups` (a JSON body, the
key in a header) makes the request and `GET /extproc/v1/topups` lists the caller's own. A
POST is answered at its body, which Envoy buffers: nothing is ever forwarded upstream.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from typing import Any

from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane.deps import Deps
from extproc.governance import guard
from extproc.governance.keys import MISSING, Identity
from extproc.governance.topups import TopupError
from extproc.insight.me import (
    ME_PAGE_PATH,
    ME_PATH,
    me_view,
    plan_for,
    read_me,
    typical_request,
)
from extproc.wire.errors import OpenAIError

log = logging.getLogger("extproc.dataplane.selfservice")

PREFIX = "/extproc/"
TOPUP_PAGE = "/extproc/topup"
TOPUPS_PATH = "/extproc/v1/topups"
MAX_CALL_BODY = 64 * 1024
_PAGES: dict[str, bytes] = {}
_NO_STORE = {"cache-control": "no-store"}
_HTML = {"content-type": "text/html; charset=utf-8", **_NO_STORE}


def _page(name: str = "me.html") -> bytes:
    page = _PAGES.get(name)
    if page is None:
        page = _PAGES[name] = resources.files("extproc.insight").joinpath(name).read_bytes()
    return page


class Call:
    """One request to a path under `/extproc/`: answered at its headers, or, for a POST, at
    its body. It is never forwarded."""

    __slots__ = ("_chunks", "deps", "method", "path", "secret")

    def __init__(self, deps: Deps, method: str, path: str, secret: str) -> None:
        self.deps, self.method, self.path, self.secret = deps, method, path, secret
        self._chunks: list[bytes] = []
        deps.ledger.note_unmetered(unmetered_key(method, path))

    def on_headers(self, end_of_stream: bool) -> msgs.ProcessingResponse | Any:
        if self.method == "POST" and self.path.split("?", 1)[0] == TOPUPS_PATH:
            if end_of_stream:
                return msgs.immediate(400, _error(400, "A JSON body is required.", "no_body"))
            return msgs.CONTINUE_REQUEST_HEADERS  # answered at the body (see on_body)
        return answer(self.deps, self.method, self.path, self.secret)

    def on_body(self, msg: msgs.pb.HttpBody) -> msgs.ProcessingResponse | Any:
        self._chunks.append(msg.body)
        if sum(len(c) for c in self._chunks) > MAX_CALL_BODY:
            return msgs.immediate(413, _error(413, "The body is too large.", "too_large"))
        if not msg.end_of_stream:
            return msgs.CONTINUE_REQUEST_BODY
        return _ask_topup(self.deps, self.secret, b"".join(self._chunks))


def _error(status: int, message: str, code: str, kind: str = "invalid_request_error") -> bytes:
    return OpenAIError(status, message, kind, None, code).body()


async def answer(deps: Deps, method: str, path: str, secret: str) -> msgs.ProcessingResponse:
    """The immediate response for a path under `/extproc/`; `secret` is the key presented."""
    route = path.split("?", 1)[0]
    page = route == TOPUP_PAGE or route.startswith(TOPUP_PAGE + "/")
    if route not in (ME_PATH, ME_PAGE_PATH, TOPUPS_PATH) and not page:
        return msgs.immediate(404, _error(404, f"No such extproc path: {route}", "not_found"))
    if method not in ("GET", "HEAD"):
        allow = "GET, POST" if route == TOPUPS_PATH else "GET"
        return msgs.immediate(
            405, _error(405, f"{route} answers {allow} only.", "method_not_allowed"),
            {"allow": allow},
        )  # fmt: skip
    if route == ME_PAGE_PATH:
        return msgs.immediate(200, _page(), _HTML)
    if page:
        return msgs.immediate(200, _page("topup.html"), _HTML)
    identity = await _caller(deps, secret)
    if isinstance(identity, msgs.ProcessingResponse):
        return identity
    if route == TOPUPS_PATH:
        return await _my_topups(deps, identity)
    return await _me(deps, identity)


async def _caller(deps: Deps, secret: str) -> Identity | msgs.ProcessingResponse:
    """The caller behind the key presented, or the answer that refuses them."""
    keys, policy = deps.keys, deps.policy
    if keys is None or policy is None or deps.store is None:
        return msgs.immediate(
            404, _error(404, "This gateway runs without keys or a policy.", "not_found")
        )
    try:
        identity = keys.get(secret)
        if identity is MISSING:
            identity = await keys.resolve(secret)
    except Exception:
        log.exception("key lookup failed")
        return msgs.immediate(503, _error(503, "The key store is unavailable.", "unavailable"))
    if not isinstance(identity, Identity) or identity.workspace not in policy.workspaces:
        return msgs.immediate(401, guard.UNKNOWN_KEY.body(), _NO_STORE)
    return identity


def _json(status: int, value: Any) -> msgs.ProcessingResponse:
    return msgs.immediate(status, json.dumps(value).encode(), _NO_STORE)


async def _ask_topup(deps: Deps, secret: str, raw: bytes) -> msgs.ProcessingResponse:
    identity = await _caller(deps, secret)
    if isinstance(identity, msgs.ProcessingResponse):
        return identity
    desk, policy = deps.halt, deps.policy
    if desk is None or policy is None:
        return msgs.immediate(404, _error(404, "Top-ups are not served here.", "not_found"))
    try:
        body = json.loads(raw or b"null")
    except ValueError:
        return msgs.immediate(400, _error(400, "The body is not JSON.", "invalid_json"))
    try:
        request = await desk.ask(identity, body)
    except TopupError as exc:
        return msgs.immediate(400, _error(400, str(exc), "invalid_topup"), _NO_STORE)
    except Exception:
        log.exception("top-up request failed")
        return msgs.immediate(503, _error(503, "The budget store is unavailable.", "unavailable"))
    return _json(201, request.to_dict(policy.timezone, deps.now_ms()))


async def _my_topups(deps: Deps, identity: Identity) -> msgs.ProcessingResponse:
    desk, policy = deps.halt, deps.policy
    if desk is None or policy is None:
        return msgs.immediate(404, _error(404, "Top-ups are not served here.", "not_found"))
    try:
        mine = await desk.mine(identity)
    except Exception:
        log.exception("reading top-up requests failed")
        return msgs.immediate(503, _error(503, "The budget store is unavailable.", "unavailable"))
    now = deps.now_ms()
    return _json(200, {"requests": [r.to_dict(policy.timezone, now) for r in mine]})


async def _me(deps: Deps, identity: Identity) -> msgs.ProcessingResponse:
    policy = deps.policy
    assert policy is not None
    now = deps.now_ms()
    plan = plan_for(policy, identity, deps.prices, now)
    try:
        reads = await read_me(deps.store, policy, identity, plan, now)
    except Exception:
        log.exception("reading the caller's standing failed")
        return msgs.immediate(503, _error(503, "The budget store is unavailable.", "unavailable"))
    typical = typical_request(reads.records, policy.workspaces[identity.workspace], deps.prices)
    try:
        requests = await deps.halt.mine(identity) if deps.halt is not None else []
    except Exception:
        log.exception("reading top-up requests failed")
        requests = []
    body = json.dumps(me_view(policy, identity, plan, reads, now, typical, requests)).encode()
    return msgs.immediate(200, body, _NO_STORE)


def unmetered_key(method: str, path: str) -> str:
    """Group unmetered traffic by resource, not by id: `GET /v1/responses/*`."""
    parts = path.split("?", 1)[0].split("/")
    if len(parts) > 3:
        parts = [*parts[:3], "*"]
    return f"{method} {'/'.join(parts)[:128]}"
