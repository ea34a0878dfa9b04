"""The console web app: FastAPI for the admin API and the pages, served by uvicorn.

`extproc console` runs it on a port of its own (never the egress port): the platform team
reaches it inside the cluster or through a port-forward, developers never need it.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from extproc.console.halt import NotAllowed
from extproc.console.identity import REAUTH
from extproc.console.state import ConsoleState
from extproc.governance.keys import KeyStoreError
from extproc.governance.pauses import PauseError
from extproc.governance.topups import TopupError
from extproc.store.clients import UNAVAILABLE

log = logging.getLogger("extproc.console")
# The HTTP client the sign-in uses logs every request at INFO: the provider's URLs (with
# codes and states) do not belong in the console's log.
logging.getLogger("httpx2").setLevel(logging.WARNING)
logging.getLogger("httpx").setLevel(logging.WARNING)


def _error(status: int, message: str, code: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": code}}, status_code=status
    )


def create_app(state: ConsoleState) -> FastAPI:
    from extproc.console import api, api_people, halt_routes, pages, people_pages, security, signin

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        await state.start()
        yield
        await state.redis.aclose()

    app = FastAPI(
        title="extproc admin API",
        version="1",
        description="Keys, spend, usage, policy and alerts of an extproc gateway. "
        "Authenticate with `Authorization: Bearer <admin token>`, or with an access token "
        "(JWT) from the console's OpenID Connect provider.",
        openapi_url="/admin/v1/openapi.json",
        docs_url=None,  # Swagger UI loads its script from a CDN; the JSON document is enough
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.console = state
    app.middleware("http")(security.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:
        if request.url.path.startswith("/admin/") or exc.status_code != 401:
            if not request.url.path.startswith("/admin/"):
                return pages.error_page(request, exc.status_code, str(exc.detail))
            codes = {401: "unauthorized", 403: "forbidden", 404: "not_found", 503: "unavailable"}
            return _error(exc.status_code, str(exc.detail), codes.get(exc.status_code, "error"))
        if (exc.headers or {}).get(REAUTH):
            return pages.login_redirect(request, via_provider=True)
        return pages.login_redirect(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(400, f"{where}: {first.get('msg', 'invalid')}", "invalid_request")

    @app.exception_handler(KeyStoreError)
    async def refused(request: Request, exc: KeyStoreError) -> Any:
        if request.url.path.startswith("/admin/"):
            return _error(400, str(exc), "key_refused")
        return pages.error_page(request, 400, str(exc))

    for kind, status, code in (
        (TopupError, 400, "topup_refused"),
        (PauseError, 400, "pause_refused"),
        (NotAllowed, 403, "forbidden"),
    ):

        @app.exception_handler(kind)
        async def halted(request: Request, exc: Exception, status: int = status,
                         code: str = code) -> Any:  # fmt: skip
            if request.url.path.startswith("/admin/"):
                return _error(status, str(exc), code)
            return pages.error_page(request, status, str(exc))

    for kind in UNAVAILABLE:

        @app.exception_handler(kind)
        async def redis_down(request: Request, exc: Exception) -> JSONResponse:
            return _error(503, f"Redis unavailable: {exc}", "store_unavailable")

    app.include_router(api.router)
    app.include_router(api_people.router)
    app.include_router(pages.router)
    app.include_router(people_pages.router)
    app.include_router(halt_routes.api)
    app.include_router(halt_routes.pages)
    app.include_router(signin.router)
    return app
