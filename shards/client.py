"""The backend client: drive a ucc server over its ZeroMQ command protocol (docs/protocol.md).

Owns: encoding commands (one JSON frame, an incrementing ``id``), matching replies to requests
by ``id``, the client-side deadline, and turning ``ok: false`` replies into :class:`UccError`.
:class:`Client` is the blocking flavour, :class:`AsyncClient` the ``zmq.asyncio`` one; both share
the pure half (:class:`Calls`, :class:`Wire`) so that a command is described exactly once.

Must never hang (every wait is bounded by ``timeout``; an unanswered request raises
:class:`CommandTimeout`), never validate ids itself (the server does, so its errors are
observable), and never send anything that is not strict JSON.

Client-side error codes, besides the server's: ``timeout`` (no reply in time) and ``bad_reply``
(the server answered something that is not a well-formed reply).

Delivery note: a request that timed out may still have reached the server (its late reply is
discarded). Requests are only queued on a completed connection (``ZMQ_IMMEDIATE``), so one sent
while the server is unreachable is dropped rather than delivered after a restart.

CURVE: with ``server_key`` (the server's public key: z85 text of 40 characters, or else the
path of its ``.pub`` file) the socket is a CURVE client using the keypair of
``client_key_file`` (the secret file written by ``ucc keygen``; its public half is derived from
it). Without the arguments, ``$UCC_COMMAND_SERVER_KEY`` and ``$UCC_COMMAND_CLIENT_KEY`` are the
defaults; pass ``server_key=""`` for a plain client whatever the environment says. A client
whose key the server does not list gets no session: its requests time out.

Endpoint: without one, ``$UCC_COMMAND`` is the default (else ``tcp://127.0.0.1:5555``), as for
the ``ucc`` commands.

Neither class is thread-safe. Concurrent coroutines may share one :class:`AsyncClient`: their
requests are serialised (use several clients for parallel round trips).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import zmq
import zmq.asyncio

from shards.config import DEFAULT_COMMAND
from shards.curve import KeyFileError, read_secret_key, server_public_key

__all__ = ["AsyncClient", "Call", "Calls", "Client", "CommandTimeout", "UccError", "Wire"]

T = TypeVar("T")
Reply = dict[str, Any]


class UccError(Exception):
    """A command failed: the server's ``error`` (``code``, ``message``) or a client-side one."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.message))


class CommandTimeout(UccError, TimeoutError):
    """No reply within the client's timeout (code ``timeout``)."""

    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


class Overloaded(UccError):
    """The server refused the command because it is behind (code ``overloaded``): nothing of it
    was delivered. Retry later, with backoff; the message says which limit was hit."""

    def __init__(self, message: str) -> None:
        super().__init__("overloaded", message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


# --- the pure half: what each method sends and how it reads the reply -----------------------


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One command: its ``cmd``, its fields, and how to turn the (ok) reply into a result."""

    cmd: str
    fields: dict[str, Any]
    result: Callable[[Reply], T]


def _bad_reply(reply: Reply, what: str) -> UccError:
    return UccError("bad_reply", f"{what} in reply {json.dumps(reply)[:200]}")


def _as_reply(reply: Reply) -> Reply:
    return reply


def _as_user_list(reply: Reply) -> list[int]:
    users = reply.get("users")
    if not isinstance(users, list) or not all(
        isinstance(u, int) and not isinstance(u, bool) for u in users
    ):
        raise _bad_reply(reply, "'users' is not a list of integers")
    return sorted(users)


def _as_online(reply: Reply) -> bool:
    online = reply.get("online")
    if not isinstance(online, bool):
        raise _bad_reply(reply, "'online' is not a boolean")
    return online


def _as_online_map(reply: Reply) -> dict[int, bool]:
    online = reply.get("online")
    if not isinstance(online, dict):
        raise _bad_reply(reply, "'online' is not an object")
    result: dict[int, bool] = {}
    for key, value in online.items():
        try:
            user = int(key)
        except (TypeError, ValueError):
            raise _bad_reply(reply, f"key {key!r} of 'online' is not a user id") from None
        if not isinstance(value, bool):
            raise _bad_reply(reply, f"'online' value for {key!r} is not a boolean")
        result[user] = value
    return result


def _as_history(reply: Reply) -> Reply:
    if not isinstance(reply.get("epoch"), str):
        raise _bad_reply(reply, "'epoch' is not a string")
    offset = reply.get("offset")
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise _bad_reply(reply, "'offset' is not an integer")
    messages = reply.get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "data" in m and type(m.get("offset")) is int for m in messages
    ):
        raise _bad_reply(reply, "'messages' is not a list of {offset, data}")
    return reply


def _users_fields(data: Any, critical: bool, ttl: float | None) -> dict[str, Any]:
    """The fields of a broadcast to users: ``critical`` and ``ttl`` only when it is critical (a
    plain broadcast is sent as it always was)."""
    fields: dict[str, Any] = {"data": data}
    if critical:
        fields["critical"] = True
        if ttl is not None:
            fields["ttl"] = ttl
    return fields


def _as_connections(reply: Reply) -> list[dict[str, Any]]:
    connections = reply.get("connections")
    if not isinstance(connections, list) or not all(isinstance(c, dict) for c in connections):
        raise _bad_reply(reply, "'connections' is not a list of objects")
    return connections


def _as_snapshot(reply: Reply) -> Reply:
    seq = reply.get("seq")
    if type(seq) is not int or seq < 0:
        raise _bad_reply(reply, "'seq' is not an integer, 0 or more")
    _as_connections(reply)
    return reply


def _as_status(reply: Reply) -> Reply:
    if not isinstance(reply.get("shards"), list):
        raise _bad_reply(reply, "'shards' is not a list")
    return reply


class Calls:
    """The :class:`Call` behind every public method of :class:`Client` and :class:`AsyncClient`.

    Pure: builds messages and result parsers, touches no socket. The CLI uses it too when it
    needs the whole reply (e.g. ``missing_shards``) as well as the parsed result.
    """

    @staticmethod
    def broadcast_to_channel(channel_id: int, data: Any) -> Call[Reply]:
        return Call("broadcast_to_channel", {"channel": channel_id, "data": data}, _as_reply)

    @staticmethod
    def broadcast_to_user(
        user_id: int, data: Any, critical: bool = False, ttl: float | None = None
    ) -> Call[Reply]:
        fields = {"user": user_id, **_users_fields(data, critical, ttl)}
        return Call("broadcast_to_user", fields, _as_reply)

    @staticmethod
    def broadcast_to_users(
        user_ids: Iterable[int], data: Any, critical: bool = False, ttl: float | None = None
    ) -> Call[Reply]:
        fields = {"users": list(user_ids), **_users_fields(data, critical, ttl)}
        return Call("broadcast_to_users", fields, _as_reply)

    @staticmethod
    def history(channel: int, since: int = 0, limit: int = 100) -> Call[Reply]:
        fields = {"channel": channel, "since": since, "limit": limit}
        return Call("history", fields, _as_history)

    @staticmethod
    def get_online_users_in_channel(channel_id: int) -> Call[list[int]]:
        return Call("get_online_users_in_channel", {"channel": channel_id}, _as_user_list)

    @staticmethod
    def get_online_users() -> Call[list[int]]:
        return Call("get_online_users", {}, _as_user_list)

    @staticmethod
    def is_user_online(user_id: int) -> Call[bool]:
        return Call("is_user_online", {"user": user_id}, _as_online)

    @staticmethod
    def are_users_online(user_ids: Iterable[int]) -> Call[dict[int, bool]]:
        return Call("are_users_online", {"users": list(user_ids)}, _as_online_map)

    @staticmethod
    def subscribe(user_id: int, channel_id: int) -> Call[Reply]:
        return Call("subscribe", {"user": user_id, "channel": channel_id}, _as_reply)

    @staticmethod
    def unsubscribe(user_id: int, channel_id: int) -> Call[Reply]:
        return Call("unsubscribe", {"user": user_id, "channel": channel_id}, _as_reply)

    @staticmethod
    def disconnect(user_id: int) -> Call[Reply]:
        return Call("disconnect", {"user": user_id}, _as_reply)

    @staticmethod
    def status() -> Call[Reply]:
        return Call("status", {}, _as_status)

    @staticmethod
    def snapshot() -> Call[Reply]:
        return Call("snapshot", {}, _as_snapshot)

    @staticmethod
    def get_user_connections(user_id: int) -> Call[list[dict[str, Any]]]:
        return Call("get_user_connections", {"user": user_id}, _as_connections)

    @staticmethod
    def set_channel(channel_id: int, join_leave: bool = True) -> Call[Reply]:
        fields = {"channel": channel_id, "join_leave": join_leave}
        return Call("set_channel", fields, _as_reply)


class Wire:
    """Request ids, encoding and reply matching; shared by both clients, touches no socket."""

    def __init__(self) -> None:
        self._last_id = 0

    def encode(self, cmd: str, fields: dict[str, Any]) -> tuple[int, bytes]:
        """A fresh request id and the frame carrying ``cmd`` and ``fields``.

        Raises UccError("bad_request") when the fields are not strict JSON (NaN, sets, ...).
        """
        if "cmd" in fields or "id" in fields:
            raise ValueError("'cmd' and 'id' are set by the client, not passed as fields")
        self._last_id += 1
        request_id = self._last_id
        message = {"id": request_id, "cmd": cmd, **fields}
        try:
            text = json.dumps(message, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
            frame = text.encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc:
            raise UccError(
                "bad_request", f"command {cmd!r} is not JSON-serialisable: {exc}"
            ) from None
        return request_id, frame

    @staticmethod
    def match(frames: list[bytes], request_id: int) -> Reply | None:
        """The reply to ``request_id`` carried by ``frames``, or None for a stale reply.

        An error reply without an id (the server could not read ours, e.g. ``too_large``) is
        taken as the answer to the pending request. Raises UccError for ``ok: false``
        (:class:`Overloaded` for ``overloaded``) and UccError("bad_reply") for a frame that is
        not a JSON object with ``ok``.
        """
        try:
            reply = json.loads(frames[-1])
        except (ValueError, IndexError):
            raise UccError("bad_reply", "the server sent a frame that is not JSON") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise UccError("bad_reply", "the server sent a reply without a boolean 'ok'")
        reply_id = reply.get("id")
        if reply_id is None:
            if reply["ok"]:
                return None
        elif type(reply_id) is not int or reply_id != request_id:
            return None
        if not reply["ok"]:
            error = reply.get("error")
            if not isinstance(error, dict):
                error = {}
            code = error.get("code")
            message = error.get("message")
            text = message if isinstance(message, str) else "the server gave no message"
            if code == "overloaded":
                raise Overloaded(text)
            raise UccError(code if isinstance(code, str) else "error", text)
        return reply


SocketT = TypeVar("SocketT", bound="zmq.Socket[Any]")

SERVER_KEY_ENV = "UCC_COMMAND_SERVER_KEY"
CLIENT_KEY_ENV = "UCC_COMMAND_CLIENT_KEY"


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """What a CURVE client needs (z85): the server's public key and this client's keypair."""

    server: bytes
    public: bytes
    secret: bytes


def curve_keys(server_key: str | None, client_key_file: str | None) -> CurveKeys | None:
    """The CURVE keys from the arguments, each defaulting to its environment variable
    (``server_key=""``: plain, whatever the environment); None for a plain client. Raises
    ValueError for a key without the other or an unusable key."""
    if server_key is None:
        server_key = os.environ.get(SERVER_KEY_ENV, "")
    if not server_key:
        if client_key_file:
            raise ValueError("a client key file needs the server's key (server_key)")
        return None
    if client_key_file is None:
        client_key_file = os.environ.get(CLIENT_KEY_ENV, "")
    if not client_key_file:
        raise ValueError(
            f"the server's key needs a client key file (client_key_file or ${CLIENT_KEY_ENV};"
            " `ucc keygen` writes one)"
        )
    try:
        server = server_public_key(server_key)
        public, secret = read_secret_key(client_key_file)
    except KeyFileError as exc:
        raise ValueError(str(exc)) from None
    return CurveKeys(server, public, secret)


def _connect(socket: SocketT, endpoint: str, keys: CurveKeys | None = None) -> SocketT:
    """Configure a fresh DEALER socket (LINGER 0, IMMEDIATE, CURVE with ``keys``) and connect
    it to ``endpoint``."""
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.IMMEDIATE, 1)
    if keys is not None:
        socket.setsockopt(zmq.CURVE_SERVERKEY, keys.server)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    try:
        socket.connect(endpoint)
    except zmq.ZMQError as exc:
        socket.close(linger=0)
        raise ValueError(f"bad command endpoint {endpoint!r}: {exc}") from None
    return socket


def _check_timeout(timeout: float) -> float:
    if not timeout > 0 or math.isinf(timeout):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return float(timeout)


def _millis(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


COMMAND_ENV = "UCC_COMMAND"


def default_endpoint() -> str:
    """The command endpoint of a client given none: ``$UCC_COMMAND``, else the default
    (``tcp://127.0.0.1:5555``), read when the client is made."""
    return os.environ.get(COMMAND_ENV) or DEFAULT_COMMAND


class _Base:
    """Shared state and repr of both clients."""

    def __init__(
        self,
        endpoint: str,
        timeout: float,
        server_key: str | None = None,
        client_key_file: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = _check_timeout(timeout)
        self._keys = curve_keys(server_key, client_key_file)
        self._wire = Wire()

    def _timeout_error(self, cmd: str) -> CommandTimeout:
        hint = (
            "is `ucc serve` running, with this server key, and does it list this client's key?"
            if self._keys is not None
            else "is `ucc serve` running? a server with CURVE needs a server key and client key"
        )
        return CommandTimeout(
            f"no reply to {cmd!r} from {self.endpoint} within {self.timeout:g}s ({hint})"
        )

    @property
    def curve(self) -> bool:
        """Whether the socket is a CURVE client."""
        return self._keys is not None

    def __repr__(self) -> str:
        curve = ", curve=True" if self._keys is not None else ""
        return f"{type(self).__name__}({self.endpoint!r}, timeout={self.timeout!r}{curve})"


# --- blocking client ---------------------------------------------------------------------------


class Client(_Base):
    """Blocking client; one DEALER socket, one request at a time. Not thread-safe."""

    def __init__(
        self,
        endpoint: str | None = None,
        timeout: float = 5.0,
        server_key: str | None = None,
        client_key_file: str | None = None,
    ) -> None:
        """``server_key``/``client_key_file``: CURVE (see the module's docstring); ValueError
        for a bad endpoint, timeout or key."""
        endpoint = default_endpoint() if endpoint is None else endpoint
        super().__init__(endpoint, timeout, server_key, client_key_file)
        socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self._socket: zmq.Socket[bytes] | None = _connect(socket, endpoint, self._keys)

    def request(self, cmd: str, **fields: Any) -> Reply:
        """Send ``cmd`` with ``fields`` and return the whole ``ok: true`` reply."""
        socket = self._socket
        if socket is None:
            raise RuntimeError("the client is closed")
        request_id, frame = self._wire.encode(cmd, fields)
        deadline = time.monotonic() + self.timeout
        if not socket.poll(_millis(self.timeout), zmq.POLLOUT):
            raise self._timeout_error(cmd)
        try:
            socket.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            raise self._timeout_error(cmd) from None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not socket.poll(_millis(remaining), zmq.POLLIN):
                raise self._timeout_error(cmd)
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            reply = self._wire.match(frames, request_id)
            if reply is not None:
                return reply

    def _call(self, call: Call[T]) -> T:
        return call.result(self.request(call.cmd, **call.fields))

    def broadcast_to_channel(self, channel_id: int, data: Any) -> Reply:
        """Send ``data`` to every connection subscribed to ``channel_id``."""
        return self._call(Calls.broadcast_to_channel(channel_id, data))

    def broadcast_to_user(
        self, user_id: int, data: Any, critical: bool = False, ttl: float | None = None
    ) -> Reply:
        """Send ``data`` to every connection of ``user_id``. ``critical``: keep it until one of
        the user's connections acknowledges it (or ``ttl`` seconds pass; default one day),
        delivering it to each new one; the reply's ``message_id`` is its id."""
        return self._call(Calls.broadcast_to_user(user_id, data, critical, ttl))

    def broadcast_to_users(
        self, user_ids: Iterable[int], data: Any, critical: bool = False, ttl: float | None = None
    ) -> Reply:
        """Send ``data`` to every connection of each of ``user_ids`` (``critical``, ``ttl``: as
        :meth:`broadcast_to_user`, for each user; refused whole, ``limit``, when one of them
        has as many unacknowledged ones as the server keeps)."""
        return self._call(Calls.broadcast_to_users(user_ids, data, critical, ttl))

    def history(self, channel: int, since: int = 0, limit: int = 100) -> Reply:
        """``channel``'s kept messages after offset ``since``, oldest first, at most ``limit``:
        ``{"epoch", "offset" (the latest), "messages": [{"offset", "data"}, ...]}``
        (UccError ``history_disabled`` when the server keeps none)."""
        return self._call(Calls.history(channel, since, limit))

    def get_online_users_in_channel(self, channel_id: int) -> list[int]:
        """The sorted ids of the online users subscribed to ``channel_id``."""
        return self._call(Calls.get_online_users_in_channel(channel_id))

    def get_online_users(self) -> list[int]:
        """The sorted ids of all online users."""
        return self._call(Calls.get_online_users())

    def is_user_online(self, user_id: int) -> bool:
        """Whether ``user_id`` has at least one connection."""
        return self._call(Calls.is_user_online(user_id))

    def are_users_online(self, user_ids: Iterable[int]) -> dict[int, bool]:
        """``{user: online}`` for each of ``user_ids``."""
        return self._call(Calls.are_users_online(user_ids))

    def subscribe(self, user_id: int, channel_id: int) -> Reply:
        """Subscribe all of ``user_id``'s connections to ``channel_id``."""
        return self._call(Calls.subscribe(user_id, channel_id))

    def unsubscribe(self, user_id: int, channel_id: int) -> Reply:
        """Unsubscribe all of ``user_id``'s connections from ``channel_id``."""
        return self._call(Calls.unsubscribe(user_id, channel_id))

    def disconnect(self, user_id: int) -> Reply:
        """Close all of ``user_id``'s connections (close code 4001)."""
        return self._call(Calls.disconnect(user_id))

    def status(self) -> Reply:
        """The server's status: ``shards`` (one dict per shard) and ``missing_shards``."""
        return self._call(Calls.status())

    def snapshot(self) -> Reply:
        """This host's connections and the event stream's position: ``{"seq", "host",
        "connections": [{"conn", "user", "shard", "channels", "connected_at",
        "last_activity", "remote"}, ...], "missing_shards"}``. Applying the events with a
        ``seq`` above ``seq`` to it gives the current state (see :mod:`shards.events`)."""
        return self._call(Calls.snapshot())

    def get_user_connections(self, user_id: int) -> list[dict[str, Any]]:
        """Every connection of ``user_id`` (on every host with ``--redis``): ``[{"conn",
        "host", "shard", "connected_at", "last_activity", "channels", "remote"}, ...]``
        (times in unix seconds). Use :meth:`request` for the whole reply (``missing_shards``)."""
        return self._call(Calls.get_user_connections(user_id))

    def set_channel(self, channel_id: int, join_leave: bool = True) -> Reply:
        """Mark ``channel_id`` (``join_leave``: push ``join``/``leave`` frames to its members)
        or unmark it; cluster-wide with ``--redis``."""
        return self._call(Calls.set_channel(channel_id, join_leave))

    def close(self) -> None:
        """Close the socket (pending messages are dropped). Idempotent."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    @property
    def closed(self) -> bool:
        return self._socket is None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- asyncio client ----------------------------------------------------------------------------


class _Closed:
    """What ``AsyncClient.close()`` returns: already done, but awaitable for symmetry."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # pragma: no cover - makes this a generator


class AsyncClient(_Base):
    """``zmq.asyncio`` client with the same methods as :class:`Client`, as coroutines.

    Coroutines may share one client; their round trips are serialised by a lock.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        timeout: float = 5.0,
        server_key: str | None = None,
        client_key_file: str | None = None,
    ) -> None:
        """``server_key``/``client_key_file``: CURVE (see the module's docstring); ValueError
        for a bad endpoint, timeout or key."""
        endpoint = default_endpoint() if endpoint is None else endpoint
        super().__init__(endpoint, timeout, server_key, client_key_file)
        socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._socket: zmq.asyncio.Socket | None = _connect(socket, endpoint, self._keys)
        # Pollers rather than Socket.poll: pyzmq's stubs mistype the async Socket.poll.
        self._readable = zmq.asyncio.Poller()
        self._readable.register(socket, zmq.POLLIN)
        self._writable = zmq.asyncio.Poller()
        self._writable.register(socket, zmq.POLLOUT)
        self._lock = asyncio.Lock()

    async def request(self, cmd: str, **fields: Any) -> Reply:
        """Send ``cmd`` with ``fields`` and return the whole ``ok: true`` reply."""
        request_id, frame = self._wire.encode(cmd, fields)
        deadline = time.monotonic() + self.timeout
        try:
            await asyncio.wait_for(self._lock.acquire(), self.timeout)
        except TimeoutError:
            raise self._timeout_error(cmd) from None
        try:
            socket = self._socket
            if socket is None:
                raise RuntimeError("the client is closed")
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self._writable.poll(_millis(remaining)):
                raise self._timeout_error(cmd)
            try:
                await socket.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                raise self._timeout_error(cmd) from None
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not await self._readable.poll(_millis(remaining)):
                    raise self._timeout_error(cmd)
                try:
                    frames = await socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                reply = self._wire.match(frames, request_id)
                if reply is not None:
                    return reply
        finally:
            self._lock.release()

    async def _call(self, call: Call[T]) -> T:
        return call.result(await self.request(call.cmd, **call.fields))

    async def broadcast_to_channel(self, channel_id: int, data: Any) -> Reply:
        """Send ``data`` to every connection subscribed to ``channel_id``."""
        return await self._call(Calls.broadcast_to_channel(channel_id, data))

    async def broadcast_to_user(
        self, user_id: int, data: Any, critical: bool = False, ttl: float | None = None
    ) -> Reply:
        """Send ``data`` to every connection of ``user_id``. ``critical``: keep it until one of
        the user's connections acknowledges it (or ``ttl`` seconds pass; default one day),
        delivering it to each new one; the reply's ``message_id`` is its id."""
        return await self._call(Calls.broadcast_to_user(user_id, data, critical, ttl))

    async def broadcast_to_users(
        self, user_ids: Iterable[int], data: Any, critical: bool = False, ttl: float | None = None
    ) -> Reply:
        """Send ``data`` to every connection of each of ``user_ids`` (``critical``, ``ttl``: as
        :meth:`broadcast_to_user`, for each user; refused whole, ``limit``, when one of them
        has as many unacknowledged ones as the server keeps)."""
        return await self._call(Calls.broadcast_to_users(user_ids, data, critical, ttl))

    async def history(self, channel: int, since: int = 0, limit: int = 100) -> Reply:
        """``channel``'s kept messages after offset ``since``, oldest first, at most ``limit``:
        ``{"epoch", "offset" (the latest), "messages": [{"offset", "data"}, ...]}``
        (UccError ``history_disabled`` when the server keeps none)."""
        return await self._call(Calls.history(channel, since, limit))

    async def get_online_users_in_channel(self, channel_id: int) -> list[int]:
        """The sorted ids of the online users subscribed to ``channel_id``."""
        return await self._call(Calls.get_online_users_in_channel(channel_id))

    async def get_online_users(self) -> list[int]:
        """The sorted ids of all online users."""
        return await self._call(Calls.get_online_users())

    async def is_user_online(self, user_id: int) -> bool:
        """Whether ``user_id`` has at least one connection."""
        return await self._call(Calls.is_user_online(user_id))

    async def are_users_online(self, user_ids: Iterable[int]) -> dict[int, bool]:
        """``{user: online}`` for each of ``user_ids``."""
        return await self._call(Calls.are_users_online(user_ids))

    async def subscribe(self, user_id: int, channel_id: int) -> Reply:
        """Subscribe all of ``user_id``'s connections to ``channel_id``."""
        return await self._call(Calls.subscribe(user_id, channel_id))

    async def unsubscribe(self, user_id: int, channel_id: int) -> Reply:
        """Unsubscribe all of ``user_id``'s connections from ``channel_id``."""
        return await self._call(Calls.unsubscribe(user_id, channel_id))

    async def disconnect(self, user_id: int) -> Reply:
        """Close all of ``user_id``'s connections (close code 4001)."""
        return await self._call(Calls.disconnect(user_id))

    async def status(self) -> Reply:
        """The server's status: ``shards`` (one dict per shard) and ``missing_shards``."""
        return await self._call(Calls.status())

    async def snapshot(self) -> Reply:
        """This host's connections and the event stream's position (see
        :meth:`Client.snapshot`)."""
        return await self._call(Calls.snapshot())

    async def get_user_connections(self, user_id: int) -> list[dict[str, Any]]:
        """Every connection of ``user_id`` (see :meth:`Client.get_user_connections`)."""
        return await self._call(Calls.get_user_connections(user_id))

    async def set_channel(self, channel_id: int, join_leave: bool = True) -> Reply:
        """Mark or unmark ``channel_id`` for join/leave frames (see
        :meth:`Client.set_channel`)."""
        return await self._call(Calls.set_channel(channel_id, join_leave))

    def close(self) -> _Closed:
        """Close the socket now (idempotent); ``close()`` and ``await close()`` both work."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        return _Closed()

    async def aclose(self) -> None:
        """Coroutine spelling of :meth:`close`."""
        self.close()

    @property
    def closed(self) -> bool:
        return self._socket is None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
