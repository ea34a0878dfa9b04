"""Deciding top-ups and resuming paused keys: one implementation for the console's pages, its
API and the CLI, each decision checked, audited and announced.

Who may do what (the policy says, every time):

* decide a top-up request (approve, deny) or end a grant early: an admin, or a person the
  request's scope names as approver (`governance.access.may_approve`: a workspace's approvers
  for the workspace and its teams, a team's for that team; a service's scope is its team's);
* resume a paused key: an admin, an approver of the key's scope, or the person the key was
  issued to (a personal key's holder, or the owner an admin named);
* pause a key by hand: an admin.

The CLI acts with the trust of whoever holds the Redis credentials, like `extproc keys`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from extproc.governance.access import ADMIN, Person, may_approve
from extproc.governance.keys import KeyInfo, KeyStore
from extproc.governance.pauses import Pause, PauseError, PauseStore
from extproc.governance.periods import period_at
from extproc.governance.policy import Policy
from extproc.governance.topups import (
    TopupError,
    TopupRequest,
    TopupStore,
    parse_until,
    parse_usd,
    scope_team,
)
from extproc.insight import notices
from extproc.insight.alerts import Alerter, record_alert
from extproc.store.audit import append_audit


class NotAllowed(PermissionError):
    """The person may not decide this request or resume this key; the message says why."""


def alerter_for(
    client: Any, policy: Callable[[], Policy | None], delays: tuple[float, ...] | None = None
) -> Alerter:
    """An alerter delivering to the policy's webhooks, keeping each alert in Redis; `delays`
    between retries (the CLI waits for its deliveries: it retries less)."""

    def targets(event: str) -> list[str]:
        current = policy()
        hooks = current.webhooks if current else ()
        return [w.url for w in hooks if not w.events or event in w.events]

    record = lambda alert: record_alert(client, alert)  # noqa: E731
    if delays is None:
        return Alerter(targets, record=record)
    return Alerter(targets, record=record, delays=delays)


def _actor(actor: Any) -> tuple[str, str]:
    """(who, subject) of a Principal, a Person or a plain name, as the audit log names them."""
    who = str(getattr(actor, "who", None) or getattr(actor, "label", None) or actor)
    return who, str(getattr(actor, "subject", actor))


def may_decide(
    policy: Policy | None, person: Person, roles: frozenset[str], r: TopupRequest
) -> bool:
    if ADMIN in roles:
        return True
    ws = policy.workspaces.get(r.workspace) if policy else None
    return ws is not None and may_approve(policy, person, r.workspace, scope_team(ws, r.scope))


def may_resume(
    policy: Policy | None, person: Person, roles: frozenset[str], pause: Pause, key: KeyInfo | None
) -> bool:
    if ADMIN in roles:
        return True
    if key is not None and (
        key.owner_sub == person.subject
        or (not key.owner_sub and key.owner and key.owner in (person.email, person.subject))
    ):
        return True
    ws = policy.workspaces.get(pause.workspace) if policy else None
    svc = ws.services.get(pause.service) if ws else None
    return ws is not None and may_approve(
        policy, person, pause.workspace, svc.team if svc else None
    )


async def decide(
    client: Any,
    policy: Policy,
    actor: Any,
    request_id: str,
    verdict: str,
    *,
    alerter: Any,
    allowed: Callable[[TopupRequest], bool] | None = None,
    amount_usd: str | None = None,
    until: str | None = None,
    note: str = "",
) -> TopupRequest:
    """Approve, deny or revoke (end a grant now); TopupError or NotAllowed say why not."""
    store = TopupStore(client)
    request = await store.get(request_id)
    if request is None:
        raise TopupError(f"unknown top-up request {request_id[:64]!r}")
    if allowed is not None and not allowed(request):
        raise NotAllowed(f"you may not decide top-ups for {request.label}")
    who, subject = _actor(actor)
    note = " ".join(note.split())[:500]
    if verdict == "approve":
        ws = policy.workspaces.get(request.workspace)
        tz = policy.timezone
        nanos = parse_usd(amount_usd) if amount_usd else None
        until_ms = None
        if until and ws is not None:
            end = period_at(ws.period, store.now_ms(), tz).end_ms
            until_ms = parse_until(until, tz, end, store.now_ms())
        decided = await store.approve(request_id, who, nanos=nanos, until_ms=until_ms, note=note)
        detail = {"granted_nanos": decided.granted_nanos, "until_ms": decided.granted_until_ms}
    elif verdict == "deny":
        decided = await store.deny(request_id, who, note)
        detail = {}
    elif verdict == "revoke":
        decided = await store.revoke(request_id, who, note)
        detail = {"granted_nanos": decided.granted_nanos}
    else:
        raise TopupError(f"unknown decision {verdict!r} (approve, deny or revoke)")
    await append_audit(
        client, who, subject, f"topup.{verdict}", request_id, workspace=decided.workspace,
        scope=decided.scope, amount_nanos=decided.amount_nanos, note=note or None, **detail,
    )  # fmt: skip
    to = [decided.notify_url] if decided.notify_url else []
    alerter.send(notices.decided(decided, policy.timezone), to)
    return decided


async def resume(
    client: Any,
    policy: Policy | None,
    actor: Any,
    key_id: str,
    *,
    alerter: Any,
    allowed: Callable[[Pause, KeyInfo | None], bool] | None = None,
) -> Pause:
    """Let a paused key spend again; PauseError or NotAllowed say why not."""
    info = await KeyStore(client).info(key_id)
    if info is None:
        raise PauseError(f"unknown key id {key_id[:64]}")
    pauses = PauseStore(client)
    current = await pauses.get(info.workspace, key_id)
    if current is None or not current.paused:
        raise PauseError(f"{key_id} is not paused")
    if allowed is not None and not allowed(current, info):
        raise NotAllowed(f"you may not resume {key_id}")
    who, subject = _actor(actor)
    resumed = await pauses.resume(info.workspace, key_id, who)
    await append_audit(
        client, who, subject, "keys.resume", key_id, workspace=info.workspace,
        rule=current.rule, paused_since_ms=current.since_ms,
    )  # fmt: skip
    if policy is not None:
        to = notices.pause_targets(policy, info.workspace, info.service)
        alerter.send(notices.resumed(resumed, policy.timezone), to)
    return resumed


async def pause_by_hand(
    client: Any, policy: Policy | None, actor: Any, key_id: str, why: str, *, alerter: Any
) -> Pause:
    """An admin pauses a key (the same refusal as the breaker's, naming them)."""
    info = await KeyStore(client).info(key_id)
    if info is None:
        raise PauseError(f"unknown key id {key_id[:64]}")
    who, subject = _actor(actor)
    why = " ".join(why.split()) or "an admin paused it"
    pause = Pause(
        key_id=key_id, workspace=info.workspace, service=info.service, rule="manual", why=why,
        since_ms=time.time_ns() // 1_000_000, by=who, owner=info.owner or "",
    )  # fmt: skip
    if not await PauseStore(client).pause(pause):
        raise PauseError(f"{key_id} is paused already")
    await append_audit(
        client, who, subject, "keys.pause", key_id, workspace=info.workspace, why=why
    )
    if policy is not None:
        ws = policy.workspaces.get(info.workspace)
        contact = ws.contact_for(info.team) if ws else None
        to = notices.pause_targets(policy, info.workspace, info.service)
        alerter.send(notices.paused(pause, policy.timezone, contact=contact), to)
    return pause


async def requests_for(
    client: Any, policy: Policy, allowed: Callable[[TopupRequest], bool] | None = None
) -> list[TopupRequest]:
    """Every workspace's requests the caller may see, newest first."""
    store = TopupStore(client)
    found: list[TopupRequest] = []
    for name in policy.workspaces:
        found += [r for r in await store.list(name) if allowed is None or allowed(r)]
    return sorted(found, key=lambda r: r.created_ms, reverse=True)


async def paused_keys(client: Any, policy: Policy) -> list[Pause]:
    """Every pause on record (in force first, then the resumed ones), newest first."""
    store = PauseStore(client)
    found: list[Pause] = []
    for name in policy.workspaces:
        found += list((await store.all(name)).values())
    return sorted(found, key=lambda p: (not p.paused, -p.since_ms))
