"""The block-FP8 linear the model calls: quantize the activations, then the cuBLAS or the Triton W8A8 GEMM.

Off CUDA it runs the reference (dequantize the weight, multiply in float32). The few-token paths (the W8A16
GEMV and tensor-core GEMM, the tiled-weight GEMM) are picked before this, in `model/layers.py`.
"""

from __future__ import annotations

import torch

from baleen.kernels.act_quant import per_token_group_quant_fp8
from baleen.kernels.fp8_cublas import cublas_block_fp8_shape_ok, w8a8_block_fp8_matmul_cublas
from baleen.kernels.fp8_gemm import w8a8_block_fp8_matmul
from baleen.kernels.quant import block_dequant


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
