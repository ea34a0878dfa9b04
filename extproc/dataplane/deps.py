"""What every exchange shares, and the small interfaces it needs from its collaborators.

The exchange depends on these Protocols, not on the key cache, the budgets or the ledger
themselves, so it can be driven with small fakes (tests/unit/dataplane) as well as the
real parts; `server.build_deps` wires the real ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from extproc.governance.budget import Decision, Plan
from extproc.governance.keys import Identity, Lookup
from extproc.governance.policy import Policy
from extproc.insight.telemetry import Telemetry
from extproc.metering.orphans import Orphan
from extproc.metering.prices import PriceTable
from extproc.settings import Settings
from extproc.v1.ledger_pb2 import Settlement
from extproc.wire.errors import OpenAIError


def _now_ms() -> int:
    return int(time.time() * 1000)


class KeyLookup(Protocol):
    """What an exchange asks of the key cache (`governance.keys.KeyCache`)."""

    def get(self, secret: str) -> Lookup: ...

    async def resolve(self, secret: str) -> Identity | None: ...

    async def is_revoked(self, identity: Identity) -> bool: ...


class BudgetBook(Protocol):
    """What an exchange asks of the budgets (`governance.budget.Budgets`)."""

    def level(self, identity: Identity) -> str: ...

    async def reserve_with_overdraft(
        self,
        plan: Plan,
        fail_open: bool,
        now_ms: int,
        *,
        session: str = "",
        orphan: Callable[[Plan], bytes | Orphan] | None = None,
        overdraft_nanos: int | None = None,
        fallback: Callable[[int], Plan | None] | None = None,
    ) -> tuple[Plan, Decision, bool]: ...


class NewModelSink(Protocol):
    """Told of each model the price table does not know (`insight.newmodels.NewModels`)."""

    def seen(self, model: str, workspace: str, *, admitted: bool, price: str = "") -> None: ...


class SettlementSink(Protocol):
    """Where finished requests go (`metering.ledger.Ledger`): never blocks, never raises."""

    def submit(self, settlement: Settlement) -> None: ...

    def note_unmetered(self, key: str) -> None: ...

    def note_refused(self, reason: str) -> None: ...


@dataclass(slots=True)
class Deps:
    """What every exchange shares. `policy` and `upstream_keys` change on hot reload."""

    settings: Settings
    prices: PriceTable
    count: Callable[[str, str], int]
    ledger: SettlementSink
    executor: Executor
    policy: Policy | None = None
    keys: KeyLookup | None = None
    budgets: BudgetBook | None = None
    upstream_keys: dict[str, str] = field(default_factory=dict)
    # Why a workspace has no key: "environment variable X is not set" (names only).
    upstream_missing: dict[str, str] = field(default_factory=dict)
    now_ms: Callable[[], int] = _now_ms
    telemetry: Telemetry = field(default_factory=Telemetry)
    store: Any = None  # the general Redis client (reads for paths the sidecar answers itself)
    shadow: Policy | None = None  # evaluated beside `policy` on every request, never enforced
    new_models: NewModelSink | None = None  # alerts on the first request for an unknown model
    # Key id -> the refusal of its pause, kept current by `governance.live` (in place).
    paused: dict[str, OpenAIError] = field(default_factory=dict)
    halt: Any = None  # the top-up requests behind /extproc/topup (`dataplane.selfservice`)

    @property
    def timezone(self) -> ZoneInfo:
        return self.policy.timezone if self.policy else ZoneInfo("UTC")
