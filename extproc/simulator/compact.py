"""Responses compaction answers (`POST /v1/responses/compact`).

A compaction reads a conversation and returns a shorter one: the user's messages kept and
one opaque `compaction` item standing for the rest, with usage like a Responses call's (the
input read; the summary written, reasoning included). The plan is the Responses one, so the
input count is the one `/v1/responses` reports for the same input.
"""

from __future__ import annotations

import time
from typing import Any

from extproc.simulator.faults import Faults
from extproc.simulator.plan import Plan, responses_usage
from extproc.simulator.sse import new_id

PATH = "/v1/responses/compact"


def build(body: dict[str, Any], plan: Plan, faults: Faults) -> dict[str, Any]:
    kept = body.get("input") if isinstance(body.get("input"), list) else []
    users = [item for item in kept if isinstance(item, dict) and item.get("role") == "user"]
    summary = {
        "id": new_id("cmp_"),
        "type": "compaction",
        "encrypted_content": "gAAAAB" + plan.text.encode().hex(),
    }
    return {
        "id": new_id("resp_"),
        "object": "response.compaction",
        "created_at": int(time.time()),
        "output": [*users, summary],
        "usage": None if faults.no_usage else responses_usage(plan),
    }
