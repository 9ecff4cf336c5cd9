"""Routed experts of a DeepSeek-V3 MoE layer: routing, token alignment, and the fused expert GEMMs.

Flow for T tokens with top-k experts each (the T*k "slots", slot s = token s // k, choice s % k):
  1. `select_experts_noaux_tc`: sigmoid scores, grouped top-k with the correction bias -> ids, weights.
  2. `moe_align_block_size`: slots sorted by expert and padded so every BLOCK_M rows share one expert
     (one Triton program at decode sizes; torch ops for prefill sizes).
  3. `moe_gemm` (gate/up): act[s] = silu(x[token] @ w13_gate^T) * (x[token] @ w13_up^T)   [T*k, I]
  4. `moe_gemm` (down):    y[s]   = weight[s] * act[s] @ w2^T                              [T*k, H]
  5. out[t] = sum over the token's k slots of y.
Weights are BF16, or FP8 e4m3 with 128x128 block scales (then activations are quantized per token per
128 columns, W8A8, as the checkpoint's reference inference does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from baleen.kernels.act_quant import (
    dequant_token_groups,
    per_token_group_quant_fp8,
    per_token_group_quant_fp8_ref,
)
from baleen.kernels.quant import FP8_DTYPE, block_dequant

# ---------------------------------------------------------------------------------------------------------
# Routing and alignment (pure torch: small tensors, no host synchronisation, CUDA-graph safe)
# ---------------------------------------------------------------------------------------------------------


def select_experts_noaux_tc(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    num_groups: int,
    topk_group: int,
    routed_scaling_factor: float = 1.0,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing: router_logits [T, E] -> (topk_weights [T, k] f32, topk_ids [T, k] int32).

    Selection uses sigmoid(logits) + correction_bias: the best `topk_group` groups (a group scores the sum
    of its top-2 experts), then the top-k experts inside them. Weights are the unbiased sigmoid scores,
    renormalised to sum to 1 when `renormalize`, times `routed_scaling_factor`.
    """
    num_tokens, num_experts = router_logits.shape
    if num_experts % num_groups:
        raise ValueError(f"{num_experts} experts do not split into {num_groups} groups")
    if not 1 <= topk_group <= num_groups:
        raise ValueError(f"topk_group must be in [1, {num_groups}], got {topk_group}")
    per_group = num_experts // num_groups
    if top_k > topk_group * per_group:
        raise ValueError(f"top_k={top_k} exceeds the {topk_group * per_group} experts of the chosen groups")
    scores = router_logits.to(torch.float32).sigmoid()  # [T, E]
    biased = scores + correction_bias.to(torch.float32)[None, :]
    grouped = biased.view(num_tokens, num_groups, per_group)
    group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)  # [T, num_groups]
    group_idx = group_scores.topk(topk_group, dim=-1).indices  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    masked = grouped.masked_fill(~group_mask[:, :, None], float("-inf")).view(num_tokens, num_experts)
    topk_ids = masked.topk(top_k, dim=-1).indices  # [T, k]
    topk_weights = scores.gather(1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weights * routed_scaling_factor, topk_ids.to(torch.int32)


# NOTE: the slot and block counts grow with the tokens: not specialised, one compile (kernels/act_quant.py).
@triton.jit(do_not_specialize=["num_slots", "max_blocks"])
def moe_align_kernel(
    ids_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    num_slots,
    num_experts,
    max_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # One program does the whole alignment (decode sizes), replacing ~25 small torch launches.
    e_offs = tl.arange(0, BLOCK_E)
    c_offs = tl.arange(0, CHUNK)
    # Pass 1: tokens per expert.
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, num_slots, CHUNK):
        ids = tl.load(ids_ptr + c0 + c_offs, mask=c0 + c_offs < num_slots, other=-1)
        counts += tl.sum((ids[:, None] == e_offs[None, :]).to(tl.int32), axis=0)  # [BLOCK_E]
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    total = tl.sum(padded, axis=0)
    # Padding rows hold num_slots; real rows are written over them after the barrier.
    for p0 in range(0, max_blocks * BLOCK_M, CHUNK):
        tl.store(sorted_ids_ptr + p0 + c_offs, tl.zeros((CHUNK,), dtype=tl.int32) + num_slots,
                 mask=p0 + c_offs < max_blocks * BLOCK_M)  # fmt: skip
    for b0 in range(0, max_blocks, CHUNK):
        starts = (b0 + c_offs) * BLOCK_M  # [CHUNK] first row of each block
        valid_e = e_offs[None, :] < num_experts
        expert = tl.sum(((pad_end[None, :] <= starts[:, None]) & valid_e).to(tl.int32), axis=1)
        expert = tl.where(starts < total, expert, -1)
        tl.store(expert_ids_ptr + b0 + c_offs, expert, mask=b0 + c_offs < max_blocks)
    tl.store(num_padded_ptr, total)
    tl.debug_barrier()
    # Pass 2: slot s of expert e goes to pad_start[e] + (earlier slots of e), keeping slot order (stable).
    seen = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, num_slots, CHUNK):
        slots = c0 + c_offs
        mask = slots < num_slots
        ids = tl.load(ids_ptr + slots, mask=mask, other=-1)
        onehot = (ids[:, None] == e_offs[None, :]).to(tl.int32)  # [CHUNK, BLOCK_E]
        before = tl.cumsum(onehot, axis=0) - onehot  # same-expert slots earlier in this chunk
        dest = tl.sum(onehot * (before + seen[None, :] + pad_start[None, :]), axis=1)  # [CHUNK]
        tl.store(sorted_ids_ptr + dest, slots, mask=mask)
        seen += tl.sum(onehot, axis=0)


# Above this many slots the one-program alignment loses to the parallel torch ops (prefill sizes).
_ALIGN_KERNEL_MAX_SLOTS = 1024


def moe_align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the T*k slots by expert, padding each expert's run to a multiple of block_m.

    Returns sorted_ids [max_blocks * block_m] int32 (slot index in slot order within an expert, or T*k
    for padding), expert_ids [max_blocks] int32 (expert of each row block, -1 past the end) and
    num_padded [1] int32 (rows in use). Sizes depend only on T*k, E and block_m, so the result can live
    inside a CUDA graph. topk_ids must lie in [0, num_experts).
    """
    num_slots = topk_ids.numel()
    if num_slots > _ALIGN_KERNEL_MAX_SLOTS:
        return moe_align_block_size_ref(topk_ids, num_experts, block_m)
    max_blocks = triton.cdiv(num_slots, block_m) + min(num_experts, num_slots)
    device = topk_ids.device
    sorted_ids = torch.empty((max_blocks * block_m,), dtype=torch.int32, device=device)
    expert_ids = torch.empty((max_blocks,), dtype=torch.int32, device=device)
    num_padded = torch.empty((1,), dtype=torch.int32, device=device)
    if num_slots == 0:
        return sorted_ids.fill_(0), expert_ids.fill_(-1), num_padded.fill_(0)
    moe_align_kernel[(1,)](
        topk_ids.reshape(-1).to(torch.int32), sorted_ids, expert_ids, num_padded, num_slots, num_experts, max_blocks,
        BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts), CHUNK=32, num_warps=4,
    )  # fmt: skip
    return sorted_ids, expert_ids, num_padded


def moe_align_block_size_ref(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch twin of `moe_align_block_size` (also its path for prefill-sized inputs)."""
    flat = topk_ids.reshape(-1).to(torch.int64)  # [T*k]
    num_slots = flat.numel()
    device = flat.device
    max_blocks = triton.cdiv(num_slots, block_m) + min(num_experts, num_slots)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = padded.cumsum(0)  # [E]
    order = torch.argsort(flat, stable=True)  # slots grouped by expert, in slot order within an expert
    sorted_experts = flat[order]
    raw_start = counts.cumsum(0) - counts
    rank = torch.arange(num_slots, device=device) - raw_start[sorted_experts]
    dest = (pad_end - padded)[sorted_experts] + rank
    sorted_ids = torch.full((max_blocks * block_m,), num_slots, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(max_blocks, device=device) * block_m
    expert_ids = torch.searchsorted(pad_end, block_starts, right=True)
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    return sorted_ids, expert_ids, pad_end[-1:].to(torch.int32)


# ---------------------------------------------------------------------------------------------------------
# The expert GEMM
# ---------------------------------------------------------------------------------------------------------


# NOTE: num_slots (tokens x k) is not specialised: one compile per tile choice serves every token count.
@triton.jit(do_not_specialize=["num_slots"])
def fused_moe_kernel(
    a_ptr,
    a_scale_ptr,
    b_ptr,
    b_scale_ptr,
    c_ptr,
    topk_weights_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    N,
    K,
    num_slots,
    up_offset,
    stride_am,
    stride_asm,
    stride_be,
    stride_bn,
    stride_bse,
    stride_bsn,
    stride_cm,
    A_ROW_DIV: tl.constexpr,
    GATE_UP: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    USE_FP8: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_SLOT: tl.constexpr,
):
    # Program: one block of BLOCK_M sorted slots (all routed to one expert) x BLOCK_N output columns.
    # ONE_SLOT (one token: its k experts are distinct): block m is slot m alone, its expert read straight from
    # expert_ids_ptr = the flat topk_ids, with no alignment launch; the other rows of the block are padding.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    if ONE_SLOT:
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        rows = tl.arange(0, BLOCK_M)
        slots = tl.where(rows == 0, pid_m, num_slots)  # [BLOCK_M]
    else:
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        slots = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    mask_m = slots < num_slots
    a_rows = tl.where(mask_m, slots // A_ROW_DIV, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    safe_n = tl.where(mask_n, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_base = b_ptr + expert * stride_be
    g_ptrs = b_base + safe_n[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N], gate (or down) rows
    u_ptrs = b_base + (up_offset + safe_n)[None, :] * stride_bn + offs_k[:, None]  # up rows (GATE_UP only)
    if USE_FP8:
        as_ptrs = a_scale_ptr + a_rows * stride_asm  # [BLOCK_M]
        bs_base = b_scale_ptr + expert * stride_bse
        gs_ptrs = bs_base + (safe_n // SCALE_BLOCK_N) * stride_bsn  # [BLOCK_N]
        us_ptrs = bs_base + ((up_offset + safe_n) // SCALE_BLOCK_N) * stride_bsn

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kb * BLOCK_K
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs + k0, mask=mask_m[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs + k0, mask=k_ok[:, None], other=0.0)
        if USE_FP8:
            # NOTE: BLOCK_K is the scale block along K, so one activation / weight scale per K step.
            a_s = tl.load(as_ptrs + kb, mask=mask_m, other=0.0)
            acc_g += tl.dot(a, g) * a_s[:, None] * tl.load(gs_ptrs + kb)[None, :]
            if GATE_UP:
                u = tl.load(u_ptrs + k0, mask=k_ok[:, None], other=0.0)
                acc_u += tl.dot(a, u) * a_s[:, None] * tl.load(us_ptrs + kb)[None, :]
        else:
            acc_g = tl.dot(a, g, acc_g)
            if GATE_UP:
                u = tl.load(u_ptrs + k0, mask=k_ok[:, None], other=0.0)
                acc_u = tl.dot(a, u, acc_u)

    if GATE_UP:
        out = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up
    else:
        out = acc_g
    if MUL_WEIGHT:
        out = out * tl.load(topk_weights_ptr + slots, mask=mask_m, other=0.0)[:, None]
    c_ptrs = c_ptr + slots.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class MoeTiles:
    """Launch parameters of one expert GEMM."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 4


def pick_moe_tiles(num_slots: int, num_experts: int, elem_bytes: int = 2) -> MoeTiles:
    """Decode (a few slots per expert) streams weights with narrow tiles; prefill uses MMA-sized tiles.

    H100, V3 experts: 16x64 / 4 warps / 4 stages reads the weights at 75-95% of 3.0 TB/s for 1-64 tokens;
    the sweep's alternatives (BLOCK_N 32/128, 3-5 stages, 8 warps) were within 2%. float32 operands (tests,
    CPU-parity runs) take twice the shared memory per stage: they get fewer stages so the tiles still fit.
    """
    per_expert = num_slots / max(1, num_experts)
    if per_expert <= 16:
        t = MoeTiles(16, 64, num_warps=4, num_stages=4)
    elif per_expert <= 64:
        t = MoeTiles(32, 64, num_warps=4, num_stages=4)
    elif per_expert <= 256:
        t = MoeTiles(64, 128, num_warps=4, num_stages=3)
    else:
        t = MoeTiles(128, 128, num_warps=8, num_stages=3)
    if elem_bytes > 2:
        t = MoeTiles(t.block_m, t.block_n, t.num_warps, num_stages=1 if t.block_m >= 64 else 2)
    return t


def fused_moe_unsupported(intermediate: int | None, block: tuple[int, int]) -> str | None:
    """Why the FP8 expert GEMMs cannot take experts of `intermediate` rows (per rank; None: not asked) in
    `block` (bn, bk) blocks, or None when they can: a K step is one 128-column scale block, and gate and up
    blocks must not straddle. BF16 experts have no limit; `fused_experts_ref` takes any shape."""
    if block[1] != 128:
        return f"weight_block_size={list(block)} has a K side of {block[1]}, not 128"
    if intermediate is not None and intermediate % block[0]:
        return f"an intermediate size of {intermediate} is not a multiple of the weight block's {block[0]} rows"
    return None


def moe_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    w: torch.Tensor,
    w_scale_inv: torch.Tensor | None,
    out: torch.Tensor,
    topk_weights: torch.Tensor | None,
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_padded: torch.Tensor,
    top_k: int,
    gate_up: bool,
    block: tuple[int, int],
    tiles: MoeTiles,
    one_slot: bool = False,
) -> torch.Tensor:
    """One expert GEMM over the aligned slots, written into `out` [T*k, N] rows by slot index.

    one_slot: no alignment; expert_ids is the flat topk_ids [T*k] and every slot is a block of its own
    (sorted_ids and num_padded are then ignored): for one token, whose experts are distinct.

    gate_up=True: a = x [T, H] (row = slot // top_k), w = w13 [E, 2N, H]; out = silu(gate) * up, N = I.
    gate_up=False: a = act [T*k, I] (row = slot), w = w2 [E, N, I]; out = topk_weight[slot] * act @ w^T.
    FP8: a and w are e4m3 with a_scale [rows, K/128] and w_scale_inv [E, ceil(rows/bn), ceil(K/128)].
    """
    use_fp8 = w.dtype == FP8_DTYPE
    _, w_rows, k = w.shape
    n = w_rows // 2 if gate_up else w_rows
    if a.shape[1] != k:
        raise ValueError(f"activations have {a.shape[1]} columns but the expert weights take {k}")
    if use_fp8:
        if a.dtype != FP8_DTYPE or a_scale is None or w_scale_inv is None:
            raise ValueError("FP8 expert weights need FP8 activations with a_scale and w_scale_inv")
        why = fused_moe_unsupported(n if gate_up else None, block)
        if why is not None:
            raise ValueError(f"the FP8 expert GEMM cannot take this shape: {why} (fused_experts_ref can)")
        a_scale_t, w_scale_t = a_scale, w_scale_inv
    elif a.dtype != w.dtype:
        raise ValueError(f"activation dtype {a.dtype} differs from weight dtype {w.dtype}")
    else:
        a_scale_t, w_scale_t = a, w  # unused placeholders (USE_FP8=False)
    num_slots = out.shape[0]
    num_pid_m = num_slots if one_slot else sorted_ids.shape[0] // tiles.block_m
    grid = (num_pid_m * triton.cdiv(n, tiles.block_n),)
    fused_moe_kernel[grid](
        a, a_scale_t, w, w_scale_t, out, topk_weights if topk_weights is not None else out,
        sorted_ids, expert_ids, num_padded, n, k, num_slots, n if gate_up else 0,
        a.stride(0), a_scale_t.stride(0), w.stride(0), w.stride(1),
        w_scale_t.stride(0), w_scale_t.stride(1), out.stride(0),
        A_ROW_DIV=top_k if gate_up else 1, GATE_UP=gate_up, MUL_WEIGHT=topk_weights is not None,
        USE_FP8=use_fp8, SCALE_BLOCK_N=block[0], BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=128 if use_fp8 else 64, ONE_SLOT=one_slot, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------
# The entry the model calls
# ---------------------------------------------------------------------------------------------------------


def _check_expert_shapes(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> None:
    num_experts, two_i, hidden = w13.shape
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ValueError(f"x must be [T, {hidden}], got {tuple(x.shape)}")
    if tuple(w2.shape) != (num_experts, hidden, two_i // 2):
        raise ValueError(f"w2 must be [{num_experts}, {hidden}, {two_i // 2}], got {tuple(w2.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError("topk_ids and topk_weights must both be [T, k] with T = x.shape[0]")


@triton.jit
def moe_sum_kernel(y_ptr, out_ptr, hidden, stride_y, stride_out, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    # out[t] = sum of the token's TOP_K slot rows y[t * TOP_K + j], in fp32, rounded once (torch's
    # reduction over the middle dim of [T, k, H] took ~5 us a layer at one token, as a latency-bound launch).
    # int64 rows: y holds T * TOP_K rows of H, past 2^31 values from ~37k tokens at V3's widths (T * 8 * 7168)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < hidden
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (t * TOP_K + j) * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def fused_experts_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13_scale_inv: torch.Tensor | None = None,
    w2_scale_inv: torch.Tensor | None = None,
    block: tuple[int, int] = (128, 128),
    tiles: MoeTiles | None = None,
) -> torch.Tensor:
    """The routed-expert output [T, H] through the Triton kernels (any device Triton runs on)."""
    _check_expert_shapes(x, w13, w2, topk_ids, topk_weights)
    num_tokens, top_k = topk_ids.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    num_slots = num_tokens * top_k
    if num_slots == 0:
        return torch.zeros_like(x)
    t = tiles or pick_moe_tiles(num_slots, num_experts, w13.element_size())
    one_slot = num_tokens == 1  # decode at batch 1: distinct experts, so no alignment launch
    if one_slot:
        sorted_ids = expert_ids = num_padded = topk_ids.reshape(-1).to(torch.int32)
    else:
        sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, num_experts, t.block_m)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()  # no copy when already f32
    act = torch.empty((num_slots, inter), dtype=x.dtype, device=x.device)  # [T*k, I]
    y = torch.empty((num_slots, x.shape[1]), dtype=x.dtype, device=x.device)  # [T*k, H]
    use_fp8 = w13.dtype == FP8_DTYPE
    x = x.contiguous()
    if use_fp8:
        x_q, x_s = per_token_group_quant_fp8(x, block[1])
        moe_gemm(x_q, x_s, w13, w13_scale_inv, act, None, sorted_ids, expert_ids, num_padded, top_k, True, block, t,
                 one_slot)  # fmt: skip
        act_q, act_s = per_token_group_quant_fp8(act, block[1])
        moe_gemm(act_q, act_s, w2, w2_scale_inv, y, weights, sorted_ids, expert_ids, num_padded, top_k, False,
                 block, t, one_slot)  # fmt: skip
    else:
        moe_gemm(x, None, w13, None, act, None, sorted_ids, expert_ids, num_padded, top_k, True, block, t, one_slot)
        moe_gemm(act, None, w2, None, y, weights, sorted_ids, expert_ids, num_padded, top_k, False, block, t,
                 one_slot)  # fmt: skip
    out = torch.empty_like(x)
    sum_block = 1024
    moe_sum_kernel[(num_tokens, triton.cdiv(x.shape[1], sum_block))](
        y, out, x.shape[1], y.stride(0), out.stride(0), TOP_K=top_k, BLOCK=sum_block, num_warps=4
    )
    return out


def fused_experts_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13_scale_inv: torch.Tensor | None = None,
    w2_scale_inv: torch.Tensor | None = None,
    block: tuple[int, int] = (128, 128),
    quantize_activations: bool = False,
) -> torch.Tensor:
    """Pure-torch twin of the routed experts, expert by expert in float32.

    With `quantize_activations` the activations go through the same per-token-group FP8 rounding as the
    W8A8 kernels (for tight comparisons); the CPU path leaves them unrounded, like the HF model.
    """
    _check_expert_shapes(x, w13, w2, topk_ids, topk_weights)
    use_fp8 = w13.dtype == FP8_DTYPE
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)

    def rounded(a: torch.Tensor) -> torch.Tensor:
        if not (use_fp8 and quantize_activations):
            return a
        return dequant_token_groups(*per_token_group_quant_fp8_ref(a, block[1]), group=block[1])

    xf = x.to(torch.float32)
    for e in torch.unique(topk_ids).tolist():
        tok, choice = torch.nonzero(topk_ids == e, as_tuple=True)
        if use_fp8:
            assert w13_scale_inv is not None and w2_scale_inv is not None
            w_gu = block_dequant(w13[e], w13_scale_inv[e], block, torch.float32)
            w_d = block_dequant(w2[e], w2_scale_inv[e], block, torch.float32)
        else:
            w_gu, w_d = w13[e].to(torch.float32), w2[e].to(torch.float32)
        gu = rounded(xf[tok]) @ w_gu.t()  # [n, 2I]
        act = F.silu(gu[:, :inter]) * gu[:, inter:]
        act = act.to(x.dtype).to(torch.float32)  # the kernels store act in x's dtype between GEMMs
        y = rounded(act) @ w_d.t()  # [n, H]
        out.index_add_(0, tok, y * topk_weights[tok, choice].to(torch.float32)[:, None])
    return out.to(x.dtype)


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13_scale_inv: torch.Tensor | None = None,
    w2_scale_inv: torch.Tensor | None = None,
    block: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """Routed-expert output [T, H]: Triton kernels on CUDA, the float32 reference elsewhere.

    x [T, H]; w13 [E, 2I, H] (gate rows then up rows); w2 [E, H, I]; topk_ids [T, k] int32 in [0, E);
    topk_weights [T, k] f32 (already renormalised and scaled). FP8 weights come with
    w13_scale_inv [E, 2I/bn, H/bk] and w2_scale_inv [E, H/bn, I/bk].
    """
    if (w13.dtype == FP8_DTYPE) != (w13_scale_inv is not None) or (w2.dtype == FP8_DTYPE) != (w2_scale_inv is not None):
        raise ValueError("FP8 expert weights need their scale_inv tensors (and BF16 weights must not have them)")
    if x.is_cuda:
        return fused_experts_triton(x, w13, w2, topk_ids, topk_weights, w13_scale_inv, w2_scale_inv, block)
    return fused_experts_ref(x, w13, w2, topk_ids, topk_weights, w13_scale_inv, w2_scale_inv, block)
