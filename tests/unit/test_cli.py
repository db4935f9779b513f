"""shards.cli's parsers: the ``serve`` flags of issue 11 (history, critical messages) and
``ucc history``. No server."""

from __future__ import annotations

import pytest

from shards.cli import build_parser
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
