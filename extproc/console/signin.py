"""Signing in and out: single sign-on, admin tokens and one-time login links.

* `/auth/login` starts the authorization code flow with PKCE (`oidc`); the provider sends the
  browser back to `/auth/callback`, which must carry the `state` this browser was given (a
  short-lived SameSite=Lax cookie binds the two, so nobody can sign a victim into their own
  account) and finds the PKCE verifier in Redis, whichever replica started the sign-in.
  Someone the policy lets in nowhere, or whom an admin disabled, is refused there.
* The callback answers a small page that moves on to the console rather than a redirect:
  the session cookie is SameSite=Strict, and browsers withhold such cookies for the rest of
  a navigation that came from another site (the provider).
* `/login` takes an admin token (the bootstrap path, with or without SSO) or the one-time
  login link `extproc console --login-token` prints.
* `/logout` (a form with the session's CSRF token) ends this session on every replica;
  `/logout/everywhere` ends every session of the person.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from extproc.console.audit import audit
from extproc.console.identity import SIGNED_IN, VIEW, Need, Principal, person_from_claims, principal
from extproc.console.oidc import ProviderError, TokenRefused
from extproc.console.pages import check_csrf, error_page, render, templates
from extproc.console.people import keep_granted_keys
from extproc.console.security import clear_cookie, set_cookie
from extproc.console.sessions import SESSION_COOKIE, SIGN_IN_SECONDS
from extproc.console.state import state_of
from extproc.governance.access import Person
from extproc.governance.keys import KeyStore

router = APIRouter(include_in_schema=False)
SIGNIN_COOKIE = "extproc_console_signin"
Anyone = Annotated[Principal, Depends(Need(SIGNED_IN, page=True))]


def _next(value: str | None) -> str:
    """Where to go after signing in: a path on this console, never another site."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    parts = urlsplit(value)
    return value if not parts.scheme and not parts.netloc else "/"


def _redirect_uri(request: Request) -> str:
    base = state_of(request).settings.public_url or str(request.base_url).rstrip("/")
    return f"{base}/auth/callback"


async def _open(request: Request, person: Person, via: str, token: str = "") -> str:
    return await state_of(request).sessions.open(person, via, token)


def _with_session(request: Request, response: Response, cookie: str) -> Response:
    set_cookie(
        request, response, SESSION_COOKIE, cookie, state_of(request).settings.session_seconds
    )
    return response


# --- admin tokens and login links (bootstrap) ------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
async def login_page(
    request: Request, token: str | None = None, next: str | None = None
) -> Response:
    st = state_of(request)
    if token is not None:
        if await st.sessions.use_login(token):
            who = principal(None, Person("local-login"), "link")
            await audit(st.redis, who, "console.login", "one-time token")
            cookie = await _open(request, Person("local-login"), "link")
            return _with_session(request, RedirectResponse("/", status_code=303), cookie)
        return error_page(request, 401, "That login link was already used or is wrong.")
    sso = urlsplit(st.oidc.settings.issuer).hostname if st.oidc else None
    return render(request, "login.html", None, sso=sso, next=_next(next) if next else "")


@router.post("/login")
async def login(
    request: Request, token: Annotated[str, Form()], next: Annotated[str, Form()] = ""
) -> Response:
    st = state_of(request)
    name = st.auth.admin(token.strip())
    if name is None:
        sso = urlsplit(st.oidc.settings.issuer).hostname if st.oidc else None
        response = render(request, "login.html", None, failed=True, sso=sso, next=next)
        response.status_code = 401
        return response
    await audit(st.redis, principal(None, Person(name), "token"), "console.login", "admin token")
    cookie = await _open(request, Person(name), "token")
    return _with_session(request, RedirectResponse(_next(next), status_code=303), cookie)


# --- single sign-on --------------------------------------------------------------------------


@router.get("/auth/login")
async def sso_start(request: Request, next: str | None = None) -> Response:
    st = state_of(request)
    if st.oidc is None:
        raise HTTPException(404, "single sign-on is not configured (EXTPROC_OIDC_ISSUER)")
    try:
        started = await st.oidc.start(_redirect_uri(request))
    except ProviderError as exc:
        raise HTTPException(503, f"identity provider unavailable: {exc}") from exc
    await st.sessions.remember_sign_in(
        started.state,
        {"verifier": started.verifier, "nonce": started.nonce, "next": _next(next)},
    )
    response = RedirectResponse(started.url, status_code=303)
    set_cookie(request, response, SIGNIN_COOKIE, started.state, SIGN_IN_SECONDS, "/auth")
    return response


@router.get("/auth/callback")
async def sso_callback(
    request: Request,
    state: str = "",
    code: str = "",
    error: str = "",
    error_description: str = "",
) -> Response:
    st = state_of(request)
    if st.oidc is None:
        raise HTTPException(404, "single sign-on is not configured (EXTPROC_OIDC_ISSUER)")
    if error:
        return error_page(request, 401, f"The identity provider said: {error_description or error}")
    if not state or state != request.cookies.get(SIGNIN_COOKIE):
        return error_page(request, 400, "This sign-in did not start in this browser: try again.")
    pending = await st.sessions.take_sign_in(state)
    if pending is None or not code:
        return error_page(request, 400, "This sign-in expired or was already used: try again.")
    try:
        claims, access = await st.oidc.finish(
            code, _redirect_uri(request), pending["verifier"], pending["nonce"]
        )
    except TokenRefused as exc:
        return error_page(request, 401, f"Sign-in refused: {exc}")
    except ProviderError as exc:
        raise HTTPException(503, f"identity provider unavailable: {exc}") from exc
    policy = st.policy()
    person = person_from_claims(claims, policy)
    await st.people.seen(person)
    if await st.people.is_disabled(person.subject):
        await audit(st.redis, person, "console.login.refused", "disabled")
        return error_page(request, 403, f"{person.label} is disabled in this console.")
    found = principal(policy, person, "oidc")
    if found is None:
        await keep_granted_keys(KeyStore(st.redis), policy, person.subject, ())
        await audit(
            st.redis, person, "console.login.refused", "no role", groups=sorted(person.groups)
        )
        return error_page(request, 403, f"{person.label}: your groups grant no access here.")
    await keep_granted_keys(KeyStore(st.redis), policy, person.subject, person.groups)
    await audit(st.redis, found, "console.login", "single sign-on", groups=sorted(person.groups))
    cookie = await _open(request, person, "oidc", access)
    target = pending["next"] if pending["next"] != "/" or found.can(VIEW) else "/me"
    page = templates.TemplateResponse(
        request, "signed_in.html", {"request": request, "who": found.who, "next": target}
    )
    clear_cookie(request, page, SIGNIN_COOKIE, "/auth")
    return _with_session(request, page, cookie)


# --- signing out -----------------------------------------------------------------------------


@router.post("/logout")
async def logout(request: Request, who: Anyone, csrf: Annotated[str, Form()]) -> Response:
    check_csrf(who, csrf)
    st = state_of(request)
    if who.session is not None:
        await st.sessions.close(who.session)
    await audit(st.redis, who, "console.logout", "this session")
    response = RedirectResponse("/login", status_code=303)
    clear_cookie(request, response, SESSION_COOKIE)
    return response


@router.post("/logout/everywhere")
async def logout_everywhere(
    request: Request, who: Anyone, csrf: Annotated[str, Form()]
) -> Response:
    check_csrf(who, csrf)
    st = state_of(request)
    ended = await st.sessions.close_all(who.person.subject)
    await audit(st.redis, who, "console.logout", "every session", sessions=ended)
    response = RedirectResponse("/login", status_code=303)
    clear_cookie(request, response, SESSION_COOKIE)
    return response
