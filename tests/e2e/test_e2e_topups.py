"""End to end: no Friday Halt. A workspace hits its hard limit in the real Codex CLI; the
developer opens the link from Codex's error in a real browser and asks for $20 until Monday;
an approver the policy names signs in to the console through a real OpenID Connect provider
and approves; the next Codex turn succeeds, and the grant ends on time by itself.

Two sidecar replicas share one Redis behind Envoy (round robin): a grant, a pause and a
resume count on both within a second, and a grant past its time counts on neither.

Time is made controllable honestly: the approver grants less long than asked (a real option
of the approval form), a few seconds, and the test waits for that moment to pass, no longer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import openai
import pytest
import redis

from extproc.devstack.stack import Stack, free_port
from extproc.governance.topups import TopupRequest
from extproc.store.schema import AUDIT, topup_request_key
from tests.codex import codex_exec
from tests.conftest import Hooks, cli, new_key, policy_stack
from tests.oidc.idp import IdP, browser_sign_in, running_idp

BERLIN = ZoneInfo("Europe/Berlin")
ADMIN_TOKEN = "topups-admin-0123456789abcdef"
POLICY = """
version: 1
timezone: Europe/Berlin
defaults: {{default_output_cap: 4096}}
alerts:
  webhooks: [{{url: "{hooks}/all", events: [topup_requested, topup_approved, topup_expired]}}]
workspaces:
  dev:
    budget_usd: "0.05"
    contact: "#dev-help"
    upstream: {{key_env: TEST_UPSTREAM}}
    approvers: {{people: [lena@example.com], webhook: "{hooks}/approvers"}}
    topups: {{max_usd: 50, requester_webhooks: ["{hooks}/"]}}
    services:
      codex-cli: {{}}
      burner: {{}}
  ci:
    budget_usd: "0.000001"
    hard_limit: 100%
    upstream: {{key_env: TEST_UPSTREAM}}
    topups:
      max_usd: 50
      auto_approve: {{services: [bot], under_usd: 5, period_max_usd: 5}}
    services:
      bot: {{}}
      tool: {{}}
console:
  roles: {{admin: [platform-admins]}}
"""
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}],
        "max_completion_tokens": 16}  # fmt: skip


@dataclass
class World:
    stack: Stack
    idp: IdP
    hooks: Hooks

    @property
    def gateway(self) -> str:
        return self.stack.base_url.removesuffix("/v1")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, hooks: Hooks) -> Iterator[World]:
    port = free_port()
    console = f"http://127.0.0.1:{port}"
    with running_idp(tmp_path_factory.mktemp("idp"), [console]) as idp:
        idp.person("lena", "lena@example.com", [])  # an approver by name, in no group
        idp.person("dev", "dev@example.com", ["developers"])
        env = {"EXTPROC_ADMIN_TOKENS": f"ops:{ADMIN_TOKEN}", **idp.console_env()}
        policy = POLICY.format(hooks=f"http://127.0.0.1:{hooks.port}")
        with policy_stack(
            tmp_path_factory, policy, {"TEST_UPSTREAM": "sk-upstream"}, sidecars=2,
            console_port=port, console_env=env,
        ) as stack:  # fmt: skip
            yield World(stack, idp, hooks)


playwright_sync = pytest.importorskip("playwright.sync_api")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        yield b
        b.close()


def _stored(world: World, workspace: str, request_id: str) -> TopupRequest:
    r = redis.Redis.from_url(world.stack.redis_url)
    try:
        found = TopupRequest.from_fields(r.hgetall(topup_request_key(workspace, request_id)))
    finally:
        r.close()
    assert found is not None
    return found


def _audit(world: World) -> list[dict[str, str]]:
    r = redis.Redis.from_url(world.stack.redis_url)
    try:
        return [{k.decode(): v.decode() for k, v in e.items()} for _id, e in r.xrange(AUDIT)]
    finally:
        r.close()


def _exhaust(world: World) -> None:
    """Another developer spends the workspace to its limit (a 20k-token gpt-4.1 call costs
    $0.04 of its $0.055 hard limit; the next one does not fit)."""
    burner = new_key(world.stack, "dev", "burner")
    client = openai.OpenAI(base_url=world.stack.base_url, api_key=burner["key"], max_retries=0)
    big = [{"role": "user", "content": "word " * 20_000}]
    with pytest.raises(openai.RateLimitError):
        for _ in range(3):
            client.chat.completions.create(model="gpt-4.1", messages=big, max_tokens=16)


def test_friday_halt_topup_from_codex_to_the_console_and_back(
    world: World, browser: Any, tmp_path: Any
) -> None:
    _exhaust(world)
    key = new_key(world.stack, "dev", "codex-cli")
    (tmp_path / "one").mkdir()
    refused = codex_exec(world.stack, key["key"], tmp_path / "one", timeout=180)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output
    found = re.search(r"Ask for a top-up: (http://\S+/extproc/topup/ws)", output)
    assert found is not None, output
    link = found.group(1).rstrip(".,)\"'")
    assert link == f"{world.gateway}/extproc/topup/ws"

    # The developer opens the link, gives their key, and asks for $20 until Monday.
    developer = browser.new_context()
    page = developer.new_page()
    page.goto(link)
    page.fill("#key", key["key"])
    page.click("#continue")
    page.wait_for_selector("#ask:not([hidden])")
    assert page.locator("#scope").input_value() == "ws"
    assert "hard limit" in page.locator("#standing").inner_text()
    page.fill("#amount", "20")
    assert page.locator("#until-monday").is_checked()
    page.fill("#reason", "release week: finishing the migration before Monday")
    page.fill("#notify", f"http://127.0.0.1:{world.hooks.port}/requester")
    page.click("#submit")
    page.wait_for_selector("#result[data-id]")
    request_id = page.locator("#result").get_attribute("data-id")
    assert "sent to the approvers of workspace dev" in page.locator("#result").inner_text()
    assert page.locator("#requests").inner_text().count(request_id) == 1
    developer.close()
    asked = _stored(world, "dev", request_id)
    monday = datetime.fromtimestamp(asked.until_ms / 1000, BERLIN)
    assert (monday.strftime("%A %H:%M"), asked.amount_nanos) == ("Monday 00:00", 20 * 10**9)
    assert timedelta(0) < monday - datetime.now(BERLIN) <= timedelta(days=7)

    # The approvers hear it on their channel, with the numbers and the console's link.
    note = world.hooks.wait_event("/approvers", "topup_requested")
    assert "asks for a $20.00 top-up of workspace dev until Mon" in note["text"]
    assert "release week" in note["text"]
    approve_url = note["extproc"]["approve_url"]
    assert approve_url == f"{world.stack.console_url}/approvals#{request_id}"

    # Lena, whom the policy names, signs in through the provider and approves, for a short
    # while only (so the end of the grant can be watched without waiting for Monday).
    approver = browser.new_context()
    page = approver.new_page()
    browser_sign_in(page, world.stack.console_url, "lena", "/approvals")
    page.goto(approve_url)
    row = page.locator(f'#pending tr[data-request-id="{request_id}"]')
    assert "$20" in row.inner_text() and "release week" in row.inner_text()
    ends = datetime.now(BERLIN).replace(microsecond=0) + timedelta(seconds=90)
    row.locator('input[name="until"]').fill(ends.strftime("%Y-%m-%dT%H:%M:%S"))
    row.locator("button.approve").click()
    page.wait_for_selector(f'#decided tr[data-request-id="{request_id}"]')
    decided = page.locator(f'#decided tr[data-request-id="{request_id}"]')
    assert decided.locator(".status").inner_text() == "approved"
    assert "lena@example.com" in decided.inner_text()
    approver.close()

    # The next Codex turn goes through, on the raised limit.
    (tmp_path / "two").mkdir()
    served = codex_exec(world.stack, key["key"], tmp_path / "two", timeout=180)
    assert served.returncode == 0, served.stdout + served.stderr
    assert "quick brown fox" in served.stdout + served.stderr
    told = world.hooks.wait_event("/requester", "topup_approved")
    assert (
        f"approved by lena@example.com: $20.00 until {ends.strftime('%a %Y-%m-%d %H:%M')}"
        in (told["text"])
    )
    me = httpx.get(f"{world.gateway}/extproc/v1/me",
                   headers={"authorization": f"Bearer {key['key']}"}).json()  # fmt: skip
    ws = next(b for b in me["budgets"] if b["scope"] == "ws")
    assert ws["topup_usd"] == "20" and ws["topup_page"] == "/extproc/topup/ws"
    assert [(t["id"], t["status"], t["live"]) for t in me["topups"]] == [
        (request_id, "approved", True)
    ]

    # Its time passes: the grant ends by itself, on every replica, and the requester hears.
    while (left := ends.timestamp() - time.time()) > 0:
        time.sleep(left)  # waiting for the clock itself: the grant's end is the subject
    (tmp_path / "three").mkdir()
    after = codex_exec(world.stack, key["key"], tmp_path / "three", timeout=180)
    assert after.returncode != 0 and "Ask for a top-up" in after.stdout + after.stderr
    gone = world.hooks.wait_event("/requester", "topup_expired")
    assert f"ended at {ends.strftime('%a %Y-%m-%d %H:%M')}" in gone["text"]
    final = _stored(world, "dev", request_id)
    assert final.status == "expired"
    assert 0 <= final.ended_ms - int(ends.timestamp() * 1000) < 3_000  # swept on time
    trail = [(e["action"], e["who"]) for e in _audit(world) if e["target"] == request_id]
    assert trail == [
        ("topup.request", key["key_id"]),  # a key with no owner: named by its id
        ("topup.approve", "lena@example.com"),
        ("topup.expire", "extproc"),
    ]


def _served(world: World, key: str, want: int, count: int = 6) -> float:
    """Seconds until `count` requests in a row (round robin: both replicas) answer `want`."""
    started, streak = time.monotonic(), 0
    with httpx.Client(timeout=30, headers={"authorization": f"Bearer {key}"}) as client:
        while streak < count:
            status = client.post(f"{world.stack.base_url}/chat/completions", json=CHAT).status_code
            streak = streak + 1 if status == want else 0
            assert time.monotonic() - started < 10, f"still not {want} after 10 s"
    return time.monotonic() - started


def test_grants_pauses_and_resumes_count_on_both_replicas_within_a_second(world: World) -> None:
    tool = new_key(world.stack, "ci", "tool")
    auth = {"authorization": f"Bearer {tool['key']}"}
    assert _served(world, tool["key"], 429) < 10  # the workspace's $0.000001 is too little
    asked = _ask(world, auth, amount_usd="1", reason="nightly run")
    assert asked.status_code == 201 and asked.json()["status"] == "pending", asked.text
    cli(world.stack, "topup", "approve", asked.json()["id"], "--note", "ok for tonight")
    assert _served(world, tool["key"], 200) < 1.0  # both replicas, within a second

    cli(world.stack, "keys", "pause", tool["key_id"], "--why", "looks stuck")
    assert _served(world, tool["key"], 403) < 1.0
    refusal = httpx.post(f"{world.stack.base_url}/chat/completions", json=CHAT, headers=auth)
    assert refusal.json()["error"]["code"] == "key_paused"
    assert "paused it at" in refusal.text and "because looks stuck" in refusal.text
    resumed = httpx.post(
        f"{world.stack.console_url}/admin/v1/keys/{tool['key_id']}/resume",
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert resumed.status_code == 200 and resumed.json()["state"] == "resumed"
    assert _served(world, tool["key"], 200) < 1.0

    # A grant past its time counts on neither replica, swept or not.
    cli(world.stack, "topup", "revoke", asked.json()["id"])
    assert _served(world, tool["key"], 429) < 1.0
    short = _ask(world, auth, amount_usd="1", reason="one more").json()
    # Long enough to outlast approving through the CLI (a process of its own) and the check
    # that it counts on both replicas, however slow the machine.
    ends = datetime.now(BERLIN).replace(microsecond=0) + timedelta(seconds=10)
    cli(world.stack, "topup", "approve", short["id"], "--until", ends.isoformat())
    assert _served(world, tool["key"], 200) < 1.0
    while (left := ends.timestamp() - time.time()) > 0:
        time.sleep(left)  # the grant's own end
    assert _served(world, tool["key"], 429) < 1.0


def _ask(world: World, auth: dict[str, str], **fields: str) -> httpx.Response:
    body = {"scope": "ws", "until": "period", **fields}
    return httpx.post(f"{world.gateway}/extproc/v1/topups", headers=auth, json=body, timeout=30)


def test_small_requests_of_named_services_are_approved_at_once(world: World) -> None:
    bot = new_key(world.stack, "ci", "bot")
    auth = {"authorization": f"Bearer {bot['key']}"}
    first = _ask(world, auth, amount_usd="4", reason="ci burst").json()
    assert (first["status"], first["decided_by"], first["auto_approved"]) == (
        "approved", "auto-approval", True)  # fmt: skip
    assert _served(world, bot["key"], 200) < 1.0
    # The line, then the period's total, keep the rest for people to decide.
    over = _ask(world, auth, amount_usd="5", reason="more").json()
    again = _ask(world, auth, amount_usd="2", reason="more").json()
    assert (over["status"], again["status"]) == ("pending", "pending")
    listed = httpx.get(f"{world.gateway}/extproc/v1/topups", headers=auth).json()["requests"]
    assert [r["id"] for r in listed] == [again["id"], over["id"], first["id"]]
    wrong = _ask(world, auth, amount_usd="500", reason="x")
    assert wrong.status_code == 400
    assert wrong.json()["error"]["message"].startswith("amount_usd: at most $50.00 per request")
    assert httpx.post(f"{world.gateway}/extproc/v1/topups", json={}).status_code == 401
    denied = httpx.post(
        f"{world.stack.console_url}/admin/v1/topups/{over['id']}/deny",
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, json={"note": "not today"},
    )  # fmt: skip
    assert denied.status_code == 200 and denied.json()["status"] == "denied"
