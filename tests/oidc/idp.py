"""A real OpenID Connect provider for the tests (npm's `oidc-provider` under node, see
provider.mjs), and a person signing in with it the way a browser would.

`make oidc-provider` (which `make test` runs) installs the package into `.tools-oidc/`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from html import unescape
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx

from extproc.devstack.stack import Child, free_port

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / ".tools-oidc" / "node_modules" / "oidc-provider" / "lib" / "index.js"
SCRIPT = Path(__file__).resolve().parent / "provider.mjs"
CLIENT_ID = "extproc-console"
CLIENT_SECRET = "console-client-secret-0123456789abcdef"
AUDIENCE = "https://console.extproc.test/admin"
SHORT_LIVED = "urn:extproc-test:short-lived"
OTHER_API = "urn:extproc-test:other-api"
# A client the test itself uses to get access tokens (as a CLI would).
TOKEN_REDIRECT = "http://127.0.0.1:9/callback"


class IdP:
    def __init__(self, workdir: Path, console_urls: list[str]) -> None:
        self.accounts_file = workdir / "accounts.json"
        self.accounts: dict[str, dict[str, object]] = {}
        self.write_accounts()
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        config = {
            "module": str(MODULE),
            "port": self.port,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "redirect_uris": [f"{u}/auth/callback" for u in console_urls] + [TOKEN_REDIRECT],
            "accounts_file": str(self.accounts_file),
            "audience": AUDIENCE,
        }
        path = workdir / "provider.json"
        path.write_text(json.dumps(config))
        node = shutil.which("node") or "/usr/bin/node"
        self.child = Child("oidc-provider", [node, str(SCRIPT), str(path)])
        try:
            self.child.wait_for_line("oidc-provider listening")
        except BaseException:
            self.child.stop()
            raise

    def write_accounts(self) -> None:
        tmp = self.accounts_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.accounts))
        tmp.replace(self.accounts_file)  # the provider never reads half a file

    def person(self, login: str, email: str, groups: list[str], name: str = "") -> None:
        """Add or change someone at the provider, as its administrator would."""
        self.accounts[login] = {"email": email, "name": name or login.title(), "groups": groups}
        self.write_accounts()

    def console_env(self, recheck: int = 0) -> dict[str, str]:
        return {
            "EXTPROC_OIDC_ISSUER": self.issuer,
            "EXTPROC_OIDC_CLIENT_ID": CLIENT_ID,
            "EXTPROC_OIDC_CLIENT_SECRET": CLIENT_SECRET,
            "EXTPROC_OIDC_AUDIENCE": AUDIENCE,
            "EXTPROC_OIDC_RECHECK_SECONDS": str(recheck),
            "EXTPROC_OIDC_LEEWAY_SECONDS": "0",
        }

    def stop(self) -> None:
        self.child.stop()

    # -- a person at the provider's sign-in page, without a browser ---------------------------

    def _interact(self, client: httpx.Client, response: httpx.Response) -> httpx.Response:
        """Follow redirects, filling the provider's login form (any password) on the way."""
        for _ in range(20):
            if response.status_code in (301, 302, 303, 307, 308):
                target = urljoin(str(response.url), response.headers["location"])
                if not target.startswith(self.issuer):
                    return response  # back to the client: the caller takes it from here
                response = client.get(target)
                continue
            form = re.search(r'<form[^>]*action="([^"]+)"', response.text)
            if response.status_code != 200 or form is None:
                raise AssertionError(f"unexpected page at the provider: {response.text[:500]}")
            action = urljoin(str(response.url), unescape(form.group(1)))
            prompt = re.search(r'name="prompt" value="(\w+)"', response.text)
            data = {"prompt": prompt.group(1) if prompt else "consent"}
            if data["prompt"] == "login":
                data.update(login=self._login, password="any-password")
            response = client.post(action, data=data)
        raise AssertionError("too many steps at the provider")

    def sign_in(self, client: httpx.Client, console_url: str, login: str) -> httpx.Response:
        """Sign `login` in to the console with `client` (cookies kept); the console's answer
        to the provider's callback."""
        self._login = login
        start = client.get(f"{console_url}/auth/login")
        assert start.status_code == 303, start.text
        back = self._interact(client, client.get(start.headers["location"]))
        assert back.headers["location"].startswith(console_url), back.headers
        return client.get(back.headers["location"])

    def access_token(self, login: str, resource: str = AUDIENCE) -> str:
        """An access token (a JWT) for `resource`, by the authorization code flow with PKCE,
        as a CLI holding the console's client would get one."""
        self._login = login
        verifier = secrets.token_urlsafe(48)
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .decode()
            .rstrip("=")
        )
        with httpx.Client(timeout=30) as client:
            doc = client.get(f"{self.issuer}/.well-known/openid-configuration").json()
            first = client.get(
                doc["authorization_endpoint"],
                params={
                    "client_id": CLIENT_ID,
                    "response_type": "code",
                    "redirect_uri": TOKEN_REDIRECT,
                    "scope": "openid email groups admin",
                    "resource": resource,
                    "state": secrets.token_urlsafe(8),
                    "nonce": secrets.token_urlsafe(8),
                    "code_challenge": challenge,
                    "code_challenge_method": "S256",
                },
            )
            back = self._interact(client, first)
            query = parse_qs(urlsplit(back.headers["location"]).query)
            assert "code" in query, query
            token = client.post(
                doc["token_endpoint"],
                data={
                    "grant_type": "authorization_code",
                    "code": query["code"][0],
                    "redirect_uri": TOKEN_REDIRECT,
                    "code_verifier": verifier,
                    "resource": resource,
                },
                auth=(CLIENT_ID, CLIENT_SECRET),
            )
            assert token.status_code == 200, token.text
            return str(token.json()["access_token"])


@contextmanager
def running_idp(workdir: Path, console_urls: list[str]) -> Iterator[IdP]:
    assert MODULE.exists(), "run `make oidc-provider` (make test does) to install oidc-provider"
    idp = IdP(workdir, console_urls)
    try:
        yield idp
    finally:
        idp.stop()


def browser_sign_in(page: object, console_url: str, login: str, start: str = "/") -> None:
    """Sign `login` in to the console in a real browser page (Playwright), through the
    provider's own login form, landing back on `start`."""
    page.goto(console_url + start)  # type: ignore[attr-defined]
    assert "/login" in page.url  # type: ignore[attr-defined]
    page.click("#sso")  # type: ignore[attr-defined]  # "Sign in with ...": off to the provider
    page.fill('input[name="login"]', login)  # type: ignore[attr-defined]
    page.fill('input[name="password"]', "any password")  # type: ignore[attr-defined]
    page.click("button[type=submit]")  # type: ignore[attr-defined]
    page.wait_for_selector("#who")  # type: ignore[attr-defined]  # back in the console
