"""An unknown model is reported once across replicas: two replicas on one real Redis."""

from __future__ import annotations

import asyncio

from extproc.insight.alerts import Alert
from extproc.insight.newmodels import NewModels
from extproc.store.clients import make_client
from extproc.store.schema import unpriced_model_key


class Sent:
    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    def send(self, alert: Alert) -> None:
        self.alerts.append(alert)


def test_two_replicas_alert_once_per_model(redis_url: str, r: object) -> None:
    sent = Sent()

    async def run() -> None:
        clients = [make_client(redis_url), make_client(redis_url)]
        replicas = [NewModels(c, sent, lambda: "v1") for c in clients]  # type: ignore[arg-type]
        for replica in replicas:
            for _ in range(3):
                replica.seen("gpt-7-nova", "dev", admitted=True, price="provisional:any")
            replica.seen("gpt-8", "ops", admitted=False)
        for replica in replicas:
            await replica.drain()
        for c in clients:
            await c.aclose()

    asyncio.run(run())
    assert sorted((a.details["model"], a.workspace) for a in sent.alerts) == [
        ("gpt-7-nova", "dev"),
        ("gpt-8", "ops"),
    ]
    assert all(a.event == "unknown_model" for a in sent.alerts)
    refused = next(a for a in sent.alerts if a.details["model"] == "gpt-8")
    assert "refused" in refused.text and "v1" in refused.text
    assert r.get(unpriced_model_key("gpt-7-nova")) == b"dev"  # type: ignore[attr-defined]
