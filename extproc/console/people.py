"""The people who signed in, and what happens to their keys when they go.

The console remembers each person it has seen (subject, email, the groups the provider last
vouched for, when) so an admin can list and disable them, and so their personal keys can be
checked against the policy without them signing in again. Offboarding has two doors, both
ending in `revoke_personal_keys`:

* an admin disables the person: every session ends on every replica, their personal keys are
  revoked, and sign-in is refused until an admin enables them again;
* their groups stop granting access (the provider removed them from a group, or the policy
  stopped naming the group): at their next request, or at the next policy the console loads,
  each personal key no grant covers any more is revoked.

Keys an admin issued with an `owner` text are not personal keys and are left alone: they
belong to a service, and rotating them is a decision, not a side effect.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from extproc.console.audit import audit
from extproc.console.sessions import SessionStore, now_ms, person_digest
from extproc.governance.access import Person, personal_key_days
from extproc.governance.keys import KeyInfo, KeyStore
from extproc.governance.policy import Policy
from extproc.store.schema import PEOPLE, person_key


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class People:
    def __init__(self, client: Any, sessions: SessionStore) -> None:
        self.client = client
        self.sessions = sessions

    async def seen(self, person: Person) -> None:
        """Remember what the provider just said of `person`."""
        digest = person_digest(person.subject)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(
                person_key(digest),
                mapping={
                    "subject": person.subject,
                    "email": person.email or "",
                    "name": person.name or "",
                    "groups": json.dumps(sorted(person.groups)),
                    "last_seen_ms": str(now_ms()),
                },
            )
            pipe.sadd(PEOPLE, digest)
            await pipe.execute()

    async def is_disabled(self, subject: str) -> bool:
        return await self.client.hget(person_key(person_digest(subject)), "disabled") == b"1"

    async def get(self, subject: str) -> dict[str, Any] | None:
        raw = await self.client.hgetall(person_key(person_digest(subject)))
        return _row(raw) if raw else None

    async def list(self) -> list[dict[str, Any]]:
        digests = [_text(d) for d in await self.client.smembers(PEOPLE)]
        async with self.client.pipeline(transaction=False) as pipe:
            for digest in digests:
                pipe.hgetall(person_key(digest))
            rows = await pipe.execute()
        people = [_row(raw) for raw in rows if raw]
        return sorted(people, key=lambda p: (p["email"] or p["subject"]).lower())

    async def disable(self, store: KeyStore, subject: str, by: str) -> dict[str, Any]:
        """Refuse `subject` from now on: sessions ended, personal keys revoked."""
        digest = person_digest(subject)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(
                person_key(digest),
                mapping={
                    "subject": subject,
                    "disabled": "1",
                    "disabled_by": by,
                    "disabled_ms": str(now_ms()),
                },
            )
            pipe.sadd(PEOPLE, digest)
            await pipe.execute()
        ended = await self.sessions.close_all(subject)
        revoked = await revoke_personal_keys(store, subject, lambda _key: True, "disabled")
        return {"subject": subject, "sessions_ended": ended, "keys_revoked": revoked}

    async def enable(self, subject: str) -> bool:
        """Let `subject` sign in again (their revoked keys stay revoked)."""
        return bool(await self.client.hdel(person_key(person_digest(subject)), "disabled"))

    async def sweep(self, store: KeyStore, policy: Policy | None) -> list[str]:
        """Revoke every personal key that its holder may no longer hold: disabled, or no
        longer granted by the policy for the groups last seen. Returns the keys revoked."""
        if policy is None:
            return []
        holders: dict[str, list[KeyInfo]] = {}
        for info in await store.list():
            if info.owner_sub and info.status in ("active", "expiring"):
                holders.setdefault(info.owner_sub, []).append(info)
        revoked: list[str] = []
        for subject, infos in holders.items():
            known = await self.get(subject)
            groups = frozenset(known["groups"]) if known else frozenset()
            disabled = bool(known and known["disabled"])
            for info in infos:
                if (
                    disabled
                    or personal_key_days(policy, groups, info.workspace, info.service) is None
                ):
                    await store.revoke(info.key_id)
                    revoked.append(info.key_id)
        return revoked


def _row(raw: dict[Any, Any]) -> dict[str, Any]:
    f = {_text(k): _text(v) for k, v in raw.items()}
    return {
        "subject": f.get("subject", ""),
        "email": f.get("email") or None,
        "name": f.get("name") or None,
        "groups": json.loads(f.get("groups") or "[]"),
        "last_seen_ms": int(f.get("last_seen_ms") or 0),
        "disabled": f.get("disabled") == "1",
        "disabled_by": f.get("disabled_by") or None,
    }


SYSTEM = "console"
"""The audit log's actor for what the console does by itself (offboarding revocations)."""


async def _audited(store: KeyStore, info: KeyInfo, reason: str) -> None:
    await audit(store.client, SYSTEM, "keys.revoke", info.key_id, workspace=info.workspace,
                holder=info.owner_sub, reason=reason, personal=True)  # fmt: skip


async def revoke_personal_keys(store: KeyStore, subject: str, which: Any, reason: str) -> list[str]:
    """Revoke `subject`'s live personal keys for which `which(info)` is true, each audited."""
    revoked = []
    for info in await store.list(owner_sub=subject):
        if info.status in ("active", "expiring") and which(info):
            await store.revoke(info.key_id)
            await _audited(store, info, reason)
            revoked.append(info.key_id)
    return revoked


async def keep_granted_keys(
    store: KeyStore, policy: Policy | None, subject: str, groups: Iterable[str]
) -> list[str]:
    """After `subject`'s groups changed: revoke their personal keys no grant covers now."""
    held = frozenset(groups)
    return await revoke_personal_keys(
        store,
        subject,
        lambda info: personal_key_days(policy, held, info.workspace, info.service) is None,
        "their groups no longer grant it",
    )
