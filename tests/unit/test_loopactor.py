"""LoopActor: pykka semantics on an asyncio loop (order, replies, stop, failure)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
from typing import Any

import pykka
import pytest

from actors import loopactor
from actors.loopactor import LoopActor


class Recorder(LoopActor):
    latest: Recorder | None = None  # the test reads the actor's record through this

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        Recorder.latest = self
        self.seen: list[Any] = []
        self.failures: list[BaseException | None] = []
        self.stopped = False

    def on_start(self) -> None:
        self.seen.append("start")

    def on_receive(self, message: Any) -> Any:
        if message == "boom":
            raise ValueError("boom")
        self.seen.append(message)
        return message * 2

    def on_stop(self) -> None:
        self.stopped = True

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        self.failures.append(exception_value)


async def settle() -> None:
    for _ in range(5):  # a few turns of the loop: no clock involved
        await asyncio.sleep(0)


def test_messages_run_in_order_on_the_loop_with_replies():
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ref = Recorder.start(loop)
        actor = Recorder.latest
        assert actor is not None
        ref.tell(1)
        reply = ref.ask(2, block=False)
        threaded = await loop.run_in_executor(None, lambda: ref.ask(3, timeout=5))
        await settle()
        assert actor.seen == ["start", 1, 2, 3]
        assert reply.get(timeout=0) == 4
        assert threaded == 6
        ref.stop(block=False)
        await settle()
        assert actor.stopped
        assert not ref.is_alive()
        with pytest.raises(pykka.ActorDeadError):
            ref.tell(4)

    asyncio.run(scenario())


def test_an_exception_goes_to_the_asker_or_stops_the_actor():
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ref = Recorder.start(loop)
        actor = Recorder.latest
        assert actor is not None
        answer = ref.ask("boom", block=False)
        await settle()
        with pytest.raises(ValueError, match="boom"):
            answer.get(timeout=0)
        assert ref.is_alive()  # an asker got the error: the actor goes on
        ref.tell("boom")
        await settle()
        assert [type(e) for e in actor.failures] == [ValueError]
        assert not ref.is_alive()  # nobody to tell: the actor fails, pykka style

    asyncio.run(scenario())


class FailsOnStart(LoopActor):
    latest: FailsOnStart | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop, failure_fails: bool = False) -> None:
        super().__init__(loop)
        FailsOnStart.latest = self
        self.failure_fails = failure_fails
        self.failures: list[BaseException | None] = []
        self.received: list[Any] = []

    def on_start(self) -> None:
        raise RuntimeError("cannot start")

    def on_receive(self, message: Any) -> Any:
        self.received.append(message)

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        self.failures.append(exception_value)
        if self.failure_fails:
            raise KeyError("on_failure failed too")


def test_a_failure_in_on_start_calls_on_failure_and_stops_the_actor():
    # pykka itself only logs a failed on_start: a CacheActor would never tell its shard
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ref = FailsOnStart.start(loop)
        actor = FailsOnStart.latest
        assert actor is not None
        early = ref.ask("queued before the start ran", block=False)
        await settle()
        assert [str(e) for e in actor.failures] == ["cannot start"]
        assert not ref.is_alive()
        assert actor.received == []
        with pytest.raises(pykka.ActorDeadError):
            early.get(timeout=0)
        with pytest.raises(pykka.ActorDeadError):
            ref.tell("too late")

    asyncio.run(scenario())


def test_a_failing_on_failure_is_logged_and_stays_off_the_loop(caplog):
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        escaped: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: escaped.append(context))
        ref = FailsOnStart.start(loop, failure_fails=True)
        actor = FailsOnStart.latest
        assert actor is not None
        await settle()
        assert len(actor.failures) == 1
        assert not ref.is_alive()
        assert escaped == []  # nothing reached the loop's handler: the actor logged it
        logged = [r.exc_info[1] for r in caplog.records if r.exc_info]
        assert [type(e) for e in logged] == [RuntimeError, KeyError]

    with caplog.at_level("ERROR", logger="pykka"):
        asyncio.run(scenario())


# -- pykka's private names ---------------------------------------------------------------------
# LoopActor (actors/loopactor.py) and PollingInbox/SocketActor (actors/inbox.py) plug into pykka
# below its public API. If pykka renames or drops one of these, these tests say which, and where
# it is used, before anything else fails in a stranger way. (A private name missing at import
# makes actors/loopactor.py itself raise an ImportError that says so.) What actors/inbox.py
# uses: pykka._envelope.Envelope, and it overrides Actor._create_actor_inbox.

PYKKA = f"pykka {importlib.metadata.version('pykka')}"
PYKKA_PIN = "setup.cfg pins pykka<5"


def test_every_private_pykka_hook_loopactor_relies_on_exists():
    missing = [name for name in loopactor.PYKKA_ACTOR_HOOKS if not hasattr(pykka.Actor, name)]
    assert not missing, (
        f"{PYKKA} no longer has pykka.Actor.{', '.join(missing)}: "
        f"actors/loopactor.py (PYKKA_ACTOR_HOOKS) relies on them; {PYKKA_PIN}"
    )


@pytest.mark.parametrize(
    ("module", "name", "used_by"),
    [
        ("pykka._envelope", "Envelope", "actors/loopactor.py, actors/inbox.py"),
        ("pykka.messages", "_ActorStop", "actors/loopactor.py"),
    ],
)
def test_every_private_pykka_name_imported_exists(module, name, used_by):
    try:
        found = hasattr(importlib.import_module(module), name)
    except ImportError:
        found = False
    assert found, f"{PYKKA} no longer has {module}.{name}: {used_by}; {PYKKA_PIN}"


def test_pykka_envelopes_and_hooks_have_the_shape_we_use():
    # LoopInbox.put and LoopActor.deliver read .message and .reply_to; inbox.py builds
    # Envelope(message) with no reply
    envelope = loopactor.Envelope("message")
    assert (envelope.message, envelope.reply_to) == ("message", None), (
        f"{PYKKA} changed Envelope; actors/loopactor.py and actors/inbox.py "
        f"read .message and .reply_to; {PYKKA_PIN}"
    )
    # LoopActor._actor_failed calls _handle_failure(exception_type, exception_value, traceback)
    handle_failure = getattr(pykka.Actor, "_handle_failure", None)
    assert handle_failure is not None, f"{PYKKA} has no Actor._handle_failure; {PYKKA_PIN}"
    parameters = list(inspect.signature(handle_failure).parameters)
    assert parameters == ["self", "exception_type", "exception_value", "traceback"], (
        f"{PYKKA} changed Actor._handle_failure{parameters}: "
        f"actors/loopactor.py calls it with sys.exc_info(); {PYKKA_PIN}"
    )
    # pykka's start() calls these to build and run the actor; LoopActor overrides them
    for hook in ("_create_actor_inbox", "_create_future", "_start_actor_loop"):
        theirs = getattr(pykka.Actor, hook, None)
        assert theirs is not None and theirs.__qualname__ == f"Actor.{hook}", (
            f"{PYKKA}: Actor.{hook} is gone or moved, so the override in actors/loopactor.py"
            f" (and, for _create_actor_inbox, actors/inbox.py) is never called; {PYKKA_PIN}"
        )
