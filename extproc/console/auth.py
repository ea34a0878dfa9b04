"""Who may use the console and the admin API: admin tokens, one-time logins, sessions.

Admin tokens come from a secret: `EXTPROC_ADMIN_TOKENS` ("name:token,name:token") or the
file named by `EXTPROC_ADMIN_TOKENS_FILE` (one "name:token" or bare token per line, as a
Kubernetes Secret mounts it). The name is what the audit log records as "who". Tokens are
compared in constant time and are never virtual keys: an `sk-ext-` value is refused outright,
so a developer's key cannot open the admin API, and the gateway never accepts an admin token
(it is not in the key store).

A browser logs in once, with an admin token or with the one-time login token the console
prints at start (like Jupyter), and then holds a random session id in an HttpOnly,
SameSite=Strict cookie; every form also carries the session's CSRF token.
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from extproc.governance.keys import KEY_PREFIX

MIN_TOKEN_CHARS = 16
SESSION_COOKIE = "extproc_console"
SESSION_SECONDS = 12 * 3600


class AuthConfigError(ValueError):
    """The admin token secret is unusable; the message says which entry and why."""


def parse_tokens(text: str, where: str) -> dict[str, str]:
    """token -> admin name, from "name:token" entries (commas or newlines between them)."""
    out: dict[str, str] = {}
    entries = [e.strip() for line in text.splitlines() for e in line.split(",")]
    for i, entry in enumerate(e for e in entries if e and not e.startswith("#")):
        name, sep, token = entry.partition(":")
        if not sep:
            name, token = "admin", entry
        name, token = name.strip(), token.strip()
        if len(token) < MIN_TOKEN_CHARS:
            raise AuthConfigError(
                f"{where}: entry {i + 1}: token shorter than {MIN_TOKEN_CHARS} characters"
            )
        if token.startswith(KEY_PREFIX):
            raise AuthConfigError(f"{where}: entry {i + 1}: looks like a virtual key (sk-ext-)")
        out[token] = name or "admin"
    return out


def tokens_from_env(env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if env is None else env)
    tokens: dict[str, str] = {}
    if env.get("EXTPROC_ADMIN_TOKENS"):
        tokens.update(parse_tokens(env["EXTPROC_ADMIN_TOKENS"], "EXTPROC_ADMIN_TOKENS"))
    path = env.get("EXTPROC_ADMIN_TOKENS_FILE")
    if path:
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise AuthConfigError(f"EXTPROC_ADMIN_TOKENS_FILE: cannot read {path}: {exc}") from exc
        tokens.update(parse_tokens(text, path))
    return tokens


@dataclass
class Session:
    who: str
    csrf: str
    expires: float


@dataclass
class Auth:
    tokens: dict[str, str]
    login_tokens: set[str] = field(default_factory=set)
    sessions: dict[str, Session] = field(default_factory=dict)

    def admin(self, token: str | None) -> str | None:
        """The admin's name for a bearer token, else None."""
        if not token or token.startswith(KEY_PREFIX):
            return None
        found = None
        for known, name in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = name
        return found

    def mint_login(self) -> str:
        token = secrets.token_urlsafe(24)
        self.login_tokens.add(token)
        return token

    def use_login(self, token: str) -> bool:
        """A one-time login token works exactly once."""
        for known in list(self.login_tokens):
            if hmac.compare_digest(known.encode(), token.encode()):
                self.login_tokens.discard(known)
                return True
        return False

    def open_session(self, who: str) -> str:
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = Session(who, secrets.token_urlsafe(16), time.time() + SESSION_SECONDS)
        return sid

    def session(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        found = self.sessions.get(sid)
        if found is None or found.expires < time.time():
            self.sessions.pop(sid, None)
            return None
        return found

    def close_session(self, sid: str | None) -> None:
        if sid:
            self.sessions.pop(sid, None)
