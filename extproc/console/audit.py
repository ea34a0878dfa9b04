"""The admin audit log: who did what, when, kept in Redis for the console to show.

One stream, capped, so a noisy automation cannot grow Redis without bound; an entry is
written before the action's answer leaves, so nothing done through the API goes unrecorded.
"""

from __future__ import annotations

import json
import time
from typing import Any

from extproc.store.schema import AUDIT

AUDIT_KEPT = 10_000


async def audit(client: Any, who: str, action: str, target: str = "", **detail: Any) -> None:
    fields = {
        "time_ms": str(time.time_ns() // 1_000_000),
        "who": who,
        "action": action,
        "target": target,
        "detail": json.dumps(detail, default=str, sort_keys=True),
    }
    await client.xadd(AUDIT, fields, maxlen=AUDIT_KEPT, approximate=True)


async def recent(client: Any, limit: int = 100) -> list[dict[str, Any]]:
    """The newest entries first."""
    out = []
    for _id, raw in await client.xrevrange(AUDIT, count=limit):
        item: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
        item["time_ms"] = int(item["time_ms"])
        item["detail"] = json.loads(item.get("detail") or "{}")
        out.append(item)
    return out
