"""Redis connections: one node or a Redis Cluster, chosen by the URL alone.

Every key extproc writes carries a hash tag (`{ws:W}`, `{extproc:keys}`,
`{extproc:ledger}`), so each script touches one slot and the same code runs against a
single node or a cluster; only the client differs. A cluster is named by its seed nodes in
the one `redis_url` setting, `redis+cluster://host:port,host:port` (`rediss+cluster://` for
TLS), so there is never a second setting to keep in agreement with the URL.

Retries are the same for both and short on purpose (redis-py's defaults differ by
constructor: none for `from_url`, ten with backoff and re-discovery for a cluster). Every
caller has a better answer than waiting for Redis (a workspace fails open or closed, the
ledger spools to disk), so one immediate retry covers a connection the server just closed,
and a timeout is not retried at all: Envoy gives each ext_proc message a few seconds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol, Self, runtime_checkable
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
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
