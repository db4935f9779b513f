"""Bad input from outside gets a clear error and disturbs nothing else."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import jwt
import pytest
import zmq
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from shards.client import Client, CommandTimeout, UccError
from shards.testing import TIME_FACTOR, Host, connect_peer, upgrade_request


def http_status(host: Host, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    with socket.create_connection(host.address, timeout=timeout * TIME_FACTOR) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def test_bad_tokens_get_401_before_the_upgrade(ucc_host):
    host: Host = ucc_host(shards=2)
    now = int(time.time())
    bad = {
        "missing": "",
        "garbage": "not-a-jwt",
        "wrong secret": jwt.encode({"sub": "1", "exp": now + 60}, "x" * 32, algorithm="HS256"),
        "expired": jwt.encode({"sub": "1", "exp": now - 5}, host.secret, algorithm="HS256"),
        "no exp": jwt.encode({"sub": "1"}, host.secret, algorithm="HS256"),
        "HS512": jwt.encode({"sub": "1", "exp": now + 60}, host.secret, algorithm="HS512"),
        "sub not digits": jwt.encode({"sub": "bob", "exp": now + 60}, host.secret),
        "sub zero": jwt.encode({"sub": "0", "exp": now + 60}, host.secret),
        "channels not ints": jwt.encode(
            {"sub": "1", "exp": now + 60, "channels": ["a"]}, host.secret
        ),
    }
    for name, token in bad.items():
        status, body = http_status(host, upgrade_request(f"/?token={token}"))
        assert status == 401, name
        assert body.strip(), name  # the reason is given
    good = host.token(5)

    async def scenario() -> None:
        async with connect(host.url, additional_headers={"Authorization": f"Bearer {good}"}) as ws:
            assert json.loads(await ws.recv())["user"] == 5
        with pytest.raises(InvalidStatus) as info:
            async with connect(f"{host.url}/?token=nope"):
                pass
        assert info.value.response.status_code == 401

    asyncio.run(scenario())


def test_oversized_and_slow_handshakes_are_refused(ucc_host):
    host: Host = ucc_host(shards=2, args=("--handshake-timeout", "1"))
    big = upgrade_request("/?token=x", "X-Pad: " + "a" * 9000 + "\r\n")
    assert http_status(host, big)[0] == 431
    with socket.create_connection(host.address, timeout=10 * TIME_FACTOR) as slow:
        slow.sendall(b"GET /?token=")  # and never finishes
        assert slow.recv(1024).startswith(b"HTTP/1.1 408")
    assert http_status(host, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == (200, b"ok\n")
    assert http_status(host, b"NOT HTTP\r\n\r\n")[0] == 400

    async def still_serving() -> None:
        peer = await connect_peer(host, 9)
        await peer.close()

    asyncio.run(still_serving())


def test_bad_frames_get_error_frames_and_the_connection_stays(ucc_host):
    host: Host = ucc_host(shards=2, args=("--max-frame", "4096"))

    async def scenario() -> None:
        client = host.aio.client()
        peer = await connect_peer(host, 11, [1, 2])
        bystander = await connect_peer(host, 12, [1])
        cases = [
            ("{", "bad_json"),
            ('"just a string"', "bad_frame"),
            ('{"type": 5}', "bad_frame"),
            ('{"type": "dance"}', "unknown_type"),
            ('{"type": "subscribe", "channel": "2"}', "bad_frame"),
            ('{"type": "subscribe", "channel": true}', "bad_frame"),
            ('{"type": "subscribe", "channel": -1}', "bad_frame"),
            ('{"type": "subscribe", "channel": 99}', "forbidden"),
            ("[" * 3000, "bad_json"),  # deeper than Python's json can go
            ('{"type": "ping"}'.encode("utf-16").decode("latin-1"), "bad_json"),
        ]
        for text, code in cases:
            await peer.ws.send(text)
            await peer.wait_for(lambda f, c=code: f[-1].get("code") == c)
        await peer.ws.send(b"\x00binary")
        await peer.wait_for(lambda f: f[-1].get("code") == "binary_unsupported")
        await peer.send({"type": "unsubscribe", "channel": 2})
        await peer.wait_for(lambda f: f[-1] == {"type": "unsubscribed", "channel": 2})
        await peer.send({"type": "subscribe", "channel": 2})
        await peer.wait_for(lambda f: f[-1] == {"type": "subscribed", "channel": 2})
        await peer.send({"type": "ping"})
        await peer.wait_for(lambda f: f[-1] == {"type": "pong"})
        await peer.ws.send(['{"type":', ' "ping"}'])  # a fragmented message (RFC 6455 §5.4)
        await peer.wait_for(lambda f: f[-2:] == [{"type": "pong"}] * 2)
        await client.broadcast_to_channel(2, "after errors")
        await peer.wait_for(lambda f: f[-1].get("data") == "after errors")

        # a frame over the size limit closes that connection with 1009, nobody else's
        await peer.ws.send("x" * 10_000)
        await asyncio.wait_for(peer.closed.wait(), 5 * TIME_FACTOR)
        assert peer.ws.close_code == 1009
        await client.broadcast_to_channel(1, "bystander")
        await bystander.wait_for(lambda f: f[-1].get("data") == "bystander")
        await bystander.close()
        await peer.close()

    asyncio.run(scenario())


def test_bad_commands_get_error_replies(ucc_host):
    host: Host = ucc_host(shards=2)
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(5000 * TIME_FACTOR))
    sock.connect(host.command)

    def ask(raw: bytes) -> dict:
        sock.send(raw)
        return json.loads(sock.recv())

    try:
        cases = [
            (b"\xff\xfe", "bad_json"),
            (b"[1, 2]", "bad_json"),
            (b'{"id": 1}', "bad_request"),
            (b'{"id": 2, "cmd": "frobnicate"}', "unknown_command"),
            (b'{"id": 3, "cmd": "broadcast_to_channel", "channel": "5", "data": 1}', "bad_request"),
            (b'{"id": 4, "cmd": "broadcast_to_channel", "channel": 5}', "bad_request"),
            (b'{"id": 5, "cmd": "is_user_online", "user": true}', "bad_request"),
            (b'{"id": 6, "cmd": "are_users_online", "users": [1, 0]}', "bad_request"),
            (b'{"id": 7, "cmd": "subscribe", "user": 1, "channel": 1.5}', "bad_request"),
            (b'{"id": 8, "cmd": "disconnect", "user": 99999999999999999999}', "bad_request"),
            (b"[" * 5000, "bad_json"),  # deeper than Python's json can go
            (b'{"id": 9, "cmd": "broadcast_to_user", "user": 1, "data": NaN}', "bad_json"),
            ('{"cmd": "status"}'.encode("utf-16"), "bad_json"),
        ]
        for raw, code in cases:
            reply = ask(raw)
            assert reply["ok"] is False, raw
            assert reply["error"]["code"] == code, (raw, reply)
            assert reply["error"]["message"]
        assert ask(b'{"id": 6, "cmd": "are_users_online", "users": [1, 0]}')["id"] == 6
        huge = json.dumps({"id": 9, "cmd": "broadcast_to_channel", "channel": 1,
                           "data": "x" * 2_000_000}).encode()  # fmt: skip
        assert ask(huge)["error"]["code"] == "too_large"
        assert ask(b'{"id": 10, "cmd": "get_online_users"}') == {
            "id": 10,
            "ok": True,
            "users": [],
            "missing_shards": [],
        }
    finally:
        sock.close()

    client = host.client()
    with pytest.raises(UccError) as info:
        client.request("frobnicate")
    assert info.value.code == "unknown_command"
    assert client.get_online_users() == []


def test_client_times_out_instead_of_hanging():
    with socket.socket() as probe:  # a free port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Client(f"tcp://127.0.0.1:{port}", timeout=0.3) as client:
        started = time.monotonic()
        with pytest.raises(CommandTimeout) as info:
            client.get_online_users()
        assert info.value.code == "timeout"
        assert time.monotonic() - started < 5


def test_silent_connection_is_dropped_by_the_heartbeat(ucc_host):
    host: Host = ucc_host(shards=2, args=("--heartbeat", "0.3", "--heartbeat-timeout", "1"))
    # a client that completes the handshake and then never answers a ping
    with socket.create_connection(host.address, timeout=10 * TIME_FACTOR) as mute:
        mute.sendall(upgrade_request(f"/?token={host.token(31)}"))
        assert mute.recv(4096).startswith(b"HTTP/1.1 101")

        async def scenario() -> None:
            lively = await connect_peer(host, 32)  # websockets answers pings
            await host.aio.wait_online([32])  # the mute connection was dropped
            await lively.close()

        asyncio.run(scenario())


def test_a_slow_consumer_is_cut_off_and_holds_nobody_back(ucc_host):
    # the default limit (4 MiB): `fast`, sharing its process with the publisher, must not fall
    # that far behind; `slow` reaches it (10 MB are sent: more than that and its kernel buffers)
    host: Host = ucc_host(shards=2)
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
    try:
        slow.settimeout(10 * TIME_FACTOR)
        slow.connect(host.address)
        slow.sendall(upgrade_request(f"/?token={host.token(21, [1])}"))
        assert slow.recv(12).startswith(b"HTTP/1.1 101")

        async def scenario() -> None:
            fast = await connect_peer(host, 22, [1])
            await host.aio.wait_online([21, 22], channel=1, timeout=5)
            payload = "x" * 50_000
            client = host.client()

            def publish() -> None:
                for n in range(200):  # 10 MB
                    client.broadcast_to_channel(1, {"n": n, "pad": payload})

            # from a thread, not from this loop: the loop must keep reading for `fast` (sharing
            # it with the publisher, `fast` falls behind and is cut off as slow, too)
            await asyncio.to_thread(publish)
            await fast.wait_for(lambda f: len(f) >= 201, 30)  # hello + every message
            assert [m["data"]["n"] for m in fast.messages] == list(range(200))
            await host.aio.wait_online([22])  # the slow one was cut off
            await fast.close()

        asyncio.run(scenario())
    finally:
        slow.close()
