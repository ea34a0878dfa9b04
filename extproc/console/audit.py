"""The admin audit log: who did what, when, kept in Redis for the console to show.

One stream, capped, so a noisy automation cannot grow Redis without bound; an entry is
written before the action's answer leaves, so nothing done through the API goes unrecorded.
Each entry names the actor twice: `who` as people read it (an email, an admin token's name)
and `subject`, the stable identifier (the identity provider's subject, or `token:<name>`)
the log is filtered by.
"""

from __future__ import annotations

import json
from typing import Any

from extproc.store.audit import AUDIT_KEPT, append_audit
from extproc.store.schema import AUDIT

SCAN_CHUNK = 500


async def audit(client: Any, actor: Any, action: str, target: str = "", **detail: Any) -> None:
    """Record `action` by `actor`: a Principal, a Person, or a plain name."""
    who = str(getattr(actor, "who", None) or getattr(actor, "label", None) or actor)
    subject = str(getattr(actor, "subject", actor))
    await append_audit(client, who, subject, action, target, **detail)


def _entry(raw: dict[bytes, bytes]) -> dict[str, Any]:
    item: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
    item["time_ms"] = int(item["time_ms"])
    item["detail"] = json.loads(item.get("detail") or "{}")
    item.setdefault("subject", item.get("who", ""))
    return item


async def recent(client: Any, limit: int = 100, person: str | None = None) -> list[dict[str, Any]]:
    """The newest entries first; with `person`, only theirs (by subject or by name)."""
    if not person:
        return [_entry(raw) for _id, raw in await client.xrevrange(AUDIT, count=limit)]
    out: list[dict[str, Any]] = []
    top = "+"
    for _ in range(AUDIT_KEPT // SCAN_CHUNK + 1):
        rows = await client.xrevrange(AUDIT, max=top, count=SCAN_CHUNK)
        for _id, raw in rows:
            item = _entry(raw)
            if person in (item["subject"], item["who"]):
                out.append(item)
                if len(out) == limit:
                    return out
        if len(rows) < SCAN_CHUNK:
            break
        top = "(" + rows[-1][0].decode()
    return out
