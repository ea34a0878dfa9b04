"""Redis connections: one node or a Redis Cluster, chosen by the URL alone.

Every key extproc writes carries a hash tag (`{ws:W}`, `{extproc:keys}`,
`{extproc:ledger}`), so each script touches one slot and the same code runs against a
single node or a cluster; only the client differs. A cluster is named by its seed nodes in
the one `redis_url` setting, `redis+cluster://host:port,host:port` (`rediss+cluster://` for
TLS), so there is never a second setting to keep in agreement with the URL.

A Sentinel-managed primary with replicas is named the same way, by its Sentinels and the
service name they watch: `redis+sentinel://[user:pass@]host:port,host:port/<service>[/db]`
(`rediss+sentinel://` for TLS; `?sentinel_password=` when the Sentinels have their own).
Clients then ask the Sentinels where the primary is, check it really is one, and ask again
whenever a connection breaks or a write meets a replica, so they follow a failover.

Retries are the same for all and short on purpose (redis-py's defaults differ by
constructor: none for `from_url`, ten with backoff and re-discovery for a cluster). Every
caller has a better answer than waiting for Redis (a workspace fails open or closed, the
ledger spools to disk), so one immediate retry covers a connection the server just closed,
and a timeout is not retried at all: Envoy gives each ext_proc message a few seconds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol, Self, runtime_checkable
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel
import redis.sentinel
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
DEFAULT_RETRIES = 1

AsyncClient = aioredis.Redis | aioredis.RedisCluster


@runtime_checkable
class Pipeline(Protocol):
    """The commands queued for one round trip on the hot path (the ledger's writes)."""

    def execute_command(self, *args: Any) -> Any: ...

    def hincrby(self, name: str, key: str, amount: int = 1) -> Any: ...

    def sadd(self, name: str, *values: Any) -> Any: ...

    async def execute(self, raise_on_error: bool = True) -> list[Any]: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: Any) -> Any: ...


@runtime_checkable
class ScriptClient(Protocol):
    """What the budgets and the ledger writer need from Redis: scripts called by SHA, raw
    commands and a pipeline. Both `FastRedis` (the hot path's lean client) and redis-py's
    asyncio clients (single node or cluster) provide it."""

    async def execute_command(self, *args: Any) -> Any: ...

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any: ...

    async def script_load(self, script: str) -> Any: ...

    def pipeline(self, transaction: bool = True) -> Pipeline: ...


SyncClient = redis.Redis | redis.RedisCluster

UNAVAILABLE: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)
"""What "Redis is away" looks like: a cluster with no reachable node (or a slot no node
serves) raises RedisClusterException, which is not a RedisError."""


@dataclass(frozen=True, slots=True)
class ClusterURL:
    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    ssl: bool


def parse_cluster_url(url: str) -> ClusterURL | None:
    """The seed nodes and credentials of a `redis+cluster://` URL; None for other URLs."""
    parts = urlsplit(url)
    ssl = CLUSTER_SCHEMES.get(parts.scheme)
    if ssl is None:
        return None
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0, got {parts.path!r}")
    if parts.query:
        raise ValueError("a redis+cluster:// URL takes no query parameters")
    nodes = []
    for host in hosts.split(","):
        name, sep, port = host.strip().rpartition(":")
        if not sep or not name or not port.isdigit():
            raise ValueError(f"cluster seed nodes must be host:port, got {host!r}")
        nodes.append((name.strip("[]"), int(port)))
    return ClusterURL(
        nodes=tuple(nodes),
        username=unquote(username) or None,
        password=unquote(password) or None,
        ssl=ssl,
    )


@dataclass(frozen=True, slots=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    sentinel_password: str | None
    ssl: bool


def _host_ports(hosts: str, what: str) -> tuple[tuple[str, int], ...]:
    nodes = []
    for host in hosts.split(","):
        name, sep, port = host.strip().rpartition(":")
        if not sep or not name or not port.isdigit():
            raise ValueError(f"{what} must be host:port, got {host!r}")
        nodes.append((name.strip("[]"), int(port)))
    return tuple(nodes)


def parse_sentinel_url(url: str) -> SentinelURL | None:
    """The Sentinels, service and credentials of a `redis+sentinel://` URL; None otherwise."""
    parts = urlsplit(url)
    ssl = SENTINEL_SCHEMES.get(parts.scheme)
    if ssl is None:
        return None
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    service, _, db = parts.path.strip("/").partition("/")
    if not service:
        raise ValueError("a redis+sentinel:// URL names the service: .../<service>[/db]")
    if db and not db.isdigit():
        raise ValueError(f"the database after the service must be a number, got {db!r}")
    query = parse_qs(parts.query)
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"unsupported redis+sentinel:// parameters: {', '.join(sorted(unknown))}")
    return SentinelURL(
        sentinels=_host_ports(hosts, "Sentinels"),
        service=service,
        db=int(db or 0),
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_password=query.get("sentinel_password", [None])[0],
        ssl=ssl,
    )


def _sentinel_client(s: SentinelURL, retry: Any, options: dict[str, Any], sync: bool) -> Any:
    module = redis.sentinel if sync else aioredis.sentinel
    timeouts = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel = module.Sentinel(
        list(s.sentinels),
        sentinel_kwargs={"password": s.sentinel_password, "ssl": s.ssl, **timeouts},
        username=s.username,
        password=s.password,
        db=s.db,
        ssl=s.ssl,
        retry=retry,
        **options,
    )
    return sentinel.master_for(s.service)


def is_cluster(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def _cluster_options(cluster: ClusterURL, options: dict[str, Any]) -> dict[str, Any]:
    return {
        "username": cluster.username,
        "password": cluster.password,
        "ssl": cluster.ssl,
        **options,
    }


def make_client(url: str, *, retries: int = DEFAULT_RETRIES, **options: Any) -> AsyncClient:
    """An asyncio client for `url`; `options` go to redis-py (timeouts, decode_responses)."""
    retry = AsyncRetry(NoBackoff(), retries, (RedisConnectionError,))
    sentinel = parse_sentinel_url(url)
    if sentinel is not None:
        client: aioredis.Redis = _sentinel_client(sentinel, retry, options, sync=False)
        return client
    cluster = parse_cluster_url(url)
    if cluster is None:
        # A burst of concurrent reservations must queue for a connection, not fail: the
        # default pool raises "Too many connections" past its cap of 100.
        options.setdefault("max_connections", 64)
        pool = aioredis.BlockingConnectionPool.from_url(url, retry=retry, **options)
        return aioredis.Redis.from_pool(pool)
    return aioredis.RedisCluster(
        startup_nodes=[aioredis.cluster.ClusterNode(h, p) for h, p in cluster.nodes],
        retry=retry,
        **_cluster_options(cluster, options),
    )


def make_sync_client(url: str, *, retries: int = DEFAULT_RETRIES, **options: Any) -> SyncClient:
    """The blocking twin of `make_client`, for scripts and tests."""
    retry = Retry(NoBackoff(), retries, (RedisConnectionError,))
    sentinel = parse_sentinel_url(url)
    if sentinel is not None:
        client: redis.Redis = _sentinel_client(sentinel, retry, options, sync=True)
        return client
    cluster = parse_cluster_url(url)
    if cluster is None:
        return redis.Redis.from_url(url, retry=retry, **options)
    return redis.RedisCluster(
        startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in cluster.nodes],
        retry=retry,
        **_cluster_options(cluster, options),
    )


async def subscriber(client: AsyncClient) -> PubSub:
    """A pub/sub connection for plain channels.

    A cluster forwards every PUBLISH to every node, so any node will do; a random one each
    time spreads sidecars over the cluster and steps around a node that just went away.
    """
    if not isinstance(client, aioredis.RedisCluster):
        return client.pubsub()
    await client.initialize()
    return client.pubsub(node=random.choice(client.get_nodes()))
