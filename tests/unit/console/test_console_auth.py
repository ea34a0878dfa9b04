"""Admin credentials and browser sessions of the console: parsing the secret, one-time
logins, and sessions in a real Redis (signed, expiring, revocable, shared by replicas)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from extproc.console.auth import Auth, AuthConfigError, parse_tokens, tokens_from_env
from extproc.console.config import ConsoleConfigError, settings_from_env
from extproc.console.sessions import SessionStore, mint_login, shared_secret
from extproc.governance.access import Person
from extproc.governance.guard import for_client, is_codex
from extproc.wire.errors import OpenAIError
from tests.conftest import run_with_redis


def test_tokens_are_named_and_checked() -> None:
    a, b = "a" * 23 + "1", "b" * 23 + "2"
    tokens = parse_tokens(f"alice:{a}, bob:{b}\n# comment\n", "env")
    assert tokens == {a: "alice", b: "bob"}
    assert parse_tokens("c" * 30, "env") == {"c" * 30: "admin"}
    with pytest.raises(AuthConfigError, match="entry 2: token shorter than 24"):
        parse_tokens(f"alice:{a},bob:short", "env")
    with pytest.raises(AuthConfigError, match="looks like a virtual key"):
        parse_tokens("eve:sk-ext-" + "x" * 40, "env")
    for placeholder in ("replace-me-admin-token-0000", "CHANGEME-0123456789abcdefgh"):
        with pytest.raises(AuthConfigError, match="entry 1: a placeholder token"):
            parse_tokens(f"ops:{placeholder}", "env")


def test_tokens_from_a_mounted_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("ops:0123456789abcdef0123456789\n")
    assert tokens_from_env({"EXTPROC_ADMIN_TOKENS_FILE": str(path)}) == {
        "0123456789abcdef0123456789": "ops"
    }
    with pytest.raises(AuthConfigError, match="cannot read"):
        tokens_from_env({"EXTPROC_ADMIN_TOKENS_FILE": str(tmp_path / "missing")})
    auth = Auth({"0123456789abcdef0123456789": "ops"})
    assert auth.admin("0123456789abcdef0123456789") == "ops"
    assert auth.admin("0123456789abcdef0123456788") is None
    assert auth.admin("sk-ext-" + "0" * 40) is None and auth.admin("") is None


def test_console_settings(tmp_path: Path) -> None:
    secret = tmp_path / "client-secret"
    secret.write_text("s3cret\n")
    settings = settings_from_env(
        {
            "EXTPROC_OIDC_ISSUER": "https://idp.example.com/",
            "EXTPROC_OIDC_CLIENT_ID": "console",
            "EXTPROC_OIDC_CLIENT_SECRET_FILE": str(secret),
            "EXTPROC_OIDC_AUDIENCE": "https://console.example.com/api",
            "EXTPROC_CONSOLE_SECURE_COOKIES": "TRUE",
        }
    )
    assert settings.oidc is not None and settings.oidc.issuer == "https://idp.example.com"
    assert settings.oidc.client_secret == "s3cret" and settings.oidc.recheck_seconds == 0
    assert settings.secure_cookies == "true" and settings.session_seconds == 12 * 3600
    assert settings_from_env({}).oidc is None
    for env, message in (
        ({"EXTPROC_OIDC_ISSUER": "idp.example.com"}, "must be an http:// or https:// URL"),
        ({"EXTPROC_CONSOLE_SESSION_HOURS": "0"}, "at least 1"),
        ({"EXTPROC_CONSOLE_SECRET": "short"}, "at least 32 characters"),
        (
            {
                "EXTPROC_OIDC_ISSUER": "https://i.example.com",
                "EXTPROC_OIDC_CLIENT_ID": "c",
                "EXTPROC_OIDC_CLIENT_SECRET": "x",
                "EXTPROC_OIDC_SCOPES": "email",
            },
            "must include openid",
        ),
    ):
        with pytest.raises(ConsoleConfigError, match=message):
            settings_from_env(env)


def test_sessions_are_signed_shared_and_revocable(r: redis.Redis, redis_url: str) -> None:
    ana = Person("sub-ana", "ana@example.com", "Ana", frozenset({"finance"}))

    async def body(client: Any) -> None:
        secret = await shared_secret(client, None)
        assert await shared_secret(client, None) == secret  # every replica finds the same
        one, two = SessionStore(client, secret, 3600), SessionStore(client, secret, 3600)
        cookie = await one.open(ana, "oidc", "access-token")
        found = await two.get(cookie)  # "another replica"
        assert found is not None and found.person == ana and found.via == "oidc"
        assert found.access_token == "access-token" and len(found.csrf) > 20
        sid, _, sig = cookie.rpartition(".")
        assert await two.get(f"{sid}.{'A' * len(sig)}") is None  # forged signature
        assert await two.get(sid) is None and await two.get(None) is None
        other = SessionStore(client, b"another-secret", 3600)
        assert await other.get(cookie) is None  # not signed by the shared key
        await two.regroup(found, frozenset({"platform-admins"}))
        again = await one.get(cookie)
        assert again is not None and again.person.groups == {"platform-admins"}
        await one.flash(found, {"key": "shown once"})
        assert await two.take_flash(found) == {"key": "shown once"}
        assert await two.take_flash(found) is None
        second = await one.open(ana, "oidc")
        assert await one.close_all("sub-ana") == 2
        assert await two.get(cookie) is None and await two.get(second) is None
        third = await one.open(ana, "oidc")
        session = await one.get(third)
        assert session is not None
        await two.close(session)
        assert await one.get(third) is None
        expired = SessionStore(client, secret, 0)
        assert await expired.get(await expired.open(ana, "oidc")) is None

    run_with_redis(redis_url, body)
    assert r.keys("{extproc:console}:session:*") == []  # nothing left behind


def test_login_links_work_once_on_any_replica(r: redis.Redis, redis_url: str) -> None:
    token = mint_login(r)

    async def body(client: Any) -> list[bool]:
        store = SessionStore(client, b"k" * 32, 60)
        return [await store.use_login(token), await store.use_login(token)]

    assert run_with_redis(redis_url, body) == [True, False]
    assert token.encode() not in b"".join(r.keys("*"))  # stored as a digest


def test_refusal_shape_per_client() -> None:
    quota = OpenAIError(429, "Budget exhausted.", "insufficient_quota", None, "insufficient_quota")
    assert is_codex("codex_cli_rs", "") and is_codex("", "codex_exec/0.171.0 (Linux)")
    assert not is_codex("", "OpenAI/Python 1.60.0")
    sdk = for_client(quota, codex=False, contact="#help")
    assert (sdk.status, sdk.code, sdk.message) == (
        429,
        "insufficient_quota",
        "Budget exhausted. Whom to ask: #help.",
    )
    codex = for_client(quota, codex=True, contact=None)
    assert (codex.status, codex.type, codex.code) == (
        400,
        "insufficient_quota",
        "insufficient_quota",
    )
    bad = OpenAIError(400, "bad json", "invalid_request_error", None, "invalid_json")
    assert for_client(bad, codex=True, contact="#help") is bad  # not a refusal: unchanged
    server = OpenAIError(503, "down", "server_error", None, "budget_store_unavailable")
    assert for_client(server, codex=True, contact="#help") is server  # Codex retries 5xx
