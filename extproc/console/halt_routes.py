"""Top-ups and paused keys in the console: the approvals page and its forms, and the admin
API's routes for the same actions (see `extproc.console.halt` for who may do what).

Every form posts and redirects back (post/redirect/get); every action is audited by
`halt` and announced by webhook.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field

from extproc.console import halt
from extproc.console.identity import ADMINISTER, APPROVE, SIGNED_IN, VIEW, Need, Principal
from extproc.console.pages import check_csrf, render
from extproc.console.state import ConsoleState, state_of
from extproc.governance.keys import KeyStore
from extproc.governance.pauses import Pause
from extproc.governance.topups import TopupRequest

api = APIRouter(prefix="/admin/v1")
pages = APIRouter(include_in_schema=False)

Admin = Annotated[Principal, Depends(Need(ADMINISTER))]
Anyone = Annotated[Principal, Depends(Need(SIGNED_IN))]
Approver = Annotated[Principal, Depends(Need(APPROVE))]
AdminPage = Annotated[Principal, Depends(Need(ADMINISTER, page=True))]
AnyonePage = Annotated[Principal, Depends(Need(SIGNED_IN, page=True))]
ApproverPage = Annotated[Principal, Depends(Need(APPROVE, page=True))]
BACK = ("/approvals", "/keys", "/me")


class Decision(BaseModel):
    amount_usd: str | None = Field(None, description="approve: grant less than asked")
    until: str | None = Field(
        None, description='approve: end sooner than asked (ISO 8601, a date, "monday", "period")'
    )
    note: str = Field("", max_length=500, description="shown to the requester")


class PauseBody(BaseModel):
    why: str = Field("", max_length=500, description="shown in every refusal of the key")


def _alerter(st: ConsoleState) -> Any:
    found = st.extra.get("alerter")
    if found is None:
        found = st.extra["alerter"] = halt.alerter_for(st.redis, st.policy)
    return found


def _decides(st: ConsoleState, who: Principal) -> Any:
    return lambda r: halt.may_decide(st.policy(), who.person, who.roles, r)


def _resumes(st: ConsoleState, who: Principal) -> Any:
    return lambda p, key: halt.may_resume(st.policy(), who.person, who.roles, p, key)


async def _visible_pauses(st: ConsoleState, who: Principal) -> list[tuple[Pause, bool]]:
    """Pauses the caller sees, each with whether they may resume it."""
    policy = st.policy_required()
    keys = {k.key_id: k for k in await KeyStore(st.redis).list()}
    out = []
    for p in await halt.paused_keys(st.redis, policy):
        may = halt.may_resume(policy, who.person, who.roles, p, keys.get(p.key_id))
        if may or who.can(VIEW):
            out.append((p, may and p.paused))
    return out


# --- the admin API ---------------------------------------------------------------------------


@api.get("/topups", summary="Top-up requests I may decide (admins: all), newest first")
async def list_topups(request: Request, who: Approver, status: str | None = None) -> list[Any]:
    st = state_of(request)
    policy = st.policy_required()
    found = await halt.requests_for(st.redis, policy, _decides(st, who))
    now = int(datetime.now().timestamp() * 1000)
    rows = [r.to_dict(policy.timezone, now) for r in found]
    return [r for r in rows if status is None or r["status"] == status]


async def _decide(request: Request, who: Principal, request_id: str, verdict: str,
                  body: Decision | None) -> dict[str, Any]:  # fmt: skip
    st = state_of(request)
    policy = st.policy_required()
    body = body or Decision()
    decided: TopupRequest = await halt.decide(
        st.redis, policy, who, request_id, verdict, alerter=_alerter(st),
        allowed=_decides(st, who), amount_usd=body.amount_usd, until=body.until, note=body.note,
    )  # fmt: skip
    return decided.to_dict(policy.timezone, decided.decided_ms)


@api.post("/topups/{request_id}/approve", summary="Grant a request (all of it, or less)")
async def approve(request: Request, who: Approver, request_id: str,
                  body: Decision | None = None) -> dict[str, Any]:  # fmt: skip
    return await _decide(request, who, request_id, "approve", body)


@api.post("/topups/{request_id}/deny", summary="Refuse a request (the note is shown)")
async def deny(request: Request, who: Approver, request_id: str,
               body: Decision | None = None) -> dict[str, Any]:  # fmt: skip
    return await _decide(request, who, request_id, "deny", body)


@api.post("/topups/{request_id}/revoke", summary="End a granted top-up now")
async def revoke(request: Request, who: Approver, request_id: str,
                 body: Decision | None = None) -> dict[str, Any]:  # fmt: skip
    return await _decide(request, who, request_id, "revoke", body)


@api.get("/paused", summary="Paused keys I may see (and resumed ones), with why")
async def paused(request: Request, who: Anyone) -> list[dict[str, Any]]:
    st = state_of(request)
    tz = st.policy_required().timezone
    return [{**p.to_dict(tz), "may_resume": may} for p, may in await _visible_pauses(st, who)]


@api.post("/keys/{key_id}/resume", summary="Let a paused key spend again")
async def resume(request: Request, who: Anyone, key_id: str) -> dict[str, Any]:
    st = state_of(request)
    done = await halt.resume(st.redis, st.policy(), who, key_id, alerter=_alerter(st),
                             allowed=_resumes(st, who))  # fmt: skip
    return done.to_dict(st.policy_required().timezone)


@api.post("/keys/{key_id}/pause", summary="Pause a key by hand (refused until resumed)")
async def pause(request: Request, who: Admin, key_id: str, body: PauseBody) -> dict[str, Any]:
    st = state_of(request)
    done = await halt.pause_by_hand(st.redis, st.policy(), who, key_id, body.why,
                                    alerter=_alerter(st))  # fmt: skip
    return done.to_dict(st.policy_required().timezone)


# --- pages -----------------------------------------------------------------------------------


@pages.get("/approvals", response_class=HTMLResponse)
async def approvals(request: Request, who: ApproverPage) -> HTMLResponse:
    st = state_of(request)
    policy = st.policy_required()
    now = int(datetime.now().timestamp() * 1000)
    found = await halt.requests_for(st.redis, policy, _decides(st, who))
    rows = [(r, r.to_dict(policy.timezone, now)) for r in found]
    pending = [(r, d) for r, d in rows if d["status"] == "pending"]
    decided = [(r, d) for r, d in rows if d["status"] != "pending"][:50]
    pauses = await _visible_pauses(st, who)
    return render(
        request, "approvals.html", who, pending=pending, decided=decided, pauses=pauses,
        tz=policy.timezone,
    )  # fmt: skip


async def _decide_page(
    request: Request, who: Principal, request_id: str, verdict: str, csrf: str, **form: Any
) -> RedirectResponse:
    check_csrf(who, csrf)
    st = state_of(request)
    await halt.decide(
        st.redis, st.policy_required(), who, request_id, verdict, alerter=_alerter(st),
        allowed=_decides(st, who), **form,
    )  # fmt: skip
    return RedirectResponse("/approvals", status_code=303)


@pages.post("/approvals/{request_id}/approve")
async def approve_page(
    request: Request,
    who: ApproverPage,
    request_id: str,
    csrf: Annotated[str, Form()],
    amount_usd: Annotated[str, Form()] = "",
    until: Annotated[str, Form()] = "",
    note: Annotated[str, Form()] = "",
) -> RedirectResponse:
    form = {"amount_usd": amount_usd or None, "until": until or None, "note": note}
    return await _decide_page(request, who, request_id, "approve", csrf, **form)


@pages.post("/approvals/{request_id}/deny")
async def deny_page(
    request: Request, who: ApproverPage, request_id: str, csrf: Annotated[str, Form()],
    note: Annotated[str, Form()] = "",
) -> RedirectResponse:  # fmt: skip
    return await _decide_page(request, who, request_id, "deny", csrf, note=note)


@pages.post("/approvals/{request_id}/revoke")
async def revoke_page(
    request: Request, who: ApproverPage, request_id: str, csrf: Annotated[str, Form()],
    note: Annotated[str, Form()] = "",
) -> RedirectResponse:  # fmt: skip
    return await _decide_page(request, who, request_id, "revoke", csrf, note=note)


@pages.post("/keys/{key_id}/resume")
async def resume_page(
    request: Request, who: AnyonePage, key_id: str, csrf: Annotated[str, Form()],
    back: Annotated[str, Form()] = "/approvals",
) -> RedirectResponse:  # fmt: skip
    check_csrf(who, csrf)
    st = state_of(request)
    await halt.resume(st.redis, st.policy(), who, key_id, alerter=_alerter(st),
                      allowed=_resumes(st, who))  # fmt: skip
    return RedirectResponse(back if back in BACK else "/approvals", status_code=303)


@pages.post("/keys/{key_id}/pause")
async def pause_page(
    request: Request, who: AdminPage, key_id: str, csrf: Annotated[str, Form()],
    why: Annotated[str, Form()] = "",
) -> RedirectResponse:  # fmt: skip
    check_csrf(who, csrf)
    st = state_of(request)
    await halt.pause_by_hand(st.redis, st.policy(), who, key_id, why, alerter=_alerter(st))
    return RedirectResponse("/keys", status_code=303)
