"""The cluster URL: what it names, and the client each kind of URL gets."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio as aioredis

from extproc.cli.admin import redacted
from extproc.store.clients import (
    ClusterURL,
    is_cluster,
    make_client,
    make_sync_client,
    parse_cluster_url,
)


def test_cluster_url_lists_seed_nodes_and_credentials() -> None:
    parsed = parse_cluster_url("redis+cluster://ops:s%40cret@10.0.0.1:7000,10.0.0.2:7001/")
    assert parsed == ClusterURL(
        nodes=(("10.0.0.1", 7000), ("10.0.0.2", 7001)),
        username="ops",
        password="s@cret",
        ssl=False,
    )
    tls = parse_cluster_url("rediss+cluster://:pw@[::1]:7000")
    assert tls == ClusterURL(nodes=(("::1", 7000),), username=None, password="pw", ssl=True)


def test_plain_urls_are_not_clusters() -> None:
    assert parse_cluster_url("redis://127.0.0.1:6379/0") is None
    assert not is_cluster("rediss://h:1/0")
    assert is_cluster("redis+cluster://h:1")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster://h:1/2", "only database 0"),
        ("redis+cluster://h:1?timeout=3", "no query parameters"),
        ("redis+cluster://h:1,h2", "host:port"),
        ("redis+cluster://:1", "host:port"),
    ],
)
def test_bad_cluster_urls_say_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_cluster_url(url)


def test_each_url_gets_its_kind_of_client() -> None:
    assert type(make_client("redis://127.0.0.1:1/0")) is aioredis.Redis
    assert isinstance(make_client("redis+cluster://127.0.0.1:1,127.0.0.1:2"), aioredis.RedisCluster)
    plain = make_sync_client("redis://127.0.0.1:1/0")
    assert type(plain) is redis.Redis
    plain.close()


def test_messages_never_show_a_cluster_password() -> None:
    assert redacted("redis+cluster://ops:pw@h1:1,h2:2") == "redis+cluster://ops:***@h1:1,h2:2"
