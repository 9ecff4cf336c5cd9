"""Absorbed-MLA attention for new tokens appended to cached prefixes, over the paged latent cache.

Used where several new tokens of a sequence attend to its cache at once in latent (MQA) form: chunked
prefill after a prefix hit and speculative verification (a few draft tokens per sequence). Each new token
is one query row of the decode kernel with its own causal length (prefix + its index + 1), and all rows of
a sequence read that sequence's page-table row, so no page table is copied. The latents of the new tokens
must already be in the cache (ForwardBatch.out_loc). Long prefills without a prefix should use the
expanded (MHA) form instead: here every query row streams its keys from L2 on its own.
"""

from __future__ import annotations

import torch

from baleen.kernels.mla_decode import MlaDecodeTiles, mla_decode


def extend_rows(
    qo_indptr: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int, causal: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per new token: (its sequence index [T] int32, the number of keys it sees [T] int32), on device.

    qo_indptr [S+1] int32 splits the T tokens by sequence; seq_lens [S] counts cached keys including the new
    ones. With `causal`, token j of a sequence with e new tokens sees seq_len - e + j + 1 keys.
    """
    device = qo_indptr.device
    extend_lens = (qo_indptr[1:] - qo_indptr[:-1]).to(torch.int64)  # [S]
    seq_idx = torch.repeat_interleave(
        torch.arange(extend_lens.shape[0], device=device), extend_lens, output_size=num_tokens
    )  # [T]; output_size keeps this free of a host sync
    lens = seq_lens.to(torch.int64)[seq_idx]
    if causal:
        j = torch.arange(num_tokens, device=device) - qo_indptr.to(torch.int64)[seq_idx]
        lens = lens - extend_lens[seq_idx] + j + 1
    return seq_idx.to(torch.int32), lens.to(torch.int32)


def mla_extend(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    page_table: torch.Tensor,
    qo_indptr: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    causal: bool = True,
    num_kv_splits: int | None = None,
    max_seq_len: int | None = None,
    tiles: MlaDecodeTiles | None = None,
    kv_scale: float = 1.0,
) -> torch.Tensor:
    """Absorbed-MLA attention of T new tokens: q_nope [T, H, D_LATENT], q_pe [T, H, D_ROPE] -> [T, H, D_LATENT].

    cache [num_pages, page_size, D_LATENT + D_ROPE]; page_table [S, max_pages] int32; qo_indptr [S+1] int32
    (tokens of sequence i are rows qo_indptr[i]:qo_indptr[i+1]); seq_lens [S] int32 cached keys per
    sequence including the new tokens. Other arguments (an FP8 cache's `kv_scale` too) as in `mla_decode`.
    """
    num_tokens = q_nope.shape[0]
    if qo_indptr.dtype != torch.int32 or qo_indptr.shape[0] != seq_lens.shape[0] + 1:
        raise ValueError("qo_indptr must be int32 with one more entry than seq_lens")
    if page_table.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"page_table has {page_table.shape[0]} rows for {seq_lens.shape[0]} sequences")
    seq_idx, kv_lens = extend_rows(qo_indptr, seq_lens, num_tokens, causal)
    return mla_decode(
        q_nope, q_pe, cache, page_table, kv_lens, sm_scale, num_kv_splits, max_seq_len, tiles, seq_idx=seq_idx,
        kv_scale=kv_scale,
    )


def mla_extend_ref(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    page_table: torch.Tensor,
    qo_indptr: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    causal: bool = True,
    kv_scale: float = 1.0,
) -> torch.Tensor:
    """Pure-torch twin of `mla_extend` (float32, one sequence at a time, explicit causal mask; the cache
    dequantized by `kv_scale`)."""
    d_latent = q_nope.shape[2]
    page_size = cache.shape[1]
    flat = cache.reshape(-1, cache.shape[2])
    out = torch.empty_like(q_nope)
    for s in range(seq_lens.shape[0]):
        lo, hi = int(qo_indptr[s]), int(qo_indptr[s + 1])
        seq_len = int(seq_lens[s])
        toks = torch.arange(seq_len, device=cache.device)
        slots = page_table[s, toks // page_size].to(torch.int64) * page_size + toks % page_size
        kv = flat[slots].to(torch.float32) * kv_scale  # [seq_len, D_LATENT + D_ROPE]
        q = torch.cat([q_nope[lo:hi], q_pe[lo:hi]], dim=-1).to(torch.float32)  # [e, H, D]
        scores = torch.einsum("ehd,kd->ehk", q, kv) * sm_scale  # [e, H, seq_len]
        if causal:
            pos = seq_len - (hi - lo) + torch.arange(hi - lo, device=cache.device)  # absolute query positions
            scores = scores.masked_fill(toks[None, None, :] > pos[:, None, None], float("-inf"))
        out[lo:hi] = torch.einsum("ehk,kd->ehd", torch.softmax(scores, dim=-1), kv[:, :d_latent]).to(out.dtype)
    return out
