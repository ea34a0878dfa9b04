"""Browser sessions in Redis: signed, expiring, revocable, and served by any replica.

The cookie holds a random session id and its HMAC under a key every replica shares (the
configured EXTPROC_CONSOLE_SECRET, else one made once in Redis), so a forged or mangled
cookie is refused without a Redis read. The session itself is a Redis hash named by the id's
SHA-256 (a dump of Redis gives nobody a usable cookie) with a TTL: it ends by itself, on
sign-out, or when the person is signed out everywhere or disabled (every session of a person
is listed under their digest).

A session stores who the identity provider said the person is and their groups, never their
roles: roles are derived from the policy on every request. One-time login links (admin
bootstrap) and sign-ins under way (the PKCE verifier between redirect and callback) live
here too, for the same reason: the callback may reach another replica.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from extproc.governance.access import Person
from extproc.store.schema import (
    CONSOLE_SECRET,
    console_session_key,
    flash_key,
    login_token_key,
    person_sessions_key,
    sign_in_key,
)

SESSION_COOKIE = "extproc_console"
LOGIN_LINK_SECONDS = 7 * 86400
SIGN_IN_SECONDS = 600
FLASH_SECONDS = 120
_SIG_BYTES = 18


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def person_digest(subject: str) -> str:
    return digest("person\0" + subject)[:40]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Session:
    digest: str
    person: Person
    via: str  # "oidc", "token" (an admin token typed in) or "link" (a one-time login link)
    csrf: str
    expires_ms: int
    checked_ms: int = 0
    access_token: str = field(default="", repr=False)

    @property
    def admin_name(self) -> str | None:
        """The admin token's name, for sessions opened with one (bootstrap)."""
        return self.person.subject if self.via in ("token", "link") else None


async def shared_secret(client: Any, configured: bytes | None) -> bytes:
    """The cookie-signing key: the configured one, else the one every replica finds in Redis."""
    if configured:
        return configured
    await client.set(CONSOLE_SECRET, secrets.token_hex(32), nx=True)
    value = await client.get(CONSOLE_SECRET)
    return value if isinstance(value, bytes) else str(value).encode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SessionStore:
    def __init__(self, client: Any, secret: bytes, lifetime_seconds: int) -> None:
        self.client = client
        self.secret = secret
        self.lifetime_ms = lifetime_seconds * 1000

    def _sign(self, sid: str) -> str:
        mac = hmac.new(self.secret, sid.encode(), hashlib.sha256).digest()[:_SIG_BYTES]
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def _verify(self, cookie: str | None) -> str | None:
        """The session id's digest if the cookie carries a valid signature, else None."""
        if not cookie or len(cookie) > 200:
            return None
        sid, _, sig = cookie.rpartition(".")
        if not sid or not hmac.compare_digest(sig.encode(), self._sign(sid).encode()):
            return None
        return digest(sid)

    async def open(self, person: Person, via: str, access_token: str = "") -> str:
        """A new session; returns the cookie value."""
        sid = secrets.token_urlsafe(32)
        key = digest(sid)
        now = now_ms()
        fields = {
            "subject": person.subject,
            "email": person.email or "",
            "name": person.name or "",
            "groups": json.dumps(sorted(person.groups)),
            "via": via,
            "csrf": secrets.token_urlsafe(24),
            "expires_ms": str(now + self.lifetime_ms),
            "checked_ms": str(now),
            "access_token": access_token,
        }
        everyone = person_sessions_key(person_digest(person.subject))
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(console_session_key(key), mapping=fields)
            pipe.pexpire(console_session_key(key), self.lifetime_ms)
            pipe.sadd(everyone, key)
            pipe.pexpire(everyone, self.lifetime_ms)
            await pipe.execute()
        return f"{sid}.{self._sign(sid)}"

    async def get(self, cookie: str | None) -> Session | None:
        key = self._verify(cookie)
        if key is None:
            return None
        raw = await self.client.hgetall(console_session_key(key))
        if not raw:
            return None
        f = {_text(k): _text(v) for k, v in raw.items()}
        expires = int(f.get("expires_ms") or 0)
        if expires <= now_ms():
            await self.client.delete(console_session_key(key))
            return None
        person = Person(
            subject=f["subject"],
            email=f.get("email") or None,
            name=f.get("name") or None,
            groups=frozenset(json.loads(f.get("groups") or "[]")),
        )
        return Session(
            digest=key,
            person=person,
            via=f.get("via", ""),
            csrf=f.get("csrf", ""),
            expires_ms=expires,
            checked_ms=int(f.get("checked_ms") or 0),
            access_token=f.get("access_token", ""),
        )

    async def regroup(self, session: Session, groups: frozenset[str]) -> None:
        """Record the groups the provider vouched for just now."""
        session.person = Person(
            session.person.subject, session.person.email, session.person.name, groups
        )
        session.checked_ms = now_ms()
        await self.client.hset(
            console_session_key(session.digest),
            mapping={"groups": json.dumps(sorted(groups)), "checked_ms": str(session.checked_ms)},
        )

    async def close(self, session: Session) -> None:
        everyone = person_sessions_key(person_digest(session.person.subject))
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.delete(console_session_key(session.digest), flash_key(session.digest))
            pipe.srem(everyone, session.digest)
            await pipe.execute()

    async def close_all(self, subject: str) -> int:
        """End every session of `subject` on every replica; how many there were."""
        everyone = person_sessions_key(person_digest(subject))
        keys = [_text(k) for k in await self.client.smembers(everyone)]
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.delete(console_session_key(key), flash_key(key))
            pipe.delete(everyone)
            results = await pipe.execute()
        return sum(1 for n in results[: len(keys)] if n)

    # -- a value shown once after a redirect (post/redirect/get) -----------------------------

    async def flash(self, session: Session, value: dict[str, Any]) -> None:
        await self.client.set(flash_key(session.digest), json.dumps(value), px=FLASH_SECONDS * 1000)

    async def take_flash(self, session: Session) -> dict[str, Any] | None:
        raw = await self.client.getdel(flash_key(session.digest))
        return json.loads(raw) if raw else None

    # -- one-time login links and sign-ins under way ----------------------------------------

    async def remember_sign_in(self, state: str, value: dict[str, str]) -> None:
        await self.client.set(
            sign_in_key(digest(state)), json.dumps(value), px=SIGN_IN_SECONDS * 1000
        )

    async def take_sign_in(self, state: str) -> dict[str, str] | None:
        """The sign-in started with `state`, once: a replayed callback finds nothing."""
        if not state or len(state) > 200:
            return None
        raw = await self.client.getdel(sign_in_key(digest(state)))
        return json.loads(raw) if raw else None

    async def use_login(self, token: str) -> bool:
        """A one-time login link works exactly once, on whichever replica it reaches."""
        if not token or len(token) > 200:
            return False
        return bool(await self.client.getdel(login_token_key(digest(token))))


def mint_login(sync_client: Any) -> str:
    """A one-time login token, stored so any replica accepts it (once)."""
    token = secrets.token_urlsafe(24)
    sync_client.set(login_token_key(digest(token)), "1", ex=LOGIN_LINK_SECONDS)
    return token
