"""The shard side of the perimeter (issue 10), with real processes: connections per user (HTTP
429 before the upgrade), channels per connection (``limit``), and refreshing a live connection's
token (``refreshed`` / ``bad_token``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.asyncio.client import connect

from actors.wire import tokens
from shards.client import UccError
from shards.testing import TIME_FACTOR, Host, Peer, connect_peer, upgrade_request

USER = 42


async def raw_upgrade(host: Host, token: str) -> bytes:
    """Everything the server answers to a raw upgrade request, until it ends the stream."""
    address, port = host.address
    reader, writer = await asyncio.open_connection(address, port)
    try:
        writer.write(upgrade_request(f"/?token={token}"))
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10 * TIME_FACTOR)
    finally:
        writer.close()
        await writer.wait_closed()


async def peer_with(host: Host, user: int, token: str) -> Peer:
    """A peer connected with this very token, once its hello has arrived."""
    ws = await connect(
        f"{host.url}/?token={token}", open_timeout=10 * TIME_FACTOR, compression=None
    )
    peer = Peer(ws, user)
    await peer.wait_for(lambda frames: any(f["type"] == "hello" for f in frames))
    return peer


def row_of(status: dict[str, Any], index: int) -> dict[str, Any]:
    row: dict[str, Any] = next(r for r in status["shards"] if r["index"] == index)
    return row


def test_the_33rd_connection_of_a_user_gets_429_and_the_32_stay(ucc_host):
    host = ucc_host(shards=2)

    async def scenario() -> None:
        peers = [await connect_peer(host, USER, [1]) for _ in range(32)]
        try:
            answer = await raw_upgrade(host, host.token(USER, [1]))
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 429"), answer[:200]
            assert b"\r\nRetry-After: " in head
            assert b"too many connections for this user" in body
            # another user is not affected
            other = await connect_peer(host, USER + 1, [1])
            await host.aio.client().broadcast_to_channel(1, "still here")
            for peer in [*peers, other]:
                await peer.wait_for(lambda f: f[-1].get("data") == "still here")
            status = await host.aio.status()
            assert row_of(status, host.shard_of(USER))["refused_per_user"] == 1
            assert sum(r["connections"] for r in status["shards"]) == 33
            # one leaves: room for one more
            await peers.pop().close()
            peers.append(await connect_peer(host, USER, [1]))
            await other.close()
        finally:
            for peer in peers:
                await peer.close()

    asyncio.run(scenario())


def test_a_server_side_subscribe_beyond_the_channel_limit_answers_limit(ucc_host):
    host = ucc_host(shards=2, args=("--max-channels-per-connection", "2"))

    async def scenario() -> None:
        full = await connect_peer(host, USER, [1, 2])
        try:
            client = host.aio.client()
            with pytest.raises(UccError) as info:
                await client.subscribe(USER, 3)
            assert info.value.code == "limit"
            # the client's own subscribe beyond it: error `limit`, and it stays open
            await full.send({"type": "unsubscribe", "channel": 2})
            await full.wait_for(lambda f: f[-1] == {"type": "unsubscribed", "channel": 2})
            await client.subscribe(USER, 3)  # room for one now
            await full.send({"type": "subscribe", "channel": 2})
            await full.wait_for(lambda f: f[-1].get("code") == "limit")
            await client.broadcast_to_channel(3, "on 3")
            await full.wait_for(lambda f: f[-1].get("data") == "on 3")
            row = row_of(await host.aio.status(), host.shard_of(USER))
            assert row["refused_channel_limit"] == 1
            assert row["limited_server_subscribe"] == 1
        finally:
            await full.close()

    asyncio.run(scenario())


def test_a_refresh_keeps_a_connection_past_its_first_tokens_exp(ucc_host):
    # a short heartbeat: the shard looks for expired tokens every second
    host = ucc_host(shards=1, args=("--heartbeat", "1"))

    async def scenario() -> None:
        refreshed = await peer_with(host, USER, host.token(USER, [1], ttl=3))
        # minted after: it expires no sooner than the refreshed peer's first token
        control = await peer_with(host, USER, host.token(USER, [1], ttl=3))
        try:
            long_lived = host.token(USER, [1], ttl=3600)
            await refreshed.send({"type": "refresh", "token": long_lived})
            await refreshed.wait_for(lambda f: f[-1].get("type") == "refreshed")
            assert refreshed.frames[-1]["exp"] == tokens.verify(host.secret, long_lived).exp
            # the control is closed 4003 at its exp: the shard has looked at both by then
            await asyncio.wait_for(control.closed.wait(), 15 * TIME_FACTOR)
            assert control.ws.close_code == 4003
            await host.aio.client().broadcast_to_channel(1, "after the first exp")
            await refreshed.wait_for(lambda f: f[-1].get("data") == "after the first exp")
            assert not refreshed.closed.is_set()
        finally:
            await refreshed.close()
            await control.close()

    asyncio.run(scenario())


def test_a_refresh_with_another_users_token_is_bad_token(ucc_host):
    host = ucc_host(shards=2)

    async def scenario() -> None:
        peer = await connect_peer(host, USER, [1])
        try:
            await peer.send({"type": "refresh", "token": host.token(USER + 1, [1])})
            await peer.wait_for(lambda f: f[-1].get("type") == "error")
            assert peer.frames[-1]["code"] == "bad_token"
            await peer.send({"type": "refresh", "token": "garbage"})
            await peer.wait_for(lambda f: len(f) >= 3 and f[-1].get("type") == "error")
            assert peer.frames[-1]["code"] == "bad_token"
            await host.aio.client().broadcast_to_channel(1, "still open")
            await peer.wait_for(lambda f: f[-1].get("data") == "still open")
            row = row_of(await host.aio.status(), host.shard_of(USER))
            assert row["refresh_refused"] == 2
        finally:
            await peer.close()

    asyncio.run(scenario())
