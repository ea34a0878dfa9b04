"""What people are told about top-ups and paused keys: Slack-compatible webhook messages
with the numbers and the links, plus the same facts as structured fields for machines.

Who hears what:

* a new request: the approvers of its scope (their `approvers.webhook`, the team's and the
  workspace's) and every webhook subscribed to `topup_requested`;
* a decision (approved, denied) and an expiry: the requester's own webhook, if the request
  named one, and the subscribed webhooks;
* a pause or a resume: the approvers of the key's scope (they can resume it, and they are
  the workspace's contacts the policy names) and the subscribed webhooks. The text names
  the key's owner and the workspace's contact.

The sidecar sends what it decides itself (requests, automatic approvals, expiries, pauses);
the console and the CLI send what people decide there.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from extproc.governance.pauses import Pause
from extproc.governance.policy import Policy
from extproc.governance.topups import TopupRequest, scope_team
from extproc.insight.alerts import Alert
from extproc.metering.prices import usd_for_people
from extproc.store.schema import key_scope


def _when(ms: int, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(ms / 1000, tz).strftime("%a %Y-%m-%d %H:%M %Z")


def approver_hooks(policy: Policy | None, workspace: str, team: str | None) -> list[str]:
    """The approvers' webhooks for a scope of `team` (None: the workspace) in `workspace`."""
    ws = policy.workspaces.get(workspace) if policy else None
    if ws is None:
        return []
    return [a.webhook for a in ws.approvers_of(team) if a.webhook]


def request_targets(policy: Policy | None, request: TopupRequest) -> list[str]:
    ws = policy.workspaces.get(request.workspace) if policy else None
    team = scope_team(ws, request.scope) if ws else None
    return approver_hooks(policy, request.workspace, team)


def _links(console_url: str, request: TopupRequest) -> dict[str, str]:
    if not console_url:
        return {}
    return {"approve_url": f"{console_url.rstrip('/')}/approvals#{request.request_id}"}


def requested(
    request: TopupRequest, tz: ZoneInfo, console_url: str = "", spent: Any = None
) -> Alert:
    """Announce a new request to its approvers (or that it was approved at once)."""
    amount, until = usd_for_people(request.amount_nanos), _when(request.until_ms, tz)
    who = request.owner or request.key_id
    links = _links(console_url, request)
    head = (
        f"extproc: {who} ({request.service}) asks for a {amount} top-up of {request.label} "
        f"until {until}: \u201c{request.reason}\u201d."
    )
    if request.status == "approved" and request.auto:
        text = f"{head} Approved automatically (under the service's auto-approval line)."
        event = "topup_approved"
    else:
        where = f" Approve or deny: {links['approve_url']}" if links else ""
        text = f"{head}{where} (or `extproc topup approve {request.request_id}`)"
        event = "topup_requested"
    return Alert(event, request.workspace, request.scope, text, _details(request, tz, links))


def decided(request: TopupRequest, tz: ZoneInfo) -> Alert:
    """Tell the requester what became of their request."""
    if request.status == "approved":
        granted = usd_for_people(request.granted_nanos)
        text = (
            f"extproc: your top-up request {request.request_id} for {request.label} was "
            f"approved by {request.decided_by}: {granted} until "
            f"{_when(request.granted_until_ms, tz)}."
        )
        event = "topup_approved"
    else:
        note = f" ({request.note})" if request.note else ""
        text = (
            f"extproc: your top-up request {request.request_id} for {request.label} "
            f"({usd_for_people(request.amount_nanos)}) was {request.status} by "
            f"{request.decided_by}{note}."
        )
        event = "topup_denied"
    if request.note and request.status == "approved":
        text += f" Note: {request.note}"
    return Alert(event, request.workspace, request.scope, text, _details(request, tz, {}))


def expired(request: TopupRequest, tz: ZoneInfo) -> Alert:
    text = (
        f"extproc: the {usd_for_people(request.granted_nanos)} top-up of {request.label} "
        f"({request.request_id}) ended at {_when(request.granted_until_ms, tz)}; its hard "
        "limit is the policy's again."
    )
    return Alert("topup_expired", request.workspace, request.scope, text, _details(request, tz, {}))


def _details(request: TopupRequest, tz: ZoneInfo, links: dict[str, str]) -> dict[str, Any]:
    details = request.to_dict(tz, request.decided_ms or request.created_ms)
    details.pop("workspace", None)
    details.pop("scope", None)
    return {**details, **links}


def pause_targets(policy: Policy | None, workspace: str, service: str) -> list[str]:
    ws = policy.workspaces.get(workspace) if policy else None
    svc = ws.services.get(service) if ws else None
    return approver_hooks(policy, workspace, svc.team if svc else None)


def paused(
    pause: Pause, tz: ZoneInfo, *, contact: str | None, dry_run: bool = False,
    console_url: str = "",
) -> Alert:  # fmt: skip
    """A key was paused (or, in dry run, would have been)."""
    owner = f" (owner {pause.owner})" if pause.owner else ""
    ask = f" Workspace contact: {contact}." if contact else ""
    where = f"{console_url.rstrip('/')}/keys" if console_url else "the console"
    if dry_run:
        text = (
            f"extproc: dry run: the runaway breaker would have paused key {pause.key_id}"
            f"{owner} in {pause.workspace} at {_when(pause.since_ms, tz)}: {pause.why}.{ask}"
        )
    else:
        text = (
            f"extproc: key {pause.key_id}{owner} in {pause.workspace} is paused since "
            f"{_when(pause.since_ms, tz)}: {pause.why}. Its requests are refused until someone "
            f"resumes it ({where}, or `extproc keys resume {pause.key_id}`).{ask}"
        )
    details = {**pause.to_dict(tz), "dry_run": dry_run}
    return Alert("key_paused", pause.workspace, key_scope(pause.key_id), text, details)


def resumed(pause: Pause, tz: ZoneInfo) -> Alert:
    text = (
        f"extproc: key {pause.key_id} in {pause.workspace} was resumed by {pause.resumed_by} "
        f"at {_when(pause.resumed_ms, tz)} (paused since {_when(pause.since_ms, tz)})."
    )
    return Alert("key_resumed", pause.workspace, key_scope(pause.key_id), text, pause.to_dict(tz))
