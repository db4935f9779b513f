"""The ``ucc`` console script: ``serve``, ``token`` and the commands that drive a running server.

Owns: argument parsing, reading ``UCC_COMMAND`` and ``UCC_REDIS_URL``, turning flags into a
:class:`shards.config.ServeConfig`, and printing replies (JSON on stdout, errors on stderr as
``ucc: error: <code>: <message>``). Exit codes: 0 success, 1 a command failed or timed out,
2 a usage error (bad flags, bad JSON, no secret).

Must never print or log the token secret, never create the secret file outside ``serve``, and
never implement server logic: ``serve`` hands its config to :func:`shards.supervisor.run`, and
every other command goes through :class:`shards.client.Client`.

Adding a subcommand is one function: write ``_add_NAME(subparsers)`` that adds its parser and
sets ``run=`` to its handler (``(argparse.Namespace) -> int``), and list it in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import stat
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from actors.wire import tokens
from shards.client import Calls, Client, UccError
from shards.config import (
    DEFAULT_COMMAND,
    DEFAULT_HOST,
    DEFAULT_PORT,
    ServeConfig,
    check_redis_url,
    resolve_secret,
)

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Handler = Callable[[argparse.Namespace], int]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# --- argument types ----------------------------------------------------------------------------


def _id(text: str) -> int:
    """An integer id; range checks are the server's (or the token minter's) job."""
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer id, got {text!r}") from None


def _id_list(text: str) -> list[int]:
    """Comma-separated integer ids, e.g. ``1,2,3`` (the empty string is the empty list)."""
    if not text.strip():
        return []
    return [_id(part.strip()) for part in text.split(",")]


def _positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port (0-65535), got {text!r}")
    return value


def _positive_float(what: str) -> Callable[[str], float]:
    """An argument type: a finite number above 0, described as ``what`` in the error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_number = _positive_float("a positive number")
_seconds = _positive_float("a positive number of seconds")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_value(text: str) -> Any:
    """Strict JSON text (no NaN/Infinity), as sent in a broadcast's ``data``."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"DATA is not valid JSON ({exc}): {text!r}") from None


# --- output helpers ----------------------------------------------------------------------------


def _error(message: str) -> None:
    print(f"ucc: error: {message}", file=sys.stderr)


def _print_json(value: Any) -> None:
    print(json.dumps(value))


def _warn_missing(reply: dict[str, Any]) -> None:
    missing = reply.get("missing_shards")
    if missing:
        print(
            f"ucc: warning: shards {missing} were down or did not answer;"
            " their users are reported offline",
            file=sys.stderr,
        )


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    """``--command`` and ``--timeout``, for every subcommand that talks to a server."""
    parser.add_argument(
        "--command",
        metavar="ENDPOINT",
        default=os.environ.get("UCC_COMMAND") or DEFAULT_COMMAND,
        help="the server's ZeroMQ command endpoint (default: $UCC_COMMAND or %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="give up when the server has not answered within this time (default: %(default)s)",
    )


def _talk(args: argparse.Namespace, action: Callable[[Client], int]) -> int:
    """Run ``action`` with a client for ``args.command``, reporting failures as exit 1."""
    try:
        client = Client(args.command, timeout=args.timeout)
    except ValueError as exc:
        _error(str(exc))
        return 2
    with client:
        try:
            return action(client)
        except UccError as exc:
            _error(f"{exc.code}: {exc.message}")
            return 1


# --- serve -------------------------------------------------------------------------------------


def _add_serve(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the server (supervisor, WebSocket acceptor, shards)",
        description="Run the ucc server until SIGINT/SIGTERM.",
    )
    parser.add_argument(
        "--shards",
        type=_positive_int,
        default=None,
        metavar="N",
        help="number of shard processes (default: number of CPUs)",
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="WebSocket host (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help="WebSocket port (default: %(default)s)"
    )
    parser.add_argument(
        "--command",
        metavar="ENDPOINT",
        default=os.environ.get("UCC_COMMAND") or DEFAULT_COMMAND,
        help="ZeroMQ command endpoint to bind (default: $UCC_COMMAND or %(default)s)",
    )
    parser.add_argument(
        "--secret",
        default=None,
        help="token secret (default: $UCC_SECRET, else the secret file, created if missing)",
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=os.environ.get("UCC_REDIS_URL") or None,
        help="Redis URL for cross-host fan-out; redis+cluster://HOST:PORT (or rediss+cluster://)"
        " for a Redis Cluster (default: $UCC_REDIS_URL; none)",
    )
    parser.add_argument(
        "--cluster-name",
        default=os.environ.get("UCC_CLUSTER") or "default",
        help="with --redis: the cluster this host joins (default: $UCC_CLUSTER or %(default)s)",
    )
    parser.add_argument(
        "--heartbeat",
        type=_seconds,
        default=25.0,
        metavar="SECONDS",
        help="ping a silent connection after this long (default: %(default)s)",
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="close a connection silent for this long (default: %(default)s)",
    )
    tuning: list[tuple[str, Callable[[str], Any], str, str]] = [
        ("--handshake-timeout", _seconds, "SECONDS", "deadline for a client's upgrade request"),
        ("--max-frame", _positive_int, "BYTES", "largest client frame accepted"),
        ("--max-command", _positive_int, "BYTES", "largest backend command accepted"),
        ("--write-buffer-limit", _positive_int, "BYTES", "per-connection buffer before 4000"),
        ("--send-buffer", _positive_int, "BYTES", "kernel send buffer per connection"),
        ("--slow-consumer-timeout", _seconds, "SECONDS", "behind with writes this long: 4000"),
        ("--gather-timeout", _seconds, "SECONDS", "how long a query waits for the shards"),
        ("--shutdown-timeout", _seconds, "SECONDS", "SIGTERM: kill shards still alive after"),
        ("--drain-window", _seconds, "SECONDS", "SIGTERM: spread client closes over this"),
        ("--hang-timeout", _seconds, "SECONDS", "a shard silent this long is killed"),
        ("--max-pending", _positive_int, "N", "connections in handshake at most (503 beyond)"),
        ("--max-pending-per-address", _positive_int, "N", "the same, per client address"),
        ("--client-frame-rate", _positive_number, "FRAMES", "frames/s a client may send"),
        ("--client-frame-burst", _positive_int, "FRAMES", "frames a client may send at once"),
        ("--client-byte-rate", _positive_number, "BYTES", "bytes/s a client may send"),
        ("--client-byte-burst", _positive_int, "BYTES", "bytes a client may send at once"),
        ("--shard-queue-messages", _positive_int, "N", "deliveries in flight per shard"),
        ("--shard-queue-bytes", _positive_int, "BYTES", "delivery bytes in flight per shard"),
        ("--shard-queue-delay", _seconds, "SECONDS", "refuse when a shard is this far behind"),
        ("--max-queries", _positive_int, "N", "queries in flight at most (overloaded beyond)"),
        ("--backend-queue", _positive_int, "N", "commands/replies queued per backend"),
    ]
    for flag, kind, metavar, text in tuning:
        default = getattr(ServeConfig, flag.removeprefix("--").replace("-", "_"))
        parser.add_argument(
            flag, type=kind, default=default, metavar=metavar, help=f"{text} (default: {default})"
        )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help="logging level (default: %(default)s)",
    )
    parser.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    try:
        secret, path = resolve_secret(args.secret, create=True)
    except OSError as exc:
        _error(f"cannot read or create the token secret file: {exc}")
        return 2
    if not secret:
        _error(f"the token secret file {path} is empty; delete it or pass --secret")
        return 2
    if path is not None:
        try:
            mode = f"{stat.S_IMODE(path.stat().st_mode):04o}"
        except OSError:
            mode = "unknown"
        print(f"ucc: using token secret from {path} (mode {mode})", file=sys.stderr)
    if args.redis is not None:
        try:
            check_redis_url(args.redis)
        except ValueError as exc:
            _error(str(exc))
            return 2
    # every ServeConfig field has a flag of the same name (``--max-frame`` -> ``max_frame``)
    names = {f.name for f in dataclasses.fields(ServeConfig)} - {"secret", "shards"}
    fields: dict[str, Any] = {name: getattr(args, name) for name in names}
    fields["secret"] = secret
    if args.shards is not None:
        fields["shards"] = args.shards
    config = ServeConfig(**fields)

    from shards.supervisor import run  # noqa: PLC0415 - written in parallel; import when used

    code: int = run(config)
    return code


# --- token -------------------------------------------------------------------------------------


def _add_token(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "token",
        help="mint a connection token (JWT) for a user",
        description="Print a signed connection token for USER_ID on stdout.",
    )
    parser.add_argument("user", type=_id, metavar="USER_ID")
    parser.add_argument(
        "--channels",
        type=_id_list,
        default=None,
        metavar="C1,C2",
        help="channel ids the connection joins at connect and may subscribe to",
    )
    parser.add_argument(
        "--ttl",
        type=_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="validity (default: %(default)s)",
    )
    parser.add_argument(
        "--secret", default=None, help="token secret (default: $UCC_SECRET, else the secret file)"
    )
    parser.set_defaults(run=_run_token)


def _run_token(args: argparse.Namespace) -> int:
    try:
        secret, path = resolve_secret(args.secret, create=False)
    except FileNotFoundError as exc:
        _error(
            f"no token secret: {exc.filename} does not exist;"
            " run `ucc serve` first (it creates it) or pass --secret / set UCC_SECRET"
        )
        return 2
    except OSError as exc:
        _error(f"cannot read the token secret file: {exc}")
        return 2
    if not secret:
        _error(f"the token secret file {path} is empty; pass --secret or set UCC_SECRET")
        return 2
    try:
        token = tokens.mint(secret, args.user, args.channels, ttl=args.ttl)
    except ValueError as exc:
        _error(str(exc))
        return 2
    print(token)
    return 0


# --- commands that talk to a server ------------------------------------------------------------


def _add_broadcast(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "broadcast",
        help="send JSON data to a channel, a user or several users",
        description="Broadcast DATA (JSON text) to the WebSocket connections of the target.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--channel", type=_id, metavar="C", help="every subscriber of channel C")
    target.add_argument("--user", type=_id, metavar="U", help="every connection of user U")
    target.add_argument("--users", type=_id_list, metavar="U1,U2", help="several users")
    parser.add_argument(
        "data", type=_json_value, metavar="DATA", help="JSON text, e.g. '{\"a\":1}'"
    )
    _add_server_options(parser)
    parser.set_defaults(run=_run_broadcast)


def _run_broadcast(args: argparse.Namespace) -> int:
    def action(client: Client) -> int:
        if args.channel is not None:
            reply = client.broadcast_to_channel(args.channel, args.data)
        elif args.user is not None:
            reply = client.broadcast_to_user(args.user, args.data)
        else:
            reply = client.broadcast_to_users(args.users, args.data)
        _print_json(reply)
        return 0

    return _talk(args, action)


def _add_online(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "online",
        help="list online users (all, or in a channel) or check one user",
        description="Print online users as a JSON list, or true/false with --user.",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--channel", type=_id, metavar="C", help="users subscribed to channel C")
    target.add_argument("--user", type=_id, metavar="U", help="print whether user U is online")
    _add_server_options(parser)
    parser.set_defaults(run=_run_online)


def _run_online(args: argparse.Namespace) -> int:
    def action(client: Client) -> int:
        if args.user is not None:
            call = Calls.is_user_online(args.user)
            reply = client.request(call.cmd, **call.fields)
            _warn_missing(reply)
            _print_json(call.result(reply))
            return 0
        if args.channel is not None:
            users_call = Calls.get_online_users_in_channel(args.channel)
        else:
            users_call = Calls.get_online_users()
        reply = client.request(users_call.cmd, **users_call.fields)
        _warn_missing(reply)
        _print_json(users_call.result(reply))
        return 0

    return _talk(args, action)


def _add_subscribe(subparsers: Subparsers) -> None:
    for name, verb in (("subscribe", "to"), ("unsubscribe", "from")):
        parser = subparsers.add_parser(
            name,
            help=f"{name} all of a user's connections {verb} a channel",
            description=f"{name.capitalize()} every connection of USER {verb} CHANNEL.",
        )
        parser.add_argument("user", type=_id, metavar="USER")
        parser.add_argument("channel", type=_id, metavar="CHANNEL")
        _add_server_options(parser)
        parser.set_defaults(run=_run_subscribe, subscribe=name == "subscribe")


def _run_subscribe(args: argparse.Namespace) -> int:
    def action(client: Client) -> int:
        if args.subscribe:
            _print_json(client.subscribe(args.user, args.channel))
        else:
            _print_json(client.unsubscribe(args.user, args.channel))
        return 0

    return _talk(args, action)


def _add_disconnect(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "disconnect",
        help="close all of a user's connections (close code 4001)",
        description="Close every connection of USER with close code 4001.",
    )
    parser.add_argument("user", type=_id, metavar="USER")
    _add_server_options(parser)
    parser.set_defaults(run=_run_disconnect)


def _run_disconnect(args: argparse.Namespace) -> int:
    def action(client: Client) -> int:
        _print_json(client.disconnect(args.user))
        return 0

    return _talk(args, action)


STATUS_COLUMNS = ("index", "pid", "epoch", "state", "connections", "users", "channels")


def format_status(shards: Sequence[Any]) -> str:
    """The shards of a ``status`` reply as an aligned text table (one header line)."""
    rows = [[column.upper() for column in STATUS_COLUMNS]]
    for shard in shards:
        entry = shard if isinstance(shard, dict) else {}
        rows.append(["-" if entry.get(c) is None else str(entry.get(c)) for c in STATUS_COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(STATUS_COLUMNS))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if column == "state" else cell.rjust(width)
            for cell, width, column in zip(row, widths, STATUS_COLUMNS, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _add_status(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show the shards' state and counts",
        description="Print one line per shard: index, pid, epoch, state and counts.",
    )
    parser.add_argument("--json", action="store_true", help="print the raw reply as JSON")
    _add_server_options(parser)
    parser.set_defaults(run=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    def action(client: Client) -> int:
        reply = client.status()
        if args.json:
            _print_json(reply)
            return 0
        print(format_status(reply["shards"]))
        _warn_missing(reply)
        return 0

    return _talk(args, action)


# --- bench -------------------------------------------------------------------------------------

BENCH_SCENARIOS = ("idle", "fanout", "rooms", "direct", "connect")


def _rate(text: str) -> str:
    """Messages per second, or ``max`` (as fast as the server absorbs)."""
    if text == "max":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive rate or 'max', got {text!r}")
    return text


def _count_list(text: str) -> list[int]:
    """Comma-separated positive integers, e.g. ``1000,5000,10000``."""
    return [_positive_int(part.strip()) for part in text.split(",") if part.strip()]


def _add_bench(subparsers: Subparsers) -> None:
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
        choices=BENCH_SCENARIOS,
        metavar="SCENARIO",
        help="one of: " + ", ".join(BENCH_SCENARIOS),
    )
    parser.add_argument(
        "--connections", type=_positive_int, metavar="N", help="WebSocket connections to open"
    )
    parser.add_argument(
        "--members",
        type=_positive_int,
        metavar="M",
        help="members per channel (fanout: of the one channel)",
    )
    parser.add_argument("--rate", type=_rate, metavar="R", help="commands per second, or 'max'")
    parser.add_argument(
        "--messages",
        type=_positive_int,
        metavar="K",
        help="commands to publish (default: rate x duration)",
    )
    parser.add_argument(
        "--duration",
        type=_seconds,
        metavar="S",
        help="publishing time with --rate max; hold time for idle",
    )
    parser.add_argument(
        "--sweep",
        type=_count_list,
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
    parser.add_argument(
        "--command",
        metavar="ENDPOINT",
        default=os.environ.get("UCC_COMMAND") or DEFAULT_COMMAND,
        help="with --target: its command endpoint (default: %(default)s)",
    )
    parser.add_argument(
        "--secret",
        default=None,
        help="with --target: its token secret (default: $UCC_SECRET or file)",
    )
    parser.add_argument(
        "--shards",
        type=_positive_int,
        metavar="N",
        help="shards of the server the bench starts (default: CPUs)",
    )
    parser.add_argument(
        "--write-buffer-limit",
        type=_positive_int,
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
        type=_positive_int,
        default=100,
        metavar="BYTES",
        help="size of each message's JSON data (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=256,
        metavar="C",
        help="connection attempts in flight per client process",
    )
    parser.add_argument(
        "--client-procs",
        type=_positive_int,
        metavar="P",
        help="client processes (default: 1, or N/12,500 up to 4)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    if args.target and not args.target.startswith("ws://"):
        _error("--target must be a ws:// URL")
        return 2
    from shards.bench.runner import run  # noqa: PLC0415 - the bench is heavy; load it when used

    code: int = run(args)
    return code


# --- entry point -------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[Subparsers], None]] = [
    _add_serve,
    _add_token,
    _add_broadcast,
    _add_online,
    _add_subscribe,
    _add_disconnect,
    _add_status,
    _add_bench,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``ucc`` parser; reads ``UCC_COMMAND``/``UCC_REDIS_URL`` for defaults when called."""
    parser = argparse.ArgumentParser(
        prog="ucc",
        description="ucc: a sharded WebSocket connection cache driven over ZeroMQ.",
    )
    subparsers = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``ucc`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args = build_parser().parse_args(argv)
    run: Handler = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
