"""Block-FP8 W8A16 GEMM for a few tokens (2 <= M <= 32) on tensor cores: y [M, N] = x [M, K] @ dequant(w)^T.

Between the one-token GEMV (`fp8_gemv`, CUDA cores: every weight byte costs M FMAs, which at M >= 4 is more
than the SMs issue) and the W8A8 GEMM (an activation-quantization launch, 16-row MMA tiles, a split-K
reduction launch), this kernel streams the e4m3 weight once, converts each tile to the activation dtype in
registers and multiplies on tensor cores with the weight on the MMA's M side and the few tokens on its N
side ("swap AB": y^T = W x^T). The activations stay bf16 (no quantization launch, W8A16 numerics like the
GEMV); the 128x128 block scale multiplies each K step's partial product, one scale per weight row.
The grid runs over N tiles x K splits; several splits write float32 partials that each tile's last program sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from baleen.kernels.device import sm_count
from baleen.kernels.fp8_gemv import check_w16_linear_inputs, dequant_linear_ref
from baleen.kernels.split_k import SplitK, store_splits

# Most activation rows one launch takes (the MMA's N side; padded to 16, the smallest tl.dot side).
MAX_SKINNY_M = 32


# NOTE: token-count ints are not specialised: one compile per tile shape serves every M (act_quant.py).
@triton.jit(do_not_specialize=["M", "k_per_split", "num_splits"])
def fp8_skinny_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    out_ptr,
    part_ptr,
    counter_ptr,
    M,
    N,
    K,
    k_per_split,
    num_splits,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ps,
    SCALE_BLOCK_N: tl.constexpr,
    SCALE_BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_UNROLL: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
):
    # One program: BLOCK_N weight rows x one K split; acc [BLOCK_N, BLOCK_M] = W_tile x^T.
    # NOTE: BLOCK_K divides SCALE_BLOCK_K (the wrapper checks), so a K step has one scale per weight row.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_m = offs_m < M
    safe_n = tl.where(mask_n, offs_n, 0)  # tail rows re-read row 0: weight loads stay unmasked on N
    w_ptrs = w_ptr + safe_n[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K] e4m3
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]  # [BLOCK_K, BLOCK_M]: x^T
    s_ptrs = s_ptr + (safe_n // SCALE_BLOCK_N) * stride_sn  # [BLOCK_N]: this row's scale blocks
    k_start = split * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # K_UNROLL consecutive K steps a loop trip: each weight row is read in runs of K_UNROLL x BLOCK_K bytes.
    for k0 in range(k_start, k_end, BLOCK_K * K_UNROLL):
        for j in tl.static_range(K_UNROLL):
            kj = k0 + j * BLOCK_K
            k_ok = offs_k < k_end - kj
            w = tl.load(w_ptrs + kj, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs + kj, mask=k_ok[:, None] & mask_m[None, :], other=0.0, eviction_policy="evict_last")
            # [BLOCK_N]; a step past the split's end (its weights masked to 0) re-reads the last scale in bounds
            s = tl.load(s_ptrs + tl.minimum(kj, k_end - 1) // SCALE_BLOCK_K)
            acc += tl.dot(w.to(x.dtype), x) * s[:, None]
    offs = offs_m[None, :] * N + offs_n[:, None]  # [BLOCK_N, BLOCK_M] in the [M, N] output
    store_splits(acc, out_ptr, part_ptr, counter_ptr + pid_n, offs, mask_n[:, None] & mask_m[None, :], split,
                 num_splits, stride_ps, FUSED_REDUCE)


@dataclass(frozen=True)
class SkinnyTiles:
    """Tile shape and launch parameters of one skinny-GEMM launch."""

    block_n: int
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    k_unroll: int = 1


def pick_skinny_tiles(m: int, n: int, k: int, num_sms: int = 132) -> SkinnyTiles:
    """Tiles for an M <= 32 weight stream, from the H100 sweep at M = 32 (bench_skinny.py, docs/PERF.md):
    long rows (K >= 4096) take 32-row programs of 2 warps reading two 128-column steps a trip (256-byte runs
    of each weight row) over 3 stages; short rows (q_b, K = 1536) 64-row programs, one step a trip. K is split
    until there are ~2 programs an SM, keeping >= 4 trips a split."""
    if k >= 4096:
        block_n, warps, unroll = 32, 2, 2
    else:
        block_n, warps, unroll = 64, 4, 1
    tiles = triton.cdiv(n, block_n)
    trips = triton.cdiv(k, 128 * unroll)
    split = max(1, min(triton.cdiv(2 * num_sms, tiles), trips // 4, 16))
    return SkinnyTiles(block_n, 128, split_k=split, num_warps=warps, num_stages=3, k_unroll=unroll)


def fp8_skinny_unsupported(m: int, block: tuple[int, int]) -> str | None:
    """Why `fp8_skinny_gemm` cannot take M rows in `block` scale blocks, or None when it can: at most
    MAX_SKINNY_M rows, one scale block per K step of a power-of-two width. `fp8_skinny_gemm_ref` has no such
    limit."""
    if m > MAX_SKINNY_M:
        return f"it takes at most {MAX_SKINNY_M} rows, got M={m} (use fp8_block_linear)"
    if block[1] < 16 or block[1] & (block[1] - 1):
        return f"the scale block's K side must be a power of two >= 16, got {block}"
    return None


def _check_inputs(
    x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor, block: tuple[int, int]
) -> tuple[int, int, int]:
    m, n, k = check_w16_linear_inputs(x, w, w_scale_inv, block)
    why = fp8_skinny_unsupported(m, block)
    if why is not None:
        raise ValueError(f"fp8_skinny_gemm cannot take this shape: {why}")
    return m, n, k


def fp8_skinny_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype | None = None,
    tiles: SkinnyTiles | None = None,
    fused_reduce: bool = True,
) -> torch.Tensor:
    """y = x @ dequant(w, w_scale_inv)^T for M <= MAX_SKINNY_M rows, W8A16 on tensor cores.

    x [M, K] bf16 (fp16 also; fp32 is for the CPU interpreter tests), w [N, K] e4m3, w_scale_inv
    [ceil(N/bn), ceil(K/bk)] fp32. N and K need not be multiples of the block. Returns [M, N] in out_dtype
    (default x.dtype), accumulated in fp32. `tiles` overrides `pick_skinny_tiles` (benchmarks sweep it);
    `fused_reduce=False` sums split-K partials in a second launch instead of in the kernel (`SplitK`).
    """
    m, n, k = _check_inputs(x, w, w_scale_inv, block)
    out_dtype = out_dtype or x.dtype
    if m == 0:
        return torch.empty((0, n), dtype=out_dtype, device=x.device)
    if x.stride(1) != 1:
        x = x.contiguous()
    if w.stride(1) != 1:
        w = w.contiguous()
    w_scale_inv = w_scale_inv.to(torch.float32)
    t = tiles or pick_skinny_tiles(m, n, k, sm_count(x.device))
    block_k = min(t.block_k, block[1])  # one scale block per K step
    if block_k < 16 or block_k & (block_k - 1) or t.block_n < 16 or t.block_n & (t.block_n - 1):
        raise ValueError(f"block_n and block_k must be powers of two >= 16, got {t}")
    k_steps = triton.cdiv(k, block_k)
    split = max(1, min(t.split_k, k_steps))
    unroll = max(1, t.k_unroll)
    k_per_split = triton.cdiv(k_steps, split * unroll) * unroll * block_k  # whole loop trips a split
    split = triton.cdiv(k, k_per_split)  # no split is empty
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    num_tiles = triton.cdiv(n, t.block_n)
    sk = SplitK(split, num_tiles, m, n, out, fused_reduce)
    block_m = max(16, triton.next_power_of_2(m))
    fp8_skinny_gemm_kernel[(num_tiles, split)](
        x, w, w_scale_inv, out, sk.partials, sk.counters, m, n, k, k_per_split, split,
        x.stride(0), w.stride(0), w_scale_inv.stride(0), sk.partials.stride(0),
        SCALE_BLOCK_N=block[0], SCALE_BLOCK_K=block[1], BLOCK_M=block_m, BLOCK_N=t.block_n, BLOCK_K=block_k,
        K_UNROLL=unroll, FUSED_REDUCE=sk.fused, num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    sk.finish(out)
    return out


def fp8_skinny_gemm_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Pure-torch twin of `fp8_skinny_gemm`: dequantize the weight and multiply in float32 (any M, block)."""
    check_w16_linear_inputs(x, w, w_scale_inv, block)
    return dequant_linear_ref(x, w, w_scale_inv, block, out_dtype)
