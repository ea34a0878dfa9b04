"""Single sign-on with an OpenID Connect provider, and the provider's access tokens as
admin API credentials.

Sign-in is the authorization code flow with PKCE (S256), done by Authlib's client: the
console sends the browser to the provider with a fresh `state`, `nonce` and code challenge
(kept in Redis, `sessions`, so the callback may reach any replica), exchanges the code with
its client secret and the verifier, checks the ID token (signature against the provider's
JWKS, issuer, audience = our client id, expiry, nonce) and reads the person's claims from
the userinfo endpoint (providers keep group claims out of ID tokens when an access token is
issued). Everything about the provider comes from its discovery document.

Bearer JWTs for the admin API are checked the same way: signature against the JWKS (a key id
we have not seen makes us fetch the set again, at most once per JWKS_REFETCH_SECONDS, so
key rotation works and a flood of made-up key ids does not become a flood of fetches),
issuer, `aud` = EXTPROC_OIDC_AUDIENCE, expiry. joserfc (Authlib's JOSE library) does the
cryptography and the claim checks; `alg: none` and HMAC algorithms are never accepted.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any

import httpx2
from authlib.integrations.httpx_client import AsyncOAuth2Client
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet

from extproc.console.config import OidcSettings

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")
DEFAULT_SCOPES = ("openid", "email", "profile")
METADATA_SECONDS = 3600
JWKS_REFETCH_SECONDS = 10
HTTP_TIMEOUT = 10.0


class ProviderError(RuntimeError):
    """The identity provider could not be reached or answered something unusable."""


class TokenRefused(ValueError):
    """A token failed a check; the message says which (for a 401, never the token)."""


@dataclass(frozen=True, slots=True)
class SignIn:
    """A sign-in under way: where to send the browser, and what the callback must match."""

    url: str
    state: str
    verifier: str
    nonce: str


def _claims_registry(issuer: str, audience: str, leeway: int) -> jwt.JWTClaimsRegistry:
    return jwt.JWTClaimsRegistry(
        leeway=leeway,
        iss={"essential": True, "value": issuer},
        aud={"essential": True, "value": audience},
        exp={"essential": True},
        sub={"essential": True},
    )


def _why(exc: JoseError) -> str:
    """The refusal in words: which check failed, from joserfc's error."""
    name = getattr(exc, "claim", None)
    kind = type(exc).__name__
    if kind == "ExpiredTokenError":
        return "the token has expired"
    if name == "aud" or "aud" in str(exc):
        return "the token is not for this API (audience)"
    if name == "iss" or "iss" in str(exc):
        return "the token is from another issuer"
    if kind in ("BadSignatureError", "UnsupportedAlgorithmError"):
        return "the token's signature does not verify"
    return f"the token is not valid ({exc.error})"


class Oidc:
    def __init__(self, settings: OidcSettings) -> None:
        self.settings = settings
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._keys: KeySet | None = None
        self._keys_at = 0.0
        self._lock = asyncio.Lock()

    # -- the provider's documents -------------------------------------------------------------

    async def _get_json(self, url: str, **kwargs: Any) -> dict[str, Any]:
        try:
            async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT) as client:
                response = await client.get(url, **kwargs)
        except httpx2.HTTPError as exc:
            raise ProviderError(f"cannot reach the identity provider at {url}: {exc}") from exc
        if response.status_code != 200:
            raise ProviderError(f"{url} answered {response.status_code}")
        try:
            body = response.json()
        except ValueError as exc:
            raise ProviderError(f"{url} did not answer JSON") from exc
        if not isinstance(body, dict):
            raise ProviderError(f"{url} did not answer a JSON object")
        return body

    async def metadata(self) -> dict[str, Any]:
        """The discovery document (cached for METADATA_SECONDS); its issuer must be ours."""
        if self._metadata is not None and time.monotonic() - self._metadata_at < METADATA_SECONDS:
            return self._metadata
        issuer = self.settings.issuer
        doc = await self._get_json(f"{issuer}/.well-known/openid-configuration")
        if str(doc.get("issuer", "")).rstrip("/") != issuer:
            raise ProviderError(
                f"the discovery document names issuer {doc.get('issuer')!r}, not {issuer!r}"
            )
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(doc.get(name), str):
                raise ProviderError(f"the discovery document has no {name}")
        self._metadata, self._metadata_at = doc, time.monotonic()
        return doc

    async def _key_set(self, refresh: bool = False) -> KeySet:
        async with self._lock:
            stale = time.monotonic() - self._keys_at >= JWKS_REFETCH_SECONDS
            if self._keys is None or (refresh and stale):
                doc = await self._get_json((await self.metadata())["jwks_uri"])
                try:
                    self._keys = KeySet.import_key_set(doc)  # type: ignore[arg-type]
                except (JoseError, KeyError, TypeError, ValueError) as exc:
                    raise ProviderError(f"the provider's JWKS is unusable: {exc}") from exc
                self._keys_at = time.monotonic()
            return self._keys

    async def _verify(self, token: str, audience: str) -> dict[str, Any]:
        """A JWT's claims after its signature and its iss, aud, exp and sub checks."""
        if token.count(".") != 2:
            raise TokenRefused("not a JWT")
        keys = await self._key_set()
        try:
            try:
                decoded = jwt.decode(token, keys, algorithms=ALGORITHMS)
            except InvalidKeyIdError:
                # A key we have not seen: the provider may have rotated its keys.
                decoded = jwt.decode(token, await self._key_set(True), algorithms=ALGORITHMS)
            _claims_registry(self.settings.issuer, audience, self.settings.leeway_seconds).validate(
                decoded.claims
            )
        except JoseError as exc:
            raise TokenRefused(_why(exc)) from exc
        except ValueError as exc:
            raise TokenRefused(f"the token is not valid ({exc})") from exc
        return decoded.claims

    # -- bearer tokens for the admin API ------------------------------------------------------

    @property
    def takes_bearer_tokens(self) -> bool:
        return self.settings.audience is not None

    async def verify_access_token(self, token: str) -> dict[str, Any]:
        assert self.settings.audience is not None
        return await self._verify(token, self.settings.audience)

    # -- sign-in ------------------------------------------------------------------------------

    def _client(self, redirect_uri: str) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=self.settings.client_id,
            client_secret=self.settings.client_secret,
            redirect_uri=redirect_uri,
            code_challenge_method="S256",
            timeout=HTTP_TIMEOUT,
        )

    async def scopes(self) -> str:
        if self.settings.scopes:
            return self.settings.scopes
        offered = (await self.metadata()).get("scopes_supported") or ()
        return " ".join((*DEFAULT_SCOPES, *(["groups"] if "groups" in offered else [])))

    async def start(self, redirect_uri: str) -> SignIn:
        doc = await self.metadata()
        verifier = secrets.token_urlsafe(48)
        nonce = secrets.token_urlsafe(24)
        state = secrets.token_urlsafe(24)
        async with self._client(redirect_uri) as client:
            url, _state = client.create_authorization_url(
                doc["authorization_endpoint"],
                state=state,
                code_verifier=verifier,
                nonce=nonce,
                scope=await self.scopes(),
            )
        return SignIn(url, state, verifier, nonce)

    async def finish(
        self, code: str, redirect_uri: str, verifier: str, nonce: str
    ) -> tuple[dict[str, Any], str]:
        """The person's claims (ID token, then userinfo) and the access token."""
        doc = await self.metadata()
        try:
            async with self._client(redirect_uri) as client:
                token = await client.fetch_token(
                    doc["token_endpoint"], code=code, code_verifier=verifier
                )
        except Exception as exc:  # Authlib raises OAuthError, httpx2 errors, ValueError
            raise TokenRefused(f"the provider refused the sign-in code: {exc}") from exc
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise TokenRefused("the provider sent no ID token")
        claims = await self._verify(id_token, self.settings.client_id)
        if claims.get("nonce") != nonce:
            raise TokenRefused("the ID token's nonce does not match this sign-in")
        access = str(token.get("access_token") or "")
        if access and doc.get("userinfo_endpoint"):
            info = await self.userinfo(access)
            if info is None or info.get("sub") != claims["sub"]:
                raise TokenRefused("the provider's userinfo does not match the ID token")
            claims = {**claims, **info}
        return claims, access

    async def userinfo(self, access_token: str) -> dict[str, Any] | None:
        """What the provider says of the token's holder now; None once it refuses the token
        (expired or revoked: the person must sign in again)."""
        url = (await self.metadata()).get("userinfo_endpoint")
        if not url:
            return None
        try:
            async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT) as client:
                response = await client.get(
                    url, headers={"authorization": f"Bearer {access_token}"}
                )
        except httpx2.HTTPError as exc:
            raise ProviderError(f"cannot reach the identity provider at {url}: {exc}") from exc
        if response.status_code in (400, 401, 403):
            return None
        if response.status_code != 200:
            raise ProviderError(f"{url} answered {response.status_code}")
        body = response.json()
        return body if isinstance(body, dict) else None
