"""The console's pages: server-rendered HTML (Jinja2) with inline SVG, no script at all.

Each page answers one question a platform engineer asks: where do we stand (overview),
who is spending it (drill-down, top spenders, sessions, cache misses), which keys exist
(and make or kill one), what happened (alerts, the audit log), what would a new policy do
(what-if) and what is the shadow policy deciding. Every action goes through the same
service functions as the admin API and writes the same audit entries.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from extproc.console import charts, service
from extproc.console.audit import audit, recent
from extproc.console.auth import SESSION_COOKIE, SESSION_SECONDS, Session
from extproc.console.state import state_of
from extproc.governance.keys import KeyStore
from extproc.insight.alerts import recent_alerts
from extproc.insight.spend import GROUPS, Report

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
templates.env.globals.update(usd=charts.usd, budget_bar=charts.budget_bar)
templates.env.globals.update(daily_chart=charts.daily_chart)
TOP_SPENDERS = 10


def _when(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000).astimezone().strftime("%Y-%m-%d %H:%M:%S") if ms else "-"
    )


templates.env.filters["when"] = _when


def session(request: Request) -> Session:
    found = state_of(request).auth.session(request.cookies.get(SESSION_COOKIE))
    if found is None:
        raise HTTPException(401, "log in first")
    return found


Who = Annotated[Session, Depends(session)]


def _check_csrf(who: Session, token: str) -> None:
    if token != who.csrf:
        raise HTTPException(403, "stale form: reload the page and try again")


def render(request: Request, name: str, who: Session | None, **context: Any) -> HTMLResponse:
    context.update(request=request, who=who)
    return templates.TemplateResponse(request, name, context)


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    response = render(request, "error.html", None, status=status, message=message)
    response.status_code = status
    return response


def login_redirect(request: Request) -> RedirectResponse:
    return RedirectResponse("/login", status_code=303)


_ICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    '<rect width="16" height="16" rx="3" fill="#263238"/>'
    '<rect x="3" y="9" width="3" height="4" fill="#8bc34a"/>'
    '<rect x="7" y="6" width="3" height="7" fill="#ffc107"/>'
    '<rect x="11" y="3" width="3" height="10" fill="#f44336"/></svg>'
)


@router.get("/favicon.ico")
async def favicon() -> Response:
    return Response(_ICON, media_type="image/svg+xml", headers={"cache-control": "max-age=86400"})


# --- login ---------------------------------------------------------------------------------


def _logged_in(request: Request, who: str) -> RedirectResponse:
    sid = state_of(request).auth.open_session(who)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        SESSION_COOKIE, sid, max_age=SESSION_SECONDS, httponly=True, samesite="strict"
    )
    return response


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, token: str | None = None) -> Response:
    st = state_of(request)
    if token is not None:
        if st.auth.use_login(token):
            await audit(st.redis, "local-login", "console.login", "one-time token")
            return _logged_in(request, "local-login")
        return error_page(request, 401, "That login link was already used or is wrong.")
    return render(request, "login.html", None)


@router.post("/login")
async def login(request: Request, token: Annotated[str, Form()]) -> Response:
    st = state_of(request)
    who = st.auth.admin(token.strip())
    if who is None:
        response = render(request, "login.html", None, failed=True)
        response.status_code = 401
        return response
    await audit(st.redis, who, "console.login", "admin token")
    return _logged_in(request, who)


@router.post("/logout")
async def logout(request: Request) -> RedirectResponse:
    state_of(request).auth.close_session(request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


# --- overview and drill-down ---------------------------------------------------------------


def _burn_by_ws(report: Report) -> dict[str, Any]:
    return {b.workspace: b for b in (report.burn or ()) if not b.service}


@router.get("/", response_class=HTMLResponse)
async def overview(request: Request, who: Who) -> HTMLResponse:
    st = state_of(request)
    policy = st.policy_required()
    report = await service.spend_report_async(st.sync_redis, policy, by="key")
    sessions = await service.spend_report_async(st.sync_redis, policy, by="session")
    workspaces = [r for r in report.rows if r.kind == "workspace"]
    keys = sorted((r for r in report.rows if r.kind == "key"), key=lambda r: -r.spent_nanos)
    charts_by_ws = {c.workspace: c for c in report.charts}
    return render(
        request,
        "overview.html",
        who,
        report=report,
        policy=policy,
        workspaces=workspaces,
        charts=charts_by_ws,
        burn=_burn_by_ws(report),
        top=keys[:TOP_SPENDERS],
        sessions=[r for r in sessions.rows if r.kind == "session"][:TOP_SPENDERS],
        alerts=(await recent_alerts(st.redis, 5)),
    )


@router.get("/w/{workspace}", response_class=HTMLResponse)
async def workspace(request: Request, who: Who, workspace: str, by: str = "team") -> HTMLResponse:
    st = state_of(request)
    policy = st.policy_required()
    if workspace not in policy.workspaces:
        raise HTTPException(404, f"no workspace {workspace!r} in the policy")
    if by not in GROUPS:
        raise HTTPException(400, f"by must be one of {', '.join(GROUPS)}")
    report = await service.spend_report_async(st.sync_redis, policy, by=by)
    rows = [r for r in report.rows if r.workspace == workspace]
    ws = policy.workspaces[workspace]
    return render(
        request, "workspace.html", who, ws=ws, rows=rows, by=by, groups=list(GROUPS), policy=policy
    )


@router.get("/usage", response_class=HTMLResponse)
async def usage(
    request: Request,
    who: Who,
    workspace: str | None = None,
    team: str | None = None,
    key_id: str | None = None,
    cursor: str | None = None,
) -> HTMLResponse:
    st = state_of(request)
    q = service.UsageQuery(
        workspace=workspace or None,
        team=team or None,
        service=request.query_params.get("service") or None,
        key_id=key_id or None,
        limit=50,
        cursor=cursor or None,
    )
    page = await service.query_usage(st.redis, q)
    await audit(st.redis, who.who, "usage.read", workspace or "*", key_id=key_id)
    return render(request, "usage.html", who, page=page, q=q)


# --- keys ----------------------------------------------------------------------------------


@router.get("/keys", response_class=HTMLResponse)
async def keys(request: Request, who: Who) -> HTMLResponse:
    st = state_of(request)
    infos = await KeyStore(st.redis).list()
    return render(request, "keys.html", who, keys=infos, policy=st.policy(), made=None)


@router.post("/keys", response_class=HTMLResponse)
async def create_key(
    request: Request,
    who: Who,
    target: Annotated[str, Form(description="workspace/service")],
    csrf: Annotated[str, Form()],
    owner: Annotated[str, Form()] = "",
) -> HTMLResponse:
    _check_csrf(who, csrf)
    st = state_of(request)
    workspace, _, service_name = target.partition("/")
    made = await service.create_key(
        KeyStore(st.redis), st.policy(), workspace, service_name, None, owner or None
    )
    await audit(st.redis, who.who, "keys.create", made["key_id"], workspace=workspace,
                service=service_name, owner=owner or None, via="console")  # fmt: skip
    infos = await KeyStore(st.redis).list()
    return render(request, "keys.html", who, keys=infos, policy=st.policy(), made=made)


@router.post("/keys/{key_id}/revoke")
async def revoke_key(
    request: Request, who: Who, key_id: str, csrf: Annotated[str, Form()]
) -> RedirectResponse:
    _check_csrf(who, csrf)
    st = state_of(request)
    info = await service.revoke_key(KeyStore(st.redis), key_id)
    await audit(st.redis, who.who, "keys.revoke", key_id, workspace=info.workspace, via="console")
    return RedirectResponse("/keys", status_code=303)


# --- alerts and audit ------------------------------------------------------------------------


@router.get("/alerts", response_class=HTMLResponse)
async def alerts(request: Request, who: Who) -> HTMLResponse:
    st = state_of(request)
    return render(request, "alerts.html", who, alerts=await recent_alerts(st.redis, 200))


@router.get("/audit", response_class=HTMLResponse)
async def audit_page(request: Request, who: Who) -> HTMLResponse:
    st = state_of(request)
    return render(request, "audit.html", who, entries=await recent(st.redis, 200))


# --- what-if -------------------------------------------------------------------------------


@router.get("/what-if", response_class=HTMLResponse)
async def what_if_form(request: Request, who: Who) -> HTMLResponse:
    st = state_of(request)
    return render(request, "whatif.html", who, text=st.policy_text(), since=30, result=None)


@router.post("/what-if", response_class=HTMLResponse)
async def what_if(
    request: Request,
    who: Who,
    text: Annotated[str, Form()],
    csrf: Annotated[str, Form()],
    since: Annotated[int, Form(ge=1, le=400)] = 30,
) -> HTMLResponse:
    _check_csrf(who, csrf)
    st = state_of(request)
    result = await service.what_if(st.redis, text, since)
    await audit(st.redis, who.who, "policy.what-if", "", since_days=since, via="console")
    return render(request, "whatif.html", who, text=text, since=since, result=result)


@router.get("/shadow", response_class=HTMLResponse)
async def shadow(request: Request, who: Who, since_days: int = 1) -> HTMLResponse:
    st = state_of(request)
    summary = await service.shadow_summary(st.redis, max(1, min(since_days, 400)))
    return render(request, "shadow.html", who, s=summary)
