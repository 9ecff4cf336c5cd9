"""The Engine: wires scheduler -> worker(s) -> detokenizer, in-process or across processes.

    engine = await Engine.start(EngineConfig(model_path=...))
    async for out in engine.generate("Hello", SamplingParams(max_new_tokens=16)):
        print(out.text, end="")
    await engine.close()

EngineConfig, its checks and the start-up plan derived from it (every rank's settings) are in
actors/engine_config.py.

`generate` tokenizes a text prompt, checks the request (admission.check_request: a bad one is a ValueError before
anything is submitted), registers it with the detokenizer actor, which owns every live request's state, and sends it
to the scheduler.

Multi-process layout: this (frontend) process runs the detokenizer actor; one child process
per rank of this node (`worker.rank_main`); rank 0's runs the scheduler next to its worker (they talk
through an in-process channel, so planning step N+1 overlaps the GPU running step N). Frontend and rank 0
talk through shared-memory rings, and so do rank 0 and the other ranks of its node (plans out, results
back from DP-group leaders). Ranks on other nodes are started by `run_node` there and reach rank 0 over
TCP; tensors move between ranks through torch.distributed (model/parallel.py).

`start` returns only after one warm-up generation went through the whole graph (on CUDA it also compiles
the kernels the first request needs); a failed warm-up makes `start` raise with the cause. A rank process
dying, or an actor failing in-process, is the engine's death: it is logged at ERROR with its cause, every
request in flight ends with an error, the engine turns unhealthy for good, and `wait_dead()` returns the
cause (the HTTP server exits on it, see launch_server.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import signal
import time
import uuid
from array import array
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from baleen.actors.actor import Actor, supervise
from baleen.actors.admission import EngineDead, Limits, check_request, tokenize
from baleen.actors.channel import Channel, ChannelClosed, LocalChannel, ShmChannel
from baleen.actors.detokenizer import DetokenizerActor
from baleen.actors.engine_config import EngineConfig, StartupPlan, plan_startup
from baleen.actors.process import ChildExit, ChildProcess
from baleen.actors.scheduler import SchedulerActor
from baleen.actors.worker import (
    WorkerActor,
    cpu_thread,
    in_thread,
    rank_channels,
    rank_main,
    ready_message,
)
from baleen.messages import (
    AbortRequest,
    CacheFlushed,
    FlushCache,
    NewRequest,
    RequestOutput,
    SamplingParams,
    Shutdown,
    WorkerReady,
)
from baleen.model.config import ModelConfig
from baleen.model.runner import ModelRunner

log = logging.getLogger("baleen.engine")
# The first request on CUDA JIT-compiles the kernels it uses; at V3 sizes, on a cold Triton cache, that can
# take minutes, so the warm-up's limit is generous: it catches a hang, not a slow compile.
WARMUP_TIMEOUT_S = 600.0


def _rank0_actors(plan: StartupPlan, runner: Any, requests: Channel, deltas: Channel,
                  thread: ThreadPoolExecutor | None) -> list[Actor[Any, Any]]:
    plans, results = LocalChannel(), LocalChannel()
    router = plan.scheduler.build(ready_message(runner, 0))
    return [
        SchedulerActor(router, requests, results, [plans], deltas, overlap=plan.scheduler.overlap,
                       decode_log_interval=plan.scheduler.decode_log_interval),
        WorkerActor(runner, plans, results, rank=0, thread=thread),
    ]


async def _model(config: EngineConfig) -> tuple[str, ModelConfig]:
    path = config.model_path
    if path is None:
        from baleen.model.make_model import default_model_path

        path = str(await asyncio.to_thread(default_model_path))
    return path, ModelConfig.from_hf(path)


async def run_node(config: EngineConfig) -> int:
    """Run the ranks of node `config.node_rank` >= 1 of a multi-node engine until they stop; an exit code.

    Node 0 runs `Engine.start(config)` (scheduler, frontend, its own ranks); every other node runs this with
    the same config but its --node-rank. Returns 0 after node 0 shut the engine down, 1 when a rank failed
    (its error is logged), e.g. when node 0 could not be reached within --dist-timeout.
    """
    if config.node_rank == 0:
        raise ValueError("node 0 serves the requests: start it with Engine.start(config), not run_node")
    path, model_config = await _model(config)
    plan = plan_startup(config, path, model_config)
    per_node = plan.worker.parallel.tp_size // config.nnodes
    ranks = range(config.node_rank * per_node, (config.node_rank + 1) * per_node)
    children = [ChildProcess(rank_main, [], (plan.rank_spec(r),), name=f"baleen-rank{r}") for r in ranks]
    try:
        for child in children:
            child.start()
        pending = {asyncio.ensure_future(c.wait()) for c in children}
        code = 0
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for exit in (f.result() for f in done):
                if not exit.ok and code == 0:
                    code = 1
                    detail = exit.error.strip().splitlines()[-1] if exit.error else f"exit code {exit.exitcode}"
                    log.error("rank process %s (pid %d) failed: %s", exit.name, exit.pid, detail)
                    log.debug("%s", exit.error)
                    for child in children:
                        child.kill()  # its peers would wait in a collective until --dist-timeout
        return code
    finally:
        for child in children:
            if child.pid is not None:
                await child.stop(timeout=5.0)


class Engine:
    """The embeddable engine. Create it with `await Engine.start(config)`."""

    def __init__(self, config: EngineConfig, model_path: str, model_config: ModelConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.model_path = model_path
        self.model_config = model_config
        self.tokenizer = tokenizer
        self._plan = plan_startup(config, model_path, model_config)
        self.max_context_len = self._plan.worker.max_context_len
        # What generate checks a request against; the scheduler checks the KV pool's size too.
        self.limits = Limits(max_context_len=self.max_context_len, vocab_size=model_config.vocab_size)
        self.metrics: dict[str, float] = {}
        self.error: str | None = None  # set when the engine can no longer serve
        self._dead = asyncio.Event()  # set with `error`
        self._detokenizer: DetokenizerActor | None = None  # owns every live request's state
        self._to_scheduler: Channel | None = None
        self._from_scheduler: Channel | None = None
        self._actors: list[Actor[Any, Any]] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._children: list[ChildProcess] = []  # this node's rank processes, rank 0 first
        self._child: ChildProcess | None = None  # rank 0's
        self._rings: list[ShmChannel] = []  # rank 0 <-> other ranks; this process owns their segments
        self._closing = False
        self._flushes: collections.deque[asyncio.Future[CacheFlushed]] = collections.deque()  # FlushCache waiting

    # ---- start / stop ------------------------------------------------------------------------------------
    @classmethod
    async def start(cls, config: EngineConfig) -> Engine:
        """Load the model, start every actor (and the rank processes), return when ready to serve."""
        if config.node_rank != 0:
            raise ValueError(f"--node-rank {config.node_rank} serves no requests: start that node with run_node(config)")
        path, model_config = await _model(config)
        tok_dir = Path(config.tokenizer_path or path)
        tok_file = tok_dir / "tokenizer.json" if tok_dir.is_dir() else tok_dir
        if not tok_file.exists():
            raise ValueError(f"no tokenizer.json at {tok_dir} (pass --tokenizer-path)")
        engine = cls(config, path, model_config, Tokenizer.from_file(str(tok_file)))
        try:
            await engine._start()
            await engine._warm_up()
        except BaseException:
            await engine.close()
            raise
        return engine

    async def _start(self) -> None:
        to_scheduler: Channel
        from_scheduler: Channel
        if self.config.multiprocess or self._plan.worker.parallel.tp_size > 1:
            requests, deltas = ShmChannel.create(), ShmChannel.create(16 << 20)
            self._to_scheduler, self._from_scheduler = requests, deltas
            self._start_ranks(requests, deltas)
            ready = await self._await_ready(deltas)
            log.info("%d rank(s) ready: %d pages of %d tokens", len(self._children), ready.num_pages, ready.page_size)
            to_scheduler, from_scheduler = requests, deltas
            rank0: list[Actor[Any, Any]] = []
        else:
            thread = cpu_thread(self._plan.worker.device)  # the worker's torch thread, which builds its runner too
            try:
                runner = await in_thread(thread, ModelRunner.build, self._plan.worker)
            except BaseException:
                if thread is not None:
                    thread.shutdown(wait=False)
                raise
            to_scheduler, from_scheduler = LocalChannel(), LocalChannel()
            rank0 = _rank0_actors(self._plan, runner, to_scheduler, from_scheduler, thread)
        self._to_scheduler = to_scheduler
        self._detokenizer = DetokenizerActor(self.tokenizer, from_scheduler, to_scheduler, self._on_metrics,
                                             self._on_flushed)
        self._actors = [self._detokenizer, *rank0]
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name="engine")

    def _start_ranks(self, requests: ShmChannel, deltas: ShmChannel) -> None:
        """Spawn this node's rank processes, wired by rings: frontend <-> rank 0 <-> the other local ranks."""
        spec0 = self._plan.rank_spec(0)
        local, leaders = rank_channels(spec0)
        plan_rings = {r: ShmChannel.create() for r in local}
        result_rings = {r: ShmChannel.create() for r in leaders}
        self._rings = [*plan_rings.values(), *result_rings.values()]
        wiring = {
            0: [
                requests.spec("recv"),
                deltas.spec("send"),
                *(plan_rings[r].spec("send") for r in local),
                *(result_rings[r].spec("recv") for r in leaders),
            ]
        }
        for r in local:
            wiring[r] = [plan_rings[r].spec("recv"), *([result_rings[r].spec("send")] if r in result_rings else [])]
        for r, specs in wiring.items():
            child = ChildProcess(
                rank_main, specs, (self._plan.rank_spec(r),), name=f"baleen-rank{r}", on_exit=self._on_child_exit
            )
            self._children.append(child)
            child.start()
        self._child = self._children[0]

    async def _await_ready(self, deltas: ShmChannel) -> WorkerReady:
        waiter = asyncio.ensure_future(deltas.recv())
        deaths = [asyncio.ensure_future(c.wait()) for c in self._children]
        done, _ = await asyncio.wait([waiter, *deaths], return_when=asyncio.FIRST_COMPLETED)
        if waiter in done and isinstance(waiter.exception(), ChannelClosed):
            # rank 0 exited: its exit status is on its way
            done, _ = await asyncio.wait(deaths, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
        for death in deaths:
            death.cancel()
        if waiter not in done:
            waiter.cancel()
            exits = [d.result() for d in deaths if d in done]
            if not exits:
                raise EngineDead("rank 0 closed its channel during start-up without exiting")
            why = exits[0].error or _exit_cause(exits[0])
            raise EngineDead(f"the rank process {exits[0].name} failed during start-up:\n{why}")
        msg = waiter.result()
        if not isinstance(msg, WorkerReady):
            raise EngineDead(f"the worker process sent {type(msg).__name__} instead of WorkerReady")
        return msg

    async def _warm_up(self) -> None:
        """One short greedy generation per DP rank through the whole graph; EngineDead when one fails.

        NOTE: the warm-up is start-up work, like CUDA graph capture, not a served request: it never reaches
        the HTTP frontend's counters, and its `warmup` flag keeps it out of the scheduler's statistics
        (prompt and generated tokens, cache hit rate, throughput) and its pages out of the prefix cache, so
        what /metrics and `cached_tokens` report after start-up is about the users' requests alone.
        """
        started = time.perf_counter()
        # A few prompt tokens (any ids of the vocabulary do) and two greedy new ones: a prefill and a decode; under
        # speculative decoding k more, so that decode is a verify row with every draft.
        num_new = 2 + self._plan.scheduler.speculative_num_steps
        num_prompt = max(1, min(4, self.max_context_len - num_new))
        prompt = array("i", [(17 + 31 * i) % self.model_config.vocab_size for i in range(num_prompt)]).tobytes()
        sampling = SamplingParams(max_new_tokens=num_new, temperature=0.0, ignore_eos=True)
        # Requests go to the least loaded DP rank: one each, so every rank's attention runs a real batch.
        warmups = [
            self._stream(NewRequest(rid=f"warmup-{d}-{uuid.uuid4().hex}", input_ids=prompt, sampling=sampling,
                                    warmup=True))
            for d in range(self._plan.scheduler.num_dp)
        ]
        try:
            outs = await asyncio.wait_for(asyncio.gather(*(_last(w) for w in warmups)), WARMUP_TIMEOUT_S)
        except TimeoutError:
            raise EngineDead(f"the warm-up generation did not finish within {WARMUP_TIMEOUT_S:.0f} s") from None
        for out in outs:
            if out.finish_reason == "error" or not out.finished:
                raise EngineDead(f"the warm-up generation failed: {out.error or out.finish_reason}")
        log.info("warm-up generation done in %.2f s", time.perf_counter() - started)

    async def _supervise(self) -> None:
        try:
            await supervise(*self._actors)
        except (asyncio.CancelledError, ChannelClosed):
            pass
        except Exception as e:
            if self.error is None:  # else a rank died first, and this is how its channel's end showed up
                log.exception("an engine actor failed; the engine cannot serve any more")
                self._fail_all(f"the engine failed: {type(e).__name__}: {e}")

    def _on_child_exit(self, exit: ChildExit) -> None:
        if self._closing or self.error is not None:
            return
        message = f"the worker process {exit.name} (pid {exit.pid}) died: {_exit_cause(exit)}"
        # Before the actors run, start() raises with the whole traceback; after, this log is where it shows.
        running = self._supervisor is not None and exit.error is not None
        log.error("%s%s", message, f"\n{exit.error}".rstrip() if running else "")
        self._fail_all(message)
        for child in self._children:
            child.kill()  # the others would wait in a collective for the dead rank until --dist-timeout

    def _fail_all(self, message: str) -> None:
        self.error = self.error or message
        self._dead.set()
        if self._detokenizer is not None:
            self._detokenizer.end_all("error", message, "internal")

    async def close(self) -> None:
        """Stop every actor and worker process; pending requests end with finish_reason "abort"."""
        if self._closing:
            return
        self._closing = True
        if self._detokenizer is not None:
            self._detokenizer.end_all("abort")
        if self._to_scheduler is not None and self.error is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._to_scheduler.send(Shutdown("engine closing")), 1.0)
            # The ranks finish the plans they hold (the same ones everywhere) and exit on their own.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(c.wait() for c in self._children)), 5.0)
        for child in self._children:
            await child.stop(timeout=5.0)
        for actor in self._actors:
            actor.stop()
        if self._supervisor is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._supervisor), 5.0)
            self._supervisor.cancel()
        channels = (self._to_scheduler, self._from_scheduler, *self._rings)
        for channel in {id(c): c for c in channels if c is not None}.values():
            channel.close()
        # In-process, the worker's model, KV cache and CUDA graphs live in this process: drop them now, so an
        # embedding program (or the next Engine) gets the GPU memory back without waiting for the collector.
        self._actors = []
        self._supervisor = None
        if not self._children:
            import gc

            gc.collect()
            if self._plan.worker.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- requests ----------------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.error is None and not self._closing

    async def wait_dead(self) -> str:
        """Wait until the engine can no longer serve (a rank process died, an actor failed); return why.

        Requests in flight have their error outputs by then. Never returns for an engine that is closed
        without having died.
        """
        await self._dead.wait()
        assert self.error is not None
        return self.error

    async def generate(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingParams | None = None,
        *,
        rid: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a prompt (text, or token ids) and yield its incremental outputs until it finishes.

        Text is encoded as it is (no BOS added: a chat template writes its own). A request that can never be
        served as asked (ids outside the vocabulary, an empty prompt, sampling parameters out of range, no room
        in the context) raises ValueError (`admission.AdmissionError`) before anything is submitted, and so does
        a request id in use.
        Each output holds the new text and token ids since the previous one; the last has
        `finish_reason` set ("stop", "length", "abort" or "error", with `error` saying why).
        Leaving the loop early (or the task being cancelled) aborts the request and frees its pages.
        """
        sampling = sampling or SamplingParams()
        prompt_ids: Sequence[int] = tokenize(self.tokenizer, prompt)
        with contextlib.suppress(OverflowError):  # ids past int32 stay a list: the check names them
            prompt_ids = array("i", prompt_ids)  # once: the check reads it in C, the message takes its bytes
        check_request(prompt_ids, sampling, self.limits)
        ids = prompt_ids if isinstance(prompt_ids, array) else array("i", prompt_ids)
        msg = NewRequest(rid=rid or uuid.uuid4().hex, input_ids=ids.tobytes(), sampling=sampling)
        async for out in self._stream(msg):
            yield out

    async def _stream(self, msg: NewRequest) -> AsyncIterator[RequestOutput]:
        """Submit `msg` and yield its outputs until it finishes; abort it if the caller leaves early."""
        if not self.healthy or self._detokenizer is None or self._to_scheduler is None:
            raise EngineDead(self.error or "the engine is closed")
        outputs = self._detokenizer.register(msg.rid, msg.sampling)
        try:
            await self._to_scheduler.send(msg)
            while True:
                out = await outputs.get()
                yield out
                if out.finished:
                    break
        finally:
            if self._detokenizer.close(msg.rid):
                await self._send_abort(msg.rid)

    @property
    def last_output_at(self) -> float:
        """`time.monotonic()` when the scheduler last sent requests' outputs (0.0 before any)."""
        return self._detokenizer.last_output_at if self._detokenizer is not None else 0.0

    @property
    def num_requests(self) -> int:
        """Requests whose `generate` stream is open."""
        return len(self._detokenizer) if self._detokenizer is not None else 0

    async def abort(self, rid: str) -> None:
        """Stop a request; its generate() ends with finish_reason "abort"."""
        if self._detokenizer is not None and rid in self._detokenizer:
            await self._send_abort(rid)

    async def abort_all(self) -> None:
        """Stop every request in flight; each generate() ends with finish_reason "abort"."""
        for rid in self._detokenizer.rids if self._detokenizer is not None else []:
            await self._send_abort(rid)

    async def _send_abort(self, rid: str) -> None:
        if self.healthy and self._to_scheduler is not None:
            with contextlib.suppress(ChannelClosed):
                await self._to_scheduler.send(AbortRequest(rid))

    def _on_metrics(self, values: dict[str, float]) -> None:
        self.metrics = values

    async def flush_cache(self, timeout: float = 30.0) -> CacheFlushed:
        """Evict every cached prefix no request holds (SGLang's /flush_cache); the scheduler's answer: the pages it
        gave back and the cached pages requests in flight still hold. EngineDead when the engine cannot serve,
        TimeoutError when no answer came within `timeout` seconds."""
        if not self.healthy or self._to_scheduler is None:
            raise EngineDead(self.error or "the engine is closed")
        answer: asyncio.Future[CacheFlushed] = asyncio.get_running_loop().create_future()
        self._flushes.append(answer)
        dead: asyncio.Future[Any] = asyncio.ensure_future(self._dead.wait())
        try:
            await self._to_scheduler.send(FlushCache())
            waiters: list[asyncio.Future[Any]] = [answer, dead]
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            dead.cancel()
            if not answer.done():
                answer.cancel()
                self._flushes.remove(answer)
        if answer.cancelled():
            if self.error is not None:
                raise EngineDead(self.error)
            raise TimeoutError(f"the scheduler did not answer a cache flush within {timeout:.0f} s")
        return answer.result()

    def _on_flushed(self, msg: CacheFlushed) -> None:
        # The scheduler answers FlushCache messages in the order they came.
        while self._flushes:
            waiter = self._flushes.popleft()
            if not waiter.done():
                waiter.set_result(msg)
                return

    def info(self) -> dict[str, Any]:
        """Configuration and state, for /server_info."""
        return {
            "model_path": self.model_path,
            "engine_config": dataclasses.asdict(self.config),
            "worker_config": dataclasses.asdict(self._plan.worker),
            "max_context_len": self.max_context_len,
            "metrics": self.metrics,
            "healthy": self.healthy,
        }


def _exit_cause(exit: ChildExit) -> str:
    """How a rank process ended, in a few words: its exception's last line, the signal, or the exit code."""
    if exit.error:
        return exit.error.strip().splitlines()[-1]
    if exit.exitcode is not None and exit.exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exit.exitcode).name}"
    return f"exit code {exit.exitcode}"


async def _last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    """The last output of a stream."""
    last = RequestOutput(rid="", finish_reason="error", error="no output")
    async for last in outputs:  # noqa: B007
        pass
    return last
