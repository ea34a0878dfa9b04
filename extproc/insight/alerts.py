"""Webhook alerts (Slack-compatible JSON), delivered off the request path with retries.

Deduplication is not done here: the Redis scripts mark a (scope, period, kind) as alerted
with SET NX, so every replica together sends each alert once. This module only has to
deliver what it is given, patiently: a webhook that is down for a minute must not lose
the one message that says a budget is running out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("extproc.insight.alerts")

RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass(frozen=True, slots=True)
class Alert:
    event: str  # "soft_limit" | "hard_limit" | "burn_rate"
    workspace: str
    scope: str
    text: str
    details: dict[str, Any]

    def payload(self) -> bytes:
        """Slack's incoming-webhook shape (`text`), plus the structured fields for machines."""
        return json.dumps(
            {
                "text": self.text,
                "extproc": {
                    "event": self.event,
                    "workspace": self.workspace,
                    "scope": self.scope,
                    **self.details,
                },
            }
        ).encode()


def _post(url: str, body: bytes, timeout: float) -> int:
    request = urllib.request.Request(
        url, data=body, headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return resp.status


class Alerter:
    def __init__(
        self,
        targets: Callable[[str], list[str]],
        *,
        delays: tuple[float, ...] = RETRY_DELAYS,
        timeout: float = 5.0,
    ) -> None:
        """`targets(event)` gives the webhook URLs subscribed to an event (policy may reload)."""
        self._targets = targets
        self._delays = delays
        self._timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self.delivered = 0
        self.failed = 0

    def send(self, alert: Alert) -> None:
        log.warning("alert %s: %s", alert.event, alert.text)
        for url in self._targets(alert.event):
            task = asyncio.get_running_loop().create_task(self._deliver(url, alert))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, alert: Alert) -> None:
        body = alert.payload()
        loop = asyncio.get_running_loop()
        for attempt, delay in enumerate((0.0, *self._delays)):
            if delay:
                await asyncio.sleep(delay)  # retry backoff, not synchronisation
            try:
                status = await loop.run_in_executor(None, _post, url, body, self._timeout)
                if status < 300:
                    self.delivered += 1
                    return
                log.warning("webhook %s answered %s (attempt %d)", url, status, attempt + 1)
            except OSError as exc:
                log.warning("webhook %s failed: %s (attempt %d)", url, exc, attempt + 1)
        self.failed += 1
        log.error("alert not delivered to %s after %d attempts: %s", url, attempt + 1, alert.text)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
