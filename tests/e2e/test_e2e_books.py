"""End to end, the books: FOCUS export totals against `extproc spend`, and reconciliation
against the simulator's organization Usage and Costs APIs, before and after calls that
bypass the gateway with the workspace's own upstream key.

Real Envoy, sidecar, Redis and simulator; the openai SDK as the client; the CLI run as an
operator would run it; a real webhook receiver for the drift alert.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from extproc.devstack.stack import Stack
from extproc.metering.prices import default_table
from extproc.simulator.admin import simulated_ids
from extproc.store.schema import AUDIT
from extproc.wire.usage import Usage
from tests.conftest import Hooks, new_key, policy_stack, wait_record

UPSTREAM_KEY = "sk-upstream-books-fin"
ADMIN_KEY = "sk-admin-books-test"
POLICY = """
version: 1
timezone: UTC
workspaces:
  fin:
    budget_usd: 1000
    upstream: {{key_env: TEST_UPSTREAM_FIN, project_id: {project}}}
    teams:
      data: {{}}
    services:
      etl: {{team: data}}
      bot: {{}}
alerts:
  webhooks:
    - url: http://127.0.0.1:{hook_port}/hook
      events: [reconcile_drift]
"""


@pytest.fixture(scope="module")
def books(hooks: Hooks, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    project, _key_id = simulated_ids(UPSTREAM_KEY)
    policy = POLICY.format(project=project, hook_port=hooks.port)
    with policy_stack(tmp_path_factory, policy, {"TEST_UPSTREAM_FIN": UPSTREAM_KEY}) as s:
        yield s


def run(stack: Stack, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args, "--redis-url", stack.redis_url],
        capture_output=True,
        text=True,
        check=check,
        env={
            "PATH": "/usr/bin:/bin",
            "EXTPROC_POLICY": str(stack.policy_path),  # type: ignore[attr-defined]
            "OPENAI_ADMIN_KEY": ADMIN_KEY,
            "OPENAI_ADMIN_BASE_URL": f"{stack.upstream_url}/v1",
        },
    )


def traffic(stack: Stack) -> list[str]:
    """A little of everything, through the gateway; returns the request ids."""
    ids = []
    for service in ("etl", "bot"):
        key = new_key(stack, "fin", service)["key"]
        client = openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=30)
        chat = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"books for {service}"}]
        )
        ids.append(chat.headers["x-extproc-request-id"])
        resp = client.responses.with_raw_response.create(model="gpt-5-mini", input="reconcile")
        ids.append(resp.headers["x-extproc-request-id"])
        emb = client.embeddings.with_raw_response.create(
            model="text-embedding-3-small", input=["a", "ledger"]
        )
        ids.append(emb.headers["x-extproc-request-id"])
    return ids


def test_focus_export_totals_match_spend(books: Stack, tmp_path: Path) -> None:
    import redis

    r = redis.Redis.from_url(books.redis_url)
    ids = traffic(books)
    records = [wait_record(r, rid) for rid in ids]
    r.close()
    month = datetime.now(UTC).strftime("%Y-%m-01")
    out = tmp_path / "focus.csv"
    run(books, "ledger", "export", "--since", month, "--format", "focus", "--out", str(out))
    rows = list(csv.DictReader(out.open()))
    assert {row["x_RequestId"] for row in rows} >= set(ids)
    billed = sum((Decimal(row["BilledCost"]) for row in rows), Decimal(0))
    spend = json.loads(run(books, "spend", "--json").stdout)
    assert billed == Decimal(spend["totals"]["spent_usd"])
    assert billed > 0
    mine = {row["x_RequestId"]: row for row in rows}
    for rec in records:
        row = mine[rec["request_id"]]
        assert Decimal(row["BilledCost"]) == Decimal(rec["cost_nanos"]).scaleb(-9)
        tags = json.loads(row["Tags"])
        assert tags["workspace"] == "fin" and tags["service"] == rec["service"]
        assert tags["key_id"] == rec["key_id"] and tags["model"] == rec["model_served"]
    as_jsonl = run(books, "ledger", "export", "--since", month, "--format", "jsonl").stdout
    assert sum(json.loads(line)["cost_nanos"] for line in as_jsonl.splitlines()) == sum(
        Decimal(row["BilledCost"]) * 10**9 for row in rows
    )


def test_reconcile_zero_drift_then_exactly_the_bypassing_calls(books: Stack, hooks: Hooks) -> None:
    import redis

    r = redis.Redis.from_url(books.redis_url)
    for rid in traffic(books):
        wait_record(r, rid)
    r.close()
    today = datetime.now(UTC).date().isoformat()

    agreed = run(books, "reconcile", "--date", today, "--json")
    report = json.loads(agreed.stdout)
    assert report["in_agreement"] is True, report
    assert report["drift_usd"] == "0"
    (fin,) = report["workspaces"]
    assert fin["workspace"] == "fin" and Decimal(fin["provider_cost_usd"]) > 0
    assert fin["provider_cost_usd"] == fin["ledger_cost_usd"]
    assert not hooks.bodies

    # Straight to the provider with the workspace's own key: the gateway never sees these.
    bypass_nanos = 0
    for n in range(3):
        resp = httpx.post(
            f"{books.upstream_url}/v1/chat/completions",
            headers={"authorization": f"Bearer {UPSTREAM_KEY}"},
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": f"leak {n}"}]},
            timeout=10,
        )
        resp.raise_for_status()
        body = resp.json()
        u = body["usage"]
        usage = Usage(
            u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"], u["completion_tokens"]
        )
        bypass_nanos += default_table().charge(body["model"], usage).nanos
    assert bypass_nanos > 0

    drifted = run(books, "reconcile", "--date", today, "--json", "--dry-run", check=False)
    assert drifted.returncode == 3, drifted.stderr
    report = json.loads(drifted.stdout)
    assert report["in_agreement"] is False
    assert Decimal(report["drift_usd"]) == Decimal(bypass_nanos).scaleb(-9)
    (fin,) = report["workspaces"]
    (leak,) = [m for m in fin["models"] if m["drift_usd"] != "0"]
    assert leak["model"] == "gpt-4o"
    assert leak["provider"]["requests"] - leak["ledger"]["requests"] == 3
    assert "bypassing" in leak["finding"]
    (alert,) = hooks.wait_for(1)
    assert alert["extproc"]["event"] == "reconcile_drift"
    assert alert["extproc"]["workspace"] == "fin"
    assert Decimal(alert["extproc"]["drift_usd"]) == Decimal(bypass_nanos).scaleb(-9)
    assert UPSTREAM_KEY not in drifted.stdout and ADMIN_KEY not in drifted.stdout
    (planned,) = report["adjustments"]
    assert (planned["workspace"], planned["model"]) == ("fin", "gpt-4o")
    assert Decimal(planned["cost_usd"]) == Decimal(bypass_nanos).scaleb(-9)
    assert report["override_rows"] == ""  # same tokens, same rates: the table is right
    text = run(books, "reconcile", "--date", today, "--dry-run", check=False).stdout
    assert "DRIFT" in text and "bypassing" in text and "would write 1 adjustment" in text

    # The true-up: one adjustment record brings spend, budgets and FOCUS to the invoice.
    before = Decimal(json.loads(run(books, "spend", "--json").stdout)["totals"]["spent_usd"])
    trued = run(books, "reconcile", "--date", today, check=False)
    assert trued.returncode == 3 and "wrote 1 adjustment" in trued.stdout
    after = Decimal(json.loads(run(books, "spend", "--json").stdout)["totals"]["spent_usd"])
    assert after - before == Decimal(bypass_nanos).scaleb(-9)
    settled = json.loads(run(books, "reconcile", "--date", today, "--json").stdout)
    assert settled["in_agreement"] is True and settled["adjustments"] == []
    # Dated the day's last millisecond (reconcile normally runs on yesterday).
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    export = run(
        books, "ledger", "export", "--since", today, "--until", tomorrow, "--format", "jsonl"
    ).stdout
    adjusted = [json.loads(line) for line in export.splitlines()]
    adjusted = [row for row in adjusted if row["outcome"] == "adjustment"]
    assert len(adjusted) == 1 and adjusted[0]["cost_nanos"] == bypass_nanos
    assert adjusted[0]["price_source"] == "true-up" and adjusted[0]["adjustment"]
    r = redis.Redis.from_url(books.redis_url)
    (entry,) = [e for _id, e in r.xrange(AUDIT) if e[b"action"] == b"ledger.true-up"]
    r.close()
    assert planned["request_id"].encode() in entry[b"detail"]
