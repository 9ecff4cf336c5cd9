"""Block-FP8 GEMV for decode (M <= 8): y [M, N] = x [M, K] @ dequant(w [N, K], 128x128 scales)^T, W8A16.

At decode batch sizes a linear layer is a weight stream: each weight byte is used M times. This kernel
reads the e4m3 weight once with 16-byte vector loads, keeps the activations in bf16 (no quantization
launch, and more accurate than W8A8) and multiplies on CUDA cores in fp32: at M = 1 the 3 TB/s roofline
needs ~3 TFMA/s, a tenth of what the SIMT units issue; at M = 8 (fp8->fp32 conversion + 8 FMAs per byte)
the kernel nears the issue limit, so the GEMV's useful M range is for the H100 sweep to settle. The grid
runs over N only: no split-K reduction launch unless a caller asks for one (`GemvTiles.split_k`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from baleen.kernels.device import sm_count
from baleen.kernels.quant import FP8_DTYPE, block_dequant
from baleen.kernels.split_k import reduce_splits

# Largest number of activation rows the kernel takes: one fp32 accumulator set per row is unrolled.
MAX_GEMV_M = 8
# Weight bytes (= fp8 elements) per thread per row per K step: one 128-bit load.
_VEC = 16


@triton.jit
def _gemv_row(acc, w, x_ptrs, s, cols, row, M, k_left):
    # acc [BLOCK_N, J] += per-16-column dot of w [BLOCK_N, J, 16] (fp32) with activation row `row`, whose
    # first k_left columns from here are real (none when row >= M: the padding rows read nothing).
    # The block scale s [J, 1] is folded into the row of x (J x 16 multiplies) instead of into the
    # weight tile (BLOCK_N x J x 16): every row of a program shares one row of scale blocks.
    k_lim = tl.where(row < M, k_left, 0)
    x = tl.load(x_ptrs, mask=cols < k_lim, other=0.0, eviction_policy="evict_last").to(tl.float32)
    return acc + tl.sum(w * (x * s)[None, :, :], axis=2)


@triton.jit
def _store_row(y_ptrs, acc, offs_n, row, M, N):
    # y [row, offs_n] = the row sums of acc [BLOCK_N, J], for real rows and columns only.
    n_lim = tl.where(row < M, N, 0)
    tl.store(y_ptrs, tl.sum(acc, axis=1).to(y_ptrs.dtype.element_ty), mask=offs_n < n_lim)


@triton.jit
def fp8_block_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ys,
    stride_ym,
    stride_xb,
    stride_wb,
    stride_sb,
    stride_yb,
    SCALE_BLOCK_N: tl.constexpr,
    SCALE_BLOCK_K: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    # One program: BLOCK_N weight rows x one K split. The tile [BLOCK_N, J, 16] gives each thread 16
    # contiguous bytes of a row per (row, chunk): Triton vectorizes that into one ld.global.v4 and lays lanes
    # (and warps, when BLOCK_K >= 512 x num_warps; else warps split rows) along K, so each thread sums its
    # 16-wide dots in registers and the cross-thread reduction runs once, after the K loop.
    # NOTE: BLOCK_N divides SCALE_BLOCK_N and 16 divides SCALE_BLOCK_K (the wrapper checks), so a program
    # reads one row of scale blocks and a 16-column chunk never straddles two K blocks.
    VEC: tl.constexpr = 16
    J: tl.constexpr = BLOCK_K // VEC
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    # A batch of independent GEMVs (e.g. one per attention head) along the grid's third axis.
    b = tl.program_id(2).to(tl.int64)
    x_ptr += b * stride_xb
    w_ptr += b * stride_wb
    s_ptr += b * stride_sb
    y_ptr += b * stride_yb
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    safe_n = tl.where(mask_n, offs_n, 0)  # tail rows re-read row 0: every weight load stays unmasked on N
    chunks = tl.arange(0, J) * VEC  # [J] first column of each 16-column chunk
    cols = chunks[:, None] + tl.arange(0, VEC)[None, :]  # [J, 16]
    w_ptrs = w_ptr + safe_n[:, None, None] * stride_wn + cols[None, :, :]  # [BLOCK_N, J, 16]
    s_row = s_ptr + ((pid_n * BLOCK_N) // SCALE_BLOCK_N) * stride_sn

    k_start = split * k_per_split
    k_len = tl.minimum(K - k_start, k_per_split)  # a multiple of 16: whole chunks are in or out
    a0 = tl.zeros((BLOCK_N, J), dtype=tl.float32)
    a1 = tl.zeros((BLOCK_N, J), dtype=tl.float32)
    a2 = tl.zeros((BLOCK_N, J), dtype=tl.float32)
    a3 = tl.zeros((BLOCK_N, J), dtype=tl.float32)
    a4 = tl.zeros((BLOCK_N, J), dtype=tl.float32)
    a5 = tl.zeros((BLOCK_N, J), dtype=tl.float32)
    a6 = tl.zeros((BLOCK_N, J), dtype=tl.float32)
    a7 = tl.zeros((BLOCK_N, J), dtype=tl.float32)
    if PREFETCH:
        # Software pipelining by hand: the raw fp8 tile of step i+1 is in flight while step i computes
        # (R rows x 16 B per thread), doubling the bytes each thread keeps in flight.
        w_next = tl.load(w_ptrs + k_start, mask=(cols < k_len)[None, :, :], other=0.0, eviction_policy="evict_first")
    for kb in range(0, k_len, BLOCK_K):
        k0 = k_start + kb
        k_left = k_len - kb  # columns of this split still to go
        if PREFETCH:
            w_raw = w_next
            w_next = tl.load(
                w_ptrs + (k0 + BLOCK_K), mask=(cols < k_len - kb - BLOCK_K)[None, :, :], other=0.0,
                eviction_policy="evict_first",
            )  # fmt: skip
        else:
            w_raw = tl.load(w_ptrs + k0, mask=(cols < k_left)[None, :, :], other=0.0, eviction_policy="evict_first")
        w = w_raw.to(tl.float32)  # [BLOCK_N, J, 16]
        s = tl.load(s_row + (k0 + chunks) // SCALE_BLOCK_K, mask=chunks < k_left, other=0.0)[:, None]  # [J, 1]
        x_ptrs = x_ptr + k0 + cols  # [J, 16], row 0
        a0 = _gemv_row(a0, w, x_ptrs, s, cols, 0, M, k_left)
        if M_PAD > 1:
            a1 = _gemv_row(a1, w, x_ptrs + stride_xm, s, cols, 1, M, k_left)
        if M_PAD > 2:
            a2 = _gemv_row(a2, w, x_ptrs + 2 * stride_xm, s, cols, 2, M, k_left)
            a3 = _gemv_row(a3, w, x_ptrs + 3 * stride_xm, s, cols, 3, M, k_left)
        if M_PAD > 4:
            a4 = _gemv_row(a4, w, x_ptrs + 4 * stride_xm, s, cols, 4, M, k_left)
            a5 = _gemv_row(a5, w, x_ptrs + 5 * stride_xm, s, cols, 5, M, k_left)
            a6 = _gemv_row(a6, w, x_ptrs + 6 * stride_xm, s, cols, 6, M, k_left)
            a7 = _gemv_row(a7, w, x_ptrs + 7 * stride_xm, s, cols, 7, M, k_left)

    y_ptrs = y_ptr + split * stride_ys + offs_n  # row 0 of this split's [M, N] output
    _store_row(y_ptrs, a0, offs_n, 0, M, N)
    if M_PAD > 1:
        _store_row(y_ptrs + stride_ym, a1, offs_n, 1, M, N)
    if M_PAD > 2:
        _store_row(y_ptrs + 2 * stride_ym, a2, offs_n, 2, M, N)
        _store_row(y_ptrs + 3 * stride_ym, a3, offs_n, 3, M, N)
    if M_PAD > 4:
        _store_row(y_ptrs + 4 * stride_ym, a4, offs_n, 4, M, N)
        _store_row(y_ptrs + 5 * stride_ym, a5, offs_n, 5, M, N)
        _store_row(y_ptrs + 6 * stride_ym, a6, offs_n, 6, M, N)
        _store_row(y_ptrs + 7 * stride_ym, a7, offs_n, 7, M, N)


@dataclass(frozen=True)
class GemvTiles:
    """Tile shape and launch parameters of one FP8 GEMV launch (block_k = 16 x 32 x num_warps fills a CTA)."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    prefetch: bool = False


def pick_gemv_tiles(m: int, n: int, k: int, num_sms: int = 132) -> GemvTiles:
    """Tiles for an M <= 8 weight stream, from the offline compile (registers, load width); the H100 sweep
    in loadtest/kernel_bench/bench_gemm.py (--gemv-sweep-s) is what should refine it.

    - K step: 4 warps x 32 lanes x 16 bytes = 2048 columns puts every warp on K with one 128-bit load per
      thread per row; a smaller power of two (1024, 512) when it divides K exactly, so no step is partly idle
      (o_proj 16384 -> 2048, gate+up 7168 -> 1024, q_b 1536 -> 512; at 512 the warps split rows instead).
    - The tile must hold >= 2048 weights (16 per thread) or Triton narrows the loads below 128 bits.
    - Rows per thread R = block_n x block_k / 2048 bound the registers: the fp32 weight tile (16 R values)
      stays live across the M activation rows. R <= 8 at M = 1, 4 at M <= 4, 2 at M = 8 keeps the kernel at
      ~96 / ~128 / ~128-168 registers (offline, Triton 3.6 and 3.9, no spills).
    - Loads in flight are not the limit at these sizes (R x 16 B per thread x 4-6 resident CTAs per SM is
      >= 32 KB per SM); filling the SMs is. block_n is the widest tile that still gives ~6 programs per SM
      (at M = 1, measured: 4 rows, or 2 for narrow layers), else ~2 per SM (q_a+kv_a N=2112 -> 2 rows); narrow tiles
      re-read x per program (2M/block_n bytes per weight byte, mostly L1 hits).
    - Split K only where even the narrowest tile leaves SMs idle (< 2 programs per SM): it costs a second,
      tiny reduction launch. No V3 linear needs it at one GPU; TP shards (N / 8) may.
    """
    block_k = min(2048, max(_VEC, triton.next_power_of_2(k)))
    for cand in (2048, 1024, 512):
        if k % cand == 0:
            block_k = cand
            break
    max_rows = 8 if m <= 1 else (4 if m <= 4 else 2)
    full = _VEC * 32 * 4  # weights per tile for 16 per thread at 4 warps
    fits = [bn for bn in (32, 16, 8, 4, 2, 1) if rows_per_thread(bn, block_k) <= max_rows and bn * block_k >= full]
    fits = fits or [1]
    if m == 1:
        # H100 sweep at M = 1 (docs/PERF.md): 4-row tiles win or tie everywhere with enough rows, e.g. dense
        # gate+up 16x1024 0.119 ms -> 4x1024 0.101, o_proj 8x2048 0.065 -> 4x2048 0.051: more, lighter programs
        # keep more loads in flight per SM. Narrow layers drop to 2 rows to keep two programs per SM.
        bn = 4 if triton.cdiv(n, 4) >= 2 * num_sms else 2
        bn = max(bn, full // block_k)  # short rows (K = 128, the absorbed W_UK): more rows keep 16-byte loads
        return GemvTiles(bn, block_k, split_k=1, prefetch=False)
    block_n = next((bn for bn in fits if triton.cdiv(n, bn) >= 6 * num_sms), None)
    if block_n is None:
        block_n = next((bn for bn in fits if triton.cdiv(n, bn) >= 2 * num_sms), fits[-1])
    programs = triton.cdiv(n, block_n)
    split = 1
    if programs < 2 * num_sms:
        split = max(1, min(triton.cdiv(4 * num_sms, programs), triton.cdiv(k, block_k)))
    # Prefetching the next step's raw fp8 tile pays where each thread has few rows (little in flight) and
    # costs registers where it has many (Triton keeps an fp8 tile one byte per register).
    return GemvTiles(block_n, block_k, split_k=split, prefetch=rows_per_thread(block_n, block_k) <= 2)


def rows_per_thread(block_n: int, block_k: int, num_warps: int = 4) -> int:
    """Weight rows each thread holds per K step (one 16-byte chunk each): the register cost of a tile."""
    return max(1, block_n * block_k // (_VEC * 32 * num_warps))


def check_w16_linear_inputs(
    x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor, block: tuple[int, int]
) -> tuple[int, int, int]:
    """(M, N, K) of a W8A16 block-FP8 linear's inputs, or ValueError: the layout checks that the kernels and
    their references share (each kernel's own limits: `fp8_gemv_unsupported`, `fp8_skinny_unsupported`)."""
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"expected 2-D x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    m, k = x.shape
    n, kw = w.shape
    if k != kw:
        raise ValueError(f"x has K={k} but the weight has K={kw}")
    if w.dtype != FP8_DTYPE:
        raise ValueError(f"w must be {FP8_DTYPE}, got {w.dtype}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    bn, bk = block
    if bn <= 0 or bk <= 0:
        raise ValueError(f"the scale block must be positive, got {block}")
    want = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    if tuple(w_scale_inv.shape) != want:
        raise ValueError(f"w_scale_inv has shape {tuple(w_scale_inv.shape)}, expected {want}")
    return m, n, k


def fp8_gemv_unsupported(m: int, k: int, block: tuple[int, int]) -> str | None:
    """Why `fp8_block_gemv` (and the batched one) cannot take M rows of K columns in `block` scale blocks, or
    None when it can: at most MAX_GEMV_M rows (use fp8_block_linear), 16-byte weight loads along K.
    `fp8_block_gemv_ref` has no such limit."""
    if m > MAX_GEMV_M:
        return f"it takes at most {MAX_GEMV_M} rows, got M={m} (use fp8_block_linear)"
    if k % _VEC:
        return f"K={k} is not a multiple of {_VEC} (16-byte weight loads)"
    if block[1] % _VEC:
        return f"the scale block's K side must be a multiple of {_VEC}, got {block}"
    return None


def _check_gemv_inputs(
    x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor, block: tuple[int, int]
) -> tuple[int, int, int]:
    m, n, k = check_w16_linear_inputs(x, w, w_scale_inv, block)
    why = fp8_gemv_unsupported(m, k, block)
    if why is not None:
        raise ValueError(f"fp8_block_gemv cannot take this shape: {why}")
    return m, n, k


def fp8_block_gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype | None = None,
    tiles: GemvTiles | None = None,
) -> torch.Tensor:
    """Decode-sized block-FP8 linear without activation quantization: y = x @ dequant(w, w_scale_inv)^T.

    x [M, K] bf16 (fp16/fp32 also work; fp32 is what the CPU interpreter tests use), M <= MAX_GEMV_M;
    w [N, K] e4m3; w_scale_inv [ceil(N/bn), ceil(K/bk)] fp32 for block (bn, bk). N and K need not be
    multiples of the block (edge blocks are partial); K must be a multiple of 16. Returns [M, N] in
    out_dtype (default x.dtype), accumulated in fp32. `tiles` overrides `pick_gemv_tiles` (benchmarks
    sweep it); a tiles.block_n that does not divide bn is lowered to one that does.
    """
    m, n, k = _check_gemv_inputs(x, w, w_scale_inv, block)
    out_dtype = out_dtype or x.dtype
    if m == 0:
        return torch.empty((0, n), dtype=out_dtype, device=x.device)
    if x.stride(1) != 1:
        x = x.contiguous()
    if w.stride(1) != 1:
        w = w.contiguous()
    w_scale_inv = w_scale_inv.to(torch.float32)
    t = tiles or pick_gemv_tiles(m, n, k, sm_count(x.device))
    if t.block_k < _VEC or t.block_k & (t.block_k - 1) or t.block_n < 1 or t.block_n & (t.block_n - 1):
        raise ValueError(f"block_n and block_k must be powers of two (block_k >= {_VEC}), got {t}")
    block_n = t.block_n
    while block[0] % block_n:  # one row of scale blocks per program
        block_n //= 2
    # Split K on whole steps, so every split starts 16-aligned; no split is empty.
    k_steps = triton.cdiv(k, t.block_k)
    split = max(1, min(t.split_k, k_steps))
    k_per_split = triton.cdiv(k_steps, split) * t.block_k
    split = triton.cdiv(k, k_per_split)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    # Split K writes fp32 partials [split, M, N]; one more launch sums them in split order and casts.
    y = out[None] if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    m_pad = 1 if m == 1 else (2 if m == 2 else (4 if m <= 4 else 8))
    grid = (triton.cdiv(n, block_n), split, 1)
    fp8_block_gemv_kernel[grid](
        x, w, w_scale_inv, y, m, n, k, k_per_split,
        x.stride(0), w.stride(0), w_scale_inv.stride(0), y.stride(0), y.stride(1), 0, 0, 0, 0,
        SCALE_BLOCK_N=block[0], SCALE_BLOCK_K=block[1], M_PAD=m_pad, BLOCK_N=block_n, BLOCK_K=t.block_k,
        PREFETCH=t.prefetch, num_warps=t.num_warps, num_stages=1,
    )  # fmt: skip
    if split > 1:
        reduce_splits(y, out)
    return out


def fp8_block_gemv_batched(
    x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """One GEMV per batch entry b (an attention head): y[:, b] = x[:, b] @ dequant(w[b], w_scale_inv[b])^T.

    x [M, B, K] (any strides with unit K stride, M <= MAX_GEMV_M), w [B, N, K] e4m3 (unit K stride; rows may
    be strided, e.g. a slice of kv_b_proj), w_scale_inv [B, ceil(N/bn), ceil(K/bk)]. Returns [M, B, N] in
    x's dtype, in one launch and without split K.
    """
    if x.dim() != 3 or w.dim() != 3 or w_scale_inv.dim() != 3 or x.shape[1] != w.shape[0]:
        raise ValueError(f"expected x [M, B, K], w [B, N, K] and scales [B, ., .], got {tuple(x.shape)}, "
                         f"{tuple(w.shape)} and {tuple(w_scale_inv.shape)}")  # fmt: skip
    m, heads, k = x.shape
    n = w.shape[1]
    _check_gemv_inputs(x[:, 0], w[0], w_scale_inv[0], block)
    out = torch.empty((m, heads, n), dtype=x.dtype, device=x.device)
    if m == 0 or heads == 0:
        return out
    if x.stride(2) != 1 or w.stride(2) != 1 or w_scale_inv.stride(2) != 1:
        raise ValueError("x, w and w_scale_inv must be contiguous along K")
    t = pick_gemv_tiles(m, n * heads, k, sm_count(x.device))
    block_n = t.block_n
    while block[0] % block_n or block_n > triton.next_power_of_2(n):
        block_n //= 2
    m_pad = 1 if m == 1 else (2 if m == 2 else (4 if m <= 4 else 8))
    fp8_block_gemv_kernel[(triton.cdiv(n, block_n), 1, heads)](
        x, w, w_scale_inv, out, m, n, k, k,
        x.stride(0), w.stride(1), w_scale_inv.stride(1), 0, out.stride(0),
        x.stride(1), w.stride(0), w_scale_inv.stride(0), out.stride(1),
        SCALE_BLOCK_N=block[0], SCALE_BLOCK_K=block[1], M_PAD=m_pad, BLOCK_N=block_n, BLOCK_K=t.block_k,
        PREFETCH=t.prefetch, num_warps=t.num_warps, num_stages=1,
    )  # fmt: skip
    return out


def fp8_block_gemv_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Pure-torch twin of `fp8_block_gemv`: dequantize the weight and multiply in float32 (any M, K, block)."""
    check_w16_linear_inputs(x, w, w_scale_inv, block)
    return dequant_linear_ref(x, w, w_scale_inv, block, out_dtype)


def dequant_linear_ref(
    x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor, block: tuple[int, int], out_dtype: torch.dtype | None
) -> torch.Tensor:
    """x @ dequant(w)^T in float32, cast to out_dtype (default x's): what every W8A16 kernel should give."""
    y = x.to(torch.float32) @ block_dequant(w, w_scale_inv, block, torch.float32).t()
    return y.to(out_dtype or x.dtype)
