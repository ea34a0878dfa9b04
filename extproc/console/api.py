"""The admin API: JSON under `/admin/v1`, described by the OpenAPI document FastAPI serves.

Every route is a thin translation onto `extproc.console.service` (which the CLI uses too),
names the capability it needs (`extproc.console.identity`) and writes one audit entry naming
the caller. Callers authenticate with `Authorization: Bearer` and an admin token, or, with
single sign-on configured, an access token (a JWT) the identity provider issued for
EXTPROC_OIDC_AUDIENCE: their groups give their roles. Errors keep one shape,
`{"error": {"message", "type", "code"}}`, like the gateway's: a refused key operation is a
400 naming the key or field, Redis being away is a 503, never a traceback.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from extproc.console import service
from extproc.console.audit import audit, recent
from extproc.console.identity import ADMINISTER, VIEW, Need, Principal
from extproc.console.state import ConsoleState, state_of
from extproc.governance.keys import KeyStore
from extproc.insight.alerts import recent_alerts
from extproc.insight.spend import GROUPS, SELECTIONS

assert set(SELECTIONS) == {"current", "previous", "today"} and len(GROUPS) == 5

router = APIRouter(prefix="/admin/v1")


Admin = Annotated[Principal, Depends(Need(ADMINISTER))]
Viewer = Annotated[Principal, Depends(Need(VIEW))]


def _state(request: Request) -> ConsoleState:
    return state_of(request)


State = Annotated[ConsoleState, Depends(_state)]


class KeyCreate(BaseModel):
    workspace: str = Field(description="workspace the key spends from")
    service: str = Field(description="service within the workspace")
    team: str | None = Field(None, description="default: the service's team in the policy")
    owner: str | None = Field(None, description="person or system responsible")


class KeyRotate(BaseModel):
    overlap_seconds: int = Field(86400, ge=0, le=90 * 86400, description="old key keeps working")


class PolicyCandidate(BaseModel):
    text: str = Field(description="the candidate policy file, YAML")


class WhatIfRequest(BaseModel):
    text: str = Field(description="the candidate policy file, YAML")
    since_days: int = Field(30, ge=1, le=400, description="replay the ledger of these days")


@router.get("/keys", summary="List virtual keys (never the keys themselves)")
async def list_keys(who: Admin, st: State, workspace: str | None = None) -> list[dict[str, Any]]:
    infos = await KeyStore(st.redis).list(workspace)
    await audit(st.redis, who, "keys.list", workspace or "*")
    return [i.to_dict() for i in infos]


@router.post("/keys", status_code=201, summary="Create a key (the secret is shown once)")
async def create_key(who: Admin, st: State, body: KeyCreate) -> dict[str, Any]:
    made = await service.create_key(
        KeyStore(st.redis), st.policy(), body.workspace, body.service, body.team, body.owner
    )
    await audit(st.redis, who, "keys.create", made["key_id"], workspace=body.workspace,
                service=body.service, team=made["team"], owner=body.owner)  # fmt: skip
    return made


@router.post("/keys/{key_id}/rotate", summary="New key; the old one works for the overlap")
async def rotate_key(
    who: Admin, st: State, key_id: str, body: KeyRotate | None = None
) -> dict[str, Any]:
    overlap = (body or KeyRotate()).overlap_seconds
    made = await service.rotate_key(KeyStore(st.redis), key_id, overlap)
    await audit(st.redis, who, "keys.rotate", key_id, new_key_id=made["key_id"], overlap=overlap)
    return made


@router.post("/keys/{key_id}/revoke", summary="Refuse a key from now on, on every replica")
async def revoke_key(who: Admin, st: State, key_id: str) -> dict[str, Any]:
    info = await service.revoke_key(KeyStore(st.redis), key_id)
    await audit(st.redis, who, "keys.revoke", key_id, workspace=info.workspace)
    return info.to_dict()


@router.get("/spend", summary="The figures of `extproc spend --json`")
async def spend(
    who: Viewer,
    st: State,
    period: Literal["current", "previous", "today"] = "current",
    by: Literal["team", "service", "key", "model", "session"] | None = None,
    now: Annotated[str | None, Query(description="ISO 8601; default: the clock")] = None,
) -> dict[str, Any]:
    policy = st.policy_required()
    when = _instant(now, policy.timezone) if now else None
    report = await service.spend_report_async(st.sync_redis, policy, when, period=period, by=by)
    await audit(st.redis, who, "spend.read", period, by=by)
    return report.to_dict()


def _instant(text: str, tz: Any) -> datetime:
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise HTTPException(400, f"not an ISO 8601 time: {text!r}") from exc
    return value.replace(tzinfo=tz) if value.tzinfo is None else value


def _ms(text: str | None, tz: Any) -> int | None:
    return None if not text else int(_instant(text, tz).timestamp() * 1000)


def usage_filters(
    request: Request,
    workspace: str | None = None,
    team: str | None = None,
    service_: Annotated[str | None, Query(alias="service")] = None,
    key_id: str | None = None,
    model: str | None = None,
    outcome: str | None = None,
    session: Annotated[str | None, Query(description="a session_id")] = None,
    since: Annotated[str | None, Query(description="ISO 8601, inclusive")] = None,
    until: Annotated[str | None, Query(description="ISO 8601, exclusive")] = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE)] = 100,
    cursor: Annotated[str | None, Query(pattern=r"^\d+-\d+$")] = None,
) -> service.UsageQuery:
    """The usage filters, shared by the page of records and the export."""
    policy = state_of(request).policy()
    tz = policy.timezone if policy else None
    return service.UsageQuery(
        workspace=workspace,
        team=team,
        service=service_,
        key_id=key_id,
        model=model,
        outcome=outcome,
        session=session,
        since_ms=_ms(since, tz),
        until_ms=_ms(until, tz),
        limit=limit,
        cursor=cursor,
    )


Filters = Annotated[service.UsageQuery, Depends(usage_filters)]


@router.get("/usage", summary="Ledger records, filtered and paginated (newest first)")
async def usage(who: Viewer, st: State, q: Filters) -> dict[str, Any]:
    page = await service.query_usage(st.redis, q)
    filters = {k: v for k, v in vars_of(q).items() if v is not None and k != "limit"}
    await audit(st.redis, who, "usage.read", q.workspace or "*", **filters)
    return page


@router.get(
    "/usage/export",
    summary="The filtered records as a file: jsonl, csv or FOCUS csv (default: 30 days)",
    response_class=PlainTextResponse,
)
async def export(
    who: Viewer,
    st: State,
    q: Filters,
    format: Literal["jsonl", "csv", "focus"] = "csv",
) -> Response:
    try:
        body, count = await service.export_usage(st.redis, q, format)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    filters = {k: v for k, v in vars_of(q).items() if v is not None and k != "limit"}
    await audit(st.redis, who, "usage.export", q.workspace or "*", format=format, rows=count,
                **filters)  # fmt: skip
    return service.export_response(body, format)


def vars_of(q: service.UsageQuery) -> dict[str, Any]:
    return {name: getattr(q, name) for name in q.__slots__}  # type: ignore[attr-defined]


@router.get("/policy", summary="The policy in force")
async def policy(who: Admin, st: State) -> dict[str, Any]:
    current = st.policy_required()
    await audit(st.redis, who, "policy.read", current.source)
    return service.policy_summary(current, st.policy_text())


@router.post("/policy/validate", summary="Check a candidate policy; problems name the field")
async def validate_policy(
    who: Admin, st: State, body: Annotated[PolicyCandidate, Body()]
) -> dict[str, Any]:
    result = service.validate_policy_text(body.text)
    await audit(st.redis, who, "policy.validate", "", valid=result["valid"])
    return result


@router.post("/policy/what-if", summary="Replay the ledger under a candidate policy")
async def what_if(who: Admin, st: State, body: WhatIfRequest) -> dict[str, Any]:
    result = await service.what_if(st.redis, body.text, body.since_days)
    await audit(st.redis, who, "policy.what-if", "", since_days=body.since_days,
                valid=result["valid"])  # fmt: skip
    return result


@router.get("/shadow", summary="The shadow policy's decisions compared with the real ones")
async def shadow(
    who: Admin, st: State, since_days: Annotated[int, Query(ge=1, le=400)] = 1
) -> dict[str, Any]:
    await audit(st.redis, who, "shadow.read", "", since_days=since_days)
    return await service.shadow_summary(st.redis, since_days)


@router.get("/alerts", summary="Recent alerts (soft limits, burn rate), newest first")
async def alerts(
    who: Viewer, st: State, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[dict[str, Any]]:
    await audit(st.redis, who, "alerts.read")
    return await recent_alerts(st.redis, limit)


@router.get("/audit", summary="The admin audit log: who did what, when (newest first)")
async def audit_log(
    who: Admin,
    st: State,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    person: Annotated[
        str | None, Query(description="only this person's entries: subject, email or name")
    ] = None,
) -> list[dict[str, Any]]:
    return await recent(st.redis, limit, person=person)
