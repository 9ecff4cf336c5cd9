"""Block-FP8 W8A8 GEMMs in Triton: out [M, N] = dequant(x_fp8) @ dequant(w_fp8)^T.

The activations come quantized per token per 128 columns (`kernels/act_quant.py`); the weights come from the
checkpoint as e4m3 with one `weight_scale_inv` per 128x128 block (see `kernels/quant.py`). The kernels keep
fp32 accumulators and multiply each K-block's partial product by `a_scale[row] * w_scale[col block]`. Few-token
launches split K (`kernels/split_k.py`); a tiled copy of the weight (`TiledFp8Weight`) feeds the TMA 8 KB
contiguous boxes. The cuBLAS path is `kernels/fp8_cublas.py`; the model calls `kernels/fp8_linear.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from baleen.kernels.act_quant import dequant_token_groups
from baleen.kernels.device import sm_count
from baleen.kernels.quant import FP8_DTYPE, block_dequant
from baleen.kernels.split_k import SplitK, store_splits

# ---------------------------------------------------------------------------------------------------------
# The tiled weight layout for few-token GEMMs
# ---------------------------------------------------------------------------------------------------------

TILE_N = 64  # weight rows a tile of `TiledFp8Weight`
TILE_K = 128  # weight columns a tile: one scale block


@dataclass(frozen=True)
class TiledFp8Weight:
    """An e4m3 weight [N, K] stored tile by tile: data [ceil(N/64) * ceil(K/128) * 64, 128], where tile
    (n, kb) (rows 64n.., columns 128kb..) fills rows (n * ceil(K/128) + kb) * 64 onwards, zero-padded past N
    and K. The few-token GEMM reads each weight step as one 8 KB contiguous TMA box and a program's steps
    follow each other in memory; on the H100 that streamed 5-8 points more of HBM bandwidth than [64, 128]
    boxes of the row-major weight, whose 64 rows lie K bytes apart (docs/PERF.md, sixth pass).
    """

    data: torch.Tensor
    n: int
    k: int

    @property
    def num_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def tile_fp8_weight(w: torch.Tensor) -> TiledFp8Weight:
    """The tiled copy of an e4m3 weight [N, K] (the original is left as it is)."""
    if w.dim() != 2 or w.dtype != FP8_DTYPE:
        raise ValueError(f"tile_fp8_weight wants an [N, K] {FP8_DTYPE} weight, got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    tn, tk = triton.cdiv(n, TILE_N), triton.cdiv(k, TILE_K)
    padded = torch.zeros((tn * TILE_N, tk * TILE_K), dtype=torch.uint8, device=w.device)  # bytes: few fp8 ops
    padded[:n, :k] = w.view(torch.uint8)
    tiles = padded.view(tn, TILE_N, tk, TILE_K).permute(0, 2, 1, 3).contiguous()
    return TiledFp8Weight(tiles.view(-1, TILE_K).view(FP8_DTYPE), n, k)


def untile_fp8_weight(t: TiledFp8Weight) -> torch.Tensor:
    """The row-major [N, K] weight back from its tiled copy (tests)."""
    tn, tk = triton.cdiv(t.n, TILE_N), triton.cdiv(t.k, TILE_K)
    tiles = t.data.view(torch.uint8).view(tn, tk, TILE_N, TILE_K).permute(0, 2, 1, 3)
    return tiles.reshape(tn * TILE_N, tk * TILE_K)[: t.n, : t.k].contiguous().view(FP8_DTYPE)


# ---------------------------------------------------------------------------------------------------------
# Block-scaled GEMM
# ---------------------------------------------------------------------------------------------------------


# NOTE: the token count and the split sizes derived from it are not specialised: one compile per tile shape
# serves every M (kernels/act_quant.py). The partials' stride M * N keeps its % 16 class (that of N): vector stores.
@triton.jit(do_not_specialize=["M", "k_blocks_per_split", "num_splits"])
def w8a8_block_fp8_matmul_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    out_ptr,
    part_ptr,
    counter_ptr,
    M,
    N,
    K,
    k_blocks_per_split,
    num_splits,
    stride_am,
    stride_asm,
    stride_bn,
    stride_bsn,
    stride_ps,
    SCALE_BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
):
    # out [M, N] = sum over K blocks of (A_blk @ B_blk^T) * a_scale[:, kb] * b_scale[nb, kb]; a program owns
    # one [BLOCK_M, BLOCK_N] tile and one split of its K blocks.
    # NOTE: BLOCK_K equals the scale block along K, so every K step has exactly one scale per row / column.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row tiles walk the same column tiles together, so B tiles are reused in L2.
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Clamped row/col indices keep edge-tile loads in bounds without masking every load on the M/N axes.
    safe_m = tl.where(mask_m, offs_m, 0)
    safe_n = tl.where(mask_n, offs_n, 0)
    a_ptrs = a_ptr + safe_m[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + safe_n[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    as_ptrs = as_ptr + safe_m * stride_asm  # [BLOCK_M]

    kb_start = split * k_blocks_per_split
    kb_end = tl.minimum(kb_start + k_blocks_per_split, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bs_ptrs = bs_ptr + (safe_n // SCALE_BLOCK_N) * stride_bsn  # [BLOCK_N]
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs + k0, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs + k0, mask=k_ok[:, None], other=0.0)
        a_s = tl.load(as_ptrs + kb)
        b_s = tl.load(bs_ptrs + kb)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]

    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]  # int64: M x N passes 2^31 from ~58k tokens
    store_splits(acc, out_ptr, part_ptr, counter_ptr + pid, offs, mask_m[:, None] & mask_n[None, :], split,
                 num_splits, stride_ps, FUSED_REDUCE)


@triton.jit(do_not_specialize=["M", "k_blocks_per_split", "num_splits"])  # as above
def w8a8_block_fp8_matmul_tma_kernel(
    a_desc,
    as_ptr,
    b_desc,
    bs_ptr,
    out_ptr,
    part_ptr,
    counter_ptr,
    M,
    N,
    K,
    k_blocks_per_split,
    num_splits,
    stride_asm,
    stride_bsn,
    stride_ps,
    SCALE_BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    TILED_B: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
):
    # The same product as w8a8_block_fp8_matmul_kernel with both operands' tiles fetched by the TMA (a_desc
    # [M, K] boxes [BLOCK_M, BLOCK_K]; out-of-bounds rows and columns read as zeros), so a few threads keep
    # num_stages tiles in flight. b_desc is the weight [N, K] in boxes [BLOCK_N, BLOCK_K], or with TILED_B the
    # weight in `TiledFp8Weight` order (BLOCK_N = its TILE_N rows), where box (n, kb) is row (n * KB + kb) * BLOCK_N
    # of a [rows, BLOCK_K] matrix. SWAP_AB multiplies W @ x^T: the weight rows fill the MMA's M side (64 a
    # warpgroup on Hopper) and the few tokens its N side (8 up).
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    as_ptrs = as_ptr + tl.where(mask_m, offs_m, 0) * stride_asm  # [BLOCK_M]
    bs_ptrs = bs_ptr + (tl.where(mask_n, offs_n, 0) // SCALE_BLOCK_N) * stride_bsn  # [BLOCK_N]

    num_kb = tl.cdiv(K, BLOCK_K)
    kb_start = split * k_blocks_per_split
    kb_end = tl.minimum(kb_start + k_blocks_per_split, num_kb)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        a = a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])  # [BLOCK_M, BLOCK_K]
        if TILED_B:
            b = b_desc.load([(pid_n * num_kb + kb) * BLOCK_N, 0])  # [BLOCK_N, BLOCK_K], 8 KB contiguous
        else:
            b = b_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])  # [BLOCK_N, BLOCK_K]
        a_s = tl.load(as_ptrs + kb)
        b_s = tl.load(bs_ptrs + kb)
        if SWAP_AB:
            acc += tl.dot(b, a.T) * b_s[:, None] * a_s[None, :]
        else:
            acc += tl.dot(a, b.T) * a_s[:, None] * b_s[None, :]

    if SWAP_AB:
        offs = offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]  # int64 as in w8a8_block_fp8_matmul_kernel
        mask = mask_n[:, None] & mask_m[None, :]
    else:
        offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
    store_splits(acc, out_ptr, part_ptr, counter_ptr + pid, offs, mask, split, num_splits, stride_ps, FUSED_REDUCE)


@dataclass(frozen=True)
class GemmTiles:
    """Tile shape and launch parameters of one block-FP8 GEMM launch."""

    block_m: int
    block_n: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 4
    # Operand tiles fetched by the TMA (`w8a8_block_fp8_matmul_tma_kernel`; group_m unused), and with swap_ab
    # the product taken as W @ x^T, block_n weight rows on the MMA's M side.
    tma: bool = False
    swap_ab: bool = False


def pick_gemm_tiles(m: int, n: int, k: int, num_sms: int = 132) -> GemmTiles:
    """Tile heuristic from H100 sweeps (loadtest/kernel_bench/bench_kernels.py --sweep-s): narrow tiles +
    split-K while the weight stream dominates (M <= 64), then 64x128 tiles with 4 warps, which beat 128x128 /
    8 warps at every large M measured (the per-K-block scale multiply keeps the 128x128 accumulator path near
    255 registers)."""
    k_blocks = triton.cdiv(k, 128)
    if m <= 64:
        block_m = 16 if m <= 16 else 64
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 64)
        # About two programs per SM to keep every SM streaming weights, but at least 4 K blocks per split.
        split = max(1, min(triton.cdiv(2 * num_sms, tiles), k_blocks // 4, 16))
        return GemmTiles(block_m, 64, split_k=split, num_warps=4, num_stages=4)
    tiles = triton.cdiv(m, 64) * triton.cdiv(n, 128)
    split = max(1, min(num_sms // tiles, k_blocks // 8, 8)) if m <= 256 else 1
    return GemmTiles(64, 128, split_k=split, num_warps=4, num_stages=4)


def fp8_gemm_unsupported(block: tuple[int, int]) -> str | None:
    """Why the W8A8 GEMMs (Triton, tiled, cuBLAS) cannot take weights quantized in `block` (bn, bk) blocks, or
    None when they can: each K step is one 128-column activation group and one weight scale. The references
    (`w8a8_block_fp8_matmul_ref`, and `fp8_block_linear` off CUDA) take any block."""
    if block[1] != TILE_K:
        return f"weight_block_size={list(block)} has a K side of {block[1]}, not {TILE_K}"
    return None


def check_gemm_limits(block: tuple[int, int]) -> None:
    """Raise `fp8_gemm_unsupported`'s reason as a ValueError (every W8A8 GEMM wrapper, before its launch)."""
    why = fp8_gemm_unsupported(block)
    if why is not None:
        raise ValueError(f"the FP8 GEMM kernels cannot take this shape: {why} (w8a8_block_fp8_matmul_ref can)")


def check_gemm_inputs(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor | TiledFp8Weight,
    w_scale_inv: torch.Tensor,
    block: tuple[int, int],
) -> tuple[int, int, int]:
    """(M, N, K) of a W8A8 GEMM's operands, or a ValueError naming the operand whose shape or dtype is wrong."""
    w_shape, w_dtype = ((w_fp8.n, w_fp8.k), w_fp8.data.dtype) if isinstance(w_fp8, TiledFp8Weight) else (w_fp8.shape, w_fp8.dtype)
    if x_fp8.dim() != 2 or len(w_shape) != 2:
        raise ValueError(f"expected 2-D x [M, K] and w [N, K], got {tuple(x_fp8.shape)} and {tuple(w_shape)}")
    m, k = x_fp8.shape
    n, kw = w_shape
    if k != kw:
        raise ValueError(f"x has K={k} but the weight has K={kw}")
    if x_fp8.dtype != FP8_DTYPE or w_dtype != FP8_DTYPE:
        raise ValueError(f"x and w must be {FP8_DTYPE}, got {x_fp8.dtype} and {w_dtype}")
    bn, bk = block
    if tuple(x_scale.shape) != (m, triton.cdiv(k, bk)):
        raise ValueError(f"x_scale has shape {tuple(x_scale.shape)}, expected {(m, triton.cdiv(k, bk))}")
    if tuple(w_scale_inv.shape) != (triton.cdiv(n, bn), triton.cdiv(k, bk)):
        raise ValueError(f"w_scale_inv has shape {tuple(w_scale_inv.shape)}, expected {(triton.cdiv(n, bn), triton.cdiv(k, bk))}")
    return m, n, k


def w8a8_block_fp8_matmul(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
    tiles: GemmTiles | None = None,
    fused_reduce: bool = True,
) -> torch.Tensor:
    """Block-scaled FP8 GEMM: out [M, N] = dequant(x_fp8, x_scale) @ dequant(w_fp8, w_scale_inv)^T.

    x_fp8 [M, K] e4m3 with x_scale [M, ceil(K/128)] fp32 (per token, per 128 columns);
    w_fp8 [N, K] e4m3 with w_scale_inv [ceil(N/bn), ceil(K/128)] fp32. N and K need not be multiples of
    the block. `tiles` overrides the heuristic (benchmarks sweep it); `fused_reduce=False` sums split-K
    partials in a second launch instead of in the kernel (see `SplitK`).
    """
    m, n, k = check_gemm_inputs(x_fp8, x_scale, w_fp8, w_scale_inv, block)
    check_gemm_limits(block)
    if x_fp8.stride(1) != 1:
        x_fp8 = x_fp8.contiguous()
    if w_fp8.stride(1) != 1:
        w_fp8 = w_fp8.contiguous()
    x_scale = x_scale.to(torch.float32).contiguous()
    w_scale_inv = w_scale_inv.to(torch.float32).contiguous()
    if m == 0:
        return torch.empty((0, n), dtype=out_dtype, device=x_fp8.device)
    t = tiles or pick_gemm_tiles(m, n, k, sm_count(x_fp8.device))
    if t.tma and _tma_ok(x_fp8) and _tma_ok(w_fp8):
        return _tma_gemm(x_fp8, x_scale, w_fp8, w_scale_inv, n, block, out_dtype, t, fused_reduce)
    k_per_split, split = _split_k(k, t.split_k)
    num_tiles = triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n)
    out = torch.empty((m, n), dtype=out_dtype, device=x_fp8.device)
    sk = SplitK(split, num_tiles, m, n, out, fused_reduce)
    w8a8_block_fp8_matmul_kernel[(num_tiles, split)](
        x_fp8, x_scale, w_fp8, w_scale_inv, out, sk.partials, sk.counters, m, n, k, k_per_split, split,
        x_fp8.stride(0), x_scale.stride(0), w_fp8.stride(0), w_scale_inv.stride(0), sk.partials.stride(0),
        SCALE_BLOCK_N=block[0], BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=128, GROUP_M=t.group_m,
        FUSED_REDUCE=sk.fused, num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    sk.finish(out)
    return out


def pick_tiled_tiles(m: int, n: int, k: int, num_sms: int = 132) -> GemmTiles:
    """Tiles of the tiled-weight GEMM, from the H100 sweep (docs/PERF.md, sixth pass): W @ x^T with 64 weight
    rows a program, the tokens in an 8- or 16-wide MMA side, 4 stages, and split K to about two programs an SM
    (none on the wide layers: q_b, gate+up)."""
    block_m = 8 if m <= 8 else 16 if m <= 16 else 32 if m <= 32 else 64
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, TILE_N)
    split = max(1, min(triton.cdiv(2 * num_sms, tiles), triton.cdiv(k, TILE_K) // 4, 16))
    return GemmTiles(block_m, TILE_N, split_k=split, num_warps=4, num_stages=4, tma=True, swap_ab=True)


def w8a8_block_fp8_matmul_tiled(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w: TiledFp8Weight,
    w_scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
    tiles: GemmTiles | None = None,
) -> torch.Tensor:
    """`w8a8_block_fp8_matmul` over a `TiledFp8Weight`: same operands otherwise, same result up to the
    accumulation order. x_fp8 [M, K] needs a 16-byte aligned base and K % 16 == 0 (the TMA reads it);
    `tiles` must have block_n = TILE_N and tma=True (default: `pick_tiled_tiles`)."""
    m, n, k = check_gemm_inputs(x_fp8, x_scale, w, w_scale_inv, block)
    check_gemm_limits(block)
    if x_fp8.stride(1) != 1:
        x_fp8 = x_fp8.contiguous()
    if not _tma_ok(x_fp8):
        raise ValueError("the tiled GEMM reads x through the TMA: x needs a 16-byte aligned base and K % 16 == 0")
    t = tiles or pick_tiled_tiles(m, n, k, sm_count(x_fp8.device))
    if t.block_n != TILE_N or not t.tma:
        raise ValueError(f"the tiled GEMM needs block_n={TILE_N} and tma=True, got {t}")
    x_scale = x_scale.to(torch.float32).contiguous()
    w_scale_inv = w_scale_inv.to(torch.float32).contiguous()
    if m == 0:
        return torch.empty((0, n), dtype=out_dtype, device=x_fp8.device)
    return _tma_gemm(x_fp8, x_scale, w, w_scale_inv, n, block, out_dtype, t, True)


def _split_k(k: int, split_k: int) -> tuple[int, int]:
    """(K blocks a split, splits) for at most split_k splits of ceil(K/128) blocks, none of them empty."""
    k_blocks = triton.cdiv(k, TILE_K)
    k_per_split = triton.cdiv(k_blocks, max(1, min(split_k, k_blocks)))
    return k_per_split, triton.cdiv(k_blocks, k_per_split)


def _tma_gemm(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor | TiledFp8Weight,
    w_scale_inv: torch.Tensor,
    n: int,
    block: tuple[int, int],
    out_dtype: torch.dtype,
    t: GemmTiles,
    fused_reduce: bool,
) -> torch.Tensor:
    """Launch `w8a8_block_fp8_matmul_tma_kernel` on checked operands (w row-major [N, K] or tiled)."""
    m, k = x_fp8.shape
    k_per_split, split = _split_k(k, t.split_k)
    num_tiles = triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n)
    out = torch.empty((m, n), dtype=out_dtype, device=x_fp8.device)
    sk = SplitK(split, num_tiles, m, n, out, fused_reduce)
    tiled = isinstance(w, TiledFp8Weight)
    b = w.data if isinstance(w, TiledFp8Weight) else w
    w8a8_block_fp8_matmul_tma_kernel[(num_tiles, split)](
        TensorDescriptor.from_tensor(x_fp8, [t.block_m, TILE_K]), x_scale,
        TensorDescriptor.from_tensor(b, [t.block_n, TILE_K]), w_scale_inv,
        out, sk.partials, sk.counters, m, n, k, k_per_split, split,
        x_scale.stride(0), w_scale_inv.stride(0), sk.partials.stride(0),
        SCALE_BLOCK_N=block[0], BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=TILE_K, SWAP_AB=t.swap_ab,
        TILED_B=tiled, FUSED_REDUCE=sk.fused, num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    sk.finish(out)
    return out


def _tma_ok(t: torch.Tensor) -> bool:
    """Whether the TMA can address a 2-D fp8 tensor: 16-byte aligned base and row stride (K % 16 == 0)."""
    return t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0


def w8a8_block_fp8_matmul_ref(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Pure-torch twin of `w8a8_block_fp8_matmul`: dequantize both operands and multiply in float32."""
    check_gemm_inputs(x_fp8, x_scale, w_fp8, w_scale_inv, block)
    a = dequant_token_groups(x_fp8, x_scale.to(torch.float32), block[1])
    w = block_dequant(w_fp8, w_scale_inv, block, torch.float32)
    return (a @ w.t()).to(out_dtype)
