"""The Triton block-FP8 GEMMs (row-major and tiled weights, split K) against their torch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_quant_close, rel_err

from baleen.kernels import split_k
from baleen.kernels.act_quant import per_token_group_quant_fp8, per_token_group_quant_fp8_ref
from baleen.kernels.fp8_gemm import (
    GemmTiles,
    pick_tiled_tiles,
    tile_fp8_weight,
    untile_fp8_weight,
    w8a8_block_fp8_matmul,
    w8a8_block_fp8_matmul_ref,
    w8a8_block_fp8_matmul_tiled,
)
from baleen.kernels.fp8_linear import fp8_block_linear
from baleen.kernels.quant import block_dequant, block_quant

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton interpreter runs the kernels on CPU
# NOTE: on sm_90 Triton's fp8 tl.dot accumulates each 128-wide K block in the tensor cores' reduced-precision
# (~13-bit mantissa) accumulator (max_num_imprecise_acc is unlimited there); the interpreter sums in fp32.
# An emulation of that accumulator gave rel_err 1e-4..4e-4 on these shapes; a wrong scale gives O(1).
FP8_DOT_TOL = 1e-5 if DEV == "cpu" else 2e-3


@pytest.mark.parametrize("m,n,k", [(1, 200, 256), (33, 128, 384), (70, 96, 130)])
def test_block_fp8_matmul_matches_ref(m: int, n: int, k: int) -> None:
    torch.manual_seed(m + n + k)
    x_q, x_s = per_token_group_quant_fp8_ref(torch.randn(m, k).to(DEV))
    w_q, w_s = block_quant(torch.randn(n, k).to(DEV) * 0.05)
    ref = w8a8_block_fp8_matmul_ref(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
    for tiles in (
        None,
        GemmTiles(16, 64, split_k=2),
        GemmTiles(32, 32, split_k=1, group_m=2),
        GemmTiles(32, 32, split_k=2, group_m=2),
        # TMA loads (K = 130 is no multiple of 16: the TMA cannot address it and the cp.async kernel runs).
        GemmTiles(16, 64, split_k=2, tma=True),
        GemmTiles(8, 64, split_k=3, tma=True, swap_ab=True),
        GemmTiles(16, 128, tma=True, swap_ab=True),
    ):
        out = w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s, out_dtype=torch.float32, tiles=tiles)
        assert out.shape == (m, n)
        assert rel_err(out, ref) < FP8_DOT_TOL, tiles


@pytest.mark.parametrize("swap_ab", [False, True])
def test_tma_tiles_past_the_edges(swap_ab: bool) -> None:
    # The TMA box reads zeros past M, N and K: 5 rows in a 16-row box, N = 200 in 64-row tiles, K = 992.
    torch.manual_seed(11)
    x_q, x_s = per_token_group_quant_fp8(torch.randn(5, 992).to(DEV))
    w_q, w_s = block_quant(torch.randn(200, 992).to(DEV) * 0.05)
    ref = w8a8_block_fp8_matmul_ref(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
    tiles = GemmTiles(16, 64, split_k=3, tma=True, swap_ab=swap_ab)
    out = w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s, out_dtype=torch.float32, tiles=tiles)
    assert rel_err(out, ref) < FP8_DOT_TOL
    # Split K summed in the kernel equals the reduce launch, bit for bit, as for the cp.async kernel.
    two = w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s, out_dtype=torch.float32, tiles=tiles, fused_reduce=False)
    torch.testing.assert_close(out, two, rtol=0, atol=0)


def test_split_k_reduction_casts_once() -> None:
    # Split-K partials are summed in fp32 by one extra launch and cast on its store: fp16 output equals the
    # fp32 result rounded once.
    torch.manual_seed(4)
    x_q, x_s = per_token_group_quant_fp8_ref(torch.randn(5, 512).to(DEV))
    w_q, w_s = block_quant(torch.randn(96, 512).to(DEV) * 0.05)
    full = w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s, out_dtype=torch.float32, tiles=GemmTiles(16, 32, split_k=4))
    half = w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s, out_dtype=torch.float16, tiles=GemmTiles(16, 32, split_k=4))
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), full.half().float(), rtol=2e-3, atol=1e-4)
    assert rel_err(full, w8a8_block_fp8_matmul_ref(x_q, x_s, w_q, w_s, out_dtype=torch.float32)) < FP8_DOT_TOL


@pytest.mark.parametrize("m,n,k,tiles", [(3, 200, 1000, None), (16, 96, 512, GemmTiles(16, 64, split_k=3)),
                                         (5, 130, 256, GemmTiles(16, 32, split_k=2))])  # fmt: skip
def test_fused_split_reduce_equals_the_reduce_launch(m: int, n: int, k: int, tiles: GemmTiles | None) -> None:
    # Each tile's last program sums the split-K partials in split order: what the reduce launch computes.
    torch.manual_seed(m + n)
    x_q, x_s = per_token_group_quant_fp8(torch.randn(m, k).to(DEV))
    w_q, w_s = block_quant(torch.randn(n, k).to(DEV) * 0.05)
    two = w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s, out_dtype=torch.float32, tiles=tiles, fused_reduce=False)
    for _ in range(2):  # the second launch finds the tile counters re-armed by the first
        fused = w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s, out_dtype=torch.float32, tiles=tiles)
        torch.testing.assert_close(fused, two, rtol=0, atol=0)
    counters = split_k._counters[torch.device("cpu") if DEV == "cpu" else torch.device("cuda", 0)]
    assert int(counters.abs().sum()) == 0


def test_tiled_weight_layout() -> None:
    # Tile (n, kb) is 64 x 128 contiguous bytes at rows (n * ceil(K/128) + kb) * 64; zeros past N and K.
    w_q, _ = block_quant(torch.randn(100, 300).to(DEV))
    t = tile_fp8_weight(w_q)
    assert t.data.shape == (2 * 3 * 64, 128) and t.num_bytes == 2 * 3 * 64 * 128
    assert torch.equal(untile_fp8_weight(t).view(torch.uint8), w_q.view(torch.uint8))
    raw = t.data.view(torch.uint8)
    tile = raw[(1 * 3 + 2) * 64 : (1 * 3 + 3) * 64]  # rows 64..127, columns 256..383
    assert torch.equal(tile[:36, :44], w_q.view(torch.uint8)[64:100, 256:300])
    assert not tile[36:].any() and not tile[:, 44:].any()
    with pytest.raises(ValueError, match="float8"):
        tile_fp8_weight(torch.randn(64, 128).to(DEV))


@pytest.mark.parametrize("m,n,k", [(1, 200, 256), (5, 300, 992), (16, 64, 512), (24, 130, 1024)])
def test_tiled_gemm_matches_ref(m: int, n: int, k: int) -> None:
    torch.manual_seed(m * n + k)
    x_q, x_s = per_token_group_quant_fp8(torch.randn(m, k).to(DEV))
    w_q, w_s = block_quant(torch.randn(n, k).to(DEV) * 0.05)
    w_t = tile_fp8_weight(w_q)
    ref = w8a8_block_fp8_matmul_ref(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
    out = w8a8_block_fp8_matmul_tiled(x_q, x_s, w_t, w_s, out_dtype=torch.float32)
    assert out.shape == (m, n)
    assert rel_err(out, ref) < FP8_DOT_TOL
    # The same tiles over the row-major weight sum in the same order: the same result, bit for bit.
    row_major = w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s, out_dtype=torch.float32, tiles=pick_tiled_tiles(m, n, k))
    torch.testing.assert_close(out, row_major, rtol=0, atol=0)


def test_tiled_gemm_rejects_what_it_cannot_read() -> None:
    x_q, x_s = per_token_group_quant_fp8_ref(torch.randn(4, 256))
    w_q, w_s = block_quant(torch.randn(64, 256))
    w_t = tile_fp8_weight(w_q)
    with pytest.raises(ValueError, match="K="):
        w8a8_block_fp8_matmul_tiled(x_q[:, :128], x_s[:, :1], w_t, w_s)
    with pytest.raises(ValueError, match="w_scale_inv"):
        w8a8_block_fp8_matmul_tiled(x_q, x_s, w_t, w_s[:, :1])
    with pytest.raises(ValueError, match="block_n"):
        w8a8_block_fp8_matmul_tiled(x_q, x_s, w_t, w_s, tiles=GemmTiles(16, 32, tma=True, swap_ab=True))


def test_fused_split_reduce_falls_back_past_its_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    # More tiles than counters: the partials are summed by a second launch, same result.
    torch.manual_seed(9)
    x_q, x_s = per_token_group_quant_fp8_ref(torch.randn(4, 512).to(DEV))
    w_q, w_s = block_quant(torch.randn(256, 512).to(DEV) * 0.05)
    tiles = GemmTiles(16, 32, split_k=2)  # 8 tiles
    ref = w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s, out_dtype=torch.float32, tiles=tiles, fused_reduce=False)
    small = torch.zeros(4, dtype=torch.int32, device=DEV)
    monkeypatch.setattr(split_k, "_split_counters", lambda device: small)
    out = w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s, out_dtype=torch.float32, tiles=tiles)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert int(small.abs().sum()) == 0  # the kernel never counted into the too-small array


def test_matmul_rejects_bad_scales() -> None:
    # The input checks raise before any launch: CPU tensors on every machine.
    x_q, x_s = per_token_group_quant_fp8_ref(torch.randn(4, 256))
    w_q, w_s = block_quant(torch.randn(64, 256))
    with pytest.raises(ValueError, match="w_scale_inv"):
        w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s[:, :1])
    with pytest.raises(ValueError, match="K="):
        w8a8_block_fp8_matmul(x_q[:, :128], x_s[:, :1], w_q, w_s)


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 64, 200, 1024])
@pytest.mark.parametrize("n,k", [(576, 7168), (2112, 7168), (24576, 1536), (7168, 2048), (4096, 512)])
def test_block_fp8_matmul_gpu(m: int, n: int, k: int) -> None:
    torch.manual_seed(m * 7 + n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w_q, w_s = block_quant(torch.randn(n, k, device="cuda") * 0.02)
    x_q, x_s = per_token_group_quant_fp8(x)
    qr, sr = per_token_group_quant_fp8_ref(x)
    assert_quant_close(x_q, x_s, qr, sr)
    out = w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s, out_dtype=torch.bfloat16)
    ref = w8a8_block_fp8_matmul_ref(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
    assert rel_err(out, ref) < 8e-3
    # The model's entry, against unquantized activations: W8A8 rounding only.
    y = fp8_block_linear(x, w_q, w_s, (128, 128))
    assert rel_err(y, x.float() @ block_dequant(w_q, w_s).t()) < 0.06


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [GemmTiles(128, 128, num_warps=8, num_stages=3),
                                   GemmTiles(64, 128, num_warps=4, num_stages=3)])  # fmt: skip
def test_block_fp8_matmul_large_tiles_gpu(tiles: GemmTiles) -> None:
    torch.manual_seed(7)
    x = torch.randn(300, 7168, device="cuda", dtype=torch.bfloat16)
    w_q, w_s = block_quant(torch.randn(576, 7168, device="cuda") * 0.02)
    x_q, x_s = per_token_group_quant_fp8(x)
    ref = w8a8_block_fp8_matmul_ref(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
    out = w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s, out_dtype=torch.bfloat16, tiles=tiles)
    assert rel_err(out, ref) < 8e-3


@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 5, 16])
@pytest.mark.parametrize("n,k", [(7168, 16384), (2112, 7168), (24576, 1536), (7168, 18432)])
def test_fused_split_reduce_gpu_v3_shapes(m: int, n: int, k: int) -> None:
    torch.manual_seed(m + n)
    x_q, x_s = per_token_group_quant_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    w_q, w_s = block_quant(torch.randn(n, k, device="cuda") * 0.02)
    two = w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s, fused_reduce=False)
    torch.testing.assert_close(w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s), two, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 8, 16])
@pytest.mark.parametrize("n,k", [(7168, 16384), (2112, 7168), (24576, 1536), (576, 7168)])
@pytest.mark.parametrize("tiles", [GemmTiles(16, 64, split_k=4, num_stages=6, tma=True),
                                   GemmTiles(16, 64, split_k=4, num_stages=6, tma=True, swap_ab=True),
                                   GemmTiles(8, 128, split_k=2, num_stages=8, tma=True, swap_ab=True)])  # fmt: skip
def test_tma_tiles_gpu_v3_shapes(m: int, n: int, k: int, tiles: GemmTiles) -> None:
    torch.manual_seed(m + n + k)
    x_q, x_s = per_token_group_quant_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    w_q, w_s = block_quant(torch.randn(n, k, device="cuda") * 0.02)
    ref = w8a8_block_fp8_matmul_ref(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
    out = w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s, tiles=tiles)
    assert rel_err(out, ref) < 8e-3
    two = w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s, tiles=tiles, fused_reduce=False)
    torch.testing.assert_close(out, two, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 8, 16, 32])
@pytest.mark.parametrize("n,k", [(7168, 16384), (2112, 7168), (24576, 1536), (36864, 7168), (576, 7168)])
def test_tiled_gemm_gpu_v3_shapes(m: int, n: int, k: int) -> None:
    torch.manual_seed(m + n + k)
    x_q, x_s = per_token_group_quant_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    w_q, w_s = block_quant(torch.randn(n, k, device="cuda") * 0.02)
    w_t = tile_fp8_weight(w_q)
    assert torch.equal(untile_fp8_weight(w_t).view(torch.uint8), w_q.view(torch.uint8))
    ref = w8a8_block_fp8_matmul_ref(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
    out = w8a8_block_fp8_matmul_tiled(x_q, x_s, w_t, w_s)
    assert rel_err(out, ref) < 8e-3
    row_major = w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s, tiles=pick_tiled_tiles(m, n, k))
    torch.testing.assert_close(out, row_major, rtol=0, atol=0)


@pytest.mark.gpu
def test_fused_reduce_in_a_cuda_graph_rearms_every_replay() -> None:
    # Decode replays one captured graph thousands of times: each replay must find the counters at zero.
    torch.manual_seed(3)
    x = torch.randn(4, 7168, device="cuda", dtype=torch.bfloat16)
    w_q, w_s = block_quant(torch.randn(2112, 7168, device="cuda") * 0.02)
    want = w8a8_block_fp8_matmul(*per_token_group_quant_fp8(x), w_q, w_s, fused_reduce=False)
    w8a8_block_fp8_matmul(*per_token_group_quant_fp8(x), w_q, w_s)  # counters made outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w8a8_block_fp8_matmul(*per_token_group_quant_fp8(x), w_q, w_s)
        # A second fused launch right after, through the same counters (the first must have re-armed them).
        out2 = w8a8_block_fp8_matmul(*per_token_group_quant_fp8(x[:, :2048]), w_q[:, :2048], w_s[:, :16],
                                     tiles=GemmTiles(16, 32, split_k=4))  # fmt: skip
    want2 = w8a8_block_fp8_matmul(*per_token_group_quant_fp8(x[:, :2048]), w_q[:, :2048], w_s[:, :16],
                                  tiles=GemmTiles(16, 32, split_k=4), fused_reduce=False)  # fmt: skip
    for _ in range(20):
        out.zero_()
        out2.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.testing.assert_close(out2, want2, rtol=0, atol=0)
