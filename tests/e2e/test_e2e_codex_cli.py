"""End to end with the real Codex CLI: `codex exec` through Envoy and extproc to the simulator.

Codex speaks the Responses API with `stream: true`, its own `session_id` header and a
custom `model_providers` entry; the ledger must hold its turn, exactly, attributed to the
key it was given. The CLI runs with its own default model (0.171 asks for `gpt-6.2-sol`),
which gets the documented handling (docs/prices.md): a model the price table knows is
billed exactly from it; one it does not is billed at its class's provisional rate, flagged,
under its real name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import genai_prices
import pytest
import redis

from extproc.devstack.stack import Stack
from extproc.metering.prices import default_table
from extproc.store.schema import REFUSED
from extproc.wire.usage import Usage
from tests.codex import codex_exec
from tests.conftest import all_records, new_key, policy_stack, wait_for

POLICY = """
version: 1
workspaces:
  dev:
    budget_usd: 100
    upstream: {key_env: TEST_UPSTREAM}
    services:
      codex-cli: {}
"""


@pytest.fixture(scope="module")
def cstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with policy_stack(tmp_path_factory, POLICY, {"TEST_UPSTREAM": "sk-upstream"}) as s:
        yield s


@pytest.mark.parametrize("websockets", [False, True], ids=["http", "websocket-first"])
def test_codex_exec_runs_and_its_turn_is_billed(
    cstack: Stack, tmp_path: Path, websockets: bool
) -> None:
    """With the websocket transport on, Codex tries an upgrade first; the sidecar refuses it
    (426) and Codex must fall back to HTTP by itself, billed exactly like the plain run."""
    key = new_key(cstack, "dev", "codex-cli")
    r = redis.Redis.from_url(cstack.redis_url)
    refused_before = int(r.hget(REFUSED, "websocket_upgrade") or 0)
    run = codex_exec(cstack, key["key"], tmp_path, websockets=websockets, model=None)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "quick brown fox" in output  # the simulator's answer reached the user
    session = re.search(r"session id: ([0-9a-f-]+)", output)
    assert session, output
    try:
        rec = wait_for(r, lambda rec: rec.session_id == session.group(1), "the codex session")
        count = len(all_records(r, rec["request_id"]))
        refused = int(r.hget(REFUSED, "websocket_upgrade") or 0) - refused_before
    finally:
        r.close()
    assert (refused > 0) is websockets
    assert rec["endpoint"] == "responses"
    assert rec["stream"] is True
    assert rec["estimated"] is False
    assert rec["outcome"] == "completed"
    assert (rec["workspace"], rec["service"], rec["key_id"]) == ("dev", "codex-cli", key["key_id"])
    assert rec["cost_nanos"] > 0
    # The CLI's default model, as the CLI itself names it, under its own name in the record.
    shown = re.search(r"^model: (\S+)$", output, re.MULTILINE)
    assert shown, output
    assert rec["model_requested"] == shown.group(1)
    table = default_table()
    priced, known = table.price_for(rec["model_served"])
    usage = Usage(rec["input_tokens"], rec["cached_input_tokens"], rec["output_tokens"],
                  rec["reasoning_tokens"], service_tier=rec["service_tier"])  # fmt: skip
    assert rec["cost_nanos"] == table.charge(rec["model_served"], usage).nanos
    assert rec["price_provisional"] is (not known)
    assert rec["price_family"] == priced.family
    if known:  # the catalogue prices it: exactly what the catalogue's own calculator says
        exact = genai_prices.calc_price(
            genai_prices.Usage(input_tokens=usage.input_tokens,
                               cache_read_tokens=usage.cached_input_tokens,
                               output_tokens=usage.output_tokens),
            rec["model_served"], provider_id="openai",
        )  # fmt: skip
        assert rec["cost_nanos"] == math.ceil(exact.total_price * 10**9)
    # Our own count of Codex's request is within a few tokens of what the upstream billed.
    assert abs(rec["counted_input_tokens"] - rec["input_tokens"]) <= 16
    assert count == 1
