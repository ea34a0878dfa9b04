"""Reconciliation as a pure function, and the simulator's admin API as OpenAI documents it
(parameters, pagination, shapes), served over HTTP by the real simulator."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal

import httpx
import pytest

from extproc.books.reconcile import AdminClient, ProviderDay, Tokens, line_item_model, reconcile
from extproc.metering.prices import default_table
from extproc.simulator import Simulator
from extproc.simulator.admin import simulated_ids
from extproc.v1.ledger_pb2 import UsageRecord
from extproc.wire.usage import Usage

DAY = date(2026, 11, 30)


def rec(
    ws: str, model: str, inp: int, cached: int, out: int, cost: int, **kw: object
) -> UsageRecord:
    return UsageRecord(
        workspace=ws, model_served=model, input_tokens=inp, cached_input_tokens=cached,
        output_tokens=out, cost_nanos=cost, outcome=str(kw.get("outcome", "completed")),
    )  # fmt: skip


def test_agreement_stale_prices_bypass_and_unmapped_projects() -> None:
    provider = ProviderDay()
    provider.tokens[("proj_a", "gpt-4o")] = Tokens(100, 20, 10, 2)
    provider.cost[("proj_a", "gpt-4o")] = 5_000
    provider.tokens[("proj_a", "o3")] = Tokens(50, 0, 5, 1)
    provider.cost[("proj_a", "o3")] = 900  # the ledger priced it at 800: stale table
    provider.tokens[("proj_b", "gpt-5")] = Tokens(10, 0, 1, 1)
    provider.cost[("proj_b", "gpt-5")] = 70
    provider.tokens[("proj_x", "gpt-4o")] = Tokens(1, 0, 1, 1)
    provider.cost[("proj_x", "gpt-4o")] = 33
    records = [
        rec("a", "gpt-4o", 60, 20, 6, 3_000),
        rec("a", "gpt-4o", 40, 0, 4, 2_000),
        rec("a", "gpt-4o", 999, 0, 0, 0, outcome="rejected"),  # never reached the provider
        rec("a", "o3", 50, 0, 5, 800),
        rec("b", "gpt-5", 5, 0, 1, 40),  # the provider served 5 more input tokens
    ]
    result = reconcile(DAY, {"a": "proj_a", "b": "proj_b", "c": None}, provider, records)
    rows = {row.workspace: row for row in result.rows}
    assert rows["a"].drift_nanos == 100
    lines = {line.model: line for line in rows["a"].lines}
    assert lines["gpt-4o"].finding is None and lines["gpt-4o"].drift_nanos == 0
    assert "price table" in (lines["o3"].finding or "")
    assert "bypassing" in (rows["b"].lines[0].finding or "")
    assert rows["b"].drift_nanos == 30
    assert rows["c"].lines == ()
    assert rows[None].project_id == "proj_x" and rows[None].drift_nanos == 33
    assert result.drift_nanos == 100 + 30 + 33
    assert {r.workspace for r in result.drifted} == {"a", "b", None}


def test_line_items_name_their_model() -> None:
    assert line_item_model("gpt-4o-mini-2024-07-18, cached input") == "gpt-4o-mini-2024-07-18"
    assert line_item_model("gpt-4o, output") == "gpt-4o"
    assert line_item_model("Fine-tuning training") == "Fine-tuning training"


@pytest.fixture(scope="module")
def simulator() -> Iterator[str]:
    loop = asyncio.new_event_loop()
    sim = Simulator()
    loop.run_until_complete(sim.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sim.port}"
    asyncio.run_coroutine_threadsafe(sim.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_simulator_admin_api_shapes_paging_and_errors(simulator: str) -> None:
    key = "sk-upstream-admin-test"
    for n in range(3):
        resp = httpx.post(
            f"{simulator}/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hi {n}"}]},
        )
        resp.raise_for_status()
    usage = resp.json()["usage"]
    project, key_id = simulated_ids(key)
    admin = {"authorization": "Bearer sk-admin-test"}
    now = int(datetime.now(UTC).timestamp())
    url = f"{simulator}/v1/organization/usage/completions"

    assert httpx.get(url, params={"start_time": now - 60}).status_code == 401
    denied = httpx.get(
        url, params={"start_time": now - 60}, headers={"authorization": f"Bearer {key}"}
    )
    assert denied.status_code == 403 and denied.json()["error"]["message"]
    missing = httpx.get(url, headers=admin)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "start_time"
    assert httpx.get(url, params={"start_time": now, "limit": 32}, headers=admin).status_code == 400

    # Three one-hour buckets, one per page; only the last one holds our requests.
    params = [("start_time", now - 2 * 3600), ("bucket_width", "1h"), ("limit", 1),
              ("group_by", "project_id"), ("group_by", "api_key_id"), ("group_by", "model"),
              ("project_ids", project)]  # fmt: skip
    pages, cursor = [], None
    while True:
        page = httpx.get(url, params=params + ([("page", cursor)] if cursor else []), headers=admin)
        body = page.json()
        assert body["object"] == "page" and len(body["data"]) == 1
        pages.append(body["data"][0])
        if not body["has_more"]:
            assert body["next_page"] is None
            break
        cursor = body["next_page"]
    assert len(pages) == 3
    assert [b["end_time"] - b["start_time"] for b in pages] == [3600] * 3
    (row,) = [r for b in pages for r in b["results"]]
    assert row["object"] == "organization.usage.completions.result"
    assert (row["project_id"], row["api_key_id"], row["model"]) == (project, key_id, "gpt-4o-mini")
    assert row["num_model_requests"] == 3 and row["user_id"] is None
    assert row["output_tokens"] == 3 * usage["completion_tokens"]

    costs = httpx.get(
        f"{simulator}/v1/organization/costs",
        params=[("start_time", now - 60), ("group_by", "line_item"), ("project_ids", project)],
        headers=admin,
    ).json()
    items = {r["line_item"]: r["amount"] for b in costs["data"] for r in b["results"]}
    # A kind with nothing billed has no line item (no cached input in three fresh prompts).
    assert set(items) == {"gpt-4o-mini, input", "gpt-4o-mini, output"}
    assert all(a["currency"] == "usd" for a in items.values())
    bad = httpx.get(f"{simulator}/v1/organization/costs",
                    params={"start_time": now, "bucket_width": "1h"}, headers=admin)  # fmt: skip
    assert bad.status_code == 400

    # Through our client: the same day, exact to the nano-dollar against the price table.
    day = AdminClient("sk-admin-test", f"{simulator}/v1").day(datetime.now(UTC).date())
    tokens = day.tokens[(project, "gpt-4o-mini")]
    assert tokens.requests == 3
    expected = default_table().charge(
        "gpt-4o-mini", Usage(tokens.input, tokens.cached, tokens.output)
    )
    assert day.cost[(project, "gpt-4o-mini")] == expected.nanos
    assert Decimal(sum(Decimal(str(a["value"])) for a in items.values())) == expected.usd
