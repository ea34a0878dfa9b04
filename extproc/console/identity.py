"""Who is asking, and may they: every API route and page names the capability it needs.

A route declares `Need(capability)` (the admin API) or `Need(capability, page=True)` (a
page) as a dependency; `tests/e2e/test_console_identity.py` walks every route the app has
with every kind of caller and fails on a route that declares none (see PUBLIC_ROUTES).

Capabilities, from the policy's `console:` section and the scopes' `approvers:`:

    signed_in   anyone the console lets in (a role, a personal-key grant or a scope to
                approve): their own keys, sign-out
    view        role viewer (or admin): spend, usage, alerts, exports
    approve     named in some scope's approvers, or an admin: the approvals page (top-ups
                of the scopes they approve; admins decide them all)
    admin       role admin: keys, policy, what-if, shadow, people, audit

Admin tokens and the one-time login link are the bootstrap path: they hold the admin role
(and so view), whatever the policy says, and need no identity provider.

A caller is resolved per request from the session (pages) or the bearer credential (the
API), and the roles are derived from the groups then and there, so a policy edit or a group
the provider removed counts at the next request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import HTTPException, Request

from extproc.console.oidc import ProviderError, TokenRefused
from extproc.console.people import keep_granted_keys
from extproc.console.sessions import SESSION_COOKIE, Session, now_ms
from extproc.console.state import ConsoleState, state_of
from extproc.governance.access import (
    ADMIN,
    VIEWER,
    Person,
    approver_scopes,
    groups_from_claims,
    has_access,
    key_choices,
    roles_of,
)
from extproc.governance.keys import KeyStore
from extproc.governance.policy import Policy

SIGNED_IN, VIEW, APPROVE, ADMINISTER = "signed_in", "view", "approve", "admin"
CAPABILITIES = (SIGNED_IN, VIEW, APPROVE, ADMINISTER)
PUBLIC_ROUTES = frozenset(
    {
        ("GET", "/admin/v1/openapi.json"),
        ("GET", "/favicon.ico"),
        ("GET", "/console.css"),
        ("GET", "/healthz"),
        ("GET", "/login"),
        ("POST", "/login"),
        ("GET", "/auth/login"),
        ("GET", "/auth/callback"),
    }
)
"""Routes anyone may reach: the sign-in pages and what they load. Nothing else."""
BOOTSTRAP = ("token", "link")
REAUTH = "x-extproc-reauth"
"""Marks the 401 of a session the provider stopped vouching for: pages go back through it."""


@dataclass(frozen=True)
class Principal:
    person: Person
    via: str  # "token" / "link" (admin bootstrap), "oidc" (a browser session), "jwt" (API)
    roles: frozenset[str]
    approves: tuple[tuple[str, str | None], ...] = ()
    key_choices: dict[tuple[str, str], int] = field(default_factory=dict)
    session: Session | None = None

    @property
    def who(self) -> str:
        """The name the audit log and the pages show."""
        return self.person.label

    @property
    def subject(self) -> str:
        """The stable identifier the audit log is filtered by."""
        return f"token:{self.person.subject}" if self.via in BOOTSTRAP else self.person.subject

    @property
    def csrf(self) -> str:
        return self.session.csrf if self.session else ""

    def can(self, capability: str) -> bool:
        if capability == SIGNED_IN:
            return True
        if capability == VIEW:
            return VIEWER in self.roles
        if capability == ADMINISTER:
            return ADMIN in self.roles
        if capability == APPROVE:
            return bool(self.approves) or ADMIN in self.roles
        raise ValueError(f"unknown capability {capability!r}")


def principal(
    policy: Policy | None, person: Person, via: str, session: Session | None = None
) -> Principal | None:
    """The caller as the policy sees `person` now; None when it lets them in nowhere."""
    if via in BOOTSTRAP:
        return Principal(person, via, frozenset({ADMIN, VIEWER}), session=session)
    if not has_access(policy, person):
        return None
    return Principal(
        person,
        via,
        roles_of(policy, person.groups),
        tuple(approver_scopes(policy, person)),
        key_choices(policy, person.groups),
        session,
    )


def person_from_claims(claims: dict[str, object], policy: Policy | None) -> Person:
    claim = policy.console.roles_claim if policy else "groups"
    email = claims.get("email")
    name = claims.get("name") or claims.get("preferred_username")
    return Person(
        subject=str(claims["sub"]),
        email=email if isinstance(email, str) and email else None,
        name=name if isinstance(name, str) and name else None,
        groups=groups_from_claims(claims, claim),
    )


async def sweep_if_new_policy(st: ConsoleState, policy: Policy | None) -> None:
    """Once per policy loaded: revoke personal keys it no longer grants."""
    if policy is not None and policy is not st.swept:
        st.swept = policy
        await st.people.sweep(KeyStore(st.redis), policy)


async def _recheck(st: ConsoleState, session: Session, policy: Policy | None) -> bool:
    """Ask the provider about the session's person again when due; False: sign in again."""
    oidc = st.oidc
    if session.via != "oidc" or oidc is None:
        return True
    if now_ms() - session.checked_ms < oidc.settings.recheck_seconds * 1000:
        return True
    try:
        info = await oidc.userinfo(session.access_token)
    except ProviderError as exc:
        raise HTTPException(503, f"identity provider unavailable: {exc}") from exc
    if info is None or str(info.get("sub")) != session.person.subject:
        await st.sessions.close(session)
        return False
    fresh = person_from_claims({**info, "sub": session.person.subject}, policy)
    changed = fresh.groups != session.person.groups
    await st.sessions.regroup(session, fresh.groups)
    if changed:
        await st.people.seen(session.person)
        await keep_granted_keys(KeyStore(st.redis), policy, fresh.subject, fresh.groups)
    return True


async def from_session(request: Request) -> Principal | None:
    """The page caller, from the session cookie; None: not signed in (or no longer)."""
    st = state_of(request)
    session = await st.sessions.get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return None
    policy = st.policy()
    if session.via not in BOOTSTRAP:
        if await st.people.is_disabled(session.person.subject):
            await st.sessions.close(session)
            return None
        if not await _recheck(st, session, policy):
            # The provider no longer honours the session's token (it expired, or was
            # revoked): back through the provider, which signs a person in again at once
            # while its own session lasts, and refuses them if it does not.
            raise HTTPException(401, "sign in again", headers={REAUTH: "1"})
    found = principal(policy, session.person, session.via, session)
    if found is None:
        await st.sessions.close(session)
        await keep_granted_keys(KeyStore(st.redis), policy, session.person.subject, ())
        raise HTTPException(403, "your groups no longer grant access to this console")
    return found


async def from_bearer(request: Request) -> Principal:
    """The API caller, from `Authorization: Bearer` (an admin token or the provider's JWT)."""
    st = state_of(request)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "an admin token is required: Authorization: Bearer <token>")
    name = st.auth.admin(token)
    if name is not None:
        return Principal(Person(name), "token", frozenset({ADMIN, VIEWER}))
    oidc = st.oidc
    if oidc is None or not oidc.takes_bearer_tokens or token.count(".") != 2:
        raise HTTPException(401, "an admin token is required: Authorization: Bearer <token>")
    try:
        claims = await oidc.verify_access_token(token)
    except TokenRefused as exc:
        raise HTTPException(401, str(exc)) from exc
    except ProviderError as exc:
        raise HTTPException(503, f"identity provider unavailable: {exc}") from exc
    policy = st.policy()
    person = person_from_claims(claims, policy)
    before = await st.people.get(person.subject)
    if before is not None and before["disabled"]:
        raise HTTPException(403, f"{person.label} is disabled in this console")
    if before is None or frozenset(before["groups"]) != person.groups:
        await st.people.seen(person)  # the groups their keys are checked against
        await keep_granted_keys(KeyStore(st.redis), policy, person.subject, person.groups)
    found = principal(policy, person, "jwt")
    if found is None:
        raise HTTPException(403, f"{person.label}'s groups grant no access to this console")
    return found


class Need:
    """A route's requirement, as a FastAPI dependency that returns the caller.

    Not signed in: 401 (the API) or a redirect to the sign-in page (pages). Signed in
    without the capability: 403.
    """

    def __init__(self, capability: str, *, page: bool = False) -> None:
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {capability!r}")
        self.capability = capability
        self.page = page

    async def __call__(self, request: Request) -> Principal:
        st = state_of(request)
        await sweep_if_new_policy(st, st.policy())
        if self.page:
            found = await from_session(request)
            if found is None:
                raise HTTPException(401, "sign in first")
        else:
            found = await from_bearer(request)
        if not found.can(self.capability):
            raise HTTPException(403, f"{found.who} may not do this (needs {self.capability})")
        return found
