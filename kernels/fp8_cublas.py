"""Block-FP8 W8A8 GEMM on cuBLASLt (Hopper, CUDA >= 12.9) through `torch._scaled_mm`: DeepSeek's 1x128
activation x 128x128 weight block scaling, run natively; the same operands and result as
`fp8_gemm.w8a8_block_fp8_matmul` up to the accumulation order. `fp8_linear.fp8_block_linear` switches to it
from a caller-chosen M.
"""

from __future__ import annotations

import torch
import triton

from baleen.kernels.fp8_gemm import check_gemm_inputs, check_gemm_limits
from baleen.kernels.quant import FP8_DTYPE


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
    m, n, k = check_gemm_inputs(x_fp8, x_scale, w_fp8, w_scale_inv, block)
    check_gemm_limits(block)
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
