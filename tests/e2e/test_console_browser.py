"""The console and the developer page in a real browser (Debian's Chromium, driven by
Playwright), against a real stack: no script errors, the figures equal `extproc spend --json`,
a key made and revoked in the UI works and then stops at the gateway, and `/extproc/me`
shows the caller only their own data.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from decimal import Decimal

import openai
import pytest
import redis

from extproc.devstack.stack import Stack, free_port
from tests.conftest import CONSOLE_POLICY, cli, new_key, policy_stack, wait_record

playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ADMIN = "browser-admin-0123456789abcdef"


@pytest.fixture(scope="module")
def bstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with policy_stack(
        tmp_path_factory,
        CONSOLE_POLICY,
        {"TEST_UPSTREAM": "sk-upstream"},
        console_port=free_port(),
        console_env={"EXTPROC_ADMIN_TOKENS": f"ops:{ADMIN}"},
    ) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Page:
    """A browser tab that records every script error and console error it sees."""

    def __init__(self, browser: object) -> None:
        self.context = browser.new_context()  # type: ignore[attr-defined]
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.page.on(
            "console",
            lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None,
        )

    def close(self) -> None:
        self.context.close()


def spend(stack: Stack, message: str, key: dict[str, str]) -> str:
    client = openai.OpenAI(base_url=stack.base_url, api_key=key["key"], max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": message}],
        extra_headers={"session_id": f"sess-{key['key_id']}"},
    )
    r = redis.Redis.from_url(stack.redis_url)
    try:
        wait_record(r, raw.headers["x-extproc-request-id"])
    finally:
        r.close()
    return raw.headers["x-extproc-request-id"]


def test_console_loads_and_its_figures_equal_the_cli(bstack: Stack, browser: object) -> None:
    for ws, svc in (("dev", "cli"), ("dev", "etl"), ("prod", "api")):
        spend(bstack, f"traffic for {ws}/{svc}", new_key(bstack, ws, svc))
    tab = Page(browser)
    try:
        page = tab.page
        page.goto(bstack.console_login)  # the one-time link `make run` prints
        assert page.url.rstrip("/") == bstack.console_url
        report = json.loads(cli(bstack, "spend", "--json").stdout)
        for row in (r for r in report["rows"] if r["kind"] == "workspace"):
            cell = page.locator(f'tr[data-workspace="{row["name"]}"] td.spent')
            nanos = int(cell.get_attribute("data-nanos"))
            assert Decimal(nanos) / 10**9 == Decimal(row["spent_usd"]), row["name"]
            assert nanos > 0
        total = int(page.locator("#total-spent").get_attribute("data-nanos"))
        assert Decimal(total) / 10**9 == Decimal(report["totals"]["spent_usd"])
        assert page.locator("svg.bar").count() >= 2  # budget bars drawn
        assert page.locator("#top-keys tr").count() >= 4  # header + three keys

        page.click("text=dev")  # drill down: workspace -> team
        page.wait_for_url("**/w/dev")
        teams = json.loads(cli(bstack, "spend", "--json", "--by", "team").stdout)["rows"]
        platform = next(r for r in teams if r["kind"] == "team" and r["name"] == "platform")
        cell = page.locator('tr[data-kind="team"][data-name="platform"] td.spent')
        assert Decimal(int(cell.get_attribute("data-nanos"))) / 10**9 == Decimal(
            platform["spent_usd"]
        )
        page.click("text=service")
        page.wait_for_url("**/w/dev?by=service")
        assert page.locator('tr[data-kind="service"][data-name="etl"]').count() == 1
        page.click('tr[data-kind="service"][data-name="etl"] >> text=requests')
        assert page.locator("#usage tr").count() == 2  # header + the one etl request

        for path in ("/keys", "/alerts", "/usage", "/audit"):
            page.goto(bstack.console_url + path)
            assert page.locator("h1").count() == 1
        assert "console.login" in page.locator("#audit").inner_text()  # the login, audited
        assert tab.errors == [], tab.errors
    finally:
        tab.close()


def test_login_link_works_once_and_pages_need_a_session(bstack: Stack, browser: object) -> None:
    tab = Page(browser)
    try:
        page = tab.page
        page.goto(bstack.console_url + "/keys")
        assert page.url.endswith("/login?next=%2Fkeys")  # no session: sent to the login form
        page.fill('input[name="token"]', "wrong-token-000000000000")
        page.click("text=Log in")
        assert page.locator("text=That is not an admin token").count() == 1
        page.fill('input[name="token"]', ADMIN)
        page.click("text=Log in")
        assert page.url == bstack.console_url + "/keys"  # back where it was going
        assert page.locator("header >> text=ops").count() == 1
        used = tab.context.new_page()
        resp = used.goto(bstack.console_login)  # already used by the other test
        assert resp is not None and resp.status == 401
    finally:
        tab.close()


def _login(page: object, stack: Stack) -> None:
    page.goto(stack.console_url + "/login")  # type: ignore[attr-defined]
    page.fill('input[name="token"]', ADMIN)  # type: ignore[attr-defined]
    page.click("text=Log in")  # type: ignore[attr-defined]


def test_key_created_and_revoked_in_the_ui_works_then_stops(bstack: Stack, browser: object) -> None:
    tab = Page(browser)
    try:
        page = tab.page
        _login(page, bstack)
        page.goto(bstack.console_url + "/keys")
        page.select_option("#target", "prod/api")
        page.fill("#owner", "dana@example.com")
        page.click("text=Create key")
        page.wait_for_url("**/keys")  # post/redirect/get
        key_id = page.locator("#made-id").inner_text()
        secret = page.locator("#made-key").inner_text().strip()
        before = page.locator("#keys tr").count()
        page.reload()  # a reload neither makes a second key nor shows the secret again
        assert page.locator("#keys tr").count() == before
        assert page.locator("#made-key").count() == 0 and secret not in page.content()
        client = openai.OpenAI(base_url=bstack.base_url, api_key=secret, max_retries=0)
        ok = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "made in the UI"}]
        )
        assert ok.choices
        row = page.locator(f'tr[data-key-id="{key_id}"]')
        assert row.locator(".status").inner_text() == "active"
        row.locator("button.revoke").click()
        page.wait_for_url("**/keys")
        assert page.locator(f'tr[data-key-id="{key_id}"] .status').inner_text() == "revoked"
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "after revoke"}]
            )
        page.goto(bstack.console_url + "/audit")
        audit = page.locator("#audit").inner_text()
        assert f"keys.create\t{key_id}" in audit and f"keys.revoke\t{key_id}" in audit
        assert secret not in page.content()
        assert tab.errors == [], tab.errors
    finally:
        tab.close()


def test_me_page_shows_only_the_callers_data(bstack: Stack, browser: object) -> None:
    mine, other = new_key(bstack, "dev", "cli"), new_key(bstack, "dev", "etl")
    my_request = spend(bstack, "mine", mine)
    their_request = spend(bstack, "theirs", other)
    tab = Page(browser)
    try:
        page = tab.page
        page.goto(bstack.base_url.removesuffix("/v1") + "/extproc/me")
        page.fill("#key", mine["key"])
        page.click("text=Show")
        page.wait_for_selector("#requests")
        text = page.locator("#out").inner_text()
        assert mine["key_id"] in text and "platform" in text
        assert other["key_id"] not in text and "etl" not in text
        assert page.locator("#requests tr").count() == 2  # header + my one request
        assert "gpt-4o-mini" in page.locator("#requests").inner_text()
        assert my_request and their_request not in page.content()
        assert mine["key"] not in page.url  # the key never goes into a URL
        page.fill("#key", "sk-ext-" + "0" * 40)
        page.click("text=Show")
        page.wait_for_selector("#error:not(:empty)")
        assert "revoked API key" in page.locator("#error").inner_text()
        assert page.locator("#out").inner_text() == ""
        assert [e for e in tab.errors if "401" not in e] == [], tab.errors
    finally:
        tab.close()


def test_what_if_page_replays_the_ledger(bstack: Stack, browser: object) -> None:
    spend(bstack, "for the what-if", new_key(bstack, "prod", "api"))
    tab = Page(browser)
    try:
        page = tab.page
        _login(page, bstack)
        page.goto(bstack.console_url + "/what-if")
        current = page.locator("#candidate").input_value()
        assert "budget_usd: 500" in current  # the policy in force, ready to edit
        page.fill("#candidate", current.replace("budget_usd: 500", 'budget_usd: "0.000001"'))
        page.fill('input[name="since"]', "1")
        page.click("#whatif button")
        page.wait_for_selector("#summary")
        assert int(page.locator("#refused").inner_text()) >= 1
        prod_hard = page.locator("#scopes tr", has_text="workspace prod").locator("td.hard")
        assert prod_hard.first.inner_text() != "-"
        assert tab.errors == [], tab.errors
    finally:
        tab.close()


def test_usage_filters_sessions_and_drill_down_markers(bstack: Stack, browser: object) -> None:
    """The usage page filters (form, not hand-made URLs) and shows cached tokens; a session
    row leads to its requests; the drill-down marks each budget's soft limit; every time is
    in the policy's zone, and the page says which."""
    key = new_key(bstack, "dev", "cli")
    first = spend(bstack, "a session's first request", key)
    second = spend(bstack, "and its second", key)
    other = spend(bstack, "another service", new_key(bstack, "dev", "etl"))
    tab = Page(browser)
    try:
        page = tab.page
        _login(page, bstack)
        page.goto(bstack.console_url + "/usage")
        assert "Times in UTC." in page.locator("#zone").inner_text()
        page.select_option("#f-workspace", "dev")
        page.fill("#f-key", key["key_id"])
        page.click("#filters button")
        page.wait_for_url("**/usage?*")
        rows = page.locator("#usage tr[data-request-id]")
        ids = [rows.nth(i).get_attribute("data-request-id") for i in range(rows.count())]
        assert ids == [second, first]  # newest first, only that key's
        header = page.locator("#usage tr").first.inner_text()
        assert "cached" in header
        assert rows.first.locator("td.cached").inner_text().isdigit()
        cost = rows.first.locator("td.cost")
        assert int(cost.get_attribute("data-nanos")) > 0 and cost.inner_text() != "$0.00"

        page.goto(bstack.console_url + "/")
        session = f"sess-{key['key_id']}"
        page.locator("#sessions a", has_text=session).click()
        page.wait_for_url("**/usage?*")
        rows = page.locator("#usage tr[data-request-id]")
        ids = {rows.nth(i).get_attribute("data-request-id") for i in range(rows.count())}
        assert ids == {first, second} and other not in ids
        assert page.locator("#f-session").input_value() == session  # the filter is shown

        page.goto(bstack.console_url + "/w/dev")
        platform = page.locator('tr[data-kind="team"][data-name="platform"]')
        assert int(platform.get_attribute("data-soft-nanos")) == 30 * 10**9  # 75% of $40
        assert platform.locator("svg.bar text", has_text="soft").count() == 1
        assert page.locator("#period-chart svg line.soft-line").count() == 1
        assert page.locator("#period-chart svg text", has_text="soft limit").count() == 1
        assert tab.errors == [], tab.errors
    finally:
        tab.close()
