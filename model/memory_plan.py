"""GPU memory at start-up: weights, the KV pool, and the reserve the largest step needs, measured, not guessed.

`--mem-fraction-static` keeps SGLang's meaning: the share of the GPU for static memory (weights + KV pool); the
rest is for activations and CUDA graphs. Before the KV pool exists, `measure_step_peak` runs the largest step
the scheduler may plan (a full prefill chunk over a long prefix, beside a full batch of decode rows, and the
sampler over every row) on dummy inputs and records the allocator's peak above what was in use; the decode
graphs' pool is estimated the same way from the largest captured batch. When the fraction would leave less
than that reserve, the pool shrinks (with a warning) instead of the first long prompt running out of memory.

NOTE: a step's memory does not grow with its cached prefix: the attention kernels read the latent cache in
place (`kernels/mla_extend.py`) and the torch path walks it in bounded key blocks (`model/attention.py`). So the
measured prefix is capped at `MEASURE_MAX_PREFIX` tokens, long enough to exercise every path, short enough that
start-up does not spend seconds on attention over 128k dummy keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from baleen.model.batch import ForwardBatch
from baleen.model.config import ModelConfig
from baleen.model.kv_cache import KVCache

if TYPE_CHECKING:
    from baleen.model.attention import AttentionBackend
    from baleen.model.deepseek import DeepseekV3ForCausalLM

log = logging.getLogger("baleen.memory")

GiB = 1 << 30
MEASURE_MAX_PREFIX = 16384
MIN_MARGIN = 256 << 20  # allocator fragmentation, cuBLAS/Triton workspaces first used later


@dataclass(frozen=True)
class StepShape:
    """The largest step the scheduler may plan: `chunk` new tokens of one sequence over `prefix` cached ones,
    beside `decode_rows` one-token rows."""

    chunk: int
    prefix: int
    decode_rows: int

    @classmethod
    def largest(cls, chunked_prefill_size: int | None, max_context_len: int, max_running_requests: int) -> StepShape:
        chunk = min(chunked_prefill_size or max_context_len, max_context_len)
        prefix = min(max(max_context_len - chunk, 0), MEASURE_MAX_PREFIX)
        return cls(chunk, prefix, max(max_running_requests - 1, 0))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of one GPU, decided before the KV pool is allocated."""

    total: int
    in_use: int  # weights (and tiled copies), CUDA context, communicators: everything before the pool
    activations: int  # measured peak of the largest step
    graphs: int  # estimated pool of the decode CUDA graphs (0 without graphs)
    margin: int
    kv_pool: int  # what the pool may take
    fraction_pool: int  # what --mem-fraction-static alone would have given it

    @property
    def reserve(self) -> int:
        return self.activations + self.graphs + self.margin

    def describe(self) -> str:
        return (f"GPU memory plan: {self.total / GiB:.1f} GiB total, {self.in_use / GiB:.2f} GiB weights and context, "
                f"{self.kv_pool / GiB:.2f} GiB KV pool, {self.activations / GiB:.2f} GiB activation reserve, "
                f"{self.graphs / GiB:.2f} GiB CUDA graphs, {self.margin / GiB:.2f} GiB margin")


def plan_memory(total: int, free: int, mem_fraction_static: float, activations: int, graphs: int) -> MemoryPlan:
    """Size the KV pool: SGLang's static fraction, cut to what leaves the measured reserve free."""
    if not 0.0 < mem_fraction_static <= 1.0:
        raise ValueError(f"--mem-fraction-static must be in (0, 1], got {mem_fraction_static}")
    in_use = total - free
    margin = max(MIN_MARGIN, (activations + graphs) // 10)
    fraction_pool = int(total * mem_fraction_static) - in_use
    headroom = free - activations - graphs - margin
    plan = MemoryPlan(total, in_use, activations, graphs, margin, min(fraction_pool, headroom), fraction_pool)
    if plan.kv_pool <= 0:
        raise ValueError(
            f"no room for a KV cache: {in_use / GiB:.1f} GiB of {total / GiB:.1f} GiB are in use after loading, and the "
            f"largest step needs {plan.reserve / GiB:.2f} GiB more (activations {activations / GiB:.2f}, graphs "
            f"{graphs / GiB:.2f}); use more GPUs, a smaller --chunked-prefill-size or --max-running-requests"
            + (f", or a larger --mem-fraction-static than {mem_fraction_static}" if fraction_pool <= 0 else "")
        )
    if plan.kv_pool < fraction_pool:
        log.warning(
            "--mem-fraction-static %.2f would leave %.2f GiB for a step that needs %.2f GiB: the KV pool gets %.2f GiB "
            "instead of %.2f GiB (as with --mem-fraction-static %.3f); a smaller --chunked-prefill-size or "
            "--max-running-requests gives it more", mem_fraction_static, (total - in_use - fraction_pool) / GiB,
            plan.reserve / GiB, plan.kv_pool / GiB, fraction_pool / GiB, (in_use + plan.kv_pool) / total,
        )  # fmt: skip
    return plan


def dummy_batch(shape: StepShape, page_size: int, device: torch.device, dp_size: int = 1) -> ForwardBatch:
    """A batch of `shape` whose every page-table entry is page 1 of a two-page cache (the padding page is 0).

    Its latents all land in one page and its keys are that page again and again: the values are junk, the
    shapes and the memory are those of the real step.
    """
    prefix = [shape.prefix, *[max(shape.prefix, 1)] * shape.decode_rows]
    extend = [shape.chunk, *[1] * shape.decode_rows]
    tables = [[1] * -(-(p + e) // page_size) for p, e in zip(prefix, extend)]
    batch = ForwardBatch.build([0] * sum(extend), prefix, extend, tables, page_size, device=device)
    if dp_size > 1:
        batch.dp_num_tokens = [batch.num_tokens] * dp_size
    return batch


def measure_step_peak(model: DeepseekV3ForCausalLM, attn: AttentionBackend, model_config: ModelConfig,
                      batch: ForwardBatch, cache_dtype: torch.dtype, device: torch.device) -> int:
    """Peak bytes allocated above the current use while `model` runs `batch` and samples every row.

    Call on every rank of a multi-rank model (its collectives run). The cache is a two-page stand-in.
    """

    def step() -> None:  # its tensors (the stand-in cache included) are gone when it returns
        kv = KVCache.for_model(model_config, 2, batch.page_size, cache_dtype, device)
        with torch.inference_mode():
            attn.plan(batch)
            hidden = model(batch, kv, attn)
            logits = model.compute_logits(hidden[batch.logits_indices])
            # The sampler's worst case (top-p/top-k over every row): float32 probabilities, sorted.
            torch.sort(torch.softmax(logits.float(), dim=-1), dim=-1, descending=True)

    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        step()
    except torch.OutOfMemoryError as e:
        raise ValueError(
            f"the largest step the scheduler may plan ({batch.num_tokens} tokens in {batch.num_seqs} rows, up to "
            f"{batch.max_seq_len} positions) does not fit in GPU memory even before the KV pool exists: lower "
            f"--chunked-prefill-size or --max-running-requests, or use more GPUs ({str(e).splitlines()[0]})"
        ) from None
    finally:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        torch.cuda.empty_cache()
    return int(peak)
