"""Holds outlive nothing: renew our own, reap anyone's that expired.

A reservation (hold) is made before a request is forwarded and released when its
settlement is written. If the sidecar that made it dies (kill -9, OOM, node loss) or hangs,
nobody settles it; the money the provider spent is then only known as an estimate, which
the sidecar stored with the hold when it made it. This task, run by every replica:

1. renews the expiry of the holds this process still owns, so a long stream never looks
   abandoned while its sidecar lives;
2. reaps expired holds of every workspace: each is released and its estimated settlement
   (`outcome: orphaned`, input counted by the sidecar, output unknown) goes through the
   ledger like any other, idempotent by request id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from extproc.governance.budget import Budgets
from extproc.store.clients import UNAVAILABLE
from extproc.v1.ledger_pb2 import Settlement

log = logging.getLogger("extproc.governance.holds")


async def tend_once(
    budgets: Budgets,
    prefixes: Iterable[str],
    submit: Callable[[Settlement], None],
    now_ms: int,
) -> int:
    """One round: renew ours, then reap the expired. Returns how many orphans were billed."""
    await budgets.renew(now_ms)
    orphans = await budgets.reap(prefixes, now_ms)
    for blob in orphans:
        settlement = Settlement.FromString(blob)
        record = settlement.record
        log.warning(
            "hold of request %s (%s/%s) expired unsettled: its sidecar died or hung; "
            "billed an estimate of %s nanos (outcome=orphaned)",
            record.request_id,
            record.workspace,
            record.service,
            record.cost_nanos,
        )
        submit(settlement)
    return len(orphans)


async def tend_forever(
    budgets: Budgets,
    prefixes: Callable[[], Iterable[str]],
    submit: Callable[[Settlement], None],
    now_ms: Callable[[], int],
) -> None:
    """Every quarter of the hold expiry: renew and reap; survive any Redis trouble."""
    interval = max(budgets.hold_ttl_ms / 4000, 0.1)
    while True:
        await asyncio.sleep(interval)  # a periodic duty, not synchronisation
        try:
            await tend_once(budgets, prefixes(), submit, now_ms())
        except UNAVAILABLE as exc:
            log.debug("holds: redis unavailable (%s)", exc)
        except Exception:
            log.exception("holds: renew/reap round failed; retrying")
