"""clients/js/ucc.js in a real browser (Debian's chromium, headless) against real ``ucc serve``
hosts: hello and broadcasts, subscribe/unsubscribe, ping, the close codes (4001 stops, 4003 gets
a new token), drain to another host, resume after a shard crash (every offset once, in order),
critical messages acknowledged and deduplicated, and the reconnect backoff.

The page (tests/system/pages/ucc_client/index.html, served with a copy of ucc.js) records every
event of the client in ``window.events``, every frame its sockets sent and received, and takes
its url from ``window.target`` and its tokens from ``window.tokens`` (minted here; each connect
takes the next one, the last one is kept)."""

from __future__ import annotations

import json
import secrets
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from chromium_kit import static_server
from playwright.sync_api import Page

from shards.testing import TIME_FACTOR, Host, wait_until
from shards.testing.stream import BroadcastStream

ROOT = Path(__file__).resolve().parents[2]
PAGE = Path(__file__).parent / "pages" / "ucc_client" / "index.html"
UCC_JS = ROOT / "clients" / "js" / "ucc.js"
CHANNEL = 1
OTHER = 2


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The test page and ucc.js, served over HTTP (a browser loads ES modules from http only)."""
    www = tmp_path_factory.mktemp("www")
    shutil.copy(PAGE, www / "index.html")
    shutil.copy(UCC_JS, www / "ucc.js")
    with static_server(www) as base_url:
        yield base_url


def ms(seconds: float) -> float:
    return seconds * 1000 * TIME_FACTOR


def start(
    new_page: Callable[[str], Page],
    site: str,
    name: str,
    url: str,
    tokens: list[str],
    **options: Any,
) -> Page:
    """A page whose client connects to ``url`` with ``tokens``, and has seen its hello."""
    page = new_page(name)
    page.goto(f"{site}/index.html")
    page.wait_for_function("window.ready === true")
    page.evaluate(
        "([url, tokens, options]) => { window.target = url; window.tokens = tokens;"
        " return window.start(options); }",
        [url, tokens, options],
    )
    wait_js(page, "count('hello') >= 1", 10)
    return page


def wait_js(page: Page, expression: str, timeout: float = 10.0) -> Any:
    """Wait until ``expression`` (evaluated in the page) is truthy; returns its value."""
    return page.wait_for_function(expression, timeout=ms(timeout)).json_value()


def events(page: Page, name: str) -> list[Any]:
    return page.evaluate("(name) => events.filter((e) => e.event === name).map((e) => e.arg)", name)


def messages(page: Page) -> list[dict[str, Any]]:
    """The data part of every message event (the frame left out)."""
    return page.evaluate("messages.map(({frame, ...rest}) => rest)")


def test_hello_then_channel_and_user_messages(new_page, site):
    with Host(shards=2) as host:
        page = start(new_page, site, "hello", host.url, [host.token(5, [CHANNEL])])
        assert page.evaluate("[client.state, client.user]") == ["open", 5]
        hello = events(page, "hello")[0]
        assert hello["user"] == 5 and hello["channels"] == [CHANNEL]
        backend = host.client()
        reply = backend.broadcast_to_channel(CHANNEL, {"text": "hi"})
        backend.broadcast_to_user(5, {"text": "just you"})
        wait_js(page, "messages.length >= 2")
        assert messages(page) == [
            {"channel": CHANNEL, "offset": reply["offset"], "epoch": reply["epoch"],
             "data": {"text": "hi"}},
            {"data": {"text": "just you"}},
        ]  # fmt: skip
        position = page.evaluate(f"client.positions.get({CHANNEL})")
        assert position == {"offset": reply["offset"], "epoch": reply["epoch"]}
        assert [e["event"] for e in page.evaluate("events")][:3] == ["state", "state", "open"]
        assert events(page, "state")[:2] == ["connecting", "open"]


def test_subscribe_and_unsubscribe(new_page, site):
    with Host(shards=2) as host:
        user = 6
        page = start(new_page, site, "subscribe", host.url, [host.token(user, [CHANNEL, OTHER])])
        backend = host.client()
        page.evaluate(f"client.unsubscribe({OTHER})")
        wait_js(page, "count('unsubscribed') === 1")
        assert events(page, "unsubscribed") == [OTHER]
        assert backend.get_online_users_in_channel(OTHER) == []
        backend.broadcast_to_channel(OTHER, "not for me")
        backend.broadcast_to_channel(CHANNEL, "for me")
        wait_js(page, "messages.length >= 1")

        page.evaluate(f"client.subscribe({OTHER})")
        wait_js(page, "count('subscribed') === 1")
        assert events(page, "subscribed") == [OTHER]
        backend.broadcast_to_channel(OTHER, "me again")
        wait_js(page, "messages.length >= 2")
        assert [(m["channel"], m["data"]) for m in messages(page)] == [
            (CHANNEL, "for me"),
            (OTHER, "me again"),
        ]
        # a channel the token does not list: the server's error frame is an "error" event
        page.evaluate("client.subscribe(99)")
        wait_js(page, "count('error') === 1")
        assert events(page, "error")[0]["code"] == "forbidden"
        assert page.evaluate("client.state") == "open"


def test_join_and_leave_frames_and_close(new_page, site):
    with Host(shards=2) as host:
        host.client().set_channel(CHANNEL, join_leave=True)
        alice = start(new_page, site, "join-alice", host.url, [host.token(21, [CHANNEL])])
        bob = start(new_page, site, "join-bob", host.url, [host.token(22, [CHANNEL])])
        wait_js(alice, "events.some((e) => e.event === 'join' && e.arg.user === 22)")
        assert {"type": "join", "channel": CHANNEL, "user": 22} in events(alice, "join")
        bob.evaluate("client.close()")
        assert bob.evaluate("[client.state, count('reconnecting')]") == ["stopped", 0]
        assert [s["code"] for s in events(bob, "stopped")] == [1000]
        wait_js(alice, "count('leave') === 1")
        assert events(alice, "leave") == [{"type": "leave", "channel": CHANNEL, "user": 22}]


def test_pings_keep_the_connection_open_and_a_silent_link_is_replaced(new_page, site):
    with Host(shards=1) as host:
        page = start(new_page, site, "ping", host.url, [host.token(7, [CHANNEL])], pingInterval=150)
        wait_js(page, "received.filter((f) => f.type === 'pong').length >= 5", 10)
        assert page.evaluate("sent.filter((f) => f.type === 'ping').length") >= 5
        assert page.evaluate("[count('open'), count('close'), client.state]") == [1, 0, "open"]

        # pongs stop arriving (a dead link): two intervals later the client reconnects
        page.evaluate("window.dropPongs = true")
        wait_js(page, "count('close') === 1")
        page.evaluate("window.dropPongs = false")
        assert events(page, "close")[0]["code"] == 4002
        wait_js(page, "count('hello') === 2")
        assert page.evaluate("client.state") == "open"


def test_disconnect_4001_stops_for_good(new_page, site):
    with Host(shards=2) as host:
        user = 8
        page = start(new_page, site, "disconnect", host.url, [host.token(user, [CHANNEL])])
        assert host.client().disconnect(user)["connections"] == 1
        wait_js(page, "client.state === 'stopped'")
        assert events(page, "close") == [
            {"code": 4001, "reason": events(page, "close")[0]["reason"]}
        ]
        assert [s["code"] for s in events(page, "stopped")] == [4001]
        # no reconnect was scheduled (it is announced before it is made), no new token asked
        assert page.evaluate("[count('reconnecting'), tokenCalls]") == [0, 1]
        assert not host.client().is_user_online(user)


def test_an_expired_token_is_replaced_at_once(new_page, site):
    # the server checks expiries at each heartbeat: a short one closes the connection soon
    with Host(shards=1, args=("--heartbeat", "0.2")) as host:
        user = 9
        short = host.token(user, [CHANNEL], ttl=2.5 * TIME_FACTOR)  # valid when the page connects
        fresh = host.token(user, [CHANNEL], ttl=3600)
        page = start(new_page, site, "expiry", host.url, [short, fresh])
        wait_js(page, "count('hello') === 2", 10)
        assert [c["code"] for c in events(page, "close")] == [4003]
        assert events(page, "reconnecting") == [{"attempt": 1, "delay": 0}]
        assert page.evaluate("tokenCalls") == 2
        urls = page.evaluate("urls")
        assert len(urls) == 2 and short in urls[0] and fresh in urls[1]
        host.client().broadcast_to_channel(CHANNEL, "after the new token")
        wait_js(page, "messages.length === 1")
        assert page.evaluate("client.state") == "open"


def test_drain_reconnects_at_once_to_the_other_host(new_page, site):
    secret = secrets.token_hex(32)
    with Host(shards=1, secret=secret) as a, Host(shards=1, secret=secret) as b:
        user = 10
        page = start(new_page, site, "drain", a.url, [a.token(user, [CHANNEL])])
        page.evaluate("(url) => { window.target = url; }", b.url)
        a.signal(signal.SIGTERM)
        wait_js(page, "count('hello') === 2", 10)
        drain = page.evaluate("events.find((e) => e.event === 'drain')")
        hello = page.evaluate("events.filter((e) => e.event === 'hello')[1]")
        assert events(page, "reconnecting") == [{"attempt": 1, "delay": 0}]
        assert hello["t"] - drain["t"] < ms(2)
        assert b.client().is_user_online(user)
        assert a.proc.wait(15 * TIME_FACTOR) == 0
        b.client().broadcast_to_channel(CHANNEL, "from b")
        wait_js(page, "messages.length === 1")


def test_a_shard_crash_loses_nothing_and_repeats_nothing(new_page, site):
    with Host(shards=2, args=("--history-size", "5000")) as host:
        user = 11
        page = start(
            new_page, site, "resume", host.url, [host.token(user, [CHANNEL])], minBackoff=100
        )
        with BroadcastStream(host.command, CHANNEL, interval=0.004) as stream:
            wait_until(lambda: len(stream.offsets) > 30, 10, what="for the stream to start")
            wait_js(page, "messages.length > 20")
            old = host.kill_shard(host.shard_of(user))
            wait_js(page, "count('hello') === 2", 15)
            host.wait_shard_replaced(host.shard_of(user), old)
            wait_js(page, "count('resumed') === 1", 10)
            mark = len(stream.offsets)
            wait_until(lambda: len(stream.offsets) > mark + 50, 10, what="for more broadcasts")
        assert not stream.errors, stream.errors
        last = stream.offsets[-1]
        wait_js(page, f"client.positions.get({CHANNEL}).offset === {last}", 10)
        got = [m["offset"] for m in messages(page)]
        assert got == list(range(stream.offsets[0], last + 1))  # each once, in order
        assert [m["data"]["n"] for m in messages(page)] == list(range(len(stream.offsets)))
        resumed = events(page, "resumed")
        assert [r["recovered"] for r in resumed] == [True]
        # the first resume asked for the channel's position at hello (no message yet), the
        # second resumed from the last message after the crash
        resumes = page.evaluate("sent.filter((f) => f.type === 'resume')")
        assert len(resumes) == 2
        assert (resumes[0]["offset"], resumes[0]["epoch"]) == (0, "")
        # 1006 (the shard's death); more than one if a reconnect met the restart (503)
        assert {c["code"] for c in events(page, "close")} == {1006}


def test_a_channel_the_backend_subscribed_is_not_held_after_a_reconnect(new_page, site):
    """A channel the token does not list (subscribed by the backend) cannot be resumed: after
    a reconnect its messages are handed over as they come, never held for a resume."""
    with Host(shards=1) as host:
        user, extra = 5, 9
        page = start(new_page, site, "server-side", host.url, [host.token(user, [CHANNEL])])
        backend = host.client()
        assert backend.subscribe(user, extra)["ok"]
        backend.broadcast_to_channel(extra, "first")
        wait_js(page, "messages.length === 1")
        old = host.kill_shard(0)
        host.wait_shard_replaced(0, old)
        wait_js(page, "count('hello') === 2", 15)
        assert backend.subscribe(user, extra)["ok"]  # the backend subscribes it again
        for n in range(3):
            backend.broadcast_to_channel(extra, f"after {n}")
        wait_js(page, "messages.length === 4")
        assert [m["data"] for m in messages(page)] == ["first", "after 0", "after 1", "after 2"]
        resumes = page.evaluate("sent.filter((f) => f.type === 'resume').map((f) => f.channel)")
        assert extra not in resumes
        assert page.evaluate(f"client._resuming.has({extra})") is False


def test_a_channel_with_no_message_yet_misses_nothing_across_a_crash(new_page, site):
    with Host(shards=2) as host:
        user = 12
        page = start(
            new_page, site, "anchor", host.url, [host.token(user, [CHANNEL])], minBackoff=100
        )
        wait_js(page, f"client.positions.has({CHANNEL})")  # asked for at hello
        assert events(page, "resumed") == []  # that answer is not an event
        assert messages(page) == []
        # the page cannot reconnect until the broadcasts below were sent without it
        page.evaluate("window.target = 'ws://127.0.0.1:9/'")
        host.kill_shard(host.shard_of(user))
        wait_js(page, "count('close') === 1", 10)
        backend = host.client()
        sent = [backend.broadcast_to_channel(CHANNEL, {"n": n}) for n in range(5)]
        assert all(reply["ok"] for reply in sent)
        assert page.evaluate("count('hello')") == 1
        page.evaluate("(url) => { window.target = url; }", host.url)
        wait_js(page, "count('hello') === 2", 20)
        wait_js(page, "messages.length === 5", 10)
        assert [m["offset"] for m in messages(page)] == [reply["offset"] for reply in sent]
        assert [m["data"]["n"] for m in messages(page)] == list(range(5))
        assert [r["recovered"] for r in events(page, "resumed")] == [True]


def test_a_resume_answered_out_of_order_is_put_back_in_order(new_page, site):
    """The protocol lets messages back-filled by a resume come after live ones that followed
    them, and a repeat come again: the page holds the real server's frames after a reconnect
    and hands them to the client reversed, the first twice; the client still delivers each
    offset once, in order."""
    with Host(shards=1, args=("--history-size", "100")) as host:
        user = 15
        page = start(new_page, site, "reorder", host.url, [host.token(user, [CHANNEL])])
        backend = host.client()
        for n in range(3):
            backend.broadcast_to_channel(CHANNEL, n)
        wait_js(page, "messages.length === 3")
        page.evaluate("window.holding = true")
        old = host.kill_shard(0)
        last = 0
        for n in range(3, 10):  # sent while the user is away: replayed by its resume
            last = backend.broadcast_to_channel(CHANNEL, n)["offset"]
        host.wait_shard_replaced(0, old)
        # the new connection's resume answered (a `resumed` already in `received` may be the
        # first connection's, at hello: the live ones below could then overtake the replay)
        wait_js(page, "held.some(({ frame }) => frame.type === 'resumed')", 15)
        for n in range(10, 13):  # live after the resume
            last = backend.broadcast_to_channel(CHANNEL, n)["offset"]
        wait_js(page, f"received.some((f) => f.offset === {last})")
        reversed_offsets = page.evaluate("releaseHeld()")
        assert len(reversed_offsets) >= 2 and reversed_offsets == sorted(reversed_offsets)[::-1]
        wait_js(page, f"client.positions.get({CHANNEL}).offset === {last}")
        assert [m["data"] for m in messages(page)] == list(range(13))
        assert [m["offset"] for m in messages(page)] == list(range(1, 14))
        assert [r["recovered"] for r in events(page, "resumed")] == [True]


def test_critical_messages_are_acknowledged_and_deduplicated(new_page, site):
    with Host(shards=1) as host:
        acking, silent = 12, 13
        page = start(new_page, site, "critical", host.url, [host.token(acking, [CHANNEL])])
        quiet = start(
            new_page, site, "critical-noack", host.url, [host.token(silent, [CHANNEL])],
            autoAck=False,
        )  # fmt: skip
        backend = host.client()
        first = backend.broadcast_to_user(acking, {"pay": 1}, critical=True)["message_id"]
        second = backend.broadcast_to_user(silent, {"pay": 2}, critical=True)["message_id"]
        wait_js(page, "messages.length === 1")
        wait_js(quiet, "messages.length === 1")
        assert messages(page) == [{"id": first, "data": {"pay": 1}}]
        assert messages(quiet) == [{"id": second, "data": {"pay": 2}}]
        wait_js(page, "sent.some((f) => f.type === 'ack')")
        assert page.evaluate("sent.filter((f) => f.type === 'ack')") == [
            {"type": "ack", "id": first}
        ]
        assert quiet.evaluate("sent.filter((f) => f.type === 'ack')") == []

        def kept() -> int:
            return backend.request("router_stats")["critical"]["messages"]

        wait_until(lambda: kept() == 1, 10, what="for the acknowledged message to be dropped")

        # both reconnect: the acknowledged message is not sent again; the other one is, and the
        # client hands it over once
        old = host.kill_shard(0)
        host.wait_shard_replaced(0, old)
        wait_js(page, "count('hello') === 2", 15)
        wait_js(quiet, "count('hello') === 2", 15)
        wait_js(quiet, f"received.filter((f) => f.id === {json.dumps(second)}).length === 2")
        assert messages(quiet) == [{"id": second, "data": {"pay": 2}}]
        backend.broadcast_to_user(acking, "a marker after the reconnect")
        wait_js(page, "messages.length === 2")
        assert page.evaluate(f"received.filter((f) => f.id === {json.dumps(first)}).length") == 1
        assert messages(page)[1] == {"data": "a marker after the reconnect"}


def test_a_failing_token_function_is_retried_with_backoff(new_page, site):
    with Host(shards=1) as host:
        page = start(new_page, site, "token-error", host.url, ["throw", host.token(16, [CHANNEL])])
        assert events(page, "error")[0]["code"] == "client_token"
        assert "no token today" in events(page, "error")[0]["message"]
        tries = events(page, "reconnecting")
        assert [t["attempt"] for t in tries] == [1] and 0 <= tries[0]["delay"] < 250
        assert page.evaluate("[tokenCalls, urls.length, client.state]") == [2, 1, "open"]


def test_backoff_grows_with_jitter(new_page, site):
    with Host(shards=1) as host:
        page = start(
            new_page, site, "backoff", host.url, [host.token(14, [CHANNEL])],
            minBackoff=40, maxBackoff=320,
        )  # fmt: skip
        # the pure function: ceilings double from min up to max; the pick is uniform below them
        ceilings = page.evaluate(
            "[0,1,2,3,4,5,6].map((a) => ucc.backoffDelay(a, 250, 10000, () => 0.999999) + 1)"
        )
        assert ceilings == [250, 500, 1000, 2000, 4000, 8000, 10000]
        assert page.evaluate("ucc.backoffDelay(5, 250, 10000, () => 0)") == 0
        picks = page.evaluate("Array.from({length: 200}, () => ucc.backoffDelay(3, 250, 10000))")
        assert all(0 <= p < 2000 for p in picks) and len(set(picks)) > 50

        # the real thing: the server is gone, the client keeps trying with growing delays
        host.close()
        wait_js(page, "count('reconnecting') >= 7", 15)
        tries = events(page, "reconnecting")[:7]
        assert [t["attempt"] for t in tries] == [1, 2, 3, 4, 5, 6, 7]
        for t in tries:
            assert 0 <= t["delay"] < min(320, 40 * 2 ** (t["attempt"] - 1))
        assert page.evaluate("client.state") == "reconnecting"
        assert page.evaluate("tokenCalls") >= 7
        page.evaluate("client.close()")
        assert page.evaluate("client.state") == "stopped"
