"""Per-token-group FP8 quantization of activations: one e4m3 scale per (row, 128 columns).

What the W8A8 GEMMs read (`kernels/fp8_gemm.py`, `kernels/fp8_cublas.py`, the fused MoE): x ~= x_fp8 * scale
with scale = amax / 448 per group. The weights' 128x128 block format is `kernels/quant.py`'s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baleen.kernels.quant import FP8_DTYPE, FP8_MAX

# Smallest amax a group may have, so an all-zero group gets a finite scale.
AMAX_EPS = 1e-10


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


# NOTE: Triton compiles a kernel once per value class of each int argument (== 1, % 16 == 0, other). The row
# count and the scale strides (the padded row count when column-major) are not specialised, so one compile
# serves every prompt length (issue 20: else a user's first request of a new length may wait for a compile).
@triton.jit(do_not_specialize=["M", "stride_sm", "stride_sg"])
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
    row = tl.program_id(0).to(tl.int64)  # the MoE's activations hold T x top-k rows
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
