"""A pykka actor that runs on an asyncio event loop instead of a thread of its own.

Owns: :class:`LoopActor`. Its mailbox is the event loop's queue: ``tell`` from the loop's own
thread is a ``call_soon``, from any other thread a ``call_soon_threadsafe``; messages are handled
one at a time, in order, on the loop thread, with pykka's semantics (``on_start``, ``on_stop``,
``on_failure``, replies to ``ask`` through thread-safe futures, proxies), except that a failure in
``on_start`` calls ``on_failure`` too (pykka only logs it). So the shard's cache
keeps a single owner, and the event loop reaches it without a thread hop or a GIL hand-off.
Must never be asked (``ask``, ``stop(block=True)``) from the loop's own thread: that would wait
for itself.

It plugs into pykka below its public API. Every private name of pykka that it relies on is
named in this module only (the imports and :data:`PYKKA_ACTOR_HOOKS` below; pykka is pinned
below 5 in setup.cfg), and ``tests/unit/test_loopactor.py`` fails with a clear message if pykka
renames or drops one.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import pykka
from pykka import ActorDeadError

# -- pykka's private names: all of them, here --------------------------------------------------
try:
    from pykka._envelope import Envelope  # what an inbox holds: ``.message``, ``.reply_to``
    from pykka.messages import _ActorStop as ActorStop  # what ``ActorRef.stop()`` sends
except ImportError as exc:  # pragma: no cover - only with a pykka this code was not written for
    raise ImportError(
        f"actors.loopactor relies on pykka 4's private names and this pykka lacks one ({exc});"
        " setup.cfg pins pykka<5"
    ) from exc

# pykka.Actor's private methods that LoopActor overrides or calls
PYKKA_ACTOR_HOOKS = (
    "_create_actor_inbox",  # overridden: the inbox is the event loop's queue
    "_create_future",  # overridden: a ThreadingFuture (askers are on other threads)
    "_start_actor_loop",  # overridden: run on the loop instead of starting a thread
    "_actor_loop_setup",  # overridden: a failed ``on_start`` calls ``on_failure`` too
    "_handle_receive",  # called: pykka's dispatch (stop, proxy calls, ``on_receive``)
    "_handle_failure",  # called: log the failure, unregister the actor, mark it stopped
    "_stop",  # called: unregister the actor, mark it stopped, ``on_stop`` (an orderly end)
)


class LoopInbox:
    """pykka's ``ActorInbox`` protocol over an event loop."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.actor: LoopActor | None = None
        self.thread = 0

    def put(self, envelope: Envelope[Any], /) -> None:
        assert self.loop is not None and self.actor is not None, "actor not started"
        if threading.get_ident() == self.thread:
            self.loop.call_soon(self.actor.deliver, envelope)
        else:
            self.loop.call_soon_threadsafe(self.actor.deliver, envelope)

    def get(self) -> Envelope[Any]:  # pragma: no cover - pykka's thread loop is never run
        raise RuntimeError("a LoopActor has no thread to read its inbox")

    def empty(self) -> bool:
        return True


class LoopActor(pykka.Actor):
    """Start it on the loop's thread with ``start(loop, ...)``: it runs there from then on."""

    actor_inbox: LoopInbox

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop

    @staticmethod
    def _create_actor_inbox() -> LoopInbox:
        return LoopInbox()

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return pykka.ThreadingFuture()

    def _start_actor_loop(self) -> None:
        inbox = self.actor_inbox
        inbox.loop, inbox.actor, inbox.thread = self.loop, self, threading.get_ident()
        self.loop.call_soon(self._actor_loop_setup)

    def _actor_loop_setup(self) -> None:
        # pykka's own setup only logs a failed on_start (``_handle_failure``) and never calls
        # ``on_failure``: an actor that must take its process down with it would stay deaf
        try:
            self.on_start()
        except Exception:
            self._actor_failed(*sys.exc_info())

    def _actor_failed(self, *exc_info: Any) -> None:
        """The actor failed (nobody asked, so nobody else can hear it): log it, stop it and call
        ``on_failure``, as pykka does for a message. A failing ``on_failure`` is logged too.
        Subclasses call it for a failure outside a message (a reader callback, a timer)."""
        self._handle_failure(*exc_info)
        try:
            self.on_failure(*exc_info)
        except Exception:
            self._handle_failure(*sys.exc_info())

    def deliver(self, envelope: Envelope[Any]) -> None:
        """Handle one message, as pykka's thread loop would."""
        if self.actor_stopped.is_set():
            if envelope.reply_to is not None and not isinstance(envelope.message, ActorStop):
                dead = ActorDeadError(f"{self.actor_ref} stopped before handling the message")
                envelope.reply_to.set_exception(exc_info=(ActorDeadError, dead, None))
            elif envelope.reply_to is not None:
                envelope.reply_to.set(None)
            return
        try:
            response = self._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception()
            else:
                self._actor_failed(*sys.exc_info())
