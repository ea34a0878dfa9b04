"""`build_deps` wires the real parts whole: nothing in `Deps` is patched after it is built;
only hot reloads change it later."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from extproc.dataplane.server import build_deps
from extproc.governance.budget import Budgets
from extproc.governance.keys import KeyCache
from extproc.governance.live import LiveState
from extproc.governance.policy import load_policy
from extproc.settings import Settings
from extproc.store.clients import make_client

ROOT = Path(__file__).resolve().parents[3]
POLICY = ROOT / "examples" / "policy.yaml"


def test_a_governed_sidecar_is_built_whole_and_follows_reloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    client = make_client("redis://127.0.0.1:1/0")  # never connected: nothing here does I/O
    settings = Settings(
        policy=str(POLICY),
        shadow_policy=str(POLICY),
        upstream_keys="simulated",
        spool_dir=str(tmp_path),
    )
    deps, governor, ledger, keys, budgets, live = build_deps(settings, client)
    try:
        assert isinstance(keys, KeyCache) and isinstance(budgets, Budgets)
        assert isinstance(live, LiveState) and deps.halt is not None
        # Top-ups and pauses reach the request path through what was built, not patches.
        assert keys.on_notice == live.on_notice and budgets.topups == live.topups
        assert deps.paused is live.refusals
        assert (deps.keys, deps.budgets, deps.ledger, deps.store) == (keys, budgets, ledger, client)
        assert deps.policy is governor.policy and deps.policy is not None
        assert deps.shadow is not None and deps.new_models is not None
        assert set(deps.upstream_keys) == set(deps.policy.workspaces)
        assert ledger.on_settled == budgets.settled  # a written settlement stops its renewals
        reloaded = load_policy(POLICY)
        governor.apply(reloaded)
        assert deps.policy is reloaded and governor.policy is reloaded
    finally:
        deps.executor.shutdown()
        asyncio.run(client.aclose())


def test_a_metering_only_sidecar_has_no_keys_budgets_or_policy(tmp_path: Path) -> None:
    client = make_client("redis://127.0.0.1:1/0")
    deps, governor, ledger, keys, budgets, live = build_deps(
        Settings(metering_only=True, spool_dir=str(tmp_path)), client
    )
    try:
        assert (keys, budgets, deps.policy, deps.keys, deps.budgets, deps.store) == (None,) * 6
        assert live is None and deps.halt is None and deps.paused == {}
        assert governor.policy is None and ledger.on_settled is None
    finally:
        deps.executor.shutdown()
        asyncio.run(client.aclose())
