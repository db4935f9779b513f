"""The admin page of a real host in a real browser (Debian's chromium): it renders the shard
table, its numbers move under load, a shard's restart shows, and its access rules hold over
HTTP (loopback without a token; the token when one is set; a bounded number of open pages)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from playwright.sync_api import Page
from websockets.sync.client import ClientConnection, connect

from shards.admin import MAX_STREAMS
from shards.testing import TIME_FACTOR, Host, wait_until
from shards.testing.redis import free_port

CHANNEL = 7
PEERS = 12
TOKEN = "test-admin-token-0123456789"


def start(ucc_host: Callable[..., Host], *args: str) -> tuple[Host, str]:
    port = free_port()
    host = ucc_host(shards=2, args=("--metrics", f"127.0.0.1:{port}", *args))
    return host, f"http://127.0.0.1:{port}"


def ms(seconds: float) -> float:
    return seconds * 1000 * TIME_FACTOR


def number(page: Page, element: str) -> float:
    return float(page.inner_text(element).replace(",", ""))


def wait_js(page: Page, expression: str, arg: object = None, timeout: float = 15.0) -> None:
    page.wait_for_function(expression, arg=arg, timeout=ms(timeout))


def shard_states(page: Page) -> list[str]:
    return page.eval_on_selector_all(
        "#shards tbody tr", "rows => rows.map(r => r.cells[1].textContent)"
    )


@contextmanager
def peers(host: Host, count: int) -> Iterator[list[ClientConnection]]:
    """``count`` WebSocket clients of users 1..count in CHANNEL, each past its hello."""
    with ExitStack() as stack:
        sockets = []
        for user in range(1, count + 1):
            url = f"{host.url}/?token={host.token(user, [CHANNEL])}"
            ws = stack.enter_context(connect(url, open_timeout=10 * TIME_FACTOR, max_queue=None))
            assert json.loads(ws.recv(timeout=10 * TIME_FACTOR))["type"] == "hello"
            sockets.append(ws)
        yield sockets


def test_the_page_shows_the_shards_and_its_numbers_move_under_load(ucc_host, new_page):
    host, base = start(ucc_host)
    page = new_page("admin")
    page.goto(f"{base}/admin")
    wait_js(page, "document.querySelector('#live').textContent === 'live'")
    wait_js(page, "document.querySelectorAll('#shards tbody tr').length === 2")
    assert shard_states(page) == ["up", "up"]
    pids = page.eval_on_selector_all(
        "#shards tbody tr", "rows => rows.map(r => r.cells[2].textContent)"
    )
    assert sorted(int(pid) for pid in pids) == sorted(host.shard_pid(i) for i in range(2))
    assert page.inner_text("#websocket") == host.url
    assert page.inner_text("#ready") == "ready"
    assert page.inner_text("#redis tbody") == "none: one host, no --redis"
    assert number(page, "#t-connections") == 0

    client = host.client()
    with peers(host, PEERS) as sockets:
        for i in range(20):
            assert client.broadcast_to_channel(CHANNEL, {"n": i})["ok"]
        for ws in sockets:  # every peer got every message
            got = [json.loads(ws.recv(timeout=10 * TIME_FACTOR)) for _ in range(20)]
            assert [frame["data"]["n"] for frame in got] == list(range(20))
        # the page catches up within its one-second updates
        wait_js(page, f"document.querySelector('#t-connections').textContent === '{PEERS}'")
        wait_js(
            page,
            "Number(document.querySelector('#t-frames_delivered').textContent.replace(/,/g, ''))"
            f" >= {20 * PEERS}",
        )
        wait_js(page, "Number(document.querySelector('#t-commands').textContent) >= 20")
        largest = page.eval_on_selector_all(
            "#largest tbody tr",
            "rows => rows.map(r => [r.cells[0].textContent, r.cells[1].textContent])",
        )
        assert largest == [[str(CHANNEL), str(PEERS)]]
        # rates: one more burst shows as frames per second above zero on some update
        for i in range(20):
            assert client.broadcast_to_channel(CHANNEL, {"n": 20 + i})["ok"]
        wait_js(
            page,
            "Number(document.querySelector('#r-frames_delivered').textContent.replace(/,/g, ''))"
            " > 0",
        )
        updates = int(page.evaluate("document.body.dataset.updates"))
        wait_js(page, "(seen) => Number(document.body.dataset.updates) >= seen + 2", updates)

    # a shard is SIGKILLed: the page shows it come back, and the restart with its cause
    old = host.kill_shard(0)
    host.wait_shard_replaced(0, old)
    wait_js(page, "document.querySelectorAll('#restarts tbody tr td').length === 5")
    cells = page.eval_on_selector_all(
        "#restarts tbody tr td", "cells => cells.map(c => c.textContent)"
    )
    assert cells[1:4] == ["0", "2", str(host.shard_pid(0))]
    assert "SIGKILL" in cells[4]
    wait_js(page, "document.querySelector('#t-restarts').textContent === '1'")
    wait_js(page, "document.querySelector('#shards tbody tr').cells[3].textContent === '2'")
    assert shard_states(page) == ["up", "up"]


def request(base: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A raw GET (the whole answer: the server closes)."""
    address = base.removeprefix("http://").rsplit(":", 1)
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    with socket.create_connection((address[0], int(address[1])), timeout=10 * TIME_FACTOR) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_with_a_token_the_page_and_its_stream_need_it(ucc_host, new_page):
    host, base = start(ucc_host, "--admin-token", TOKEN)
    assert request(base, "/admin")[0] == 401
    assert request(base, "/admin/events")[0] == 401
    assert request(base, "/admin", {"Authorization": "Bearer not-the-token-0000"})[0] == 401
    status, body = request(base, "/admin", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and b"<title>ucc admin</title>" in body
    assert request(base, "/ucc.js")[0] == 200  # the browser client needs no token
    # in a browser, the page's ?token= reaches its event stream too
    page = new_page("admin-token")
    page.goto(f"{base}/admin?token={TOKEN}")
    wait_js(page, "document.querySelector('#live').textContent === 'live'")
    wait_js(page, "document.querySelectorAll('#shards tbody tr').length === 2")
    assert host.status()["shards"][0]["state"] == "up"


def open_stream(base: str) -> socket.socket:
    address = base.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((address[0], int(address[1])), timeout=10 * TIME_FACTOR)
    sock.sendall(b"GET /admin/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock


def read_event(sock: socket.socket) -> bytes:
    """Read until a whole event (``data: ...\\n\\n``) has arrived; returns what was read."""
    data = b""
    while b"\ndata: " not in data or not data.endswith(b"\n\n"):
        chunk = sock.recv(65536)
        assert chunk, "the stream ended"
        data += chunk
    return data


def test_open_pages_are_bounded_and_the_port_keeps_answering(ucc_host):
    host, base = start(ucc_host)
    # without a token, a request must name this machine (a DNS-rebound name gets 403)
    status, body = request(base, "/admin", {"Host": "evil.example:80"})
    assert status == 403 and b"localhost" in body
    assert request(base, "/admin", {"Host": "localhost"})[0] == 200
    streams = [open_stream(base) for _ in range(MAX_STREAMS)]
    try:
        for sock in streams:  # they all stream (and none of them reads after this)
            head = read_event(sock)
            assert head.startswith(b"HTTP/1.1 200 OK") and b"text/event-stream" in head
        status, body = request(base, "/admin/events")
        assert status == 503 and b"too many admin pages" in body
        assert request(base, "/healthz")[0] == 200
        assert request(base, "/metrics")[0] == 200
        # a page that closes frees its place
        streams.pop().close()
        wait_until(lambda: request_status(base) == 200, timeout=10, what="a free place")
    finally:
        for sock in streams:
            sock.close()
    assert host.status()["shards"][1]["state"] == "up"


def request_status(base: str) -> int:
    """The status of /admin/events (read up to its head, then closed)."""
    sock = open_stream(base)
    data = b""
    try:
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
    finally:
        sock.close()
    return int(data.split(b" ", 2)[1])
