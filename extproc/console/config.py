"""The console's settings from its environment, checked once at start.

Everything the console needs besides Redis and the policy: the admin tokens (the bootstrap
path, `auth`), single sign-on with an OpenID Connect provider, and how its cookies and
sessions behave. A mistake is one line naming the variable (`ConsoleConfigError`), printed
by `extproc console` before it listens, never a traceback at the first request.

    EXTPROC_OIDC_ISSUER           the provider's issuer URL (discovery is read from
                                  ISSUER/.well-known/openid-configuration); unset: no SSO
    EXTPROC_OIDC_CLIENT_ID        the console's client at the provider
    EXTPROC_OIDC_CLIENT_SECRET    its secret (or EXTPROC_OIDC_CLIENT_SECRET_FILE)
    EXTPROC_OIDC_AUDIENCE         the `aud` the admin API requires of bearer JWTs; unset: the
                                  API takes admin tokens only
    EXTPROC_OIDC_SCOPES           default "openid email profile", plus "groups" when the
                                  provider lists it in scopes_supported
    EXTPROC_OIDC_RECHECK_SECONDS  how old a session's groups may get before the provider is
                                  asked again (userinfo); default 0: at every request
    EXTPROC_OIDC_LEEWAY_SECONDS   clock skew allowed on token expiry (default 60)
    EXTPROC_CONSOLE_URL           the console's public URL (the sign-in redirect goes to
                                  URL/auth/callback); default: the URL each request came to
    EXTPROC_CONSOLE_SECURE_COOKIES  auto (default: Secure when the request came over TLS or
                                  X-Forwarded-Proto says https), true, false
    EXTPROC_CONSOLE_SESSION_HOURS how long a browser session lasts (default 12)
    EXTPROC_CONSOLE_SECRET        signs session cookies (or _FILE); default: a random key kept
                                  in Redis, shared by every replica
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

SECURE_CHOICES = ("auto", "true", "false")
MAX_SESSION_HOURS = 24 * 30


class ConsoleConfigError(ValueError):
    """A console setting is unusable; the message names the variable and why."""


@dataclass(frozen=True, slots=True)
class OidcSettings:
    issuer: str
    client_id: str
    client_secret: str
    audience: str | None = None
    scopes: str | None = None
    recheck_seconds: int = 0
    leeway_seconds: int = 60


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    oidc: OidcSettings | None = None
    public_url: str | None = None
    secure_cookies: str = "auto"
    session_seconds: int = 12 * 3600
    secret: bytes | None = None


def _secret(env: Mapping[str, str], name: str) -> str | None:
    """`name` from the environment, else the file `name_FILE` names (a mounted Secret)."""
    value = env.get(name, "").strip()
    path = env.get(f"{name}_FILE", "").strip()
    if value and path:
        raise ConsoleConfigError(f"set {name} or {name}_FILE, not both")
    if path:
        try:
            value = Path(path).read_text("utf-8").strip()
        except OSError as exc:
            raise ConsoleConfigError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
        if not value:
            raise ConsoleConfigError(f"{name}_FILE: {path} is empty")
    return value or None


def _url(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip().rstrip("/")
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConsoleConfigError(f"{name} must be an http:// or https:// URL, got {value!r}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: int, top: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) > top:
        raise ConsoleConfigError(f"{name} must be a whole number from 0 to {top}, got {raw!r}")
    return int(raw)


def _oidc(env: Mapping[str, str]) -> OidcSettings | None:
    issuer = _url(env, "EXTPROC_OIDC_ISSUER")
    client_id = env.get("EXTPROC_OIDC_CLIENT_ID", "").strip()
    secret = _secret(env, "EXTPROC_OIDC_CLIENT_SECRET")
    if issuer is None:
        stray = [n for n in ("EXTPROC_OIDC_CLIENT_ID", "EXTPROC_OIDC_AUDIENCE") if env.get(n)]
        if stray or secret:
            named = stray[0] if stray else "EXTPROC_OIDC_CLIENT_SECRET"
            raise ConsoleConfigError(f"{named} is set but EXTPROC_OIDC_ISSUER is not")
        return None
    if not client_id:
        raise ConsoleConfigError("EXTPROC_OIDC_ISSUER is set: EXTPROC_OIDC_CLIENT_ID is required")
    if not secret:
        raise ConsoleConfigError(
            "EXTPROC_OIDC_ISSUER is set: EXTPROC_OIDC_CLIENT_SECRET (or _FILE) is required"
        )
    audience = env.get("EXTPROC_OIDC_AUDIENCE", "").strip() or None
    scopes = env.get("EXTPROC_OIDC_SCOPES", "").strip() or None
    if scopes is not None and "openid" not in scopes.split():
        raise ConsoleConfigError(f"EXTPROC_OIDC_SCOPES must include openid, got {scopes!r}")
    return OidcSettings(
        issuer=issuer,
        client_id=client_id,
        client_secret=secret,
        audience=audience,
        scopes=scopes,
        recheck_seconds=_seconds(env, "EXTPROC_OIDC_RECHECK_SECONDS", 0, 86400),
        leeway_seconds=_seconds(env, "EXTPROC_OIDC_LEEWAY_SECONDS", 60, 600),
    )


def settings_from_env(env: Mapping[str, str] | None = None) -> ConsoleSettings:
    env = os.environ if env is None else env
    secure = env.get("EXTPROC_CONSOLE_SECURE_COOKIES", "auto").strip().lower() or "auto"
    if secure not in SECURE_CHOICES:
        raise ConsoleConfigError(
            f"EXTPROC_CONSOLE_SECURE_COOKIES must be one of {', '.join(SECURE_CHOICES)}, "
            f"got {secure!r}"
        )
    hours = _seconds(env, "EXTPROC_CONSOLE_SESSION_HOURS", 12, MAX_SESSION_HOURS)
    if hours == 0:
        raise ConsoleConfigError("EXTPROC_CONSOLE_SESSION_HOURS must be at least 1")
    secret = _secret(env, "EXTPROC_CONSOLE_SECRET")
    if secret is not None and len(secret) < 32:
        raise ConsoleConfigError("EXTPROC_CONSOLE_SECRET must be at least 32 characters")
    return ConsoleSettings(
        oidc=_oidc(env),
        public_url=_url(env, "EXTPROC_CONSOLE_URL"),
        secure_cookies=secure,
        session_seconds=hours * 3600,
        secret=secret.encode() if secret else None,
    )
