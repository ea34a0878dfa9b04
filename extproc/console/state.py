"""What the console process holds: Redis clients, the policy file (re-read when it changes),
the admin credentials, the identity provider and the session store."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request

from extproc.console.auth import Auth
from extproc.console.config import ConsoleSettings
from extproc.console.oidc import Oidc
from extproc.console.people import People
from extproc.console.sessions import SessionStore, shared_secret
from extproc.governance.policy import Policy, PolicyError, load_policy
from extproc.store.clients import make_client, make_sync_client


@dataclass
class ConsoleState:
    redis_url: str
    policy_path: Path | None
    auth: Auth
    settings: ConsoleSettings = field(default_factory=ConsoleSettings)
    redis: Any = None
    oidc: Oidc | None = None
    sessions: SessionStore = field(init=False)
    people: People = field(init=False)
    _policy: Policy | None = None
    _policy_mtime: float = -1.0
    _policy_error: str = ""
    swept: Policy | None = None  # the policy personal keys were last checked against
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.settings.oidc is not None and self.oidc is None:
            self.oidc = Oidc(self.settings.oidc)

    def connect(self) -> None:
        self.redis = make_client(self.redis_url, socket_connect_timeout=3, socket_timeout=10)

    async def start(self) -> None:
        """Connect and share the cookie-signing key with the other replicas (via Redis)."""
        if self.redis is None:
            self.connect()
        secret = await shared_secret(self.redis, self.settings.secret)
        self.sessions = SessionStore(self.redis, secret, self.settings.session_seconds)
        self.people = People(self.redis, self.sessions)

    def sync_redis(self) -> Any:
        return make_sync_client(self.redis_url, socket_connect_timeout=3, socket_timeout=10)

    def policy(self) -> Policy | None:
        """The policy file as it is now; a broken edit keeps the last good one in force."""
        path = self.policy_path
        if path is None:
            return None
        try:
            mtime = path.stat().st_mtime
        except OSError as exc:
            self._policy_error = f"{path}: {exc.strerror}"
            return self._policy
        if mtime != self._policy_mtime:
            self._policy_mtime = mtime
            try:
                self._policy = load_policy(path)
                self._policy_error = ""
            except PolicyError as exc:
                self._policy_error = str(exc)
        return self._policy

    def policy_required(self) -> Policy:
        found = self.policy()
        if found is None:
            raise HTTPException(503, f"no usable policy: {self._policy_error or 'none configured'}")
        return found

    def policy_text(self) -> str:
        return self.policy_path.read_text("utf-8") if self.policy_path else ""


def state_of(request: Request) -> ConsoleState:
    return request.app.state.console  # type: ignore[no-any-return]
