"""The Actor base: an asyncio task with inboxes and one fixed loop shape, plus event-loop helpers.

Every actor loop is: receive -> decide -> launch -> finish the previous step (STYLE #5). `launch` may
return a handle to work still in flight (a GPU step); it is finished only after the *next* step was
launched, which is what lets the scheduler plan step N+1 before it reads step N's tokens. While a step
is in flight (or `busy()` says there is work to do) `receive` only drains what is ready; otherwise it
waits for at least one message.

Stopping: a `Shutdown` message (or `stop()`) ends the loop once the step in flight is finished; messages
after a Shutdown in the same batch are dropped. When every inbox is closed by its sender the actor stops
the same way. An exception in any step ends the task with that exception: `wait()` re-raises it and
`supervise` stops the sibling actors and re-raises it, so failures reach the owner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any, Generic, TypeVar

from baleen.actors.channel import Channel, ChannelClosed
from baleen.messages import Message, Shutdown

PlanT = TypeVar("PlanT")
StepT = TypeVar("StepT")
R = TypeVar("R")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop when uvloop is installed, else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, R], *, debug: bool | None = None) -> R:
    """Run `main` to completion on a fresh loop from `new_event_loop` (like asyncio.run)."""
    with asyncio.Runner(debug=debug, loop_factory=new_event_loop) as runner:
        return runner.run(main)


class Actor(Generic[PlanT, StepT]):
    """An asyncio task that turns inbox messages into plans, launches them and finishes them in order."""

    def __init__(self, inboxes: Channel | Sequence[Channel], *, name: str | None = None) -> None:
        self.name = name or type(self).__name__
        self.inboxes: list[Channel] = [inboxes] if isinstance(inboxes, Channel) else list(inboxes)
        if not self.inboxes:
            raise ValueError(f"actor {self.name} needs at least one inbox channel")
        self._stopping = False
        self._wake: asyncio.Future[None] | None = None  # resolved by stop() to end a blocking receive
        self._task: asyncio.Task[None] | None = None

    # ---- the four steps; subclasses override decide, and launch/finish when they have work in flight ----

    async def receive(self, block: bool) -> list[Message]:
        """Messages ready now; when `block`, wait until there is at least one (or the actor stops)."""
        messages = self._drain()
        while block and not messages and not self._stopping:
            await self._wait_any()
            messages = self._drain()
        return messages

    def decide(self, messages: list[Message]) -> PlanT | None:
        """Update state from the messages and return the next step's plan, or None for no step."""
        raise NotImplementedError(f"{type(self).__name__} must implement decide()")

    async def launch(self, plan: PlanT) -> StepT | None:
        """Start the planned step; return a handle if it is still in flight (finished next iteration)."""
        return None

    async def finish(self, step: StepT) -> None:
        """Complete a step launched in the previous iteration (read results, send replies)."""

    # ---- hooks -------------------------------------------------------------------------------------------

    def busy(self) -> bool:
        """True when there is work to plan without new messages (e.g. queued requests): receive won't wait."""
        return False

    async def on_start(self) -> None:
        """Runs once in the task before the first receive."""

    async def on_stop(self) -> None:
        """Runs once when the loop ends, also after an error."""

    # ---- the loop ----------------------------------------------------------------------------------------

    async def run(self) -> None:
        """The actor's main loop; `start` runs it as a task, or await it directly."""
        self._wake = asyncio.get_running_loop().create_future()
        try:
            await self.on_start()
            in_flight: StepT | None = None
            while not self._stopping:
                messages = await self.receive(block=in_flight is None and not self.busy())
                plan = self.decide(messages)
                launched = await self.launch(plan) if plan is not None else None
                if in_flight is not None:
                    await self.finish(in_flight)
                in_flight = launched
            if in_flight is not None:
                await self.finish(in_flight)
        finally:
            await self.on_stop()

    def start(self) -> asyncio.Task[None]:
        """Run the loop as a task of the running event loop."""
        if self._task is not None:
            raise RuntimeError(f"actor {self.name} was already started")
        self._task = asyncio.get_running_loop().create_task(self.run(), name=self.name)
        return self._task

    def stop(self) -> None:
        """Ask the loop to end after finishing its step in flight (like receiving Shutdown)."""
        self._stopping = True
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def wait(self) -> None:
        """Wait for the task to end; re-raises the actor's exception."""
        if self._task is None:
            raise RuntimeError(f"actor {self.name} was not started")
        await self._task

    @property
    def stopping(self) -> bool:
        return self._stopping

    # ---- internals ---------------------------------------------------------------------------------------

    def _drain(self) -> list[Message]:
        messages: list[Message] = []
        for inbox in list(self.inboxes):
            try:
                messages.extend(inbox.recv_nowait())
            except ChannelClosed:
                self.inboxes.remove(inbox)
        if not self.inboxes:
            self._stopping = True
        for i, msg in enumerate(messages):
            if isinstance(msg, Shutdown):
                self._stopping = True
                return messages[:i]
        return messages

    async def _wait_any(self) -> None:
        assert self._wake is not None, "receive runs inside run()"
        ready = [inbox.ready() for inbox in self.inboxes]
        if any(fut.done() for fut in ready):
            return
        try:
            await asyncio.wait([*ready, self._wake], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in ready:
                fut.cancel()


async def supervise(*actors: Actor[Any, Any], extra: Sequence[Awaitable[None]] = ()) -> None:
    """Run actors (and other awaitables) until all end; on the first error cancel the rest and re-raise it."""
    loop = asyncio.get_running_loop()
    tasks = [actor._task or actor.start() for actor in actors]
    tasks += [asyncio.ensure_future(aw, loop=loop) for aw in extra]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

