"""The few-token block-FP8 W8A16 tensor-core GEMM against its float32 dequantize-and-multiply reference."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import rel_err

from baleen.kernels.fp8_skinny import (
    MAX_SKINNY_M,
    SkinnyTiles,
    fp8_skinny_gemm,
    fp8_skinny_gemm_ref,
    pick_skinny_tiles,
)
from baleen.kernels.quant import block_quant

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton interpreter runs the kernel on CPU
# On the GPU the MMA takes bf16 activations; the interpreter multiplies fp32 exactly.
X_DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32
TOL = 1e-2 if DEV == "cuda" else 1e-5



def make_case(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    # Rows and columns of very different magnitude per 128-block, so a wrong scale lookup shows.
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * torch.rand(1, k, generator=g)
    w_q, w_s = block_quant(w)
    return x.to(X_DTYPE).to(DEV), w_q.to(DEV), w_s.to(DEV)


@pytest.mark.parametrize(
    "m,n,k,tiles",
    [
        (2, 200, 384, None),  # N not a multiple of the tile or the block
        (5, 64, 320, SkinnyTiles(64, split_k=2)),  # K not a multiple of 128: the last step is partial
        (16, 130, 256, SkinnyTiles(32, 64, split_k=3)),  # K steps of 64 inside a 128 scale block
        (MAX_SKINNY_M, 96, 128, SkinnyTiles(16, num_warps=1)),
        (3, 70, 1000, SkinnyTiles(32, split_k=2, k_unroll=4)),  # unrolled trips that run past a split's end
    ],
)
def test_skinny_matches_ref(m: int, n: int, k: int, tiles: SkinnyTiles | None) -> None:
    x, w, w_s = make_case(m, n, k, seed=m + n)
    out = fp8_skinny_gemm(x, w, w_s, tiles=tiles)
    assert out.shape == (m, n) and out.dtype == x.dtype
    assert rel_err(out, fp8_skinny_gemm_ref(x, w, w_s)) < TOL


def test_skinny_out_dtype_and_zero_rows() -> None:
    x, w, w_s = make_case(3, 48, 128, seed=1)
    out = fp8_skinny_gemm(x, w, w_s, out_dtype=torch.float16)
    assert out.dtype == torch.float16
    assert rel_err(out, fp8_skinny_gemm_ref(x, w, w_s)) < 2e-3 + TOL
    assert fp8_skinny_gemm(x[:0], w, w_s).shape == (0, 48)


def test_skinny_rejects_bad_inputs() -> None:
    x, w, w_s = make_case(2, 64, 128, seed=2)
    with pytest.raises(ValueError, match="at most"):
        fp8_skinny_gemm(torch.zeros(MAX_SKINNY_M + 1, 128, dtype=X_DTYPE, device=DEV), w, w_s)
    with pytest.raises(ValueError, match="K="):
        fp8_skinny_gemm(x[:, :64], w, w_s)
    with pytest.raises(ValueError, match="w_scale_inv"):
        fp8_skinny_gemm(x, w, w_s[:, :0])
    with pytest.raises(ValueError, match="must be"):
        fp8_skinny_gemm(x, w.to(torch.bfloat16), w_s)
    with pytest.raises(ValueError, match="powers of two"):
        fp8_skinny_gemm(x, w, w_s, tiles=SkinnyTiles(24))


def test_pick_skinny_tiles_v3_shapes() -> None:
    # Long rows: 32-row programs, 2 warps, two steps a trip; short rows: 64-row programs. ~2 programs an SM.
    assert pick_skinny_tiles(32, 7168, 16384) == SkinnyTiles(32, 128, 2, 2, 3, 2)  # o_proj: 224 tiles
    assert pick_skinny_tiles(32, 36864, 7168) == SkinnyTiles(32, 128, 1, 2, 3, 2)  # dense gate+up
    assert pick_skinny_tiles(32, 2112, 7168) == SkinnyTiles(32, 128, 4, 2, 3, 2)  # q_a + kv_a: 66 tiles
    assert pick_skinny_tiles(32, 24576, 1536) == SkinnyTiles(64, 128, 1, 4, 3, 1)  # q_b: 384 tiles
    assert pick_skinny_tiles(20, 512, 1024) == SkinnyTiles(64, 128, 2, 4, 3, 1)  # >= 4 trips a split


def test_skinny_fused_split_reduce_equals_second_launch() -> None:
    x, w, w_s = make_case(7, 96, 640, seed=3)
    tiles = SkinnyTiles(32, 128, split_k=3)
    two = fp8_skinny_gemm(x, w, w_s, out_dtype=torch.float32, tiles=tiles, fused_reduce=False)
    for _ in range(2):
        torch.testing.assert_close(fp8_skinny_gemm(x, w, w_s, out_dtype=torch.float32, tiles=tiles), two,
                                   rtol=0, atol=0)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 8, 16, 32])
@pytest.mark.parametrize("n,k", [(7168, 16384), (2112, 7168), (24576, 1536)])
def test_skinny_gpu_v3_shapes(m: int, n: int, k: int) -> None:
    x, w, w_s = make_case(m, n, k, seed=m)
    assert rel_err(fp8_skinny_gemm(x, w, w_s), fp8_skinny_gemm_ref(x, w, w_s)) < 1e-2
