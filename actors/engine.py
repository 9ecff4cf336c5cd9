"""The Engine: wires scheduler -> worker(s) -> detokenizer, in-process or across processes.

    engine = await Engine.start(EngineConfig(model_path=...))
    async for out in engine.generate("Hello", SamplingParams(max_new_tokens=16)):
        print(out.text, end="")
    await engine.close()

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
import contextlib
import dataclasses
import logging
import signal
import time
import uuid
from array import array
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from baleen.actors.actor import Actor, supervise
from baleen.actors.admission import EngineDead, Limits, check_request, tokenize
from baleen.actors.channel import Channel, ChannelClosed, LocalChannel, ShmChannel
from baleen.actors.detokenizer import DetokenizerActor
from baleen.actors.process import ChildExit, ChildProcess
from baleen.actors.scheduler import SchedulerActor, SchedulerSettings
from baleen.actors.worker import (
    DTYPES,
    RankSpec,
    WorkerActor,
    WorkerConfig,
    build_runner,
    cpu_thread,
    in_thread,
    rank_channels,
    rank_main,
    ready_message,
)
from baleen.messages import (
    AbortRequest,
    NewRequest,
    RequestOutput,
    SamplingParams,
    Shutdown,
    WorkerReady,
)
from baleen.model.config import ModelConfig
from baleen.model.kernel_choice import triton_decode_unsupported
from baleen.model.parallel import dist_init, rank_layout

log = logging.getLogger("baleen.engine")
# The first request on CUDA JIT-compiles the kernels it uses; at V3 sizes, on a cold Triton cache, that can
# take minutes, so the warm-up's limit is generous: it catches a hang, not a slow compile.
WARMUP_TIMEOUT_S = 600.0


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Everything the engine is started with; `None` means "choose for this machine"."""

    model_path: str | None = None  # None: the embedded default model (created on first use)
    tokenizer_path: str | None = None
    device: str | None = None  # "cpu" | "cuda"
    dtype: str = "auto"  # "auto" | "bfloat16" | "float16" | "float32"
    load_format: str = "auto"
    attention_backend: str | None = None
    context_length: int | None = None
    page_size: int | None = None
    max_running_requests: int | None = None
    max_total_tokens: int | None = None
    chunked_prefill_size: int | None = None  # -1 disables chunking
    # --enable-mixed-chunk (SGLang's, off by default): running decodes ride along with a prefill chunk instead of
    # waiting for a step without one; needs chunked prefill.
    enable_mixed_chunk: bool = False
    max_queued_requests: int = 4096
    mem_fraction_static: float = 0.85
    kv_cache_dtype: str = "auto"
    disable_overlap_schedule: bool = False
    disable_radix_cache: bool = False
    enable_custom_logit_processor: bool = False
    custom_logit_processors: tuple[str, ...] = ()
    random_seed: int = 0
    multiprocess: bool = False  # True: workers in child processes over shared-memory rings (implied by tp > 1)
    # Parallelism (--tp, --dp, --enable-dp-attention, --ep-size, --nnodes, --node-rank, --dist-init-addr,
    # --dist-timeout): tp_size ranks over all nodes; DP attention in dp_size groups; experts over ep_size.
    tp_size: int = 1
    dp_size: int = 1
    enable_dp_attention: bool = False
    ep_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # "host:port" of node 0; None: a free loopback port (one node only)
    dist_timeout: float | None = None  # seconds for rendezvous and every collective; None: 1800
    check_rank_sampling: bool = False  # debug: ranks sharing a batch compare their sampled ids each step
    cuda_graph_bs: tuple[int, ...] | None = None
    cuda_graph_max_bs: int | None = None
    disable_cuda_graph: bool = False
    # --fp8-tiled-weights: tiled copies of the FP8 weights decode reads, for faster GEMMs at 2-64 tokens, at the
    # cost of those weights' memory again. "auto": on, except under DP attention (every rank holds all of the
    # attention weights there, so the copies would cost tp_size times as much).
    fp8_tiled_weights: str = "auto"
    # Speculative decoding (SGLang's --speculative-* flags): EAGLE (NEXTN is an alias) drafts with the model's MTP
    # layer, or a NextN checkpoint's. With an algorithm set, None means DeepSeek's defaults: 3 steps, topk 1, 4 draft
    # tokens (num_steps + 1, the only value topk 1 allows); the worker verifies num_steps drafts a decode row.
    speculative_algorithm: str | None = None
    speculative_num_steps: int | None = None
    speculative_eagle_topk: int | None = None
    speculative_num_draft_tokens: int | None = None
    speculative_draft_model_path: str | None = None
    decode_log_interval: int = 40  # the scheduler logs a line every this many decode steps (SGLang's flag)
    show_progress: bool = False

    def resolved_device(self) -> str:
        if self.device is not None:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class _Plan:
    """Derived start-up settings, computed once per node and handed to its rank processes."""

    worker: WorkerConfig  # rank 0's; other ranks differ in parallel.tp_rank and device
    scheduler: SchedulerSettings
    nnodes: int = 1

    def rank_spec(self, rank: int) -> RankSpec:
        """What rank process `rank` is started with."""
        w = self.worker
        worker = dataclasses.replace(w, parallel=dataclasses.replace(w.parallel, tp_rank=rank))
        if w.device.startswith("cuda"):
            worker = dataclasses.replace(worker, device=f"cuda:{rank % (w.parallel.tp_size // self.nnodes)}")
        return RankSpec(worker, self.nnodes, self.scheduler if rank == 0 else None)


def default_attention_backend(cuda: bool) -> str:
    """torch on CPU, our Triton kernels on CUDA.

    FlashInfer's MLA kernel is faster at 128 heads, but its per-step host planning made whole decode steps
    slower end to end (docs/PERF.md, bench_one_batch): it stays opt-in with --attention-backend flashinfer.
    """
    return "triton" if cuda else "torch"


def _tiled_weights(setting: str, dp_attention: bool) -> bool:
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"fp8_tiled_weights must be 'auto', 'on' or 'off', got {setting!r}")
    return setting == "on" or (setting == "auto" and not dp_attention)


KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "fp8", *DTYPES)


def _check_config(config: EngineConfig, device: str) -> None:
    """ValueError naming the flag for EngineConfig values no start-up could serve with (the model's fields are
    checked by ModelConfig, the rank layout by rank_layout): before any rank loads anything."""
    for name in ("context_length", "page_size", "max_running_requests", "max_total_tokens", "cuda_graph_max_bs"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    chunk = config.chunked_prefill_size
    if chunk is not None and chunk != -1 and chunk < 1:
        raise ValueError(f"--chunked-prefill-size must be >= 1, or -1 to disable chunking, got {chunk}")
    if config.max_queued_requests < 1:
        raise ValueError(f"--max-queued-requests must be >= 1, got {config.max_queued_requests}")
    if not 0 < config.mem_fraction_static <= 1:
        raise ValueError(f"--mem-fraction-static must be in (0, 1], got {config.mem_fraction_static}")
    if config.dtype != "auto" and config.dtype not in DTYPES:
        raise ValueError(f"--dtype {config.dtype!r} is not one of {('auto', *DTYPES)}")
    if config.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype {config.kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}")
    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"--device {device!r} is not 'cpu', 'cuda' or 'cuda:N'")
    if config.dist_timeout is not None and config.dist_timeout <= 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {config.dist_timeout}")
    if config.decode_log_interval < 1:
        raise ValueError(f"--decode-log-interval must be >= 1, got {config.decode_log_interval}")


SPECULATIVE_ALGORITHMS = ("EAGLE", "NEXTN")  # NEXTN: SGLang's alias of EAGLE for DeepSeek's MTP layer
SPECULATIVE_MAX_RUNNING_REQUESTS = 48  # the seeds' defaults under MTP: --max-running-requests, CUDA graph sizes


def speculative_num_steps(config: EngineConfig, model_config: ModelConfig) -> int:
    """The drafts a verify row checks (--speculative-num-steps), 0 without --speculative-algorithm; ValueError
    naming the flag for settings no start-up could serve."""
    flags = ("speculative_num_steps", "speculative_eagle_topk", "speculative_num_draft_tokens",
             "speculative_draft_model_path")
    if config.speculative_algorithm is None:
        given = [f"--{name.replace('_', '-')}" for name in flags if getattr(config, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} needs --speculative-algorithm EAGLE (or NEXTN)")
        return 0
    if config.speculative_algorithm.upper() not in SPECULATIVE_ALGORITHMS:
        raise ValueError(f"--speculative-algorithm {config.speculative_algorithm} is not one of "
                         f"{', '.join(SPECULATIVE_ALGORITHMS)}")
    topk = 1 if config.speculative_eagle_topk is None else config.speculative_eagle_topk
    if topk < 1:
        raise ValueError(f"--speculative-eagle-topk must be >= 1, got {topk}")
    if topk > 1:
        raise ValueError(f"--speculative-eagle-topk {topk}: topk > 1 (tree drafts) is not supported yet; use "
                         "--speculative-eagle-topk 1 (a chain of drafts)")
    draft_tokens = config.speculative_num_draft_tokens
    steps = config.speculative_num_steps
    if steps is None:  # derived from --speculative-num-draft-tokens when only that was given, else DeepSeek's 3
        steps = draft_tokens - 1 if draft_tokens is not None and draft_tokens >= 2 else 3
    if steps < 1:
        raise ValueError(f"--speculative-num-steps must be >= 1, got {steps}")
    if draft_tokens is not None and draft_tokens != steps + 1:
        log.warning("--speculative-num-draft-tokens %d is adjusted to %d: with --speculative-eagle-topk 1 a verify "
                    "step checks the last token and --speculative-num-steps (%d) drafts", draft_tokens, steps + 1, steps)
    path = config.speculative_draft_model_path
    if path is not None and not Path(path).is_dir():
        raise ValueError(f"--speculative-draft-model-path {path}: no such directory")
    if path is None and not model_config.has_mtp:
        raise ValueError(f"--speculative-algorithm {config.speculative_algorithm} drafts with the model's MTP (NextN) "
                         "layer, and this model has none (num_nextn_predict_layers is 0): give a NextN checkpoint "
                         "with --speculative-draft-model-path")
    if config.enable_dp_attention:
        raise ValueError("--speculative-algorithm does not run with --enable-dp-attention yet")
    return steps


def _attention_backend(config: EngineConfig, model_config: ModelConfig, cuda: bool) -> tuple[str, bool]:
    """(--attention-backend, --disable-cuda-graph) for the model's shapes: where the Triton decode kernel cannot
    take them, the torch backend (no CUDA graphs) when no backend was named, else a ValueError naming the fields."""
    backend = config.attention_backend or default_attention_backend(cuda)
    why = triton_decode_unsupported(model_config) if cuda and backend == "triton" else None
    if why is None:
        return backend, config.disable_cuda_graph
    if config.attention_backend is not None:
        raise ValueError(f"--attention-backend triton cannot serve this model ({why}): use --attention-backend torch "
                         "--disable-cuda-graph")  # fmt: skip
    log.warning("attention: %s; serving on the torch attention backend, without CUDA graphs", why)
    return "torch", True


def _plan(config: EngineConfig, model_path: str, model_config: ModelConfig) -> _Plan:
    device = config.resolved_device()
    _check_config(config, device)
    cuda = device.startswith("cuda")
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if cuda else "float32")
    context = config.context_length or model_config.max_position_embeddings
    chunk = config.chunked_prefill_size if config.chunked_prefill_size is not None else (8192 if cuda else 1024)
    page_size = config.page_size or (64 if cuda else 16)
    if config.enable_mixed_chunk and chunk == -1:
        log.warning("--enable-mixed-chunk has no effect without chunked prefill (--chunked-prefill-size -1)")
    if config.max_total_tokens is not None and config.max_total_tokens < page_size:
        raise ValueError(f"--max-total-tokens {config.max_total_tokens} must hold one page (--page-size {page_size})")
    attention_backend, disable_cuda_graph = _attention_backend(config, model_config, cuda)
    spec_steps = speculative_num_steps(config, model_config)
    max_running = config.max_running_requests or (
        SPECULATIVE_MAX_RUNNING_REQUESTS if spec_steps else (256 if cuda else 64))
    graph_max_bs = config.cuda_graph_max_bs
    if spec_steps and config.cuda_graph_bs is None and graph_max_bs is None:
        graph_max_bs = SPECULATIVE_MAX_RUNNING_REQUESTS  # as SGLang: more with --cuda-graph-bs / --cuda-graph-max-bs
    parallel = rank_layout(
        model_config, tp_size=config.tp_size, dp_size=config.dp_size, ep_size=config.ep_size, nnodes=config.nnodes,
        node_rank=config.node_rank, enable_dp_attention=config.enable_dp_attention,
    )  # fmt: skip
    if cuda and parallel.tp_size // config.nnodes > 1:
        import torch

        if torch.cuda.device_count() < parallel.tp_size // config.nnodes:
            raise ValueError(
                f"--tp {parallel.tp_size} over {config.nnodes} node(s) needs {parallel.tp_size // config.nnodes} GPUs "
                f"per node; this one has {torch.cuda.device_count()}"
            )
    worker = WorkerConfig(
        model_path=model_path,
        device=device,
        dtype=dtype,
        load_format=config.load_format,
        attention_backend=attention_backend,
        page_size=page_size,
        max_running_requests=max_running,
        max_context_len=context,
        max_total_tokens=config.max_total_tokens,
        chunked_prefill_size=None if chunk == -1 else chunk,
        mem_fraction_static=config.mem_fraction_static,
        kv_cache_dtype=config.kv_cache_dtype,
        random_seed=config.random_seed,
        custom_logit_processors=config.custom_logit_processors if config.enable_custom_logit_processor else None,
        progress=config.show_progress,
        cuda_graph_bs=config.cuda_graph_bs,
        cuda_graph_max_bs=graph_max_bs,
        disable_cuda_graph=disable_cuda_graph,
        fp8_tiled_weights=_tiled_weights(config.fp8_tiled_weights, parallel.dp_size > 1),
        parallel=parallel,
        dist=None if parallel.tp_size == 1 else dist_init(config.dist_init_addr, config.dist_timeout, config.nnodes),
        check_sampling=config.check_rank_sampling,
        speculative_num_steps=spec_steps,
        speculative_draft_model_path=config.speculative_draft_model_path,
    )
    scheduler = SchedulerSettings(
        chunked_prefill_size=None if chunk == -1 else chunk,
        max_queued_requests=config.max_queued_requests,
        enable_radix_cache=not config.disable_radix_cache,
        overlap=not config.disable_overlap_schedule,
        eos_token_ids=model_config.eos_token_ids,
        max_total_tokens=config.max_total_tokens,
        num_dp=parallel.dp_size,
        enable_mixed_chunk=config.enable_mixed_chunk,
        speculative_num_steps=spec_steps,
        decode_log_interval=config.decode_log_interval,
    )
    return _Plan(worker, scheduler, config.nnodes)


def _rank0_actors(plan: _Plan, runner: Any, requests: Channel, deltas: Channel,
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
    plan = _plan(config, path, model_config)
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
        self._plan = _plan(config, model_path, model_config)
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
                runner = await in_thread(thread, build_runner, self._plan.worker)
            except BaseException:
                if thread is not None:
                    thread.shutdown(wait=False)
                raise
            to_scheduler, from_scheduler = LocalChannel(), LocalChannel()
            rank0 = _rank0_actors(self._plan, runner, to_scheduler, from_scheduler, thread)
        self._to_scheduler = to_scheduler
        self._detokenizer = DetokenizerActor(self.tokenizer, from_scheduler, to_scheduler, self._on_metrics)
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
        prompt_ids = tokenize(self.tokenizer, prompt)
        check_request(prompt_ids, sampling, self.limits)
        msg = NewRequest(rid=rid or uuid.uuid4().hex, input_ids=array("i", prompt_ids).tobytes(), sampling=sampling)
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
