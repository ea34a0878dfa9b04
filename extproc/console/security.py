"""What every console answer carries so a browser cannot be turned against its user.

* Content-Security-Policy: nothing but our own stylesheet and inline SVG; no script at all
  (the console has none), forms post only to us, no framing (`frame-ancestors 'none'`, and
  X-Frame-Options for older browsers), no `<base>` tricks.
* Referrer-Policy `no-referrer`: key ids and filters in our URLs stay with us.
* `Cache-Control: no-store`: pages and API answers may carry a new key's secret.
* Cookies are `Secure` whenever the browser reached us over TLS, directly or through a
  TLS-terminating proxy (X-Forwarded-Proto), or always / never when configured so
  (EXTPROC_CONSOLE_SECURE_COOKIES; the Kubernetes overlays set it to true). Over TLS the
  answer also asks for HSTS.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request, Response

from extproc.console.state import state_of

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cross-origin-opener-policy": "same-origin",
}
HSTS = "max-age=31536000"


def over_tls(request: Request) -> bool:
    """Whether the browser's connection was TLS, here or at the proxy in front of us."""
    if request.url.scheme == "https":
        return True
    forwarded = request.headers.get("x-forwarded-proto", "")
    return forwarded.split(",")[0].strip().lower() == "https"


def secure_cookies(request: Request) -> bool:
    mode = state_of(request).settings.secure_cookies
    return mode == "true" or (mode == "auto" and over_tls(request))


def set_cookie(
    request: Request, response: Response, name: str, value: str, max_age: int, path: str = "/"
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=path,
        httponly=True,
        samesite="lax" if name.endswith("_signin") else "strict",
        secure=secure_cookies(request),
    )


def clear_cookie(request: Request, response: Response, name: str, path: str = "/") -> None:
    response.delete_cookie(
        name, path=path, httponly=True, samesite="strict", secure=secure_cookies(request)
    )


async def headers(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    response = await call_next(request)
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.setdefault("cache-control", "no-store")
    if over_tls(request):
        response.headers.setdefault("strict-transport-security", HSTS)
    return response
