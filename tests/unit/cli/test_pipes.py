"""A reader that stops early (`| head`) ends the command quietly: exit 0, nothing on stderr."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from extproc.metering.ledger import Ledger
from extproc.store.clients import make_client
from extproc.store.schema import WORKSPACE_SCOPE, workspace_prefix
from extproc.v1.ledger_pb2 import ScopeCharge, Settlement, UsageRecord


def fill(redis_url: str, spool: Path, count: int) -> None:
    now_ms = int(time.time() * 1000)
    day, hour = time.strftime("%Y-%m-%d"), time.strftime("%Y-%m-%dT%H")

    async def go() -> None:
        client = make_client(redis_url)
        ledger = Ledger(client, spool_dir=spool)
        await ledger.start()
        for n in range(count):
            ledger.submit(
                Settlement(
                    prefix=workspace_prefix("dev"),
                    period=time.strftime("%Y-%m"),
                    day=day,
                    hour=hour,
                    scopes=[ScopeCharge(scope=WORKSPACE_SCOPE, soft_nanos=-1)],
                    record=UsageRecord(
                        request_id=f"pipe-{n}",
                        workspace="dev",
                        service="cli",
                        endpoint="responses",
                        model_requested="gpt-5-mini",
                        cost_nanos=1087,
                        time_ms=now_ms,
                    ),
                )
            )
        await ledger.close()
        await client.aclose()

    asyncio.run(go())


def test_ledger_export_into_head_ends_quietly(redis_url: str, tmp_path: Path) -> None:
    fill(redis_url, tmp_path / "spool", 3000)
    exe = Path(sys.executable).parent / "extproc"
    for fmt in ("jsonl", "csv"):
        result = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {exe} ledger export --since 2000-01-01 "
             f"--format {fmt} --redis-url {redis_url} | head -n 2"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert (result.returncode, result.stderr) == (0, ""), result.stderr
        assert len(result.stdout.splitlines()) == 2
