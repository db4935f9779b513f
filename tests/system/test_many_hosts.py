"""Six hosts (one shard each) linked by one Redis, then by a Redis Cluster: a channel with
members on every host gets every message exactly once per member, presence of 6 x 500 users is
exact from every host, and a host that is SIGKILLed fades out of presence within the documented
bound (docs/cluster.md: 5 s after its last snapshot)."""

from __future__ import annotations

import asyncio
import signal
import time

from websockets.exceptions import InvalidStatus

from shards.testing import TIME_FACTOR, Host, Peer, connect_peer

SECRET = "m" * 64  # every host of a cluster shares the token secret
HOSTS = 6
USERS_PER_HOST = 500
MEMBERS_PER_HOST = 10  # of CHANNEL, on each host
CHANNEL = 1
MESSAGES = 12
FADE_BOUND = 5.0  # seconds of silence (docs/cluster.md), plus the once-a-second check


def user_of(host: int, n: int) -> int:
    return host * 10_000 + n + 1


async def connect(host: Host, user: int, channels: list[int]) -> Peer:
    """A peer, past its hello; a 503 (the shard is behind with hand-offs: backpressure, with
    Retry-After) is retried after that delay, up to a deadline."""
    deadline = time.monotonic() + 30 * TIME_FACTOR
    while True:
        try:
            return await connect_peer(host, user, channels)
        except InvalidStatus as exc:
            if exc.response.status_code != 503 or time.monotonic() > deadline:
                raise
            await asyncio.sleep(float(exc.response.headers.get("Retry-After", "1")))


async def connect_all(hosts: list[Host]) -> tuple[list[Peer], list[Peer]]:
    """USERS_PER_HOST users on each host, the first MEMBERS_PER_HOST of them in CHANNEL;
    returns (members, others)."""
    members: list[Peer] = []
    others: list[Peer] = []
    for index, host in enumerate(hosts):
        for start in range(0, USERS_PER_HOST, 100):
            batch = range(start, min(start + 100, USERS_PER_HOST))
            peers = await asyncio.gather(
                *(
                    connect(host, user_of(index, n), [CHANNEL] if n < MEMBERS_PER_HOST else [])
                    for n in batch
                )
            )
            for n, peer in zip(batch, peers, strict=True):
                (members if n < MEMBERS_PER_HOST else others).append(peer)
    return members, others


def test_six_hosts_exact_delivery_presence_and_a_fade_out(ucc_host, redis_url):
    hosts = [ucc_host(shards=1, args=("--redis", redis_url), secret=SECRET) for _ in range(HOSTS)]
    everyone = sorted(user_of(h, n) for h in range(HOSTS) for n in range(USERS_PER_HOST))
    channel_members = sorted(user_of(h, n) for h in range(HOSTS) for n in range(MEMBERS_PER_HOST))

    async def scenario() -> None:
        members, others = await connect_all(hosts)
        try:
            # presence: exact, as seen from every host
            for host in hosts:
                await host.aio.wait_online(everyone, timeout=20)
                await host.aio.wait_online(channel_members, CHANNEL, timeout=20)
            # a broadcast from each host in turn: every member gets each once, nobody else any
            sent = []
            for number in range(MESSAGES):
                client = hosts[number % HOSTS].aio.client()
                reply = await client.broadcast_to_channel(CHANNEL, {"n": number})
                assert reply["ok"] and reply["cluster"] is True, reply
                sent.append(number)
            for peer in members:
                await peer.wait_for(
                    lambda frames: sum(f.get("type") == "message" for f in frames) >= MESSAGES,
                    timeout=15,
                )
            # a marker to every other user's host settles them: anything stray has arrived
            marker_users = [peer.user for peer in others[:: USERS_PER_HOST // 5]]
            await hosts[0].aio.client().broadcast_to_users(marker_users, "marker")
            for peer in others[:: USERS_PER_HOST // 5]:
                await peer.wait_for(lambda f: any(x.get("data") == "marker" for x in f))
            for peer in members:
                got = [f["data"]["n"] for f in peer.frames if f.get("type") == "message"]
                assert sorted(got) == sent, (peer.user, got)  # each once
                # one publisher's messages arrive in its order
                for origin in range(HOSTS):
                    mine = [n for n in got if n % HOSTS == origin]
                    assert mine == sorted(mine)
            for peer in others:
                assert not [
                    f for f in peer.frames if f.get("type") == "message" and "channel" in f
                ], peer.user
            # the last host dies without a word: its users fade out of the others' presence
            dead = hosts[-1]
            dead.signal(signal.SIGKILL)
            killed = time.monotonic()
            survivors = [u for u in everyone if u // 10_000 != HOSTS - 1]
            await hosts[0].aio.wait_online(survivors, timeout=FADE_BOUND + 2.0)
            faded = time.monotonic() - killed
            print(f"host SIGKILL: out of presence after {faded:.1f} s")
            for host in hosts[1:-1]:
                await host.aio.wait_online(survivors, timeout=5)
            still = [m for m in channel_members if m // 10_000 != HOSTS - 1]
            await hosts[0].aio.wait_online(still, CHANNEL, timeout=5)
        finally:
            await asyncio.gather(*(p.close() for p in members + others), return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), 240 * TIME_FACTOR))
