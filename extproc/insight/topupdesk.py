"""The sidecar's side of top-up requests: a refused developer asks, the approvers hear.

`POST /extproc/v1/topups` (the request page's form, or any client with its key) lands here:
the request is checked against the policy (`governance.topups.new_request`: a scope of the
caller's with a hard limit, an amount and a time within `topups:`, a reason), stored,
audited, approved at once when the workspace's `auto_approve` covers it, and announced to
the scope's approvers by webhook with the numbers and the console's link.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo

from extproc.governance.keys import Identity
from extproc.governance.periods import period_at
from extproc.governance.policy import Policy
from extproc.governance.topups import (
    AUTO,
    MAX_PENDING_PER_KEY,
    AutoLimitReached,
    TopupError,
    TopupRequest,
    TopupStore,
    auto_approvable,
    new_request,
    parse_until,
    parse_usd,
    pending_of,
    wall_ms,
)
from extproc.insight import notices
from extproc.store.audit import append_audit
from extproc.store.schema import key_scope


class TopupDesk:
    def __init__(
        self,
        client: Any,
        policy: Callable[[], Policy | None],
        alerter: Any,
        *,
        console_url: str = "",
        now_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self._redis = client
        self._policy = policy
        self._alerter = alerter
        self.console_url = console_url
        self.now_ms = now_ms
        self.store = TopupStore(client, now_ms=now_ms)

    async def ask(self, identity: Identity, body: Any) -> TopupRequest:
        """Make `identity`'s request from a JSON body; TopupError names a wrong field."""
        policy = self._policy()
        if policy is None or identity.workspace not in policy.workspaces:
            raise TopupError("this gateway runs without a policy: nothing to top up")
        if not isinstance(body, dict):
            raise TopupError(
                'body: must be a JSON object like {"scope": "ws", "amount_usd": "20", '
                '"until": "2026-12-07", "reason": "release week"}'
            )
        if "amount_usd" not in body:
            raise TopupError("amount_usd: required (how many dollars)")
        ws = policy.workspaces[identity.workspace]
        tz, now = policy.timezone, self.now_ms()
        request = new_request(
            policy,
            identity,
            scope=str(body.get("scope") or ""),
            amount_nanos=parse_usd(body["amount_usd"]),
            until_ms=parse_until(body.get("until"), tz, period_at(ws.period, now, tz).end_ms, now),
            reason=str(body.get("reason") or ""),
            now_ms=now,
            notify_url=str(body.get("notify_url") or ""),
        )
        earlier = await self.store.list(ws.name)
        if pending_of(earlier, identity.key_id, now) >= MAX_PENDING_PER_KEY:
            raise TopupError(
                f"this key has {MAX_PENDING_PER_KEY} requests waiting already: wait for a "
                "decision (see /extproc/me)"
            )
        await self.store.add(request)
        who, subject = identity.owner or identity.key_id, key_scope(identity.key_id)
        await append_audit(
            self._redis, who, subject, "topup.request", request.request_id,
            workspace=ws.name, scope=request.scope, amount_usd=body["amount_usd"],
            until_ms=request.until_ms, reason=request.reason, key_id=identity.key_id,
        )  # fmt: skip
        to = notices.request_targets(policy, request)
        auto = ws.topups.auto_approve
        if auto is not None and auto_approvable(ws, request, earlier, tz):
            # `earlier` is a quick look; the approve script holds the period's ceiling against
            # requests made at the same time on other replicas.
            period = period_at(ws.period, request.created_ms, tz)
            ceiling = (period.id, auto.period_max_nanos, (period.end_ms - now) // 1000 + 86_400)
            try:
                request = await self.store.approve(
                    request.request_id, AUTO, auto_ceiling=ceiling,
                    note=f"workspaces.{ws.name}.topups.auto_approve",
                )  # fmt: skip
            except AutoLimitReached:
                return self._requested(request, tz, to)  # the ceiling was reached: a person decides
            await append_audit(
                self._redis, AUTO, AUTO, "topup.approve", request.request_id,
                workspace=ws.name, scope=request.scope, granted_nanos=request.granted_nanos,
                until_ms=request.granted_until_ms, automatic=True,
            )  # fmt: skip
            to = [*to, *([request.notify_url] if request.notify_url else [])]
        return self._requested(request, tz, to)

    def _requested(self, request: TopupRequest, tz: ZoneInfo, to: list[str]) -> TopupRequest:
        """Tell the approvers (and, when it was granted at once, the requester)."""
        self._alerter.send(notices.requested(request, tz, self.console_url), to)
        return request

    async def mine(self, identity: Identity, limit: int = 50) -> list[TopupRequest]:
        """The caller's own requests among the workspace's latest 100, newest first (nobody
        else's): one pipelined read however many requests the workspace has had."""
        found = await self.store.list(identity.workspace, limit=100)
        return [r for r in found if r.key_id == identity.key_id][:limit]
