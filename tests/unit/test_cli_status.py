"""shards.cli of issue 13: ``ucc status`` as a table (addresses, Redis link, uptime, totals),
``ucc stats``, ``online`` warning when only this host answered, and every command's
``--command`` defaulting to ``$UCC_COMMAND``. The CLI's real client against a real ZeroMQ endpoint
with canned replies (no ucc server needed for what is only formatting)."""

from __future__ import annotations

import argparse
import json

import pytest

from shards.cli import build_parser, format_duration, format_status, format_status_report, main

SHARDS = [
    {"index": 0, "pid": 101, "epoch": 1, "state": "up", "connections": 3, "users": 2,
     "channels": 5},
    {"index": 1, "pid": 102, "epoch": 4, "state": "unresponsive", "connections": 0, "users": 0,
     "channels": 0},
    {"index": 2, "pid": None, "epoch": 2, "state": "restarting", "connections": 0, "users": 0,
     "channels": 0},
]  # fmt: skip


@pytest.fixture
def standin(canned, monkeypatch):
    canned.replies = {
        "status": {"ok": True, "shards": SHARDS, "missing_shards": [1]},
        "router_stats": {"ok": True, "commands": 7, "shards": {"0": "up"}},
    }
    monkeypatch.setenv("UCC_COMMAND", canned.endpoint)
    return canned


# -- the table ---------------------------------------------------------------------------------


def test_format_status_has_the_columns_in_order_and_a_totals_line():
    lines = format_status(SHARDS).splitlines()
    assert lines[0].split() == [
        "INDEX", "STATE", "PID", "EPOCH", "CONNECTIONS", "USERS", "CHANNELS"
    ]  # fmt: skip
    assert lines[1].split() == ["0", "up", "101", "1", "3", "2", "5"]
    assert lines[3].split() == ["2", "restarting", "-", "2", "0", "0", "0"]
    assert lines[4].split() == ["total", "1/3", "up", "3", "2", "5"]
    # aligned: every line's last column ends at the same place
    assert len({len(line) for line in lines}) == 1


def test_one_shard_needs_no_totals_and_odd_rows_do_not_crash():
    assert len(format_status(SHARDS[:1]).splitlines()) == 2
    table = format_status(["junk", {"index": 1, "connections": True}])
    assert table.splitlines()[-1].split()[0] == "total"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (61, "1m01s"), (3725, "1h02m05s"), (90061, "1d 1h01m01s")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_the_report_shows_what_the_server_told():
    status = {
        "shards": SHARDS,
        "websocket": "ws://127.0.0.1:8765",
        "metrics": "http://127.0.0.1:9100",
        "uptime": 61,
    }
    stats = {"redis": {"published": 3, "received": 4, "reconnects": 1, "up": True}}
    report = format_status_report("tcp://127.0.0.1:5555", status, stats, now=0)
    head = report.split("\n\n")[0].splitlines()
    assert head == [
        "command    tcp://127.0.0.1:5555",
        "websocket  ws://127.0.0.1:8765",
        "metrics    http://127.0.0.1:9100/metrics  (admin page: http://127.0.0.1:9100/admin)",
        "uptime     1m01s",
        "redis      up (published 3, received 4, reconnects 1)",
    ]
    assert report.split("\n\n")[1] == format_status(SHARDS)


def test_the_report_without_redis_addresses_or_uptime_says_what_it_has():
    report = format_status_report("ipc:///tmp/c", {"shards": SHARDS}, {"commands": 1}, now=0)
    assert report.splitlines()[:2] == [
        "command    ipc:///tmp/c",
        "redis      none (one host, no --redis)",
    ]
    assert "uptime" not in report and "websocket" not in report


@pytest.mark.parametrize(
    ("status", "link", "expected"),
    [
        ({}, {"published": 1}, "linked (published 1)"),
        ({"cluster": False}, {}, "DOWN"),
        ({"cluster": True}, {"up": False, "reconnects": 2}, "DOWN (reconnects 2)"),
    ],
)
def test_the_redis_link_state(status, link, expected):
    report = format_status_report("e", {"shards": [], **status}, {"redis": link}, now=0)
    assert f"redis      {expected}" in report.splitlines()


def test_uptime_from_a_start_time():
    report = format_status_report("e", {"shards": [], "started_at": 1000.0}, {}, now=1130.0)
    assert "uptime     2m10s" in report.splitlines()


# -- ucc status / stats / online ----------------------------------------------------------------


def test_status_prints_the_report_and_warns_of_missing_shards(standin, capsys):
    assert main(["status", "--command", standin.endpoint]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"command    {standin.endpoint}\nredis      none")
    assert "total" in out and "INDEX" in out
    assert "shards [1] were down" in err
    assert standin.asked == ["status", "router_stats"]


def test_status_without_router_stats_still_prints_the_table(standin, capsys):
    standin.replies["router_stats"] = None  # never answered: the client times out
    assert main(["status", "--timeout", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "redis      unknown" in out and "INDEX" in out


def test_status_json_prints_the_raw_reply(standin, capsys):
    assert main(["status", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"id": 1, **standin.replies["status"]}
    assert standin.asked == ["status"]


def test_status_with_a_bad_reply_fails(standin, capsys):
    standin.replies["status"] = {"ok": True, "shards": "nope"}
    assert main(["status"]) == 1
    assert "ucc: error: bad_reply" in capsys.readouterr().err


def test_stats_prints_router_stats_as_json(standin, capsys):
    assert main(["stats"]) == 0
    assert json.loads(capsys.readouterr().out) == {"id": 1, **standin.replies["router_stats"]}
    assert standin.asked == ["router_stats"]


@pytest.mark.parametrize(
    ("argv", "cmd", "result"),
    [
        (["online"], "get_online_users", {"users": [1, 2]}),
        (["online", "--channel", "3"], "get_online_users_in_channel", {"users": [1]}),
        (["online", "--user", "1"], "is_user_online", {"online": True}),
    ],
)
def test_online_warns_when_only_this_host_answered(argv, cmd, result, standin, capsys):
    standin.replies[cmd] = {"ok": True, **result, "missing_shards": [], "cluster": False}
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == next(iter(result.values()))
    assert "only this host was asked" in err
    standin.replies[cmd] = {"ok": True, **result, "missing_shards": [], "cluster": True}
    assert main(argv) == 0
    assert capsys.readouterr().err == ""


# -- $UCC_COMMAND everywhere ----------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_endpoint_defaults_to_ucc_command(monkeypatch):
    monkeypatch.setenv("UCC_COMMAND", "tcp://127.0.0.1:6100")
    parsers = _subparsers(build_parser())
    with_command = {
        name
        for name, sub in parsers.items()
        if any("--command" in action.option_strings for action in sub._actions)
    }
    assert {"serve", "bench", "status", "stats", "online", "broadcast", "who"} <= with_command
    for name in with_command:
        sub = parsers[name]
        (action,) = [a for a in sub._actions if "--command" in a.option_strings]
        assert action.default == "tcp://127.0.0.1:6100", name


def test_without_ucc_command_the_default_endpoint(monkeypatch):
    monkeypatch.delenv("UCC_COMMAND", raising=False)
    args = build_parser().parse_args(["bench", "fanout"])
    assert args.command == "tcp://127.0.0.1:5555"


def test_bench_command_defaults_to_ucc_command(monkeypatch):
    monkeypatch.setenv("UCC_COMMAND", "tcp://127.0.0.1:6200")
    args = build_parser().parse_args(["bench", "fanout", "--target", "ws://127.0.0.1:1"])
    assert args.command == "tcp://127.0.0.1:6200"
    explicit = ["bench", "fanout", "--command", "tcp://127.0.0.1:6201"]
    assert build_parser().parse_args(explicit).command == "tcp://127.0.0.1:6201"


def test_the_commands_talk_to_ucc_command(standin):
    # the fixture set $UCC_COMMAND to its endpoint, and no --command is given
    assert main(["stats"]) == 0
    assert standin.asked == ["router_stats"]
