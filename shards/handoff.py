"""Handing an accepted TCP connection from the supervisor to a shard (SCM_RIGHTS).

Owns: the framing on the supervisor ↔ shard Unix socket (``SOCK_SEQPACKET``, so every message
arrives whole): a JSON header and at most one file descriptor. Must never read from the TCP
socket: its bytes (the HTTP upgrade request) stay in the kernel for the shard to read.
"""

from __future__ import annotations

import json
import socket
from typing import Any

MAX_HEADER = 64 * 1024


def control_pair() -> tuple[socket.socket, socket.socket]:
    """The (supervisor end, shard end) of a new control channel."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_connection(sock: socket.socket, header: dict[str, Any], conn: socket.socket) -> None:
    """Send ``header`` and the descriptor of ``conn``; raises BlockingIOError when full."""
    socket.send_fds(sock, [json.dumps(header).encode()], [conn.fileno()])


def send_message(sock: socket.socket, header: dict[str, Any]) -> None:
    sock.send(json.dumps(header).encode())


def recv_connection(sock: socket.socket) -> tuple[dict[str, Any], socket.socket | None] | None:
    """The next message and its connection, if any; None when the other end has closed."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_HEADER, 1)
    if not data and not fds:
        return None
    conn = socket.socket(fileno=fds[0]) if fds else None
    return json.loads(data), conn
