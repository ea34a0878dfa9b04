"""The console's pages: server-rendered HTML (Jinja2) with inline SVG, no script at all.

Each page answers one question a platform engineer asks: where do we stand (overview),
who is spending it (drill-down, top spenders, sessions, cache misses), which keys exist
(and make or kill one), what happened (alerts, the audit log), what would a new policy do
(what-if) and what is the shadow policy deciding. Every action goes through the same
service functions as the admin API and writes the same audit entries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import pass_context

from extproc.console import charts, service
from extproc.console.audit import audit, recent
from extproc.console.identity import ADMINISTER, APPROVE, SIGNED_IN, VIEW, Need, Principal
from extproc.console.state import state_of
from extproc.insight.alerts import recent_alerts
from extproc.insight.spend import GROUPS, Report

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
templates.env.globals.update(usd=charts.usd, budget_bar=charts.budget_bar)
templates.env.globals.update(daily_chart=charts.daily_chart, period_chart=charts.period_chart)
templates.env.globals.update(caps=(SIGNED_IN, VIEW, APPROVE, ADMINISTER))
TOP_SPENDERS = 10
CSS = (Path(__file__).parent / "templates" / "console.css").read_text("utf-8")

Viewer = Annotated[Principal, Depends(Need(VIEW, page=True))]
Admin = Annotated[Principal, Depends(Need(ADMINISTER, page=True))]
Anyone = Annotated[Principal, Depends(Need(SIGNED_IN, page=True))]


def check_csrf(who: Principal, token: str) -> None:
    if not who.csrf or token != who.csrf:
        raise HTTPException(403, "stale form: reload the page and try again")


def render(request: Request, name: str, who: Principal | None, **context: Any) -> HTMLResponse:
    """A page in the policy's time zone (one zone everywhere, named on every page)."""
    policy = state_of(request).policy()
    zone = policy.timezone if policy else None
    context.update(request=request, who=who, tz=zone, zone=charts.zone_name(zone))
    response = templates.TemplateResponse(request, name, context)
    return response


@pass_context
def _when(context: Any, ms: int) -> str:
    """A time in the policy's zone (the page names the zone once, in its footer)."""
    return charts.when(ms, context.get("tz"))


templates.env.filters["when"] = _when


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    response = render(request, "error.html", None, status=status, message=message)
    response.status_code = status
    return response


def login_redirect(request: Request, via_provider: bool = False) -> RedirectResponse:
    """To the sign-in page (or straight to the provider), coming back here afterwards (GET
    pages only)."""
    here = request.url.path
    start = "/auth/login" if via_provider else "/login"
    if request.method == "GET" and here not in ("/", "/login"):
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(f"{start}?{urlencode({'next': here + query})}", status_code=303)
    return RedirectResponse(start, status_code=303)


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


@router.get("/console.css")
async def stylesheet() -> Response:
    return Response(CSS, media_type="text/css", headers={"cache-control": "max-age=3600"})


@router.get("/healthz")
async def healthz() -> Response:
    return Response("ok\n", media_type="text/plain")


# --- overview and drill-down ---------------------------------------------------------------


def _burn_by_ws(report: Report) -> dict[str, Any]:
    return {b.workspace: b for b in (report.burn or ()) if not b.service}


@router.get("/", response_class=HTMLResponse)
async def overview(request: Request, who: Anyone) -> Response:
    if not who.can(VIEW):  # a developer or an approver lands on their own page
        return RedirectResponse("/me", status_code=303)
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
async def workspace(
    request: Request, who: Viewer, workspace: str, by: str = "team"
) -> HTMLResponse:
    st = state_of(request)
    policy = st.policy_required()
    if workspace not in policy.workspaces:
        raise HTTPException(404, f"no workspace {workspace!r} in the policy")
    if by not in GROUPS:
        raise HTTPException(400, f"by must be one of {', '.join(GROUPS)}")
    report = await service.spend_report_async(st.sync_redis, policy, by=by)
    rows = [r for r in report.rows if r.workspace == workspace]
    ws = policy.workspaces[workspace]
    chart = next((c for c in report.charts if c.workspace == workspace), None)
    return render(
        request,
        "workspace.html",
        who,
        ws=ws,
        rows=rows,
        by=by,
        groups=list(GROUPS),
        policy=policy,
        chart=chart,
        soft=charts.soft_marks(ws, rows),
    )


@router.get("/usage", response_class=HTMLResponse)
async def usage(request: Request, who: Viewer) -> HTMLResponse:
    st = state_of(request)
    policy = st.policy()
    form = {name: request.query_params.get(name, "").strip() for name in service.PAGE_FILTERS}
    try:
        q = service.usage_query(form, policy.timezone if policy else None, limit=50)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    page = await service.query_usage(st.redis, q)
    shown = {k: v for k, v in form.items() if v and k != "cursor"}
    await audit(st.redis, who, "usage.read", q.workspace or "*", **shown)
    older = urlencode({**shown, "cursor": page["next_cursor"]}) if page["next_cursor"] else ""
    return render(request, "usage.html", who, page=page, q=q, form=form, older=older, policy=policy)


@router.get("/usage/export")
async def usage_export(request: Request, who: Viewer, format: str = "csv") -> Response:
    """The usage page's filters as a file (every record they select, not one page)."""
    st = state_of(request)
    policy = st.policy()
    form = {name: request.query_params.get(name, "").strip() for name in service.PAGE_FILTERS}
    if format not in ("jsonl", "csv", "focus"):
        raise HTTPException(400, "format must be jsonl, csv or focus")
    try:
        q = service.usage_query({**form, "cursor": ""}, policy.timezone if policy else None)
        body, count = await service.export_usage(st.redis, q, format)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    shown = {k: v for k, v in form.items() if v and k != "cursor"}
    await audit(st.redis, who, "usage.export", q.workspace or "*", format=format, rows=count,
                via="console", **shown)  # fmt: skip
    return service.export_response(body, format)  # type: ignore[no-any-return]


# --- alerts and audit ------------------------------------------------------------------------


@router.get("/alerts", response_class=HTMLResponse)
async def alerts(request: Request, who: Viewer) -> HTMLResponse:
    st = state_of(request)
    return render(request, "alerts.html", who, alerts=await recent_alerts(st.redis, 200))


@router.get("/audit", response_class=HTMLResponse)
async def audit_page(request: Request, who: Admin, person: str = "") -> HTMLResponse:
    st = state_of(request)
    entries = await recent(st.redis, 200, person=person.strip() or None)
    return render(request, "audit.html", who, entries=entries, person=person.strip())


# --- what-if -------------------------------------------------------------------------------


@router.get("/what-if", response_class=HTMLResponse)
async def what_if_form(request: Request, who: Admin) -> HTMLResponse:
    st = state_of(request)
    return render(request, "whatif.html", who, text=st.policy_text(), since=30, result=None)


@router.post("/what-if", response_class=HTMLResponse)
async def what_if(
    request: Request,
    who: Admin,
    text: Annotated[str, Form()],
    csrf: Annotated[str, Form()],
    since: Annotated[int, Form(ge=1, le=400)] = 30,
) -> HTMLResponse:
    check_csrf(who, csrf)
    st = state_of(request)
    result = await service.what_if(st.redis, text, since)
    await audit(st.redis, who, "policy.what-if", "", since_days=since, via="console")
    return render(request, "whatif.html", who, text=text, since=since, result=result)


@router.get("/shadow", response_class=HTMLResponse)
async def shadow(request: Request, who: Admin, since_days: int = 1) -> HTMLResponse:
    st = state_of(request)
    summary = await service.shadow_summary(st.redis, max(1, min(since_days, 400)))
    return render(request, "shadow.html", who, s=summary)
