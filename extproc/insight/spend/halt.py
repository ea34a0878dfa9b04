"""Top-ups and paused keys in the spend report: what raises a hard limit now, and which keys
the runaway breaker stopped.

A budget row's hard limit in the report is the one enforced: the policy's plus the live
grants of that scope. This section lists those grants (who asked, until when) and every key
that is paused, so `extproc spend` answers "why is this limit higher than the policy says"
and "why is this key refused" without another tool.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from extproc.governance.pauses import Pause, pauses_from
from extproc.governance.policy import Policy
from extproc.governance.topups import Grant, grants_from, live_topups
from extproc.metering.prices import usd, usd_for_people
from extproc.store.schema import paused_key, topups_key


@dataclass(frozen=True, slots=True)
class Halt:
    """Each workspace's grants (live or not yet swept) and its keys paused now."""

    now_ms: int
    grants: Mapping[str, tuple[Grant, ...]]
    paused: tuple[Pause, ...]

    def topups(self, workspace: str) -> dict[str, int]:
        """Scope -> what live grants add to its hard limit at the report's instant."""
        return live_topups(self.grants.get(workspace, ()), self.now_ms)

    def to_dict(self, tz: ZoneInfo) -> dict[str, Any]:
        return {
            "topups": [
                {
                    "workspace": ws,
                    "id": g.grant_id,
                    "scope": g.scope,
                    "usd": usd(g.nanos),
                    "until": datetime.fromtimestamp(g.until_ms / 1000, tz).isoformat(),
                }
                for ws, grants in sorted(self.grants.items())
                for g in grants
                if g.until_ms > self.now_ms
            ],
            "paused": [p.to_dict(tz) for p in self.paused],
        }


NO_HALT = Halt(0, {}, ())


def read_halt(client: Any, policy: Policy, now_ms: int) -> Halt:
    """One pipeline (a blocking client, like the report's own reads)."""
    names = list(policy.workspaces)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(topups_key(name))
        pipe.hgetall(paused_key(name))
    rows = pipe.execute()
    grants = {name: grants_from(rows[2 * i]) for i, name in enumerate(names) if rows[2 * i]}
    paused = tuple(
        p for i in range(len(names)) for p in pauses_from(rows[2 * i + 1]).values() if p.paused
    )
    return Halt(now_ms, grants, paused)


def render_halt(halt: Halt, tz: ZoneInfo) -> str:
    lines = []
    live = halt.to_dict(tz)
    if live["topups"]:
        lines.append("TOP-UPS (raising hard limits now)")
        for ws, grants in sorted(halt.grants.items()):
            for g in grants:
                if g.until_ms > halt.now_ms:
                    until = datetime.fromtimestamp(g.until_ms / 1000, tz).strftime("%Y-%m-%d %H:%M")
                    lines.append(
                        f"  {ws} {g.scope}: +{usd_for_people(g.nanos)} until {until} ({g.grant_id})"
                    )
    if halt.paused:
        if lines:
            lines.append("")
        lines.append("PAUSED KEYS (refused until resumed)")
        for p in halt.paused:
            since = datetime.fromtimestamp(p.since_ms / 1000, tz).strftime("%Y-%m-%d %H:%M")
            lines.append(f"  {p.workspace} {p.key_id} ({p.service}) since {since}: {p.why}")
    return "\n".join(lines)
