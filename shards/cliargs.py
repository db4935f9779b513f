"""Argument types and the options that several ``ucc`` subcommands share.

Owns: parsing ids, ports, positive numbers, on/off and JSON data from the command line (each
failure an ``argparse`` error naming what was expected), and the ``--command`` and
``--secret`` options, defined once for ``serve``, the commands that drive a server and
``bench`` (and ``--server-key``/``--client-key`` for the commands that drive a server). Reads
``UCC_COMMAND`` when a parser is built. Must never read the secret itself: ``--secret`` only
says where it comes from (:func:`shards.config.resolve_secret` does the reading).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any, TypeAlias

from actors.wire.commands import _reject_constant  # NaN/Infinity: the server's rule, not ours
from shards.config import ServeConfig

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def serve_defaults() -> dict[str, Any]:
    """Every :class:`ServeConfig` field that has a plain default, by name."""
    return {
        field.name: field.default
        for field in dataclasses.fields(ServeConfig)
        if field.default is not dataclasses.MISSING
    }


def id_number(text: str) -> int:
    """An integer id; range checks are the server's (or the token minter's) job."""
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer id, got {text!r}") from None


def id_list(text: str) -> list[int]:
    """Comma-separated integer ids, e.g. ``1,2,3`` (the empty string is the empty list)."""
    if not text.strip():
        return []
    return [id_number(part.strip()) for part in text.split(",")]


def byte_count(text: str) -> int:
    """A number of bytes, 0 or more (0: leave it to the kernel, where a flag says so)."""
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of bytes, 0 or more, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def count(text: str) -> int:
    """A whole number, 0 or more (0: off, where a flag says so)."""
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more, got {text!r}")
    return value


def port(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port (0-65535), got {text!r}")
    return value


def positive_float(what: str, zero: bool = False) -> Callable[[str], float]:
    """An argument type: a finite number above 0 (or 0 too, with ``zero``), described as
    ``what`` in the error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not (value >= 0 if zero else value > 0) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_number = positive_float("a positive number")
seconds = positive_float("a positive number of seconds")
non_negative = positive_float("a number of seconds, 0 or more", zero=True)

MAX_BATCH_WINDOW = 0.1  # seconds: under load a command may wait this long for its batch


MIN_BATCH_WINDOW = 0.0001  # seconds: shorter would hold for nothing (0 is off)


def batch_window(text: str) -> float:
    """``--batch-window``: 0 (off), or MIN_BATCH_WINDOW to MAX_BATCH_WINDOW seconds."""
    value = non_negative(text)
    if 0 < value < MIN_BATCH_WINDOW:
        raise argparse.ArgumentTypeError(
            f"expected 0 (off) or at least {MIN_BATCH_WINDOW} seconds, got {text!r}"
        )
    if value > MAX_BATCH_WINDOW:
        raise argparse.ArgumentTypeError(
            f"expected at most {MAX_BATCH_WINDOW} seconds (under load a command waits up to "
            f"this long), got {text!r}"
        )
    return value


_ON_OFF = {"on": True, "true": True, "yes": True, "1": True}
_ON_OFF |= {"off": False, "false": False, "no": False, "0": False}


def on_off(text: str) -> bool:
    """``on`` or ``off`` (also true/false, yes/no, 1/0; any case)."""
    value = _ON_OFF.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return value


def json_value(text: str) -> Any:
    """Strict JSON text (no NaN/Infinity), as sent in a broadcast's ``data``."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"DATA is not valid JSON ({exc}): {text!r}") from None


def add_command(parser: argparse.ArgumentParser, what: str) -> None:
    """``--command ENDPOINT``: the ZeroMQ command endpoint, ``$UCC_COMMAND`` or the default;
    ``what`` says what the endpoint is to this subcommand."""
    parser.add_argument(
        "--command",
        metavar="ENDPOINT",
        default=os.environ.get("UCC_COMMAND") or ServeConfig.command,
        help=f"{what} (default: $UCC_COMMAND or %(default)s)",
    )


def add_command_auth(parser: argparse.ArgumentParser) -> None:
    """``--server-key KEY`` and ``--client-key FILE``: talk to a CURVE command endpoint (the
    defaults, ``$UCC_COMMAND_SERVER_KEY`` and ``$UCC_COMMAND_CLIENT_KEY``, are read by
    :class:`shards.client.Client`)."""
    parser.add_argument(
        "--server-key",
        metavar="KEY",
        default=None,
        help="the server's CURVE public key: z85 text or a .pub file"
        " (default: $UCC_COMMAND_SERVER_KEY; none: plain)",
    )
    parser.add_argument(
        "--client-key",
        metavar="FILE",
        default=None,
        help="this client's CURVE secret key file, from `ucc keygen`"
        " (default: $UCC_COMMAND_CLIENT_KEY)",
    )


def add_secret(parser: argparse.ArgumentParser, what: str, otherwise: str) -> None:
    """``--secret S``: the token secret, given on the command line; ``otherwise`` says where it
    comes from without it."""
    parser.add_argument(
        "--secret", default=None, help=f"{what} (default: $UCC_SECRET, else {otherwise})"
    )
