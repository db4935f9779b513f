"""Nothing lost across a reconnect, on one host (issue 11): channel offsets, resume (after a
blip, under a live stream, after a shard crash, after a restart), the history command and its
memory bound, and critical messages with acknowledgement, retry and expiry."""

from __future__ import annotations

import asyncio

from shards.client import UccError
from shards.testing import TIME_FACTOR, Host, connect_peer, wait_until_async
from shards.testing.peer import Peer, reconnect_peer
from shards.testing.stream import BroadcastStream

CHANNEL = 3


def exactly_once(record: list[int], first: int, last: int) -> None:
    """Every offset from ``first`` to ``last`` arrived, none twice. (In order too, unless a live
    message reached the connection before its resume did: then what came before it is
    back-filled after it; see docs/protocol.md.)"""
    kept = [o for o in record if first <= o <= last]
    assert len(kept) == len(set(kept)), sorted(o for o in set(kept) if kept.count(o) > 1)
    assert sorted(kept) == list(range(first, last + 1))


async def wait_for_offset(peer: Peer, channel: int, offset: int, timeout: float = 15.0) -> None:
    await peer.wait_for(lambda _f: peer.position(channel)[0] >= offset, timeout)


def test_frames_carry_offsets_and_history_answers(ucc_host):
    host: Host = ucc_host(shards=2)

    async def scenario() -> None:
        client = host.aio.client()
        peer = await connect_peer(host, 1, [CHANNEL])
        replies = [await client.broadcast_to_channel(CHANNEL, {"n": n}) for n in range(3)]
        assert [r["offset"] for r in replies] == [1, 2, 3]
        epoch = replies[0]["epoch"]
        await wait_for_offset(peer, CHANNEL, 3)
        assert peer.channel_messages(CHANNEL) == [
            {
                "type": "message",
                "channel": CHANNEL,
                "offset": n + 1,
                "epoch": epoch,
                "data": {"n": n},
            }
            for n in range(3)
        ]
        history = await client.history(CHANNEL, since=1, limit=10)
        assert history["epoch"] == epoch and history["offset"] == 3
        assert history["messages"] == [
            {"offset": 2, "data": {"n": 1}},
            {"offset": 3, "data": {"n": 2}},
        ]
        empty = await client.history(CHANNEL + 1)
        assert empty["messages"] == [] and empty["offset"] == 0 and empty["epoch"]
        await peer.close()

    asyncio.run(scenario())


def test_history_size_zero_gives_todays_frames(ucc_host):
    host: Host = ucc_host(shards=1, args=("--history-size", "0"))

    async def scenario() -> None:
        client = host.aio.client()
        peer = await connect_peer(host, 1, [CHANNEL])
        reply = await client.broadcast_to_channel(CHANNEL, "x")
        assert "offset" not in reply
        await peer.wait_for(lambda _f: len(peer.channel_messages(CHANNEL)) == 1)
        assert peer.channel_messages(CHANNEL) == [
            {"type": "message", "channel": CHANNEL, "data": "x"}
        ]
        try:
            await client.history(CHANNEL)
        except UccError as exc:
            assert exc.code == "history_disabled"
        else:
            raise AssertionError("history answered with --history-size 0")
        await peer.close()

    asyncio.run(scenario())


def test_a_reconnect_recovers_1000_messages_in_order_none_twice(ucc_host):
    host: Host = ucc_host(shards=2, args=("--history-size", "2000"))

    async def scenario() -> None:
        client = host.aio.client()
        peer = await connect_peer(host, 7, [CHANNEL])
        first = await client.broadcast_to_channel(CHANNEL, "before")
        await wait_for_offset(peer, CHANNEL, first["offset"])
        await peer.close()
        for n in range(1000):  # while the client is away
            await client.broadcast_to_channel(CHANNEL, {"n": n})
        again = await reconnect_peer(host, peer)
        resumed = again.resumed_of(CHANNEL)
        assert resumed == [
            {
                "type": "resumed",
                "channel": CHANNEL,
                "offset": 1001,
                "epoch": first["epoch"],
                "recovered": True,
            }
        ]
        got = again.channel_messages(CHANNEL)
        assert [m["offset"] for m in got] == list(range(2, 1002))
        assert [m["data"] for m in got] == [{"n": n} for n in range(1000)]
        # the resumed frame comes after the replay, and live delivery follows with no gap
        after = await client.broadcast_to_channel(CHANNEL, "live")
        await wait_for_offset(again, CHANNEL, after["offset"])
        assert again.offsets(CHANNEL) == list(range(2, 1003))
        await again.close()

    asyncio.run(scenario())


def test_reconnects_under_a_live_stream_lose_nothing_and_repeat_nothing(ucc_host):
    """A client that drops and comes back four times while a backend streams to its channel:
    across its connections, it gets every offset once."""
    host: Host = ucc_host(shards=2, args=("--history-size", "5000"))

    async def scenario() -> None:
        peer = await connect_peer(host, 9, [CHANNEL])
        record: list[int] = []
        with BroadcastStream(host.command, CHANNEL, limit=2000) as stream:
            await wait_until_async(lambda: len(stream.offsets) > 0, 10.0)
            start = stream.offsets[0]
            for _ in range(4):
                await wait_for_offset(peer, CHANNEL, start)
                old, peer = peer, await reconnect_peer(host, peer)
                record += old.offsets(CHANNEL)  # closed by now: all it ever got
                mark = len(stream.offsets)
                await wait_until_async(lambda m=mark: len(stream.offsets) > m + 50, 10.0)
        assert not stream.errors, stream.errors
        await wait_for_offset(peer, CHANNEL, stream.offsets[-1])
        record += peer.offsets(CHANNEL)
        await peer.close()
        exactly_once(record, start, stream.offsets[-1])
        assert all(r["recovered"] for r in peer.resumed_of(CHANNEL))

    asyncio.run(scenario())


def test_resume_after_the_clients_shard_is_killed(ucc_host):
    host: Host = ucc_host(shards=2, args=("--history-size", "5000"))
    user = 11

    async def scenario() -> None:
        peer = await connect_peer(host, user, [CHANNEL])
        record: list[int] = []
        with BroadcastStream(host.command, CHANNEL, limit=3000) as stream:
            await wait_until_async(lambda: len(stream.offsets) > 20, 10.0)
            start = stream.offsets[0]
            await wait_for_offset(peer, CHANNEL, stream.offsets[-1])
            old = host.kill_shard(host.shard_of(user))
            await asyncio.wait_for(peer.closed.wait(), 10 * TIME_FACTOR)
            record += peer.offsets(CHANNEL)
            await asyncio.to_thread(host.wait_shard_replaced, host.shard_of(user), old)
            mark = len(stream.offsets)
            await wait_until_async(lambda: len(stream.offsets) > mark + 50, 10.0)
            peer = await reconnect_peer(host, peer)
            assert peer.resumed_of(CHANNEL)[-1]["recovered"] is True
        assert not stream.errors, stream.errors
        await wait_for_offset(peer, CHANNEL, stream.offsets[-1])
        record += peer.offsets(CHANNEL)
        await peer.close()
        exactly_once(record, start, stream.offsets[-1])

    asyncio.run(scenario())


def test_a_restart_without_redis_changes_the_epoch(ucc_host):
    first = ucc_host(shards=1)

    async def before() -> Peer:
        client = first.aio.client()
        peer = await connect_peer(first, 1, [CHANNEL])
        reply = await client.broadcast_to_channel(CHANNEL, "a")
        await wait_for_offset(peer, CHANNEL, reply["offset"])
        await peer.close()
        return peer

    peer = asyncio.run(before())
    old_epoch = peer.position(CHANNEL)[1]
    first.stop()
    second = ucc_host(shards=1, secret=first.secret)

    async def after() -> None:
        client = second.aio.client()
        await client.broadcast_to_channel(CHANNEL, "b")
        again = await reconnect_peer(second, peer)
        (resumed,) = again.resumed_of(CHANNEL)
        assert resumed["recovered"] is False and resumed["epoch"] != old_epoch
        assert resumed["offset"] == 1
        assert again.channel_messages(CHANNEL) == []  # not replayed: the client refetches
        await again.close()

    asyncio.run(after())


def test_the_history_memory_bound_evicts_the_oldest_channels(ucc_host):
    host: Host = ucc_host(shards=1, args=("--history-memory", "20000"))

    async def scenario() -> None:
        client = host.aio.client()
        peer = await connect_peer(host, 1, [1])
        first = await client.broadcast_to_channel(1, "x" * 500)
        await wait_for_offset(peer, 1, 1)
        await peer.close()
        for channel in range(2, 60):
            await client.broadcast_to_channel(channel, "y" * 500)
        stats = (await client.request("router_stats"))["history"]
        assert stats["evicted"] > 0 and stats["bytes"] <= 20000
        again = await reconnect_peer(host, peer)
        (resumed,) = again.resumed_of(1)
        assert resumed["recovered"] is False and resumed["epoch"] != first["epoch"]
        await again.close()

    asyncio.run(scenario())


def test_bad_resume_frames_are_refused_and_unknown_acks_counted(ucc_host):
    host: Host = ucc_host(shards=1)

    async def scenario() -> None:
        peer = await connect_peer(host, 1, [CHANNEL])
        for bad in (
            {"type": "resume", "channel": CHANNEL, "offset": -1, "epoch": "e"},
            {"type": "resume", "channel": CHANNEL, "offset": "1", "epoch": "e"},
            {"type": "resume", "channel": CHANNEL, "offset": 1, "epoch": 5},
            {"type": "ack", "id": 5},
        ):
            await peer.send(bad)
        await peer.wait_for(lambda f: sum(x.get("code") == "bad_frame" for x in f) == 4)
        await peer.send({"type": "resume", "channel": 99, "offset": 0, "epoch": ""})
        await peer.wait_for(lambda f: any(x.get("code") == "forbidden" for x in f))
        await peer.ack("never-sent")
        client = host.aio.client()

        async def counted() -> bool:
            stats = await client.request("router_stats")
            return bool(stats["critical"]["unknown_acks"] == 1)

        await wait_until_async(counted, 10.0)
        assert not peer.closed.is_set()
        await peer.close()

    asyncio.run(scenario())


# -- critical messages ----------------------------------------------------------------------


def test_a_critical_message_waits_for_an_offline_user_and_not_again_after_ack(ucc_host):
    host: Host = ucc_host(shards=2)

    async def scenario() -> None:
        client = host.aio.client()
        replies = [await client.broadcast_to_user(5, {"k": n}, critical=True) for n in range(3)]
        ids = [r["message_id"] for r in replies]
        assert len(set(ids)) == 3 and all(r["shards"] == 1 for r in replies)
        peer = await connect_peer(host, 5)
        await peer.wait_for(lambda _f: len(peer.critical) == 3)
        kinds = [f["type"] for f in peer.frames]
        assert kinds[0] == "hello"  # right after hello, in order
        assert peer.critical == [
            {"type": "message", "id": i, "data": {"k": n}} for n, i in enumerate(ids)
        ]
        # acknowledged (Peer acks by itself): a new connection gets none of them again. A direct
        # marker sent after the acks reaches it after whatever would have come before it.
        await peer.close()

        async def all_acked() -> bool:
            stats = await client.request("router_stats")
            return bool(stats["critical"]["acked"] == 3)

        await wait_until_async(all_acked, 10.0)
        again = await connect_peer(host, 5)
        await client.broadcast_to_user(5, "marker")
        await again.wait_for(lambda f: any(x.get("data") == "marker" for x in f))
        assert again.critical == []
        await again.close()

    asyncio.run(scenario())


def test_an_unacknowledged_critical_message_is_sent_again_then_kept(ucc_host):
    host: Host = ucc_host(shards=1, args=("--ack-timeout", "0.3", "--ack-retries", "2"))

    async def scenario() -> None:
        client = host.aio.client()
        peer = await connect_peer(host, 6, auto_ack=False)
        reply = await client.broadcast_to_user(6, "important", critical=True)
        await peer.wait_for(lambda _f: len(peer.critical) == 3, 10.0)  # sent, then 2 retries
        assert {m["id"] for m in peer.critical} == {reply["message_id"]}

        async def gave_up() -> bool:
            rows = (await client.status())["shards"]
            return bool(rows[0]["critical_gave_up"] == 1)

        await wait_until_async(gave_up, 10.0)
        assert len(peer.critical) == 3  # no more than the retries
        # still kept: the next connection gets it, and acks it
        other = await connect_peer(host, 6)
        await other.wait_for(lambda _f: len(other.critical) == 1)
        await peer.close()
        await other.close()

    asyncio.run(scenario())


def test_a_critical_message_expires_after_its_ttl(ucc_host):
    host: Host = ucc_host(shards=1)

    async def scenario() -> None:
        client = host.aio.client()
        await client.broadcast_to_user(4, "short", critical=True, ttl=0.5)

        async def expired() -> bool:
            stats = await client.request("router_stats")
            return bool(stats["critical"]["expired"] == 1)

        await wait_until_async(expired, 10.0)
        peer = await connect_peer(host, 4)
        await client.broadcast_to_user(4, "marker")
        await peer.wait_for(lambda f: any(x.get("data") == "marker" for x in f))
        assert peer.critical == []
        await peer.close()

    asyncio.run(scenario())


def test_critical_messages_survive_a_shard_crash_and_the_per_user_bound_refuses(ucc_host):
    host: Host = ucc_host(shards=2, args=("--critical-per-user", "2"))
    user = 12

    async def scenario() -> None:
        client = host.aio.client()
        peer = await connect_peer(host, user, auto_ack=False)
        await client.broadcast_to_user(user, 1, critical=True)
        await client.broadcast_to_user(user, 2, critical=True)
        try:
            await client.broadcast_to_users([user + 1, user], 3, critical=True)
        except UccError as exc:
            assert exc.code == "limit"
        else:
            raise AssertionError("the per-user bound did not refuse")
        await peer.wait_for(lambda _f: len(peer.critical) == 2)
        old = host.kill_shard(host.shard_of(user))
        await asyncio.wait_for(peer.closed.wait(), 10 * TIME_FACTOR)
        await asyncio.to_thread(host.wait_shard_replaced, host.shard_of(user), old)
        again = await connect_peer(host, user)
        await again.wait_for(lambda _f: len(again.critical) == 2)
        assert [m["data"] for m in again.critical] == [1, 2]
        # user + 1 got nothing kept: the refused command stored nothing
        other = await connect_peer(host, user + 1)
        await client.broadcast_to_user(user + 1, "marker")
        await other.wait_for(lambda f: any(x.get("data") == "marker" for x in f))
        assert other.critical == []
        await again.close()
        await other.close()

    asyncio.run(scenario())
