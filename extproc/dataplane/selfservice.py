"""Paths the sidecar answers itself: a developer's own view under `/extproc/`.

`GET /extproc/v1/me` (JSON) and `GET /extproc/me` (a page for people) are answered from the
request-headers phase with an immediate response: they never reach the provider, and the
JSON one is authenticated by the caller's virtual key like any metered call, presented the same
ways the gateway accepts it (`authorization: Bearer`, `x-api-key`, `api-key`). The page holds
no data: it asks for the key in a form and fetches the JSON with it in a header, so the key
never appears in a URL, a log line or the browser's history.
"""

from __future__ import annotations

import json
import logging
from importlib import resources

from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane.deps import Deps
from extproc.governance import guard
from extproc.governance.keys import MISSING, Identity
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
_PAGE: bytes | None = None
_NO_STORE = {"cache-control": "no-store"}


def _page() -> bytes:
    global _PAGE
    if _PAGE is None:
        _PAGE = resources.files("extproc.insight").joinpath("me.html").read_bytes()
    return _PAGE


def _error(status: int, message: str, code: str, kind: str = "invalid_request_error") -> bytes:
    return OpenAIError(status, message, kind, None, code).body()


async def answer(deps: Deps, method: str, path: str, secret: str) -> msgs.ProcessingResponse:
    """The immediate response for a path under `/extproc/`; `secret` is the key presented."""
    route = path.split("?", 1)[0]
    if route not in (ME_PATH, ME_PAGE_PATH):
        return msgs.immediate(404, _error(404, f"No such extproc path: {route}", "not_found"))
    if method not in ("GET", "HEAD"):
        return msgs.immediate(
            405, _error(405, f"{route} answers GET only.", "method_not_allowed"), {"allow": "GET"}
        )
    if route == ME_PAGE_PATH:
        return msgs.immediate(
            200, _page(), {"content-type": "text/html; charset=utf-8", **_NO_STORE}
        )
    return await _me(deps, secret)


async def _me(deps: Deps, secret: str) -> msgs.ProcessingResponse:
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
    now = deps.now_ms()
    plan = plan_for(policy, identity, deps.prices, now)
    try:
        reads = await read_me(deps.store, policy, identity, plan, now)
    except Exception:
        log.exception("reading the caller's standing failed")
        return msgs.immediate(503, _error(503, "The budget store is unavailable.", "unavailable"))
    typical = typical_request(reads.records, policy.workspaces[identity.workspace], deps.prices)
    body = json.dumps(me_view(policy, identity, plan, reads, now, typical)).encode()
    return msgs.immediate(200, body, _NO_STORE)


def unmetered_key(method: str, path: str) -> str:
    """Group unmetered traffic by resource, not by id: `GET /v1/responses/*`."""
    parts = path.split("?", 1)[0].split("/")
    if len(parts) > 3:
        parts = [*parts[:3], "*"]
    return f"{method} {'/'.join(parts)[:128]}"
