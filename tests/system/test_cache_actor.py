"""The CacheActor on a real event loop with the router's real end of the shards' Unix socket
(:class:`actors.shardlink.ShardLinks`, polled by the test; no processes)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from actors.cache_actor import (
    WORK_PER_TURN,
    Activity,
    CacheActor,
    Closed,
    Deliver,
    Incident,
    LoopAction,
    Opened,
    Refused,
    Registered,
    Subscribe,
    Unsubscribe,
)
from actors.ids import ChannelId, ConnId, UserId
from actors.shardlink import Bounds, ShardLinks
from actors.wire import frames, shardwire


class FakeShard:
    """What the actor posts to its shard, and whether it asked the shard to exit."""

    def __init__(self) -> None:
        self.actions: list[LoopAction] = []
        self.posts: list[list[LoopAction]] = []  # each post: one turn of the loop's work
        self.failed = asyncio.Event()

    def post(self, actions: list[LoopAction]) -> None:
        self.actions.extend(actions)
        self.posts.append(actions)

    def fail(self) -> None:
        self.failed.set()


class Unwatched:
    """The test polls the links itself: no poller to tell."""

    def watch_fd(self, fd: int, writable: bool = False) -> None:
        pass

    def unwatch_fd(self, fd: int) -> None:
        pass


class FakeRouter:
    """The router's end of the shards' socket, read without waiting: messages as the router
    sees them, ``[identity, *frames]``."""

    def __init__(self, path: str) -> None:
        self.links = ShardLinks(path, Bounds(100_000, 64 << 20), Unwatched())
        self.received: list[list[bytes]] = []

    def poll(self) -> list[bytes] | None:
        """The next message a shard sent, or None if none is there yet."""
        if not self.received:
            self.links.readable(self.links.listener.fileno())  # accept any new shard
            for fd, peer in list(self.links.peers.items()):
                if peer.outbox:  # what the kernel did not take at once
                    self.links.writable(fd)
            self.received += [[identity, *frames] for identity, frames in self.links.read_all()]
        return self.received.pop(0) if self.received else None

    def send_multipart(self, message: list[bytes]) -> None:
        assert self.links.send(message[0], message[1:]), "the shard is not connected"

    def close(self) -> None:
        self.links.close()


async def receive(router: FakeRouter, kind: bytes, timeout: float = 5.0) -> list[bytes]:
    """The next message of ``kind`` from the shard, polling with a deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        msg = router.poll()
        if msg is None:
            await asyncio.sleep(0.005)
            continue
        if msg[1] == kind:
            return msg
    raise AssertionError(f"no {kind!r} from the shard within {timeout} s")


async def started(sock: FakeRouter, endpoint: str) -> tuple[FakeShard, Any, bytes]:
    """A CacheActor on this loop, connected to ``sock``, once its hello has arrived."""
    shard = FakeShard()
    ref = CacheActor.start(asyncio.get_running_loop(), 0, 1, endpoint, shard.post, 60.0, shard.fail)
    await receive(sock, shardwire.HELLO)
    return shard, ref, shardwire.identity(0, 1)


@pytest.fixture
def router(tmp_path):
    endpoint = f"{tmp_path}/router.sock"
    sock = FakeRouter(endpoint)
    try:
        yield sock, endpoint
    finally:
        sock.close()


def test_deliveries_queries_and_a_fatal_bug(router):
    sock, endpoint = router

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        shard = FakeShard()
        ref = CacheActor.start(loop, 0, 1, endpoint, shard.post, 60.0, shard.fail)
        identity = shardwire.identity(0, 1)
        hello = await receive(sock, shardwire.HELLO)
        assert hello[0] == identity
        ref.tell(Opened(ConnId(1), UserId(7), (ChannelId(3),), 0.0))
        delta = await receive(sock, shardwire.DELTA)
        assert shardwire.unpack_ids(delta[2]) == [3]  # the shard's first member of channel 3
        frame = frames.channel_message(3, b'"hi"')
        sock.send_multipart([identity, *shardwire.channel_delivery(3, frame)])
        query = shardwire.query(5, shardwire.QueryOnlineIn(3))
        sock.send_multipart([identity, *query])
        result = await receive(sock, shardwire.RESULT)
        assert json.loads(result[3]) == {"users": [7]}
        assert Deliver(frame, (ConnId(1),)) in shard.actions

        # a query no router sends: a bug; the actor fails, stops beating, asks to exit
        explode = [shardwire.QUERY, shardwire.pack_id(6), b'{"op": "explode"}']
        sock.send_multipart([identity, *explode])
        await asyncio.wait_for(shard.failed.wait(), 5)
        assert not ref.is_alive()
        # what it sent before failing is in flight for a moment; after that, silence (a
        # negative check needs a window: four heartbeat intervals)
        with pytest.raises(AssertionError):
            await receive(sock, b"nothing", timeout=0.3)  # drains what was in flight
        with pytest.raises(AssertionError):  # no heartbeat any more: the router will notice
            await receive(sock, shardwire.PULSE, timeout=1.0)

    asyncio.run(scenario())


def test_the_router_leaving_makes_the_shard_exit_without_a_failure(router, caplog):
    sock, endpoint = router

    async def scenario() -> None:
        shard, ref, _identity = await started(sock, endpoint)
        sock.close()  # the router's host stopped, or died
        await asyncio.wait_for(shard.failed.wait(), 5)  # the shard is asked to exit
        assert not ref.is_alive()

    with caplog.at_level("WARNING"):
        asyncio.run(scenario())
    assert "the router closed the shard's socket: the shard exits" in caplog.text
    assert "Unhandled exception" not in caplog.text  # an orderly end, not a bug's traceback


def test_a_failure_in_on_start_takes_the_shard_down(router):
    _sock, endpoint = router

    class Unstartable(CacheActor):
        def on_start(self) -> None:
            raise RuntimeError("cannot start")  # before the heartbeat timer exists

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        shard = FakeShard()
        ref = Unstartable.start(loop, 0, 1, endpoint, shard.post, 60.0, shard.fail)
        await asyncio.wait_for(shard.failed.wait(), 5)
        assert not ref.is_alive()

    asyncio.run(scenario())


def test_credit_counts_what_the_shard_consumed(router):
    sock, endpoint = router

    async def scenario() -> None:
        _shard, ref, identity = await started(sock, endpoint)
        messages = [shardwire.channel_delivery(3, frames.channel_message(3, b"1"))] * 100
        size = sum(shardwire.size(m[1], m[2]) for m in messages)
        sock.send_multipart([identity, shardwire.PACKED, shardwire.pack_messages(messages)])
        # past CREDIT_MESSAGES, credit goes back at once (and with every heartbeat anyway)
        reported = [0, 0]
        deadline = asyncio.get_running_loop().time() + 5.0
        while reported != [100, size]:
            assert asyncio.get_running_loop().time() < deadline, reported
            beat = await receive(sock, shardwire.PULSE, timeout=2.0)
            reported = shardwire.unpack_ids(beat[2])
            assert reported in ([0, 0], [100, size]), reported
        ref.stop(block=False)

    asyncio.run(scenario())


def test_hello_waits_until_the_router_has_indexed_the_membership(router):
    sock, endpoint = router

    async def scenario() -> None:
        shard, ref, identity = await started(sock, endpoint)
        ref.tell(Opened(ConnId(1), UserId(7), (ChannelId(3),), 0.0))
        delta = await receive(sock, shardwire.DELTA)
        seq = shardwire.unpack_id(delta[4])
        # a query round trip proves the actor has handled everything before it
        sock.send_multipart([identity, *shardwire.query(1, shardwire.QueryOnline())])
        await receive(sock, shardwire.RESULT)
        assert Registered(ConnId(1)) not in shard.actions  # the router has not confirmed yet
        sock.send_multipart([identity, *shardwire.indexed(seq)])
        sock.send_multipart([identity, *shardwire.query(2, shardwire.QueryOnline())])
        await receive(sock, shardwire.RESULT)
        assert Registered(ConnId(1)) in shard.actions
        # a second connection in a channel already indexed and confirmed: no wait
        ref.tell(Opened(ConnId(2), UserId(8), (ChannelId(3),), 0.0))
        sock.send_multipart([identity, *shardwire.query(3, shardwire.QueryOnline())])
        await receive(sock, shardwire.RESULT)
        assert Registered(ConnId(2)) in shard.actions
        ref.stop(block=False)

    asyncio.run(scenario())


async def until(condition: Any, timeout: float = 5.0) -> None:
    """Wait (polling the loop, under a deadline) until ``condition()`` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(0.005)


def test_the_channel_limit_refuses_a_client_subscribe_and_trims_a_server_side_one(router):
    sock, endpoint = router

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        shard = FakeShard()
        ref = CacheActor.start(loop, 0, 1, endpoint, shard.post, 60.0, shard.fail, max_channels=2)
        identity = shardwire.identity(0, 1)
        await receive(sock, shardwire.HELLO)
        ref.tell(Opened(ConnId(1), UserId(7), (ChannelId(3),), 0.0))
        ref.tell(Opened(ConnId(2), UserId(7), (ChannelId(4), ChannelId(5)), 0.0))

        async def ask(qid: int, query: shardwire.Query) -> dict[str, Any]:
            sock.send_multipart([identity, *shardwire.query(qid, query)])
            while True:
                result = await receive(sock, shardwire.RESULT)
                if shardwire.unpack_id(result[2]) == qid:
                    return dict(json.loads(result[3]))

        # connection 2 is full: the server-side subscribe reaches connection 1 only
        answer = await ask(1, shardwire.UserSubscription(7, 8, True))
        assert answer == {"connections": 1, "limited": 1}
        # now both are full: none takes it (the router replies error `limit`)
        assert await ask(2, shardwire.UserSubscription(7, 9, True)) == {
            "connections": 0,
            "limited": 2,
        }
        assert await ask(3, shardwire.QueryOnlineIn(9)) == {"users": []}
        # a channel a connection holds already is never refused; unsubscribing knows no limit
        assert await ask(4, shardwire.UserSubscription(7, 8, True)) == {
            "connections": 1,
            "limited": 1,
        }
        assert await ask(5, shardwire.UserSubscription(7, 8, False)) == {"connections": 2}

        # a client's subscribe beyond the limit: an error frame for it, and nothing changes
        ref.tell(Subscribe(ConnId(2), ChannelId(6)))
        await until(lambda: any(isinstance(a, Refused) for a in shard.actions))
        refused = next(a for a in shard.actions if isinstance(a, Refused))
        assert (refused.conn, refused.code) == (2, "limit")
        assert "at most 2 channels" in refused.message
        status = await ask(6, shardwire.QueryStatus())
        assert status["refused_channel_limit"] == 1
        assert status["limited_server_subscribe"] == 4
        assert status["channels"] == 3  # 3, 4, 5: neither 6 nor 9
        ref.stop(block=False)
        await asyncio.sleep(0)  # its on_stop runs on this loop

    asyncio.run(scenario())


def test_a_packed_round_of_deliveries_is_handled_a_bounded_amount_per_turn(router):
    sock, endpoint = router

    async def scenario() -> None:
        shard, ref, identity = await started(sock, endpoint)
        for conn in range(1, 31):
            ref.tell(Opened(ConnId(conn), UserId(conn), (ChannelId(3),), 0.0))
        await receive(sock, shardwire.DELTA)
        # one PACKED frame: a whole router round, 1,024 deliveries to 30 recipients each
        frame = frames.channel_message(3, b"1")
        packed = shardwire.pack_messages([shardwire.channel_delivery(3, frame)] * 1024)
        shard.posts.clear()
        sock.send_multipart([identity, shardwire.PACKED, packed])
        deadline = asyncio.get_running_loop().time() + 10
        while sum(len(a.conns) for a in shard.actions if isinstance(a, Deliver)) < 30 * 1024:
            assert asyncio.get_running_loop().time() < deadline, "not all delivered"
            await asyncio.sleep(0.01)  # polling what the actor posted, with a deadline
        per_turn = [sum(len(a.conns) for a in p if isinstance(a, Deliver)) for p in shard.posts]
        assert len([n for n in per_turn if n]) >= 2  # split over several turns
        assert max(per_turn) <= WORK_PER_TURN + 30  # one message past the cap at most
        ref.stop(block=False)

    asyncio.run(scenario())


# -- issue 12: events, connection records, join/leave ------------------------------------------


class Spied(CacheActor):
    """A CacheActor that lets the test look at it (from the loop's own thread, between turns)."""

    instances: list[CacheActor] = []

    def on_start(self) -> None:
        Spied.instances.append(self)
        super().on_start()


class Router:
    """The fake router's side for events: what the shard sends, by kind, kept in order
    (a query's answer comes after the events it reflects: they must not be skipped)."""

    def __init__(self, sock: FakeRouter, identity: bytes) -> None:
        self.sock, self.identity = sock, identity
        self.kept: list[list[bytes]] = []

    async def next(self, kind: bytes, timeout: float = 5.0) -> list[bytes]:
        for position, msg in enumerate(self.kept):
            if msg[1] == kind:
                return self.kept.pop(position)
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            msg = self.sock.poll()
            if msg is None:
                await asyncio.sleep(0.005)
                continue
            if msg[1] == kind:
                return msg
            if msg[1] in (shardwire.EVENTS, shardwire.JOIN_LEAVE, shardwire.RESULT):
                self.kept.append(msg)
        raise AssertionError(f"no {kind!r} from the shard within {timeout} s")

    async def events(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The next ``count`` events, from as many ``E`` messages as it takes."""
        out: list[dict[str, Any]] = []
        while len(out) < count:
            out += json.loads((await self.next(shardwire.EVENTS, timeout))[2])
        assert len(out) == count, out
        return out

    async def ask(self, qid: int, query: shardwire.Query) -> Any:
        self.sock.send_multipart([self.identity, *shardwire.query(qid, query)])
        while True:
            result = await self.next(shardwire.RESULT)
            if shardwire.unpack_id(result[2]) == qid:
                return json.loads(result[3])


def test_lifecycle_events_and_connection_records(router):
    sock, endpoint = router

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        shard = FakeShard()
        addresses = {1: "10.1.2.3:4567", 2: "10.1.2.3:4568"}
        ref = CacheActor.start(
            loop,
            0,
            1,
            endpoint,
            shard.post,
            60.0,
            shard.fail,
            events=True,
            remote_of=lambda conn: addresses.get(conn, ""),
        )
        identity = shardwire.identity(0, 1)
        await receive(sock, shardwire.HELLO)
        fake = Router(sock, identity)
        before = time.time()
        now = time.monotonic()
        ref.tell(Opened(ConnId(1), UserId(7), (ChannelId(3),), now))
        ref.tell(Subscribe(ConnId(1), ChannelId(4)))  # before hello: in connect's channels
        delta = await fake.next(shardwire.DELTA)
        # not announced yet: no event, and not in the records
        assert await fake.ask(1, shardwire.QueryConnections()) == {"connections": []}
        sock.send_multipart([identity, *shardwire.indexed(shardwire.unpack_id(delta[4]))])
        online, connect = await fake.events(2)
        assert online == {"type": "online", "ts": online["ts"], "user": 7}
        assert before <= online["ts"] <= time.time()
        assert connect == {
            "type": "connect",
            "ts": connect["ts"],
            "user": 7,
            "conn": "0.1.1",
            "shard": 0,
            "channels": [3, 4],
            "remote": "10.1.2.3:4567",
        }
        ref.tell(Activity({ConnId(1): now + 2.0}, now + 2.0))
        (record,) = (await fake.ask(2, shardwire.QueryConnections()))["connections"]
        assert set(record) == {
            "conn", "user", "shard", "channels", "connected_at", "last_activity", "remote"
        }  # fmt: skip
        assert (record["conn"], record["user"], record["shard"]) == ("0.1.1", 7, 0)
        assert (record["channels"], record["remote"]) == ([3, 4], "10.1.2.3:4567")
        assert abs(record["connected_at"] - before) < 1.0
        assert abs(record["last_activity"] - record["connected_at"] - 2.0) < 0.01
        assert await fake.ask(3, shardwire.QueryUserConnections(7)) == {"connections": [record]}
        assert await fake.ask(4, shardwire.QueryUserConnections(8)) == {"connections": []}

        # after hello: each change an event, a client's and a backend's alike
        ref.tell(Unsubscribe(ConnId(1), ChannelId(3)))
        ref.tell(Unsubscribe(ConnId(1), ChannelId(99)))  # not subscribed: no change, no event
        await fake.ask(5, shardwire.UserSubscription(7, 5, True))
        (unsub, sub) = await fake.events(2)
        assert {k: v for k, v in unsub.items() if k != "ts"} == {
            "type": "unsubscribe",
            "user": 7,
            "conn": "0.1.1",
            "channel": 3,
        }
        assert (sub["type"], sub["channel"]) == ("subscribe", 5)
        # a close for cause, then the close itself
        ref.tell(Incident(ConnId(1), UserId(7), "closed_slow_consumer", "write buffer full"))
        ref.tell(Closed(ConnId(1), 4000, "slow consumer"))
        slow, gone, offline = await fake.events(3)
        assert {k: v for k, v in slow.items() if k != "ts"} == {
            "type": "slow_consumer",
            "user": 7,
            "conn": "0.1.1",
        }
        assert {k: v for k, v in gone.items() if k != "ts"} == {
            "type": "disconnect",
            "user": 7,
            "conn": "0.1.1",
            "code": 4000,
            "reason": "slow consumer",
        }
        assert {k: v for k, v in offline.items() if k != "ts"} == {"type": "offline", "user": 7}
        # a connection closed before its hello: never announced, never a disconnect
        ref.tell(Opened(ConnId(2), UserId(8), (), now))
        ref.tell(Closed(ConnId(2), 1000, ""))
        ref.tell(Incident(ConnId(3), UserId(8), "refused_per_user"))
        (limit,) = await fake.events(1)
        assert (limit["type"], limit["user"], limit["what"]) == ("limit", 8, "connections_per_user")
        ref.stop(block=False)
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_no_events_without_the_flag(router):
    sock, endpoint = router

    async def scenario() -> None:
        shard = FakeShard()
        ref = Spied.start(asyncio.get_running_loop(), 0, 1, endpoint, shard.post, 60.0, shard.fail)
        identity = shardwire.identity(0, 1)
        await receive(sock, shardwire.HELLO)
        ref.tell(Opened(ConnId(1), UserId(7), (ChannelId(3),), time.monotonic()))
        delta = await receive(sock, shardwire.DELTA)
        sock.send_multipart([identity, *shardwire.indexed(shardwire.unpack_id(delta[4]))])
        ref.tell(Closed(ConnId(1)))
        with pytest.raises(AssertionError):
            await receive(sock, shardwire.EVENTS, timeout=0.5)
        assert Spied.instances[-1].cache.journal is None  # nothing journaled either
        ref.stop(block=False)
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_join_and_leave_of_marked_channels(router):
    sock, endpoint = router

    async def scenario() -> None:
        shard = FakeShard()
        ref = Spied.start(asyncio.get_running_loop(), 0, 1, endpoint, shard.post, 60.0, shard.fail)
        identity = shardwire.identity(0, 1)
        await receive(sock, shardwire.HELLO)
        fake = Router(sock, identity)
        now = time.monotonic()
        ref.tell(Opened(ConnId(1), UserId(7), (ChannelId(3),), now))  # 3 not marked yet
        await receive(sock, shardwire.DELTA)
        sock.send_multipart([identity, *shardwire.marks([3, 4])])
        await fake.ask(1, shardwire.QueryOnline())  # the marks are in before what follows
        ref.tell(Opened(ConnId(2), UserId(7), (ChannelId(3), ChannelId(4)), now))  # 7 in 3
        ref.tell(Opened(ConnId(3), UserId(8), (ChannelId(3), ChannelId(5)), now))  # 5 unmarked
        ref.tell(Closed(ConnId(1)))  # 2 is still in 3: no leave
        ref.tell(Unsubscribe(ConnId(2), ChannelId(3)))  # now 7 has left 3
        ref.tell(Closed(ConnId(3)))
        changes: list[list[int]] = []
        while len(changes) < 4:
            changes += json.loads((await fake.next(shardwire.JOIN_LEAVE))[2])
        assert changes == [[4, 7, 1], [3, 8, 1], [3, 7, 0], [3, 8, 0]]
        sock.send_multipart([identity, *shardwire.marks([])])  # unmarked: nothing, no journal
        await fake.ask(2, shardwire.QueryOnline())
        ref.tell(Closed(ConnId(2)))
        with pytest.raises(AssertionError):
            await receive(sock, shardwire.JOIN_LEAVE, timeout=0.5)
        assert Spied.instances[-1].cache.journal is None
        ref.stop(block=False)
        await asyncio.sleep(0)

    asyncio.run(scenario())
