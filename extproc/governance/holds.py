"""Holds outlive nothing: renew our own, reap anyone's that expired.

A reservation (hold) is made before a request is forwarded and released when its
settlement is written. If the sidecar that made it dies (kill -9, OOM, node loss) or hangs,
nobody settles it; the money the provider spent is then only known as an estimate, which
the sidecar stored with the hold when it made it. This task, run by every replica:

1. renews the expiry of the holds and leases this process still owns, so a long stream
   never looks abandoned while its sidecar lives;
2. reaps expired holds and leases of every workspace: each is released, and the estimated
   settlement of every request it admitted that never settled (`outcome: orphaned`, input
   counted by the sidecar, output unknown) goes through the ledger like any other,
   idempotent by request id. Orphans are stored compact (metering.orphans) and priced here,
   with this replica's price table; holds from before keep a serialized settlement.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from extproc.governance.budget import Budgets
from extproc.metering.orphans import Orphan, is_compact, orphan_settlement
from extproc.metering.prices import PriceTable
from extproc.store.clients import UNAVAILABLE
from extproc.v1.ledger_pb2 import Settlement

log = logging.getLogger("extproc.governance.holds")


def _settlement(blob: bytes, prices: PriceTable) -> Settlement:
    if is_compact(blob):
        return orphan_settlement(Orphan.decode(blob), prices)
    return Settlement.FromString(blob)


async def tend_once(
    budgets: Budgets,
    prefixes: Iterable[str],
    submit: Callable[[Settlement], None],
    now_ms: int,
    prices: PriceTable | None = None,
) -> int:
    """One round: renew ours, then reap the expired. Returns how many orphans were billed."""
    await budgets.renew(now_ms)
    orphans = await budgets.reap(prefixes, now_ms)
    table = prices or _default_prices()
    for blob in orphans:
        try:
            settlement = _settlement(blob, table)
        except Exception:
            log.exception("holds: an orphan could not be read; it is lost: %r", blob[:200])
            continue
        record = settlement.record
        log.warning(
            "request %s (%s/%s) was never settled: its sidecar died or hung; "
            "billed an estimate of %s nanos (outcome=orphaned)",
            record.request_id,
            record.workspace,
            record.service,
            record.cost_nanos,
        )
        submit(settlement)
    return len(orphans)


_prices: list[PriceTable] = []


def _default_prices() -> PriceTable:
    """The bundled price table, for callers that do not pass their own (loaded once)."""
    if not _prices:
        _prices.append(PriceTable.load())
    return _prices[0]


async def tend_forever(
    budgets: Budgets,
    prefixes: Callable[[], Iterable[str]],
    submit: Callable[[Settlement], None],
    now_ms: Callable[[], int],
    prices: Callable[[], PriceTable] | None = None,
) -> None:
    """Every quarter of the hold expiry: renew and reap; survive any Redis trouble.
    `prices`: the live price table, which prices compact orphans."""
    interval = max(budgets.hold_ttl_ms / 4000, 0.1)
    while True:
        await asyncio.sleep(interval)  # a periodic duty, not synchronisation
        try:
            table = prices() if prices is not None else None
            await tend_once(budgets, prefixes(), submit, now_ms(), table)
        except UNAVAILABLE as exc:
            log.debug("holds: redis unavailable (%s)", exc)
        except Exception:
            log.exception("holds: renew/reap round failed; retrying")
