"""End to end with the real Codex CLI: `codex exec` through Envoy and extproc to the simulator.

Codex speaks the Responses API with `stream: true`, its own `session_id` header and a
custom `model_providers` entry; the ledger must hold its turn, exactly, attributed to the
key it was given.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from extproc.devstack.stack import Stack, temporary_stack
from extproc.store.schema import REFUSED
from tests.conftest import all_records, new_key, wait_for

CODEX = Path(__file__).resolve().parents[2] / ".tools" / "node_modules" / ".bin" / "codex"

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
    policy = tmp_path_factory.mktemp("codex") / "policy.yaml"
    policy.write_text(POLICY)
    env = {"EXTPROC_POLICY": str(policy), "TEST_UPSTREAM": "sk-upstream"}
    with temporary_stack(sidecar_env=env) as s:
        s.policy_path = policy  # type: ignore[attr-defined]
        yield s


@pytest.mark.parametrize("websockets", [False, True], ids=["http", "websocket-first"])
def test_codex_exec_runs_and_its_turn_is_billed(
    cstack: Stack, tmp_path: Path, websockets: bool
) -> None:
    """With the websocket transport on, Codex tries an upgrade first; the sidecar refuses it
    (426) and Codex must fall back to HTTP by itself, billed exactly like the plain run."""
    assert CODEX.exists(), "run `make codex-cli` (make test does) to install the Codex CLI"
    key = new_key(cstack, "dev", "codex-cli")
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        'model = "gpt-5.1-codex"\n'
        'model_provider = "extproc"\n'
        + ("[features]\nresponses_websockets = true\n" if websockets else "")
        + "[model_providers.extproc]\n"
        'name = "extproc"\n'
        f'base_url = "{cstack.base_url}"\n'
        'env_key = "EXTPROC_KEY"\n'
        'wire_api = "responses"\n' + ("supports_websockets = true\n" if websockets else "")
    )
    r = redis.Redis.from_url(cstack.redis_url)
    refused_before = int(r.hget(REFUSED, "websocket_upgrade") or 0)
    run = subprocess.run(
        [str(CODEX), "exec", "--skip-git-repo-check", "say hello"],
        cwd=tmp_path,
        env={**os.environ, "CODEX_HOME": str(home), "EXTPROC_KEY": key["key"]},
        capture_output=True,
        text=True,
        timeout=120,
    )
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
    # Our own count of Codex's request is within a few tokens of what the upstream billed.
    assert abs(rec["counted_input_tokens"] - rec["input_tokens"]) <= 16
    assert count == 1
