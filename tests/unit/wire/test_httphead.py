"""actors.wire.httphead: the bounded parser of the HTTP upgrade request head."""

from __future__ import annotations

import pytest

from actors.wire.httphead import MAX_HEAD, HeadError, parse_head, response

UPGRADE = (
    b"GET /chat?token=abc.def-ghi_j&x=1 HTTP/1.1\r\n"
    b"Host: example.com:8080\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)


def head_error(data: bytes, limit: int = MAX_HEAD) -> HeadError:
    with pytest.raises(HeadError) as info:
        parse_head(data, limit)
    return info.value


def head_of_size(size: int) -> bytes:
    """A valid request head of exactly ``size`` bytes, the blank line included."""
    start = b"GET / HTTP/1.1\r\nX-Pad: "
    end = b"\r\n\r\n"
    head = start + b"a" * (size - len(start) - len(end)) + end
    assert len(head) == size
    return head


# -- complete and incomplete heads ------------------------------------------------------------


def test_complete_upgrade_head():
    head = parse_head(UPGRADE)
    assert head is not None
    assert head.method == "GET"
    assert head.path == "/chat"
    assert head.query == {"token": ["abc.def-ghi_j"], "x": ["1"]}
    assert head.headers["host"] == "example.com:8080"
    assert head.headers["sec-websocket-version"] == "13"
    assert head.size == len(UPGRADE)
    assert head.is_upgrade
    assert head.token() == "abc.def-ghi_j"


def test_size_stops_at_the_blank_line():
    head = parse_head(UPGRADE + b"\x81\x05hello")  # the client did not wait for the 101
    assert head is not None
    assert head.size == len(UPGRADE)


def test_every_prefix_is_incomplete():
    for end in range(len(UPGRADE)):
        assert parse_head(UPGRADE[:end]) is None, end


def test_header_names_are_case_insensitive_and_values_stripped():
    head = parse_head(b"GET / HTTP/1.1\r\nUPGRADE:   WebSocket  \r\nX-Empty:\r\n\r\n")
    assert head.headers == {"upgrade": "WebSocket", "x-empty": ""}
    assert head.is_upgrade


def test_first_of_repeated_headers_wins():
    head = parse_head(b"GET / HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    assert head.headers == {"x-a": "1"}


def test_the_origin_header_is_where_the_acceptor_looks_for_it():
    head = parse_head(UPGRADE[:-2] + b"ORIGIN:  https://App.example.com \r\n\r\n")
    assert head is not None
    assert head.headers["origin"] == "https://App.example.com"  # matched by actors.origins
    assert "origin" not in parse_head(UPGRADE).headers  # none: not a browser


def test_not_an_upgrade():
    head = parse_head(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
    assert head.path == "/healthz"
    assert not head.is_upgrade
    assert head.token() == ""


def test_http_1_0_and_other_methods_are_parsed():
    head = parse_head(b"POST /x HTTP/1.0\r\n\r\n")
    assert (head.method, head.path, head.headers) == ("POST", "/x", {})


def test_empty_path_is_root():
    head = parse_head(b"GET ?token=t HTTP/1.1\r\n\r\n")
    assert head.path == "/"
    assert head.token() == "t"


# -- size limit -------------------------------------------------------------------------------


def test_head_of_exactly_the_limit_is_accepted():
    data = head_of_size(MAX_HEAD)
    head = parse_head(data)
    assert head is not None
    assert head.size == MAX_HEAD


def test_no_blank_line_within_the_limit_is_431():
    data = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 9000
    exc = head_error(data)
    assert exc.status == 431


def test_incomplete_below_the_limit_is_not_an_error_yet():
    data = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_HEAD - 100)
    assert len(data) < MAX_HEAD
    assert parse_head(data) is None


def test_custom_limit():
    assert head_error(b"GET / HTTP/1.1\r\nX: " + b"a" * 100, limit=64).status == 431
    assert parse_head(b"GET / HTTP/1.1\r\n\r\n", limit=64) is not None


@pytest.mark.parametrize("extra", [1, 2, 3, 4, 100])
def test_head_larger_than_the_limit_is_431(extra):
    """Over 8 KiB is 431 (docs/protocol.md), whether the head arrives whole or in parts."""
    data = head_of_size(MAX_HEAD + extra)
    assert head_error(data).status == 431  # whole
    assert head_error(data[: MAX_HEAD + 1]).status == 431  # the first segment only


# -- token ------------------------------------------------------------------------------------


def test_token_from_authorization_bearer():
    head = parse_head(b"GET / HTTP/1.1\r\nAuthorization: Bearer   tok.en.sig  \r\n\r\n")
    assert head.token() == "tok.en.sig"


def test_bearer_scheme_is_case_insensitive():
    head = parse_head(b"GET / HTTP/1.1\r\nauthorization: bearer t1\r\n\r\n")
    assert head.token() == "t1"


@pytest.mark.parametrize("value", [b"Basic dXNlcjpwYXNz", b"Bearer", b"tok", b""])
def test_authorization_without_a_bearer_token(value):
    head = parse_head(b"GET / HTTP/1.1\r\nAuthorization: " + value + b"\r\n\r\n")
    assert head.token() == ""


def test_query_token_wins_over_the_header():
    head = parse_head(b"GET /?token=fromquery HTTP/1.1\r\nAuthorization: Bearer hdr\r\n\r\n")
    assert head.token() == "fromquery"


def test_empty_query_token_falls_back_to_the_header():
    head = parse_head(b"GET /?token= HTTP/1.1\r\nAuthorization: Bearer hdr\r\n\r\n")
    assert head.token() == "hdr"


def test_percent_encoded_query_token():
    head = parse_head(b"GET /?token=a%2Eb HTTP/1.1\r\n\r\n")
    assert head.token() == "a.b"


# -- malformed heads --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET /\r\n\r\n",  # no version
        b"GET / HTTP/1.1 extra\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",  # double space
        b"GET / HTTP/2.0\r\n\r\n",
        b"GET / FTP/1.1\r\n\r\n",
        b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",  # whitespace before the colon
        b"GET / HTTP/1.1\r\n Host: h\r\n\r\n",  # obsolete line folding
        b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\n: value\r\n\r\n",  # empty name
        b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n",  # not ASCII
        b"GET / HTTP/1.1\r\nX: caf\xe9\r\n\r\n",
    ],
)
def test_malformed_heads_are_400(data):
    exc = head_error(data)
    assert exc.status == 400
    assert exc.reason
    assert str(exc).startswith("400 ")


# -- response ---------------------------------------------------------------------------------


def test_response():
    raw = response(401, "Unauthorized", "token expired")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 401 Unauthorized"
    assert "Content-Type: text/plain; charset=utf-8" in lines
    assert "Connection: close" in lines
    assert body == b"token expired\n"
    assert f"Content-Length: {len(body)}" in lines


def test_response_extra_headers_and_utf8_body():
    raw = response(503, "Service Unavailable", "redémarrage", {"Retry-After": "1"})
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert "Retry-After: 1" in lines
    assert body == "redémarrage\n".encode()
    assert f"Content-Length: {len(body)}" in lines
