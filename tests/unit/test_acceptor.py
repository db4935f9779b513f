"""shards.acceptor: the per-address cap on pending handshakes, the refusal report, and one
connection's failure staying that connection's (an Acceptor on a real loopback socket); and
shards.limits, which gives the acceptor the file descriptors those handshakes need."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import logging
import math
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from actors.wire.tokens import Claims, mint
from shards.acceptor import (
    COUNTERS,
    MAX_BAN_SECONDS,
    Acceptor,
    BanTable,
    ConnectRates,
    PendingLimits,
    RefusalReport,
    address_key,
)
from shards.limits import OpenFilesLimit

SECRET = "acceptor-test-secret-" * 3

# -- address_key --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "key"),
    [
        (("127.0.0.2", 40000), "127.0.0.2"),
        (("10.1.2.3", 1), "10.1.2.3"),
        (("::ffff:10.1.2.3", 1, 0, 0), "10.1.2.3"),  # IPv4-mapped: the IPv4 address
        (("2001:db8:1:2:aaaa::1", 1, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:ffff:ffff:ffff:ffff", 1, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:3::1", 1, 0, 0), "2001:db8:1:3::/64"),
        (("fe80::1%lo", 1, 0, 1), "fe80::/64"),
        (("not-an-ip", 1), "not-an-ip"),
        ("/run/ucc.sock", "/run/ucc.sock"),
    ],
)
def test_address_key(address, key):
    assert address_key(address) == key


def test_one_ipv6_host_cannot_dodge_the_cap_by_changing_its_interface_id():
    keys = {address_key((f"2001:db8::{n:x}", 1, 0, 0)) for n in range(1, 1000)}
    assert keys == {"2001:db8::/64"}


# -- PendingLimits ------------------------------------------------------------------------------


def test_one_address_is_capped_and_others_still_get_in():
    limits = PendingLimits(max_total=100, max_per_address=3)
    assert [limits.admit("a") for _ in range(3)] == [None, None, None]
    assert limits.admit("a") == "refused_per_address"
    assert limits.admit("a") == "refused_per_address"
    assert limits.admit("b") is None
    assert (limits.pending("a"), limits.pending("b"), limits.total) == (3, 1, 4)


def test_a_released_slot_can_be_taken_again():
    limits = PendingLimits(max_total=100, max_per_address=2)
    limits.admit("a")
    limits.admit("a")
    assert limits.admit("a") == "refused_per_address"
    limits.release("a")
    assert limits.admit("a") is None


def test_the_global_cap_holds_across_addresses():
    limits = PendingLimits(max_total=5, max_per_address=2)
    admitted = [limits.admit(key) for key in "aabbc"]
    assert admitted == [None] * 5
    assert limits.admit("d") == "refused_pending"
    assert limits.admit("a") == "refused_per_address"  # the more specific reason wins
    limits.release("b")
    assert limits.admit("d") is None
    assert limits.total == 5


def test_refusals_take_no_slot():
    limits = PendingLimits(max_total=2, max_per_address=1)
    limits.admit("a")
    for _ in range(1000):
        limits.admit("a")
    assert limits.total == 1
    assert limits.admit("b") is None


def test_addresses_with_nothing_pending_are_forgotten():
    limits = PendingLimits(max_total=10_000, max_per_address=64)
    for n in range(1000):
        limits.admit(f"10.0.{n // 256}.{n % 256}")
    assert limits.addresses == 1000
    for n in range(1000):
        limits.release(f"10.0.{n // 256}.{n % 256}")
    assert (limits.addresses, limits.total) == (0, 0)


def test_releasing_more_than_was_taken_is_a_bug():
    limits = PendingLimits(max_total=10, max_per_address=2)
    limits.admit("a")
    limits.release("a")
    with pytest.raises(ValueError):
        limits.release("a")
    assert limits.total == 0


@pytest.mark.parametrize(("total", "per_address"), [(0, 1), (1, 0), (-1, 5)])
def test_caps_must_be_positive(total, per_address):
    with pytest.raises(ValueError):
        PendingLimits(total, per_address)


# -- RefusalReport ------------------------------------------------------------------------------


def test_a_storm_is_one_line():
    report = RefusalReport(interval=5.0)
    for n in range(4936):
        report.add("refused_per_address", "127.0.0.2", now=100.0 + n / 10_000)
    report.add("handshake_timeouts", "127.0.0.2", now=101.0)
    report.add("unauthorized", "127.0.0.1", now=101.0)
    assert report.due(101.0) == 0.0
    summary = report.take(101.5)
    assert summary is not None
    level, line = summary
    assert level == logging.WARNING
    assert line.startswith("refused 4938 connections in 1.5 s (")
    assert "refused_per_address=4936" in line
    assert "handshake_timeouts=1" in line
    assert "most from 127.0.0.2 (4937), 127.0.0.1 (1)" in line
    assert report.take(102.0) is None  # nothing new


def test_the_next_report_waits_for_the_interval():
    report = RefusalReport(interval=5.0)
    report.add("refused_pending", "a", now=10.0)
    assert report.take(10.0) is not None
    report.add("refused_pending", "a", now=11.0)
    assert report.due(11.0) == pytest.approx(4.0)
    assert report.due(15.0) == 0.0


def test_client_mistakes_alone_are_reported_at_info():
    report = RefusalReport()
    report.add("unauthorized", "a", now=0.0)
    report.add("bad_requests", "b", now=0.0)
    summary = report.take(0.0)
    assert summary is not None
    assert summary[0] == logging.INFO
    assert summary[1].startswith("refused 2 connections in 0.0 s")


def test_the_report_tracks_a_bounded_number_of_addresses():
    report = RefusalReport(max_addresses=10)
    for n in range(1000):
        report.add("refused_pending", f"10.0.{n // 256}.{n % 256}", now=0.0)
    report.add("refused_pending", "10.0.0.0", now=0.0)  # a known one still counts
    assert len(report.addresses) == 10
    assert report.addresses["10.0.0.0"] == 2
    summary = report.take(0.0)
    assert summary is not None
    assert "refused 1001 connections" in summary[1]


# -- an Acceptor on a real loopback socket ------------------------------------------------------


class Served:
    """An Acceptor on 127.0.0.1 in this test's event loop; ``routed`` collects what it hands
    over (the sockets, closed at the end)."""

    def __init__(self, acceptor: Acceptor, routed: list[tuple[Claims, socket.socket]]) -> None:
        self.acceptor = acceptor
        self.routed = routed
        self.port = acceptor.listener.getsockname()[1]


@contextlib.asynccontextmanager
async def serving(
    route: Callable[[Claims, socket.socket], None] | None = None,
    handshake_timeout: float = 5.0,
    max_pending: int = 100,
    max_pending_per_address: int = 4,
    **perimeter: Any,
) -> AsyncIterator[Served]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    routed: list[tuple[Claims, socket.socket]] = []

    def keep(claims: Claims, sock: socket.socket) -> None:
        routed.append((claims, sock))

    try:
        acceptor = Acceptor(
            asyncio.get_running_loop(),
            listener,
            SECRET,
            route or keep,
            handshake_timeout,
            max_pending=max_pending,
            max_pending_per_address=max_pending_per_address,
            **perimeter,
        )
    except BaseException:
        listener.close()
        raise
    try:
        yield Served(acceptor, routed)
    finally:
        acceptor.close()
        for _claims, sock in routed:
            sock.close()


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop, with a deadline."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 30))

    return run


async def open_from(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def answer(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes (b"" if it resets)."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await loop.sock_recv(sock, 4096)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


def upgrade_request(token: str, extra: str = "") -> bytes:
    return (
        f"GET /?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


@in_loop
async def test_an_address_over_its_cap_gets_503_and_others_get_through():
    async with serving(max_pending_per_address=4) as served:
        idle = [await open_from("127.0.0.2", served.port) for _ in range(4)]
        extra = [await open_from("127.0.0.2", served.port) for _ in range(3)]
        try:
            for sock in extra:
                response = await answer(sock)
                assert response.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
                assert b"\r\nRetry-After: 1\r\n" in response
                assert response.endswith(b"\r\n\r\ntoo many pending handshakes from this address\n")
            good = await open_from("127.0.0.1", served.port)
            await asyncio.get_running_loop().sock_sendall(good, upgrade_request(mint(SECRET, 42)))
            await until(lambda: len(served.routed) == 1)
            assert served.routed[0][0].user == 42
            good.close()
            counters = served.acceptor.counters
            assert counters["refused_per_address"] == 3
            assert counters["routed"] == 1
            assert served.acceptor.limits.pending("127.0.0.2") == 4
        finally:
            for sock in idle + extra:
                sock.close()


@in_loop
async def test_the_global_cap_answers_503():
    async with serving(max_pending=3, max_pending_per_address=3) as served:
        idle = [await open_from("127.0.0.2", served.port) for _ in range(3)]
        other = await open_from("127.0.0.3", served.port)
        try:
            response = await answer(other)
            assert response.startswith(b"HTTP/1.1 503 ")
            assert response.endswith(b"\r\n\r\ntoo many pending handshakes\n")
            assert served.acceptor.counters["refused_pending"] == 1
        finally:
            for sock in [*idle, other]:
                sock.close()


@in_loop
async def test_idle_sockets_get_408_at_the_deadline_and_free_their_slots():
    async with serving(handshake_timeout=0.3, max_pending_per_address=2) as served:
        idle = [await open_from("127.0.0.2", served.port) for _ in range(2)]
        try:
            for sock in idle:
                assert (await answer(sock)).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
            assert served.acceptor.counters["handshake_timeouts"] == 2
            assert served.acceptor.limits.total == 0
            later = await open_from("127.0.0.2", served.port)  # its slots are free again
            await asyncio.get_running_loop().sock_sendall(later, upgrade_request(mint(SECRET, 7)))
            await until(lambda: len(served.routed) == 1)
            later.close()
        finally:
            for sock in idle:
                sock.close()


@in_loop
async def test_every_refusal_is_counted_by_reason():
    async with serving() as served:
        loop = asyncio.get_running_loop()
        cases = [
            (b"GET /healthz HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 "),
            (b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 426 "),
            (b"garbage\r\n\r\n", b"HTTP/1.1 400 "),
            (upgrade_request("not-a-token"), b"HTTP/1.1 401 "),
            (upgrade_request(mint("another-secret-" * 4, 1)), b"HTTP/1.1 401 "),
        ]
        for request, status in cases:
            sock = await open_from("127.0.0.1", served.port)
            await loop.sock_sendall(sock, request)
            assert (await answer(sock)).startswith(status)
            sock.close()
        counters = served.acceptor.counters
        assert set(counters) == set(COUNTERS)
        assert counters["health_checks"] == 1
        assert counters["not_websocket"] == 1
        assert counters["bad_requests"] == 1
        assert counters["unauthorized"] == 2
        assert counters["accepted"] == 5
        assert served.acceptor.limits.total == 0


@in_loop
async def test_a_token_with_a_5000_digit_sub_gets_401():
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256"}') + "." + b64(b'{"sub":"' + b"9" * 5000 + b'","exp":9e9}')
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64(signature)}"
    async with serving() as served:
        sock = await open_from("127.0.0.1", served.port)
        await asyncio.get_running_loop().sock_sendall(sock, upgrade_request(token))
        response = await answer(sock)
        sock.close()
        assert response.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
        assert response.endswith(b"\r\n\r\nclaim 'sub' must be a positive user id below 2**63\n")


@in_loop
async def test_a_failure_while_handling_one_connection_closes_that_one_only(caplog):
    """A bug reached through one connection (here: a router that raises) answers that
    connection 500 and closes it; the acceptor keeps serving the next ones."""
    calls = 0

    def broken(claims: Claims, sock: socket.socket) -> None:
        nonlocal calls
        calls += 1
        if claims.user == 13:
            raise RuntimeError("a bug")
        sock.close()

    caplog.set_level(logging.WARNING, logger="ucc.acceptor")
    async with serving(route=broken) as served:
        loop = asyncio.get_running_loop()
        for user in (13, 13, 14):
            sock = await open_from("127.0.0.1", served.port)
            await loop.sock_sendall(sock, upgrade_request(mint(SECRET, user)))
            await answer(sock)  # closed (the router may have taken it: no answer is written)
            sock.close()
        await until(lambda: calls == 3)
        assert served.acceptor.counters["internal_errors"] == 2
        assert served.acceptor.limits.total == 0
    failures = [r for r in caplog.records if "unexpected RuntimeError" in r.getMessage()]
    assert len(failures) == 1  # once, with the address, however many follow
    assert "127.0.0.1:" in failures[0].getMessage()
    assert failures[0].exc_info is not None


@in_loop
async def test_refusals_are_summed_up_not_logged_one_by_one(caplog):
    caplog.set_level(logging.INFO, logger="ucc.acceptor")
    async with serving(max_pending_per_address=2) as served:
        socks = [await open_from("127.0.0.2", served.port) for _ in range(50)]
        try:
            await until(lambda: served.acceptor.counters["refused_per_address"] == 48)
            await until(lambda: bool(caplog.records))
        finally:
            for sock in socks:
                sock.close()
    lines = [r for r in caplog.records if r.name == "ucc.acceptor"]
    assert "any Origin is accepted" in lines.pop(0).getMessage()  # the start line, once
    assert 1 <= len(lines) <= 2  # the storm, then what was left of it at close
    assert lines[0].levelno == logging.WARNING
    assert "refused_per_address=" in lines[0].getMessage()
    assert "most from 127.0.0.2" in lines[0].getMessage()


# -- the open-files limit (shards.limits): a socket per pending handshake ----------------------

RAISE_IN_A_CHILD = """
import resource
from shards.limits import raise_open_files_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
got = raise_open_files_limit()
print(got.before, got.after, got.hard, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)
print(raise_open_files_limit().describe())
"""


def test_the_soft_open_files_limit_is_raised_to_the_hard_limit():
    """In a child process (this one's limit stays as it is)."""
    done = subprocess.run(
        [sys.executable, "-c", RAISE_IN_A_CHILD],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    first, second = done.stdout.splitlines()
    before, after, hard, now, real_hard = (int(n) for n in first.split())
    assert (before, hard) == (256, real_hard)
    assert after == now
    if real_hard != resource.RLIM_INFINITY:
        assert after == real_hard
        assert second == f"open files limit: {real_hard} (already the hard limit)"
    else:
        assert after > 256


@pytest.mark.parametrize(
    ("limit", "line"),
    [
        (OpenFilesLimit(1024, 1048576, 1048576), "open files limit: 1024 -> 1048576"),
        (OpenFilesLimit(4096, 4096, 4096), "open files limit: 4096 (already the hard limit)"),
        (OpenFilesLimit(1024, 1024, 4096), "open files limit: 1024 (could not raise it to 4096)"),
        (
            OpenFilesLimit(1024, 1048576, resource.RLIM_INFINITY),
            "open files limit: 1024 -> 1048576",
        ),
    ],
)
def test_what_the_log_says_about_the_limit(limit, line):
    assert limit.describe() == line


def test_whether_the_limit_allows_the_pending_cap():
    assert OpenFilesLimit(1024, 20_000, 20_000).allows(10_000)
    assert not OpenFilesLimit(1024, 1024, 1024).allows(10_000)
    infinity = resource.RLIM_INFINITY
    assert OpenFilesLimit(infinity, infinity, infinity).allows(10**9)


# -- ConnectRates ---------------------------------------------------------------------------------


def test_an_address_gets_its_burst_then_its_rate():
    rates = ConnectRates(rate=10, burst=20)
    assert all(rates.admit("a", 100.0) is None for _ in range(20))
    assert rates.admit("a", 100.0) == 1.0  # Retry-After: whole seconds, at least 1
    assert rates.admit("b", 100.0) is None  # another address is not affected
    assert rates.admit("a", 100.25) is None  # 0.25 s at 10/s: two more
    assert rates.admit("a", 100.25) is None
    assert rates.admit("a", 100.25) is not None


def test_retry_after_is_when_a_token_is_back():
    rates = ConnectRates(rate=0.25, burst=1)
    assert rates.admit("a", 0.0) is None
    assert rates.admit("a", 0.0) == 4.0
    assert rates.admit("a", 3.0) == 1.0
    assert rates.admit("a", 4.0) is None


def test_idle_addresses_are_forgotten():
    rates = ConnectRates(rate=10, burst=20)  # a bucket is full again after 2 s
    for n in range(1000):
        rates.admit(f"10.0.{n // 256}.{n % 256}", 50.0)
    assert len(rates) == 1000
    rates.admit("10.9.9.9", 51.9)
    assert len(rates) == 1001  # still refilling
    rates.admit("10.9.9.9", 52.0)
    assert len(rates) == 1  # the others are idle: a fresh bucket is the same as theirs


def test_a_busy_address_is_remembered_while_it_is_busy():
    rates = ConnectRates(rate=1, burst=2)
    refused = 0
    for step in range(50):  # 2 connections/s at 1/s: refused half the time once the burst is gone
        refused += rates.admit("a", step / 2) is not None
        assert len(rates) == 1
    assert refused == 24


def test_very_many_addresses_cannot_grow_the_table_past_its_bound():
    rates = ConnectRates(rate=1, burst=2, max_addresses=100)
    for n in range(10_000):  # all within one refill time: nothing is idle
        assert rates.admit(f"addr-{n}", 10.0) is None
    assert len(rates) == 100
    # the most recently seen are the ones kept: the last address is still over its budget
    assert rates.admit("addr-9999", 10.0) is None
    assert rates.admit("addr-9999", 10.0) is not None


@pytest.mark.parametrize(
    ("rate", "burst", "bound"), [(0, 1, 1), (-1, 2, 1), (1, 0.5, 1), (1, 2, 0), (math.inf, 1, 1)]
)
def test_connect_rates_need_sane_settings(rate, burst, bound):
    with pytest.raises(ValueError):
        ConnectRates(rate, burst, bound)


# -- BanTable -----------------------------------------------------------------------------------


def test_a_ban_lasts_until_its_time():
    bans = BanTable()
    bans.ban(7, until=110.0, now=100.0)
    assert bans.banned(7, 100.0) == 10.0
    assert bans.banned(8, 100.0) is None
    assert bans.banned(7, 109.9) is not None
    assert bans.banned(7, 110.0) is None
    assert len(bans) == 0  # dropped once found expired


def test_a_ban_is_replaced_and_lifted():
    bans = BanTable()
    bans.ban(7, until=110.0, now=100.0)
    bans.ban(7, until=200.0, now=100.0)
    assert bans.banned(7, 150.0) is not None
    bans.ban(7, until=150.0, now=150.0)  # no time left: lifted
    assert bans.banned(7, 150.0) is None
    assert len(bans) == 0


def test_expired_bans_are_swept():
    bans = BanTable()
    for user in range(1, 10_001):  # each ban for 1 s, one new ban every 0.01 s
        now = user / 100
        bans.ban(user, until=now + 1.0, now=now)
    assert len(bans) <= 2 * 101 + 64  # about 100 in force; the rest swept as it grew
    bans.sweep(1000.0)
    assert len(bans) == 0


# -- Acceptor.ban -------------------------------------------------------------------------------


@in_loop
async def test_a_banned_user_gets_403_until_the_ban_is_lifted():
    async with serving() as served:
        served.acceptor.ban(7, 60.0)
        sock = await open_from("127.0.0.1", served.port)
        with sock:
            await asyncio.get_running_loop().sock_sendall(sock, upgrade_request(mint(SECRET, 7)))
            reply = await answer(sock)
        assert reply.startswith(b"HTTP/1.1 403 Forbidden\r\n"), reply
        assert b"banned" in reply
        assert served.acceptor.counters["banned"] == 1
        for user in (8, 7):  # another user, then the same one after the ban is lifted
            if user == 7:
                served.acceptor.ban(7, 0)
            sock = await open_from("127.0.0.1", served.port)
            with sock:
                request = upgrade_request(mint(SECRET, user))
                await asyncio.get_running_loop().sock_sendall(sock, request)
                await until(lambda u=user: any(c.user == u for c, _ in served.routed))
        assert served.acceptor.counters["banned"] == 1


@pytest.mark.parametrize("seconds", [-1.0, math.nan])
def test_a_ban_takes_a_number_of_seconds(seconds):
    async def scenario() -> None:
        async with serving() as served:
            with pytest.raises(ValueError):
                served.acceptor.ban(7, seconds)

    asyncio.run(scenario())


@in_loop
async def test_an_endless_ban_lasts_a_year():
    async with serving() as served:
        served.acceptor.ban(7, math.inf)
        left = served.acceptor.bans.banned(7, time.monotonic())
        assert left is not None
        assert MAX_BAN_SECONDS - 60 < left <= MAX_BAN_SECONDS


# -- origins, connect rate, token settings on a real socket --------------------------------------


async def exchange(port: int, request: bytes, source: str = "127.0.0.1") -> bytes:
    sock = await open_from(source, port)
    with sock:
        await asyncio.get_running_loop().sock_sendall(sock, request)
        return await answer(sock)


@in_loop
async def test_origins_are_checked_when_configured():
    origins = ("https://app.example.com", "https://*.example.org")
    async with serving(allowed_origins=origins) as served:
        token = mint(SECRET, 7)
        for origin in ("https://evil.example", "null", "https://example.org"):
            reply = await exchange(served.port, upgrade_request(token, f"Origin: {origin}\r\n"))
            assert reply.startswith(b"HTTP/1.1 403 Forbidden\r\n"), (origin, reply)
            assert b"origin not allowed" in reply
        assert served.acceptor.counters["forbidden_origin"] == 3
        for origin in ("https://app.example.com", "https://eu.example.org", None):
            extra = f"Origin: {origin}\r\n" if origin else ""
            sock = await open_from("127.0.0.1", served.port)
            with sock:
                await asyncio.get_running_loop().sock_sendall(sock, upgrade_request(token, extra))
                count = len(served.routed) + 1
                await until(lambda n=count: len(served.routed) == n)
        assert served.acceptor.counters["forbidden_origin"] == 3


def test_a_bad_origin_pattern_is_refused_at_construction():
    async def scenario() -> None:
        with pytest.raises(ValueError, match=r"--allowed-origin 'app\.example\.com'"):
            async with serving(allowed_origins=("app.example.com",)):
                pass

    asyncio.run(scenario())


@in_loop
async def test_over_the_connect_rate_an_address_gets_429_with_retry_after():
    async with serving(connect_rate=2.0, max_pending_per_address=64) as served:
        token = mint(SECRET, 7)
        replies = [await exchange(served.port, upgrade_request("x")) for _ in range(5)]
        # the burst (2 x 2) gets as far as the token check, then 429
        assert [r.split(b"\r\n")[0] for r in replies] == [b"HTTP/1.1 401 Unauthorized"] * 4 + [
            b"HTTP/1.1 429 Too Many Requests"
        ]
        assert b"\r\nRetry-After: 1\r\n" in replies[4]
        assert served.acceptor.counters["rate_limited"] == 1
        sock = await open_from("127.0.0.2", served.port)  # another address still gets in
        with sock:
            await asyncio.get_running_loop().sock_sendall(sock, upgrade_request(token))
            await until(lambda: len(served.routed) == 1)
        health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        assert (await exchange(served.port, health)).startswith(b"HTTP/1.1 200 OK")


@in_loop
async def test_a_slow_connect_rate_still_lets_one_connection_in():
    async with serving(connect_rate=0.1) as served:
        assert served.acceptor.rates is not None
        assert served.acceptor.rates.burst == 1.0
        replies = [await exchange(served.port, upgrade_request("x")) for _ in range(2)]
        assert replies[0].startswith(b"HTTP/1.1 401 ")
        assert replies[1].startswith(b"HTTP/1.1 429 ")
        assert b"\r\nRetry-After: 10\r\n" in replies[1]


@in_loop
async def test_token_settings_reach_verify():
    settings = {
        "token_audience": "ucc",
        "token_issuer": "https://auth.example.com",
        "max_channels_per_connection": 2,
    }
    async with serving(**settings) as served:
        bad = [
            mint(SECRET, 7, issuer="https://auth.example.com"),  # no aud
            mint(SECRET, 7, audience="other", issuer="https://auth.example.com"),
            mint(SECRET, 7, audience="ucc"),  # no iss
            mint(SECRET, 7, [1, 2, 3], audience="ucc", issuer="https://auth.example.com"),
        ]
        for token in bad:
            reply = await exchange(served.port, upgrade_request(token))
            assert reply.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), reply
        assert served.acceptor.counters["unauthorized"] == 4
        good = mint(SECRET, 7, [1, 2], audience="ucc", issuer="https://auth.example.com")
        sock = await open_from("127.0.0.1", served.port)
        with sock:
            await asyncio.get_running_loop().sock_sendall(sock, upgrade_request(good))
            await until(lambda: len(served.routed) == 1)
