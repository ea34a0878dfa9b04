"""`extproc prices` and `extproc prices check`, run as an operator runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import genai_prices

from extproc.v1.ledger_pb2 import UsageRecord
from tests.unit.books.test_books import write_ledger

POLICY = """
version: 1
routing:
  aliases: {next: gpt-7-turbo, cheap: gpt-5-mini}
workspaces:
  dev:
    budget_usd: 100
    upstream: {key_env: X}
    services:
      bot: {routing: {default_model: gpt-5.4}}
"""


def extproc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=120,
    )


def test_prices_shows_sources_versions_coverage_and_overrides() -> None:
    out = extproc("prices", "--json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["catalogue"]["version"] == f"genai-prices {genai_prices.__version__}"
    assert shown["price_file"]["version"] == "2026-12-07.1"
    assert shown["catalogue"]["rows"] > 100
    assert "whisper-1" in shown["catalogue"]["left_out"]
    rows = {o["model"]: o for o in shown["overrides"]}
    assert rows["gpt-4o-audio-preview"]["kind"] == "correction"
    assert rows["gpt-4o-audio-preview"]["source"].startswith("https://")
    text = extproc("prices", "--model", "gpt-6.2-sol", "--model", "gpt-9-nova").stdout
    assert "gpt-6.2-sol: row gpt-6.2-sol (genai-prices" in text
    assert "gpt-9-nova: NOT PRICED: provisional" in text


def test_check_lists_models_in_the_ledger_or_the_policy_that_nothing_prices(
    redis_url: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)

    def rec(n: int, model: str) -> UsageRecord:
        return UsageRecord(
            request_id=f"r{n}",
            time_ms=int(now.timestamp() * 1000) - n,
            endpoint="responses",
            model_requested=model,
            model_served=model,
            status=200,
            input_tokens=10,
            output_tokens=1,
            cost_nanos=5,
            outcome="completed",
            workspace="dev",
        )

    records = [rec(1, "gpt-5-2025-08-07"), rec(2, "gpt-6.3-sol"), rec(3, "gpt-6.3-sol")]
    write_ledger(redis_url, records, tmp_path / "spool")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    args = ("prices", "check", "--redis-url", redis_url, "--policy", str(policy))
    out = extproc(*args, "--json")
    assert out.returncode == 3, out.stderr
    unpriced = {u["model"]: u for u in json.loads(out.stdout)["unpriced"]}
    assert set(unpriced) == {"gpt-6.3-sol", "gpt-7-turbo"}
    assert unpriced["gpt-6.3-sol"]["requests"] == 2
    assert unpriced["gpt-6.3-sol"]["provisional"] == "provisional:sol"
    assert unpriced["gpt-7-turbo"]["named_in_policy"] == ["routing.aliases.next"]
    text = extproc(*args)
    assert "gpt-6.3-sol" in text.stdout and "2 requests in the ledger" in text.stdout
    clean = tmp_path / "clean.yaml"
    clean.write_text(POLICY.replace("gpt-7-turbo", "gpt-5"))
    priced = tmp_path / "prices.toml"
    priced.write_text(
        (Path(__file__).resolve().parents[3] / "extproc" / "data" / "prices.toml").read_text()
        + '\n[models."gpt-6.3-sol"]\nlike = "gpt-6.2-sol"\n'
        'source = "https://example.com/gpt-6.3-sol"\nas_of = 2026-12-07\n'
    )
    ok = extproc(
        "prices", "check", "--redis-url", redis_url, "--policy", str(clean), "--prices", str(priced)
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "every model in use is priced" in ok.stdout
