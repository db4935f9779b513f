"""The command line of ``ucc bench``: its parser, and the handler that runs it.

Owns: the bench's flags and their types (a rate or ``max``, a list of counts) and checking them
before anything starts. Light on purpose: :mod:`shards.cli` imports it to build the ``ucc``
parser, and the bench itself (:mod:`shards.bench.runner`) is imported only when it runs.
"""

from __future__ import annotations

import argparse
import sys

from shards.cliargs import (
    Subparsers,
    add_command,
    add_secret,
    positive_float,
    positive_int,
    seconds,
)
from shards.config import ServeConfig

SCENARIOS = ("idle", "fanout", "rooms", "direct", "connect")


_positive_rate = positive_float("a positive rate or 'max'")


def rate(text: str) -> str:
    """Messages per second, or ``max`` (as fast as the server absorbs)."""
    if text != "max":
        _positive_rate(text)
    return text


def count_list(text: str) -> list[int]:
    """Comma-separated positive integers, e.g. ``1000,5000,10000``."""
    return [positive_int(part.strip()) for part in text.split(",") if part.strip()]


def add_bench(subparsers: Subparsers) -> None:
    """Add the ``bench`` subcommand to the ``ucc`` parser."""
    parser = subparsers.add_parser(
        "bench",
        help="measure a ucc server (started for the run, or --target) under load",
        description=(
            "Run a load scenario against ucc (and with --reference, against a plain websockets"
            " server too) and print the figures: a table, or one JSON object with --json."
        ),
    )
    parser.add_argument(
        "scenario",
        choices=SCENARIOS,
        metavar="SCENARIO",
        help="one of: " + ", ".join(SCENARIOS),
    )
    parser.add_argument(
        "--connections", type=positive_int, metavar="N", help="WebSocket connections to open"
    )
    parser.add_argument(
        "--members",
        type=positive_int,
        metavar="M",
        help="members per channel (fanout: of the one channel)",
    )
    parser.add_argument("--rate", type=rate, metavar="R", help="commands per second, or 'max'")
    parser.add_argument(
        "--arrivals",
        choices=("even", "poisson"),
        default="even",
        help="at --rate R: commands evenly spaced, or independent arrivals, as from many users"
        " (a seeded Poisson process) (default: %(default)s)",
    )
    parser.add_argument(
        "--backends",
        type=positive_int,
        default=1,
        metavar="B",
        help="rooms, direct at --rate max: publish from B backends that each send a command"
        " only after the reply to their last (default: one backend, up to 1,000 unanswered)",
    )
    parser.add_argument(
        "--messages",
        type=positive_int,
        metavar="K",
        help="commands to publish (default: rate x duration)",
    )
    parser.add_argument(
        "--duration",
        type=seconds,
        metavar="S",
        help="publishing time with --rate max; hold time for idle",
    )
    parser.add_argument(
        "--sweep",
        type=count_list,
        metavar="M1,M2",
        help="repeat for these members (fanout, rooms) or connections",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also run it against a plain websockets server; report ratios",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument(
        "--target",
        metavar="ws://HOST:PORT",
        help="measure this running server instead of starting one",
    )
    add_command(parser, "with --target: its command endpoint")
    add_secret(parser, "with --target: its token secret", "the secret file")
    parser.add_argument(
        "--shards",
        type=positive_int,
        metavar="N",
        help="shards of the server the bench starts (default: CPUs)",
    )
    parser.add_argument(
        "--write-buffer-limit",
        type=positive_int,
        metavar="BYTES",
        default=ServeConfig.write_buffer_limit,
        help="of the server the bench starts (default: %(default)s)",
    )
    parser.add_argument(
        "--serve-arg",
        action="append",
        metavar="ARG",
        help="pass ARG to the `ucc serve` the bench starts (repeatable)",
    )
    parser.add_argument(
        "--payload",
        type=positive_int,
        default=100,
        metavar="BYTES",
        help="size of each message's JSON data (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=256,
        metavar="C",
        help="connection attempts in flight per client process",
    )
    parser.add_argument(
        "--client-procs",
        type=positive_int,
        metavar="P",
        help="client processes (default: 1, or N/12,500 up to 4)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    """The handler of ``ucc bench``: check the target, then run the bench (exit code)."""
    if args.target and not args.target.startswith("ws://"):
        print("ucc: error: --target must be a ws:// URL", file=sys.stderr)
        return 2
    from shards.bench.runner import run  # noqa: PLC0415 - the bench is heavy; load it when used

    code: int = run(args)
    return code
