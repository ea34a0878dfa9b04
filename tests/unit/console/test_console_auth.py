"""Admin credentials of the console: parsing the secret, one-time logins, sessions."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.console.auth import Auth, AuthConfigError, parse_tokens, tokens_from_env
from extproc.governance.guard import for_client, is_codex
from extproc.wire.errors import OpenAIError


def test_tokens_are_named_and_checked() -> None:
    tokens = parse_tokens("alice:aaaaaaaaaaaaaaaa1, bob:bbbbbbbbbbbbbbbb2\n# comment\n", "env")
    assert tokens == {"aaaaaaaaaaaaaaaa1": "alice", "bbbbbbbbbbbbbbbb2": "bob"}
    assert parse_tokens("cccccccccccccccccccc", "env") == {"cccccccccccccccccccc": "admin"}
    with pytest.raises(AuthConfigError, match="entry 2: token shorter than 16"):
        parse_tokens("alice:aaaaaaaaaaaaaaaa1,bob:short", "env")
    with pytest.raises(AuthConfigError, match="looks like a virtual key"):
        parse_tokens("eve:sk-ext-" + "x" * 40, "env")


def test_tokens_from_a_mounted_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("ops:0123456789abcdef0123\n")
    assert tokens_from_env({"EXTPROC_ADMIN_TOKENS_FILE": str(path)}) == {
        "0123456789abcdef0123": "ops"
    }
    with pytest.raises(AuthConfigError, match="cannot read"):
        tokens_from_env({"EXTPROC_ADMIN_TOKENS_FILE": str(tmp_path / "missing")})


def test_admin_tokens_login_links_and_sessions() -> None:
    auth = Auth({"0123456789abcdef0123": "ops"})
    assert auth.admin("0123456789abcdef0123") == "ops"
    assert auth.admin("0123456789abcdef0124") is None
    assert auth.admin("sk-ext-" + "0" * 40) is None and auth.admin("") is None
    link = auth.mint_login()
    assert auth.use_login(link) is True
    assert auth.use_login(link) is False  # one time only
    sid = auth.open_session("ops")
    assert auth.session(sid).who == "ops"  # type: ignore[union-attr]
    auth.close_session(sid)
    assert auth.session(sid) is None and auth.session("forged") is None


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
