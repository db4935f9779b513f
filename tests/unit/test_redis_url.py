"""``--redis`` URLs: a Redis Cluster named by several seed nodes (``redis+cluster://h1:p1,h2:p2``),
their validation (one-line reasons, no password repeated) and a link's seeds. What a link does
with them against real servers: tests/system/test_redis_link.py."""

from __future__ import annotations

import pytest

from actors.wire.cluster import ClusterKey
from shards.config import ClusterURL, check_cluster_name, check_redis_url, cluster_url
from shards.redislink import RedisLink, cluster_seed

KEY = ClusterKey(b"k" * 32)


@pytest.mark.parametrize(
    ("url", "plain", "seeds"),
    [
        (
            "redis+cluster://10.0.0.1:7000",
            "redis://10.0.0.1:7000",
            [("10.0.0.1", 7000)],
        ),
        (
            "redis+cluster://a:7000,b:7001,c:7002",
            "redis://a:7000",
            [("a", 7000), ("b", 7001), ("c", 7002)],
        ),
        (
            "rediss+cluster://ucc:se%40cret@a:7000,b:7001/0?ssl_cert_reqs=none",
            "rediss://ucc:se%40cret@a:7000/0?ssl_cert_reqs=none",
            [("a", 7000), ("b", 7001)],
        ),
        (
            "REDIS+CLUSTER://node",  # no port: Redis's
            "redis://node:6379",
            [("node", 6379)],
        ),
        (
            "redis+cluster://[::1]:7000,[fe80::2],b:7000,[::1]:7000",  # IPv6; a duplicate
            "redis://[::1]:7000",
            [("::1", 7000), ("fe80::2", 6379), ("b", 7000)],
        ),
        (
            "redis+cluster://a:7000,b:7001/",
            "redis://a:7000/",
            [("a", 7000), ("b", 7001)],
        ),
    ],
)
def test_a_cluster_url_names_its_seed_nodes(url, plain, seeds):
    assert cluster_url(url) == ClusterURL(plain, tuple(seeds))
    assert check_redis_url(url) == url
    assert cluster_seed(url) == plain  # the first seed, with the URL's credentials and options


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "rediss://h:1", "unix:///run/redis.sock", "r+c:x"]
)
def test_other_schemes_are_no_cluster(url):
    assert cluster_url(url) is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+cluster://a:7000,b:70000", "'b:70000': the port is not a number from 1 to 65535"),
        ("redis+cluster://a:7000,b:x", "'b:x': the port is not a number from 1 to 65535"),
        ("redis+cluster://a:0", "'a:0': the port is not a number from 1 to 65535"),
        ("redis+cluster://a:", "'a:': the port is not a number from 1 to 65535"),
        ("redis+cluster://a:7000,:7001", "':7001': no host"),
        ("redis+cluster://a:7000,,b:7001", "an empty node in the list"),
        ("redis+cluster://a:7000,", "an empty node in the list"),
        ("redis+cluster://", "an empty node in the list"),
        ("redis+cluster://::1:7000", "write an IPv6 address in brackets"),
        ("redis+cluster://[::1:7000", "is not [address] or [address]:port"),
        ("redis+cluster://[]:7000", "no host"),
        ("redis+cluster://a:7000,b:7001/3", "a Redis Cluster has only database 0"),
        (
            "redis://a:7000,b:7001",
            "several nodes are for a Redis Cluster only: write redis+cluster://host1:port1",
        ),
        (
            "rediss://u:pw@a:7000,b:7001/0",
            "several nodes are for a Redis Cluster only: write rediss+cluster://",
        ),
        ("redis://a:99999", "the port is not a number from 0 to 65535"),
        ("redis://:7000", "no host"),
        ("http://a:7000,b:7001", "unsupported scheme 'http'"),
    ],
)
def test_a_bad_url_is_refused_with_a_one_line_reason(url, reason):
    with pytest.raises(ValueError) as refused:
        check_redis_url(url)
    message = str(refused.value)
    assert reason in message
    assert "\n" not in message
    assert message.startswith("--redis ")


def test_the_password_is_not_repeated_in_a_refusal():
    for url in ("rediss+cluster://ucc:hunter2@a:7000,b:x", "rediss://ucc:hunter2@a:7000,b:1"):
        with pytest.raises(ValueError) as refused:
            check_redis_url(url)
        assert "hunter2" not in str(refused.value)
        assert "ucc:***@" in str(refused.value)


def test_a_single_redis_link_has_no_seeds():
    link = RedisLink("redis://127.0.0.1:1/0", "unit", lambda _e: None, KEY)
    assert not link.sharded
    assert link.seeds == ()
    assert link.startup_nodes() == []


def test_a_cluster_link_starts_from_its_seeds_in_order():
    link = RedisLink("redis+cluster://seed:7000,other:7001", "unit", lambda _e: None, KEY)
    assert link.sharded
    assert link.startup_nodes() == [("seed", 7000), ("other", 7001)]


@pytest.mark.parametrize("name", ["default", "eu-west.1", "a", "A_b-c.9", "x" * 64])
def test_a_cluster_name_of_safe_characters_is_taken(name):
    assert check_cluster_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a}b", "{a}", "a b", "a:b", "é", "a/b"])
def test_a_cluster_name_that_would_break_a_hash_tag_is_refused(name):
    with pytest.raises(ValueError, match="--cluster-name"):
        check_cluster_name(name)


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://u:p#ss@h:1,h:x",
        "redis+cluster://u:p?ss@h:1,h:x",
        "redis+cluster://u:p/ss@h:notaport",
        "redis://u:p?ss@h:notaport",
        "redis://u:p#s/s@h:99999",
    ],
)
def test_a_password_with_url_characters_is_never_repeated(url):
    with pytest.raises(ValueError) as caught:
        check_redis_url(url)
    message = str(caught.value)
    password = url.split("//", 1)[1].rsplit("@", 1)[0].split(":", 1)[1]
    assert password not in message, message
    assert "***" in message


def test_a_password_with_url_characters_does_not_move_the_hosts():
    parsed = cluster_url("redis+cluster://u:p#s?s@h1:7000,h2:7001/0")
    assert parsed is not None
    assert parsed.seeds == (("h1", 7000), ("h2", 7001))
