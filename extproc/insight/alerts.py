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
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from extproc.store.schema import ALERTS

log = logging.getLogger("extproc.insight.alerts")

RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
ALERTS_KEPT = 1000


@dataclass(frozen=True, slots=True)
class Alert:
    event: str  # "soft_limit" | "hard_limit" | "burn_rate" | "topup_*" | "key_paused" ...
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


async def record_alert(client: Any, alert: Alert) -> None:
    """Keep the alert where people can look it up later, not only in a chat channel."""
    fields = {
        "time_ms": str(time.time_ns() // 1_000_000),
        "event": alert.event,
        "workspace": alert.workspace,
        "scope": alert.scope,
        "text": alert.text,
    }
    await client.xadd(ALERTS, fields, maxlen=ALERTS_KEPT, approximate=True)


async def recent_alerts(client: Any, limit: int = 100) -> list[dict[str, Any]]:
    """The newest alerts first."""
    rows = await client.xrevrange(ALERTS, count=limit)
    out = []
    for _id, raw in rows:
        item = {k.decode(): v.decode() for k, v in raw.items()}
        item["time_ms"] = int(item.get("time_ms", "0"))
        out.append(item)
    return out


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
        record: Callable[[Alert], Awaitable[None]] | None = None,
    ) -> None:
        """`targets(event)` gives the webhook URLs subscribed to an event (policy may reload);
        `record`, when given, also keeps each alert (in Redis, for the console)."""
        self._targets = targets
        self._record = record
        self._delays = delays
        self._timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self.delivered = 0
        self.failed = 0

    def send(self, alert: Alert, to: Iterable[str] = ()) -> None:
        """Deliver to the webhooks subscribed to the event and to `to` (the approvers' own
        channel, a requester's webhook), each URL once."""
        log.warning("alert %s: %s", alert.event, alert.text)
        loop = asyncio.get_running_loop()
        if self._record is not None:
            task = loop.create_task(self._keep(alert))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        for url in dict.fromkeys([*self._targets(alert.event), *to]):
            task = loop.create_task(self._deliver(url, alert))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _keep(self, alert: Alert) -> None:
        try:
            await self._record(alert)  # type: ignore[misc]
        except Exception as exc:  # the webhook still goes out; the record is best effort
            log.warning("alert not recorded in Redis: %s", exc)

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
