"""Ring micro-benchmark: ShmChannel vs multiprocessing.Queue between two processes, realistic messages.

    python loadtest/bench_ring.py [--scale 1.0]

For each message kind (a NewRequest of 1-4k int32 token ids, a StepResult and a TokenDeltas for 256
requests) and each transport it measures
- throughput: the parent sends N messages back to back (cycling through 500 distinct ones), the child
  decodes each one, then acknowledges;
- round trip: the parent sends one message, the child decodes it and sends it back (re-encoding it),
  repeated; median and p99.
ShmChannel runs on uvloop with msgpack frames; the Queue sends the same Structs pickled (its normal use).
Prints a markdown table with the ratios.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import time
from array import array
from collections.abc import Callable
from typing import Any

from baleen.actors.actor import run
from baleen.actors.channel import Channel, ShmChannel
from baleen.actors.process import ChildProcess
from baleen.messages import (
    AbortRequest,
    Message,
    NewRequest,
    RequestOutput,
    SamplingParams,
    Shutdown,
    StepResult,
    TokenDeltas,
    encode,
)

NUM_REQUESTS = 256


def make_messages(kind: str, count: int, seed: int = 0) -> list[Message]:
    """`count` distinct messages of one kind."""
    rng = random.Random(seed)
    out: list[Message] = []
    for i in range(count):
        if kind == "NewRequest 1-4k ids":
            ids = array("i", (rng.randrange(129_280) for _ in range(rng.randint(1024, 4096))))
            out.append(NewRequest(rid=f"req-{i}", input_ids=ids.tobytes(), sampling=SamplingParams()))
        elif kind == "StepResult x256":
            ids = array("i", (rng.randrange(129_280) for _ in range(NUM_REQUESTS)))
            logprobs = array("f", (-rng.random() for _ in range(NUM_REQUESTS)))
            out.append(StepResult(step_id=i, token_ids=ids.tobytes(), logprobs=logprobs.tobytes(), forward_time=0.01))
        elif kind == "TokenDeltas x256":
            items = [
                RequestOutput(rid=f"req-{j}", token_ids=[rng.randrange(129_280)], logprobs=[-rng.random()],
                              prompt_tokens=1000, completion_tokens=i)
                for j in range(NUM_REQUESTS)
            ]
            out.append(TokenDeltas(items))
        else:
            raise ValueError(f"unknown message kind {kind!r}")
    return out


KINDS = ["NewRequest 1-4k ids", "StepResult x256", "TokenDeltas x256"]

# ---- the child: a sink (count, then acknowledge) or an echo, switched by control messages ---------------


def control(msg: Message) -> str | None:
    if isinstance(msg, AbortRequest) and msg.reason == "bench":
        return msg.rid
    return None


async def shm_child(channels: list[Channel]) -> None:
    inbox, outbox = channels
    mode = "echo"
    while True:
        msg = await inbox.recv()
        if isinstance(msg, Shutdown):
            if msg.reason != "ping":
                return
            await outbox.send(msg)
            continue
        command = control(msg)
        if command is not None:
            mode = command
            if mode.startswith("sink:"):
                for _ in range(int(mode[5:])):
                    await inbox.recv()
                await outbox.send(AbortRequest("done", "bench"))
            continue
        await outbox.send(msg)


def queue_child(inbox: Any, outbox: Any) -> None:
    while True:
        msg = inbox.get()
        if isinstance(msg, Shutdown):
            if msg.reason != "ping":
                return
            outbox.put(msg)
            continue
        command = control(msg)
        if command is not None:
            if command.startswith("sink:"):
                for _ in range(int(command[5:])):
                    inbox.get()
                outbox.put(AbortRequest("done", "bench"))
            continue
        outbox.put(msg)


# ---- measurements -------------------------------------------------------------------------------------


def summarize(rtts_ns: list[int]) -> tuple[float, float]:
    """Median and p99 round trip in microseconds."""
    ordered = sorted(rtts_ns)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return statistics.median(ordered) / 1e3, p99 / 1e3


async def bench_shm(
    messages: dict[str, list[Message]], counts: dict[str, int], num_rtt: int
) -> dict[str, tuple[float, float, float]]:
    inbox, outbox = ShmChannel.create(16 << 20), ShmChannel.create(16 << 20)
    results: dict[str, tuple[float, float, float]] = {}
    try:
        async with ChildProcess(shm_child, [inbox.spec("recv"), outbox.spec("send")], name="bench-shm"):
            await inbox.send(Shutdown("ping"))  # wait until the child runs: start-up is not measured
            await outbox.recv()
            for kind, msgs in messages.items():
                count = counts[kind]
                await inbox.send(AbortRequest(f"sink:{count}", "bench"))
                start = time.perf_counter()
                for i in range(count):
                    await inbox.send(msgs[i % len(msgs)])
                await outbox.recv()
                rate = count / (time.perf_counter() - start)
                await inbox.send(AbortRequest("echo", "bench"))
                rtts = []
                for i in range(num_rtt):
                    t0 = time.perf_counter_ns()
                    await inbox.send(msgs[i % len(msgs)])
                    await outbox.recv()
                    rtts.append(time.perf_counter_ns() - t0)
                results[kind] = (rate, *summarize(rtts))
            await inbox.send(Shutdown())
    finally:
        inbox.close()
        outbox.close()
    return results


def bench_queue(
    messages: dict[str, list[Message]], counts: dict[str, int], num_rtt: int
) -> dict[str, tuple[float, float, float]]:
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=queue_child, args=(inbox, outbox), daemon=True)
    child.start()
    results: dict[str, tuple[float, float, float]] = {}
    try:
        inbox.put(Shutdown("ping"))
        outbox.get()
        for kind, msgs in messages.items():
            count = counts[kind]
            inbox.put(AbortRequest(f"sink:{count}", "bench"))
            start = time.perf_counter()
            for i in range(count):
                inbox.put(msgs[i % len(msgs)])
            outbox.get()
            rate = count / (time.perf_counter() - start)
            inbox.put(AbortRequest("echo", "bench"))
            rtts = []
            for i in range(num_rtt):
                t0 = time.perf_counter_ns()
                inbox.put(msgs[i % len(msgs)])
                outbox.get()
                rtts.append(time.perf_counter_ns() - t0)
            results[kind] = (rate, *summarize(rtts))
        inbox.put(Shutdown())
        child.join(10)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    return results


def table(messages: dict[str, list[Message]], shm: dict[str, Any], queue: dict[str, Any]) -> str:
    rows = [
        "| message | bytes (msgpack) | transport | msgs/s | round trip median / p99 (µs) |",
        "|---|---|---|---|---|",
    ]
    fmt: Callable[[tuple[float, float, float]], str] = lambda r: f"{r[1]:.0f} / {r[2]:.0f}"
    for kind, msgs in messages.items():
        size = statistics.mean(len(encode(m)) for m in msgs)
        s, q = shm[kind], queue[kind]
        rows.append(f"| {kind} | {size:,.0f} | shm ring | {s[0]:,.0f} | {fmt(s)} |")
        rows.append(f"| | | mp.Queue | {q[0]:,.0f} | {fmt(q)} |")
        rows.append(f"| | | **ratio** | **{s[0] / q[0]:.1f}x** | **{q[1] / s[1]:.1f}x / {q[2] / s[2]:.1f}x** |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the message counts")
    args = parser.parse_args()
    # each throughput row runs for roughly a second on 2 cores; a pool of distinct messages is cycled
    base = {"NewRequest 1-4k ids": 40_000, "StepResult x256": 200_000, "TokenDeltas x256": 8_000}
    counts = {kind: max(10, int(n * args.scale)) for kind, n in base.items()}
    messages = {kind: make_messages(kind, min(500, counts[kind])) for kind in KINDS}
    num_rtt = max(50, int(2000 * args.scale))
    t0 = time.perf_counter()
    shm = run(bench_shm(messages, counts, num_rtt))
    queue = bench_queue(messages, counts, num_rtt)
    print(table(messages, shm, queue))
    print(f"\n({num_rtt} round trips per row; {time.perf_counter() - t0:.1f} s in all)")


if __name__ == "__main__":
    main()
