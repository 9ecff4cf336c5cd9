"""Start-up steps at every token-count regime: no user's first request of a new length waits for a compile.

A step's kernels depend on its token count T in steps, not continuously: the FP8 linears take the GEMV at one
token, the tiled or skinny GEMM up to 64, Triton's own tiles up to 127, cuBLAS beyond; the fused MoE picks its
tile by tokens per expert and folds the shared expert in up to 256 tokens; an extend over a cached prefix splits
the keys more ways the fewer its rows. Each choice is a Triton compile the first time it runs (the token counts
themselves are not specialised: kernels/act_quant.py). CUDA graph capture covers decode and the memory plan the
largest step; `warm_up_shapes` runs the rest once at start-up, on the thread that builds the runner: a prefill
(expanded MLA) of T tokens for every T of `warm_up_token_counts`, and an extend of T tokens over a 2k-token prefix
(absorbed MLA) for the few-row T, with their last token's logits. Their inputs are made-up ids, in page 0 of the KV
cache, the padding page no request reads (model/kv_cache.py). The blocks their activations took stay in torch's
caching allocator for the first requests: the memory plan reserved that much for steps (model/memory_plan.py).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from baleen.model.batch import ForwardBatch

if TYPE_CHECKING:
    from baleen.model.attention import AttentionBackend
    from baleen.model.deepseek import DeepseekV3ForCausalLM
    from baleen.model.kv_cache import KVCache

log = logging.getLogger("baleen.warm_up")

# Rows up to which an extend is warmed up too: its key splits (kernels/mla_decode.py `pick_num_kv_splits`) change
# with the row count up to ~2 x the SMs / the head blocks (44 rows at 128 heads on an H100) and stay at one after.
EXTEND_MAX_TOKENS = 128
# Cached tokens before a warmed-up extend: enough keys for the most splits (32 of 64 keys at least).
EXTEND_PREFIX_LEN = 2048


def warm_up_token_counts(max_tokens: int) -> list[int]:
    """1, 2, 3 and every power of two up to `max_tokens` with the count one past it: the token-count heuristics
    switch at powers of two or between two of them, so every regime gets at least one step."""
    counts = {1, 2, 3}
    p = 4
    while p <= max_tokens:
        counts.update((p, p + 1))
        p *= 2
    return sorted(n for n in counts if n <= max_tokens)


def _batch(num_tokens: int, prefix_len: int, vocab_size: int, page_size: int, device: torch.device,
           dp_size: int) -> ForwardBatch:  # fmt: skip
    # Every page-table entry is page 0, and the table's width rounded up to 16 pages as the runner rounds it
    # (`ModelRunner.build_batch`): the kernels see the strides a real step has. Varied ids spread the tokens over
    # the experts as a prompt does.
    pages = -(-(prefix_len + num_tokens) // page_size)
    table = [0] * (-(-pages // 16) * 16)
    ids = [(17 + 31 * i) % vocab_size for i in range(num_tokens)]
    batch = ForwardBatch.build(ids, [prefix_len], [num_tokens], [table], page_size, device=device)
    if dp_size > 1:
        batch.dp_num_tokens = [num_tokens] * dp_size  # every DP rank runs the same step: the MLP collectives match
    return batch


@torch.inference_mode()
def warm_up_shapes(model: DeepseekV3ForCausalLM, kv_cache: KVCache, attn: AttentionBackend, max_tokens: int,
                   max_context_len: int, dp_size: int = 1) -> int:  # fmt: skip
    """Run the prefill of every `warm_up_token_counts(max_tokens)` count and the extend of those up to
    EXTEND_MAX_TOKENS (over EXTEND_PREFIX_LEN cached tokens, or what the context leaves); returns the steps run.

    Call on every rank of a multi-rank model (the same steps: their collectives run), after the KV cache exists.
    """
    device = kv_cache.layer(0).device
    started = time.perf_counter()
    prefills = warm_up_token_counts(min(max_tokens, max_context_len - 1))
    prefix = min(EXTEND_PREFIX_LEN, max_context_len - EXTEND_MAX_TOKENS - 1)
    extends = warm_up_token_counts(min(max_tokens, EXTEND_MAX_TOKENS)) if prefix > 0 else []
    for num_tokens, prefix_len in [(n, 0) for n in prefills] + [(n, prefix) for n in extends]:
        batch = _batch(num_tokens, prefix_len, model.config.vocab_size, kv_cache.page_size, device, dp_size)
        attn.plan(batch)
        hidden = model(batch, kv_cache, attn)
        model.compute_logits(hidden[batch.logits_indices])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    log.info("warmed up %d prefill shapes (up to %d tokens) and %d extends over %d cached tokens in %.1f s",
             len(prefills), max(prefills, default=0), len(extends), prefix, time.perf_counter() - started)
    return len(prefills) + len(extends)
