"""The acceptor's perimeter, with real processes (issue 10): allowed origins (403), the connect
rate per source address (429 with Retry-After), the token's audience and issuer (401), and a
bad ``--allowed-origin`` failing before the ready line."""

from __future__ import annotations

import socket

import pytest

from actors.wire.tokens import mint
from shards.testing import TIME_FACTOR, Host, refused_start, upgrade_request

APP = "https://app.example.com"
AUD = "ucc-test"
ISS = "https://auth.example.com"


def answer_head(host: Host, request: bytes, source: str = "127.0.0.1") -> bytes:
    """Send ``request`` from ``source``; the response head the server answers with (up to its
    blank line, or all it sent before closing). The socket is closed on return."""
    with socket.socket() as sock:
        sock.settimeout(10.0 * TIME_FACTOR)
        sock.bind((source, 0))
        sock.connect(host.address)
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.partition(b"\r\n\r\n")[0]


def status_of(head: bytes) -> int:
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    assert len(parts) >= 2 and parts[0] == b"HTTP/1.1", head
    return int(parts[1])


def upgrade(host: Host, token: str, origin: str | None = None, source: str = "127.0.0.1") -> bytes:
    extra = f"Origin: {origin}\r\n" if origin is not None else ""
    return answer_head(host, upgrade_request(f"/?token={token}", extra), source)


def test_only_listed_origins_get_an_upgrade(ucc_host):
    args = ("--allowed-origin", APP, "--allowed-origin", "https://*.example.org")
    host: Host = ucc_host(shards=1, args=args)
    token = host.token(7)
    for origin in ("https://evil.example", "null", "https://example.org", "http://app.example.com"):
        head = upgrade(host, token, origin)
        assert status_of(head) == 403, (origin, head)
    for origin in (APP, "HTTPS://APP.example.com:443", "https://eu.example.org", None):
        head = upgrade(host, token, origin)
        assert status_of(head) == 101, (origin, head)
    # every refusal is counted where an operator looks: router_stats shows the acceptor's
    counters = host.client().request("router_stats")["acceptor"]
    assert counters["forbidden_origin"] == 4
    assert counters["routed"] == 4


def test_the_allowed_origins_come_from_the_environment_too(ucc_host):
    host: Host = ucc_host(shards=1, env={"UCC_ALLOWED_ORIGINS": f"{APP}, https://b.example.com"})
    token = host.token(7)
    assert status_of(upgrade(host, token, "https://evil.example")) == 403
    assert status_of(upgrade(host, token, "https://b.example.com")) == 101


def test_without_allowed_origins_any_origin_is_accepted_and_the_log_says_so(ucc_host, capfd):
    host: Host = ucc_host(shards=1)
    assert status_of(upgrade(host, host.token(7), "https://evil.example")) == 101
    assert status_of(upgrade(host, host.token(7), "null")) == 101
    log = capfd.readouterr().err
    assert log.count("any Origin is accepted") == 1, log[-2000:]


def test_over_the_connect_rate_an_address_gets_429_while_others_connect(ucc_host):
    host: Host = ucc_host(shards=1, args=("--connect-rate", "1"))  # a burst of 2, then 1/s
    statuses: list[int] = []
    head = b""
    for _ in range(20):  # 20 upgrades take far less than the 18 s they would need at 1/s
        head = answer_head(host, upgrade_request("/"), source="127.0.0.2")  # 401: no token
        statuses.append(status_of(head))
        if statuses[-1] == 429:
            break
    assert statuses[-1] == 429, statuses
    assert statuses[:2] == [401, 401], statuses  # the burst got as far as the token check
    assert b"\r\nRetry-After: 1" in head, head
    # another address is not affected
    assert status_of(upgrade(host, host.token(7), source="127.0.0.1")) == 101
    # health checks are not upgrades: not counted
    health = answer_head(host, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.2")
    assert status_of(health) == 200


def test_audience_and_issuer_when_configured(ucc_host):
    host: Host = ucc_host(shards=1, args=("--token-audience", AUD, "--token-issuer", ISS))
    secret = host.secret
    refused = {
        "no aud": mint(secret, 7, issuer=ISS),
        "wrong aud": mint(secret, 7, audience="other", issuer=ISS),
        "no iss": mint(secret, 7, audience=AUD),
        "wrong iss": mint(secret, 7, audience=AUD, issuer="https://evil.example"),
        "neither": host.token(7),
    }
    for why, token in refused.items():
        assert status_of(upgrade(host, token)) == 401, why
    assert status_of(upgrade(host, mint(secret, 7, audience=AUD, issuer=ISS))) == 101


def test_a_token_listing_too_many_channels_gets_401(ucc_host):
    host: Host = ucc_host(shards=1, args=("--max-channels-per-connection", "3"))
    assert status_of(upgrade(host, host.token(7, [1, 2, 3, 4]))) == 401
    assert status_of(upgrade(host, host.token(7, [1, 2, 3]))) == 101


@pytest.mark.parametrize(
    "pattern", ["app.example.com", "https://app.example.com/", "https://*", "https://a:99999"]
)
def test_a_bad_allowed_origin_exits_2_before_the_ready_line(pattern):
    err = refused_start("--allowed-origin", APP, "--allowed-origin", pattern)
    assert f"--allowed-origin {pattern!r}" in err, err[-2000:]


@pytest.mark.parametrize("secret", ["a", "s" * 31, "ü" * 15])  # "ü" is 2 bytes: 30 bytes
def test_a_secret_shorter_than_32_bytes_exits_2_before_the_ready_line(secret):
    err = refused_start(secret=secret)
    assert "at least 32" in err, err[-2000:]
