"""What every request's handler shares, and the small interfaces it needs from its
collaborators.

The handlers and admission depend on these Protocols, not on the key cache, the budgets or
the ledger themselves, so they can be driven with small fakes (tests/unit/dataplane) as
well as the real parts; `server.build_deps` wires the real ones.
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
from extproc.governance.topups import TopupRequest
from extproc.insight.telemetry import Telemetry
from extproc.metering.orphans import Orphan
from extproc.metering.prices import PriceTable
from extproc.settings import Settings
from extproc.v1.ledger_pb2 import Settlement
from extproc.wire.errors import OpenAIError


def _now_ms() -> int:
    return int(time.time() * 1000)


class KeyLookup(Protocol):
    """What a request's headers ask of the key cache (`governance.keys.KeyCache`)."""

    def get(self, secret: str) -> Lookup: ...

    async def resolve(self, secret: str) -> Identity | None: ...

    async def is_revoked(self, identity: Identity) -> bool: ...


class BudgetBook(Protocol):
    """What admission asks of the budgets (`governance.budget.Budgets`): the seam behind
    which reservations may be exact per request or spent from a lease."""

    def level(self, identity: Identity) -> str: ...

    async def reserve(
        self,
        plan: Plan,
        fail_open: bool,
        now_ms: int,
        *,
        session: str = "",
        orphan: bytes | Orphan = b"",
        exact: bool = False,
    ) -> Decision: ...


class NewModelSink(Protocol):
    """Told of each model the price table does not know (`insight.newmodels.NewModels`)."""

    def seen(self, model: str, workspace: str, *, admitted: bool, price: str = "") -> None: ...


class TopupCounter(Protocol):
    """Where a developer asks for a top-up and reads their own requests
    (`insight.topupdesk.TopupDesk`, behind `/extproc/v1/topups`)."""

    async def ask(self, identity: Identity, body: Any) -> TopupRequest: ...

    async def mine(self, identity: Identity, limit: int = 50) -> list[TopupRequest]: ...


class SettlementSink(Protocol):
    """Where finished requests go (`metering.ledger.Ledger`): never blocks, never raises."""

    def submit(self, settlement: Settlement) -> None: ...

    def submit_later(self, build: Callable[[], Settlement], *, may_wait: bool = False) -> None: ...

    def note_unmetered(self, key: str) -> None: ...

    def note_refused(self, reason: str) -> None: ...

    def alive(self) -> bool: ...


@dataclass(slots=True)
class Deps:
    """What every request's handler shares. `policy` and `upstream_keys` change on hot reload."""

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
    halt: TopupCounter | None = None  # top-up requests behind /extproc/ (`selfservice`)

    @property
    def timezone(self) -> ZoneInfo:
        return self.policy.timezone if self.policy else ZoneInfo("UTC")
