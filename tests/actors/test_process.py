"""Child processes: echo across processes, deaths seen at once, errors surfaced, clean stops, no orphans."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from baleen.actors.actor import Actor, run
from baleen.actors.channel import Channel, LocalChannel, ShmChannel
from baleen.actors.process import ChildExit, ChildProcess
from baleen.messages import Message, NewRequest, SamplingParams, StepResult, WorkerError

HERE = os.path.dirname(os.path.abspath(__file__))


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.02)
    return predicate()


def shm_segments(pid: int) -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"baleen_{pid}_")}


class DoubleActor(Actor[list[Message], None]):
    """Replies to each request with a StepResult holding its ids twice (decoding and re-encoding them)."""

    def __init__(self, inbox: Channel, outbox: Channel) -> None:
        super().__init__(inbox)
        self.outbox = outbox

    def decide(self, messages: list[Message]) -> list[Message] | None:
        return messages or None

    async def launch(self, plan: list[Message]) -> None:
        for msg in plan:
            assert isinstance(msg, NewRequest)
            await self.outbox.send(StepResult(step_id=int(msg.rid), token_ids=msg.input_ids * 2))
        return None


async def double_main(channels: list[Channel]) -> None:
    inbox, outbox = channels
    await DoubleActor(inbox, outbox).run()


async def sleep_main(channels: list[Channel]) -> None:
    await asyncio.Event().wait()


async def failing_main(channels: list[Channel], message: str) -> None:
    raise ValueError(message)


async def farewell_main(channels: list[Channel]) -> None:
    (outbox,) = channels
    await outbox.send(WorkerError(rank=7, message="ready"))  # SIGTERM now cancels (it kills before)
    try:
        await asyncio.Event().wait()
    finally:
        await outbox.send(WorkerError(rank=7, message="cleaned up"))


async def stubborn_main(channels: list[Channel]) -> None:
    asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    await channels[0].send(WorkerError(rank=8, message="ready"))
    await asyncio.Event().wait()


async def logging_main(channels: list[Channel]) -> None:
    import logging

    logging.getLogger("baleen.child").info("an INFO line from the child")


async def exchange(inbox: Channel, outbox: Channel, num: int) -> list[Message]:
    async def feed() -> None:
        for i in range(num):
            ids = bytes(range(i % 200)) * 40
            await inbox.send(NewRequest(rid=str(i), input_ids=ids, sampling=SamplingParams(seed=i)))

    feeder = asyncio.ensure_future(feed())
    replies = [await asyncio.wait_for(outbox.recv(), 10.0) for _ in range(num)]
    await feeder
    return replies


def test_echo_across_processes_matches_in_process() -> None:
    async def in_process() -> list[Message]:
        inbox, outbox = LocalChannel(), LocalChannel()
        actor = DoubleActor(inbox, outbox)
        actor.start()
        replies = await exchange(inbox, outbox, 300)
        actor.stop()
        await actor.wait()
        return replies

    async def across() -> list[Message]:
        inbox, outbox = ShmChannel.create(64 << 10), ShmChannel.create(64 << 10)
        try:
            async with ChildProcess(double_main, [inbox.spec("recv"), outbox.spec("send")], name="double"):
                return await exchange(inbox, outbox, 300)
        finally:
            inbox.close()
            outbox.close()

    local = run(in_process())
    assert [r.step_id for r in local] == list(range(300))  # type: ignore[union-attr]
    assert run(across()) == local


def test_child_death_detected_within_a_second_and_nothing_leaks() -> None:
    async def main() -> tuple[ChildExit, float]:
        channel = ShmChannel.create(4096)
        seen: list[float] = []
        child = ChildProcess(
            sleep_main, [channel.spec("recv")], name="victim", on_exit=lambda _: seen.append(time.monotonic())
        )
        child.start()
        await asyncio.sleep(0.3)
        assert child.is_alive() and not seen
        killed_at = time.monotonic()
        os.kill(child.pid or 0, signal.SIGKILL)
        exit_ = await asyncio.wait_for(child.wait(), 1.0)
        channel.close()
        return exit_, seen[0] - killed_at

    exit_, delay = run(main())
    assert exit_.exitcode == -signal.SIGKILL and exit_.error is None
    assert delay < 1.0
    assert not alive(exit_.pid)  # reaped, not a zombie
    assert shm_segments(os.getpid()) == set()


def test_child_exception_reaches_parent() -> None:
    async def main() -> ChildExit:
        child = ChildProcess(failing_main, args=("boom in child",), name="failing")
        child.start()
        return await asyncio.wait_for(child.wait(), 10.0)

    exit_ = run(main())
    assert exit_.exitcode == 1 and not exit_.ok
    assert exit_.error is not None and "ValueError: boom in child" in exit_.error


_LOGGING_PARENT = """
import asyncio, logging
from baleen.actors.actor import run
from baleen.actors.process import ChildProcess
import test_process

logging.basicConfig(level=logging.INFO, format="PARENT-FORMAT %(levelname)s %(name)s: %(message)s")

async def main():
    child = ChildProcess(test_process.logging_main, name="logger")
    child.start()
    assert (await child.wait()).ok

run(main())
"""


def test_a_child_logs_at_the_parents_level_and_format() -> None:
    # A spawned child starts with no logging set up: INFO lines (a rank's "weights loaded", its memory plan) were lost.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _LOGGING_PARENT], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "PARENT-FORMAT INFO baleen.child: an INFO line from the child" in proc.stderr


def test_stop_is_graceful_then_escalates_to_kill() -> None:
    async def main() -> None:
        outbox = ShmChannel.create(4096)
        child = ChildProcess(farewell_main, [outbox.spec("send")], name="farewell")
        child.start()
        assert await asyncio.wait_for(outbox.recv(), 10.0) == WorkerError(rank=7, message="ready")
        exit_ = await child.stop(timeout=5.0)
        assert exit_.ok  # SIGTERM cancelled main; its finally ran and sent a last message
        assert await asyncio.wait_for(outbox.recv(), 1.0) == WorkerError(rank=7, message="cleaned up")
        outbox.close()

        outbox = ShmChannel.create(4096)
        child = ChildProcess(stubborn_main, [outbox.spec("send")], name="stubborn")
        child.start()
        assert await asyncio.wait_for(outbox.recv(), 10.0) == WorkerError(rank=8, message="ready")
        exit_ = await child.stop(timeout=0.3)
        assert exit_.exitcode == -signal.SIGKILL
        outbox.close()

    run(main())


_PARENT = """
import asyncio, signal
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started with SIGINT ignored
from baleen.actors.actor import run
from baleen.actors.channel import ShmChannel
from baleen.actors.process import ChildProcess
import test_process

async def main():
    channel = ShmChannel.create(4096)
    try:
        async with ChildProcess(test_process.sleep_main, [channel.spec("recv")], name="grandchild") as child:
            print(child.pid, flush=True)
            await asyncio.Event().wait()
    finally:
        channel.close()

run(main())
"""


@pytest.mark.parametrize("how", ["ctrl-c", "parent-killed"])
def test_no_orphans_on_ctrl_c_or_parent_death(how: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, like a program started from a terminal
    )
    child_pid = None
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert alive(child_pid) and shm_segments(parent.pid)
        if how == "ctrl-c":
            os.killpg(parent.pid, signal.SIGINT)  # the terminal sends SIGINT to the whole group
            assert parent.wait(10) != 0  # KeyboardInterrupt, after stopping the child
        else:
            parent.kill()
            parent.wait(10)
        assert wait_until(lambda: not alive(child_pid), 5.0)
        assert wait_until(lambda: not shm_segments(parent.pid), 5.0)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child_pid is not None and alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)  # only after a failure: do not leave an orphan behind
