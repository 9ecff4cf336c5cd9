"""The worker: one rank's model runner built in start-up order, and the actor that feeds it StepPlans.

With several ranks (TP / EP / DP attention, model/parallel.py) each rank is one process running
`rank_main`: rank 0 also runs the scheduler; the other ranks of its node get plans through rings, ranks on
other nodes through one TCP connection to rank 0 each (actors/dp.py). Every rank runs every plan of its DP
group in the same order, so their collectives line up; only DP group leaders report StepResults.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
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
    StepResult,
    WorkerError,
    WorkerReady,
)
from baleen.model.batch import ForwardBatch
from baleen.model.config import ModelConfig, ParallelConfig
from baleen.model.memory_plan import MemoryPlan
from baleen.model.parallel import DistInit, ParallelGroups, destroy_distributed, init_distributed
from baleen.model.runner import ModelRunner, PendingStep, RunnerConfig

log = logging.getLogger("baleen.worker")
T = TypeVar("T")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ATTENTION_BACKENDS = ("torch", "triton", "flashinfer")


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """What a rank needs to build its runner."""

    model_path: str | None
    device: str = "cpu"
    dtype: str = "float32"
    load_format: str = "auto"
    attention_backend: str = "torch"
    page_size: int = 16
    max_running_requests: int = 64
    max_context_len: int = 4096
    max_total_tokens: int | None = None
    chunked_prefill_size: int | None = None  # the scheduler's prefill tokens a step (None: whole prompts)
    mem_fraction_static: float = 0.85
    kv_cache_dtype: str = "auto"
    random_seed: int = 0
    custom_logit_processors: tuple[str, ...] | None = None  # None: custom processors disabled
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    dist: DistInit | None = None  # how the ranks meet when tp_size > 1
    check_sampling: bool = False  # ranks sharing a batch compare their sampled ids every step (tests, debug)
    progress: bool = False
    cuda_graph_bs: tuple[int, ...] | None = None  # None: the default sizes up to cuda_graph_max_bs
    cuda_graph_max_bs: int | None = None
    disable_cuda_graph: bool = False
    fp8_tiled_weights: bool = False  # load_model(tile_fp8=...): tiled weight copies for few-token FP8 GEMMs

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def cache_dtype(self) -> torch.dtype:
        if self.kv_cache_dtype == "auto":
            return self.torch_dtype
        if self.kv_cache_dtype in ("fp8_e4m3", "fp8"):
            return torch.float8_e4m3fn
        return DTYPES[self.kv_cache_dtype]


def make_attention_backend(name: str, device: torch.device) -> object:
    """The attention backend named by --attention-backend."""
    if name == "torch":
        from baleen.model.attention import TorchAttentionBackend

        return TorchAttentionBackend()
    if device.type != "cuda":
        raise ValueError(f"--attention-backend {name} needs a CUDA device; use 'torch' on {device.type}")
    if name == "triton":
        from baleen.model.attention_triton import TritonAttentionBackend

        return TritonAttentionBackend()
    if name == "flashinfer":
        from baleen.model.attention_flashinfer import FlashInferAttentionBackend

        return FlashInferAttentionBackend(device)
    raise ValueError(f"--attention-backend {name!r} is not one of {ATTENTION_BACKENDS}")


def _kv_budget_pages(cfg: WorkerConfig, model_config: ModelConfig, device: torch.device, model: Any, attn: Any,
                     graph_max_bs: int | None, groups: ParallelGroups | None) -> int:
    from baleen.model.kv_cache import KVCache

    layers, dim, ps = model_config.num_hidden_layers, model_config.kv_cache_dim, cfg.page_size
    if device.type == "cuda":
        pages = KVCache.num_pages_for_budget(_gpu_memory_plan(cfg, model_config, device, model, attn, graph_max_bs,
                                                              groups).kv_pool, layers, ps, dim, cfg.cache_dtype)
    else:
        # CPU: enough for every slot at a few thousand tokens unless --max-total-tokens says otherwise.
        pages = 1 + -(-max(cfg.max_running_requests * 1024, 2 * cfg.max_context_len) // ps)
    if cfg.max_total_tokens is not None:
        pages = min(pages, 1 + -(-cfg.max_total_tokens // ps))
    return pages


def _gpu_memory_plan(cfg: WorkerConfig, model_config: ModelConfig, device: torch.device, model: Any, attn: Any,
                     graph_max_bs: int | None, groups: ParallelGroups | None) -> MemoryPlan:
    """Measure the largest steps (absorbed chunk over a prefix beside every decode row; a fresh expanded chunk;
    the largest captured decode batch), then size the pool; --mem-fraction-static as SGLang means it."""
    from baleen.model.memory_plan import StepShape, dummy_batch, measure_step_peak, plan_memory

    dp = groups.parallel.dp_size if groups is not None and groups.dp_attention else 1
    shape = StepShape.largest(cfg.chunked_prefill_size, cfg.max_context_len, cfg.max_running_requests)
    shapes = [shape, StepShape(shape.chunk, 0, 0)]
    peaks = [measure_step_peak(model, attn, model_config, dummy_batch(s, cfg.page_size, device, dp), cfg.cache_dtype,
                               device) for s in shapes]  # fmt: skip
    graphs = 0
    if graph_max_bs:
        # The graphs' pool holds every captured size's intermediates (largest first, the rest reuse it): 1.5x the
        # largest eager decode step (H100, v3-shape, 64 rows: 0.40 GiB eager, 0.59 GiB captured).
        decode = StepShape(1, shape.prefix + shape.chunk - 1, graph_max_bs - 1)
        graphs = 3 * measure_step_peak(model, attn, model_config, dummy_batch(decode, cfg.page_size, device, dp),
                                       cfg.cache_dtype, device) // 2  # fmt: skip
    free, total = torch.cuda.mem_get_info(device)
    plan = plan_memory(total, free, cfg.mem_fraction_static, max(peaks), graphs)
    log.info("%s (largest step: a %d-token chunk over %d cached tokens beside %d decode rows)", plan.describe(),
             shape.chunk, shape.prefix, shape.decode_rows)
    return plan


def build_runner(cfg: WorkerConfig, groups: ParallelGroups | None = None) -> ModelRunner:
    """Start-up in the fixed order: build on meta + load weights, size the KV cache from memory, runner.

    A rank of a multi-rank model passes its process groups (after `init_distributed`).
    """
    from tokenizers import Tokenizer

    from baleen.model.grammar import GrammarCache, GrammarSlots
    from baleen.model.kv_cache import KVCache
    from baleen.model.loader import load_model
    from baleen.model.logit_processors import LogitProcessorRegistry
    from baleen.model.sampler import Sampler, SamplingState

    device = torch.device(cfg.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.random_seed)
    if cfg.model_path is None:
        raise ValueError("the worker needs a model path with a config.json")
    if cfg.parallel.tp_size > 1 and groups is None:
        raise ValueError("a rank of a multi-rank model needs its process groups: call init_distributed first")
    model_config = ModelConfig.from_hf(cfg.model_path)
    started = time.perf_counter()
    experts_method = None
    if device.type == "cuda":
        from baleen.model.fused_experts import FusedExperts

        experts_method = FusedExperts  # the reference TorchExperts syncs the host: no CUDA graphs with it
    model = load_model(
        cfg.model_path if cfg.load_format != "dummy" else None,
        model_config,
        parallel=cfg.parallel,
        device=device,
        dtype=cfg.torch_dtype,
        load_format=cfg.load_format,
        seed=cfg.random_seed,
        progress=cfg.progress,
        experts_method=experts_method,
        groups=groups,
        tile_fp8=cfg.fp8_tiled_weights,
    )
    log.info("weights loaded in %.1f s", time.perf_counter() - started)
    if cfg.attention_backend == "flashinfer" and (model_config.kv_lora_rank, model_config.qk_rope_head_dim) != (512, 64):
        raise ValueError(
            f"--attention-backend flashinfer needs DeepSeek's MLA shape (kv_lora_rank 512, rope 64); this model has "
            f"{model_config.kv_lora_rank} + {model_config.qk_rope_head_dim}: use --attention-backend triton"
        )
    attn = make_attention_backend(cfg.attention_backend, device)
    dp_attention = groups is not None and groups.dp_attention
    use_graphs = device.type == "cuda" and not cfg.disable_cuda_graph and not dp_attention
    graph_sizes: list[int] = []
    if use_graphs:
        from baleen.model.cuda_graph import graph_batch_sizes

        graph_sizes = graph_batch_sizes(
            list(cfg.cuda_graph_bs) if cfg.cuda_graph_bs else None, cfg.cuda_graph_max_bs, cfg.max_running_requests
        )
    num_pages = _kv_budget_pages(cfg, model_config, device, model, attn, max(graph_sizes, default=None), groups)
    if groups is not None:
        # NOTE: the scheduler hands out page ids that are valid on every rank: all use the smallest pool.
        num_pages = groups.tp.min_int(num_pages, device)
    kv_cache = KVCache.for_model(model_config, num_pages, cfg.page_size, cfg.cache_dtype, device)
    log.info("KV cache: %d pages x %d tokens (%.2f GiB)", num_pages, cfg.page_size, kv_cache.num_bytes / 2**30)
    state = SamplingState(
        cfg.max_running_requests, model_config.vocab_size, device, random_seed=cfg.random_seed,
        eos_token_ids=model_config.eos_token_ids,
    )
    tokenizer_file = Path(cfg.model_path) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tokenizer_file)) if tokenizer_file.exists() else None
    processors = (
        LogitProcessorRegistry(cfg.custom_logit_processors) if cfg.custom_logit_processors is not None else None
    )
    runner_cfg = RunnerConfig(cfg.max_running_requests, cfg.page_size, cfg.max_context_len)
    # Structured output: xgrammar is imported and the grammar vocabulary built on the first grammar only.
    grammar_cache = GrammarCache(tokenizer, model_config.vocab_size, model_config.eos_token_ids,
                                 max_threads=max(1, min(8, (os.cpu_count() or 2) // 2)))  # fmt: skip
    graphs = None
    if dp_attention and device.type == "cuda" and not cfg.disable_cuda_graph:
        # TODO(graphs): DP attention needs every rank (idle ones too) to replay the graph of the padded size
        # max(plan.dp_num_tokens) when plan.dp_all_decode; DecodeGraphs cannot do that yet.
        log.info("DP attention: decode CUDA graphs are not used yet")
    elif use_graphs:
        from baleen.model.cuda_graph import DecodeGraphs

        if not hasattr(attn, "init_graph_state"):
            raise ValueError(f"--attention-backend {cfg.attention_backend} has no CUDA-graph support; add --disable-cuda-graph")
        sizes = graph_sizes
        heads = model_config.num_attention_heads // (groups.attn.size if groups is not None else 1)
        if hasattr(attn, "set_graph_shape"):
            attn.set_graph_shape(heads, model_config.softmax_scale, cfg.torch_dtype)
        graphs = DecodeGraphs(model, kv_cache, attn, sizes, runner_cfg.max_pages_per_seq, heads, device)
    runner_cls = ModelRunner if groups is None else ParallelRunner
    extra: dict[str, Any] = {} if groups is None else {"groups": groups, "check_sampling": cfg.check_sampling}
    runner = runner_cls(
        model,
        kv_cache,
        attn,
        Sampler(state),
        state,
        runner_cfg,
        device,
        processors=processors,
        tokenizer=tokenizer,
        random_seed=cfg.random_seed,
        graphs=graphs,
        grammars=GrammarSlots(grammar_cache, pinned=device.type == "cuda"),
        **extra,
    )
    if graphs is not None:
        started, reserved = time.perf_counter(), torch.cuda.memory_reserved(device)
        runner.capture_graphs()
        log.info("captured %d decode CUDA graphs in %.1f s (%.2f GiB)", len(graphs.batch_sizes),
                 time.perf_counter() - started, (torch.cuda.memory_reserved(device) - reserved) / 2**30)
    if device.type == "cuda":
        grammar_cache.prepare()  # after the capture: nothing else may touch the device while a graph records
    return runner


class ParallelRunner(ModelRunner):
    """A rank of a multi-rank model: DP-attention step shapes and idle steps, and an optional sampling check.

    NOTE: sampling needs no broadcast. Ranks that share a batch hold bit-identical logits (the vocab slices
    are all-gathered, the hidden states before them come out of the same all-reduces) and the sampler is
    deterministic given its per-request seed, so they pick the same tokens; `check_sampling` verifies it.
    """

    recovers_from_oom = False  # see ModelRunner.recovers_from_oom

    def __init__(self, *args: Any, groups: ParallelGroups, check_sampling: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.groups = groups
        self.check_sampling = check_sampling and groups.attn.size > 1
        self._mismatch: dict[int, torch.Tensor] = {}  # step_id -> device bool: the ranks disagreed

    def build_batch(self, plan: StepPlan) -> tuple[ForwardBatch, torch.Tensor, list[int]]:
        batch, sample_slots, sampled_slots = super().build_batch(plan)
        if plan.dp_num_tokens:
            batch.dp_num_tokens = list(plan.dp_num_tokens)
        return batch, sample_slots, sampled_slots

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> PendingStep:
        step = super().launch(plan)
        if plan.dp_num_tokens and not plan.rows:
            # An idle DP rank still joins every layer's MLP gather / reduce-scatter (and computes its share).
            idle = ForwardBatch.build([], [], [], [], self.config.page_size, device=self.device)
            idle.dp_num_tokens = list(plan.dp_num_tokens)
            self.model(idle, self.kv_cache, self.attn)
        if step.deferred is None:
            self._check(step)
        return step

    @torch.inference_mode()
    def complete(self, step: PendingStep) -> None:
        deferred = step.deferred is not None
        super().complete(step)
        if deferred:
            self._check(step)

    def _check(self, step: PendingStep) -> None:
        if self.check_sampling and step.sampled_slots:
            ids = self.slot_tokens[torch.tensor(step.sampled_slots, device=self.device)]
            hi = self.groups.attn.all_reduce(ids.clone(), "max")
            lo = self.groups.attn.all_reduce(ids.clone(), "min")
            self._mismatch[step.step_id] = (hi != lo).any()

    def finish(self, pending: PendingStep) -> StepResult:
        result = super().finish(pending)
        bad = self._mismatch.pop(pending.step_id, None)
        if bad is not None and bool(bad):
            raise RuntimeError(
                f"rank {self.groups.parallel.tp_rank} sampled other tokens than the ranks it shares step "
                f"{pending.step_id} with: their logits differ"
            )
        return result


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
        runner = await in_thread(thread, build_runner, cfg, groups)
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
    runner = await in_thread(thread, build_runner, cfg, groups)
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
    runner = await in_thread(thread, build_runner, cfg, groups)
    await channel.send(ready_message(runner, rank))
    await supervise(WorkerActor(runner, channel, channel if spec.is_leader(rank) else None, rank=rank, thread=thread))
    if not channel.received_shutdown:
        why = f" ({channel.error})" if channel.error else ""
        raise RuntimeError(f"rank {rank} lost its connection to rank 0{why}: node 0 died or stopped")
