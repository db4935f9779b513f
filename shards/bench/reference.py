"""The reference server: a plain, single-process ``websockets`` hub, for ``ucc bench --reference``.

Owns: what a careful developer would write with the library alone — the asyncio server of
``websockets`` (``websockets.asyncio.server.serve``, no compression, the same token check as
ucc, a ``hello`` frame after registration) holding channel → connections and user →
connections in dicts, fanning out with ``websockets.broadcast()`` (the library's fastest
documented path: one frame encoding per connection, written without awaiting). It takes ucc's
own ZeroMQ command protocol (the subset the bench uses: ``broadcast_to_channel``,
``broadcast_to_user(s)``, ``get_online_users``, ``get_online_users_in_channel``, ``status``)
on a ROUTER socket in the same event loop, so the same scenario drives both servers the same
way. It runs on uvloop, as ucc's shards do, so the comparison is of the designs, not the loops.

Must never be used as a product: it has no supervision, no slow-consumer cap, no heartbeat
sweep. Run as ``python -m shards.bench.reference --port 0`` with ``UCC_SECRET`` set; it prints
``reference ready ws://HOST:PORT command=ENDPOINT`` once listening.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import zmq
import zmq.asyncio
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request, Response

from actors.wire.tokens import Claims, TokenError, verify

Conns = set[ServerConnection]


class Hub:
    """Who is connected, and the commands (plain dicts and ``websockets.broadcast``)."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.rooms: dict[int, Conns] = {}
        self.users: dict[int, Conns] = {}
        self.claims: dict[ServerConnection, Claims] = {}  # checked, not yet registered
        self.user_of: dict[ServerConnection, int] = {}

    def check(self, connection: ServerConnection, request: Request) -> Response | None:
        token = parse_qs(urlsplit(request.path).query).get("token", [""])[0]
        try:
            self.claims[connection] = verify(self.secret, token)
        except TokenError as exc:
            return connection.respond(HTTPStatus.UNAUTHORIZED, f"{exc}\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        claims = self.claims.pop(ws)
        for channel in claims.channels:
            self.rooms.setdefault(channel, set()).add(ws)
        self.users.setdefault(claims.user, set()).add(ws)
        self.user_of[ws] = claims.user
        try:
            hello = {"type": "hello", "user": claims.user, "channels": list(claims.channels)}
            await ws.send(json.dumps(hello))
            async for message in ws:
                if message == '{"type":"ping"}':
                    await ws.send('{"type":"pong"}')
        finally:
            for channel in claims.channels:
                members = self.rooms.get(channel)
                if members is not None:
                    members.discard(ws)
                    if not members:
                        del self.rooms[channel]
            del self.user_of[ws]
            conns = self.users[claims.user]
            conns.discard(ws)
            if not conns:
                del self.users[claims.user]

    def command(self, raw: bytes) -> dict[str, Any]:
        try:
            request = json.loads(raw)
            cmd = request["cmd"]
        except (ValueError, KeyError, TypeError):
            return {"id": None, "ok": False, "error": {"code": "bad_json", "message": "?"}}
        reply: dict[str, Any] = {"id": request.get("id"), "ok": True}
        if cmd == "broadcast_to_channel":
            channel = request["channel"]
            text = f'{{"type":"message","channel":{channel:d},"data":{_dumps(request)}}}'
            reply["shards"] = self._send(self.rooms.get(channel, ()), text)
        elif cmd in ("broadcast_to_user", "broadcast_to_users"):
            targets = request["users"] if cmd == "broadcast_to_users" else [request["user"]]
            text = f'{{"type":"message","data":{_dumps(request)}}}'
            conns = [ws for user in targets for ws in self.users.get(user, ())]
            reply["shards"] = self._send(conns, text)
        elif cmd == "get_online_users":
            reply.update(users=sorted(self.users), missing_shards=[])
        elif cmd == "get_online_users_in_channel":
            members = self.rooms.get(request["channel"], ())
            users = sorted({self.user_of[ws] for ws in members})
            reply.update(users=users, missing_shards=[])
        elif cmd == "status":
            row = {"index": 0, "pid": os.getpid(), "epoch": 1, "state": "up"}
            row.update(connections=sum(len(c) for c in self.users.values()))
            reply.update(shards=[row], missing_shards=[])
        else:
            message = f"the reference server does not implement {cmd!r}"
            reply.update(ok=False, error={"code": "unknown_command", "message": message})
        return reply

    @staticmethod
    def _send(conns: Any, text: str) -> int:
        if not conns:
            return 0
        broadcast(conns, text)
        return 1


def _dumps(request: dict[str, Any]) -> str:
    return json.dumps(request.get("data"), separators=(",", ":"), ensure_ascii=False)


async def _commands(hub: Hub, sock: zmq.asyncio.Socket) -> None:
    while True:
        frames = await sock.recv_multipart()
        reply = json.dumps(hub.command(frames[-1]), separators=(",", ":")).encode()
        await sock.send_multipart([*frames[:-1], reply])


async def run(host: str, port: int, command: str, secret: str) -> None:
    hub = Hub(secret)
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(command)
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    async with serve(
        hub.handler,
        host,
        port,
        process_request=hub.check,
        compression=None,
        ping_interval=25,
        ping_timeout=60,
        backlog=4096,
    ) as server:
        bound = next(iter(server.sockets)).getsockname()
        print(f"reference ready ws://{bound[0]}:{bound[1]} command={endpoint}", flush=True)
        await _commands(hub, sock)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards.bench.reference")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--command", default="tcp://127.0.0.1:*")
    args = parser.parse_args(argv)
    secret = os.environ.get("UCC_SECRET", "")
    if not secret:
        print("reference: set UCC_SECRET", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    import uvloop  # noqa: PLC0415 - a dependency of ucc; only this process needs it

    uvloop.run(run(args.host, args.port, args.command, secret))
    return 0


if __name__ == "__main__":
    sys.exit(main())
