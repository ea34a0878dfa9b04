"""The caller's credential: where clients put it, and every header that must not go upstream.

OpenAI SDKs send `Authorization: Bearer`; Azure-style clients send `api-key`; some tools send
`x-api-key`. The virtual key is read from the first of those that holds one. Whatever the
caller sent in any credential-bearing header is removed before forwarding (the virtual key
must never leave the platform, and a second credential must not ride along next to ours);
the sidecar then adds the workspace's real key as the only `authorization`.
"""

from __future__ import annotations

from collections.abc import Mapping

from extproc.wire.errors import OpenAIError

KEY_HEADERS = ("authorization", "api-key", "x-api-key")
"""Where a client may put its virtual key, in the order they are read."""

CLIENT_CREDENTIALS = frozenset(
    {
        *KEY_HEADERS,
        "proxy-authorization",
        "cookie",
        # The workspace key decides the provider organisation and project; a client must not
        # pick another one the shared key happens to belong to.
        "openai-organization",
        "openai-project",
        # ChatGPT-login clients (Codex) name the account their OAuth token belongs to.
        "chatgpt-account-id",
    }
)
"""Headers stripped from every forwarded request."""

UPGRADE_HEADERS = ("upgrade", "connection")

SIMULATED_KEY_PREFIX = "sk-simulated-"


def simulated_upstream_key(workspace: str) -> str:
    """The provider key a workspace uses towards the local simulator (`upstream_keys:
    simulated`): stable, so the simulator's admin API reports one project per workspace."""
    return SIMULATED_KEY_PREFIX + workspace


MISSING_KEY = OpenAIError(
    401,
    "You didn't provide an API key. Send your extproc key as 'Authorization: Bearer <key>' "
    "(or in an 'api-key' header). Ask your platform team for one (extproc keys create).",
    "invalid_request_error",
    None,
    "invalid_api_key",
)

WEBSOCKET_REFUSED = OpenAIError(
    426,
    "WebSocket connections cannot be metered by this gateway; use HTTP (server-sent events) "
    "for streaming. Codex falls back to HTTP by itself on this answer.",
    "invalid_request_error",
    None,
    "websocket_not_supported",
)


def presented_key(headers: Mapping[str, str]) -> str:
    """The key the caller presented: a Bearer token, else a bare `api-key` / `x-api-key`."""
    for name in KEY_HEADERS:
        value = headers.get(name, "").strip()
        if not value:
            continue
        if name == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer":
                continue
            value = token.strip()
        if value:
            return value
    return ""


def credentials_present(headers: Mapping[str, str]) -> list[str]:
    """The client credential headers actually present, to remove."""
    return [name for name in CLIENT_CREDENTIALS if name in headers]


def is_upgrade(headers: Mapping[str, str]) -> bool:
    """A WebSocket (or any other protocol) upgrade, which ext_proc cannot meter."""
    if headers.get("upgrade"):
        return True
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    return "upgrade" in tokens
