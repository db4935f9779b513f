"""LoopActor: pykka semantics on an asyncio loop (order, replies, stop, failure)."""

from __future__ import annotations

import asyncio
from typing import Any

import pykka
import pytest

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
