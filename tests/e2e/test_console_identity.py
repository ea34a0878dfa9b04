"""Console identity against a real OpenID Connect provider (npm's oidc-provider under node),
a real stack (Redis, sidecar, Envoy, the console as `make run` starts it) and a second console
process on the same Redis: sign-in in a real browser, roles from the provider's groups on
every route, sessions any replica serves, the provider's JWTs on the admin API, personal keys
and what happens to them when their holder leaves.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from extproc.console.app import create_app
from extproc.console.auth import Auth
from extproc.console.identity import PUBLIC_ROUTES, Need
from extproc.console.state import ConsoleState
from extproc.devstack.stack import Child, Stack, free_port
from tests.conftest import policy_stack
from tests.oidc.idp import (
    AUDIENCE,
    CLIENT_ID,
    CLIENT_SECRET,
    OTHER_API,
    SHORT_LIVED,
    IdP,
    browser_sign_in,
    running_idp,
)

ADMIN_TOKEN = "identity-admin-0123456789abcdef"
POLICY = """
version: 1
timezone: Europe/Berlin
defaults: {default_output_cap: 64}
workspaces:
  dev:
    budget_usd: 100
    upstream: {key_env: TEST_UPSTREAM}
    approvers: {people: [lena@example.com]}
    teams:
      platform: {budget_usd: 40, approvers: {groups: [leads-platform]}}
      data: {}
    services:
      cli: {team: platform}
      etl: {team: data}
  prod:
    budget_usd: 500
    upstream: {key_env: TEST_UPSTREAM}
    services:
      api: {}
console:
  roles: {admin: [platform-admins], viewer: [finance]}
  personal_keys:
    - {groups: [developers], workspace: dev, services: [cli], max_days: 30}
"""
# login -> (email, groups): one person per kind of caller.
PEOPLE = {
    "root": ("root@example.com", ["platform-admins"]),
    "fin": ("fin@example.com", ["finance"]),
    "dev": ("dev@example.com", ["developers"]),
    "lead": ("lead@example.com", ["leads-platform"]),
    "lena": ("lena@example.com", []),  # an approver by name, in no group
    "sales": ("sales@example.com", ["sales"]),  # the console lets them in nowhere
}
# Every route and what it needs. A new route fails test_every_route_checks_its_role until
# it is listed here, with the capability the product means it to need.
EXPECTED = {
    ("GET", "/"): "signed_in",  # viewers see the overview; anyone else is sent to /me
    ("GET", "/w/{workspace}"): "view",
    ("GET", "/usage"): "view",
    ("GET", "/usage/export"): "view",
    ("GET", "/alerts"): "view",
    ("GET", "/audit"): "admin",
    ("GET", "/what-if"): "admin",
    ("POST", "/what-if"): "admin",
    ("GET", "/shadow"): "admin",
    ("GET", "/keys"): "admin",
    ("POST", "/keys"): "admin",
    ("POST", "/keys/{key_id}/revoke"): "admin",
    ("GET", "/me"): "signed_in",
    ("POST", "/me/keys"): "signed_in",
    ("POST", "/me/keys/{key_id}/revoke"): "signed_in",
    ("GET", "/people"): "admin",
    ("POST", "/people/disable"): "admin",
    ("POST", "/people/enable"): "admin",
    ("GET", "/approvals"): "approve",
    ("POST", "/approvals/{request_id}/approve"): "approve",
    ("POST", "/approvals/{request_id}/deny"): "approve",
    ("POST", "/approvals/{request_id}/revoke"): "approve",
    ("POST", "/keys/{key_id}/resume"): "signed_in",  # whose key it is: checked inside
    ("POST", "/keys/{key_id}/pause"): "admin",
    ("POST", "/logout"): "signed_in",
    ("POST", "/logout/everywhere"): "signed_in",
    ("GET", "/admin/v1/keys"): "admin",
    ("POST", "/admin/v1/keys"): "admin",
    ("POST", "/admin/v1/keys/{key_id}/rotate"): "admin",
    ("POST", "/admin/v1/keys/{key_id}/revoke"): "admin",
    ("GET", "/admin/v1/spend"): "view",
    ("GET", "/admin/v1/usage"): "view",
    ("GET", "/admin/v1/usage/export"): "view",
    ("GET", "/admin/v1/alerts"): "view",
    ("GET", "/admin/v1/policy"): "admin",
    ("POST", "/admin/v1/policy/validate"): "admin",
    ("POST", "/admin/v1/policy/what-if"): "admin",
    ("GET", "/admin/v1/shadow"): "admin",
    ("GET", "/admin/v1/audit"): "admin",
    ("GET", "/admin/v1/me"): "signed_in",
    ("GET", "/admin/v1/me/keys"): "signed_in",
    ("POST", "/admin/v1/me/keys"): "signed_in",
    ("POST", "/admin/v1/me/keys/{key_id}/revoke"): "signed_in",
    ("GET", "/admin/v1/people"): "admin",
    ("POST", "/admin/v1/people/disable"): "admin",
    ("POST", "/admin/v1/people/enable"): "admin",
    ("GET", "/admin/v1/approvals"): "approve",
    ("GET", "/admin/v1/topups"): "approve",
    ("POST", "/admin/v1/topups/{request_id}/approve"): "approve",
    ("POST", "/admin/v1/topups/{request_id}/deny"): "approve",
    ("POST", "/admin/v1/topups/{request_id}/revoke"): "approve",
    ("GET", "/admin/v1/paused"): "signed_in",
    ("POST", "/admin/v1/keys/{key_id}/resume"): "signed_in",
    ("POST", "/admin/v1/keys/{key_id}/pause"): "admin",
}
# What each person may do, by capability (the admin role includes viewing and approving).
MAY = {
    "root": {"signed_in", "view", "admin", "approve"},
    "fin": {"signed_in", "view"},
    "dev": {"signed_in"},
    "lead": {"signed_in", "approve"},
    "lena": {"signed_in", "approve"},
}


@dataclass
class World:
    stack: Stack
    idp: IdP
    console2: str  # a second console process on the same Redis

    @property
    def console(self) -> str:
        return self.stack.console_url


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    port, port2 = free_port(), free_port()
    urls = [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port2}"]
    with running_idp(tmp_path_factory.mktemp("idp"), urls) as idp:
        for login, (email, groups) in PEOPLE.items():
            idp.person(login, email, groups)
        env = {"EXTPROC_ADMIN_TOKENS": f"ops:{ADMIN_TOKEN}", **idp.console_env()}
        with policy_stack(
            tmp_path_factory,
            POLICY,
            {"TEST_UPSTREAM": "sk-upstream"},
            console_port=port,
            console_env=env,
        ) as stack:
            second = Child(
                "console2",
                [sys.executable, "-m", "extproc", "console", "--port", str(port2)],
                {
                    **os.environ,
                    "EXTPROC_REDIS_URL": stack.redis_url,
                    "EXTPROC_POLICY": str(stack.policy_path),  # type: ignore[attr-defined]
                    "PYTHONUNBUFFERED": "1",
                    **env,
                },
            )
            try:
                second.wait_for_line("console listening")
                yield World(stack, idp, urls[1])
            finally:
                second.stop()


@contextmanager
def signed_in(world: World, login: str, console: str | None = None) -> Iterator[httpx.Client]:
    """A cookie jar signed in as `login` (through the provider, as a browser would)."""
    with httpx.Client(timeout=30) as client:
        done = world.idp.sign_in(client, console or world.console, login)
        assert done.status_code == 200 and "Signed in as" in done.text, done.text
        yield client


def csrf_of(client: httpx.Client, console: str) -> str:
    page = client.get(f"{console}/me")
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# --- every route, every role -----------------------------------------------------------------


def app_routes() -> dict[tuple[str, str], str | None]:
    """(method, path) -> the capability the route's Need declares (None: declares none)."""
    state = ConsoleState("redis://127.0.0.1:1/0", None, Auth({}))
    out: dict[tuple[str, str], str | None] = {}
    routes, flat = list(create_app(state).routes), []
    while routes:  # FastAPI keeps included routers as such: flatten them
        route = routes.pop()
        inner = getattr(route, "original_router", None)
        routes.extend(inner.routes) if inner is not None else flat.append(route)
    for route in flat:
        methods = getattr(route, "methods", None) or {"GET"}
        dependant = getattr(route, "dependant", None)
        needs = []
        stack = list(dependant.dependencies) if dependant else []
        while stack:
            dep = stack.pop()
            if isinstance(dep.call, Need):
                needs.append(dep.call.capability)
            stack.extend(dep.dependencies)
        for method in methods - {"HEAD"}:
            out[(method, route.path)] = needs[0] if len(needs) == 1 else None
    return out


def test_every_route_declares_the_capability_it_needs() -> None:
    routes = app_routes()
    undeclared = sorted(r for r, need in routes.items() if need is None and r not in PUBLIC_ROUTES)
    assert undeclared == [], "routes without a Need: list them in EXPECTED or PUBLIC_ROUTES"
    declared = {r: need for r, need in routes.items() if r not in PUBLIC_ROUTES}
    assert declared == EXPECTED
    assert {r for r in routes if r in PUBLIC_ROUTES} == PUBLIC_ROUTES


def _call(client: httpx.Client, base: str, method: str, path: str, csrf: str) -> httpx.Response:
    url = base + path.replace("{workspace}", "dev").replace("{key_id}", "key_000000000000")
    url = url.replace("{request_id}", "tu_0000000000")
    if method == "GET":
        return client.get(url)
    if path.startswith("/admin/"):
        return client.post(url, json={})
    return client.post(url, data={"csrf": csrf})


def _allowed(response: httpx.Response) -> bool:
    if response.status_code in (401, 403):
        return False
    location = response.headers.get("location", "")
    return not location.startswith("/login")


def test_every_route_checks_its_role(world: World) -> None:
    """Each person, through a browser session (pages) and the provider's JWT (the API), and
    nobody at all, against every route: allowed exactly where their capabilities say."""
    last = [r for r in EXPECTED if r[1].startswith("/logout")]  # they end the session
    order = [r for r in EXPECTED if r not in last] + last
    seen: dict[tuple[str, str, str], int] = {}
    with httpx.Client(timeout=30) as nobody:
        for method, path in order:
            response = _call(nobody, world.console, method, path, "")
            if path.startswith("/admin/"):
                assert response.status_code == 401, (method, path, response.text)
            else:
                assert response.status_code == 303, (method, path)
                assert response.headers["location"].startswith("/login"), (method, path)
    for login, may in MAY.items():
        token = world.idp.access_token(login)
        with (
            signed_in(world, login) as browser,
            httpx.Client(timeout=30, headers=bearer(token)) as api,
        ):
            csrf = csrf_of(browser, world.console)
            for method, path in order:
                if path.startswith("/logout"):  # each ends its session: a fresh one each
                    with signed_in(world, login) as fresh:
                        token_ = csrf_of(fresh, world.console)
                        out = _call(fresh, world.console, method, path, token_)
                        after = fresh.get(world.console + "/me")
                    assert out.status_code == 303 and after.status_code == 303, (login, path)
                    continue
                client = api if path.startswith("/admin/") else browser
                response = _call(client, world.console, method, path, csrf)
                seen[(login, method, path)] = response.status_code
                wanted = EXPECTED[(method, path)] in may
                assert _allowed(response) == wanted, (login, method, path, response.text[:300])
                if not wanted:
                    assert response.status_code == 403, (login, method, path)
    assert seen[("dev", "GET", "/")] == 303  # a developer lands on their own page
    # Someone the policy lets in nowhere is refused at sign-in and by the API.
    with httpx.Client(timeout=30) as client:
        refused = world.idp.sign_in(client, world.console, "sales")
        assert refused.status_code == 403 and "grant no access" in refused.text
        assert client.get(world.console + "/me").status_code == 303  # no session was made
    sales = world.idp.access_token("sales")
    answer = httpx.get(world.console + "/admin/v1/me", headers=bearer(sales), timeout=30)
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "forbidden"


# --- the admin API with the provider's JWTs --------------------------------------------------


# --- in a real browser -----------------------------------------------------------------------

playwright_sync = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _browser_sign_in(page: Any, world: World, login: str) -> None:
    browser_sign_in(page, world.console, login)


def test_sign_in_see_only_what_the_role_allows_sign_out(world: World, browser: Any) -> None:
    for login, shown, hidden in (
        ("fin", ["Overview", "Usage", "Alerts", "My keys"], ["Keys", "People", "Audit"]),
        ("root", ["Overview", "Keys", "People", "Audit", "What-if", "Approvals"], []),
        ("lead", ["Approvals", "My keys"], ["Overview", "Keys", "Usage"]),
        ("dev", ["My keys"], ["Overview", "Usage", "Keys", "Approvals"]),
    ):
        context = browser.new_context()
        errors: list[str] = []
        page = context.new_page()
        page.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
        # Script errors anywhere; console errors on the console's own pages (the provider's
        # development login page loads things it cannot reach here), bar the 403 we asked for.
        page.on(
            "console",
            lambda m, errors=errors, page=page: (
                errors.append(f"{page.url}: {m.text}")
                if m.type == "error"
                and page.url.startswith(world.console)
                and not page.url.endswith("/keys")
                else None
            ),
        )
        try:
            _browser_sign_in(page, world, login)
            assert PEOPLE[login][0] in page.locator("#who").inner_text()
            nav = [a.strip() for a in page.locator("#nav a").all_inner_texts()]
            assert all(item in nav for item in shown), (login, nav)
            assert not any(item in nav for item in hidden), (login, nav)
            if login == "fin":
                assert page.locator("#workspaces").count() == 1  # the overview itself
                assert page.locator(".daily-chart svg .tick").count() >= 2  # a y axis
                page.goto(world.console + "/keys")
                assert page.locator("h1").inner_text() == "403"
                page.goto(world.console + "/")
            if login == "lead":
                page.goto(world.console + "/approvals")
                scope = page.locator('#scopes li[data-workspace="dev"]')
                assert scope.get_attribute("data-team") == "platform"
            if login == "dev":  # lands on their keys; mints one, reload shows it once
                assert page.url.endswith("/me")
                page.fill("#days", "3")
                page.click("text=Create my key")
                page.wait_for_url("**/me")
                secret = page.locator("#made-key").inner_text().strip()
                assert _works(world.stack, secret)
                page.reload()
                assert page.locator("#made-key").count() == 0
                key_id = page.locator("#my-keys tr[data-key-id]").last.get_attribute("data-key-id")
                page.locator(f'tr[data-key-id="{key_id}"] button.revoke').click()
                page.wait_for_url("**/me")
                status = page.locator(f'tr[data-key-id="{key_id}"] .status').inner_text()
                assert status == "revoked" and not _works(world.stack, secret)
            page.click("#logout button")
            page.wait_for_url("**/login")
            page.goto(world.console + "/me")
            assert "/login" in page.url  # signed out
            assert errors == [], errors
        finally:
            context.close()


def test_admin_api_takes_the_providers_jwts(world: World) -> None:
    api = world.console + "/admin/v1"
    admin, viewer = world.idp.access_token("root"), world.idp.access_token("fin")
    assert httpx.get(f"{api}/keys", headers=bearer(admin), timeout=30).status_code == 200
    assert httpx.get(f"{api}/spend", headers=bearer(viewer), timeout=30).status_code == 200
    wrong_role = httpx.get(f"{api}/keys", headers=bearer(viewer), timeout=30)
    assert wrong_role.status_code == 403
    assert "needs admin" in wrong_role.json()["error"]["message"]

    other = world.idp.access_token("root", OTHER_API)
    wrong_audience = httpx.get(f"{api}/keys", headers=bearer(other), timeout=30)
    assert wrong_audience.status_code == 401
    assert "audience" in wrong_audience.json()["error"]["message"]

    short = world.idp.access_token("root", SHORT_LIVED)
    expires = _claims(short)["exp"]
    assert _claims(short)["aud"] == AUDIENCE and expires - _claims(short)["iat"] <= 2
    while time.time() < expires + 1:  # the token's own clock: wait until it has expired
        time.sleep(expires + 1 - time.time())
    expired = httpx.get(f"{api}/keys", headers=bearer(short), timeout=30)
    assert expired.status_code == 401 and "expired" in expired.json()["error"]["message"]

    # Same claims, signed by a key the provider never published.
    forged_key = RSAKey.generate_key(2048, parameters={"kid": _header(admin)["kid"]})
    forged = jwt.encode({"alg": "RS256", "kid": forged_key.kid}, _claims(admin), forged_key)
    refused = httpx.get(f"{api}/keys", headers=bearer(forged), timeout=30)
    assert refused.status_code == 401 and "signature" in refused.json()["error"]["message"]
    # The bootstrap path beside it: an admin token still works.
    ops = httpx.get(f"{api}/keys", headers=bearer(ADMIN_TOKEN), timeout=30)
    assert ops.status_code == 200


def _part(token: str, index: int) -> dict[str, Any]:
    import base64

    raw = token.split(".")[index]
    return json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))  # type: ignore[no-any-return]


def _claims(token: str) -> dict[str, Any]:
    return _part(token, 1)


def _header(token: str) -> dict[str, Any]:
    return _part(token, 0)


# --- sessions across replicas ----------------------------------------------------------------


def test_a_session_works_on_either_console_and_logout_ends_it_on_both(world: World) -> None:
    with signed_in(world, "fin") as client:  # signed in through console 1
        for console in (world.console, world.console2):
            page = client.get(console + "/")
            assert page.status_code == 200 and 'id="workspaces"' in page.text, console
        csrf = csrf_of(client, world.console2)
        stale = client.post(world.console2 + "/logout", data={"csrf": "not-the-token"})
        assert stale.status_code == 403  # logout needs the session's CSRF token
        assert client.get(world.console + "/").status_code == 200  # ...and it is still valid
        out = client.post(world.console2 + "/logout", data={"csrf": csrf})
        assert out.status_code == 303 and out.headers["location"] == "/login"
        for console in (world.console, world.console2):
            again = client.get(console + "/")
            assert again.status_code == 303 and again.headers["location"] == "/login", console


def test_sign_out_everywhere_and_a_removed_group(world: World) -> None:
    """Two browsers of one person; signing out everywhere ends both. Then the provider
    drops a group: the next request already has the smaller role."""
    with signed_in(world, "fin") as one, signed_in(world, "fin", world.console2) as two:
        csrf = csrf_of(two, world.console2)
        ended = two.post(world.console2 + "/logout/everywhere", data={"csrf": csrf})
        assert ended.status_code == 303
        assert one.get(world.console + "/").headers.get("location") == "/login"
    with signed_in(world, "root") as admin:
        assert admin.get(world.console + "/keys").status_code == 200
        world.idp.person("root", "root@example.com", ["finance"])  # demoted at the provider
        try:
            assert admin.get(world.console + "/keys").status_code == 403
            assert admin.get(world.console2 + "/").status_code == 200  # still a viewer
            world.idp.person("root", "root@example.com", ["sales"])  # and then removed
            gone = admin.get(world.console + "/")
            assert gone.status_code == 403 and "no longer grant access" in gone.text
            assert admin.get(world.console + "/").headers.get("location") == "/login"
        finally:
            world.idp.person("root", "root@example.com", ["platform-admins"])


# --- keys people own -------------------------------------------------------------------------


def _works(stack: Stack, secret: str) -> bool:
    client = openai.OpenAI(base_url=stack.base_url, api_key=secret, max_retries=0)
    try:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "mine"}]
        )
    except openai.AuthenticationError:
        return False
    return True


def test_approve_a_top_up_as_an_approver(world: World, browser: Any) -> None:
    """The top-up flow through the identity: the lead of team platform (an approver through
    a group) approves their team's request in a real browser and never sees the workspace's;
    the workspace's approver (named in the policy) approves that one with the provider's
    token; each decision names who made it."""
    api = world.console + "/admin/v1"
    key = httpx.post(f"{api}/keys", headers=bearer(ADMIN_TOKEN),
                     json={"workspace": "dev", "service": "cli"}).json()  # fmt: skip
    gateway = world.stack.base_url.removesuffix("/v1")

    def ask(scope: str) -> str:
        made = httpx.post(
            f"{gateway}/extproc/v1/topups", headers=bearer(key["key"]), timeout=30,
            json={"scope": scope, "amount_usd": "5", "until": "period", "reason": scope},
        )  # fmt: skip
        assert made.status_code == 201, made.text
        return str(made.json()["id"])

    team, whole = ask("team:platform"), ask("ws")
    context = browser.new_context()
    try:
        page = context.new_page()
        _browser_sign_in(page, world, "lead")
        page.goto(world.console + "/approvals")
        assert page.locator(f'#pending tr[data-request-id="{team}"]').count() == 1
        assert page.locator(f'tr[data-request-id="{whole}"]').count() == 0  # not theirs
        page.locator(f'#pending tr[data-request-id="{team}"] button.approve').click()
        page.wait_for_selector(f'#decided tr[data-request-id="{team}"]')
        row = page.locator(f'#decided tr[data-request-id="{team}"]')
        assert row.locator(".status").inner_text() == "approved"
        assert "lead@example.com" in row.inner_text()
    finally:
        context.close()
    lead, lena = world.idp.access_token("lead"), world.idp.access_token("lena")
    refused = httpx.post(f"{api}/topups/{whole}/approve", headers=bearer(lead), json={})
    assert refused.status_code == 403 and "workspace dev" in refused.json()["error"]["message"]
    done = httpx.post(f"{api}/topups/{whole}/approve", headers=bearer(lena), json={})
    assert done.status_code == 200 and done.json()["decided_by"] == "lena@example.com"
    me = httpx.get(f"{gateway}/extproc/v1/me", headers=bearer(key["key"])).json()
    granted = {b["scope"]: b["topup_usd"] for b in me["budgets"] if b["topup_usd"]}
    assert granted == {"ws": "5", "team:platform": "5"}
    entries = httpx.get(f"{api}/audit", headers=bearer(ADMIN_TOKEN), params={"limit": 1000}).json()
    decided = {e["target"]: e["subject"] for e in entries if e["action"] == "topup.approve"}
    assert decided == {team: "lead", whole: "lena"}


def test_personal_keys_and_offboarding(world: World) -> None:
    api = world.console + "/admin/v1"
    token = world.idp.access_token("dev")
    me = httpx.get(f"{api}/me", headers=bearer(token), timeout=30).json()
    assert me["roles"] == [] and me["personal_keys"] == [
        {"workspace": "dev", "service": "cli", "max_days": 30}
    ]
    refused = httpx.post(
        f"{api}/me/keys", headers=bearer(token), json={"workspace": "prod", "service": "api"}
    )
    assert refused.status_code == 400 and "may not hold a personal key" in refused.text
    too_long = httpx.post(
        f"{api}/me/keys",
        headers=bearer(token),
        json={"workspace": "dev", "service": "cli", "days": 31},
    )
    assert too_long.status_code == 400 and "1 to 30 days" in too_long.text
    made = httpx.post(
        f"{api}/me/keys",
        headers=bearer(token),
        json={"workspace": "dev", "service": "cli", "days": 2},
        timeout=30,
    ).json()
    assert made["owner"] == "dev@example.com" and made["team"] == "platform"
    assert abs(made["expires_ms"] - (time.time() + 2 * 86400) * 1000) < 60_000
    assert _works(world.stack, made["key"])
    # An admin's key for someone else is not theirs to revoke.
    other = httpx.post(
        f"{api}/keys", headers=bearer(ADMIN_TOKEN), json={"workspace": "dev", "service": "cli"}
    ).json()
    theirs = httpx.post(f"{api}/me/keys/{other['key_id']}/revoke", headers=bearer(token))
    assert theirs.status_code == 400 and "not one of your personal keys" in theirs.text
    listed = httpx.get(f"{api}/me/keys", headers=bearer(token), timeout=30).json()
    mine = {k["key_id"]: k for k in listed}
    assert made["key_id"] in mine and other["key_id"] not in mine
    assert {k["owner_sub"] for k in listed} == {"dev"}

    # The admin disables the person: sessions end, the key stops, sign-in is refused.
    with signed_in(world, "dev") as browser:
        done = httpx.post(
            f"{api}/people/disable", headers=bearer(ADMIN_TOKEN), json={"subject": "dev"}
        ).json()
        assert done["sessions_ended"] >= 1 and done["keys_revoked"] == [made["key_id"]]
        assert browser.get(world.console + "/me").headers.get("location", "").startswith("/login")
    assert not _works(world.stack, made["key"])
    assert _works(world.stack, other["key"])  # keys issued by admins are not personal
    with httpx.Client(timeout=30) as client:
        again = world.idp.sign_in(client, world.console, "dev")
        assert again.status_code == 403 and "disabled" in again.text
    assert httpx.get(f"{api}/me", headers=bearer(token)).status_code == 403
    httpx.post(f"{api}/people/enable", headers=bearer(ADMIN_TOKEN), json={"subject": "dev"})
    assert httpx.get(f"{api}/me", headers=bearer(token)).status_code == 200

    # Groups that no longer grant the key revoke it at the person's next request.
    second = httpx.post(
        f"{api}/me/keys", headers=bearer(token), json={"workspace": "dev", "service": "cli"}
    ).json()
    with signed_in(world, "dev") as browser:
        assert _works(world.stack, second["key"])
        world.idp.person("dev", "dev@example.com", ["finance"])  # moved to finance
        try:
            assert browser.get(world.console + "/me").status_code == 200  # a viewer now
            assert not _works(world.stack, second["key"])
        finally:
            world.idp.person("dev", "dev@example.com", ["developers"])

    # The audit log names each person, and is filtered by person.
    entries = httpx.get(
        f"{api}/audit", headers=bearer(ADMIN_TOKEN), params={"person": "dev", "limit": 1000}
    ).json()
    assert entries and {e["subject"] for e in entries} == {"dev"}
    assert {"keys.create", "console.login"} <= {e["action"] for e in entries}
    automatic = httpx.get(
        f"{api}/audit", headers=bearer(ADMIN_TOKEN), params={"person": "console"}
    ).json()
    revoked = {e["target"]: e["detail"] for e in automatic if e["action"] == "keys.revoke"}
    assert revoked[made["key_id"]] == {
        "holder": "dev",
        "personal": True,
        "reason": "disabled",
        "workspace": "dev",
    }
    assert revoked[second["key_id"]]["reason"] == "their groups no longer grant it"
    disabled = httpx.get(
        f"{api}/audit", headers=bearer(ADMIN_TOKEN), params={"person": "token:ops"}
    ).json()
    assert any(e["action"] == "people.disable" and e["target"] == "dev" for e in disabled)
    assert all(e["who"] == "ops" for e in disabled)


def test_policy_that_stops_granting_revokes_keys_at_once(world: World) -> None:
    api = world.console + "/admin/v1"
    token = world.idp.access_token("dev")
    made = httpx.post(
        f"{api}/me/keys", headers=bearer(token), json={"workspace": "dev", "service": "cli"}
    ).json()
    assert _works(world.stack, made["key"])
    path: Path = world.stack.policy_path  # type: ignore[attr-defined]
    before = path.read_text()
    path.write_text(before.replace("groups: [developers]", "groups: [seniors]"))
    try:
        # The next request of anyone (here an admin's) makes the console load the policy.
        httpx.get(f"{api}/keys", headers=bearer(ADMIN_TOKEN), timeout=30)
        assert not _works(world.stack, made["key"])
    finally:
        path.write_text(before)


def test_a_session_whose_token_the_provider_revoked_goes_back_through_it(world: World) -> None:
    """The provider stops honouring the token a session holds (expired or revoked): the next
    page goes back through the provider, which signs the person in again while its own
    session lasts, and lands on the page that was asked for."""
    import redis

    with signed_in(world, "fin") as browser:
        r = redis.Redis.from_url(world.stack.redis_url)
        try:
            held = [
                r.hget(key, "access_token")
                for key in r.scan_iter("{extproc:console}:session:*")
                if r.hget(key, "subject") == b"fin"
            ]
        finally:
            r.close()
        assert held and all(held)
        doc = httpx.get(world.idp.issuer + "/.well-known/openid-configuration").json()
        for token in held:
            revoked = httpx.post(
                doc["revocation_endpoint"],
                data={"token": token.decode(), "token_type_hint": "access_token"},
                auth=(CLIENT_ID, CLIENT_SECRET),
            )
            assert revoked.status_code == 200
        page = browser.get(world.console + "/usage")
        assert page.status_code == 303
        assert page.headers["location"] == "/auth/login?next=%2Fusage"
        start = browser.get(world.console + page.headers["location"])
        back = world.idp._interact(browser, browser.get(start.headers["location"]))
        done = browser.get(back.headers["location"])  # no login form: the provider knew them
        assert done.status_code == 200 and 'content="0;url=/usage"' in done.text
        assert browser.get(world.console + "/usage").status_code == 200


def test_the_bootstrap_path_works_beside_single_sign_on(world: World) -> None:
    """With a provider configured, the login page offers it, and admin tokens and the
    one-time login link still open the console as an admin."""
    with httpx.Client(base_url=world.console, timeout=30) as client:
        page = client.get("/login")
        assert 'id="sso"' in page.text and 'name="token"' in page.text
        assert client.post("/login", data={"token": ADMIN_TOKEN}).status_code == 303
        assert client.get("/people").status_code == 200  # an admin, whatever the policy says
    link = world.stack.console_login  # printed by console 1, used on console 2
    assert link.startswith(world.console + "/login?token=")
    with httpx.Client(timeout=30) as client:
        first = client.get(link.replace(world.console, world.console2))
        assert first.status_code == 303 and client.get(world.console2 + "/keys").status_code == 200
        with httpx.Client(timeout=30) as other:
            assert other.get(link).status_code == 401  # once only, whichever replica
