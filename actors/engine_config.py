"""What an engine starts with: EngineConfig, its checks, and the start-up plan derived from it.

`plan_startup` turns an EngineConfig and the model's config into a StartupPlan, once per node: rank 0's
WorkerConfig (every rank's differs only in its rank and device), the scheduler's settings and the node count. The
device defaults (dtype, page size, chunk size, running requests), the attention backend the model's shapes allow,
the --speculative-* defaults and every flag check happen here, so a value no start-up could serve is a ValueError
naming the flag before any rank loads anything.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from baleen.actors.policy_state import DECODE_RESERVE_TOKENS
from baleen.actors.scheduler import SchedulerSettings
from baleen.actors.worker import RankSpec
from baleen.model.build import DEFAULT_KV_CACHE_FP8_MATH, DTYPES, WorkerConfig, check_kv_cache_dtype
from baleen.model.config import ModelConfig
from baleen.model.kernel_choice import triton_decode_unsupported
from baleen.model.parallel import dist_init, rank_layout

log = logging.getLogger("baleen.engine")


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
    mixed_chunk_size: int | None = None  # with enable_mixed_chunk: prompt tokens of a step with decode rows
    max_queued_requests: int = 4096
    # --schedule-conservativeness (SGLang's): scales the decode tokens admission keeps in reserve for each running
    # request (256 at 1.0); lower admits more at once and preempts (recomputes) the newest when the pool runs out.
    schedule_conservativeness: float = 1.0
    mem_fraction_static: float = 0.85
    kv_cache_dtype: str = "auto"
    # --kv-cache-fp8-math (default DEFAULT_KV_CACHE_FP8_MATH): how the Gluon MLA kernel computes over an FP8 cache.
    # "fp8": e4m3 x e4m3 MMAs with q and the softmax probabilities rounded to e4m3 (twice the MMA rate;
    # kernels/mla_decode_gluon_fp8.py); "bf16": the cache converted to bf16 on the way in (exact, the bf16 kernel's
    # math).
    kv_cache_fp8_math: str = DEFAULT_KV_CACHE_FP8_MATH
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
    debug_eager_graphs: bool = False  # --debug-eager-graphs: the graph paths' bodies run eagerly, on any device
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
class StartupPlan:
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


def _check_config(config: EngineConfig, device: str) -> None:
    """ValueError naming the flag for EngineConfig values no start-up could serve with (the model's fields are
    checked by ModelConfig, the rank layout by rank_layout): before any rank loads anything."""
    for name in ("context_length", "page_size", "max_running_requests", "max_total_tokens", "cuda_graph_max_bs",
                 "mixed_chunk_size"):
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
    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"--device {device!r} is not 'cpu', 'cuda' or 'cuda:N'")
    if config.dist_timeout is not None and config.dist_timeout <= 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {config.dist_timeout}")
    if config.decode_log_interval < 1:
        raise ValueError(f"--decode-log-interval must be >= 1, got {config.decode_log_interval}")


# The most prompt tokens one CUDA step takes. Measured on the H100 (2026-12-07, the V3-shape model's memory-plan step,
# a whole-context chunk): 32.8k tokens ran; 49k crashed in moe_sum and 65.6k in the Gluon MLA extend, both int32
# offsets (moe_sum's rows; q's head stride, T * 512 in the einsum's layout), int64 since but not yet rerun on a GPU
# (loadtest/probe_long_context.py). Longer chunks are cut to this: the same outputs, more steps. Read since, and
# int64 too: the Triton FP8 GEMM's output offsets (M x N: T x 36,864 for V3's dense gate/up passes 2^31 at 58k
# tokens) and act_quant's rows (T x 8 x 2,048 in the MoE: at 131k); norm, activation, fused MoE rows already were.
MAX_CUDA_STEP_TOKENS = 32768
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
    if path is not None:
        draft = ModelConfig.from_hf(path)
        if not (draft.is_nextn_export or draft.has_mtp):
            raise ValueError(f"--speculative-draft-model-path {path} has no MTP (NextN) layer "
                             "(num_nextn_predict_layers is 0)")
        misfits = model_config.draft_misfits(draft)
        if misfits:
            raise ValueError(f"--speculative-draft-model-path {path} does not fit the model: {', '.join(misfits)}")
    if path is None and not model_config.has_mtp:
        raise ValueError(f"--speculative-algorithm {config.speculative_algorithm} drafts with the model's MTP (NextN) "
                         "layer, and this model has none (num_nextn_predict_layers is 0): give a NextN checkpoint "
                         "with --speculative-draft-model-path")
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


def available_memory_bytes() -> int | None:
    """This host's MemAvailable (/proc/meminfo), or None where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _host_memory_dtype(model_path: str, dtype: str, nnodes: int, auto: bool) -> str:
    """CPU serving: the dtype the weights are held in. A CPU rank keeps them dense (FP8 checkpoints dequantized:
    DeepSeek-V3 in float32 is ~2.7 TB). Weights this node cannot hold in `dtype` are refused before any rank loads,
    naming --dtype bfloat16 when that fits; with --dtype auto (float32 on CPU) they are held in bfloat16 instead."""
    from baleen.model.loader import CHECKPOINT_FILES, Checkpoint

    available = available_memory_bytes()
    if available is None or not any(Path(model_path, f).exists() for f in CHECKPOINT_FILES):
        return dtype  # no checkpoint files: the rank's loader says so
    ckpt = Checkpoint(model_path)
    try:
        params = ckpt.num_elements()
    finally:
        ckpt.close()
    need = params * DTYPES[dtype].itemsize // nnodes  # this node's ranks hold its share of every weight
    if need <= available:
        return dtype
    half = params * 2 // nnodes
    if auto and half <= available:
        log.warning("--dtype auto: the model's %.1fB weights need ~%.1f GiB of this node's memory in %s, %.1f GiB are "
                    "available: serving in bfloat16 (~%.1f GiB)", params / 1e9, need / 2**30, dtype, available / 2**30,
                    half / 2**30)  # fmt: skip
        return "bfloat16"
    hint = f"; --dtype bfloat16 needs ~{half / 2**30:.1f} GiB" if DTYPES[dtype].itemsize > 2 else ""
    raise ValueError(f"the model's {params / 1e9:.1f}B weights need ~{need / 2**30:.1f} GiB of this node's memory in "
                     f"{dtype} (a CPU rank holds them dense), and {available / 2**30:.1f} GiB are available{hint}")


def plan_startup(config: EngineConfig, model_path: str, model_config: ModelConfig) -> StartupPlan:
    if model_config.is_nextn_export:
        raise ValueError(f"{model_path} holds an MTP (NextN) layer alone, not a model to serve: give it as "
                         "--speculative-draft-model-path beside its target model")
    device = config.resolved_device()
    _check_config(config, device)
    cuda = device.startswith("cuda")
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if cuda else "float32")
    context = config.context_length or model_config.max_position_embeddings
    chunk = config.chunked_prefill_size if config.chunked_prefill_size is not None else (8192 if cuda else 1024)
    if cuda and (chunk if chunk != -1 else context) > MAX_CUDA_STEP_TOKENS:
        log.warning("--chunked-prefill-size %s: prompts are prefilled %d tokens a step at most on CUDA (longer steps "
                    "crash kernels at present); the outputs are the same", chunk, MAX_CUDA_STEP_TOKENS)
        chunk = MAX_CUDA_STEP_TOKENS
    page_size = config.page_size or (64 if cuda else 16)
    if not config.schedule_conservativeness >= 0:
        raise ValueError(f"--schedule-conservativeness must be >= 0, got {config.schedule_conservativeness}")
    if config.enable_mixed_chunk and chunk == -1:
        log.warning("--enable-mixed-chunk has no effect without chunked prefill (--chunked-prefill-size -1)")
    if config.mixed_chunk_size is not None and not config.enable_mixed_chunk:
        log.warning("--mixed-chunk-size has no effect without --enable-mixed-chunk")
    if config.max_total_tokens is not None and config.max_total_tokens < page_size:
        raise ValueError(f"--max-total-tokens {config.max_total_tokens} must hold one page (--page-size {page_size})")
    attention_backend, disable_cuda_graph = _attention_backend(config, model_config, cuda)
    check_kv_cache_dtype(config.kv_cache_dtype, config.kv_cache_fp8_math)
    spec_steps = speculative_num_steps(config, model_config)
    max_running = config.max_running_requests or (
        SPECULATIVE_MAX_RUNNING_REQUESTS if spec_steps else (256 if cuda else 64))
    graph_max_bs = config.cuda_graph_max_bs
    if spec_steps and config.cuda_graph_bs is None and graph_max_bs is None:
        graph_max_bs = SPECULATIVE_MAX_RUNNING_REQUESTS  # as SGLang: more with --cuda-graph-bs / --cuda-graph-max-bs
    parallel = rank_layout(
        model_config, tp_size=config.tp_size, dp_size=config.dp_size, ep_size=config.ep_size, nnodes=config.nnodes,
        node_rank=config.node_rank, enable_dp_attention=config.enable_dp_attention, pad_uneven=not cuda,
    )  # fmt: skip
    if not cuda and config.load_format != "dummy":
        dtype = _host_memory_dtype(model_path, dtype, config.nnodes, auto=config.dtype == "auto")
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
        kv_cache_fp8_math=config.kv_cache_fp8_math,
        random_seed=config.random_seed,
        custom_logit_processors=config.custom_logit_processors if config.enable_custom_logit_processor else None,
        progress=config.show_progress,
        cuda_graph_bs=config.cuda_graph_bs,
        cuda_graph_max_bs=graph_max_bs,
        disable_cuda_graph=disable_cuda_graph,
        eager_graphs=config.debug_eager_graphs,
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
        mixed_chunk_size=config.mixed_chunk_size,
        speculative_num_steps=spec_steps,
        decode_log_interval=config.decode_log_interval,
        decode_reserve_tokens=round(DECODE_RESERVE_TOKENS * config.schedule_conservativeness),
    )
    return StartupPlan(worker, scheduler, config.nnodes)
