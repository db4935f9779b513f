"""The demo chat (examples/chat) in a real browser: two tabs chat through it, and a tab whose
shard is SIGKILLed reconnects and, with history on, misses nothing.

The chat's backend runs as a real subprocess (``examples/chat/server.py`` on a free port, in its
own process group) in front of a real ``ucc serve``; every assertion is about what the page
shows.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from shards import procgroup, ready
from shards.testing import TIME_FACTOR, Host, wait_until

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "examples" / "chat" / "server.py"
WAIT_MS = 10_000 * TIME_FACTOR  # the deadline of every wait on a page
READY_LINE = re.compile(r"chat on (http://127\.0\.0\.1:\d+/)")


@dataclass
class Chat:
    host: Host
    base: str  # the chat backend's URL, http://127.0.0.1:PORT/


@pytest.fixture
def chat(tmp_path: Path) -> Iterator[Chat]:
    """A ``ucc serve`` (2 shards, history on) and ``examples/chat/server.py`` in front of it.

    Requested before ``new_page``, so that the pages' screenshots are taken (at ``new_page``'s
    teardown) while both still serve."""
    with Host(shards=2, args=("--history-size", "64")) as host:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UCC_")}
        env["UCC_SECRET"] = host.secret
        argv = [sys.executable, str(SERVER), "--port", "0"]
        argv += ["--ucc-url", host.url, "--command", host.command]
        with open(tmp_path / "chat-backend.log", "wb") as log:
            proc = procgroup.start(argv, stdout=subprocess.PIPE, stderr=log, env=env, cwd=ROOT)
            try:
                line = ready.first_line(proc, 15 * TIME_FACTOR, "the chat backend")
                match = READY_LINE.fullmatch(line)
                assert match is not None, f"unexpected ready line: {line!r}"
                yield Chat(host, match[1])
                assert proc.poll() is None, "the chat backend exited"
            finally:
                procgroup.kill(proc)


def api(base: str, path: str, body: dict[str, Any], token: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10 * TIME_FACTOR) as response:
        return json.load(response)


def join(new_page: Callable[[str], Page], base: str, name: str) -> Page:
    page = new_page(name)
    page.goto(f"{base}?name={name}")
    expect(page.locator("#state")).to_have_text("open", timeout=WAIT_MS)
    expect(page.locator("#whoami")).to_have_text(f"as {name}")
    return page


def send(page: Page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


def expect_messages(page: Page, texts: list[str]) -> None:
    """The page shows exactly these messages, in this order."""
    expect(page.locator("#messages li.msg .text")).to_have_text(texts, timeout=WAIT_MS)


def expect_members(page: Page, names: list[str]) -> None:
    expect(page.locator("#members li")).to_have_text(names, timeout=WAIT_MS)


def test_two_tabs_chat(chat: Chat, new_page: Callable[[str], Page]) -> None:
    base = chat.base
    alice = join(new_page, base, "alice")
    bob = join(new_page, base, "bob")
    for page, name in ((alice, "alice"), (bob, "bob")):
        expect_members(page, ["alice", "bob"])
        expect(page.locator("#members li.me")).to_have_text([name])  # shown as "(you)"

    send(alice, "hello bob")
    expect_messages(bob, ["hello bob"])
    send(bob, "hi alice, <b>not bold</b>")
    for page in (alice, bob):
        expect_messages(page, ["hello bob", "hi alice, <b>not bold</b>"])
        expect(page.locator("#messages li.msg .name")).to_have_text(["alice", "bob"])
    expect(alice.locator("#messages b")).to_have_count(0)  # text, never markup

    bob.close()  # the tab goes away: alice sees bob leave
    expect_members(alice, ["alice"])
    expect(alice.locator("#state")).to_have_text("open")


def test_reconnect_after_shard_kill_misses_nothing(
    chat: Chat, new_page: Callable[[str], Page]
) -> None:
    host, base = chat.host, chat.base
    alice = join(new_page, base, "alice")
    bob = join(new_page, base, "bob")
    alice_id = int(alice.evaluate("window.chat.me.user"))
    shard = host.shard_of(alice_id)
    # bob stays connected while alice's shard is down (the names' ids are on two shards)
    assert host.shard_of(int(bob.evaluate("window.chat.me.user"))) != shard
    expect_members(bob, ["alice", "bob"])

    send(alice, "before 1")
    expect_messages(bob, ["before 1"])
    send(bob, "before 2")
    expect_messages(alice, ["before 1", "before 2"])

    ucc = host.client()
    bob_token = api(base, "token", {"name": "bob"})["token"]
    old_pid = host.kill_shard(shard)
    expect(alice.locator("#state")).not_to_have_text("open", timeout=WAIT_MS)
    away = [f"while away {i}" for i in range(10)]
    offline_at_post: list[bool] = []
    for text in away:  # the backend keeps posting (as bob)
        assert api(base, "post", {"text": text}, bob_token)["ok"] is True
        offline_at_post.append(not ucc.is_user_online(alice_id))
    assert offline_at_post[0], "alice was back before the first message: nothing to resume"
    send(bob, "bob while away")  # and so does the other tab
    expect_messages(bob, ["before 1", "before 2", *away, "bob while away"])

    host.wait_shard_replaced(shard, old_pid)
    expect(alice.locator("#state")).to_have_text("open", timeout=WAIT_MS)
    send(alice, "after")
    expected = ["before 1", "before 2", *away, "bob while away", "after"]
    for page in (alice, bob):
        expect_messages(page, expected)  # every message exactly once, in order
        expect_members(page, ["alice", "bob"])
    # recovered by the resume, not reloaded from the backend's history
    expect(alice.locator("#messages li.note")).to_have_count(0)
    assert ucc.request("router_stats")["resumes"]["recovered"] >= 1


def answer(base: str, method: str, path: str, body: bytes | None, **headers: str) -> Any:
    """``(status, JSON body)`` of a raw request to the chat backend."""
    request = urllib.request.Request(base + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10 * TIME_FACTOR) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.load(exc)


def test_backend_refuses_bad_input_with_json_errors(chat: Chat) -> None:
    base = chat.base
    token = api(base, "token", {"name": "carol"})["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    # a token of the same secret for another channel: not for this chat
    other = {"Authorization": f"Bearer {chat.host.token(12345, [99])}"}
    cases: list[tuple[str, str, bytes | None, dict[str, str], int, str]] = [
        ("POST", "token", b"{not json", {}, 400, "bad_json"),
        ("POST", "token", b"\xff\xfe", {}, 400, "bad_json"),
        ("POST", "token", b"[1]", {}, 400, "bad_json"),
        ("POST", "token", b"[" * 5000 + b"]" * 5000, {}, 400, "bad_json"),
        ("POST", "token", b'{"name": 7}', {}, 400, "bad_name"),
        ("POST", "token", b'{"name": "  "}', {}, 400, "bad_name"),
        ("POST", "token", json.dumps({"name": "x" * 33}).encode(), {}, 400, "bad_name"),
        ("POST", "token", b'{"name": "a\\u0000b"}', {}, 400, "bad_name"),
        ("POST", "token", b"x" * 20_000, {}, 413, "too_large"),
        ("POST", "post", b'{"text": "hi"}', {}, 401, "unauthorized"),
        ("POST", "post", b'{"text": "hi"}', {"Authorization": "Bearer nope"}, 401, "unauthorized"),
        ("POST", "post", json.dumps({"text": "y" * 2001}).encode(), bearer, 400, "bad_text"),
        ("POST", "post", b'{"text": ["hi"]}', bearer, 400, "bad_text"),
        ("POST", "post", b'{"text": "hi"}', other, 403, "forbidden"),
        ("POST", "post", b'{"text": "\\ud800"}', bearer, 400, "bad_text"),
        ("GET", "post", None, {}, 405, "bad_method"),
        ("DELETE", "members", None, {}, 405, "bad_method"),
        ("GET", "nowhere", None, {}, 404, "not_found"),
    ]
    for method, path, body, headers, status, code in cases:
        got = answer(base, method, path, body, **headers)
        assert got[0] == status and got[1]["error"] == code, (method, path, body, got)
        assert got[1]["message"], got
    # still serving, and a good message still goes through
    assert api(base, "post", {"text": "still here"}, token)["ok"] is True
    status, history = answer(base, "GET", "history", None)
    assert status == 200
    assert [m["data"]["text"] for m in history["messages"]] == ["still here"]
    assert answer(base, "GET", "members", None) == (200, [])


def test_slow_clients_cannot_take_every_handler(chat: Chat) -> None:
    """Clients that connect and send nothing hold a handler each (up to its 10 s timeout);
    beyond MAX_HANDLERS of them, a request is answered 503 at once, and served again once
    they are gone."""
    limit = int(re.search(r"^MAX_HANDLERS = (\d+)", SERVER.read_text(), re.M)[1])  # type: ignore[index]
    host, port = chat.base.removeprefix("http://").rstrip("/").rsplit(":", 1)
    idle = []
    try:
        for _ in range(limit):
            idle.append(socket.create_connection((host, int(port)), timeout=10 * TIME_FACTOR))
        _status, body = wait_until(
            lambda: (got := answer(chat.base, "GET", "members", None))[0] == 503 and got,
            timeout=10,
            what="a 503 while every handler is taken",
        )
        assert body["error"] == "busy"
    finally:
        for sock in idle:
            sock.close()
    wait_until(
        lambda: answer(chat.base, "GET", "members", None)[0] == 200,
        timeout=15,
        what="served again",
    )
