"""Block-FP8 W8A8 linear layers: per-token-group activation quantization and the block-scaled GEMM.

Activations are quantized on the fly to e4m3 with one scale per (row, 128 columns); weights come from the
checkpoint as e4m3 with one `weight_scale_inv` per 128x128 block (see `kernels/quant.py`). The GEMM keeps
fp32 accumulators and multiplies each K-block's partial product by `a_scale[row] * w_scale[col block]`.
On Hopper, cuBLASLt (CUDA >= 12.9) runs the same recipe natively through `torch._scaled_mm`
(`w8a8_block_fp8_matmul_cublas`); `fp8_block_linear` switches to it from a caller-chosen M.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from baleen.kernels.device import sm_count
from baleen.kernels.quant import FP8_DTYPE, FP8_MAX, block_dequant

# Smallest amax a group may have, so an all-zero group gets a finite scale.
AMAX_EPS = 1e-10
# Elements per program of the split-K reduction.
_REDUCE_BLOCK = 1024


# ---------------------------------------------------------------------------------------------------------
# Per-token-group quantization
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def round_to_e4m3_mantissa(x):
    """Round fp32 values to 3 mantissa bits (nearest, ties to even) so the fp8 cast below is exact."""
    # NOTE: the Triton interpreter's fp32->fp8 cast drops the carry when rounding overflows the mantissa
    # (124.3 becomes 64); casting a value already on the e4m3 grid is exact on the GPU and in the interpreter.
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def quantize_groups(x, FP8_MAX_C: tl.constexpr, EPS: tl.constexpr):
    """x [G, GROUP] fp32 -> (values on the e4m3 grid [G, GROUP] fp32, scales [G]), scale = max(amax, EPS) / 448:
    the one definition of the per-token-group recipe (the quantization kernel and the norm that writes FP8)."""
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), EPS) / FP8_MAX_C
    return round_to_e4m3_mantissa(tl.clamp(x / scale[:, None], -FP8_MAX_C, FP8_MAX_C)), scale


@triton.jit
def per_token_group_quant_fp8_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    num_groups,
    stride_xm,
    stride_qm,
    stride_sm,
    stride_sg,
    GROUP: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr,
    FP8_MAX_C: tl.constexpr,
    EPS: tl.constexpr,
):
    # One program: one row, GROUPS_PER_PROG consecutive groups of GROUP columns. Rows >= M are padding
    # (cuBLAS wants M a multiple of 4): they read nothing and store zeros with the smallest scale.
    row = tl.program_id(0)
    g0 = tl.program_id(1) * GROUPS_PER_PROG
    groups = g0 + tl.arange(0, GROUPS_PER_PROG)  # [G]
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [G, GROUP]
    mask = (groups[:, None] < num_groups) & (cols < K)
    k_read = tl.where(row < M, K, 0)  # padding rows read no columns
    x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < k_read, other=0.0).to(tl.float32)
    q, scale = quantize_groups(x, FP8_MAX_C, EPS)
    tl.store(q_ptr + row * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sm + groups * stride_sg, scale, mask=groups < num_groups)


def per_token_group_quant_fp8(
    x: torch.Tensor, group: int = 128, column_major_scales: bool = False, pad_rows_to: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [M, K] to e4m3 with one float32 scale per (row, group of columns).

    Returns (x_fp8 [Mp, K], scales [Mp, ceil(K/group)]) with scale = amax / 448, so x ~= x_fp8 * scale;
    Mp is M rounded up to `pad_rows_to` (padding rows are zeros). `column_major_scales` gives the scales
    strides (1, Mp), the layout cuBLAS's 1x128 block scaling reads. A partial last group is allowed.
    """
    if x.dim() != 2:
        raise ValueError(f"per_token_group_quant_fp8 wants a 2-D [M, K] tensor, got shape {tuple(x.shape)}")
    if group <= 0 or group & (group - 1):
        raise ValueError(f"group must be a power of two, got {group}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if pad_rows_to < 1:
        raise ValueError(f"pad_rows_to must be >= 1, got {pad_rows_to}")
    m, k = x.shape
    mp = triton.cdiv(m, pad_rows_to) * pad_rows_to
    num_groups = triton.cdiv(k, group)
    q = torch.empty((mp, k), dtype=FP8_DTYPE, device=x.device)
    if column_major_scales:
        s = torch.empty((num_groups, mp), dtype=torch.float32, device=x.device).t()  # [Mp, G], strides (1, Mp)
    else:
        s = torch.empty((mp, num_groups), dtype=torch.float32, device=x.device)
    if mp == 0:
        return q, s
    groups_per_prog = min(triton.next_power_of_2(num_groups), max(1, 2048 // group))
    grid = (mp, triton.cdiv(num_groups, groups_per_prog))
    per_token_group_quant_fp8_kernel[grid](
        x, q, s, m, k, num_groups, x.stride(0), q.stride(0), s.stride(0), s.stride(1),
        GROUP=group, GROUPS_PER_PROG=groups_per_prog, FP8_MAX_C=FP8_MAX, EPS=AMAX_EPS,
    )  # fmt: skip
    return q, s


def per_token_group_quant_fp8_ref(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch twin of `per_token_group_quant_fp8`."""
    m, k = x.shape
    num_groups = (k + group - 1) // group
    padded = torch.zeros((m, num_groups * group), dtype=torch.float32, device=x.device)
    padded[:, :k] = x.to(torch.float32)
    g = padded.view(m, num_groups, group)
    scale = g.abs().amax(dim=2).clamp(min=AMAX_EPS) / FP8_MAX  # [M, num_groups]
    q = (g / scale[:, :, None]).clamp(-FP8_MAX, FP8_MAX).view(m, -1)[:, :k].to(FP8_DTYPE)
    return q, scale


def dequant_token_groups(x_fp8: torch.Tensor, scales: torch.Tensor, group: int = 128) -> torch.Tensor:
    """Inverse of the per-token-group quantization, in float32 (used by references and tests)."""
    k = x_fp8.shape[1]
    return x_fp8.to(torch.float32) * scales.repeat_interleave(group, dim=1)[:, :k]


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


@triton.jit
def store_splits(acc, out_ptr, part_ptr, counter_ptr, offs, mask, split, num_splits, stride_ps,
                 FUSED_REDUCE: tl.constexpr):
    """Store one split-K program's tile: straight to out when K is not split; else its fp32 partial, and with
    FUSED_REDUCE the tile's last program to finish sums every split's partial (in split order, so the result
    does not depend on which program that is), stores out and re-arms the tile's counter for the next launch.
    offs [R, C] are the tile's element offsets in the row-major [M, N] plane of out and of each partial."""
    if num_splits == 1:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + split * stride_ps + offs, acc, mask=mask)
        if FUSED_REDUCE:
            # Every thread's partial is stored before one thread's release increments the tile's counter;
            # the program that takes it to num_splits acquires, so all partials are visible to it (the
            # partials are read past L1, which is not coherent between SMs).
            tl.debug_barrier()
            arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
            if arrived == num_splits - 1:
                total = tl.zeros(acc.shape, dtype=tl.float32)
                for sp in range(num_splits):
                    total += tl.load(part_ptr + sp * stride_ps + offs, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(counter_ptr, 0)


@triton.jit
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

    offs = offs_m[:, None] * N + offs_n[None, :]
    store_splits(acc, out_ptr, part_ptr, counter_ptr + pid, offs, mask_m[:, None] & mask_n[None, :], split,
                 num_splits, stride_ps, FUSED_REDUCE)


@triton.jit
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
        offs = offs_m[None, :] * N + offs_n[:, None]
        mask = mask_n[:, None] & mask_m[None, :]
    else:
        offs = offs_m[:, None] * N + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
    store_splits(acc, out_ptr, part_ptr, counter_ptr + pid, offs, mask, split, num_splits, stride_ps, FUSED_REDUCE)


@triton.jit
def splitk_reduce_kernel(c_ptr, out_ptr, num_splits, numel, stride_cs, BLOCK: tl.constexpr):
    # out [M*N] = sum over splits of c [split, M*N] (fp32, fixed order: deterministic), cast on the store.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for sp in range(num_splits):
        acc += tl.load(c_ptr + sp * stride_cs + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def reduce_splits(partials: torch.Tensor, out: torch.Tensor) -> None:
    """out [M, N] = partials [splits, M, N] (fp32, contiguous per split) summed in split order, cast on the store."""
    numel = out.numel()
    splitk_reduce_kernel[(triton.cdiv(numel, _REDUCE_BLOCK),)](
        partials, out, partials.shape[0], numel, partials.stride(0), BLOCK=_REDUCE_BLOCK, num_warps=4
    )


class SplitK:
    """Where a split-K launch puts its partial sums and how they are reduced.

    `fused` (the default where it can be): the kernel's last program per tile sums the partials
    (`store_splits`), counting arrivals in a per-device counter array that every such launch shares, so
    such launches must not run concurrently on two streams (the engine runs one compute stream). The array
    is made (zeroed) on first use, outside CUDA-graph capture; a launch that would need it first during a
    capture, or more tiles than it has, falls back to `reduce_splits` after the kernel: one more launch.
    """

    def __init__(self, splits: int, tiles: int, m: int, n: int, out: torch.Tensor, fused: bool) -> None:
        self.splits = splits
        self.partials = out[None] if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=out.device)
        counters = _split_counters(out.device) if fused and splits > 1 else None
        self.fused = counters is not None and tiles <= counters.numel()
        self.counters = counters if self.fused else self.partials  # any pointer where no counter is read

    def finish(self, out: torch.Tensor) -> None:
        """Sum the partials into out unless the kernel did."""
        if self.splits > 1 and not self.fused:
            reduce_splits(self.partials, out)


_SPLIT_COUNTERS = 1 << 16  # tiles one fused split-K launch may have (a [16, 64] tile each: N up to 4M)
_counters: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device) -> torch.Tensor | None:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    counters = _counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _counters[device] = torch.zeros(_SPLIT_COUNTERS, dtype=torch.int32, device=device)
    return counters


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
    """Tile heuristic from H100 sweeps (bench.py --sweep-s): narrow tiles + split-K while the weight stream
    dominates (M <= 64), then 64x128 tiles with 4 warps, which beat 128x128 / 8 warps at every large M
    measured (the per-K-block scale multiply keeps the 128x128 accumulator path near 255 registers)."""
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


def _check_gemm_limits(block: tuple[int, int]) -> None:
    why = fp8_gemm_unsupported(block)
    if why is not None:
        raise ValueError(f"the FP8 GEMM kernels cannot take this shape: {why} (w8a8_block_fp8_matmul_ref can)")


def _check_gemm_inputs(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor | TiledFp8Weight,
    w_scale_inv: torch.Tensor,
    block: tuple[int, int],
) -> tuple[int, int, int]:
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
    m, n, k = _check_gemm_inputs(x_fp8, x_scale, w_fp8, w_scale_inv, block)
    _check_gemm_limits(block)
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
    m, n, k = _check_gemm_inputs(x_fp8, x_scale, w, w_scale_inv, block)
    _check_gemm_limits(block)
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
    _check_gemm_inputs(x_fp8, x_scale, w_fp8, w_scale_inv, block)
    a = dequant_token_groups(x_fp8, x_scale.to(torch.float32), block[1])
    w = block_dequant(w_fp8, w_scale_inv, block, torch.float32)
    return (a @ w.t()).to(out_dtype)



# ---------------------------------------------------------------------------------------------------------
# cuBLASLt block scaling (Hopper, CUDA >= 12.9) through torch._scaled_mm
# ---------------------------------------------------------------------------------------------------------


def cublas_block_fp8_supported(device: torch.device) -> bool:
    """Whether torch._scaled_mm runs DeepSeek's 1x128 x 128x128 recipe on `device` (sm_90, CUDA >= 12.9).

    Call it once, when the model is built; the answer does not change while the process runs.
    """
    if device.type != "cuda" or not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    major, minor = (int(v) for v in torch.version.cuda.split(".")[:2])
    # NOTE: torch only routes this recipe to cuBLASLt on compute capability 9.x (its deepseek check).
    return (major, minor) >= (12, 9) and torch.cuda.get_device_capability(device)[0] == 9


def cublas_block_fp8_shape_ok(n: int, k: int, block: tuple[int, int] = (128, 128)) -> bool:
    """Whether an [N, K] weight fits the cuBLAS recipe as torch._scaled_mm passes it.

    cuBLAS wants N and K multiples of 16 and reads the 128x128 scales with a leading dimension of
    ceil(K/128) rounded up to 4, while the (v1) _scaled_mm API accepts only the unpadded layout: so the
    number of K blocks must already be a multiple of 4 (true for every DeepSeek-V3 linear).
    """
    return tuple(block) == (128, 128) and n % 16 == 0 and k % 16 == 0 and triton.cdiv(k, 128) % 4 == 0


def cublas_weight_scale(w_scale_inv: torch.Tensor) -> torch.Tensor:
    """The weight scales as _scaled_mm's scale_b: [ceil(K/128), ceil(N/128)] fp32 with strides (1, ceil(K/128)).

    For the checkpoint's contiguous fp32 `weight_scale_inv` this is a free view (`.t()`), so a model may
    keep it next to the weight once, at load time; other dtypes or layouts cost one copy per call.
    """
    return w_scale_inv.to(torch.float32).contiguous().t()


def w8a8_block_fp8_matmul_cublas(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """`w8a8_block_fp8_matmul` on cuBLASLt: same operands, same result up to accumulation order.

    x_fp8 [M, K] e4m3, x_scale [M, ceil(K/128)] fp32, w_fp8 [N, K] e4m3, w_scale_inv [ceil(N/128),
    ceil(K/128)] fp32; returns [M, N] in out_dtype (bf16, fp16 or fp32). cuBLAS wants M a multiple of 4 and
    the activation scales column-major (strides (1, M)): operands already in that form (from
    `per_token_group_quant_fp8(x, column_major_scales=True, pad_rows_to=4)`) are used as they are, others
    are padded / copied here. The weight must pass `cublas_block_fp8_shape_ok`.
    """
    m, n, k = _check_gemm_inputs(x_fp8, x_scale, w_fp8, w_scale_inv, block)
    _check_gemm_limits(block)
    if not cublas_block_fp8_shape_ok(n, k, block):
        raise ValueError(
            f"cuBLAS block scaling needs a 128x128 block, N and K multiples of 16 and ceil(K/128) a multiple of "
            f"4; got N={n}, K={k}, block={block}: use w8a8_block_fp8_matmul"
        )
    if m == 0:
        return torch.empty((0, n), dtype=out_dtype, device=x_fp8.device)
    mp = triton.cdiv(m, 4) * 4
    if x_fp8.stride(1) != 1:
        x_fp8 = x_fp8.contiguous()
    if mp != m:
        pad = torch.zeros((mp - m, k), dtype=torch.uint8, device=x_fp8.device)
        x_fp8 = torch.cat([x_fp8.view(torch.uint8), pad]).view(FP8_DTYPE)  # bytes: fp8 has few CUDA ops
    # torch's check: strides (1, M), each relaxed where that dimension has size 1.
    groups = x_scale.shape[1]
    scale_ok = x_scale.dtype == torch.float32 and x_scale.stride(0) == 1 and (groups == 1 or x_scale.stride(1) == m)
    if mp != m or not scale_ok:
        padded = torch.ones((groups, mp), dtype=torch.float32, device=x_scale.device)
        padded[:, :m] = x_scale.t()
        x_scale = padded.t()  # [Mp, G], strides (1, Mp)
    if w_fp8.stride(1) != 1:
        w_fp8 = w_fp8.contiguous()
    # mat2 = W^T [K, N] column-major; scale_b [ceil(K/128), ceil(N/128)] is read as 128x128 blocks.
    w_scale_t = cublas_weight_scale(w_scale_inv)
    out = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale, scale_b=w_scale_t, out_dtype=out_dtype)
    return out[:m]


# ---------------------------------------------------------------------------------------------------------
# The entry the model calls
# ---------------------------------------------------------------------------------------------------------


def fp8_block_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    bias: torch.Tensor | None = None,
    cublas_min_m: int | None = None,
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T (+ bias) for a block-FP8 weight W [N, K], in x's dtype.

    On CUDA the activations are quantized per token per 128 columns and a W8A8 GEMM runs: cuBLASLt
    block scaling when `cublas_min_m` is set, M >= cublas_min_m and the weight fits it
    (`cublas_block_fp8_shape_ok`); else the Triton kernel. The caller picks the threshold once, from the
    measured crossover, and sets it only where `cublas_block_fp8_supported` said yes (None: never). Elsewhere the
    reference path dequantizes the weight and multiplies in float32 (no activation rounding).
    """
    lead = x.shape[:-1]
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    use_cublas = cublas_min_m is not None and m >= cublas_min_m and cublas_block_fp8_shape_ok(n, k, block_size)
    if x.is_cuda and use_cublas:
        # Quantize straight into the padded, column-major-scale layout cuBLAS reads: no copies.
        x_fp8, x_scale = per_token_group_quant_fp8(x2, block_size[1], column_major_scales=True, pad_rows_to=4)
        y = w8a8_block_fp8_matmul_cublas(x_fp8, x_scale, weight, weight_scale_inv, block_size, x.dtype)[:m]
    elif x.is_cuda:
        x_fp8, x_scale = per_token_group_quant_fp8(x2, block_size[1])
        y = w8a8_block_fp8_matmul(x_fp8, x_scale, weight, weight_scale_inv, block_size, x.dtype)
    else:
        w = block_dequant(weight, weight_scale_inv, block_size, torch.float32)
        y = (x2.to(torch.float32) @ w.t()).to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, n)
