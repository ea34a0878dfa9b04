"""The admin API's people routes: who am I, my personal keys, the people (admins), and the
scopes I approve for (approvers, for the top-up flow to build on).

A person is named by the identity provider's subject in request bodies, never in a path:
subjects are opaque strings (`auth0|123`, a URL, a GUID) that do not belong in URLs.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from extproc.console import service
from extproc.console.audit import audit
from extproc.console.identity import ADMINISTER, APPROVE, SIGNED_IN, Need, Principal
from extproc.console.state import state_of
from extproc.governance.access import roles_of
from extproc.governance.keys import KeyStore

router = APIRouter(prefix="/admin/v1")

Admin = Annotated[Principal, Depends(Need(ADMINISTER))]
Anyone = Annotated[Principal, Depends(Need(SIGNED_IN))]
Approver = Annotated[Principal, Depends(Need(APPROVE))]


class PersonalKey(BaseModel):
    workspace: str = Field(description="a workspace the policy grants your groups keys in")
    service: str = Field(description="a service the grant names")
    days: int | None = Field(None, ge=1, le=3660, description="default: the longest allowed")


class Subject(BaseModel):
    subject: str = Field(min_length=1, max_length=512, description="the provider's `sub`")


def _scopes(who: Principal) -> list[dict[str, str | None]]:
    return [{"workspace": ws, "team": team} for ws, team in who.approves]


@router.get("/me", summary="Who the credential belongs to: roles, approvals, key grants")
async def me(who: Anyone) -> dict[str, Any]:
    return {
        "who": who.who,
        "subject": who.subject,
        "via": who.via,
        "groups": sorted(who.person.groups),
        "roles": sorted(who.roles),
        "approves": _scopes(who),
        "personal_keys": [
            {"workspace": ws, "service": svc, "max_days": days}
            for (ws, svc), days in sorted(who.key_choices.items())
        ],
    }


@router.get("/me/keys", summary="The keys issued to me (never the keys themselves)")
async def my_keys(request: Request, who: Anyone) -> list[dict[str, Any]]:
    store = KeyStore(state_of(request).redis)
    return [k.to_dict() for k in await service.keys_of(store, who.person)]


@router.post("/me/keys", status_code=201, summary="Mint a personal key the policy allows me")
async def mint_key(request: Request, who: Anyone, body: PersonalKey) -> dict[str, Any]:
    st = state_of(request)
    made = await service.mint_personal_key(
        KeyStore(st.redis), st.policy(), who.person, body.workspace, body.service, body.days
    )
    await audit(st.redis, who, "keys.create", made["key_id"], workspace=body.workspace,
                service=body.service, personal=True, expires_ms=made["expires_ms"])  # fmt: skip
    return made


@router.post("/me/keys/{key_id}/revoke", summary="Revoke one of my personal keys")
async def revoke_mine(request: Request, who: Anyone, key_id: str) -> dict[str, Any]:
    st = state_of(request)
    info = await service.revoke_own_key(KeyStore(st.redis), who.person, key_id)
    await audit(st.redis, who, "keys.revoke", key_id, workspace=info.workspace, personal=True)
    return info.to_dict()


@router.get("/people", summary="Everyone who signed in, their groups and roles now")
async def people(request: Request, who: Admin) -> list[dict[str, Any]]:
    st = state_of(request)
    policy = st.policy()
    found = await st.people.list()
    for p in found:
        p["roles"] = sorted(roles_of(policy, p["groups"]))
    await audit(st.redis, who, "people.list")
    return found


@router.post("/people/disable", summary="Sign a person out everywhere, revoke their keys")
async def disable(request: Request, who: Admin, body: Subject) -> dict[str, Any]:
    st = state_of(request)
    result = await st.people.disable(KeyStore(st.redis), body.subject, who.who)
    ended, revoked = result["sessions_ended"], result["keys_revoked"]
    await audit(st.redis, who, "people.disable", body.subject, sessions_ended=ended,
                keys_revoked=revoked)  # fmt: skip
    return result


@router.post("/people/enable", summary="Let a disabled person sign in again")
async def enable(request: Request, who: Admin, body: Subject) -> dict[str, Any]:
    st = state_of(request)
    changed = await st.people.enable(body.subject)
    await audit(st.redis, who, "people.enable", body.subject)
    return {"subject": body.subject, "enabled": True, "was_disabled": changed}


@router.get("/approvals", summary="The budgets I may approve top-ups for")
async def approvals(who: Approver) -> dict[str, Any]:
    return {"approves": _scopes(who)}
