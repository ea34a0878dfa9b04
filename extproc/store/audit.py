"""The admin audit log's one writer: who did what, when, in one capped stream.

The console and its API write here for people; the sidecar writes here for what it decides
by itself (a top-up approved automatically, a key the runaway breaker paused, a grant that
ended), so one log tells the whole story. Each entry names the actor twice: `who` as people
read it and `subject`, the stable identifier the log is filtered by.
"""

from __future__ import annotations

import json
import time
from typing import Any

from extproc.store.schema import AUDIT

AUDIT_KEPT = 10_000


async def append_audit(
    client: Any, who: str, subject: str, action: str, target: str = "", **detail: Any
) -> None:
    fields = {
        "time_ms": str(time.time_ns() // 1_000_000),
        "who": who,
        "subject": subject,
        "action": action,
        "target": target,
        "detail": json.dumps(detail, default=str, sort_keys=True),
    }
    await client.xadd(AUDIT, fields, maxlen=AUDIT_KEPT, approximate=True)
