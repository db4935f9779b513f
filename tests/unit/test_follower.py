"""shards.events: the pure follower state (order, gaps, resync) without sockets, then the
socket half against a real ZeroMQ PUB socket with crafted events, and a real command client on
a real ZeroMQ endpoint with canned snapshots (tests/unit/canned.py)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
import zmq
from canned import CannedServer
from hypothesis import given, settings
from hypothesis import strategies as st

from shards.client import Client, CommandTimeout
from shards.events import (
    MAX_PENDING,
    EventFollower,
    EventState,
    GapCounter,
    Verdict,
    parse_event,
    view_of,
)

H = "host-a"


def ev(seq: int, kind: str, host: str = H, **fields: object) -> dict:
    return {"seq": seq, "host": host, "ts": 1000.0 + seq, "type": kind, **fields}


def connect(seq: int, conn: str, user: int, channels=(), host: str = H) -> dict:
    return ev(
        seq,
        "connect",
        host,
        user=user,
        conn=conn,
        shard=0,
        channels=list(channels),
        remote="127.0.0.1:4000",
    )


def snap(seq: int, connections=(), host: str = H, **extra: object) -> dict:
    return {"ok": True, "seq": seq, "host": host, "connections": list(connections), **extra}


def rec(conn: str, user: int, channels=()) -> dict:
    return {
        "conn": conn,
        "user": user,
        "shard": 0,
        "channels": list(channels),
        "connected_at": 1.0,
        "last_activity": 2.0,
        "remote": "127.0.0.1:1",
    }


def synced(seq: int = 0, connections=()) -> EventState:
    state = EventState()
    state.resync(snap(seq, connections))
    return state


# -- the start: a snapshot first ---------------------------------------------------------------


def test_a_new_state_needs_a_snapshot_and_holds_events_until_then():
    state = EventState()
    assert state.needs_resync
    assert state.offer(connect(4, "0.1.1", 7)) is Verdict.RESYNC
    assert state.offer(connect(5, "0.1.2", 8)) is Verdict.RESYNC
    out = state.resync(snap(4, [rec("0.1.1", 7)]))
    assert out[0] == {
        "type": "resync",
        "seq": 4,
        "host": H,
        "connections": [rec("0.1.1", 7)],
    }
    assert out[1:] == [connect(5, "0.1.2", 8)]  # seq 4 was in the snapshot: dropped
    assert not state.needs_resync
    assert (state.host, state.seq) == (H, 5)
    assert set(state.connections) == {"0.1.1", "0.1.2"}
    assert state.users == {7, 8}


def test_the_resync_item_names_missing_shards_when_there_are_some():
    state = EventState()
    assert "missing_shards" not in state.resync(snap(0, missing_shards=[]))[0]
    state.needs_resync = True
    assert state.resync(snap(0, missing_shards=[1]))[0]["missing_shards"] == [1]


@pytest.mark.parametrize(
    "bad", [{"seq": 1}, {"host": H}, {"seq": "1", "host": H}, {"seq": 1, "host": 5}]
)
def test_a_snapshot_without_host_and_seq_is_refused(bad):
    with pytest.raises(ValueError, match="snapshot"):
        EventState().resync(bad)


# -- in order: applied ------------------------------------------------------------------------


def test_connect_subscribe_unsubscribe_disconnect_build_the_connections():
    state = synced(10)
    events = [
        connect(11, "0.1.1", 7, [3, 1]),
        ev(12, "online", user=7),
        ev(13, "subscribe", user=7, conn="0.1.1", channel=2),
        ev(14, "subscribe", user=7, conn="0.1.1", channel=2),  # twice: once in the set
        ev(15, "unsubscribe", user=7, conn="0.1.1", channel=3),
        connect(16, "0.1.2", 8),
        ev(17, "slow_consumer", user=8, conn="0.1.2"),
        ev(18, "disconnect", user=8, conn="0.1.2", code=4000, reason="slow consumer"),
    ]
    assert [state.offer(e) for e in events] == [Verdict.APPLY] * len(events)
    assert state.seq == 18
    assert state.connections == {
        "0.1.1": {
            "conn": "0.1.1",
            "user": 7,
            "shard": 0,
            "channels": [1, 2],
            "connected_at": 1011.0,
            "last_activity": 1011.0,
            "remote": "127.0.0.1:4000",
        }
    }
    assert state.view() == {"0.1.1": (7, (1, 2))}
    assert state.stats["events"] == 8


def test_events_about_unknown_connections_change_nothing_but_the_seq():
    state = synced(0, [rec("0.1.1", 7, [1])])
    for event in (
        ev(1, "subscribe", user=9, conn="9.9.9", channel=1),
        ev(2, "unsubscribe", user=9, conn="9.9.9", channel=1),
        ev(3, "disconnect", user=9, conn="9.9.9", code=1000, reason=""),
        ev(4, "shard_down", shard=1, epoch=2, cause="killed"),
        ev(5, "limit", address="10.0.0.1", what="connect_rate", count=3),
    ):
        assert state.offer(event) is Verdict.APPLY
    assert state.view() == {"0.1.1": (7, (1,))}
    assert state.seq == 5


def test_snapshot_records_are_copied_with_sorted_channels():
    record = rec("0.1.1", 7, [5, 2, 5])
    state = synced(0, [record])
    assert state.connections["0.1.1"]["channels"] == [2, 5]
    state.offer(ev(1, "subscribe", user=7, conn="0.1.1", channel=9))
    assert record["channels"] == [5, 2, 5]  # the snapshot's own dict is untouched


# -- old events and gaps ------------------------------------------------------------------------


def test_an_event_at_or_below_the_last_seq_is_dropped():
    state = synced(10)
    assert state.offer(connect(9, "0.1.1", 7)) is Verdict.DROP
    assert state.offer(connect(10, "0.1.1", 7)) is Verdict.DROP
    assert state.connections == {}
    assert state.offer(connect(11, "0.1.1", 7)) is Verdict.APPLY
    assert state.offer(connect(11, "0.1.1", 7)) is Verdict.DROP
    assert state.stats["dropped"] == 3


def test_a_gap_makes_a_snapshot_due_and_holds_what_follows_in_order():
    state = synced(10)
    assert state.offer(connect(11, "0.1.1", 7)) is Verdict.APPLY
    assert state.offer(connect(14, "0.1.4", 8)) is Verdict.RESYNC
    assert state.needs_resync
    assert state.stats["gaps"] == 1
    # while it is due, everything is held (even what would have been next)
    assert state.offer(connect(15, "0.1.5", 9)) is Verdict.RESYNC
    assert state.offer(connect(16, "0.1.6", 9)) is Verdict.RESYNC
    out = state.resync(snap(14, [rec("0.1.1", 7), rec("0.1.4", 8)]))
    assert [item["type"] for item in out] == ["resync", "connect", "connect"]
    assert [item["seq"] for item in out] == [14, 15, 16]
    assert state.view() == {"0.1.1": (7, ()), "0.1.4": (8, ()), "0.1.5": (9, ()), "0.1.6": (9, ())}
    assert state.seq == 16
    assert state.stats["resyncs"] == 2


def test_a_held_event_beyond_the_snapshot_is_a_new_gap_and_the_rest_stay_held():
    state = synced(10)
    state.offer(connect(13, "0.1.3", 7))  # gap
    state.offer(connect(20, "0.1.20", 7))
    state.offer(connect(21, "0.1.21", 7))
    out = state.resync(snap(12))  # an older snapshot than 13 (a stand-in: shows the rule)
    assert [item["seq"] for item in out] == [12, 13]
    assert state.needs_resync  # 20 does not follow 13
    assert [e["seq"] for e in state.pending] == [20, 21]
    out = state.resync(snap(20))
    assert [item["seq"] for item in out] == [20, 21]
    assert not state.needs_resync


def test_pending_events_are_bounded():
    state = EventState()
    for seq in range(1, MAX_PENDING + 6):
        state.offer(connect(seq, f"0.1.{seq}", 1))
    assert len(state.pending) == MAX_PENDING
    assert state.pending[0]["seq"] == 6


# -- hosts: a restart is a new host; a foreign host is noted once --------------------------------


def test_a_host_that_restarted_under_a_new_id_is_resynced():
    state = synced(50, [rec("0.1.1", 7)])
    assert state.offer(connect(1, "0.2.1", 8, host="host-b")) is Verdict.RESYNC
    out = state.resync(snap(1, [rec("0.2.1", 8)], host="host-b"))
    assert [item["type"] for item in out] == ["resync"]
    assert (state.host, state.seq) == ("host-b", 1)
    assert state.view() == {"0.2.1": (8, ())}
    assert state.offer(connect(2, "0.2.2", 8, host="host-b")) is Verdict.APPLY
    assert state.foreign == set()


def test_events_of_a_host_the_snapshots_never_describe_are_dropped_after_one_snapshot():
    state = synced(5)
    assert state.offer(connect(100, "0.1.1", 7, host="other")) is Verdict.RESYNC
    state.resync(snap(5))  # still H: "other" is not the host the command endpoint answers for
    assert state.foreign == {"other"}
    assert not state.needs_resync
    assert state.offer(connect(101, "0.1.2", 7, host="other")) is Verdict.DROP
    assert state.offer(connect(6, "0.1.3", 7)) is Verdict.APPLY
    assert state.stats["foreign"] == 2  # the held one, and the one after


def test_at_the_start_events_of_another_host_cost_one_more_snapshot_then_are_foreign():
    state = EventState()
    state.offer(connect(3, "0.1.1", 7, host="other"))
    state.resync(snap(0))  # H: the held event is from another host -> due again
    assert state.needs_resync
    state.resync(snap(0))
    assert state.foreign == {"other"}
    assert not state.needs_resync


# -- a gap at the tail: the host says where its stream is ------------------------------------


def test_a_position_ahead_of_the_state_makes_a_snapshot_due():
    state = synced(10)
    assert state.check(10) is False
    assert state.check(10, H) is False
    assert state.check(12) is True
    assert state.needs_resync
    assert state.stats["tail_gaps"] == 1
    assert state.check(13) is True  # due already: counted once
    assert state.stats["gaps"] == 1


def test_another_host_or_a_seq_behind_is_a_restart():
    assert synced(10).check(10, "host-b") is True
    assert synced(10).check(3) is True


def test_before_the_first_snapshot_there_is_nothing_to_check():
    state = EventState()
    assert state.check(5) is True  # due anyway
    assert state.stats["tail_gaps"] == 0


# -- the invariant, under random loss and snapshot timing ------------------------------------


@st.composite
def scenarios(draw):
    """A publisher's events (and its true state after each), and which of them a lossy
    subscriber receives."""
    n = draw(st.integers(1, 60))
    live: dict[str, tuple[int, set[int]]] = {}
    events, states = [], [view_of([])]
    next_conn = 0
    for seq in range(1, n + 1):
        choice = draw(st.sampled_from(["connect", "subscribe", "unsubscribe", "disconnect"]))
        if choice == "connect" or not live:
            next_conn += 1
            conn, user = f"0.1.{next_conn}", draw(st.integers(1, 5))
            channels = draw(st.sets(st.integers(1, 4), max_size=3))
            live[conn] = (user, set(channels))
            events.append(connect(seq, conn, user, sorted(channels)))
        else:
            conn = draw(st.sampled_from(sorted(live)))
            user, channels = live[conn]
            if choice == "disconnect":
                del live[conn]
                events.append(ev(seq, "disconnect", user=user, conn=conn, code=1000, reason=""))
            else:
                channel = draw(st.integers(1, 4))
                (channels.add if choice == "subscribe" else channels.discard)(channel)
                events.append(ev(seq, choice, user=user, conn=conn, channel=channel))
        states.append({c: (u, tuple(sorted(ch))) for c, (u, ch) in live.items()})
    received = [e for e in events if draw(st.booleans()) or draw(st.booleans())]
    return events, states, received


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.randoms(use_true_random=False))
def test_whenever_in_sync_the_state_is_the_publishers_at_that_seq(scenario, random):
    _events, states, received = scenario

    def snapshot_at(seq: int) -> dict:
        connections = [
            rec(conn, user, channels) for conn, (user, channels) in sorted(states[seq].items())
        ]
        return snap(seq, connections)

    state = EventState()
    yielded: list[int] = []
    published = 0  # how far the publisher is when the consumer looks
    queue = list(received)
    while queue or state.needs_resync:
        if state.needs_resync:
            # the snapshot is taken now: after every event the consumer has received so far
            published = random.randint(published, len(states) - 1)
            items = state.resync(snapshot_at(published))
            yielded.extend(item["seq"] for item in items)
        else:
            event = queue.pop(0)
            published = max(published, event["seq"])
            if state.offer(event) is Verdict.APPLY:
                yielded.append(event["seq"])
        if not state.needs_resync:
            assert state.seq is not None
            assert state.view() == states[state.seq]
    # in seq order: an event after the one before it, a resync item at or after the last
    assert yielded == sorted(yielded)


# -- a plain listener's gaps, and frames ---------------------------------------------------------


def test_gap_counter_reports_what_was_missed_per_host():
    gaps = GapCounter()
    assert gaps.see(ev(5, "online", user=1)) is None  # first of its host
    assert gaps.see(ev(6, "online", user=1)) is None
    assert gaps.see(ev(9, "online", user=1)) == (7, 8)
    assert gaps.see(ev(1, "online", "b", user=1)) is None
    assert gaps.see(ev(1, "online", user=1)) is None  # went back: a restart, not a gap
    assert gaps.see({"seq": "x", "host": H}) is None


@pytest.mark.parametrize(
    "frame",
    [b"", b"nope", b"[1]", b'{"host":"h"}', b'{"seq":"1","host":"h"}', b'{"seq":1,"host":2}'],
)
def test_frames_that_are_not_events_are_refused(frame):
    assert parse_event(frame) is None


def test_an_event_frame_is_parsed_with_its_keys_in_order():
    frame = b'{"seq":3,"host":"h","ts":1.5,"type":"online","user":4}'
    event = parse_event(frame)
    assert event is not None
    assert list(event) == ["seq", "host", "ts", "type", "user"]


# -- the socket half: a real PUB socket, crafted events ----------------------------------------


@pytest.fixture
def pub():
    context = zmq.Context.instance()
    socket = context.socket(zmq.PUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind("tcp://127.0.0.1:*")
    yield socket, socket.getsockopt_string(zmq.LAST_ENDPOINT)
    socket.close(linger=0)


def send(socket, event: dict) -> None:
    socket.send(json.dumps(event).encode())


def first_through(follower: EventFollower, socket, event: dict) -> dict:
    """Publish ``event`` until the follower yields something (a SUB socket joins late)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        send(socket, event)
        item = follower.poll(0.05)
        if item is not None:
            return item
    raise AssertionError("the SUB socket never received anything")


class Command:
    """A real command client on a real ZeroMQ endpoint with canned replies (canned.py): the
    snapshots in order, and ``router_stats`` with ``events`` once set."""

    def __init__(self, server: CannedServer, *snapshots: dict) -> None:
        self.server = server
        server.replies["snapshot"] = list(snapshots)
        server.replies["router_stats"] = {"ok": True}
        self.client = Client(server.endpoint, timeout=5.0)
        clients.append(self.client)  # closed by the fixture: a given client is not owned

    @property
    def asked(self) -> int:
        return self.server.asked.count("snapshot")

    @property
    def stats_asked(self) -> int:
        return self.server.asked.count("router_stats")

    @property
    def events(self) -> dict | None:
        return self.server.replies["router_stats"].get("events")

    @events.setter
    def events(self, value: dict) -> None:
        self.server.replies["router_stats"] = {"ok": True, "events": value}

    @property
    def closed(self) -> bool:
        return self.client.closed


clients: list[Client] = []  # the Commands' clients, closed at the end of each test


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while clients:
        clients.pop().close()


def test_without_a_command_endpoint_every_event_is_yielded_and_gaps_counted(pub):
    socket, endpoint = pub
    with EventFollower(endpoint, command=None) as follower:
        assert not follower.following
        first = first_through(follower, socket, ev(1, "online", user=1))
        assert first["seq"] == 1
        while (item := follower.poll(0.05)) is not None:  # the repeats of the probe
            assert item["seq"] == 1
        send(socket, ev(4, "online", user=2))
        socket.send(b"not json")
        send(socket, ev(5, "offline", user=2))
        items = [follower.poll(2), follower.poll(2)]
        assert [i["seq"] for i in items if i] == [4, 5]
        assert follower.malformed == 1
        assert follower.gaps.last == {H: 5}
        assert follower.poll(0.05) is None
    assert follower.closed


def test_following_yields_resync_then_events_and_resyncs_on_a_gap(pub, canned):
    socket, endpoint = pub
    client = Command(canned, snap(0), snap(7, [rec("0.1.1", 7, [1]), rec("0.1.5", 9)]))
    follower = EventFollower(endpoint, client=client.client)
    try:
        assert follower.following
        assert follower.poll(1) == {"type": "resync", "seq": 0, "host": H, "connections": []}
        assert first_through(follower, socket, connect(1, "0.1.1", 7, [1])) == connect(
            1, "0.1.1", 7, [1]
        )
        assert follower.connections["0.1.1"]["channels"] == [1]
        send(socket, ev(2, "subscribe", user=7, conn="0.1.1", channel=2))
        item = follower.poll(2)
        assert item is not None and item["seq"] == 2  # (repeats of seq 1 were dropped)
        send(socket, connect(5, "0.1.5", 9))  # 3 and 4 lost: a gap
        send(socket, connect(8, "0.1.8", 9))
        resync = follower.poll(2)
        assert resync is not None and resync["type"] == "resync"
        assert resync["seq"] == 7
        assert follower.poll(2) == connect(8, "0.1.8", 9)
        assert client.asked == 2
        assert follower.state.view() == {
            "0.1.1": (7, (1,)),
            "0.1.5": (9, ()),
            "0.1.8": (9, ()),
        }
    finally:
        follower.close()
    assert not client.closed  # given, not owned


def test_iterating_ends_after_the_idle_timeout(pub):
    socket, endpoint = pub
    with EventFollower(endpoint, command=None, idle_timeout=0.2) as follower:
        first_through(follower, socket, ev(1, "online", user=1))
        started = time.monotonic()
        items = list(follower)
        assert all(item["seq"] == 1 for item in items)
        assert time.monotonic() - started < 3


def test_a_bad_endpoint_is_a_value_error():
    with pytest.raises(ValueError, match="bad event endpoint"):
        EventFollower("nowhere", command=None)


def test_a_closed_follower_refuses_to_poll():
    follower = EventFollower("tcp://127.0.0.1:1", command="tcp://127.0.0.1:2", timeout=0.5)
    client = follower.client
    follower.close()
    follower.close()
    assert client is not None and client.closed  # its own client is closed with it
    with pytest.raises(RuntimeError):
        follower.poll(0.1)


def test_a_snapshot_that_times_out_is_raised_from_poll():
    with (
        EventFollower("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", timeout=0.2) as follower,
        pytest.raises(CommandTimeout),
    ):
        follower.poll(0.1)


def test_poll_is_bounded_with_nothing_to_read():
    with EventFollower("tcp://127.0.0.1:1", command=None) as follower:
        started = time.monotonic()
        assert follower.poll(0.2) is None
        assert 0.15 < time.monotonic() - started < 2


def test_a_publisher_thread_is_not_needed_but_works(pub, canned):
    """Events published from another thread while the follower polls arrive in order."""
    socket, endpoint = pub
    client = Command(canned, snap(1))
    with EventFollower(endpoint, client=client.client) as follower:
        assert follower.poll(1)["type"] == "resync"
        first_through(follower, socket, ev(2, "online", user=1))

        def publish() -> None:
            for seq in range(3, 103):
                send(socket, ev(seq, "online", user=seq))

        thread = threading.Thread(target=publish)
        thread.start()
        seqs = []
        while len(seqs) < 100:
            item = follower.poll(2)
            assert item is not None
            seqs.append(item["seq"])
        thread.join()
        assert seqs == list(range(3, 103))


def test_a_quiet_follower_asks_where_the_stream_is_and_resyncs_on_a_tail_gap(pub, canned):
    socket, endpoint = pub
    client = Command(canned, snap(0), snap(9, [rec("0.1.9", 4)]))
    with EventFollower(endpoint, client=client.client, check_interval=0.1) as follower:
        assert follower.poll(1)["type"] == "resync"
        first_through(follower, socket, connect(1, "0.1.1", 7))
        client.events = {"seq": 1, "published": 1}
        assert follower.poll(0.5) is None  # where the host is: nothing missed
        assert client.stats_asked >= 2
        client.events = {"seq": 9}  # 2..9 were published, and lost
        resync = follower.poll(1)
        assert resync is not None and (resync["type"], resync["seq"]) == ("resync", 9)
        assert follower.state.view() == {"0.1.9": (4, ())}
        assert follower.state.stats["tail_gaps"] == 1


def test_without_an_event_stream_the_position_check_changes_nothing(pub, canned):
    _socket, endpoint = pub
    client = Command(canned, snap(0))
    with EventFollower(endpoint, client=client.client, check_interval=0.05) as follower:
        assert follower.poll(1)["type"] == "resync"
        assert follower.poll(0.3) is None
        assert client.stats_asked >= 2
        assert client.asked == 1


def test_the_position_check_can_be_turned_off(pub, canned):
    _socket, endpoint = pub
    client = Command(canned, snap(0))
    with EventFollower(endpoint, client=client.client, check_interval=None) as follower:
        assert follower.poll(1)["type"] == "resync"
        assert follower.poll(0.2) is None
        assert client.stats_asked == 0
