"""The pages about keys and people: every key (admins), my keys (anyone signed in) and the
people who signed in (admins). The approvals page is `halt_routes`'.

Every form posts, then redirects (post/redirect/get): reloading the page after "Create key"
shows the page again, never makes a second key. A new key's secret rides the redirect in a
one-time flash kept with the session in Redis for FLASH_SECONDS, so it is shown exactly once
and never lands in a URL, a log or the browser's history.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from extproc.console import halt, service
from extproc.console.audit import audit
from extproc.console.identity import ADMINISTER, SIGNED_IN, Need, Principal
from extproc.console.pages import check_csrf, render
from extproc.console.state import state_of
from extproc.governance.access import roles_of
from extproc.governance.keys import KeyStore

router = APIRouter(include_in_schema=False)

Admin = Annotated[Principal, Depends(Need(ADMINISTER, page=True))]
Anyone = Annotated[Principal, Depends(Need(SIGNED_IN, page=True))]


def _see(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


async def _made(request: Request, who: Principal) -> dict[str, Any] | None:
    if who.session is None:
        return None
    return await state_of(request).sessions.take_flash(who.session)


# --- every key (admins) ----------------------------------------------------------------------


@router.get("/keys", response_class=HTMLResponse)
async def keys(request: Request, who: Admin) -> HTMLResponse:
    st = state_of(request)
    infos = await KeyStore(st.redis).list()
    made = await _made(request, who)
    paused = await _paused(st)
    return render(
        request, "keys.html", who, keys=infos, policy=st.policy(), made=made, paused=paused
    )


async def _paused(st: Any) -> dict[str, Any]:
    """Key id -> its pause in force, for the key tables."""
    policy = st.policy()
    if policy is None:
        return {}
    return {p.key_id: p for p in await halt.paused_keys(st.redis, policy) if p.paused}


@router.post("/keys")
async def create_key(
    request: Request,
    who: Admin,
    target: Annotated[str, Form(description="workspace/service")],
    csrf: Annotated[str, Form()],
    owner: Annotated[str, Form()] = "",
) -> RedirectResponse:
    check_csrf(who, csrf)
    st = state_of(request)
    workspace, _, service_name = target.partition("/")
    made = await service.create_key(
        KeyStore(st.redis), st.policy(), workspace, service_name, None, owner or None
    )
    await audit(st.redis, who, "keys.create", made["key_id"], workspace=workspace,
                service=service_name, owner=owner or None, via="console")  # fmt: skip
    if who.session is not None:
        await st.sessions.flash(who.session, made)
    return _see("/keys")


@router.post("/keys/{key_id}/revoke")
async def revoke_key(
    request: Request, who: Admin, key_id: str, csrf: Annotated[str, Form()]
) -> RedirectResponse:
    check_csrf(who, csrf)
    st = state_of(request)
    info = await service.revoke_key(KeyStore(st.redis), key_id)
    await audit(st.redis, who, "keys.revoke", key_id, workspace=info.workspace, via="console")
    return _see("/keys")


# --- my keys (anyone signed in) --------------------------------------------------------------


@router.get("/me", response_class=HTMLResponse)
async def me(request: Request, who: Anyone) -> HTMLResponse:
    st = state_of(request)
    mine = await service.keys_of(KeyStore(st.redis), who.person)
    longest = max(who.key_choices.values(), default=0)
    return render(
        request,
        "me.html",
        who,
        paused=await _paused(st),
        keys=mine,
        made=await _made(request, who),
        choices=who.key_choices,
        max_days=longest,
        default_days=min(longest, 30) or 1,
    )


@router.post("/me/keys")
async def mint_key(
    request: Request,
    who: Anyone,
    target: Annotated[str, Form()],
    csrf: Annotated[str, Form()],
    days: Annotated[int | None, Form(ge=1, le=3660)] = None,
) -> RedirectResponse:
    check_csrf(who, csrf)
    st = state_of(request)
    workspace, _, service_name = target.partition("/")
    made = await service.mint_personal_key(
        KeyStore(st.redis), st.policy(), who.person, workspace, service_name, days
    )
    await audit(st.redis, who, "keys.create", made["key_id"], workspace=workspace,
                service=service_name, personal=True, expires_ms=made["expires_ms"],
                via="console")  # fmt: skip
    if who.session is not None:
        await st.sessions.flash(who.session, made)
    return _see("/me")


@router.post("/me/keys/{key_id}/revoke")
async def revoke_mine(
    request: Request, who: Anyone, key_id: str, csrf: Annotated[str, Form()]
) -> RedirectResponse:
    check_csrf(who, csrf)
    st = state_of(request)
    info = await service.revoke_own_key(KeyStore(st.redis), who.person, key_id)
    await audit(st.redis, who, "keys.revoke", key_id, workspace=info.workspace, personal=True,
                via="console")  # fmt: skip
    return _see("/me")


# --- people (admins) and approvals (approvers) -----------------------------------------------


@router.get("/people", response_class=HTMLResponse)
async def people(request: Request, who: Admin) -> HTMLResponse:
    st = state_of(request)
    policy = st.policy()
    found = await st.people.list()
    for p in found:
        p["roles"] = sorted(roles_of(policy, p["groups"]))
    return render(request, "people.html", who, people=found, done=None)


@router.post("/people/disable")
async def disable(
    request: Request, who: Admin, subject: Annotated[str, Form()], csrf: Annotated[str, Form()]
) -> RedirectResponse:
    check_csrf(who, csrf)
    st = state_of(request)
    result = await st.people.disable(KeyStore(st.redis), subject, who.who)
    ended, revoked = result["sessions_ended"], result["keys_revoked"]
    await audit(st.redis, who, "people.disable", subject, via="console", sessions_ended=ended,
                keys_revoked=revoked)  # fmt: skip
    return _see("/people")


@router.post("/people/enable")
async def enable(
    request: Request, who: Admin, subject: Annotated[str, Form()], csrf: Annotated[str, Form()]
) -> RedirectResponse:
    check_csrf(who, csrf)
    st = state_of(request)
    await st.people.enable(subject)
    await audit(st.redis, who, "people.enable", subject, via="console")
    return _see("/people")
