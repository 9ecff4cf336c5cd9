"""The Actor base: loop shape (receive, decide, launch, finish the previous), stopping, errors, uvloop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from baleen.actors.actor import Actor, new_event_loop, run, supervise
from baleen.actors.channel import Channel, LocalChannel
from baleen.messages import AbortRequest, Message, Shutdown


class StepActor(Actor[str, int]):
    """Plans one queued item per step, keeps each step in flight for one iteration, logs every call."""

    def __init__(self, inboxes: Channel | list[Channel]) -> None:
        super().__init__(inboxes)
        self.log: list[tuple[str, Any]] = []
        self.pending: list[str] = []
        self.num_steps = 0

    async def receive(self, block: bool) -> list[Message]:
        self.log.append(("receive", block))
        return await super().receive(block)

    def busy(self) -> bool:
        return bool(self.pending)

    def decide(self, messages: list[Message]) -> str | None:
        rids = [m.rid for m in messages if isinstance(m, AbortRequest)]
        if "bad" in rids:
            raise ValueError("bad message")
        self.log.append(("decide", rids))
        self.pending += rids
        return self.pending.pop(0) if self.pending else None

    async def launch(self, plan: str) -> int:
        self.num_steps += 1
        self.log.append(("launch", plan, self.num_steps))
        return self.num_steps

    async def finish(self, step: int) -> None:
        self.log.append(("finish", step))

    async def on_stop(self) -> None:
        self.log.append(("stopped",))


def test_loop_launches_next_step_before_finishing_previous() -> None:
    async def main() -> list[tuple[str, Any]]:
        inbox = LocalChannel()
        for rid in "abc":
            inbox.send_nowait(AbortRequest(rid))
        actor = StepActor(inbox)
        actor.start()
        await asyncio.sleep(0.05)  # runs all three steps, then blocks in receive
        inbox.send_nowait(Shutdown())
        await asyncio.wait_for(actor.wait(), 1.0)
        return actor.log

    assert run(main()) == [
        ("receive", True),  # idle: wait for a message
        ("decide", ["a", "b", "c"]),
        ("launch", "a", 1),
        ("receive", False),  # step 1 in flight: only drain
        ("decide", []),
        ("launch", "b", 2),
        ("finish", 1),  # finished after step 2 was launched (overlap)
        ("receive", False),
        ("decide", []),
        ("launch", "c", 3),
        ("finish", 2),
        ("receive", False),
        ("decide", []),
        ("finish", 3),
        ("receive", True),
        ("decide", []),  # Shutdown is not handed to decide
        ("stopped",),
    ]


def test_shutdown_finishes_step_in_flight_and_drops_later_messages() -> None:
    async def main() -> StepActor:
        inbox = LocalChannel()
        for msg in (AbortRequest("a"), Shutdown(), AbortRequest("b")):
            inbox.send_nowait(msg)
        actor = StepActor(inbox)
        await asyncio.wait_for(actor.run(), 1.0)
        return actor

    actor = run(main())
    assert actor.log == [("receive", True), ("decide", ["a"]), ("launch", "a", 1), ("finish", 1), ("stopped",)]


def test_stop_wakes_blocked_receive_and_closed_inboxes_stop() -> None:
    async def main() -> None:
        actor = StepActor([LocalChannel(), LocalChannel()])
        actor.start()
        await asyncio.sleep(0.02)
        assert not actor._task.done()  # type: ignore[union-attr]
        actor.stop()
        await asyncio.wait_for(actor.wait(), 1.0)

        first, second = LocalChannel(), LocalChannel()
        actor = StepActor([first, second])
        actor.start()
        second.send_nowait(AbortRequest("x"))  # a blocked wait wakes on any inbox
        await asyncio.sleep(0.02)
        assert ("launch", "x", 1) in actor.log
        first.close()
        second.close()  # every sender gone: the actor stops by itself
        await asyncio.wait_for(actor.wait(), 1.0)
        assert actor.log[-1] == ("stopped",)

    run(main())


def test_errors_reach_the_owner() -> None:
    async def main() -> None:
        inbox = LocalChannel()
        actor = StepActor(inbox)
        actor.start()
        inbox.send_nowait(AbortRequest("bad"))
        with pytest.raises(ValueError, match="bad message"):
            await asyncio.wait_for(actor.wait(), 1.0)
        assert actor.log[-1] == ("stopped",)

        failing_inbox, idle_inbox = LocalChannel(), LocalChannel()
        failing, idle = StepActor(failing_inbox), StepActor(idle_inbox)
        failing_inbox.send_nowait(AbortRequest("bad"))
        with pytest.raises(ValueError, match="bad message"):
            await asyncio.wait_for(supervise(failing, idle), 1.0)
        assert idle._task is not None and idle._task.cancelled()  # the sibling does not run on alone

    run(main())


def test_uvloop_is_used_when_available() -> None:
    uvloop = pytest.importorskip("uvloop")
    loop = new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert run(loop_type()) is uvloop.Loop
    with pytest.raises(ValueError, match="at least one inbox"):
        StepActor([])
