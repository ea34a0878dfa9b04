"""Admin tokens: the console's bootstrap credential, before (or beside) single sign-on.

Admin tokens come from a secret: `EXTPROC_ADMIN_TOKENS` ("name:token,name:token") or the
file named by `EXTPROC_ADMIN_TOKENS_FILE` (one "name:token" or bare token per line, as a
Kubernetes Secret mounts it). The name is what the audit log records as "who". Tokens are
compared in constant time and are never virtual keys: an `sk-ext-` value is refused outright,
so a developer's key cannot open the admin API, and the gateway never accepts an admin token
(it is not in the key store).

A token shorter than MIN_TOKEN_CHARS, or one that still reads like the placeholder a manifest
ships (`replace-me-...`), stops the console at start: an admin credential anyone can read in
a public repository is worse than none.

With an OpenID Connect provider configured (`extproc.console.oidc`), people sign in as
themselves and admin tokens remain for automation and for the first sign-in's bootstrap.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from extproc.governance.keys import KEY_PREFIX

MIN_TOKEN_CHARS = 24
PLACEHOLDERS = ("replace-me", "replaceme", "changeme", "change-me", "placeholder", "example")


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
        if any(word in token.lower() for word in PLACEHOLDERS):
            raise AuthConfigError(
                f"{where}: entry {i + 1}: a placeholder token ({token[:12]}...): "
                "replace it with a secret of your own (openssl rand -hex 24)"
            )
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


@dataclass(frozen=True)
class Auth:
    tokens: dict[str, str]

    def admin(self, token: str | None) -> str | None:
        """The admin's name for a bearer token, else None."""
        if not token or token.startswith(KEY_PREFIX):
            return None
        found = None
        for known, name in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = name
        return found
