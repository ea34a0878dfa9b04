"""Virtual keys against a real Redis: hashes only, rotation overlap, revocation everywhere."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aioredis

from extproc.devstack.stack import free_port
from extproc.governance import guard
from extproc.governance.keys import (
    MISSING,
    Identity,
    KeyCache,
    KeyStore,
    KeyStoreError,
    hash_secret,
)
from extproc.governance.policy import load_policy
from extproc.store.schema import KEY_IDS, KEYS_CHANNEL, key_hash, revoked_key

ROOT = Path(__file__).resolve().parents[3]
POLICY = load_policy(ROOT / "examples" / "policy.yaml")
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
T = TypeVar("T")


class FakeClock:
    def __init__(self, ms: int = T0) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms

    def advance(self, ms: int) -> None:
        self.ms += ms


def run(
    redis_url: str, body: Callable[[KeyStore], Awaitable[T]], clock: FakeClock | None = None
) -> T:
    async def main() -> T:
        client = aioredis.from_url(redis_url)
        try:
            return await body(KeyStore(client, now_ms=clock or FakeClock()))
        finally:
            await client.aclose()

    return asyncio.run(main())


async def until(cache: KeyCache, done: Callable[[], bool]) -> None:
    """Wait, change notice by change notice, until `done()` holds."""
    while not done():
        await asyncio.wait_for(cache.next_change(), 5)


def hgetall_calls(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))


def everything_in(r: redis.Redis) -> bytes:
    """Every key name and value in the database, concatenated."""
    out = []
    for key in r.scan_iter(count=1000):
        out.append(key)
        kind = r.type(key)
        if kind == b"hash":
            for k, v in r.hgetall(key).items():
                out += [k, v]
        elif kind == b"set":
            out += list(r.smembers(key))
        elif kind == b"string":
            out.append(r.get(key) or b"")
        else:
            raise AssertionError(f"unexpected {kind!r} at {key!r}")
    return b"\n".join(out)


# --- create / lookup ---------------------------------------------------------------------


def test_personal_keys_record_their_holder_and_keep_their_lifetime(
    r: redis.Redis, redis_url: str
) -> None:
    """A personal key names its holder's subject, expires when it was minted to, and its
    successor after a rotation ends no later; other keys are not listed as theirs."""

    async def body(store: KeyStore) -> None:
        until = T0 + 3 * 86_400_000
        _s, mine = await store.create(
            "dev", "codex-cli", owner="ana@example.com", expires_ms=until, owner_sub="sub-ana"
        )
        await store.create("dev", "codex-cli", owner="ana@example.com")  # an admin's key
        listed = await store.list(owner_sub="sub-ana")
        assert [(k.key_id, k.owner_sub, k.expires_ms) for k in listed] == [
            (mine.key_id, "sub-ana", until)
        ]
        assert listed[0].status == "expiring"
        _s2, successor = await store.rotate(mine.key_id, overlap_seconds=60)
        info = await store.info(successor.key_id)
        assert info is not None and info.owner_sub == "sub-ana" and info.expires_ms == until
        with pytest.raises(KeyStoreError, match="owner subject must be printable"):
            await store.create("dev", "codex-cli", owner_sub="x\n")

    run(redis_url, body)


def test_create_stores_only_the_hash_and_announces_it(r: redis.Redis, redis_url: str) -> None:
    async def body(store: KeyStore) -> tuple[str, Identity, list[Any]]:
        pubsub = store.client.pubsub()
        await pubsub.subscribe(KEYS_CHANNEL)
        await pubsub.get_message(timeout=5)  # subscribe confirmation
        secret, identity = await store.create("dev", "codex-cli", owner="ana@example.com")
        notice = await pubsub.get_message(timeout=5)
        await pubsub.aclose()
        assert await store.lookup(secret) == identity
        return secret, identity, [notice]

    secret, identity, notices = run(redis_url, body)
    assert re.fullmatch(r"sk-ext-[A-Za-z0-9_-]{40}", secret)
    assert re.fullmatch(r"key_[0-9a-f]{12}", identity.key_id)
    assert identity == Identity(identity.key_id, "dev", None, "codex-cli", "ana@example.com", 0)
    sha = hash_secret(secret)
    assert r.hgetall(f"{{extproc:keys}}:hash:{sha}") == {
        b"key_id": identity.key_id.encode(),
        b"workspace": b"dev",
        b"team": b"",
        b"service": b"codex-cli",
        b"owner": b"ana@example.com",
        b"created_ms": str(T0).encode(),
        b"expires_ms": b"0",
        b"revoked": b"0",
        b"replaced_by": b"",
        b"owner_sub": b"",
    }
    assert r.hgetall(KEY_IDS) == {identity.key_id.encode(): sha.encode()}
    assert notices[0]["data"] == f"create {identity.key_id} {sha}".encode()
    dump = everything_in(r)
    assert secret.encode() not in dump and secret[7:].encode() not in dump
    assert secret[7:27].encode() not in dump  # not even half of the random part


def test_unknown_and_malformed_keys_are_refused(r: redis.Redis, redis_url: str) -> None:
    async def body(store: KeyStore) -> list[Identity | None]:
        await store.create("dev", "codex-cli")
        return [
            await store.lookup("sk-ext-" + "A" * 40),
            await store.lookup("sk-ext-short"),
            await store.lookup("sk-proj-" + "A" * 40),
            await store.lookup(""),
        ]

    assert run(redis_url, body) == [None, None, None, None]


def test_policy_checks_names_and_fills_in_the_team(r: redis.Redis, redis_url: str) -> None:
    async def body(store: KeyStore) -> list[str]:
        _, identity = await store.create("dev", "codex-cli", policy=POLICY)
        assert identity.team == "platform"
        errors = []
        for args in [
            ("staging", "codex-cli", None),
            ("dev", "pr-review-bot", None),
            ("dev", "codex-cli", "sales"),
            ("dev", "codex-cli", "web"),
        ]:
            with pytest.raises(KeyStoreError) as info:
                await store.create(*args, policy=POLICY)
            errors.append(str(info.value))
        with pytest.raises(KeyStoreError, match="invalid workspace name"):
            await store.create("{ws:x}", "svc")
        return errors

    assert run(redis_url, body) == [
        'unknown workspace "staging" (workspaces: dev, ci, prod)',
        'unknown service "pr-review-bot" in dev (services: codex-cli, ide-assistant, '
        "notebook-helper)",
        'unknown team "sales" in dev (teams: platform, web, data)',
        'service "codex-cli" belongs to team "platform", not "web"',
    ]
    assert len(r.hgetall(KEY_IDS)) == 1


# --- rotation ----------------------------------------------------------------------------


def test_rotation_overlap_old_key_works_until_the_deadline_not_after(
    r: redis.Redis, redis_url: str
) -> None:
    clock = FakeClock()

    async def body(store: KeyStore) -> None:
        old_secret, old = await store.create("ci", "pr-review-bot", team="platform", owner="ci")
        clock.advance(60_000)
        cache = KeyCache(store)
        assert await cache.resolve(old_secret) == old
        new_secret, new = await store.rotate(old.key_id, 3600)
        deadline = clock.ms + 3_600_000
        assert (new.workspace, new.team, new.service, new.owner) == (
            "ci",
            "platform",
            "pr-review-bot",
            "ci",
        )
        assert new.key_id != old.key_id and new_secret != old_secret
        assert await store.lookup(new_secret) == new

        info = await store.info(old.key_id)
        assert info is not None
        assert (info.status, info.expires_ms, info.replaced_by) == (
            "expiring",
            deadline,
            new.key_id,
        )

        expiring = Identity(old.key_id, "ci", "platform", "pr-review-bot", "ci", deadline)
        clock.ms = deadline - 1
        assert await store.lookup(old_secret) == expiring
        assert await cache.resolve(old_secret) == expiring  # the stale entry was refreshed...
        clock.ms = deadline
        assert await store.lookup(old_secret) is None
        assert cache.get(old_secret) is None  # ...and expiry is checked at read time
        assert await cache.resolve(old_secret) is None
        assert await store.lookup(new_secret) == new
        assert (await store.info(old.key_id)).status == "expired"  # type: ignore[union-attr]

        with pytest.raises(KeyStoreError, match=f"already rotated to {new.key_id}"):
            await store.rotate(old.key_id, 60)
        with pytest.raises(KeyStoreError, match="unknown key id key_000000000000"):
            await store.rotate("key_000000000000", 60)

    run(redis_url, body, clock)


def test_rotation_never_extends_an_earlier_deadline(r: redis.Redis, redis_url: str) -> None:
    clock = FakeClock()

    async def body(store: KeyStore) -> None:
        secret, identity = await store.create("dev", "codex-cli")
        sha = hash_secret(secret)
        await store.client.hset(key_hash(sha), "expires_ms", str(T0 + 1000))
        await store.rotate(identity.key_id, 7 * 86400)
        assert (await store.client.hget(key_hash(sha), "expires_ms")) == str(T0 + 1000).encode()
        _, other = await store.create("dev", "codex-cli")
        await store.revoke(other.key_id)
        with pytest.raises(KeyStoreError, match=f"cannot rotate {other.key_id}: it is revoked"):
            await store.rotate(other.key_id, 60)

    run(redis_url, body, clock)


# --- revocation --------------------------------------------------------------------------


def test_revoke_is_immediate_everywhere(r: redis.Redis, redis_url: str) -> None:
    async def body(store: KeyStore) -> tuple[str, str]:
        secret, identity = await store.create("prod", "support-assistant", team="support")
        other = KeyStore(aioredis.from_url(redis_url), now_ms=store.now_ms)
        caches = [KeyCache(store), KeyCache(other)]
        tasks = [asyncio.create_task(c.run()) for c in caches]
        try:
            for cache in caches:
                await asyncio.wait_for(cache.ready.wait(), 5)
                assert await cache.resolve(secret) == identity
                assert cache.get(secret) == identity
            info = await store.revoke(identity.key_id)
            assert (info.status, info.revoked) == ("revoked", True)
            assert await store.lookup(secret) is None
            for cache in caches:
                await until(cache, lambda c=cache: c.get(secret) != identity)
                assert cache.get(secret) is MISSING
                assert await cache.resolve(secret) is None
                assert cache.get(secret) is None  # now a remembered refusal
            await store.revoke(identity.key_id)  # idempotent
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await other.client.aclose()
        return identity.key_id, secret

    key_id, secret = run(redis_url, body)
    assert r.smembers(revoked_key("prod")) == {key_id.encode()}
    assert revoked_key("prod") == "{ws:prod}:revoked"
    assert secret.encode() not in everything_in(r)


def test_unknown_key_ids_are_refused(r: redis.Redis, redis_url: str) -> None:
    async def body(store: KeyStore) -> None:
        with pytest.raises(KeyStoreError, match="unknown key id key_nope"):
            await store.revoke("key_nope")

    run(redis_url, body)
    assert r.keys("*") == []


def test_cache_reloads_everything_after_reconnecting(r: redis.Redis, redis_url: str) -> None:
    async def body(store: KeyStore) -> None:
        secret, identity = await store.create("dev", "codex-cli")
        cache = KeyCache(store)
        task = asyncio.create_task(cache.run())
        try:
            await asyncio.wait_for(cache.ready.wait(), 5)
            assert await cache.resolve(secret) == identity
            # A change whose notice this cache never receives...
            await store.client.hset(key_hash(hash_secret(secret)), "revoked", "1")
            assert cache.get(secret) == identity
            # ...is picked up when the subscription comes back.
            await store.client.client_kill_filter(_type="pubsub")
            await until(cache, lambda: cache.get(secret) != identity)
            assert await cache.resolve(secret) is None
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(redis_url, body)


# --- the request-path cache --------------------------------------------------------------


def test_negative_caching_absorbs_floods_of_bad_keys(r: redis.Redis, redis_url: str) -> None:
    clock = FakeClock()
    bad = "sk-ext-" + "b" * 40

    async def body(store: KeyStore) -> None:
        cache = KeyCache(store, negative_ttl_ms=5000, max_negative=3)
        before = hgetall_calls(r)
        assert cache.get(bad) is MISSING
        results = await asyncio.gather(*(cache.resolve(bad) for _ in range(50)))
        results += [await cache.resolve(bad) for _ in range(50)]
        assert results == [None] * 100 and cache.get(bad) is None
        assert hgetall_calls(r) - before == 1
        assert await cache.resolve("not-a-key") is None and cache.get("Bearer x") is None
        assert hgetall_calls(r) - before == 1  # malformed keys never reach Redis
        clock.advance(4999)
        assert cache.get(bad) is None
        clock.advance(1)
        assert cache.get(bad) is MISSING
        await cache.resolve(bad)
        assert hgetall_calls(r) - before == 2
        for i in range(5):
            await cache.resolve("sk-ext-" + str(i) * 40)
        assert len(cache) == 3  # bounded, whatever the flood

    run(redis_url, body, clock)


def test_concurrent_misses_share_one_lookup_and_hits_need_no_io(
    r: redis.Redis, redis_url: str
) -> None:
    async def body(store: KeyStore) -> None:
        secret, identity = await store.create("dev", "codex-cli")
        cache = KeyCache(store)
        before = hgetall_calls(r)
        found = await asyncio.gather(*(cache.resolve(secret) for _ in range(20)))
        assert found == [identity] * 20
        assert all(cache.get(secret) == identity for _ in range(1000))
        assert hgetall_calls(r) - before == 1

    run(redis_url, body)


def test_positive_entries_are_rechecked_after_their_ttl(r: redis.Redis, redis_url: str) -> None:
    clock = FakeClock()

    async def body(store: KeyStore) -> None:
        secret, identity = await store.create("dev", "codex-cli")
        cache = KeyCache(store, positive_ttl_ms=60_000)  # no run(): notices never arrive
        assert await cache.resolve(secret) == identity
        await store.revoke(identity.key_id)
        assert cache.get(secret) == identity
        clock.advance(60_000)
        assert cache.get(secret) is MISSING
        assert await cache.resolve(secret) is None

    run(redis_url, body, clock)


def test_bearer_token_is_what_the_data_path_looks_up() -> None:
    assert guard.bearer("Bearer sk-ext-abc") == "sk-ext-abc"
    assert guard.bearer("bearer   sk-ext-abc ") == "sk-ext-abc"
    assert [guard.bearer(v) for v in ("", "Bearer", "Basic abc", "sk-ext-abc")] == [""] * 4


# --- list and the command line -----------------------------------------------------------


def test_list_shows_status_and_never_secrets(r: redis.Redis, redis_url: str) -> None:
    clock = FakeClock()

    async def body(store: KeyStore) -> list[Any]:
        _, a = await store.create("dev", "codex-cli", team="platform")
        clock.advance(1)
        _, b = await store.create("dev", "codex-cli", team="platform")
        clock.advance(1)
        _, c = await store.create("ci", "pr-review-bot")
        await store.revoke(b.key_id)
        clock.advance(1)
        _, a2 = await store.rotate(a.key_id, 60)
        dev = await store.list("dev")
        assert [i.key_id for i in await store.list()] == [a.key_id, b.key_id, c.key_id, a2.key_id]
        return [(i.key_id, i.status, i.replaced_by) for i in dev] + [(a, b, a2)]

    *rows, (a, b, a2) = run(redis_url, body, clock)
    assert rows == [
        (a.key_id, "expiring", a2.key_id),
        (b.key_id, "revoked", None),
        (a2.key_id, "active", None),
    ]


def cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EXTPROC_REDIS_URL": redis_url}
    env.pop("EXTPROC_POLICY", None)
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_create_list_rotate_revoke(r: redis.Redis, redis_url: str) -> None:
    made = cli(redis_url, "keys", "create", "--workspace", "dev", "--service", "codex-cli",
               "--owner", "ana@example.com", "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["workspace"] == "dev" and created["team"] == "platform"  # from the policy
    assert created["owner"] == "ana@example.com"
    assert re.fullmatch(r"sk-ext-[A-Za-z0-9_-]{40}", created["key"])

    listed = cli(redis_url, "keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(k["key_id"], k["status"], k["service"]) for k in rows] == [
        (created["key_id"], "active", "codex-cli")
    ]
    assert created["key"] not in listed.stdout and created["key"].encode() not in everything_in(r)

    rotated = cli(redis_url, "keys", "rotate", created["key_id"], "--overlap", "15m", "--json")
    assert rotated.returncode == 0, rotated.stderr
    new = json.loads(rotated.stdout)
    assert new["replaces"] == created["key_id"] and new["team"] == "platform"
    old_expires = new["old_expires_ms"]
    info = r.hget(key_hash(hash_secret(created["key"])), "expires_ms")
    assert info == str(old_expires).encode()

    revoked = cli(redis_url, "keys", "revoke", new["key_id"])
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.startswith(f"revoked {new['key_id']} (workspace dev")
    table = cli(redis_url, "keys", "list", "--workspace", "dev").stdout.splitlines()
    assert table[0].split()[:3] == ["KEY", "ID", "STATUS"]
    assert [line.split()[:2] for line in table[1:]] == [
        [created["key_id"], "expiring"],
        [new["key_id"], "revoked"],
    ]


def test_cli_refusals_and_exit_codes(r: redis.Redis, redis_url: str) -> None:
    unknown = cli(redis_url, "keys", "create", "--workspace", "dev", "--service", "nope")
    assert unknown.returncode == 1
    assert 'unknown service "nope" in dev' in unknown.stderr
    bad_overlap = cli(redis_url, "keys", "rotate", "key_x", "--overlap", "1 week")
    assert bad_overlap.returncode == 2 and "not a duration" in bad_overlap.stderr
    gone = cli(redis_url, "keys", "revoke", "key_000000000000")
    assert gone.returncode == 1 and "unknown key id key_000000000000" in gone.stderr
    down = cli(f"redis://:hunter2@127.0.0.1:{free_port()}/0", "keys", "list")
    assert down.returncode == 1 and "Redis at redis://:***@127.0.0.1" in down.stderr
    assert "hunter2" not in down.stderr


def test_lookups_through_the_lean_client_match_redis_py(r: redis.Redis, redis_url: str) -> None:
    """The request path reads keys with store.fastredis; answers must be the same."""
    from extproc.store.fastredis import FastRedis

    async def body(store: KeyStore) -> None:
        secret, identity = await store.create("dev", "codex-cli", owner="o")
        hot = FastRedis.from_url(redis_url)
        try:
            fast = KeyStore(store.client, now_ms=store.now_ms, hot=hot)
            for sha in (hash_secret(secret), hash_secret("sk-ext-" + "B" * 40)):
                assert await fast.lookup_hash(sha) == await store.lookup_hash(sha)
            assert await fast.lookup_hash(hash_secret(secret)) == identity
        finally:
            await hot.aclose()

    run(redis_url, body)
