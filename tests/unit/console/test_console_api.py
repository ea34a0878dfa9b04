"""The admin API against a real stack: every endpoint, and who may call it.

Real Envoy, sidecar, Redis and simulator, plus the console process (uvicorn) started by the
stack as `make run` starts it; httpx is the API client, the openai SDK makes the traffic.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from extproc.devstack.stack import Stack, free_port
from tests.conftest import CONSOLE_POLICY, cli, new_key, policy_stack, wait_record

ADMIN = "ops-token-0123456789abcdef"
OTHER_ADMIN = "second-token-abcdef0123456789"


@pytest.fixture(scope="module")
def cstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with policy_stack(
        tmp_path_factory,
        CONSOLE_POLICY,
        {"TEST_UPSTREAM": "sk-upstream"},
        console_port=free_port(),
        console_env={"EXTPROC_ADMIN_TOKENS": f"alice:{ADMIN},bob:{OTHER_ADMIN}"},
    ) as s:
        yield s


@pytest.fixture(scope="module")
def api(cstack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=cstack.console_url + "/admin/v1",
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=30,
    ) as client:
        yield client


def test_openapi_document_describes_every_endpoint(cstack: Stack) -> None:
    doc = httpx.get(cstack.console_url + "/admin/v1/openapi.json", timeout=10).json()
    paths = set(doc["paths"])
    for path in (
        "/admin/v1/keys",
        "/admin/v1/keys/{key_id}/rotate",
        "/admin/v1/keys/{key_id}/revoke",
        "/admin/v1/spend",
        "/admin/v1/usage",
        "/admin/v1/policy",
        "/admin/v1/policy/validate",
        "/admin/v1/alerts",
        "/admin/v1/audit",
    ):
        assert path in paths, path
    assert not any(p.startswith("/keys") or p == "/" for p in paths)  # pages stay out


def test_admin_api_refuses_everyone_without_an_admin_token(cstack: Stack) -> None:
    dev = new_key(cstack, "dev", "cli")
    base = cstack.console_url + "/admin/v1"
    for headers in (
        {},
        {"authorization": f"Bearer {dev['key']}"},  # a developer's virtual key
        {"authorization": "Bearer not-the-token-000000000"},
        {"authorization": ADMIN},  # no scheme
    ):
        for method, path in (("GET", "/keys"), ("GET", "/usage"), ("POST", "/keys")):
            resp = httpx.request(method, base + path, headers=headers, json={}, timeout=10)
            assert resp.status_code == 401, (headers, path, resp.text)
            assert resp.json()["error"]["code"] == "unauthorized"


def test_admin_token_is_not_a_virtual_key(cstack: Stack) -> None:
    client = openai.OpenAI(base_url=cstack.base_url, api_key=ADMIN, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    me = httpx.get(
        cstack.base_url.removesuffix("/v1") + "/extproc/v1/me",
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=10,
    )
    assert me.status_code == 401


def test_key_lifecycle_through_the_api_works_at_the_gateway(
    cstack: Stack, api: httpx.Client
) -> None:
    made = api.post("/keys", json={"workspace": "dev", "service": "etl", "owner": "carol"})
    assert made.status_code == 201, made.text
    key = made.json()
    assert key["team"] == "data" and key["key"].startswith("sk-ext-")
    listed = {k["key_id"]: k for k in api.get("/keys", params={"workspace": "dev"}).json()}
    assert listed[key["key_id"]]["status"] == "active"
    assert all(k["workspace"] == "dev" for k in listed.values())
    assert key["key"] not in json.dumps(listed)

    sdk = openai.OpenAI(base_url=cstack.base_url, api_key=key["key"], max_retries=0)
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    sdk.chat.completions.create(**chat)

    rotated = api.post(f"/keys/{key['key_id']}/rotate", json={"overlap_seconds": 0}).json()
    assert rotated["replaces"] == key["key_id"]
    new_sdk = openai.OpenAI(base_url=cstack.base_url, api_key=rotated["key"], max_retries=0)
    new_sdk.chat.completions.create(**chat)
    with pytest.raises(openai.AuthenticationError):
        sdk.chat.completions.create(**chat)  # overlap 0: the old key stopped at once

    revoked = api.post(f"/keys/{rotated['key_id']}/revoke")
    assert revoked.json()["status"] == "revoked"
    with pytest.raises(openai.AuthenticationError):
        new_sdk.chat.completions.create(**chat)

    refused = api.post("/keys", json={"workspace": "dev", "service": "nope"})
    assert refused.status_code == 400
    assert 'unknown service "nope"' in refused.json()["error"]["message"]
    missing = api.post("/keys/key_000000000000/revoke")
    assert missing.status_code == 400


def test_every_admin_action_is_audited_with_who(cstack: Stack, api: httpx.Client) -> None:
    made = api.post("/keys", json={"workspace": "prod", "service": "api"}).json()
    other = httpx.post(
        cstack.console_url + "/admin/v1/keys/" + made["key_id"] + "/revoke",
        headers={"authorization": f"Bearer {OTHER_ADMIN}"},
        timeout=10,
    )
    assert other.status_code == 200
    entries = api.get("/audit", params={"limit": 50}).json()
    create = next(
        e for e in entries if e["action"] == "keys.create" and e["target"] == made["key_id"]
    )
    revoke = next(
        e for e in entries if e["action"] == "keys.revoke" and e["target"] == made["key_id"]
    )
    assert create["who"] == "alice" and revoke["who"] == "bob"
    assert create["detail"]["workspace"] == "prod"
    assert revoke["time_ms"] >= create["time_ms"] > 0
    assert made["key"] not in json.dumps(entries)


def test_spend_equals_the_cli_figures(cstack: Stack, api: httpx.Client) -> None:
    r = redis.Redis.from_url(cstack.redis_url)
    key = new_key(cstack, "dev", "cli")
    sdk = openai.OpenAI(base_url=cstack.base_url, api_key=key["key"], max_retries=0)
    raw = sdk.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "count me"}]
    )
    wait_record(r, raw.headers["x-extproc-request-id"])
    now = "2026-12-01T12:00:00"
    from_api = api.get("/spend", params={"by": "team", "now": now}).json()
    from_cli = json.loads(cli(cstack, "spend", "--json", "--by", "team", "--now", now).stdout)
    assert from_api["rows"] == from_cli["rows"] and from_api["totals"] == from_cli["totals"]
    live = api.get("/spend").json()
    dev = next(row for row in live["rows"] if row["name"] == "dev")
    assert float(dev["spent_usd"]) > 0
    assert api.get("/spend", params={"by": "nope"}).status_code == 400


def test_usage_filters_and_pages(cstack: Stack, api: httpx.Client) -> None:
    r = redis.Redis.from_url(cstack.redis_url)
    a, b = new_key(cstack, "dev", "cli"), new_key(cstack, "prod", "api")
    ids: dict[str, list[str]] = {a["key_id"]: [], b["key_id"]: []}
    for key in (a, b, a, a, b):
        sdk = openai.OpenAI(base_url=cstack.base_url, api_key=key["key"], max_retries=0)
        raw = sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "page me"}]
        )
        ids[key["key_id"]].append(raw.headers["x-extproc-request-id"])
    for rid in ids[a["key_id"]] + ids[b["key_id"]]:
        wait_record(r, rid)

    page1 = api.get("/usage", params={"key_id": a["key_id"], "limit": 2}).json()
    assert [x["request_id"] for x in page1["records"]] == ids[a["key_id"]][::-1][:2]
    assert page1["next_cursor"]
    page2 = api.get(
        "/usage", params={"key_id": a["key_id"], "limit": 2, "cursor": page1["next_cursor"]}
    ).json()
    assert [x["request_id"] for x in page2["records"]] == ids[a["key_id"]][:1]
    assert page2["next_cursor"] is None

    prod = api.get("/usage", params={"workspace": "prod", "service": "api"}).json()["records"]
    assert {x["key_id"] for x in prod} == {b["key_id"]}
    team = api.get("/usage", params={"team": "platform", "limit": 500}).json()["records"]
    assert team and all(x["team"] == "platform" for x in team)
    none = api.get("/usage", params={"outcome": "rejected", "model": "no-such-model"}).json()
    assert none["records"] == []
    future = api.get("/usage", params={"since": "2099-01-01T00:00:00"}).json()
    assert future["records"] == []
    assert api.get("/usage", params={"cursor": "drop table"}).status_code == 400


def test_policy_in_force_and_validation(cstack: Stack, api: httpx.Client) -> None:
    current = api.get("/policy").json()
    assert current["workspaces"] == ["dev", "prod"]
    assert "budget_usd: 500" in current["text"]
    ok = api.post("/policy/validate", json={"text": CONSOLE_POLICY}).json()
    assert ok["valid"] is True and ok["workspaces"] == ["dev", "prod"]
    bad = api.post(
        "/policy/validate",
        json={"text": CONSOLE_POLICY.replace("budget_usd: 500", "budget_usd: lots")},
    ).json()
    assert bad["valid"] is False
    assert any(p.startswith("workspaces.prod.budget_usd") for p in bad["problems"])


def test_alerts_are_listed(cstack: Stack, api: httpx.Client) -> None:
    r = redis.Redis.from_url(cstack.redis_url)
    r.xadd(
        "{extproc:alerts}:recent",
        {"time_ms": "1", "event": "soft_limit", "workspace": "dev", "scope": "ws", "text": "t"},
    )
    alerts = api.get("/alerts").json()
    assert alerts[0]["event"] == "soft_limit" and alerts[0]["workspace"] == "dev"


# The placeholder deploy/base ships, a short token, and an SSO setting missing its partner:
# each stops the console before it listens, in one line naming what to fix.
BAD_STARTS = [
    (
        {"EXTPROC_ADMIN_TOKENS": "alice:short"},
        "extproc: EXTPROC_ADMIN_TOKENS: entry 1: token shorter than 24 characters",
    ),
    (
        {"EXTPROC_ADMIN_TOKENS": "platform:replace-me-admin-token-0000"},
        "extproc: EXTPROC_ADMIN_TOKENS: entry 1: a placeholder token (replace-me-a...): "
        "replace it with a secret of your own (openssl rand -hex 24)",
    ),
    (
        {"EXTPROC_OIDC_ISSUER": "https://idp.example.com"},
        "extproc: EXTPROC_OIDC_ISSUER is set: EXTPROC_OIDC_CLIENT_ID is required",
    ),
    (
        {"EXTPROC_OIDC_CLIENT_ID": "console"},
        "extproc: EXTPROC_OIDC_CLIENT_ID is set but EXTPROC_OIDC_ISSUER is not",
    ),
    (
        {"EXTPROC_CONSOLE_SECURE_COOKIES": "sometimes"},
        "extproc: EXTPROC_CONSOLE_SECURE_COOKIES must be one of auto, true, false, got 'sometimes'",
    ),
]


@pytest.mark.parametrize(("env", "line"), BAD_STARTS, ids=lambda v: str(v)[:40])
def test_console_refuses_a_bad_secret_or_setting_at_start(
    tmp_path: pytest.TempPathFactory, env: dict[str, str], line: str
) -> None:
    """deploy/base's admin token is a placeholder: a console started with it must stop."""
    tokens = (
        Path(__file__).resolve().parents[3] / "deploy" / "base" / "kustomization.yaml"
    ).read_text()
    assert "tokens=platform:replace-me-admin-token-0000" in tokens  # what the base ships
    out = subprocess.run(
        [sys.executable, "-m", "extproc", "console", "--port", "1"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr == line + "\n"
    assert out.stdout == ""


def test_what_if_cli_and_api_agree_on_the_live_ledger(
    cstack: Stack, api: httpx.Client, tmp_path: pytest.TempPathFactory
) -> None:
    key = new_key(cstack, "prod", "api")
    sdk = openai.OpenAI(base_url=cstack.base_url, api_key=key["key"], max_retries=0)
    raw = sdk.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "what if"}]
    )
    r = redis.Redis.from_url(cstack.redis_url)
    wait_record(r, raw.headers["x-extproc-request-id"])
    # prod can no longer afford anything: every prod request it served is refused.
    candidate = CONSOLE_POLICY.replace("budget_usd: 500", 'budget_usd: "0.000001"')
    path = tmp_path / "candidate.yaml"  # type: ignore[operator]
    path.write_text(candidate)
    from_api = api.post("/policy/what-if", json={"text": candidate, "since_days": 1}).json()
    out = cli(cstack, "policy", "what-if", str(path), "--since", "1d", "--json")
    from_cli = json.loads(out.stdout)
    assert from_api["valid"] is True
    for field in ("replayed_requests", "refused_requests", "actual_nanos", "candidate_nanos"):
        assert from_api[field] == from_cli[field], field
    prod = [
        rec
        for rec in api.get("/usage", params={"workspace": "prod", "limit": 500}).json()["records"]
        if rec["outcome"] != "rejected"
    ]
    assert from_cli["refused_by"].get("insufficient_quota", 0) == len(prod) > 0
    hard = next(s for s in from_cli["scopes"] if s["workspace"] == "prod" and s["scope"] == "ws")
    assert hard["hard_crossed_on"] is not None and hard["spent_nanos"] == 0
    bad = api.post("/policy/what-if", json={"text": "version: 1\n", "since_days": 1}).json()
    assert bad["valid"] is False and bad["problems"]


# --- what a browser is told (issue 19, item 5) ----------------------------------------------


def _admin_session(base: str, **headers: str) -> httpx.Response:
    return httpx.post(
        base + "/login", data={"token": ADMIN}, headers=headers, timeout=10, follow_redirects=False
    )


def test_pages_and_api_carry_the_security_headers(cstack: Stack) -> None:
    base = cstack.console_url
    for path in ("/login", "/admin/v1/keys", "/console.css", "/nope"):
        resp = httpx.get(base + path, headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)
        csp = resp.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp, path
        assert "script-src" not in csp  # no script is allowed at all
        assert resp.headers["x-frame-options"] == "DENY", path
        assert resp.headers["referrer-policy"] == "no-referrer", path
        assert resp.headers["x-content-type-options"] == "nosniff", path
    assert httpx.get(base + "/login", timeout=10).headers["cache-control"] == "no-store"
    assert "strict-transport-security" not in httpx.get(base + "/login", timeout=10).headers


def test_session_cookie_is_secure_behind_a_tls_proxy(cstack: Stack) -> None:
    plain = _admin_session(cstack.console_url)
    proxied = _admin_session(cstack.console_url, **{"x-forwarded-proto": "https"})
    for resp in (plain, proxied):
        assert resp.status_code == 303
    cookie = plain.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
    secure = proxied.headers["set-cookie"].lower()
    assert "secure" in secure and "httponly" in secure
    assert proxied.headers["strict-transport-security"].startswith("max-age=")


def test_logout_needs_the_sessions_csrf_token(cstack: Stack) -> None:
    with httpx.Client(base_url=cstack.console_url, timeout=10) as browser:
        assert browser.post("/login", data={"token": ADMIN}).status_code == 303
        page = browser.get("/me")
        csrf = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        assert browser.post("/logout", data={}).status_code == 400  # no token at all
        assert browser.post("/logout", data={"csrf": "forged"}).status_code == 403
        assert browser.get("/keys").status_code == 200  # still signed in
        assert browser.post("/logout", data={"csrf": csrf}).status_code == 303
        assert browser.get("/keys").headers["location"].startswith("/login")


def test_create_key_then_reload_makes_one_key(cstack: Stack, api: httpx.Client) -> None:
    """Post/redirect/get: the form's answer is a redirect; reloading it is a GET."""
    with httpx.Client(base_url=cstack.console_url, timeout=10) as browser:
        browser.post("/login", data={"token": ADMIN})
        page = browser.get("/keys")
        csrf = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        before = len(api.get("/keys").json())
        made = browser.post("/keys", data={"target": "prod/api", "owner": "x", "csrf": csrf})
        assert made.status_code == 303 and made.headers["location"] == "/keys"
        shown = browser.get("/keys")
        assert 'id="made-key"' in shown.text
        reloaded = browser.get("/keys")  # what a reload does after the redirect
        assert 'id="made-key"' not in reloaded.text
        assert len(api.get("/keys").json()) == before + 1


def test_usage_by_session_and_exported_for_viewers(cstack: Stack, api: httpx.Client) -> None:
    import csv
    import io

    r = redis.Redis.from_url(cstack.redis_url)
    key = new_key(cstack, "dev", "etl")
    sdk = openai.OpenAI(base_url=cstack.base_url, api_key=key["key"], max_retries=0)
    ids = []
    for text in ("one", "two"):
        raw = sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": text}],
            extra_headers={"session_id": f"export-{key['key_id']}"},
        )
        ids.append(raw.headers["x-extproc-request-id"])
    for rid in ids:
        wait_record(r, rid)
    session = {"session": f"export-{key['key_id']}"}
    found = api.get("/usage", params=session).json()["records"]
    assert [x["request_id"] for x in found] == ids[::-1]
    exported = api.get("/usage/export", params={**session, "format": "csv"})
    assert exported.status_code == 200
    assert exported.headers["content-disposition"].startswith("attachment;")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [row["request_id"] for row in rows] == ids  # oldest first, every column
    assert sum(int(row["cost_nanos"]) for row in rows) == sum(x["cost_nanos"] for x in found)
    focus = api.get("/usage/export", params={**session, "format": "focus"}).text
    assert focus.splitlines()[0].startswith("BilledCost,")
    assert len(focus.splitlines()) == 3
    assert api.get("/usage/export", params={"format": "xlsx"}).status_code == 400
