"""shards.cli's parsers: the ``serve`` flags of issue 11 (history, critical messages) and
``ucc history``. No server."""

from __future__ import annotations

import json

import pytest

import shards.cli
from shards.cli import build_parser, main
from shards.config import ServeConfig


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
    ],
)
def test_bad_values_are_usage_errors_naming_what_was_expected(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as exited:
        serve(f"{flag}={value}")
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert flag in error and expected in error


# -- the commands of issue 11, against a stand-in client ------------------------------------


class StandInClient:
    """What ``shards.cli`` needs of :class:`shards.client.Client`, recording its calls."""

    calls: list[tuple[str, tuple[object, ...]]] = []
    reply: dict[str, object] = {}

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __enter__(self) -> StandInClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def history(self, *args: object) -> dict[str, object]:
        self.calls.append(("history", args))
        return self.reply

    def broadcast_to_user(self, *args: object) -> dict[str, object]:
        self.calls.append(("broadcast_to_user", args))
        return self.reply

    def broadcast_to_users(self, *args: object) -> dict[str, object]:
        self.calls.append(("broadcast_to_users", args))
        return self.reply


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setattr(shards.cli, "Client", StandInClient)
    StandInClient.calls = []
    StandInClient.reply = {"ok": True}
    return StandInClient


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
    assert json.loads(capsys.readouterr().out) == client.reply
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
    assert client.calls == [
        ("broadcast_to_user", (4, "x", True, None)),
        ("broadcast_to_users", ([4, 5], 1, True, 60.0)),
        ("broadcast_to_user", (4, 2, False, None)),
    ]
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == client.reply


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
