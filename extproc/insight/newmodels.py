"""The first sighting of a model the price table does not know: one alert, across replicas.

When OpenAI ships a model, clients ask for it before the catalogue lists it. The policy
decides whether such a request is refused or billed at a provisional rate; either way the
platform team must hear of it once, the first time any replica sees it, so that a row is
added to the price file. Each replica remembers the names it has already reported; the first
to set the model's marker in Redis (SET NX) sends the alert to the policy's webhooks
(event `unknown_model`). Nothing here runs on the request path: `seen` only schedules.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from extproc.insight.alerts import Alert, Alerter
from extproc.store.schema import WORKSPACE_SCOPE, unpriced_model_key

log = logging.getLogger("extproc.insight.newmodels")

SEEN_LOCAL = 4096  # names one replica remembers having reported (then it starts over)


class NewModels:
    def __init__(self, client: Any, alerter: Alerter, version: Any = None) -> None:
        self._client = client
        self._alerter = alerter
        self._reported: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._version = version  # () -> the price table's version, for the alert's text

    def seen(self, model: str, workspace: str, *, admitted: bool, price: str = "") -> None:
        """A request named `model`, which nothing prices; `admitted` at `price` or refused."""
        if not model or model in self._reported:
            return
        if len(self._reported) >= SEEN_LOCAL:
            self._reported.clear()
        self._reported.add(model)
        task = asyncio.get_running_loop().create_task(
            self._report(model, workspace, admitted, price)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _report(self, model: str, workspace: str, admitted: bool, price: str) -> None:
        try:
            first = await self._client.set(unpriced_model_key(model), workspace or "_", nx=True)
        except Exception:  # Redis down: report it from here rather than not at all
            log.warning("unknown model %s: Redis unavailable, alerting from this replica", model)
            first = True
        if not first:
            return
        version = self._version() if self._version else ""
        what = (
            f"admitted at the provisional rate {price} (flagged on every record)"
            if admitted
            else "refused (pricing.unknown_models: refuse)"
        )
        text = (
            f"extproc: model {model!r} has no price in the price table {version}; "
            f"first seen in workspace {workspace or '_'}, {what}. Add a row for it to the "
            "price file (docs/prices.md); `extproc prices check` lists every unpriced model."
        )
        self._alerter.send(
            Alert(
                "unknown_model",
                workspace,
                WORKSPACE_SCOPE,
                text,
                {
                    "model": model,
                    "admitted": admitted,
                    "provisional_price": price,
                    "price_version": version,
                },
            )
        )

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
