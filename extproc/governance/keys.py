"""Virtual API keys: callers hold a key we issued, never the provider's.

A virtual key names who is calling (workspace, team, service, owner), so every cent is
attributed and a single leaked key can be revoked without rotating the real provider key
that dozens of services share. Only the SHA-256 of a key is stored: a dump of Redis gives
nobody a usable key.

Keys live under one hash tag (see `store.schema`), so every change is a single Lua script in
one slot (Redis Cluster safe) that also publishes on the key channel. Sidecars
keep an in-process cache (KeyCache) that answers the request path with no I/O and drops
entries as soon as a change is published. Revocation additionally adds the key id to
the workspace's revoked set, which the budget scripts check atomically with each reservation,
so a revoked key stops spending even before every cache has heard about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from redis.exceptions import ConnectionError as RedisConnectionError

from extproc.governance.policy import NAME_PATTERN, Policy
from extproc.store.clients import UNAVAILABLE, AsyncClient, subscriber
from extproc.store.schema import KEY_IDS, KEYS_CHANNEL, LEASES_NOTICE, key_hash, revoked_key

log = logging.getLogger("extproc.governance.keys")

KEY_PREFIX = "sk-ext-"
KEY_PATTERN = re.compile(r"sk-ext-[A-Za-z0-9_-]{40}")
_MAX_OWNER = 200
_ATTEMPTS = 3
_OTHER_NOTICES = frozenset({"topup", "pause", "resume"})

Clock = Callable[[], int]

# KEYS: key hash, ids. ARGV: key id, sha256, channel, then the hash's field/value pairs.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], 'create ' .. ARGV[1] .. ' ' .. ARGV[2])
return 1
"""

# KEYS: old hash, ids, new hash. ARGV: old id, old sha, new id, new sha, deadline ms, now ms,
# channel, then the new hash's field/value pairs. The deadline never extends an earlier one.
_ROTATE = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 'unknown' end
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('HEXISTS', KEYS[2], ARGV[3]) == 1 then
  return 'collision'
end
local old = redis.call('HMGET', KEYS[1], 'revoked', 'expires_ms', 'replaced_by')
if old[1] == '1' then return 'revoked' end
if old[3] and old[3] ~= '' then return 'rotated ' .. old[3] end
local expires = tonumber(old[2] or '0') or 0
if expires ~= 0 and expires <= tonumber(ARGV[6]) then return 'expired' end
local deadline = ARGV[5]
if expires ~= 0 and expires < tonumber(deadline) then deadline = old[2] end
redis.call('HSET', KEYS[1], 'expires_ms', deadline, 'replaced_by', ARGV[3])
redis.call('HSET', KEYS[3], unpack(ARGV, 8))
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('PUBLISH', ARGV[7], 'rotate ' .. ARGV[1] .. ' ' .. ARGV[2])
redis.call('PUBLISH', ARGV[7], 'create ' .. ARGV[3] .. ' ' .. ARGV[4])
return 'ok'
"""

# KEYS: key hash, ids. ARGV: key id, sha256, channel.
_REVOKE = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'revoked', '1')
redis.call('PUBLISH', ARGV[3], 'revoke ' .. ARGV[1] .. ' ' .. ARGV[2])
return 1
"""


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def well_formed(secret: str) -> bool:
    """Cheap shape check: anything else is refused without touching Redis."""
    return KEY_PATTERN.fullmatch(secret) is not None


class KeyStoreError(ValueError):
    """A key operation was refused; the message says which key or name and why."""


@dataclass(frozen=True, slots=True)
class Identity:
    key_id: str
    workspace: str
    team: str | None
    service: str
    owner: str | None
    expires_ms: int


def new_key_dict(secret: str, identity: Identity, **extra: Any) -> dict[str, Any]:
    """What a new (or rotated) key is handed back as, the one time its secret is shown.

    The CLI prints it as JSON and the admin API returns it, so both say the same fields.
    """
    return {
        "key": secret,
        "key_id": identity.key_id,
        "workspace": identity.workspace,
        "team": identity.team,
        "service": identity.service,
        "owner": identity.owner,
        **extra,
    }


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What `keys list` shows: everything about a key except the key itself."""

    key_id: str
    workspace: str
    team: str | None
    service: str
    owner: str | None
    created_ms: int
    expires_ms: int
    revoked: bool
    replaced_by: str | None
    status: str
    owner_sub: str | None = None  # set on personal keys: the holder's IdP subject

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def key_status(revoked: bool, expires_ms: int, now_ms: int) -> str:
    if revoked:
        return "revoked"
    if expires_ms and now_ms >= expires_ms:
        return "expired"
    return "expiring" if expires_ms else "active"


def check_attribution(
    policy: Policy | None, workspace: str, service: str, team: str | None
) -> str | None:
    """The team a new key is attributed to, after checking every name against the policy.

    Without a team argument the key takes the service's team from the policy; a team that
    contradicts the policy is refused rather than silently misattributing spend.
    """
    for label, name in (("workspace", workspace), ("service", service), ("team", team)):
        if name is not None and not NAME_PATTERN.fullmatch(name):
            raise KeyStoreError(f"invalid {label} name {name!r}")
    if policy is None:
        return team
    ws = policy.workspaces.get(workspace)
    if ws is None:
        raise KeyStoreError(
            f'unknown workspace "{workspace}" (workspaces: {", ".join(policy.workspaces)})'
        )
    svc = ws.services.get(service)
    if svc is None:
        known = ", ".join(ws.services) or "none"
        raise KeyStoreError(f'unknown service "{service}" in {workspace} (services: {known})')
    if team is not None and team not in ws.teams:
        known = ", ".join(ws.teams) or "none"
        raise KeyStoreError(f'unknown team "{team}" in {workspace} (teams: {known})')
    if svc.team and team and team != svc.team:
        raise KeyStoreError(f'service "{service}" belongs to team "{svc.team}", not "{team}"')
    return team or svc.team


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decoded(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _identity(fields: Mapping[str, str]) -> Identity:
    return Identity(
        key_id=fields["key_id"],
        workspace=fields["workspace"],
        team=fields.get("team") or None,
        service=fields["service"],
        owner=fields.get("owner") or None,
        expires_ms=int(fields.get("expires_ms") or 0),
    )


def _usable(fields: Mapping[str, str], now_ms: int) -> Identity | None:
    if not fields or fields.get("revoked") == "1":
        return None
    identity = _identity(fields)
    if identity.expires_ms and now_ms >= identity.expires_ms:
        return None
    return identity


def _new_fields(identity: Identity, created_ms: int, owner_sub: str | None) -> list[str]:
    return [
        "key_id", identity.key_id,
        "workspace", identity.workspace,
        "team", identity.team or "",
        "service", identity.service,
        "owner", identity.owner or "",
        "created_ms", str(created_ms),
        "expires_ms", str(identity.expires_ms),
        "revoked", "0",
        "replaced_by", "",
        "owner_sub", owner_sub or "",
    ]  # fmt: skip


def _mint() -> tuple[str, str, str]:
    secret = KEY_PREFIX + secrets.token_urlsafe(30)
    return secret, hash_secret(secret), "key_" + secrets.token_hex(6)


class KeyStore:
    """Virtual keys in Redis. Every write is one atomic script plus a change notice."""

    def __init__(self, client: AsyncClient, *, now_ms: Clock = wall_ms, hot: Any = None) -> None:
        self.client = client
        self.now_ms = now_ms
        # The lean client (store.fastredis), when there is one, serves the request path's
        # single lookups: a flood of unknown keys costs one cheap read each (~5x less CPU
        # than redis-py's), and nothing else.
        self.hot = hot
        self._create = client.register_script(_CREATE)
        self._rotate = client.register_script(_ROTATE)
        self._revoke = client.register_script(_REVOKE)

    async def create(
        self,
        workspace: str,
        service: str,
        team: str | None = None,
        owner: str | None = None,
        *,
        policy: Policy | None = None,
        expires_ms: int = 0,
        owner_sub: str | None = None,
    ) -> tuple[str, Identity]:
        """A new key; the secret is returned here once and never stored.

        `owner_sub` makes it a personal key: the identity provider's subject of the person
        who holds it, so their keys can be found (and revoked) when they leave.
        """
        team = check_attribution(policy, workspace, service, team)
        for label, text in (("owner", owner), ("owner subject", owner_sub)):
            if text is not None and (len(text) > _MAX_OWNER or not text.isprintable()):
                raise KeyStoreError(
                    f"{label} must be printable and at most {_MAX_OWNER} characters"
                )
        for _ in range(_ATTEMPTS):
            secret, sha, key_id = _mint()
            identity = Identity(key_id, workspace, team, service, owner or None, expires_ms)
            fields = _new_fields(identity, self.now_ms(), owner_sub)
            if await self._create(
                keys=[key_hash(sha), KEY_IDS], args=[key_id, sha, KEYS_CHANNEL, *fields]
            ):
                return secret, identity
        raise KeyStoreError("could not mint a unique key id")  # pragma: no cover

    async def lookup(self, secret: str, now_ms: int | None = None) -> Identity | None:
        """The identity behind a key: None if unknown, revoked or expired at `now_ms`."""
        if not well_formed(secret):
            return None
        return await self.lookup_hash(hash_secret(secret), now_ms)

    async def is_revoked(self, identity: Identity) -> bool:
        """Whether the key was revoked, from the set the budget scripts check (one read)."""
        return bool(await self.client.sismember(revoked_key(identity.workspace), identity.key_id))

    async def lookup_hash(self, sha: str, now_ms: int | None = None) -> Identity | None:
        if self.hot is not None:
            flat = await self.hot.execute_command("HGETALL", key_hash(sha))
            raw: Mapping[Any, Any] = dict(zip(flat[::2], flat[1::2], strict=True))
        else:
            raw = await self.client.hgetall(key_hash(sha))
        return _usable(_decoded(raw), self.now_ms() if now_ms is None else now_ms)

    async def lookup_hashes(self, shas: Iterable[str]) -> dict[str, Identity | None]:
        """Many lookups in one pipelined round trip (cache reloads)."""
        shas = list(shas)
        if not shas:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for sha in shas:
                pipe.hgetall(key_hash(sha))
            rows = await pipe.execute()
        now = self.now_ms()
        return {sha: _usable(_decoded(row), now) for sha, row in zip(shas, rows, strict=True)}

    async def info(self, key_id: str) -> KeyInfo | None:
        sha = await self.client.hget(KEY_IDS, key_id)
        if sha is None:
            return None
        fields = _decoded(await self.client.hgetall(key_hash(_text(sha))))
        return self._info(fields, self.now_ms()) if fields else None

    async def list(
        self, workspace: str | None = None, *, owner_sub: str | None = None
    ) -> list[KeyInfo]:
        ids = _decoded(await self.client.hgetall(KEY_IDS))
        if not ids:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for sha in ids.values():
                pipe.hgetall(key_hash(sha))
            rows = await pipe.execute()
        now = self.now_ms()
        infos = [self._info(_decoded(row), now) for row in rows if row]
        if workspace is not None:
            infos = [i for i in infos if i.workspace == workspace]
        if owner_sub is not None:
            infos = [i for i in infos if i.owner_sub == owner_sub]
        return sorted(infos, key=lambda i: (i.created_ms, i.key_id))

    async def rotate(self, key_id: str, overlap_seconds: float) -> tuple[str, Identity]:
        """A new key with the same attribution; the old one keeps working for the overlap."""
        if overlap_seconds < 0:
            raise KeyStoreError(f"overlap must not be negative, got {overlap_seconds}")
        old_sha = await self._sha_of(key_id)
        fields = _decoded(await self.client.hgetall(key_hash(old_sha)))
        if not fields:
            raise KeyStoreError(f"unknown key id {key_id}")
        old = _identity(fields)
        # A personal key's successor ends when it would have: rotation never extends a lifetime.
        owner_sub = fields.get("owner_sub") or None
        lifetime = old.expires_ms if owner_sub else 0
        for _ in range(_ATTEMPTS):
            now = self.now_ms()
            secret, sha, new_id = _mint()
            identity = Identity(new_id, old.workspace, old.team, old.service, old.owner, lifetime)
            deadline = now + int(overlap_seconds * 1000)
            result = _text(
                await self._rotate(
                    keys=[key_hash(old_sha), KEY_IDS, key_hash(sha)],
                    args=[
                        key_id,
                        old_sha,
                        new_id,
                        sha,
                        deadline,
                        now,
                        KEYS_CHANNEL,
                        *_new_fields(identity, now, owner_sub),
                    ],
                )
            )
            if result == "ok":
                return secret, identity
            if result == "collision":
                continue
            if result.startswith("rotated "):
                raise KeyStoreError(
                    f"{key_id} was already rotated to {result.split()[1]}; rotate that key instead"
                )
            raise KeyStoreError(f"cannot rotate {key_id}: it is {result}")
        raise KeyStoreError("could not mint a unique key id")  # pragma: no cover

    async def revoke(self, key_id: str) -> KeyInfo:
        """Refuse the key from now on. Idempotent."""
        sha = await self._sha_of(key_id)
        workspace = await self.client.hget(key_hash(sha), "workspace")
        if workspace is None:
            raise KeyStoreError(f"unknown key id {key_id}")
        # The budget scripts' set first: that is what stops spending atomically.
        await self.client.sadd(revoked_key(_text(workspace)), key_id)
        if not await self._revoke(keys=[key_hash(sha), KEY_IDS], args=[key_id, sha, KEYS_CHANNEL]):
            raise KeyStoreError(f"unknown key id {key_id}")  # pragma: no cover
        info = await self.info(key_id)
        assert info is not None
        return info

    async def _sha_of(self, key_id: str) -> str:
        sha = await self.client.hget(KEY_IDS, key_id)
        if sha is None:
            raise KeyStoreError(f"unknown key id {key_id}")
        return _text(sha)

    @staticmethod
    def _info(fields: Mapping[str, str], now_ms: int) -> KeyInfo:
        identity = _identity(fields)
        revoked = fields.get("revoked") == "1"
        return KeyInfo(
            key_id=identity.key_id,
            workspace=identity.workspace,
            team=identity.team,
            service=identity.service,
            owner=identity.owner,
            created_ms=int(fields.get("created_ms") or 0),
            expires_ms=identity.expires_ms,
            revoked=revoked,
            replaced_by=fields.get("replaced_by") or None,
            status=key_status(revoked, identity.expires_ms, now_ms),
            owner_sub=fields.get("owner_sub") or None,
        )


class _Missing(enum.Enum):
    MISSING = "missing"


MISSING = _Missing.MISSING
Lookup = Identity | None | Literal[_Missing.MISSING]


class KeyCache:
    """Key lookups for the request path: a dict probe, Redis only on a miss.

    Positive entries live until a change notice drops them (or `positive_ttl_ms` passes, a
    bound on staleness should notices ever stop); negatives live `negative_ttl_ms`, so a
    flood of one bad key costs one Redis read per period, and are capped in number so a
    flood of distinct bad keys cannot grow memory. Concurrent misses on one key share one
    Redis read.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        now_ms: Clock | None = None,
        negative_ttl_ms: int = 5_000,
        positive_ttl_ms: int = 60_000,
        max_negative: int = 100_000,
        ping_seconds: float = 30.0,
        on_notice: Callable[[str, str, str], None] | None = None,
        on_leases: Callable[[str], object] | None = None,
    ) -> None:
        self.store = store
        self.now_ms = now_ms or store.now_ms
        self.negative_ttl_ms = negative_ttl_ms
        self.positive_ttl_ms = positive_ttl_ms
        self.max_negative = max_negative
        self.ping_seconds = ping_seconds
        self.ready = asyncio.Event()
        self._positive: dict[str, tuple[Identity, int]] = {}
        self._negative: dict[str, int] = {}
        self._inflight: dict[str, asyncio.Task[Identity | None]] = {}
        self._epoch = 0
        self._changed = asyncio.Event()
        # Told the workspace of each `leases` notice on the same channel (Budgets closes
        # that workspace's leases: room is asked for, or a hard limit was lowered).
        self.on_leases = on_leases
        # Told of the channel's other notices (top-ups, pauses: see `governance.live`).
        self.on_notice = on_notice

    def get(self, secret: str) -> Lookup:
        """Identity, None (refused) or MISSING (ask `resolve`), with no I/O."""
        if not well_formed(secret):
            return None
        return self._get(hash_secret(secret))

    async def resolve(self, secret: str) -> Identity | None:
        """The identity behind `secret`; raises RedisError if Redis is needed and away."""
        if not well_formed(secret):
            return None
        sha = hash_secret(secret)
        cached = self._get(sha)
        if cached is not MISSING:
            return cached
        task = self._inflight.get(sha)
        if task is None:
            task = asyncio.ensure_future(self._fetch(sha))
            self._inflight[sha] = task
            task.add_done_callback(lambda t: self._fetched(sha, t))
        identity = await asyncio.shield(task)
        if identity and identity.expires_ms and self.now_ms() >= identity.expires_ms:
            return None
        return identity

    async def is_revoked(self, identity: Identity) -> bool:
        """Asked of Redis each time (calls without a reservation): revocation is immediate."""
        return await self.store.is_revoked(identity)

    def __len__(self) -> int:
        return len(self._positive) + len(self._negative)

    def next_change(self) -> Awaitable[bool]:
        """Completes once the next change notice or reload has been applied.

        Bound to the current event when called, so a change applied before the caller
        first awaits it is not missed.
        """
        return self._changed.wait()

    async def run(self) -> None:
        """Follow the change channel forever; after every (re)subscribe reload all entries."""
        backoff = 0.1
        while True:
            pubsub = None
            try:
                pubsub = await subscriber(self.store.client)
                await pubsub.subscribe(KEYS_CHANNEL)
                backoff = 0.1
                await self._listen(pubsub)
            except UNAVAILABLE as exc:
                self.ready.clear()
                log.warning("key cache: change channel lost (%s); retrying in %.1fs", exc, backoff)
            except Exception:
                # redis-py's pub/sub can fail in other ways while a connection dies under it
                # (seen: AttributeError on a closed writer). The listener must outlive them all:
                # without it, revocations reach this replica only through the revoked-set check.
                self.ready.clear()
                log.exception("key cache: change channel failed; retrying in %.1fs", backoff)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _listen(self, pubsub: Any) -> None:
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=self.ping_seconds)
            if message is None:
                if pinged:
                    raise RedisConnectionError("no reply to PING on the change channel")
                await pubsub.ping()
                pinged = True
                continue
            pinged = False
            kind = _text(message["type"])
            if kind == "subscribe":
                await self.reload()
                self.ready.set()
            elif kind == "message":
                self._apply(_text(message["data"]))

    async def reload(self) -> None:
        """Re-read every cached key and forget negatives (after missing notices)."""
        self._epoch += 1
        self._negative.clear()
        fresh = await self.store.lookup_hashes(list(self._positive))
        stale_at = self.now_ms() + self.positive_ttl_ms
        self._positive = {sha: (i, stale_at) for sha, i in fresh.items() if i is not None}
        self._signal()

    def _apply(self, data: str) -> None:
        parts = data.split()
        if len(parts) != 3:
            log.warning("key cache: ignoring malformed change notice %r", data[:100])
            return
        if parts[0] == LEASES_NOTICE:  # not about a key: a workspace's budget leases
            if self.on_leases is not None:
                self.on_leases(parts[1])
            return
        if parts[0] in _OTHER_NOTICES:
            if self.on_notice is not None:
                self.on_notice(parts[0], parts[1], parts[2])
            return
        self._invalidate(parts[2])

    def _invalidate(self, sha: str) -> None:
        self._epoch += 1
        self._positive.pop(sha, None)
        self._negative.pop(sha, None)
        self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _get(self, sha: str) -> Lookup:
        now = self.now_ms()
        hit = self._positive.get(sha)
        if hit is not None:
            identity, stale_at = hit
            if identity.expires_ms and now >= identity.expires_ms:
                return None
            if now < stale_at:
                return identity
            del self._positive[sha]
            return MISSING
        until = self._negative.get(sha)
        if until is not None:
            if now < until:
                return None
            del self._negative[sha]
        return MISSING

    async def _fetch(self, sha: str) -> Identity | None:
        epoch = self._epoch
        identity = await self.store.lookup_hash(sha)
        if epoch == self._epoch:
            self._remember(sha, identity)
        return identity

    def _fetched(self, sha: str, task: asyncio.Task[Identity | None]) -> None:
        if self._inflight.get(sha) is task:
            del self._inflight[sha]
        if not task.cancelled():
            task.exception()

    def _remember(self, sha: str, identity: Identity | None) -> None:
        now = self.now_ms()
        if identity is not None:
            self._negative.pop(sha, None)
            self._positive[sha] = (identity, now + self.positive_ttl_ms)
            return
        negative = self._negative
        negative.pop(sha, None)
        negative[sha] = now + self.negative_ttl_ms
        # Insertion order is expiry order (one TTL for all), so the oldest go first.
        while negative and (
            len(negative) > self.max_negative or next(iter(negative.values())) <= now
        ):
            del negative[next(iter(negative))]
