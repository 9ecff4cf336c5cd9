"""The worker: the actor that feeds one rank's model runner StepPlans, and the rank processes' entry points.

The runner is built by `model/build.py` (`build_runner`, in start-up order). With several ranks (TP / EP / DP
attention, model/parallel.py) each rank is one process running `rank_main`: rank 0 also runs the scheduler; the
other ranks of its node get plans through rings, ranks on other nodes through one TCP connection to rank 0 each
(actors/dp.py). Every rank runs every plan of its DP group in the same order, so their collectives line up; only
DP group leaders report StepResults.
"""

from __future__ import annotations

import asyncio
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from baleen.actors.actor import Actor, supervise
from baleen.actors.channel import Channel, LocalChannel
from baleen.actors.dp import ControlServer, SocketChannel, connect, watch_peers
from baleen.actors.scheduler import SchedulerActor, SchedulerSettings
from baleen.messages import (
    CompileGrammars,
    GrammarCompiled,
    GrammarSpec,
    Message,
    StepPlan,
    WorkerError,
    WorkerReady,
)
from baleen.model.build import ATTENTION_BACKENDS as ATTENTION_BACKENDS  # NOTE: re-exported for api/cli.py
from baleen.model.build import WorkerConfig
from baleen.model.config import ParallelConfig
from baleen.model.parallel import ParallelGroups, destroy_distributed, init_distributed
from baleen.model.runner import ModelRunner
from baleen.model.step import PendingStep

T = TypeVar("T")


def ready_message(runner: ModelRunner, rank: int) -> WorkerReady:
    c = runner.config
    return WorkerReady(
        rank=rank,
        num_pages=runner.kv_cache.num_pages,
        page_size=c.page_size,
        max_context_len=c.max_context_len,
        max_num_slots=c.num_slots,
    )


def cpu_thread(device: str, rank: int = 0) -> ThreadPoolExecutor | None:
    """On CPU, the one thread that runs all of a rank's torch work (building its runner, then every step); None on
    CUDA, whose steps are launched from the event loop.

    NOTE: every OS thread that runs a parallel torch op gets an OpenMP team of its own, and once a process has more
    OpenMP threads than cores, libgomp stops spinning at its barriers: every op then pays a futex wake-up. On 2 cores
    one extra team made the tiny model's forward 2-4x slower (docs/PERF.md). One thread, one team.
    """
    return ThreadPoolExecutor(1, f"baleen-torch{rank}") if not device.startswith("cuda") else None


async def in_thread(thread: ThreadPoolExecutor | None, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on `thread` (`cpu_thread`'s), or on the loop's default executor when it is None."""
    return await asyncio.get_running_loop().run_in_executor(thread, fn, *args)


class WorkerActor(Actor[StepPlan, PendingStep]):
    """Runs plans in order; on CUDA launching step N+1 happens before step N's tokens are read (overlap)."""

    def __init__(self, runner: ModelRunner, plans: Channel, results: Channel | None, *, rank: int = 0,
                 thread: ThreadPoolExecutor | None = None) -> None:
        super().__init__(plans, name=f"worker{rank}")
        self.runner = runner
        self.results = results  # None on ranks that do not report tokens
        self.rank = rank
        self._queue: deque[StepPlan] = deque()
        self._pending: deque[PendingStep] = deque()  # launched, not yet finished, in launch order
        self._failed = False
        self._reports: set[asyncio.Task[None]] = set()  # GrammarCompiled answers waiting for their compile
        # NOTE: on CPU a step is computed inside `launch`: there is no device running on while the host plans, so
        # overlapping would only hold step N's tokens back until step N+1 is computed. There each step runs on the
        # rank's torch thread (`cpu_thread`: the one that built the runner), off the event loop, and its result
        # goes out as soon as it is done; the loop meanwhile serves the scheduler (it reads step N's tokens while
        # step N+1 computes), the detokenizer and HTTP.
        self._cpu_thread = thread or cpu_thread(runner.device.type, rank)

    def busy(self) -> bool:
        return bool(self._queue)

    def decide(self, messages: list[Message]) -> StepPlan | None:
        for msg in messages:
            match msg:
                case StepPlan():
                    self._queue.append(msg)
                case CompileGrammars():
                    self._compile(msg.grammars)
                case _:
                    raise TypeError(f"worker got an unexpected {type(msg).__name__}")
        return self._queue.popleft() if self._queue else None

    def _compile(self, specs: list[GrammarSpec]) -> None:
        """Start compiling in the background; rank 0 tells the scheduler when each is ready (or failed)."""
        loop = asyncio.get_running_loop()
        for spec in specs:
            grammars = self.runner.grammars
            fut = grammars.cache.submit(spec) if grammars is not None else None
            if self.rank == 0 and self.results is not None:
                task = loop.create_task(self._report_compiled(spec, fut))
                self._reports.add(task)
                task.add_done_callback(self._reports.discard)

    async def _report_compiled(self, spec: GrammarSpec, fut: Any) -> None:
        assert self.results is not None
        error = None
        if fut is None:
            error = "this worker serves no structured output"
        else:
            try:
                await asyncio.wrap_future(fut)
            except Exception as e:  # GrammarError: the schema, regex or grammar is wrong (HTTP 400)
                error = str(e)
        await self.results.send(GrammarCompiled(spec, error))

    async def launch(self, plan: StepPlan) -> PendingStep | None:
        cpu = self._cpu_thread is not None
        if self._pending and (cpu or self.runner.needs_sync_before(plan)):
            while self._pending:
                await self._finish_oldest()
        try:
            step = await in_thread(self._cpu_thread, self._cpu_step, plan) if cpu else self.runner.launch(plan)
            if step.deferred is not None:
                # The forward is queued; its grammar mask waits for the previous step's tokens (model/grammar.py).
                event = self.runner.tokens_awaited(step)
                if event is not None:
                    await asyncio.get_running_loop().run_in_executor(None, event.synchronize)
                self.runner.complete(step)
        except Exception as e:
            self._failed = True
            await self._report(e)
            raise
        self._pending.append(step)
        if cpu:
            await self._finish_oldest()  # computed already: its tokens go out now, not after the next step
            return None
        return step

    def _cpu_step(self, plan: StepPlan) -> PendingStep:
        """A whole step on CPU: launch, and its deferred sampling at once (there is no device to wait for)."""
        step = self.runner.launch(plan)
        if step.deferred is not None and self.runner.tokens_awaited(step) is None:
            self.runner.complete(step)
        return step

    async def finish(self, step: PendingStep) -> None:
        while step in self._pending:
            await self._finish_oldest()

    async def _finish_oldest(self) -> None:
        step = self._pending.popleft()
        try:
            if step.event is not None:
                # Wait off the loop so the scheduler (same process) keeps planning while the GPU runs.
                await asyncio.get_running_loop().run_in_executor(None, step.event.synchronize)
            result = self.runner.finish(step)
        except Exception as e:
            self._failed = True
            await self._report(e)
            raise
        if self.results is not None:
            await self.results.send(result)

    async def on_stop(self) -> None:
        # NOTE: ranks must run the same plans or a collective waits forever: the plans that arrived before
        # the Shutdown still run, unless this rank failed or is being cancelled (killed).
        for report in list(self._reports):
            report.cancel()
        task = asyncio.current_task()
        if self._failed or (task is not None and task.cancelling()):
            return
        while self._queue:
            await self.launch(self._queue.popleft())
        while self._pending:
            await self._finish_oldest()
        if self._cpu_thread is not None:
            self._cpu_thread.shutdown(wait=False)

    async def _report(self, error: BaseException) -> None:
        if self.results is not None:
            detail = "".join(traceback.format_exception_only(type(error), error)).strip()
            await self.results.send(WorkerError(rank=self.rank, message=f"worker {self.rank} failed: {detail}"))


# ---- one process per rank ----------------------------------------------------------------------------------
CONTROL_PORT_KEY = "baleen/control_port"  # rendezvous-store key: rank 0's control server port


@dataclass(frozen=True)
class RankSpec:
    """What a rank process starts with; its channels come in the order `rank_channels` describes."""

    worker: WorkerConfig  # parallel.tp_rank is this rank, device its GPU
    nnodes: int = 1
    scheduler: SchedulerSettings | None = None  # rank 0 only

    @property
    def parallel(self) -> ParallelConfig:
        return self.worker.parallel

    @property
    def ranks_per_node(self) -> int:
        return self.parallel.tp_size // self.nnodes

    def is_leader(self, rank: int) -> bool:
        """Whether `rank` reports its DP group's StepResults (rank 0 of each DP group)."""
        return rank % (self.parallel.tp_size // self.parallel.dp_size) == 0

    def dp_rank(self, rank: int) -> int:
        return rank // (self.parallel.tp_size // self.parallel.dp_size)


def rank_channels(spec: RankSpec) -> tuple[list[int], list[int]]:
    """Rank 0's ring peers on its node: (ranks it sends plans to, leaders it receives results from)."""
    local = list(range(1, spec.ranks_per_node))
    return local, [r for r in local if spec.is_leader(r)]


async def rank_main(channels: Sequence[Channel], spec: RankSpec) -> None:
    """A rank process: join the others, build the runner, run plans (rank 0: and the scheduler).

    Channels: rank 0 gets [requests, deltas, plan ring per local rank, result ring per local leader];
    another rank of node 0 gets [plans, results if it is a leader]; a rank of another node gets none.
    """
    cfg = spec.worker
    rank, world = cfg.parallel.tp_rank, cfg.parallel.tp_size
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store, groups = None, None
    thread = cpu_thread(cfg.device, rank)
    if world > 1:
        if cfg.dist is None:
            raise ValueError(f"rank {rank} of {world} has no rendezvous address")
        store = await in_thread(thread, init_distributed, cfg.dist, rank, world, device)
        groups = await in_thread(thread, ParallelGroups.create, cfg.parallel)
    if rank == 0:
        await _rank0(channels, spec, store, groups, thread)
    elif rank < spec.ranks_per_node:
        runner = await in_thread(thread, ModelRunner.build, cfg, groups)
        plans, results = channels[0], (channels[1] if len(channels) > 1 else None)
        await supervise(WorkerActor(runner, plans, results, rank=rank, thread=thread))
    else:
        await _remote_rank(spec, store, groups, thread)
    destroy_distributed()


async def _rank0(channels: Sequence[Channel], spec: RankSpec, store: Any, groups: ParallelGroups | None,
                 thread: ThreadPoolExecutor | None) -> None:
    assert spec.scheduler is not None
    cfg = spec.worker
    requests, deltas, *rings = channels
    local, _ = rank_channels(spec)
    plan_rings, result_rings = rings[: len(local)], rings[len(local) :]
    server = None
    if spec.nnodes > 1:
        server = await ControlServer.start()
        await asyncio.to_thread(store.set, CONTROL_PORT_KEY, str(server.port))
    runner = await in_thread(thread, ModelRunner.build, cfg, groups)
    remote: dict[int, SocketChannel] = {}
    if server is not None:
        assert cfg.dist is not None
        remote = await server.accept(cfg.parallel.tp_size - spec.ranks_per_node, cfg.dist.timeout_s)
        server.close()
    ready = ready_message(runner, 0)
    await deltas.send(ready)
    remote_ranks = sorted(remote)
    plans, results = LocalChannel(), LocalChannel()
    scheduler = SchedulerActor(
        spec.scheduler.build(ready),
        requests,
        [results, *result_rings, *(remote[r] for r in remote_ranks if spec.is_leader(r))],
        [plans, *plan_rings, *(remote[r] for r in remote_ranks)],
        deltas,
        overlap=spec.scheduler.overlap,
        decode_log_interval=spec.scheduler.decode_log_interval,
        plan_dp_ranks=[spec.dp_rank(r) for r in [0, *local, *remote_ranks]],
    )
    await supervise(scheduler, WorkerActor(runner, plans, results, rank=0, thread=thread), extra=[watch_peers(remote)])


async def _remote_rank(spec: RankSpec, store: Any, groups: ParallelGroups | None,
                       thread: ThreadPoolExecutor | None) -> None:
    cfg = spec.worker
    assert cfg.dist is not None and store is not None
    rank = cfg.parallel.tp_rank
    port = int(await asyncio.to_thread(store.get, CONTROL_PORT_KEY))
    channel = await connect(cfg.dist.host, port, cfg.dist.timeout_s)
    runner = await in_thread(thread, ModelRunner.build, cfg, groups)
    await channel.send(ready_message(runner, rank))
    await supervise(WorkerActor(runner, channel, channel if spec.is_leader(rank) else None, rank=rank, thread=thread))
    if not channel.received_shutdown:
        why = f" ({channel.error})" if channel.error else ""
        raise RuntimeError(f"rank {rank} lost its connection to rank 0{why}: node 0 died or stopped")
