"""The admin page's logic without a server: who may see it, the view of a snapshot with its rates,
the feed's fan-out and its slow pages, the largest channels, the restarts log."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from test_router import answer, start, take_queries

from actors.cache import UserConnectionCache
from actors.ids import ChannelId, ConnId, UserId
from actors.router import RouterCore, largest_channels
from actors.wire import shardwire
from shards.admin import (
    MAX_STREAMS,
    STREAM_QUEUE,
    AdminFeed,
    AdminRoutes,
    AdminView,
    admin_refusal,
    is_loopback,
    sse_event,
)
from shards.config import check_admin_token
from shards.metrics import Request, parse_request

TOKEN = "0123456789abcdef-admin"


def get(target: str, host: str = "127.0.0.1:9100", **headers: str) -> Request:
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    return parse_request(("\r\n".join(lines) + "\r\n\r\n").encode())


# -- access ----------------------------------------------------------------------------------


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_without_a_token_loopback_peers_may_look(peer):
    assert admin_refusal(get("/admin"), peer, None) is None


@pytest.mark.parametrize("peer", ["10.0.0.5", "192.168.1.2", "::ffff:10.0.0.5", "2001:db8::1"])
def test_without_a_token_other_peers_are_refused_403(peer):
    refusal = admin_refusal(get("/admin"), peer, None)
    assert refusal is not None
    assert refusal[0] == 403
    assert "--admin-token" in refusal[1]


@pytest.mark.parametrize("peer", [None, "", "not-an-address", "fe80::1%eth0"])
def test_unknown_or_odd_peers_are_not_loopback(peer):
    assert admin_refusal(get("/admin"), peer, None) is not None


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:9100", "127.0.0.1", "127.0.0.1:9100", "[::1]:9100", "[::1]"]
)
def test_without_a_token_a_request_for_a_local_name_is_answered(host):
    assert admin_refusal(get("/admin", host=host), "127.0.0.1", None) is None


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:9100", "10.0.0.1:9100", "", "[2001:db8::1]:80"]
)
def test_without_a_token_a_request_for_another_name_is_refused_dns_rebinding(host):
    refusal = admin_refusal(get("/admin", host=host), "127.0.0.1", None)
    assert refusal is not None and refusal[0] == 403
    assert "localhost" in refusal[1]


def test_with_a_token_any_host_name_will_do():
    assert (
        admin_refusal(get(f"/admin?token={TOKEN}", host="ucc.example"), "10.0.0.5", TOKEN) is None
    )


def test_a_scoped_loopback_address_is_loopback():
    assert is_loopback("::1%lo")


@pytest.mark.parametrize(
    ("request_", "allowed"),
    [
        (get("/admin", Authorization=f"Bearer {TOKEN}"), True),
        (get("/admin", Authorization=f"bearer   {TOKEN}"), True),
        (get(f"/admin/events?token={TOKEN}"), True),
        (get(f"/admin?x=1&token={TOKEN}"), True),
        (get("/admin"), False),
        (get("/admin", Authorization="Bearer wrong-token-0123456"), False),
        (get("/admin", Authorization=f"Basic {TOKEN}"), False),
        (get(f"/admin?token={TOKEN}x"), False),
        (get("/admin?token="), False),
    ],
)
def test_with_a_token_it_is_required_from_every_peer(request_, allowed):
    for peer in ("127.0.0.1", "10.0.0.5"):
        refusal = admin_refusal(request_, peer, TOKEN)
        assert (refusal is None) is allowed
        if not allowed:
            assert refusal is not None and refusal[0] == 401


@pytest.mark.parametrize(
    "token", ["short", "x" * 15, "has space in it 012345", "é" * 20, "a/b" * 8]
)
def test_weak_or_unsafe_admin_tokens_are_refused_with_a_reason(token):
    with pytest.raises(ValueError, match="--admin-token"):
        check_admin_token(token)


def test_a_good_admin_token_passes():
    assert check_admin_token(TOKEN) == TOKEN


# -- the view --------------------------------------------------------------------------------


def snapshot(frames: int, commands: int, routed: int, **extra: Any) -> dict[str, Any]:
    return {
        "websocket": "ws://127.0.0.1:8765",
        "uptime": 12.5,
        "started_at": 1000.0,
        "shards": [
            {"index": 0, "state": "up", "pid": 10, "epoch": 1, "connections": 3, "users": 2},
            {"index": 1, "state": "down", "pid": 11, "epoch": 2, "connections": 0, "users": 0},
        ],
        "channels": 4,
        "totals": {"frames_delivered": frames, "bytes_sent": frames * 10},
        "commands": {"results": [["broadcast_to_channel", "ok", commands], ["status", "ok", 1]]},
        "acceptor": {"routed": routed},
        "restarts": 1,
        "restart_log": [{"shard": 1, "epoch": 2, "pid": 11, "at": 5.0, "cause": "SIGKILL"}],
        "largest": [[7, 3]],
        "redis": None,
        **extra,
    }


def test_the_view_has_totals_shards_and_rates_per_second():
    view = AdminView()
    first = view.update(snapshot(100, 10, 3), now=50.0)
    assert first["rates"] == dict.fromkeys(
        ("frames_delivered", "bytes_sent", "commands", "connects"), 0.0
    )
    second = view.update(snapshot(300, 30, 7), now=52.0)
    assert second["rates"] == {
        "frames_delivered": 100.0,
        "bytes_sent": 1000.0,
        "commands": 10.0,
        "connects": 2.0,
    }
    assert second["totals"] == {
        "connections": 3,
        "users": 2,
        "channels": 4,
        "frames_delivered": 300,
        "bytes_sent": 3000,
        "commands": 31,
        "connects": 7,
    }
    assert [row["state"] for row in second["shards"]] == ["up", "down"]
    assert second["ready"] == ["shard 1 is down"]
    assert second["host"] == {
        "websocket": "ws://127.0.0.1:8765",
        "uptime": 12.5,
        "started_at": 1000.0,
    }
    assert second["largest"] == [[7, 3]]
    assert second["restart_log"][0]["cause"] == "SIGKILL"
    json.dumps(second)  # it goes to the page as JSON


def test_a_smaller_total_gives_a_zero_rate_not_a_negative_one():
    view = AdminView()
    view.update(snapshot(100, 10, 3), now=1.0)
    assert view.update(snapshot(50, 10, 3), now=2.0)["rates"]["frames_delivered"] == 0.0


def test_no_answer_is_shown_as_such():
    view = AdminView()
    shown = view.update(None, now=1.0)
    assert shown["answered"] is False
    assert shown["ready"] == ["the router did not answer"]


def test_an_event_is_one_data_line():
    event = sse_event({"text": "two\nlines", "n": 1})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert event.count(b"\n") == 2
    assert json.loads(event[len(b"data: ") :]) == {"text": "two\nlines", "n": 1}


# -- the feed --------------------------------------------------------------------------------


class Source:
    """The host's numbers as the supervisor would give them, counting the polls."""

    def __init__(self) -> None:
        self.polls = 0

    async def __call__(self) -> dict[str, Any]:
        self.polls += 1
        return snapshot(self.polls * 10, self.polls, self.polls)


def test_one_poll_per_interval_feeds_every_open_stream():
    async def scenario() -> None:
        source = Source()
        feed = AdminFeed(source, interval=0.01)
        queues = [feed.open() for _ in range(3)]
        assert all(q is not None for q in queues)
        events = [await asyncio.wait_for(q.get(), 5) for q in queues if q is not None]
        assert len(set(events)) == 1  # the same event for every page
        assert source.polls == 1
        for queue in queues:
            assert queue is not None
            feed.close(queue)
        await asyncio.wait_for(feed._task, 5)  # no page open: the polls stop
        feed.stop()

    asyncio.run(scenario())


def test_beyond_max_streams_a_page_is_refused_and_counted():
    async def scenario() -> None:
        feed = AdminFeed(Source(), interval=60)
        opened = [feed.open() for _ in range(MAX_STREAMS)]
        assert None not in opened
        assert feed.open() is None
        assert feed.counters["streams_refused"] == 1
        feed.stop()

    asyncio.run(scenario())


def test_a_page_that_does_not_read_is_dropped_alone():
    async def scenario() -> None:
        feed = AdminFeed(Source(), interval=0.001)
        slow, reader = feed.open(), feed.open()
        assert slow is not None and reader is not None
        # the reader reads; the slow page never does: once its queue is full it is dropped
        for _ in range(STREAM_QUEUE * 4):
            assert await asyncio.wait_for(reader.get(), 5)
        assert slow not in feed.streams
        assert feed.counters["streams_dropped"] == 1
        drained = [slow.get_nowait() for _ in range(slow.qsize())]
        assert drained[-1] == b""  # its writer ends the response
        feed.stop()
        assert await asyncio.wait_for(reader.get(), 5) is not None

    asyncio.run(scenario())


def test_the_routes_refuse_before_opening_a_stream():
    async def scenario() -> None:
        routes = AdminRoutes(Source(), TOKEN)
        refused = routes.route(get("/admin/events"), "127.0.0.1")
        assert isinstance(refused, bytes) and refused.startswith(b"HTTP/1.1 401 ")
        assert not routes.feed.streams
        page = routes.route(get(f"/admin?token={TOKEN}"), "10.1.2.3")
        assert isinstance(page, bytes) and page.startswith(b"HTTP/1.1 200 ")
        assert b"text/html" in page.split(b"\r\n\r\n", 1)[0]
        client = routes.route(get("/ucc.js"), "10.1.2.3")  # public, without a token
        assert isinstance(client, bytes)
        head = client.split(b"\r\n\r\n", 1)[0]
        assert b"200 OK" in head and b"Access-Control-Allow-Origin: *" in head
        assert b"text/javascript" in head
        routes.close()

    asyncio.run(scenario())


# -- the router's side -------------------------------------------------------------------------


def test_a_status_query_asks_for_the_largest_channels_only_when_wanted():
    assert shardwire.encode_query(shardwire.QueryStatus()) == {"op": "status"}
    assert shardwire.encode_query(shardwire.QueryStatus(10)) == {"op": "status", "top": 10}
    back = shardwire.decode_query(json.dumps({"op": "status", "top": 10**9}).encode())
    assert back == shardwire.QueryStatus(shardwire.MAX_TOP)


def test_the_cache_gives_its_largest_channels_largest_first():
    cache = UserConnectionCache()
    conn = 0
    for channel, users in ((1, 3), (2, 5), (3, 1)):
        for user in range(users):
            conn += 1
            cache.connect(ConnId(f"c{conn}"), UserId(100 + user), [ChannelId(channel)], 0.0)
    assert cache.largest_channels(2) == [[2, 5], [1, 3]]
    assert cache.largest_channels(10) == [[2, 5], [1, 3], [3, 1]]


def test_a_shard_with_too_many_channels_does_not_look(monkeypatch):
    monkeypatch.setattr("actors.cache.LARGEST_SCAN_MAX", 2)
    cache = UserConnectionCache()
    cache.connect(ConnId("a"), UserId(1), [ChannelId(1), ChannelId(2), ChannelId(3)], 0.0)
    assert cache.largest_channels(10) is None


def test_the_host_largest_channels_add_up_each_shard_users():
    answers = [{"largest": [[1, 5], [2, 4]]}, {"largest": [[2, 3], [3, 1]]}, {}]
    assert largest_channels(answers, 2) == [[2, 7], [1, 5]]
    assert largest_channels(answers, 10) == [[2, 7], [1, 5], [3, 1]]


def test_metrics_with_top_carry_the_largest_channels_and_the_restarts():
    core = RouterCore(2)
    start(core, 0)
    start(core, 1)
    core.shard_down(1, 1, 1.0, cause="killed by SIGKILL")
    start(core, 1, epoch=2, now=1.0)
    got: list[dict[str, Any]] = []
    core.metrics(2.0, got.append, top=3)
    queries = take_queries(core)
    assert all(body == {"op": "status", "top": 3} for _qid, body in queries.values())
    for index, (qid, _body) in queries.items():
        base = {"connections": 1, "users": 1, "channels": 1}
        answer(core, index, core.slots[index].epoch, qid, {**base, "largest": [[9, index + 1]]})
    (result,) = got
    assert result["largest"] == [[9, 3]]
    assert result["largest_missing"] == []
    assert "largest" not in result["shards"][0]  # not in the shard rows
    (restart,) = result["restart_log"]
    assert restart["shard"] == 1 and restart["epoch"] == 2
    assert restart["cause"] == "killed by SIGKILL"
    assert result["uptime"] >= 0 and "started_at" in result
    # a shard with too many channels does not look: it is named, the others still count
    skipped: list[dict[str, Any]] = []
    core.metrics(2.5, skipped.append, top=3)
    for index, (qid, _body) in take_queries(core).items():
        body = {"connections": 1, "users": 1, "channels": 1, "largest": [[9, 1]]}
        if index == 0:
            body = {**body, "largest": [], "largest_skipped": True}
        answer(core, index, core.slots[index].epoch, qid, body)
    assert skipped[0]["largest"] == [[9, 1]]
    assert skipped[0]["largest_missing"] == [0]
    plain: list[dict[str, Any]] = []
    core.metrics(3.0, plain.append)
    assert all(body == {"op": "status"} for _qid, body in take_queries(core).values())
