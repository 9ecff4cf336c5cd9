"""Building one rank's model runner, in the fixed start-up order: build on meta and load the weights, choose the
attention backend, size the KV cache from measured memory, make the runner, capture the decode CUDA graphs (a
speculating runner: its verify step's graphs, model/spec_graphs.py), run a step of every token-count regime once
(model/warm_up.py).

`build_runner(WorkerConfig)` is the one entry (actors/worker.py calls it on every rank, the benchmarks and tests
too); a rank of a multi-rank model gets a `ParallelRunner`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from baleen.messages import StepPlan, StepResult
from baleen.model.attention import AttentionBackend, GraphAttentionBackend
from baleen.model.batch import ForwardBatch
from baleen.model.config import ModelConfig, ParallelConfig
from baleen.model.parallel import DistInit, ParallelGroups
from baleen.model.runner import ModelRunner
from baleen.model.step import PendingStep, RunnerConfig

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from baleen.model.deepseek import DeepseekMTP, DeepseekV3ForCausalLM
    from baleen.model.grammar import GrammarSlots
    from baleen.model.kv_cache import KVCache
    from baleen.model.logit_processors import LogitProcessorRegistry
    from baleen.model.memory_plan import MemoryPlan
    from baleen.model.moe import ExpertsFactory
    from baleen.model.sampler import Sampler
    from baleen.model.speculative import MtpDrafter

log = logging.getLogger("baleen.build")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ATTENTION_BACKENDS = ("torch", "triton", "flashinfer")
FP8_KV_CACHE_DTYPES = ("fp8_e4m3", "fp8")
# --kv-cache-dtype: "auto" (the activation dtype), SGLang's names (fp8_e4m3, bf16) and ours
KV_CACHE_DTYPES = ("auto", *FP8_KV_CACHE_DTYPES, "bf16", *DTYPES)
KV_CACHE_FP8_MATH = ("fp8", "bf16")  # --kv-cache-fp8-math: FP8 MMAs, or the cache converted to bf16
DEFAULT_KV_CACHE_FP8_MATH = "fp8"


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
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES; FP8 caches get per-layer scales from the checkpoint
    kv_cache_fp8_math: str = DEFAULT_KV_CACHE_FP8_MATH  # one of KV_CACHE_FP8_MATH: the Gluon MLA kernel's MMAs over an FP8 cache
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
    speculative_num_steps: int = 0  # drafts a verify row may carry (the MTP drafter's chain); 0: no speculation
    speculative_draft_model_path: str | None = None  # a NextN checkpoint; None: the target's own MTP layer
    # Debugging and CPU tests: the CUDA-graph paths (decode and speculative steps, DP attention's shared sizes) run
    # their bodies eagerly instead of capturing, on any device and backend (`DecodeGraphs`/`SpecGraphs` eager mode).
    eager_graphs: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def cache_dtype(self) -> torch.dtype:
        if self.kv_cache_dtype == "auto":
            return self.torch_dtype
        if self.kv_cache_dtype in FP8_KV_CACHE_DTYPES:
            return torch.float8_e4m3fn
        return DTYPES["bfloat16" if self.kv_cache_dtype == "bf16" else self.kv_cache_dtype]


def check_kv_cache_dtype(kv_cache_dtype: str, fp8_math: str = DEFAULT_KV_CACHE_FP8_MATH) -> None:
    """ValueError naming the flag for a --kv-cache-dtype (or --kv-cache-fp8-math) no start-up serves (every attention
    backend reads the rest)."""
    if fp8_math not in KV_CACHE_FP8_MATH:
        raise ValueError(f"--kv-cache-fp8-math {fp8_math!r} is not one of {KV_CACHE_FP8_MATH}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}")


def make_attention_backend(name: str, device: torch.device,
                           fp8_math: str = DEFAULT_KV_CACHE_FP8_MATH) -> AttentionBackend:  # fmt: skip
    """The attention backend named by --attention-backend (`fp8_math`: --kv-cache-fp8-math, for triton's Gluon
    kernel over an FP8 cache)."""
    if name == "torch":
        from baleen.model.attention import TorchAttentionBackend

        return TorchAttentionBackend()
    if device.type != "cuda":
        raise ValueError(f"--attention-backend {name} needs a CUDA device; use 'torch' on {device.type}")
    if name == "triton":
        from baleen.model.attention_triton import TritonAttentionBackend

        return TritonAttentionBackend(fp8_mma=fp8_math == "fp8")
    if name == "flashinfer":
        from baleen.model.attention_flashinfer import FlashInferAttentionBackend

        return FlashInferAttentionBackend(device)
    raise ValueError(f"--attention-backend {name!r} is not one of {ATTENTION_BACKENDS}")


def _kv_budget_pages(cfg: WorkerConfig, model_config: ModelConfig, device: torch.device, model: DeepseekV3ForCausalLM,
                     attn: AttentionBackend, graph_sizes: list[int], groups: ParallelGroups | None) -> int:  # fmt: skip
    from baleen.model.kv_cache import KVCache

    layers, dim, ps = _cache_layers(cfg, model_config), model_config.kv_cache_dim, cfg.page_size
    if device.type == "cuda":
        pages = KVCache.num_pages_for_budget(_gpu_memory_plan(cfg, model_config, device, model, attn, graph_sizes,
                                                              groups).kv_pool, layers, ps, dim, cfg.cache_dtype)
    else:
        # CPU: enough for every slot at a few thousand tokens unless --max-total-tokens says otherwise.
        pages = 1 + -(-max(cfg.max_running_requests * 1024, 2 * cfg.max_context_len) // ps)
    if cfg.max_total_tokens is not None:
        pages = min(pages, 1 + -(-cfg.max_total_tokens // ps))
    return pages


def _kv_scales(cfg: WorkerConfig, num_layers: int) -> list[float] | None:
    """An FP8 cache's per-layer scales from the checkpoint (model/loader.py `read_kv_scales`); None: all 1.0."""
    if cfg.cache_dtype != torch.float8_e4m3fn or cfg.load_format == "dummy" or cfg.model_path is None:
        return None
    from baleen.model.loader import read_kv_scales

    scales = read_kv_scales(cfg.model_path, num_layers)
    if scales is not None:
        log.info("FP8 KV cache scales from the checkpoint: %.4g .. %.4g", min(scales), max(scales))
    return scales


def _cache_layers(cfg: WorkerConfig, model_config: ModelConfig) -> int:
    """Latent layers of the KV cache: the target's, and the drafter's one when speculating."""
    return model_config.num_hidden_layers + (1 if cfg.speculative_num_steps else 0)


def _gpu_memory_plan(cfg: WorkerConfig, model_config: ModelConfig, device: torch.device, model: DeepseekV3ForCausalLM,
                     attn: AttentionBackend, graph_sizes: list[int], groups: ParallelGroups | None) -> MemoryPlan:
    """Measure the largest steps (absorbed chunk over a prefix beside every decode row; a fresh expanded chunk;
    the largest captured decode batch, or verify batch of k + 1 tokens a row), then size the pool;
    --mem-fraction-static as SGLang means it."""
    from baleen.model.memory_plan import StepShape, dummy_batch, measure_step_peak, plan_memory

    dp = groups.parallel.dp_size if groups is not None and groups.dp_attention else 1
    shape = StepShape.largest(cfg.chunked_prefill_size, cfg.max_context_len, cfg.max_running_requests)
    shapes = [shape, StepShape(shape.chunk, 0, 0)]
    peaks = [measure_step_peak(model, attn, model_config, dummy_batch(s, cfg.page_size, device, dp), cfg.cache_dtype,
                               device) for s in shapes]  # fmt: skip
    graphs = 0
    if graph_sizes:
        # The graphs' pool holds every captured size's intermediates (largest first, the rest reuse it): 1.5x the
        # largest eager decode step (H100, v3-shape, 64 rows: 0.40 GiB eager, 0.59 GiB captured). A verify step of
        # k + 1 tokens a row costs what a decode step of that many rows does.
        q = 1 + cfg.speculative_num_steps
        decode = StepShape(1, shape.prefix + shape.chunk - 1, max(graph_sizes) * q - 1)
        graphs = 3 * measure_step_peak(model, attn, model_config, dummy_batch(decode, cfg.page_size, device, dp),
                                       cfg.cache_dtype, device) // 2  # fmt: skip
        if cfg.speculative_num_steps:
            # and every size keeps its verify hidden states and float32 logits (the sampler and the extend read them)
            row_bytes = model_config.vocab_size * 4 + model_config.hidden_size * cfg.torch_dtype.itemsize
            graphs += sum(graph_sizes) * q * row_bytes
    free, total = torch.cuda.mem_get_info(device)
    plan = plan_memory(total, free, cfg.mem_fraction_static, max(peaks), graphs)
    log.info("%s (largest step: a %d-token chunk over %d cached tokens beside %d decode rows)", plan.describe(),
             shape.chunk, shape.prefix, shape.decode_rows)
    return plan


def build_runner(cfg: WorkerConfig, groups: ParallelGroups | None = None) -> ModelRunner:
    """Start-up in the fixed order: build on meta + load weights, size the KV cache from memory, runner, graphs.

    A rank of a multi-rank model passes its process groups (after `init_distributed`) and gets a ParallelRunner.
    """
    from tokenizers import Tokenizer

    from baleen.model.grammar import GrammarCache, GrammarSlots
    from baleen.model.kv_cache import KVCache
    from baleen.model.loader import LoadedModel, load_model
    from baleen.model.logit_processors import LogitProcessorRegistry
    from baleen.model.sampler import Sampler, SamplingState

    device = torch.device(cfg.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        # NOTE: the memory plan sizes the KV pool from what the driver calls free. Blocks an earlier engine of this
        # process freed stay reserved by torch's caching allocator (and objects in reference cycles stay allocated
        # until a collection): give them back first, or this engine would plan around a dead one's pool (seen on
        # the H100: the third engine of a sweep got 39 of 66 GiB).
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        if torch.cuda.memory_allocated(device) > 1 << 30:
            log.warning("%.1f GiB of tensors allocated in this process are still alive before this engine loads: "
                        "its KV pool will be smaller by that much", torch.cuda.memory_allocated(device) / 2**30)
    torch.manual_seed(cfg.random_seed)
    if cfg.model_path is None:
        raise ValueError("the worker needs a model path with a config.json")
    if cfg.parallel.tp_size > 1 and groups is None:
        raise ValueError("a rank of a multi-rank model needs its process groups: call init_distributed first")
    check_kv_cache_dtype(cfg.kv_cache_dtype, cfg.kv_cache_fp8_math)
    # uneven splits (CPU only: rank_layout refuses them elsewhere) serve zero-padded heads and widths
    model_config = ModelConfig.from_hf(cfg.model_path).padded_for_tp(cfg.parallel)
    started = time.perf_counter()
    experts_method = None
    if device.type == "cuda":
        from baleen.model.fused_experts import FusedExperts

        experts_method = FusedExperts  # the reference TorchExperts syncs the host: no CUDA graphs with it
    own_mtp = bool(cfg.speculative_num_steps) and cfg.speculative_draft_model_path is None
    loaded = load_model(
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
        with_mtp=own_mtp,
    )
    model, mtp = (loaded.model, loaded.mtp) if isinstance(loaded, LoadedModel) else (loaded, None)
    if cfg.speculative_num_steps:
        mtp = _draft_layer(cfg, model, mtp, device, experts_method, groups)
    log.info("weights loaded in %.1f s", time.perf_counter() - started)
    if cfg.attention_backend == "flashinfer" and (model_config.kv_lora_rank, model_config.qk_rope_head_dim) != (512, 64):
        raise ValueError(
            f"--attention-backend flashinfer needs DeepSeek's MLA shape (kv_lora_rank 512, rope 64); this model has "
            f"{model_config.kv_lora_rank} + {model_config.qk_rope_head_dim}: use --attention-backend triton"
        )
    attn = make_attention_backend(cfg.attention_backend, device, cfg.kv_cache_fp8_math)
    dp_attention = groups is not None and groups.dp_attention
    eager_graphs = cfg.eager_graphs
    use_graphs = (device.type == "cuda" and not cfg.disable_cuda_graph) or eager_graphs
    spec_attn = attn  # what the captured speculative steps attend with
    if eager_graphs:
        log.warning("eager graphs (debugging): the CUDA-graph paths run their bodies eagerly, without capturing")
    elif use_graphs and cfg.speculative_num_steps and cfg.attention_backend == "flashinfer":
        # FlashInfer re-plans on the host before every replay, which one graph of k - 1 draft steps (k - 1 lengths)
        # cannot take, nor a verify row whose prefix only the device knows (model/spec_graphs.py). So the captured
        # speculative steps run the Triton/Gluon kernels over the same cache (the seeds' --enable-flashinfer-mla with
        # MTP); FlashInfer keeps the steps that run eagerly (prefills, extends, steps the graphs do not fit).
        log.info("speculative decoding with --attention-backend flashinfer: the CUDA-graphed speculative steps "
                 "attend with the Triton/Gluon MLA kernels, eager steps with FlashInfer")
        spec_attn = make_attention_backend("triton", device, cfg.kv_cache_fp8_math)
    elif use_graphs and cfg.speculative_num_steps and cfg.attention_backend != "triton":
        log.warning("speculative decoding captures no CUDA graphs with --attention-backend %s: its speculative "
                    "steps run eagerly (slower than plain decoding)", cfg.attention_backend)
        use_graphs = False
    if use_graphs and not eager_graphs and not isinstance(attn, GraphAttentionBackend):
        raise ValueError(f"--attention-backend {cfg.attention_backend} has no CUDA-graph support; add --disable-cuda-graph")
    graph_sizes: list[int] = []
    if use_graphs:
        from baleen.model.cuda_graph import graph_batch_sizes

        graph_sizes = graph_batch_sizes(
            list(cfg.cuda_graph_bs) if cfg.cuda_graph_bs else None, cfg.cuda_graph_max_bs, cfg.max_running_requests
        )
    num_pages = _kv_budget_pages(cfg, model_config, device, model, attn, graph_sizes, groups)
    if groups is not None:
        # NOTE: the scheduler hands out page ids that are valid on every rank: all use the smallest pool.
        num_pages = groups.tp.min_int(num_pages, device)
    cache_layers = _cache_layers(cfg, model_config)
    kv_cache = KVCache(cache_layers, num_pages, cfg.page_size, model_config.kv_cache_dim, cfg.cache_dtype, device,
                       _kv_scales(cfg, cache_layers))  # fmt: skip
    log.info("KV cache: %d pages x %d tokens (%.2f GiB, %s)", num_pages, cfg.page_size, kv_cache.num_bytes / 2**30,
             str(cfg.cache_dtype).removeprefix("torch."))  # fmt: skip
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
    grammars = GrammarSlots(grammar_cache, pinned=device.type == "cuda")
    drafter = None
    if cfg.speculative_num_steps:
        from baleen.model.speculative import MtpDrafter

        assert mtp is not None
        drafter = MtpDrafter(mtp, cfg.speculative_num_steps, cfg.max_running_requests, device)
    runner: ModelRunner
    if groups is None:
        runner = ModelRunner(model, kv_cache, attn, Sampler(state), runner_cfg, device, processors=processors,
                             tokenizer=tokenizer, random_seed=cfg.random_seed, grammars=grammars,
                             drafter=drafter)  # fmt: skip
    else:
        runner = ParallelRunner(model, kv_cache, attn, Sampler(state), runner_cfg, device, groups=groups,
                                check_sampling=cfg.check_sampling, processors=processors, tokenizer=tokenizer,
                                random_seed=cfg.random_seed, grammars=grammars, drafter=drafter)  # fmt: skip
    if use_graphs:
        heads = model_config.num_attention_heads // (groups.attn.size if groups is not None else 1)
        # under DP attention every rank captures each size together (the MLP collectives are in the graphs)
        dp_size = groups.parallel.dp_size if dp_attention and groups else 1
        started = time.perf_counter()
        reserved = torch.cuda.memory_reserved(device) if device.type == "cuda" else 0
        if cfg.speculative_num_steps:
            runner.capture_spec_graphs(graph_sizes, heads, spec_attn, dp_size, eager=eager_graphs)
        else:
            runner.capture_graphs(graph_sizes, heads, dp_size, eager=eager_graphs)
        if not eager_graphs:
            log.info("captured %s CUDA graphs of %d sizes in %.1f s (%.2f GiB)",
                     "speculative verify step" if cfg.speculative_num_steps else "decode", len(graph_sizes),
                     time.perf_counter() - started, (torch.cuda.memory_reserved(device) - reserved) / 2**30)  # fmt: skip
    if device.type == "cuda":
        # Every token-count regime's kernels compiled now, not on a user's first request of that length.
        from baleen.model.warm_up import warm_up_shapes

        dp = groups.parallel.dp_size if groups is not None and groups.dp_attention else 1
        chunk = cfg.chunked_prefill_size or cfg.max_context_len
        warm_up_shapes(model, kv_cache, attn, chunk, cfg.max_context_len, dp)
        grammar_cache.prepare()  # after the capture: nothing else may touch the device while a graph records
    return runner


def _draft_layer(cfg: WorkerConfig, model: DeepseekV3ForCausalLM, own: DeepseekMTP | None, device: torch.device,
                 experts_method: ExpertsFactory | None, groups: ParallelGroups | None) -> DeepseekMTP:
    """The drafter's MTP layer: the target checkpoint's own `model.layers.{L}.*`, or the MTP layer alone of the
    checkpoint at --speculative-draft-model-path (SGLang's NextN export or a whole DeepSeek checkpoint)."""
    from baleen.model.loader import load_mtp

    path = cfg.speculative_draft_model_path
    if path is not None:
        return load_mtp(path, model.config, model, parallel=cfg.parallel, device=device, dtype=cfg.torch_dtype,
                        load_format=cfg.load_format, seed=cfg.random_seed + 1, progress=cfg.progress,
                        experts_method=experts_method, groups=groups, tile_fp8=cfg.fp8_tiled_weights)  # fmt: skip
    if own is None:
        raise ValueError(f"speculative decoding needs an MTP (NextN) layer: {cfg.model_path} has none "
                         "(num_nextn_predict_layers = 0 or no model.layers.{num_hidden_layers}.* tensors); "
                         "give one with --speculative-draft-model-path")  # fmt: skip
    return own


class ParallelRunner(ModelRunner):
    """A rank of a multi-rank model: DP-attention step shapes and idle steps, and an optional sampling check.

    NOTE: sampling needs no broadcast. Ranks that share a batch hold bit-identical logits (the vocab slices
    are all-gathered, the hidden states before them come out of the same all-reduces) and the sampler is
    deterministic given its per-request seed, so they pick the same tokens; `check_sampling` verifies it.
    """

    recovers_from_oom = False  # see ModelRunner.recovers_from_oom

    def __init__(self, model: DeepseekV3ForCausalLM, kv_cache: KVCache, attn: AttentionBackend, sampler: Sampler,
                 config: RunnerConfig, device: torch.device, *, groups: ParallelGroups, check_sampling: bool = False,
                 processors: LogitProcessorRegistry | None = None, tokenizer: Tokenizer | None = None,
                 random_seed: int = 0, grammars: GrammarSlots | None = None,
                 drafter: MtpDrafter | None = None) -> None:  # fmt: skip
        super().__init__(model, kv_cache, attn, sampler, config, device, processors=processors, tokenizer=tokenizer,
                         random_seed=random_seed, grammars=grammars, drafter=drafter)  # fmt: skip
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
        if plan.dp_num_tokens and not plan.rows and self.drafter is None and self.dp_graph_size(plan) is None:
            # An idle DP rank still joins every layer's MLP gather / reduce-scatter (and computes its share); a
            # drafter's step joins them itself, and a graphed step replayed its padding rows above.
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
