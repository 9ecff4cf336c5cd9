"""Channels: LocalChannel and ShmChannel behave the same, message for message, for the same actor code."""

from __future__ import annotations

import asyncio
import pickle
from array import array
from collections.abc import Callable

import pytest

from baleen.actors.actor import Actor, run
from baleen.actors.channel import Channel, ChannelClosed, ChannelFull, LocalChannel, ShmChannel
from baleen.messages import (
    AbortRequest,
    Message,
    NewRequest,
    PageUpdate,
    RequestOutput,
    SamplingParams,
    SeqRow,
    Shutdown,
    SlotInit,
    StepPlan,
    StepResult,
    TokenDeltas,
    WorkerError,
    WorkerReady,
)


def int32(values: list[int]) -> bytes:
    return array("i", values).tobytes()


def sample_messages(num_rounds: int = 20) -> list[Message]:
    """One of every message kind per round, with payloads that differ from round to round."""
    out: list[Message] = []
    for i in range(num_rounds):
        ids = int32(list(range(i, i + 50 * (i % 7) + 1)))
        sampling = SamplingParams(temperature=0.1 * (i % 5), top_k=i % 3 + 1, stop=[f"s{i}"], seed=i)
        out += [
            NewRequest(rid=f"r{i}", input_ids=ids, sampling=sampling, warmup=i == 0),
            StepPlan(
                step_id=i,
                rows=[SeqRow(slot=i, prefix_len=i, extend_len=len(ids) // 4, input_ids=ids, sample=True)],
                new_slots=[SlotInit(i, f"r{i}", sampling, ids)],
                page_updates=[PageUpdate(i, 0, int32([i, i + 1]))],
                freed_slots=[i - 1] if i else [],
            ),
            StepResult(step_id=i, token_ids=int32([i] * 8), forward_time=0.5),
            TokenDeltas([RequestOutput(rid=f"r{j}", token_ids=[j, i], prompt_tokens=5, completion_tokens=j)
                         for j in range(i % 4)]
                        + [RequestOutput(rid=f"r{i}", text="ok", token_ids=[1, 2],
                                         finish_reason="stop" if i % 2 else None)]),
            AbortRequest(f"r{i}", "stop", "</s>"),
            WorkerReady(rank=0, num_pages=i, page_size=64, max_context_len=4096, max_num_slots=8),
            WorkerError(rank=1, message=f"oops {i}"),
        ]
    return out


class EchoActor(Actor[list[Message], None]):
    """Sends every message it receives to its outbox (the smallest actor)."""

    def __init__(self, inbox: Channel, outbox: Channel) -> None:
        super().__init__(inbox)
        self.outbox = outbox

    def decide(self, messages: list[Message]) -> list[Message] | None:
        return messages or None

    async def launch(self, plan: list[Message]) -> None:
        for msg in plan:
            await self.outbox.send(msg)
        return None


async def echo_through(inbox: Channel, outbox: Channel, messages: list[Message]) -> list[Message]:
    """Run an EchoActor between two channels and collect what comes out, sending and reading at once."""
    actor = EchoActor(inbox, outbox)
    actor.start()

    async def feed() -> None:
        for msg in messages:
            await inbox.send(msg)
        await inbox.send(Shutdown("done"))

    feeder = asyncio.ensure_future(feed())
    received = [await asyncio.wait_for(outbox.recv(), 5.0) for _ in messages]
    await asyncio.wait_for(feeder, 5.0)
    await asyncio.wait_for(actor.wait(), 5.0)
    return received


Factory = Callable[[], Channel]
FACTORIES: dict[str, Factory] = {
    "local": lambda: LocalChannel(maxsize=3),
    "shm": lambda: ShmChannel.create(capacity=8192),  # small: forces back-pressure and skips
}


def test_echo_actor_same_output_on_both_transports() -> None:
    messages = sample_messages()

    async def over(kind: str) -> list[Message]:
        inbox, outbox = FACTORIES[kind](), FACTORIES[kind]()
        try:
            return await echo_through(inbox, outbox, messages)
        finally:
            inbox.close()
            outbox.close()

    local, shm = run(over("local")), run(over("shm"))
    assert local == messages
    assert shm == messages


def sender_and_receiver(kind: str) -> tuple[Channel, Channel]:
    """Two ends of one channel in this process (for a LocalChannel both are the same object)."""
    if kind == "local":
        channel: Channel = LocalChannel(maxsize=4)
        return channel, channel
    receiver = ShmChannel.create(capacity=256)
    return receiver.spec("send").open(), receiver


@pytest.mark.parametrize("kind", ["local", "shm"])
def test_nowait_full_drain_and_close(kind: str) -> None:
    async def main() -> None:
        tx, rx = sender_and_receiver(kind)
        sent = []
        with pytest.raises(ChannelFull):
            for i in range(100):
                tx.send_nowait(AbortRequest(f"r{i:03d}"))
                sent.append(AbortRequest(f"r{i:03d}"))
        assert 0 < len(sent) < 100
        assert rx.recv_nowait(2) == sent[:2]
        assert rx.recv_nowait() == sent[2:]
        assert rx.recv_nowait() == []
        ready = rx.ready()
        assert not ready.done()
        tx.send_nowait(Shutdown("x"))
        await asyncio.wait_for(ready, 1.0)
        tx.send_nowait(AbortRequest("last"))
        tx.close()  # what was sent before the close is still delivered, then ChannelClosed
        assert await rx.recv() == Shutdown("x")
        assert rx.recv_nowait() == [AbortRequest("last")]
        with pytest.raises(ChannelClosed):
            rx.recv_nowait()
        with pytest.raises(ChannelClosed):
            await rx.recv()
        rx.close()

    run(main())


@pytest.mark.parametrize("kind", ["local", "shm"])
def test_send_waits_for_room_then_fails_when_receiver_closes(kind: str) -> None:
    async def main() -> None:
        tx, rx = sender_and_receiver(kind)
        with pytest.raises(ChannelFull):
            while True:
                tx.send_nowait(AbortRequest("fill"))
        blocked = asyncio.ensure_future(tx.send(AbortRequest("waits")))
        await asyncio.sleep(0.02)
        assert not blocked.done()
        rx.recv_nowait(1)
        await asyncio.wait_for(blocked, 1.0)
        blocked = asyncio.ensure_future(tx.send(AbortRequest("never")))
        await asyncio.sleep(0.02)
        rx.close()
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(blocked, 1.0)
        tx.close()

    run(main())


def test_shm_channel_limits_and_spec() -> None:
    channel = ShmChannel.create(capacity=256)
    try:
        with pytest.raises(ValueError, match="capacity >="):
            channel.send_nowait(NewRequest(rid="big", input_ids=bytes(1000), sampling=SamplingParams()))
        spec = channel.spec("recv")
        assert spec.end == "recv"
        clone = pickle.loads(pickle.dumps(spec))
        reader = clone.open()
        channel.send_nowait(WorkerError(rank=3, message="x"))
        assert reader.recv_nowait() == [WorkerError(rank=3, message="x")]
        reader.close()
        spec.close()
        with pytest.raises(ValueError, match="already"):
            clone.open()
        with pytest.raises(ValueError, match="'send' or 'recv'"):
            channel.spec("both")  # type: ignore[arg-type]
    finally:
        channel.close()
    with pytest.raises(ValueError, match="cannot cross processes"):
        LocalChannel().spec("recv")
