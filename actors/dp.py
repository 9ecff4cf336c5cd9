"""Planning for many ranks: the DP-attention router, and the TCP channel to ranks on other nodes.

`DPRouter` holds one pure-Python `Scheduler` per DP rank and plans them in lock-step: each step every DP
rank gets a plan, an empty one when its scheduler has nothing to run, so that the MLP collectives every
rank joins never wait for a rank that sat the step out. Requests go to the least loaded DP rank. With one
DP rank it is a thin wrapper around the single Scheduler (the TP-only and single-GPU case).

NOTE: the plan DP rank d runs for global step g carries step_id g * num_dp + d, so the StepResult its
leader sends back names both; the router maps it to that scheduler's own step id.

`SocketChannel`: plans reach the ranks of rank 0's node through shared-memory rings; a rank on another
node has one TCP connection to rank 0 (found through the rendezvous store) that carries its plans in and,
for a DP group leader, its StepResults out. Length-prefixed msgpack frames, TCP_NODELAY. A broken
connection is seen at once (EOF), so a dead node is reported without waiting for a collective to time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from collections import deque
from collections.abc import Sequence
from typing import cast

import msgspec

from baleen.actors.channel import Channel, ChannelClosed
from baleen.actors.policy import MAX_INFLIGHT_PLANS, Scheduler
from baleen.actors.policy_stats import spec_metrics
from baleen.messages import (
    Message,
    NewRequest,
    RequestOutput,
    SeqRow,
    Shutdown,
    StepPlan,
    StepResult,
    WorkerReady,
    decode,
    encode,
)

_LEN = 4  # bytes of the little-endian frame length


# ---- DP attention: one scheduler per DP rank, in lock-step -------------------------------------------------

def draft_rows_per_step(rows_per_rank: list[list[SeqRow]]) -> list[list[int]]:
    """For each draft step s = 1 .. (the longest verify row's drafts - 1), every DP rank's verify rows that draft
    at it (a verify row of k drafts drafts at steps 1 .. k - 1; its first draft comes from the previous step)."""
    drafts = [[r.extend_len - 1 for r in rows if not r.input_ids and r.extend_len > 1] for rows in rows_per_rank]
    steps = max((k for ks in drafts for k in ks), default=1) - 1
    return [[sum(k > s for k in ks) for ks in drafts] for s in range(1, steps + 1)]

class DPRouter:
    """Schedulers of all DP ranks behind the single-scheduler interface the SchedulerActor uses."""

    def __init__(self, schedulers: Sequence[Scheduler]) -> None:
        if not schedulers:
            raise ValueError("DPRouter needs at least one scheduler")
        self.schedulers = list(schedulers)
        self._owner: dict[str, int] = {}  # rid -> DP rank of every live request
        self._inflight: dict[int, tuple[list[int | None], list[bool]]] = {}  # g -> (sub step ids, arrived)
        self._next_step = 0

    @property
    def num_dp(self) -> int:
        return len(self.schedulers)

    def load(self, d: int) -> tuple[int, int]:
        """How busy DP rank d is: live requests, then KV pages in use."""
        s = self.schedulers[d]
        return len(s.running) + len(s.waiting), s.allocator.num_used

    def add_request(self, req: NewRequest) -> None:
        """Queue on the least loaded DP rank; AdmissionError as Scheduler.add_request."""
        d = min(range(self.num_dp), key=self.load)
        self.schedulers[d].add_request(req)
        self._owner[req.rid] = d

    def abort(self, rid: str, reason: str = "abort", matched_stop: int | str | None = None) -> RequestOutput | None:
        d = self._owner.pop(rid, None)
        return None if d is None else self.schedulers[d].abort(rid, reason, matched_stop)

    def flush_cache(self) -> tuple[int, int]:
        """Every DP rank's `Scheduler.flush_cache`, summed."""
        freed, held = zip(*(s.flush_cache() for s in self.schedulers))
        return sum(freed), sum(held)

    @property
    def num_inflight(self) -> int:
        """Global steps sent whose results have not all arrived."""
        return len(self._inflight)

    @property
    def has_work(self) -> bool:
        return bool(self._inflight) or any(s.has_work for s in self.schedulers)

    def schedule(self) -> list[StepPlan] | None:
        """Plans of the next step, one per DP rank (in DP-rank order), or None when no rank has work."""
        if len(self._inflight) >= MAX_INFLIGHT_PLANS:
            return None
        subs = [s.schedule() for s in self.schedulers]
        if all(p is None for p in subs):
            return None
        g, n = self._next_step, self.num_dp
        self._next_step += 1
        self._inflight[g] = ([None if p is None else p.step_id for p in subs], [False] * n)
        if n == 1:
            assert subs[0] is not None
            return [msgspec.structs.replace(subs[0], step_id=g)]
        counts = [0 if p is None else sum(r.extend_len for r in p.rows) for p in subs]
        # decode rows only: one token over a cached prefix (a one-token prompt's first chunk is not one)
        all_decode = all(r.extend_len == 1 and r.prefix_len >= 1 for p in subs if p is not None for r in p.rows)
        drafts = draft_rows_per_step([[] if p is None else p.rows for p in subs])
        kinds = [(True, False) if p is None else s.verify_kind(p) for s, p in zip(self.schedulers, subs)]
        all_verify = all(full for full, _ in kinds)
        grammar = all_verify and any(has_grammar for _, has_grammar in kinds)
        return [
            msgspec.structs.replace(p, step_id=g * n + d, dp_num_tokens=counts, dp_all_decode=all_decode,
                                    dp_draft_rows=drafts, dp_all_verify=all_verify, dp_grammar_drafts=grammar)
            if p is not None
            else StepPlan(step_id=g * n + d, rows=[], dp_num_tokens=counts, dp_all_decode=all_decode,
                          dp_draft_rows=drafts, dp_all_verify=all_verify, dp_grammar_drafts=grammar)
            for d, p in enumerate(subs)
        ]  # fmt: skip

    def process_result(self, result: StepResult) -> list[RequestOutput]:
        """One DP leader's result of a step; outputs of the requests it carried tokens for."""
        g, d = divmod(result.step_id, self.num_dp)
        entry = self._inflight.get(g)
        if entry is None or entry[1][d]:
            raise ValueError(f"result of step {g} from DP rank {d} arrived but none is expected")
        sub_ids, arrived = entry
        arrived[d] = True
        if all(arrived):
            del self._inflight[g]
        sub_id = sub_ids[d]
        if sub_id is None:
            return []  # the rank's empty plan
        deltas = self.schedulers[d].process_result(msgspec.structs.replace(result, step_id=sub_id))
        for delta in deltas:
            if delta.finish_reason is not None:
                self._owner.pop(delta.rid, None)
        return deltas

    def metrics(self) -> dict[str, float | int]:
        """The schedulers' metrics summed (ratios recomputed from the sums)."""
        if self.num_dp == 1:
            return self.schedulers[0].metrics()
        parts = [s.metrics() for s in self.schedulers]
        out: dict[str, float | int] = {k: sum(p[k] for p in parts) for k in parts[0]}
        capacity = sum(s.allocator.capacity for s in self.schedulers)
        prompt = sum(s.stats.num_prompt_tokens for s in self.schedulers)
        out["token_usage"] = out["num_used_pages"] / capacity
        out["cache_hit_rate"] = sum(s.stats.num_cached_prompt_tokens for s in self.schedulers) / prompt if prompt else 0.0
        out["last_step_time"] = max(p["last_step_time"] for p in parts)
        out["num_inflight_plans"] = len(self._inflight)
        out.update(spec_metrics(*(int(out[k]) for k in ("num_verify_rows", "num_verify_tokens", "num_draft_tokens",
                                                          "num_accepted_drafts"))))
        for d, s in enumerate(self.schedulers):  # how evenly the DP ranks are loaded
            out[f"dp{d}_num_generated_tokens"] = s.stats.num_generated_tokens
        return out


# ---- TCP channel to a rank on another node ---------------------------------------------------------------
class _FrameProtocol(asyncio.Protocol):
    def __init__(self, channel: SocketChannel) -> None:
        self.channel = channel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # NOTE: uvloop's TCP transport is not an asyncio.Transport subclass, but has its methods.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.channel._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.channel._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.channel._on_lost(exc)

    def pause_writing(self) -> None:
        self.channel._paused = True

    def resume_writing(self) -> None:
        self.channel._paused = False
        _wake(self.channel._drain_waiters)


class SocketChannel(Channel):
    """One TCP connection used both ways; `send` after the peer is gone raises ChannelClosed."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._items: deque[Message] = deque()
        self._waiters: list[asyncio.Future[None]] = []
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._lost: list[asyncio.Future[None]] = []
        self._paused = False
        self._eof = False
        self.error: str | None = None  # why the connection ended, when it did not end cleanly
        self.sent_shutdown = False  # we told the peer to stop: its disconnect is expected
        self.received_shutdown = False  # the peer told us to stop before it disconnected

    def _on_data(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        while len(buf) - pos >= _LEN:
            size = int.from_bytes(buf[pos : pos + _LEN], "little")
            if len(buf) - pos - _LEN < size:
                break
            msg = decode(memoryview(buf)[pos + _LEN : pos + _LEN + size])
            self.received_shutdown |= isinstance(msg, Shutdown)
            self._items.append(msg)
            pos += _LEN + size
        del buf[:pos]
        if pos:
            _wake(self._waiters)

    def _on_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None:
            self.error = f"{type(exc).__name__}: {exc}"
        _wake(self._waiters)
        _wake(self._drain_waiters)
        _wake(self._lost)

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._eof

    def send_nowait(self, msg: Message) -> None:
        if not self.connected:
            raise ChannelClosed(f"the connection to {self.peer} is closed")
        assert self._transport is not None
        frame = encode(msg)
        self._transport.write(len(frame).to_bytes(_LEN, "little") + frame)
        self.sent_shutdown |= isinstance(msg, Shutdown)

    async def send(self, msg: Message) -> None:
        self.send_nowait(msg)
        while self._paused and not self._eof:  # the kernel buffer is full: wait like a full ring
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            await fut

    def recv_nowait(self, max_messages: int | None = None) -> list[Message]:
        count = len(self._items) if max_messages is None else min(max_messages, len(self._items))
        if count == 0:
            if self._eof:
                raise ChannelClosed(f"the connection to {self.peer} is closed")
            return []
        return [self._items.popleft() for _ in range(count)]

    def ready(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._items or self._eof:
            fut.set_result(None)
        else:
            self._waiters.append(fut)
        return fut

    async def wait_lost(self) -> None:
        """Return once the connection has ended (either side)."""
        if not self._eof:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._lost.append(fut)
            await fut

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    while waiters:
        fut = waiters.pop()
        if not fut.done():
            fut.set_result(None)


async def connect(host: str, port: int, timeout: float, peer: str = "rank 0") -> SocketChannel:
    """Connect to rank 0's control server, retrying until `timeout` seconds have passed."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    while True:
        channel = SocketChannel(peer)
        try:
            await loop.create_connection(functools.partial(_FrameProtocol, channel), host, port)
            return channel
        except OSError as e:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"could not connect to {peer} at {host}:{port} within {timeout:g} s: {e}") from e
            await asyncio.sleep(0.2)


class ControlServer:
    """Rank 0's listening socket: every rank on another node connects once and first sends its WorkerReady."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._arrived: asyncio.Queue[SocketChannel] = asyncio.Queue()

    @classmethod
    async def start(cls, host: str = "0.0.0.0") -> ControlServer:
        """Listen on a free port of `host`."""
        self = cls()

        def accept() -> _FrameProtocol:
            channel = SocketChannel("a rank on another node")
            self._arrived.put_nowait(channel)
            return _FrameProtocol(channel)

        self._server = await asyncio.get_running_loop().create_server(accept, host, 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def accept(self, count: int, timeout: float) -> dict[int, SocketChannel]:
        """The channels of `count` ranks by global rank, once each has said it is ready.

        A connection that closes or sends anything but a WorkerReady first (a port scanner, say) is dropped.
        """
        ranks: dict[int, SocketChannel] = {}
        complete = asyncio.get_running_loop().create_future()

        async def hello(channel: SocketChannel) -> None:
            with contextlib.suppress(ChannelClosed):
                msg = await channel.recv()
                if isinstance(msg, WorkerReady) and msg.rank not in ranks:
                    channel.peer = f"rank {msg.rank}"
                    ranks[msg.rank] = channel
                    if len(ranks) == count and not complete.done():
                        complete.set_result(None)
                    return
            channel.close()

        async def collect() -> None:
            greeters = []
            try:
                while not complete.done():
                    arrived = asyncio.ensure_future(self._arrived.get())
                    await asyncio.wait([arrived, complete], return_when=asyncio.FIRST_COMPLETED)
                    if arrived.done():
                        greeters.append(asyncio.ensure_future(hello(arrived.result())))
                    else:
                        arrived.cancel()
            finally:
                for task in greeters:
                    task.cancel()

        try:
            if count:
                await asyncio.wait_for(collect(), timeout)
        except TimeoutError as e:
            raise TimeoutError(
                f"only {len(ranks)} of the {count} ranks on other nodes connected within --dist-timeout "
                f"{timeout:g} s (seen: {sorted(ranks)})"
            ) from e
        return ranks

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


async def watch_peers(channels: dict[int, SocketChannel]) -> None:
    """Raise as soon as a connection to another node's rank ends before we told that rank to stop."""
    pending = {asyncio.ensure_future(ch.wait_lost()): rank for rank, ch in channels.items()}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                rank = pending.pop(fut)
                ch = channels[rank]
                if not ch.sent_shutdown:
                    why = f" ({ch.error})" if ch.error else ""
                    raise RuntimeError(f"rank {rank} on another node disconnected{why}: it died or its node stopped")
    finally:
        for fut in pending:
            fut.cancel()
