"""shards.cli's parsers: the ``serve`` flags of issue 11 (history, critical messages) and
``ucc history``. No server."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zmq
from canned import CannedServer

from shards.cli import build_parser, format_connections, main
from shards.config import ServeConfig, check_batch_window, effective_batch_window_max


def serve(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_history_and_critical_flags_default_to_the_config():
    args = serve()
    defaults = ServeConfig(secret="s")
    for name in (
        "history_size",
        "history_ttl",
        "history_memory",
        "ack_timeout",
        "ack_retries",
        "critical_per_user",
        "critical_memory",
    ):
        assert getattr(args, name) == getattr(defaults, name)
    assert (defaults.history_size, defaults.history_ttl) == (64, 300.0)
    assert (defaults.ack_timeout, defaults.ack_retries, defaults.critical_per_user) == (
        10.0,
        5,
        100,
    )
    assert defaults.history_memory == defaults.critical_memory == 64 * 1024 * 1024


def test_history_and_critical_flags_are_parsed():
    args = serve(
        "--history-size", "0",
        "--history-ttl", "2.5",
        "--history-memory", "1000",
        "--ack-timeout", "0.5",
        "--ack-retries", "0",
        "--critical-per-user", "3",
        "--critical-memory", "4096",
    )  # fmt: skip
    assert (args.history_size, args.history_ttl, args.history_memory) == (0, 2.5, 1000)
    assert (args.ack_timeout, args.ack_retries) == (0.5, 0)
    assert (args.critical_per_user, args.critical_memory) == (3, 4096)


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--history-size", "-1", "0 or more"),
        ("--history-size", "many", "0 or more"),
        ("--history-ttl", "0", "positive number of seconds"),
        ("--history-ttl", "inf", "positive number of seconds"),
        ("--history-memory", "0", "positive integer"),
        ("--ack-timeout", "-2", "positive number of seconds"),
        ("--ack-retries", "1.5", "0 or more"),
        ("--critical-per-user", "0", "positive integer"),
        ("--critical-memory", "-5", "positive integer"),
        ("--batch-window", "-0.001", "0 or more"),
        ("--batch-window", "1e-9", "0 (off) or at least 0.0001"),
        ("--batch-window", "0.2", "at most 0.1"),
        ("--batch-window-max", "0.5", "at most 0.1"),
        ("--batch-window-max", "soon", "0 or more"),
    ],
)
def test_bad_values_are_usage_errors_naming_what_was_expected(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as exited:
        serve(f"{flag}={value}")
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert flag in error and expected in error


def test_the_batch_window_must_be_under_half_the_shard_queue_delay():
    check_batch_window(0.002, 0.1)
    check_batch_window(0.0, 0.0001)  # off: nothing to compare
    with pytest.raises(ValueError, match="less than half of --shard-queue-delay"):
        check_batch_window(0.05, 0.1)
    check_batch_window(0.002, 0.1, 0.04)
    with pytest.raises(ValueError, match=r"--batch-window-max 0\.05 must be less than half"):
        check_batch_window(0.002, 0.1, 0.05)
    check_batch_window(0.0, 0.01, 0.05)  # off: the maximum does not matter either


def test_the_batch_window_maximum_given_is_checked_against_the_queue_delay(capsys):
    args = ["serve", "--secret", "s" * 32, "--shard-queue-delay=0.015"]
    assert main([*args, "--batch-window-max=0.01"]) == 2  # refused before anything starts
    assert "--batch-window-max 0.01 must be less than half" in capsys.readouterr().err


def test_the_default_batch_window_maximum_fits_a_short_queue_delay():
    assert serve().batch_window_max is None
    assert effective_batch_window_max(None, 0.1) == 0.01
    assert effective_batch_window_max(None, 0.015) == 0.015 / 4  # valid: under half of it
    check_batch_window(0.002, 0.015, effective_batch_window_max(None, 0.015))
    assert effective_batch_window_max(0.05, 0.015) == 0.05  # given: as given (and checked)


# -- the commands of issue 11, against a real endpoint with canned replies ------------------


class Canned:
    """A real command endpoint with canned replies (tests/unit/canned.py) as these tests use
    it: ``reply`` answers every command; ``calls`` is what was sent, ``(cmd, field values)``."""

    def __init__(self, server: CannedServer) -> None:
        self.server = server

    @property
    def reply(self) -> dict[str, object]:
        return dict(self.server.default)

    @reply.setter
    def reply(self, value: dict[str, object]) -> None:
        self.server.default = value

    @property
    def calls(self) -> list[tuple[str, tuple[object, ...]]]:
        return [
            (request["cmd"], tuple(v for k, v in request.items() if k != "cmd"))
            for request in self.server.requests
        ]


def printed(text: str) -> object:
    """A JSON reply as the CLI printed it, without the request id the real client sent."""
    value = json.loads(text)
    if isinstance(value, dict):
        value.pop("id", None)
    return value


@pytest.fixture
def client(canned, monkeypatch):
    canned.default = {"ok": True}
    monkeypatch.setenv("UCC_COMMAND", canned.endpoint)
    return Canned(canned)


def test_history_prints_one_json_line_per_message(client, capsys):
    client.reply = {
        "ok": True,
        "epoch": "e1",
        "offset": 9,
        "messages": [{"offset": 8, "data": {"a": 1}}, {"offset": 9, "data": "é"}],
    }
    assert main(["history", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == client.reply["messages"]
    assert client.calls == [("history", (5, 0, 100))]


def test_history_json_prints_the_reply(client, capsys):
    client.reply = {"ok": True, "epoch": "e1", "offset": 0, "messages": []}
    assert main(["history", "5", "--since", "3", "--limit", "7", "--json"]) == 0
    assert printed(capsys.readouterr().out) == client.reply
    assert client.calls == [("history", (5, 3, 7))]


@pytest.mark.parametrize("argv", [["5", "--since", "-1"], ["5", "--limit", "0"], ["x"]])
def test_history_with_bad_arguments_is_a_usage_error(argv, client):
    with pytest.raises(SystemExit) as exited:
        main(["history", *argv])
    assert exited.value.code == 2
    assert client.calls == []


def test_broadcast_critical(client, capsys):
    client.reply = {"ok": True, "message_id": "h-1"}
    assert main(["broadcast", "--user", "4", "--critical", '"x"']) == 0
    assert main(["broadcast", "--users", "4,5", "--critical", "--ttl", "60", "1"]) == 0
    assert main(["broadcast", "--user", "4", "2"]) == 0
    assert client.server.requests == [  # as sent: no critical fields when not critical
        {"cmd": "broadcast_to_user", "user": 4, "data": "x", "critical": True},
        {"cmd": "broadcast_to_users", "users": [4, 5], "data": 1, "critical": True, "ttl": 60.0},
        {"cmd": "broadcast_to_user", "user": 4, "data": 2},
    ]
    assert printed(capsys.readouterr().out.splitlines()[0]) == client.reply


@pytest.mark.parametrize(
    "argv",
    [
        ["--channel", "1", "--critical", "1"],
        ["--user", "1", "--ttl", "5", "1"],
    ],
)
def test_broadcast_critical_misuse_is_a_usage_error(argv, client, capsys):
    assert main(["broadcast", *argv]) == 2
    assert "ucc: error:" in capsys.readouterr().err
    assert client.calls == []


# -- issue 12: snapshot, who, channel, events ---------------------------------------------------


def test_snapshot_prints_the_reply(client, capsys):
    client.reply = {"ok": True, "seq": 4, "host": "h", "connections": [], "missing_shards": [1]}
    assert main(["snapshot"]) == 0
    out, err = capsys.readouterr()
    assert printed(out) == client.reply
    assert "shards [1]" in err
    assert client.calls == [("snapshot", ())]


CONNECTIONS = [
    {
        "conn": "0.1.7",
        "host": "web-1",
        "shard": 0,
        "connected_at": 1_700_000_000.0,
        "last_activity": 1_700_000_090.0,
        "channels": [1, 2],
        "remote": "10.0.0.5:51000",
    },
    {"conn": "3.2.12", "host": "web-2", "shard": 3, "channels": list(range(1, 11))},
]


def test_format_connections_is_an_aligned_table():
    table = format_connections(CONNECTIONS, now=1_700_000_100.0)
    lines = table.splitlines()
    assert lines[0].split() == [
        "CONN",
        "HOST",
        "SHARD",
        "CONNECTED",
        "IDLE",
        "CHANNELS",
        "REMOTE",
    ]
    assert lines[1].split() == [
        "0.1.7",
        "web-1",
        "0",
        "2023-11-14",
        "22:13:20Z",
        "10s",
        "1,2",
        "10.0.0.5:51000",
    ]
    assert lines[2].split() == ["3.2.12", "web-2", "3", "-", "-", "1,2,3,4,5,6,7,8,…(+2)", "-"]
    assert lines[1].index("web-1") == lines[2].index("web-2") == lines[0].index("HOST")
    assert format_connections([], now=0).split() == lines[0].split()


def test_who_prints_a_table_or_the_reply(client, capsys):
    client.reply = {"ok": True, "connections": CONNECTIONS, "missing_shards": []}
    assert main(["who", "42"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1].startswith("0.1.7")
    assert err == ""
    assert main(["who", "42", "--json"]) == 0
    assert printed(capsys.readouterr().out) == client.reply
    assert client.calls == [("get_user_connections", (42,))] * 2


def test_who_warns_when_only_this_host_was_asked(client, capsys):
    client.reply = {
        "ok": True,
        "connections": [],
        "missing_shards": [2],
        "cluster": False,
        "cluster_error": "redis down",
    }
    assert main(["who", "42"]) == 0
    err = capsys.readouterr().err
    assert "shards [2]" in err
    assert "only this host was asked (redis down)" in err


def test_who_with_a_bad_reply_fails(client, capsys):
    client.reply = {"ok": True, "connections": "nope"}
    assert main(["who", "42"]) == 1
    assert "bad_reply" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("word", "flag"), [("on", True), ("OFF", False), ("true", True), ("0", False)]
)
def test_channel_sets_join_leave(word, flag, client, capsys):
    client.reply = {"ok": True, "channel": 5, "join_leave": flag}
    assert main(["channel", "5", "--join-leave", word]) == 0
    assert printed(capsys.readouterr().out) == client.reply
    assert client.calls == [("set_channel", (5, flag))]


@pytest.mark.parametrize("argv", [["5"], ["5", "--join-leave", "maybe"], ["x", "--join-leave=on"]])
def test_channel_misuse_is_a_usage_error(argv, client, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["channel", *argv])
    assert exited.value.code == 2
    assert client.calls == []


def event(seq: int, **fields: object) -> dict[str, object]:
    return {"seq": seq, "host": "h", "ts": 1.5, "type": "online", "user": 3, **fields}


@contextlib.contextmanager
def publishing(make: Callable[[int], dict[str, object] | None]) -> Iterator[str]:
    """A real ZeroMQ PUB socket on 127.0.0.1 publishing ``make(1)``, ``make(2)``, ... every
    10 ms (None: nothing that turn) until the block ends; yields its endpoint. A subscriber
    that joins late misses the first ones (ZeroMQ's slow joiner), so tests never count on
    them."""
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    stop = threading.Event()

    def publish() -> None:
        turn = 0
        while not stop.wait(0.01):
            turn += 1
            item = make(turn)
            if item is not None:
                pub.send(json.dumps(item).encode())

    thread = threading.Thread(target=publish, name="test-publisher")
    thread.start()
    try:
        yield pub.getsockopt_string(zmq.LAST_ENDPOINT)
    finally:
        stop.set()
        thread.join(5)
        pub.close(linger=0)


def test_events_prints_json_lines_and_warns_of_gaps(monkeypatch, capsys):
    monkeypatch.delenv("UCC_EVENTS", raising=False)
    with publishing(lambda turn: event(2 * turn, user="é")) as endpoint:  # every other seq
        assert main(["events", "--endpoint", endpoint, "--count", "3", "--duration", "10"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    items = [json.loads(line) for line in lines]
    assert len(items) == 3 and all(item["user"] == "é" for item in items)
    assert lines[1] == json.dumps(items[1], separators=(",", ":"), ensure_ascii=False)
    seqs = [item["seq"] for item in items]
    assert seqs == [seqs[0], seqs[0] + 2, seqs[0] + 4]
    assert err.count("missed events") == 2  # between each two: the first has none before it
    assert f"missed events {seqs[0] + 1}..{seqs[0] + 1} of host h" in err


def test_events_follow_resyncs_from_the_command_endpoint_and_does_not_warn(canned, capsys):
    canned.replies["snapshot"] = {"ok": True, "seq": 0, "host": "h", "connections": []}
    canned.replies["router_stats"] = {"ok": True}
    with publishing(lambda _turn: event(1)) as endpoint:  # the one event after the snapshot
        argv = ["events", "--follow", "--endpoint", endpoint, "--command", canned.endpoint]
        assert main([*argv, "--count", "2", "--rcvhwm", "10", "--timeout", "2"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["resync", "online"]
    assert err == ""
    assert canned.asked[0] == "snapshot"  # the state came from the command endpoint given


def test_events_endpoint_defaults_to_the_environment(monkeypatch, capsys):
    with publishing(event) as endpoint:
        monkeypatch.setenv("UCC_EVENTS", endpoint)
        assert main(["events", "--count", "1", "--duration", "10"]) == 0
    assert json.loads(capsys.readouterr().out)["type"] == "online"


def test_events_stops_after_its_duration(monkeypatch, capsys):
    with publishing(lambda _turn: None) as endpoint:  # bound, and silent
        monkeypatch.setenv("UCC_EVENTS", endpoint)
        started = time.monotonic()
        assert main(["events", "--duration", "0.3"]) == 0
        assert 0.25 < time.monotonic() - started < 2
    assert capsys.readouterr().out == ""


def test_events_follow_reports_a_failed_snapshot(canned, capsys):
    canned.replies["snapshot"] = None  # never answered: the client times out
    with publishing(event) as endpoint:
        argv = ["events", "--follow", "--endpoint", endpoint, "--command", canned.endpoint]
        assert main([*argv, "--count", "1", "--timeout", "0.3"]) == 1
    assert "ucc: error: snapshot failed: timeout" in capsys.readouterr().err


def test_events_with_a_bad_endpoint_is_a_usage_error(capsys):
    assert main(["events", "--endpoint", "nowhere", "--duration", "0.1"]) == 2
    assert "bad event endpoint" in capsys.readouterr().err


def test_events_against_a_real_pub_socket(monkeypatch, capsys):
    monkeypatch.delenv("UCC_EVENTS", raising=False)
    with publishing(event) as endpoint:
        assert main(["events", "--endpoint", endpoint, "--count", "3", "--duration", "5"]) == 0
    seqs = [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()]
    assert len(seqs) == 3
    assert seqs == list(range(seqs[0], seqs[0] + 3))
