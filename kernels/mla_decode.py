"""MLA decode attention over the paged latent cache, in the absorbed (MQA) form.

Every head of a sequence attends to the same cached latent rows: key = [latent (512) | rope (64)],
value = latent. So a program takes a block of heads and streams the sequence's latent rows once for all of
them (the K/V bytes read from HBM are shared by BLOCK_H heads). Long contexts are split into KV chunks that
run as separate programs, each writing a normalised partial output and its log-sum-exp; a merge kernel
combines them. The split count is a launch parameter (fixed per batch size, so CUDA graphs can capture it);
each program derives its chunk from the device-side sequence length.

Two kernel forms. `mla_decode_kernel` puts heads on the MMA's M axis: with 8 warps and 64 heads Triton gives
both warpgroups the whole [heads, tokens] score tile (a chained dot gets all warps on M), so the 576-deep QK
product is computed twice. `mla_decode_tokm_kernel` puts tokens on M instead (S^T = K Q^T, O^T += V^T P^T):
a 128-token block gives each warpgroup its own 64 tokens for QK and its own 256 output columns for PV, with
P^T passed through shared memory, the split FlashMLA uses; its KV block can arrive by TMA when a page holds
whole blocks, which keeps the 144 KB block out of registers.

An FP8 (e4m3) cache stores latent / kv_scale with one scale per layer's cache tensor. Both kernels load its
rows as FP8 (half the bytes of bf16) and convert them to q's dtype before the dots; the scale costs nothing:
scores are q . (k * kv_scale), so it folds into the softmax scale, and P @ (v * kv_scale) = (P @ v) * kv_scale
into each split's output (the merge is linear in the partials).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from baleen.kernels.device import sm_count

_LOG2E = 1.4426950408889634


# NOTE: the split count (which follows the query rows of an extend), the LSE strides derived from it and the page
# table's width (which follows the longest sequence) are not specialised: one compile per tile shape serves every
# batch (kernels/act_quant.py). The partials' strides (multiples of D_LATENT) keep their % 16 class.
@triton.jit(do_not_specialize=["stride_pt_b", "stride_lse_b", "stride_lse_h", "num_splits"])
def mla_decode_kernel(
    q_nope_ptr,
    q_pe_ptr,
    cache_ptr,
    page_table_ptr,
    seq_lens_ptr,
    seq_idx_ptr,
    o_ptr,
    lse_ptr,
    sm_scale_log2,
    v_scale,
    num_heads,
    stride_qn_b,
    stride_qn_h,
    stride_qp_b,
    stride_qp_h,
    stride_cache_tok,
    stride_pt_b,
    stride_o_b,
    stride_o_h,
    stride_o_s,
    stride_lse_b,
    stride_lse_h,
    num_splits,
    num_col_programs,
    PAGE_SIZE: tl.constexpr,
    D_LATENT: tl.constexpr,
    D_ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    STORE_LSE: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
):
    # Program (b x head block x value block, split); head blocks vary fastest so the programs that read the
    # same sequence's rows run side by side and share them through L2. It covers heads [h0, h0 + BLOCK_H)
    # of sequence b over its split-th KV chunk, producing output columns [dv0, dv0 + BLOCK_DV). With BLOCK_DV = D_LATENT / 2 two programs
    # share a head block: both compute the full scores (latent halves "own" + "other", and rope), each
    # accumulates its own half of P @ V; that halves the accumulator so 64 heads fit one warpgroup.
    NUM_DV: tl.constexpr = D_LATENT // BLOCK_DV
    # int64: an extend step's q is [T, H, D] with a head stride of T * D when it comes from the absorption einsum
    # (layout [H, T, D]): h * stride passes 2^31 from ~33k tokens at 128 heads
    b = (tl.program_id(0) // num_col_programs).to(tl.int64)
    h0 = (tl.program_id(0) % num_col_programs // NUM_DV * BLOCK_H).to(tl.int64)
    dv0 = (tl.program_id(0) % NUM_DV) * BLOCK_DV
    other0 = (dv0 + BLOCK_DV) % D_LATENT  # the other half's start (unused when NUM_DV == 1)
    split = tl.program_id(1)
    offs_h = h0 + tl.arange(0, BLOCK_H)
    mask_h = offs_h < num_heads
    offs_c = tl.arange(0, BLOCK_DV)
    offs_r = tl.arange(0, D_ROPE)
    offs_n = tl.arange(0, BLOCK_N)

    seq_len = tl.load(seq_lens_ptr + b)
    # Chunk length is a multiple of BLOCK_N, so a chunk never straddles a page when BLOCK_N | PAGE_SIZE.
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    if start >= seq_len:
        return  # an empty split (short sequence): writes nothing; the merge reads only the non-empty ones
    end = tl.minimum(start + chunk, seq_len)

    q_rows = q_nope_ptr + b * stride_qn_b + offs_h[:, None] * stride_qn_h
    q_own = tl.load(q_rows + dv0 + offs_c[None, :], mask=mask_h[:, None], other=0.0)  # [BLOCK_H, BLOCK_DV]
    if NUM_DV == 2:
        q_other = tl.load(q_rows + other0 + offs_c[None, :], mask=mask_h[:, None], other=0.0)
    q_pe = tl.load(
        q_pe_ptr + b * stride_qp_b + offs_h[:, None] * stride_qp_h + offs_r[None, :], mask=mask_h[:, None], other=0.0
    )  # [BLOCK_H, D_ROPE]

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_DV), dtype=tl.float32)
    if HAS_SEQ_IDX:  # several query rows (extend tokens) share one sequence's page-table row
        pt_row = page_table_ptr + tl.load(seq_idx_ptr + b).to(tl.int64) * stride_pt_b
    else:
        pt_row = page_table_ptr + b * stride_pt_b
    for t0 in range(start, end, BLOCK_N):
        toks = t0 + offs_n
        mask_n = toks < end
        if PAGE_SIZE % BLOCK_N == 0:
            # The whole block sits in one page: one page-table read, contiguous rows.
            page = tl.load(pt_row + t0 // PAGE_SIZE).to(tl.int64)
            rows = page * PAGE_SIZE + (t0 % PAGE_SIZE) + offs_n
        else:
            pages = tl.load(pt_row + toks // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
            rows = pages * PAGE_SIZE + toks % PAGE_SIZE
        row_ptrs = cache_ptr + rows * stride_cache_tok  # [BLOCK_N]
        # [BLOCK_N, BLOCK_DV], [BLOCK_N, D_ROPE]; an FP8 cache converts to q's dtype here (no-op otherwise)
        kv = tl.load(row_ptrs[:, None] + dv0 + offs_c[None, :], mask=mask_n[:, None], other=0.0).to(q_own.dtype)
        k_pe = tl.load(row_ptrs[:, None] + D_LATENT + offs_r[None, :], mask=mask_n[:, None], other=0.0).to(q_own.dtype)

        qk = tl.dot(q_own, tl.trans(kv)) + tl.dot(q_pe, tl.trans(k_pe))  # [BLOCK_H, BLOCK_N]
        if NUM_DV == 2:
            kv_other = tl.load(row_ptrs[:, None] + other0 + offs_c[None, :], mask=mask_n[:, None], other=0.0)
            kv_other = kv_other.to(q_own.dtype)
            qk += tl.dot(q_other, tl.trans(kv_other))
        qk = tl.where(mask_n[None, :], qk * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv)
        m_i = m_new

    has = l_i > 0.0
    out = acc * (v_scale / tl.where(has, l_i, 1.0))[:, None]  # v_scale: the FP8 cache's scale (else 1)
    o_ptrs = o_ptr + b * stride_o_b + offs_h[:, None] * stride_o_h + split * stride_o_s + dv0 + offs_c[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask_h[:, None])
    if STORE_LSE:
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))  # log2 domain
        if dv0 == 0:  # both value halves computed the same scores; one of them stores them
            tl.store(lse_ptr + b * stride_lse_b + offs_h * stride_lse_h + split, lse, mask=mask_h)


@triton.jit
def _tokm_block(kv, k_pe, q_t, qpe_t, mask_n, m_i, l_i, acc, sm_scale_log2):
    # One KV block, tokens on M. kv [BLOCK_N, D_LATENT], k_pe [BLOCK_N, D_ROPE]; q_t [D_LATENT, BLOCK_H] and
    # qpe_t [D_ROPE, BLOCK_H] stay in shared memory as wgmma B operands; acc [D_LATENT, BLOCK_H] is O^T.
    s = tl.dot(kv, q_t) + tl.dot(k_pe, qpe_t)  # [BLOCK_N, BLOCK_H]
    s = tl.where(mask_n[:, None], s * sm_scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[None, :])  # [BLOCK_N, BLOCK_H]; goes to shared memory as the PV B operand
    l_i = l_i * alpha + tl.sum(p, axis=0)
    acc = acc * alpha[None, :] + tl.dot(tl.trans(kv), p.to(kv.dtype))
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["stride_pt_b", "stride_lse_b", "stride_lse_h", "num_splits"])  # as above
def mla_decode_tokm_kernel(
    q_nope_ptr,
    q_pe_ptr,
    cache_ptr,
    kv_desc,
    pe_desc,
    page_table_ptr,
    seq_lens_ptr,
    seq_idx_ptr,
    o_ptr,
    lse_ptr,
    sm_scale_log2,
    v_scale,
    num_heads,
    stride_qn_b,
    stride_qn_h,
    stride_qp_b,
    stride_qp_h,
    stride_cache_tok,
    stride_pt_b,
    stride_o_b,
    stride_o_h,
    stride_o_s,
    stride_lse_b,
    stride_lse_h,
    num_splits,
    num_col_programs,
    PAGE_SIZE: tl.constexpr,
    D_LATENT: tl.constexpr,
    D_ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    STORE_LSE: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
):
    # Program (b x head block, split) as in mla_decode_kernel, computing the transposed problem: scores
    # S^T = K Q^T [BLOCK_N, BLOCK_H] and output O^T [D_LATENT, BLOCK_H]. With USE_TMA (PAGE_SIZE a multiple
    # of BLOCK_N) blocks come by TMA straight into shared memory instead of through registers.
    # NOTE: TMA reads whole blocks, so cache rows past a sequence's end (in its last block) must be finite:
    # a NaN there times p = 0 is still NaN. The KV cache is zero-initialised, so they are.
    b = (tl.program_id(0) // num_col_programs).to(tl.int64)  # int64 offsets, as in mla_decode_kernel
    h0 = (tl.program_id(0) % num_col_programs * BLOCK_H).to(tl.int64)
    split = tl.program_id(1)
    offs_h = h0 + tl.arange(0, BLOCK_H)
    mask_h = offs_h < num_heads
    offs_c = tl.arange(0, D_LATENT)
    offs_r = tl.arange(0, D_ROPE)
    offs_n = tl.arange(0, BLOCK_N)

    seq_len = tl.load(seq_lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    if start >= seq_len:
        return  # an empty split (short sequence): writes nothing; the merge reads only the non-empty ones
    end = tl.minimum(start + chunk, seq_len)

    q_cols = q_nope_ptr + b * stride_qn_b + offs_h[None, :] * stride_qn_h
    q_t = tl.load(q_cols + offs_c[:, None], mask=mask_h[None, :], other=0.0)  # [D_LATENT, BLOCK_H]
    qpe_cols = q_pe_ptr + b * stride_qp_b + offs_h[None, :] * stride_qp_h
    qpe_t = tl.load(qpe_cols + offs_r[:, None], mask=mask_h[None, :], other=0.0)  # [D_ROPE, BLOCK_H]

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((D_LATENT, BLOCK_H), dtype=tl.float32)
    if HAS_SEQ_IDX:
        pt_row = page_table_ptr + tl.load(seq_idx_ptr + b).to(tl.int64) * stride_pt_b
    else:
        pt_row = page_table_ptr + b * stride_pt_b
    for t0 in range(start, end, BLOCK_N):
        toks = t0 + offs_n
        mask_n = toks < end
        if USE_TMA:
            # A page holds whole blocks, so the block is rows [row0, row0 + BLOCK_N) of one page; past `end`
            # they are other tokens' or unwritten (zeroed) rows, finite, and their scores are masked to -inf.
            row0 = (tl.load(pt_row + t0 // PAGE_SIZE) * PAGE_SIZE + t0 % PAGE_SIZE).to(tl.int32)
            kv = kv_desc.load([row0, 0]).to(q_t.dtype)  # [BLOCK_N, D_LATENT]; FP8 converts here
            k_pe = pe_desc.load([row0, 0]).to(q_t.dtype)  # [BLOCK_N, D_ROPE]
        else:
            pages = tl.load(pt_row + toks // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
            row_ptrs = cache_ptr + (pages * PAGE_SIZE + toks % PAGE_SIZE) * stride_cache_tok  # [BLOCK_N]
            kv = tl.load(row_ptrs[:, None] + offs_c[None, :], mask=mask_n[:, None], other=0.0).to(q_t.dtype)
            k_pe = tl.load(row_ptrs[:, None] + D_LATENT + offs_r[None, :], mask=mask_n[:, None], other=0.0).to(q_t.dtype)
        m_i, l_i, acc = _tokm_block(kv, k_pe, q_t, qpe_t, mask_n, m_i, l_i, acc, sm_scale_log2)

    has = l_i > 0.0
    out = acc * (v_scale / tl.where(has, l_i, 1.0))[None, :]  # [D_LATENT, BLOCK_H]; v_scale as in mla_decode_kernel
    o_ptrs = o_ptr + b * stride_o_b + offs_h[None, :] * stride_o_h + split * stride_o_s + offs_c[:, None]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask_h[None, :])
    if STORE_LSE:
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))  # log2 domain
        tl.store(lse_ptr + b * stride_lse_b + offs_h * stride_lse_h + split, lse, mask=mask_h)


@triton.jit(do_not_specialize=["num_splits", "stride_lse_b", "stride_lse_h"])  # the partials' strides: D's class
def mla_decode_merge_kernel(
    o_part_ptr,
    lse_ptr,
    out_ptr,
    seq_lens_ptr,
    num_splits,
    num_head_blocks,
    d_latent,
    stride_p_b,
    stride_p_h,
    stride_p_s,
    stride_lse_b,
    stride_lse_h,
    stride_out_b,
    stride_out_h,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MAX_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Program (b x head block, column block): out = the LSE-weighted mean of the split partials. Each step
    # reads a [BLOCK_S, BLOCK_H, BLOCK_D] slab (~32 floats a thread, 16-byte loads), so the merge is one
    # bandwidth-bound pass over the partials rather than many tiny programs.
    # Only the splits the decode kernel wrote are read: it cut seq_len into chunks the same way.
    # NOTE: BLOCK_H divides the head count (the wrapper picks it so), so no head is masked.
    b = (tl.program_id(0) // num_head_blocks).to(tl.int64)  # the partials' rows pass 2^31 values at large B x splits
    offs_h = (tl.program_id(0) % num_head_blocks * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d_latent
    seq_len = tl.load(seq_lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    num_active = tl.cdiv(seq_len, chunk)
    lse_rows = lse_ptr + b * stride_lse_b + offs_h * stride_lse_h  # [BLOCK_H]
    offs_all = tl.arange(0, MAX_S)
    lse_all = tl.load(lse_rows[:, None] + offs_all[None, :], mask=offs_all[None, :] < num_active, other=float("-inf"))
    m = tl.max(lse_all, axis=1)  # [BLOCK_H], finite: split 0 always holds tokens
    total = tl.sum(tl.exp2(lse_all - m[:, None]), axis=1)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    part_rows = o_part_ptr + b * stride_p_b + offs_h[:, None] * stride_p_h + offs_d[None, :]  # [BLOCK_H, BLOCK_D]
    for s0 in range(0, num_active, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < num_active
        lse = tl.load(lse_rows[None, :] + offs_s[:, None], mask=mask_s[:, None], other=float("-inf"))
        w = tl.exp2(lse - m[None, :])  # [BLOCK_S, BLOCK_H], 0 for splits past the last
        parts = tl.load(
            part_rows[None, :, :] + offs_s[:, None, None] * stride_p_s,
            mask=mask_s[:, None, None] & mask_d[None, None, :],
            other=0.0,
        )
        acc += tl.sum(parts * w[:, :, None], axis=0)
    out = acc / total[:, None]
    out_ptrs = out_ptr + b * stride_out_b + offs_h[:, None] * stride_out_h + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_d[None, :])


@dataclass(frozen=True)
class MlaDecodeTiles:
    """Launch parameters of the decode kernel (heads per program, KV rows per step, warps, stages).

    split_dv: two programs per head block, each owning half of the output columns (see the kernel).
    tokens_on_m: the transposed form, `mla_decode_tokm_kernel` (tokens on the MMA's M axis; block_n 128
    with 8 warps gives each warpgroup 64 tokens); split_dv does not apply to it.
    tma: with tokens_on_m, load full KV blocks by TMA when the page size is a multiple of block_n (other
    page sizes fall back to pointer loads, so one tiles value serves every cache).
    """

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int
    split_dv: bool = False
    tokens_on_m: bool = False
    tma: bool = False


def pick_mla_decode_tiles(num_heads: int) -> MlaDecodeTiles:
    """From H100 sweeps: 64 heads x 64 rows (8 warps, 1 stage) for wide heads; 16 x 64 for few heads."""
    if num_heads >= 64:
        return MlaDecodeTiles(block_h=64, block_n=64, num_warps=8, num_stages=1)
    block_h = max(16, triton.next_power_of_2(num_heads))
    return MlaDecodeTiles(block_h=block_h, block_n=64, num_warps=4, num_stages=2)


def pick_num_kv_splits(batch: int, num_head_blocks: int, max_seq_len: int, num_sms: int, block_h: int = 16) -> int:
    """KV splits so the grid is about one wave of programs (two for light 16-head programs).

    Each split costs a float32 partial row per head (written, then read by the merge), which for 64-head
    programs outweighs the benefit of a second wave; splits stay at least 64 tokens long. 64-head programs
    also load 72 KB of queries each, so they take at most 32 splits (H100, one sequence: 32 splits of a 4k
    context beat 64, and 33 of 8k beat 66).
    """
    programs = batch * num_head_blocks
    target = num_sms if block_h > 16 else 2 * num_sms
    max_splits = max(1, max_seq_len // 64)
    cap = 32 if block_h > 16 else 128
    return max(1, min(round(target / programs), max_splits, cap))


def mla_decode(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    num_kv_splits: int | None = None,
    max_seq_len: int | None = None,
    tiles: MlaDecodeTiles | None = None,
    seq_idx: torch.Tensor | None = None,
    kv_scale: float = 1.0,
) -> torch.Tensor:
    """Absorbed-MLA decode: one query token per sequence against its paged latent cache.

    q_nope [B, H, D_LATENT] (already multiplied by W_UK), q_pe [B, H, D_ROPE] (rotated; both widths powers of
    two >= 16, `mla_decode_unsupported`),
    cache [num_pages, page_size, D_LATENT + D_ROPE] (latent then rope), page_table [B, max_pages] int32,
    seq_lens [B] int32 (keys 0..seq_len-1 are attended; must be >= 1). Returns out [B, H, D_LATENT] in
    q's dtype (still to be multiplied by W_UV). `num_kv_splits` fixes the KV split count (default: a
    heuristic from the batch shape and `max_seq_len`, itself defaulting to the page table's capacity).
    `seq_idx` [B] int32, if given, names the page-table row of each query row (extend: many rows per
    sequence, each with its own causal length in seq_lens); page_table may then have any number of rows.
    The cache has q's dtype, or is float8_e4m3fn holding latent / `kv_scale` (one scale for the whole tensor).
    """
    batch, num_heads, d_latent, d_rope = check_mla_decode_inputs(q_nope, q_pe, cache, page_table, seq_lens, seq_idx)
    why = mla_decode_unsupported(d_latent, d_rope)
    if why is not None:
        raise ValueError(f"the MLA decode kernel cannot take this shape: {why} (mla_decode_ref can)")
    page_table = page_table.contiguous()
    page_size = cache.shape[1]
    out = torch.empty((batch, num_heads, d_latent), dtype=q_nope.dtype, device=q_nope.device)
    if batch == 0:
        return out
    t = tiles or pick_mla_decode_tiles(num_heads)
    num_head_blocks = triton.cdiv(num_heads, t.block_h)
    if num_kv_splits is None:
        cap = max_seq_len if max_seq_len is not None else page_table.shape[1] * page_size
        num_kv_splits = pick_num_kv_splits(batch, num_head_blocks, cap, sm_count(q_nope.device), t.block_h)
    splits = int(num_kv_splits)
    scale_log2 = float(sm_scale) * float(kv_scale) * _LOG2E  # keys are cache * kv_scale
    v_scale = float(kv_scale)  # values too: applied to each split's output
    o_part, lse, strides = split_buffers(out, splits)
    common = (
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), cache.stride(1), page_table.stride(0),
        *strides, splits,
    )  # fmt: skip
    seq_rows = seq_idx if seq_idx is not None else seq_lens
    if t.tokens_on_m:
        descs = _kv_descriptors(cache, d_latent, t.block_n) if t.tma and page_size % t.block_n == 0 else None
        kv_desc, pe_desc = descs if descs is not None else (None, None)
        mla_decode_tokm_kernel[(batch * num_head_blocks, splits)](
            q_nope, q_pe, cache, kv_desc, pe_desc, page_table, seq_lens, seq_rows, o_part, lse, scale_log2, v_scale,
            num_heads,
            *common, num_head_blocks,
            PAGE_SIZE=page_size, D_LATENT=d_latent, D_ROPE=d_rope, BLOCK_H=t.block_h, BLOCK_N=t.block_n,
            USE_TMA=descs is not None, STORE_LSE=splits > 1, HAS_SEQ_IDX=seq_idx is not None,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )  # fmt: skip
    else:
        num_dv = 2 if t.split_dv else 1
        mla_decode_kernel[(batch * num_head_blocks * num_dv, splits)](
            q_nope, q_pe, cache, page_table, seq_lens, seq_rows, o_part, lse, scale_log2, v_scale, num_heads,
            *common, num_head_blocks * num_dv,
            PAGE_SIZE=page_size, D_LATENT=d_latent, D_ROPE=d_rope,
            BLOCK_H=t.block_h, BLOCK_N=t.block_n, BLOCK_DV=d_latent // num_dv, STORE_LSE=splits > 1,
            HAS_SEQ_IDX=seq_idx is not None,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )  # fmt: skip
    merge_splits(o_part, lse, out, seq_lens, splits, t.block_n)
    return out


def mla_decode_unsupported(d_latent: int, d_rope: int) -> str | None:
    """Why the Triton decode kernels (`mla_decode`, `mla_extend`) cannot take a latent of `d_latent` and a
    rope part of `d_rope` values, or None when they can: each is one power-of-two block and a dot operand's
    K side (>= 16 on the GPU). `mla_decode_ref`, `mla_extend_ref` and the torch backends take any widths."""
    for name, dim in (("D_LATENT (kv_lora_rank)", d_latent), ("D_ROPE (qk_rope_head_dim)", d_rope)):
        if dim < 16 or dim & (dim - 1):
            return f"{name}={dim} is not a power of two >= 16"
    return None


def check_mla_decode_inputs(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
) -> tuple[int, int, int, int]:
    """ValueError for inputs of the wrong layout (see `mla_decode`); else (batch, heads, d_latent, d_rope).

    The kernels' own shape limits are `mla_decode_unsupported` (and `gluon_mla_decode_supported`)."""
    if q_nope.dim() != 3 or q_pe.dim() != 3 or cache.dim() != 3:
        raise ValueError("q_nope and q_pe must be [B, H, D] and cache [num_pages, page_size, D_LATENT + D_ROPE]")
    batch, num_heads, d_latent = q_nope.shape
    d_rope = q_pe.shape[2]
    if q_pe.shape[:2] != q_nope.shape[:2]:
        raise ValueError(f"q_pe {tuple(q_pe.shape)} and q_nope {tuple(q_nope.shape)} disagree on [B, H]")
    if cache.shape[2] != d_latent + d_rope:
        raise ValueError(f"cache rows have {cache.shape[2]} values, expected {d_latent} + {d_rope}")
    if q_pe.dtype != q_nope.dtype or cache.dtype not in (q_nope.dtype, torch.float8_e4m3fn):
        raise ValueError(f"q_nope and q_pe need one dtype and the cache that dtype or float8_e4m3fn: got "
                         f"{q_nope.dtype}, {q_pe.dtype}, {cache.dtype}")
    if page_table.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("page_table and seq_lens must be int32")
    if seq_lens.shape[0] != batch or (seq_idx is None and page_table.shape[0] != batch):
        raise ValueError(f"page_table and seq_lens need {batch} rows")
    if seq_idx is not None and (seq_idx.dtype != torch.int32 or seq_idx.shape != (batch,)):
        raise ValueError(f"seq_idx must be int32 [{batch}]")
    if q_nope.stride(2) != 1 or q_pe.stride(2) != 1:
        raise ValueError("q_nope and q_pe must be contiguous in their last dimension")
    if cache.stride(2) != 1 or cache.stride(0) != cache.shape[1] * cache.stride(1):
        raise ValueError("cache pages must be contiguous rows ([num_pages, page_size, D] with row stride only)")
    return batch, num_heads, d_latent, d_rope


def split_buffers(out: torch.Tensor, splits: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Where a decode kernel writes for `splits` KV splits: (o_part, lse, their strides).

    One split writes `out` [B, H, D] directly (no LSE); more write float32 partials [B, H, splits, D] and
    log2-domain LSEs [B, H, splits] for `merge_splits`.
    """
    if splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1, got {splits}")
    if splits == 1:
        return out, out, (out.stride(0), out.stride(1), 0, 0, 0)  # lse unused (STORE_LSE=False)
    batch, num_heads, d_latent = out.shape
    o_part = torch.empty((batch, num_heads, splits, d_latent), dtype=torch.float32, device=out.device)
    lse = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=out.device)
    return o_part, lse, (o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1))


def merge_splits(
    o_part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, seq_lens: torch.Tensor, splits: int, block_n: int
) -> None:
    """out [B, H, D] = the LSE-weighted sum of the split partials (nothing to do for one split)."""
    if splits == 1:
        return
    batch, num_heads, d_latent = out.shape
    block_s, block_h, block_d = pick_merge_blocks(batch, num_heads, d_latent, splits, sm_count(out.device))
    num_head_blocks = num_heads // block_h
    mla_decode_merge_kernel[(batch * num_head_blocks, triton.cdiv(d_latent, block_d))](
        o_part, lse, out, seq_lens, splits, num_head_blocks, d_latent,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_D=block_d, MAX_S=triton.next_power_of_2(splits),
        BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip


def pick_merge_blocks(batch: int, num_heads: int, d_latent: int, splits: int, num_sms: int) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_H, BLOCK_D) of the merge: ~4096 floats a step (32 a thread), up to 32 splits in one
    step (one-sequence decode splits 32 ways: one step, not eight dependent ones), then narrower blocks until
    there are >= 2 programs per SM. BLOCK_H divides num_heads."""
    block_s = min(triton.next_power_of_2(splits), 32)
    block_d = min(triton.next_power_of_2(d_latent), max(128, 4096 // block_s))
    block_h = max(1, 4096 // (block_s * block_d))
    while num_heads % block_h:
        block_h //= 2

    def programs() -> int:
        return batch * (num_heads // block_h) * triton.cdiv(d_latent, block_d)

    while block_h > 1 and programs() < 2 * num_sms:
        block_h //= 2
    while block_d > 128 and programs() < 2 * num_sms:
        block_d //= 2
    return block_s, block_h, block_d


def mla_decode_ref(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    kv_scale: float = 1.0,
) -> torch.Tensor:
    """Pure-torch twin of `mla_decode` (float32 math, one sequence at a time; the cache dequantized by `kv_scale`)."""
    batch, _, d_latent = q_nope.shape
    page_size = cache.shape[1]
    flat = cache.reshape(-1, cache.shape[2])
    out = torch.empty_like(q_nope)
    for b in range(batch):
        seq_len = int(seq_lens[b])
        toks = torch.arange(seq_len, device=cache.device)
        slots = page_table[b, toks // page_size].to(torch.int64) * page_size + toks % page_size
        kv = flat[slots].to(torch.float32) * kv_scale  # [seq_len, D_LATENT + D_ROPE]
        q = torch.cat([q_nope[b], q_pe[b]], dim=-1).to(torch.float32)  # [H, D_LATENT + D_ROPE]
        p = torch.softmax((q @ kv.t()) * sm_scale, dim=-1)  # [H, seq_len]
        out[b] = (p @ kv[:, :d_latent]).to(out.dtype)
    return out


def _kv_descriptors(cache: torch.Tensor, d_latent: int, block_n: int) -> tuple[TensorDescriptor, TensorDescriptor] | None:
    """TMA descriptors over the cache's latent and rope columns as [num_pages * page_size, D] matrices.

    None when TMA cannot address them (row stride or base not 16-byte aligned): pointer loads then.
    """
    item = cache.element_size()
    rope = cache[..., d_latent:]  # [num_pages, page_size, D_ROPE], starts d_latent values into each row
    if (cache.stride(1) * item) % 16 or cache.data_ptr() % 16 or rope.data_ptr() % 16:
        return None
    rows, row_stride = cache.shape[0] * cache.shape[1], cache.stride(1)
    return (
        TensorDescriptor(cache, [rows, d_latent], [row_stride, 1], [block_n, d_latent]),
        TensorDescriptor(rope, [rows, rope.shape[2]], [row_stride, 1], [block_n, rope.shape[2]]),
    )



def default_sm_scale(qk_nope_head_dim: int = 128, qk_rope_head_dim: int = 64) -> float:
    """Softmax scale of DeepSeek-V3 without YaRN: 1/sqrt(qk_head_dim) of the unabsorbed head (192)."""
    return 1.0 / math.sqrt(qk_nope_head_dim + qk_rope_head_dim)
