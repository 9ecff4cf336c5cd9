"""RMSNorm, optionally fused with the residual add that precedes it in every DeepSeek block."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baleen.kernels.act_quant import AMAX_EPS, quantize_groups
from baleen.kernels.quant import FP8_DTYPE, FP8_MAX


@triton.jit
def rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    s_ptr,
    N,
    eps,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    stride_s,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QUANT_GROUP: tl.constexpr,
    FP8_MAX_C: tl.constexpr,
    EPS_AMAX: tl.constexpr,
):
    # One program per row: r = x (+ residual), out = weight * (r / rms(r)). With QUANT_GROUP > 0, out is e4m3
    # with one scale per QUANT_GROUP columns in s: the activation-dtype result quantized exactly as
    # `per_token_group_quant_fp8` would quantize it.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        # The new residual is kept in the activation dtype; normalise that rounded value, as an unfused add would.
        x_store = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, x_store, mask=mask)
        x = x_store.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if QUANT_GROUP == 0:
        y = (x * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32) * w  # HF rounds before the weight
        tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        act = res_out_ptr.dtype.element_ty  # the activation dtype the unfused norm would return
        y = ((x * inv_rms).to(act).to(tl.float32) * w).to(act).to(tl.float32)
        q, scale = quantize_groups(tl.reshape(y, (BLOCK_N // QUANT_GROUP, QUANT_GROUP)), FP8_MAX_C, EPS_AMAX)
        tl.store(out_ptr + row * stride_out + cols, tl.reshape(q, (BLOCK_N,)).to(out_ptr.dtype.element_ty), mask=mask)
        groups = tl.arange(0, BLOCK_N // QUANT_GROUP)
        tl.store(s_ptr + row * stride_s + groups, scale, mask=groups * QUANT_GROUP < N)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual) for x [..., N]: new_residual = x + residual (or x), normed = RMSNorm(new_residual).

    Computes in float32 and returns tensors in x's dtype; x and residual are not modified.
    """
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight must be [{n}], got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} and x {tuple(x.shape)} differ")
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty_like(x2)
    if residual is None:
        res_in, res_out = x2, x2
    else:
        res_in = residual.reshape(-1, n)
        if res_in.stride(-1) != 1:
            res_in = res_in.contiguous()
        res_out = torch.empty_like(x2)
    rows = x2.shape[0]
    if rows:
        block = triton.next_power_of_2(n)
        rms_norm_kernel[(rows,)](
            x2, res_in, weight, out, res_out, out, n, float(eps),
            x2.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0), 0,
            HAS_RESIDUAL=residual is not None, BLOCK_N=block, QUANT_GROUP=0, FP8_MAX_C=FP8_MAX, EPS_AMAX=AMAX_EPS,
            num_warps=min(16, max(1, block // 256)),
        )  # fmt: skip
    new_res = x if residual is None else res_out.view(x.shape)
    return out.view(x.shape), new_res


def rms_norm_quant_fp8(
    x: torch.Tensor, weight: torch.Tensor, eps: float, group: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_token_group_quant_fp8(rms_norm(x, weight, eps)[0], group)` in one launch, bit for bit: x [M, N] ->
    (e4m3 [M, N], float32 scales [M, ceil(N/group)]). For a norm whose only reader is an FP8 linear."""
    if x.dim() != 2:
        raise ValueError(f"rms_norm_quant_fp8 wants x [M, N], got shape {tuple(x.shape)}")
    m, n = x.shape
    if weight.shape != (n,):
        raise ValueError(f"weight must be [{n}], got {tuple(weight.shape)}")
    if group <= 0 or group & (group - 1):
        raise ValueError(f"group must be a power of two, got {group}")
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, n), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, triton.cdiv(n, group)), dtype=torch.float32, device=x.device)
    if m:
        block = max(triton.next_power_of_2(n), group)
        rms_norm_kernel[(m,)](
            x, x, weight, q, x, s, n, float(eps), x.stride(0), x.stride(0), q.stride(0), x.stride(0), s.stride(0),
            HAS_RESIDUAL=False, BLOCK_N=block, QUANT_GROUP=group, FP8_MAX_C=FP8_MAX, EPS_AMAX=AMAX_EPS,
            num_warps=min(16, max(1, block // 256)),
        )  # fmt: skip
    return q, s


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch twin of `rms_norm` (the HF DeepseekV3RMSNorm arithmetic)."""
    r = x if residual is None else x + residual
    h = r.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype)).to(x.dtype), r
