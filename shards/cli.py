"""The ``ucc`` console script: ``serve``, ``token``, ``keygen``, the commands that drive a
running server, and ``bench``.

Owns: each subcommand's parser and handler, turning ``serve``'s flags into a
:class:`shards.config.ServeConfig` (every field has a flag of the same name, whose default is the
field's), reading ``UCC_REDIS_URL``, ``UCC_CLUSTER`` and ``UCC_EVENTS``, and printing replies
(JSON on stdout, errors on stderr as ``ucc: error: <code>: <message>``). Exit codes: 0 success, 1
a command failed or timed out, 2 a usage error (bad flags, bad JSON, no secret). The argument
types and the shared ``--command`` / ``--secret`` options are in :mod:`shards.cliargs`;
``bench``'s parser is in :mod:`shards.bench.args`.

Must never print or log the token secret, never create the secret file outside ``serve``, and
never implement server logic: ``serve`` hands its config to :func:`shards.supervisor.run`, the
commands that drive a server go through :class:`shards.client.Client` (``events`` through
:class:`shards.events.EventFollower`), and ``bench`` runs :mod:`shards.bench`.

Adding a subcommand is one function: write ``_add_NAME(subparsers)`` that adds its parser and
sets ``run=`` to its handler (``(argparse.Namespace) -> int``), and list it in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from actors.wire import tokens
from shards.bench.args import add_bench
from shards.cliargs import (
    Subparsers,
    add_command,
    add_command_auth,
    add_secret,
    batch_window,
    byte_count,
    count,
    id_list,
    id_number,
    json_value,
    non_negative,
    on_off,
    port,
    positive_int,
    positive_number,
    seconds,
    serve_defaults,
)
from shards.client import Calls, Client, UccError
from shards.config import (
    ServeConfig,
    check_admin_token,
    check_batch_window,
    check_cluster_name,
    check_redis_url,
    check_secret,
    resolve_secret,
)
from shards.curve import check_command_security, is_local_endpoint, write_keypair
from shards.events import EventFollower, GapCounter, default_events

Handler = Callable[[argparse.Namespace], int]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


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
    """``--command``, ``--server-key``/``--client-key`` (CURVE) and ``--timeout``, for every
    subcommand that talks to a server."""
    add_command(parser, "the server's ZeroMQ command endpoint")
    add_command_auth(parser)
    parser.add_argument(
        "--timeout",
        type=seconds,
        default=5.0,
        metavar="SECONDS",
        help="give up when the server has not answered within this time (default: %(default)s)",
    )


def _talk(args: argparse.Namespace, action: Callable[[Client], int]) -> int:
    """Run ``action`` with a client for ``args.command``, reporting failures as exit 1."""
    try:
        client = Client(
            args.command,
            timeout=args.timeout,
            server_key=args.server_key,
            client_key_file=args.client_key,
        )
    except ValueError as exc:
        _error(str(exc))
        return 2
    with client:
        try:
            return action(client)
        except UccError as exc:
            _error(f"{exc.code}: {exc.message}")
            return 1


def _printed(action: Callable[[Client], Any]) -> Callable[[Client], int]:
    """An action for :func:`_talk` that prints what ``action`` returns as JSON (exit 0)."""

    def run(client: Client) -> int:
        _print_json(action(client))
        return 0

    return run


# --- serve -------------------------------------------------------------------------------------


# the plain flags of ``serve``: (flag, type, metavar, help); the flag ``--max-frame`` sets the
# ServeConfig field ``max_frame``, and that field's default is the flag's
Flag = tuple[str, Callable[[str], Any], str | None, str]
SERVE_ADDRESS: list[Flag] = [
    ("--host", str, None, "WebSocket host"),
    ("--port", port, None, "WebSocket port"),
]
SERVE_TUNING: list[Flag] = [
    ("--heartbeat", seconds, "SECONDS", "ping a silent connection after this long"),
    ("--heartbeat-timeout", seconds, "SECONDS", "close a connection silent for this long"),
    ("--handshake-timeout", seconds, "SECONDS", "deadline for a client's upgrade request"),
    ("--max-frame", positive_int, "BYTES", "largest client frame accepted"),
    ("--max-command", positive_int, "BYTES", "largest backend command accepted"),
    ("--write-buffer-limit", positive_int, "BYTES", "per-connection buffer before 4000"),
    ("--send-buffer", byte_count, "BYTES", "kernel send buffer per connection (0: kernel's)"),
    ("--slow-consumer-timeout", seconds, "SECONDS", "behind with writes this long: 4000"),
    ("--gather-timeout", seconds, "SECONDS", "how long a query waits for the shards"),
    ("--shutdown-timeout", seconds, "SECONDS", "SIGTERM: kill shards still alive after"),
    ("--drain-window", seconds, "SECONDS", "SIGTERM: spread client closes over this"),
    ("--hang-timeout", seconds, "SECONDS", "a shard silent this long is killed"),
    ("--max-pending", positive_int, "N", "connections in handshake at most (503 beyond)"),
    ("--max-pending-per-address", positive_int, "N", "the same, per client address"),
    ("--client-frame-rate", positive_number, "FRAMES", "frames/s a client may send"),
    ("--client-frame-burst", positive_int, "FRAMES", "frames a client may send at once"),
    ("--client-byte-rate", positive_number, "BYTES", "bytes/s a client may send"),
    ("--client-byte-burst", positive_int, "BYTES", "bytes a client may send at once"),
    ("--shard-queue-messages", positive_int, "N", "deliveries in flight per shard"),
    ("--shard-queue-bytes", positive_int, "BYTES", "delivery bytes in flight per shard"),
    ("--shard-queue-delay", seconds, "SECONDS", "refuse when a shard is this far behind"),
    ("--max-queries", positive_int, "N", "queries in flight at most (overloaded beyond)"),
    ("--batch-window", batch_window, "SECONDS", "under load, the shortest batching hold (0: off)"),
    (
        "--batch-window-max",
        batch_window,
        "SECONDS",
        "the longest batching hold, the most a command waits for its batch (default: 0.01,"
        " or a quarter of --shard-queue-delay if less)",
    ),
    ("--backend-queue", positive_int, "N", "commands/replies queued per backend"),
    ("--max-connections-per-user", positive_int, "N", "connections per user on this host (429)"),
    ("--max-channels-per-connection", positive_int, "N", "channels per connection (limit)"),
    ("--connect-rate", positive_number, "R", "upgrades/s per source address, burst 2R (429)"),
    ("--token-leeway", non_negative, "SECONDS", "clock skew allowed on a token's exp"),
    ("--history-size", count, "N", "messages kept per channel for resume (0: off)"),
    ("--history-ttl", seconds, "SECONDS", "a channel's history lives this long after its last"),
    ("--history-memory", positive_int, "BYTES", "all histories; beyond, the oldest are evicted"),
    ("--ack-timeout", seconds, "SECONDS", "re-send an unacknowledged critical message after"),
    ("--ack-retries", count, "N", "re-sends of a critical message per connection, at most"),
    ("--critical-per-user", positive_int, "N", "unacknowledged critical messages per user"),
    ("--critical-memory", positive_int, "BYTES", "all critical messages kept, at most"),
]


def _field(flag: str) -> str:
    """The ServeConfig field a flag sets: ``--max-frame`` -> ``max_frame``."""
    return flag.removeprefix("--").replace("-", "_")


def _add_flags(parser: argparse.ArgumentParser, rows: list[Flag], defaults: dict[str, Any]) -> None:
    for flag, kind, metavar, text in rows:
        default = defaults[_field(flag)]
        shown = text if default is None else f"{text} (default: {default})"
        parser.add_argument(flag, type=kind, default=default, metavar=metavar, help=shown)


def _add_serve(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the server (supervisor, WebSocket acceptor, shards)",
        description="Run the ucc server until SIGINT/SIGTERM.",
    )
    defaults = serve_defaults()
    parser.add_argument(
        "--shards",
        type=positive_int,
        default=None,
        metavar="N",
        help="number of shard processes (default: number of CPUs)",
    )
    _add_flags(parser, SERVE_ADDRESS, defaults)
    add_command(parser, "ZeroMQ command endpoint to bind")
    add_secret(parser, "token secret", "the secret file, created if missing")
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=os.environ.get("UCC_REDIS_URL") or defaults["redis"],
        help="Redis URL for cross-host fan-out; redis+cluster://HOST:PORT[,HOST:PORT...] (or"
        " rediss+cluster://) for a Redis Cluster: one seed node or several"
        " (default: $UCC_REDIS_URL; none)",
    )
    parser.add_argument(
        "--cluster-name",
        default=os.environ.get("UCC_CLUSTER") or defaults["cluster_name"],
        help="with --redis: the cluster this host joins (default: $UCC_CLUSTER or %(default)s)",
    )
    _add_flags(parser, SERVE_TUNING, defaults)
    parser.add_argument(
        "--allowed-origin",
        dest="allowed_origins",
        action="append",
        metavar="ORIGIN",
        default=None,
        help="a browser origin allowed to connect, scheme://host[:port], '*.' for one sub-domain"
        " label (repeatable; default: $UCC_ALLOWED_ORIGINS, comma-separated; none: any origin)",
    )
    for flag, env, text in (
        ("--token-audience", "UCC_TOKEN_AUDIENCE", "tokens must carry this aud"),
        ("--token-issuer", "UCC_TOKEN_ISSUER", "tokens must carry this iss"),
        ("--command-key", "UCC_COMMAND_KEY", "the server's CURVE secret key file (enables CURVE)"),
        ("--command-clients", "UCC_COMMAND_CLIENTS", "directory of admitted clients' *.pub keys"),
        ("--cluster-secret", "UCC_CLUSTER_SECRET", "MAC key of cluster messages"),
        (
            "--events",
            "UCC_EVENTS",
            "ZeroMQ PUB endpoint of the event stream, e.g. tcp://127.0.0.1:5556",
        ),
        (
            "--metrics",
            "UCC_METRICS",
            "HOST:PORT serving /metrics, /healthz, /readyz, /admin and /ucc.js",
        ),
        (
            "--admin-token",
            "UCC_ADMIN_TOKEN",
            "token /admin asks for (Bearer or ?token=); without it, loopback clients only",
        ),
    ):
        parser.add_argument(
            flag,
            metavar=flag.removeprefix("--").split("-")[-1].upper(),
            default=os.environ.get(env) or None,
            help=f"{text} (default: ${env}; none)",
        )
    parser.add_argument(
        "--insecure-command",
        action="store_true",
        help="allow a command endpoint on a non-loopback address without CURVE",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=defaults["log_level"],
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
    try:
        check_secret(secret)
        if args.cluster_secret is not None:
            check_secret(args.cluster_secret, "--cluster-secret / UCC_CLUSTER_SECRET")
        if args.redis is not None:
            check_redis_url(args.redis)
            check_cluster_name(args.cluster_name)
        if args.admin_token is not None:
            check_admin_token(args.admin_token)
        check_batch_window(args.batch_window, args.shard_queue_delay, args.batch_window_max or 0.0)
    except ValueError as exc:
        _error(str(exc))
        return 2
    refusal = check_command_security(
        args.command, args.command_key, args.command_clients, args.insecure_command
    )
    if refusal is not None:
        _error(refusal)
        return 2
    if args.command_key is None and not is_local_endpoint(args.command):
        print(
            f"ucc: WARNING: the command endpoint {args.command} is not on a loopback address"
            " and has no authentication (--insecure-command): anyone who reaches it can"
            " broadcast or disconnect any user",
            file=sys.stderr,
        )
    if args.events is not None and not is_local_endpoint(args.events):
        print(
            f"ucc: WARNING: the event stream {args.events} is not on a loopback address: anyone"
            " who reaches it sees every user's connections and channels",
            file=sys.stderr,
        )
    if args.allowed_origins is None:
        listed = os.environ.get("UCC_ALLOWED_ORIGINS", "")
        args.allowed_origins = [o.strip() for o in listed.split(",") if o.strip()]
    args.allowed_origins = tuple(args.allowed_origins)
    # every ServeConfig field has a flag of the same name (``--max-frame`` -> ``max_frame``);
    # the secret is the one resolved above, and no --shards means the field's default (CPUs)
    names = {f.name for f in dataclasses.fields(ServeConfig)} - {"secret", "shards"}
    fields: dict[str, Any] = {name: getattr(args, name) for name in names}
    fields["secret"] = secret
    if args.shards is not None:
        fields["shards"] = args.shards
    config = ServeConfig(**fields)

    # imported here, not at the top: the other subcommands need none of the server's modules
    from shards.supervisor import run  # noqa: PLC0415

    code: int = run(config)
    return code


# --- token -------------------------------------------------------------------------------------


def _add_token(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "token",
        help="mint a connection token (JWT) for a user",
        description="Print a signed connection token for USER_ID on stdout.",
    )
    parser.add_argument("user", type=id_number, metavar="USER_ID")
    parser.add_argument(
        "--channels",
        type=id_list,
        default=None,
        metavar="C1,C2",
        help="channel ids the connection joins at connect and may subscribe to",
    )
    parser.add_argument(
        "--ttl",
        type=seconds,
        default=3600.0,
        metavar="SECONDS",
        help="validity (default: %(default)s)",
    )
    add_secret(parser, "token secret", "the secret file")
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


# --- keygen ------------------------------------------------------------------------------------


def _add_keygen(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "keygen",
        help="write a CURVE keypair for the command endpoint (server or client)",
        description="Write a new CURVE keypair: PATH (the secret key, mode 0600) and PATH.pub"
        " (the public key), each one z85 line. Refuses to overwrite either. The server takes"
        " its secret file with --command-key and its clients' .pub files in --command-clients;"
        " a client takes its secret file with --client-key and the server's .pub (or the z85"
        " text printed here) with --server-key.",
    )
    parser.add_argument("path", metavar="PATH", help="the secret key file to create")
    parser.set_defaults(run=_run_keygen)


def _run_keygen(args: argparse.Namespace) -> int:
    try:
        public = write_keypair(args.path)
    except FileExistsError as exc:
        _error(f"{exc.filename} exists; refusing to overwrite a key (remove it first)")
        return 2
    except OSError as exc:
        _error(f"cannot write the key files: {exc}")
        return 2
    print(f"ucc: wrote secret key {args.path} and public key {args.path}.pub", file=sys.stderr)
    print(public.decode("ascii"))
    return 0


# --- commands that talk to a server ------------------------------------------------------------


def _add_broadcast(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "broadcast",
        help="send JSON data to a channel, a user or several users",
        description="Broadcast DATA (JSON text) to the WebSocket connections of the target.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--channel", type=id_number, metavar="C", help="every subscriber of channel C"
    )
    target.add_argument("--user", type=id_number, metavar="U", help="every connection of user U")
    target.add_argument("--users", type=id_list, metavar="U1,U2", help="several users")
    parser.add_argument("data", type=json_value, metavar="DATA", help="JSON text, e.g. '{\"a\":1}'")
    parser.add_argument(
        "--critical",
        action="store_true",
        help="with --user/--users: keep it until acknowledged, and deliver it to every new"
        " connection of the user until then (the reply's message_id is its id)",
    )
    parser.add_argument(
        "--ttl",
        type=seconds,
        default=None,
        metavar="SECONDS",
        help="with --critical: drop it unacknowledged after this long (default: one day)",
    )
    _add_server_options(parser)
    parser.set_defaults(run=_run_broadcast)


def _run_broadcast(args: argparse.Namespace) -> int:
    if args.channel is not None and args.critical:
        _error("--critical is for --user or --users: channel messages are kept as history")
        return 2
    if args.ttl is not None and not args.critical:
        _error("--ttl is the lifetime of a --critical message")
        return 2

    def action(client: Client) -> Any:
        if args.channel is not None:
            return client.broadcast_to_channel(args.channel, args.data)
        if args.user is not None:
            return client.broadcast_to_user(args.user, args.data, args.critical, args.ttl)
        return client.broadcast_to_users(args.users, args.data, args.critical, args.ttl)

    return _talk(args, _printed(action))


def _add_history(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "history",
        help="print a channel's kept messages (one JSON line each)",
        description="Print the messages CHANNEL keeps (--history-size), oldest first, one JSON"
        ' line each: {"offset": N, "data": ...}. With --json, the whole reply (its "epoch"'
        ' and "offset", the latest, besides the messages).',
    )
    parser.add_argument("channel", type=id_number, metavar="CHANNEL")
    parser.add_argument(
        "--since",
        type=count,
        default=0,
        metavar="N",
        help="only the messages after offset N (default: %(default)s, all kept)",
    )
    parser.add_argument(
        "--limit",
        type=positive_int,
        default=100,
        metavar="L",
        help="at most L messages, the oldest after N (default: %(default)s, at most 1000)",
    )
    parser.add_argument("--json", action="store_true", help="print the raw reply as JSON")
    _add_server_options(parser)
    parser.set_defaults(run=_run_history)


def _run_history(args: argparse.Namespace) -> int:
    def action(client: Client) -> int:
        reply = client.history(args.channel, args.since, args.limit)
        if args.json:
            _print_json(reply)
            return 0
        for message in reply["messages"]:
            _print_json(message)
        return 0

    return _talk(args, action)


def _add_online(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "online",
        help="list online users (all, or in a channel) or check one user",
        description="Print online users as a JSON list, or true/false with --user.",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--channel", type=id_number, metavar="C", help="users subscribed to channel C"
    )
    target.add_argument(
        "--user", type=id_number, metavar="U", help="print whether user U is online"
    )
    _add_server_options(parser)
    parser.set_defaults(run=_run_online)


def _run_online(args: argparse.Namespace) -> int:
    def action(client: Client) -> int:
        if args.user is not None:
            call = Calls.is_user_online(args.user)
            reply = client.request(call.cmd, **call.fields)
            _warn_missing(reply)
            _warn_no_cluster(reply)
            _print_json(call.result(reply))
            return 0
        if args.channel is not None:
            users_call = Calls.get_online_users_in_channel(args.channel)
        else:
            users_call = Calls.get_online_users()
        reply = client.request(users_call.cmd, **users_call.fields)
        _warn_missing(reply)
        _warn_no_cluster(reply)
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
        parser.add_argument("user", type=id_number, metavar="USER")
        parser.add_argument("channel", type=id_number, metavar="CHANNEL")
        _add_server_options(parser)
        parser.set_defaults(run=_run_subscribe, subscribe=name == "subscribe")


def _run_subscribe(args: argparse.Namespace) -> int:
    def action(client: Client) -> Any:
        if args.subscribe:
            return client.subscribe(args.user, args.channel)
        return client.unsubscribe(args.user, args.channel)

    return _talk(args, _printed(action))


def _add_disconnect(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "disconnect",
        help="close all of a user's connections (close code 4001)",
        description="Close every connection of USER with close code 4001.",
    )
    parser.add_argument("user", type=id_number, metavar="USER")
    _add_server_options(parser)
    parser.set_defaults(run=_run_disconnect)


def _run_disconnect(args: argparse.Namespace) -> int:
    return _talk(args, _printed(lambda client: client.disconnect(args.user)))


STATUS_COLUMNS = ("index", "state", "pid", "epoch", "connections", "users", "channels")
TOTALLED = ("connections", "users", "channels")
# where a status (or router_stats) reply may say on which address the host listens
LISTEN_KEYS = ("websocket", "listen", "ws")


def format_status(shards: Sequence[Any]) -> str:
    """The shards of a ``status`` reply as an aligned text table (one header line), with a
    ``total`` line when there are several shards."""
    rows = [[column.upper() for column in STATUS_COLUMNS]]
    totals = dict.fromkeys(TOTALLED, 0)
    for shard in shards:
        entry = shard if isinstance(shard, dict) else {}
        rows.append(["-" if entry.get(c) is None else str(entry.get(c)) for c in STATUS_COLUMNS])
        for column in TOTALLED:
            value = entry.get(column)
            if isinstance(value, int) and not isinstance(value, bool):
                totals[column] += value
    if len(rows) > 2:
        rows.append(
            ["total", f"{sum(1 for r in rows[1:] if r[1] == 'up')}/{len(rows) - 1} up", "", ""]
            + [str(totals[column]) for column in TOTALLED]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(STATUS_COLUMNS))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if column in ("index", "state") else cell.rjust(width)
            for cell, width, column in zip(row, widths, STATUS_COLUMNS, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_duration(seconds_: float) -> str:
    """``3d 4h05m06s``, ``4h05m06s``, ``5m06s`` or ``6s``."""
    total = int(max(0.0, seconds_))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h{minutes:02d}m{secs:02d}s"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _redis_line(status: dict[str, Any], stats: dict[str, Any] | None) -> str:
    """The Redis link, from ``router_stats``' ``redis`` (and the status reply's ``cluster``)."""
    if stats is None:
        return "unknown (router_stats did not answer)"
    link = stats.get("redis")
    if not isinstance(link, dict):
        return "none (one host, no --redis)"
    up = link.get("up")
    if not isinstance(up, bool):
        up = status.get("cluster") if isinstance(status.get("cluster"), bool) else None
    state = "linked" if up is None else ("up" if up else "DOWN")
    counters = ", ".join(
        f"{name} {link[name]}"
        for name in ("published", "received", "reconnects")
        if _number(link.get(name)) is not None
    )
    return f"{state} ({counters})" if counters else state


def format_status_report(
    endpoint: str, status: dict[str, Any], stats: dict[str, Any] | None, now: float
) -> str:
    """The whole ``ucc status`` text: addresses, uptime, the Redis link, then the shard table
    with its totals. ``stats`` is the ``router_stats`` reply, or None if it did not come."""
    sources = [status] + ([stats] if stats is not None else [])
    lines = [f"command    {endpoint}"]
    listen = next(
        (str(s[key]) for s in sources for key in LISTEN_KEYS if isinstance(s.get(key), str)),
        None,
    )
    if listen is not None:
        lines.append(f"websocket  {listen}")
    metrics = status.get("metrics")
    if isinstance(metrics, str):
        lines.append(f"metrics    {metrics}/metrics  (admin page: {metrics}/admin)")
    uptime = next((_number(s.get("uptime")) for s in sources if _number(s.get("uptime"))), None)
    if uptime is None:
        started = next(
            (_number(s.get("started_at")) for s in sources if _number(s.get("started_at"))), None
        )
        uptime = None if started is None else now - started
    if uptime is not None:
        lines.append(f"uptime     {format_duration(uptime)}")
    lines.append(f"redis      {_redis_line(status, stats)}")
    lines.append("")
    lines.append(format_status(status.get("shards") or []))
    return "\n".join(lines)


def _add_status(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show the host: addresses, Redis link, shards and totals",
        description="Print the command endpoint (and the WebSocket address and uptime when the"
        " server reports them), the Redis link (from router_stats), then one line per shard:"
        " index, state, pid, epoch, connections, users, channels, and their totals.",
    )
    parser.add_argument("--json", action="store_true", help="print the raw status reply as JSON")
    _add_server_options(parser)
    parser.set_defaults(run=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    def action(client: Client) -> int:
        call = Calls.status()
        reply = client.request(call.cmd, **call.fields)
        call.result(reply)
        if args.json:
            _print_json(reply)
            _warn_missing(reply)
            return 0
        stats: dict[str, Any] | None
        try:
            stats = client.request("router_stats")
        except UccError:
            stats = None
        print(format_status_report(args.command, reply, stats, time.time()))
        _warn_missing(reply)
        return 0

    return _talk(args, action)


def _add_stats(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "stats",
        help="print the router's counters (router_stats, JSON)",
        description="Print the router_stats reply as JSON: the router's own counters, the"
        " acceptor's, and with --redis the link's (docs/protocol.md).",
    )
    _add_server_options(parser)
    parser.set_defaults(run=_run_stats)


def _run_stats(args: argparse.Namespace) -> int:
    return _talk(args, _printed(lambda client: client.request("router_stats")))


def _warn_no_cluster(reply: dict[str, Any]) -> None:
    if reply.get("cluster") is False:
        error = reply.get("cluster_error") or "Redis did not answer"
        print(
            f"ucc: warning: only this host was asked ({error}); users on other hosts are"
            " reported offline",
            file=sys.stderr,
        )


# --- issue 12: the event stream, connection metadata, join/leave marks -------------------------


def _add_events(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "events",
        help="print the server's events as JSON lines (--follow: resync on gaps)",
        description="Print the events a server started with --events publishes, one JSON line"
        " each, as they come. Without --follow, a gap in seq (this subscriber fell behind and"
        " ZeroMQ dropped events) is reported on stderr. With --follow, the first line is a"
        ' snapshot ({"type": "resync", "seq": S, "host": H, "connections": [...]}, from the'
        " command endpoint), then the events after it in order; on a gap, a new resync line.",
    )
    parser.add_argument(
        "--endpoint",
        metavar="ENDPOINT",
        default=default_events(),
        help="the server's event endpoint (its --events; default: $UCC_EVENTS or %(default)s)",
    )
    parser.add_argument(
        "--follow",
        action="store_true",
        help="start from a snapshot and resync on gaps, through the command endpoint",
    )
    parser.add_argument(
        "--count",
        type=positive_int,
        default=None,
        metavar="N",
        help="stop after N lines (default: never)",
    )
    parser.add_argument(
        "--duration",
        type=seconds,
        default=None,
        metavar="SECONDS",
        help="stop after this long (default: never)",
    )
    parser.add_argument(
        "--rcvhwm",
        type=positive_int,
        default=None,
        metavar="N",
        help="the subscriber's receive high-water mark (default: ZeroMQ's, 1000)",
    )
    _add_server_options(parser)
    parser.set_defaults(run=_run_events)


_LINE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _run_events(args: argparse.Namespace) -> int:
    try:
        follower = EventFollower(
            args.endpoint,
            args.command if args.follow else None,
            timeout=args.timeout,
            server_key=args.server_key,
            client_key_file=args.client_key,
            rcvhwm=args.rcvhwm,
        )
    except ValueError as exc:
        _error(str(exc))
        return 2
    gaps = GapCounter()
    printed = 0
    deadline = None if args.duration is None else time.monotonic() + args.duration
    with follower:
        try:
            while args.count is None or printed < args.count:
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    break
                item = follower.poll(wait)
                if item is None:
                    continue
                missed = None if args.follow else gaps.see(item)
                if missed is not None:
                    print(
                        f"ucc: warning: missed events {missed[0]}..{missed[1]} of host"
                        f" {item.get('host')} (this subscriber fell behind; --follow resyncs)",
                        file=sys.stderr,
                    )
                sys.stdout.write(_LINE.encode(item) + "\n")
                sys.stdout.flush()
                printed += 1
        except UccError as exc:
            _error(f"snapshot failed: {exc.code}: {exc.message}")
            return 1
        except BrokenPipeError:
            # the reader went away (`ucc events | head`): not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _add_snapshot(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "snapshot",
        help="print this host's connections and the event stream's position (JSON)",
        description='Print the server\'s snapshot as JSON: {"seq", "host", "connections":'
        ' [{"conn", "user", "shard", "channels", "connected_at", "last_activity", "remote"},'
        ' ...], "missing_shards"}. Applying the events with a higher seq to it gives the'
        " current state.",
    )
    _add_server_options(parser)
    parser.set_defaults(run=_run_snapshot)


def _run_snapshot(args: argparse.Namespace) -> int:
    def action(client: Client) -> int:
        reply = client.snapshot()
        _print_json(reply)
        _warn_missing(reply)
        return 0

    return _talk(args, action)


WHO_COLUMNS = ("conn", "host", "shard", "connected", "idle", "channels", "remote")
MAX_CHANNELS_SHOWN = 8


def _when(stamp: Any) -> str:
    if isinstance(stamp, bool) or not isinstance(stamp, int | float):
        return "-"
    moment = datetime.datetime.fromtimestamp(stamp, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _idle(stamp: Any, now: float) -> str:
    if isinstance(stamp, bool) or not isinstance(stamp, int | float):
        return "-"
    return f"{max(0.0, now - stamp):.0f}s"


def _channels(channels: Any) -> str:
    if not isinstance(channels, list) or not channels:
        return "-"
    shown = ",".join(str(c) for c in channels[:MAX_CHANNELS_SHOWN])
    extra = len(channels) - MAX_CHANNELS_SHOWN
    return shown + (f",…(+{extra})" if extra > 0 else "")


def format_connections(connections: Sequence[Any], now: float) -> str:
    """A ``get_user_connections`` reply's connections as an aligned text table (one header
    line): times in UTC, ``idle`` the seconds since the connection's last activity at ``now``."""
    rows = [[column.upper() for column in WHO_COLUMNS]]
    for connection in connections:
        entry = connection if isinstance(connection, dict) else {}
        rows.append(
            [
                str(entry.get("conn", "-")),
                str(entry.get("host", "-")),
                str(entry.get("shard", "-")),
                _when(entry.get("connected_at")),
                _idle(entry.get("last_activity"), now),
                _channels(entry.get("channels")),
                str(entry.get("remote") or "-"),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(WHO_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


def _add_who(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "who",
        help="list a user's connections (on every host with --redis)",
        description="Print one line per connection of USER: its id, host, shard, when it"
        " connected (UTC), how long it has been idle, its channels and its remote address.",
    )
    parser.add_argument("user", type=id_number, metavar="USER")
    parser.add_argument("--json", action="store_true", help="print the raw reply as JSON")
    _add_server_options(parser)
    parser.set_defaults(run=_run_who)


def _run_who(args: argparse.Namespace) -> int:
    def action(client: Client) -> int:
        call = Calls.get_user_connections(args.user)
        reply = client.request(call.cmd, **call.fields)
        connections = call.result(reply)
        if args.json:
            _print_json(reply)
        else:
            print(format_connections(connections, time.time()))
        _warn_missing(reply)
        if reply.get("cluster") is False:
            error = reply.get("cluster_error") or "Redis did not answer"
            print(f"ucc: warning: only this host was asked ({error})", file=sys.stderr)
        return 0

    return _talk(args, action)


def _add_channel(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "channel",
        help="set a channel's options: --join-leave on|off",
        description="Mark CHANNEL so that its members get join/leave frames when a user's"
        " first connection subscribes to it or its last one leaves (--join-leave on), or"
        " unmark it (off). Kept by the router; cluster-wide with --redis.",
    )
    parser.add_argument("channel", type=id_number, metavar="CHANNEL")
    parser.add_argument(
        "--join-leave",
        type=on_off,
        required=True,
        metavar="on|off",
        help="push join/leave frames to the channel's members, or stop",
    )
    _add_server_options(parser)
    parser.set_defaults(run=_run_channel)


def _run_channel(args: argparse.Namespace) -> int:
    return _talk(args, _printed(lambda client: client.set_channel(args.channel, args.join_leave)))


# --- entry point -------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[Subparsers], None]] = [
    _add_serve,
    _add_token,
    _add_keygen,
    _add_broadcast,
    _add_history,
    _add_online,
    _add_subscribe,
    _add_disconnect,
    _add_status,
    _add_stats,
    _add_events,
    _add_snapshot,
    _add_who,
    _add_channel,
    add_bench,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``ucc`` parser; reads ``UCC_COMMAND``, ``UCC_REDIS_URL``, ``UCC_CLUSTER`` and
    ``UCC_EVENTS`` (the defaults of their flags) when called."""
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
