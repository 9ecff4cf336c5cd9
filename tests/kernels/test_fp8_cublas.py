"""The cuBLASLt block-scaled GEMM's shape rules and `fp8_block_linear`, the entry that picks it or Triton."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import rel_err

from baleen.kernels.act_quant import per_token_group_quant_fp8, per_token_group_quant_fp8_ref
from baleen.kernels.fp8_cublas import (
    cublas_block_fp8_shape_ok,
    cublas_block_fp8_supported,
    w8a8_block_fp8_matmul_cublas,
)
from baleen.kernels.fp8_gemm import w8a8_block_fp8_matmul_ref
from baleen.kernels.fp8_linear import fp8_block_linear
from baleen.kernels.quant import block_dequant, block_quant


def test_cublas_shape_rules() -> None:
    # Every DeepSeek-V3 linear fits (ceil(K/128) a multiple of 4); K = 640 (5 blocks) and N = 100 do not.
    # Pure shape rules and a ValueError raised before any launch: CPU tensors on every machine.
    for n, k in [(2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (7168, 18432), (7168, 2048)]:
        assert cublas_block_fp8_shape_ok(n, k)
    assert not cublas_block_fp8_shape_ok(256, 640)
    assert not cublas_block_fp8_shape_ok(100, 512)
    assert not cublas_block_fp8_shape_ok(256, 512, (64, 128))
    assert not cublas_block_fp8_supported(torch.device("cpu"))
    x_q, x_s = per_token_group_quant_fp8_ref(torch.randn(4, 640))
    w_q, w_s = block_quant(torch.randn(256, 640))
    with pytest.raises(ValueError, match="w8a8_block_fp8_matmul"):
        w8a8_block_fp8_matmul_cublas(x_q, x_s, w_q, w_s)


def test_fp8_block_linear_cpu_is_dequant_matmul() -> None:
    # NOTE: CPU on every machine: off CUDA fp8_block_linear takes its torch reference path (dequantize, fp32
    # matmul, no activation rounding), which is what this test pins down.
    torch.manual_seed(0)
    w_q, w_s = block_quant(torch.randn(576, 256) * 0.05)  # 576 rows: a partial edge block like kv_a_proj
    x = torch.randn(2, 3, 256)
    bias = torch.randn(576)
    y = fp8_block_linear(x, w_q, w_s, (128, 128), bias, cublas_min_m=1)  # the threshold is ignored off CUDA
    ref = x @ block_dequant(w_q, w_s).t() + bias
    assert y.shape == (2, 3, 576)
    assert rel_err(y, ref) < 1e-6


# --------------------------------------------------------------------------------------------- GPU


needs_cublas_blocks = pytest.mark.skipif(
    not torch.cuda.is_available() or not cublas_block_fp8_supported(torch.device("cuda")),
    reason="needs cuBLASLt block-scaled FP8 (sm_90, CUDA >= 12.9)",
)


@pytest.mark.gpu
@needs_cublas_blocks
@pytest.mark.parametrize("m", [1, 3, 64, 200, 1024])
@pytest.mark.parametrize("n,k", [(576, 7168), (24576, 1536), (4096, 512)])
def test_block_fp8_matmul_cublas_gpu(m: int, n: int, k: int) -> None:
    torch.manual_seed(m * 11 + n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w_q, w_s = block_quant(torch.randn(n, k, device="cuda") * 0.02)
    x_q, x_s = per_token_group_quant_fp8(x)  # row-major scales, M unpadded: the wrapper re-lays them out
    ref = w8a8_block_fp8_matmul_ref(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
    out = w8a8_block_fp8_matmul_cublas(x_q, x_s, w_q, w_s, out_dtype=torch.bfloat16)
    assert out.shape == (m, n)
    assert rel_err(out, ref) < 8e-3
    # The model's path: quantized straight into the padded column-major layout, same answer as Triton.
    y = fp8_block_linear(x, w_q, w_s, (128, 128), cublas_min_m=1)
    y_triton = fp8_block_linear(x, w_q, w_s, (128, 128))
    assert y.shape == (m, n)
    assert rel_err(y, y_triton.float()) < 8e-3
