"""The decode-sized block-FP8 GEMV (W8A16) against its float32 dequantize-and-multiply reference."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import rel_err

from baleen.kernels.fp8_gemv import (
    MAX_GEMV_M,
    GemvTiles,
    fp8_block_gemv,
    fp8_block_gemv_ref,
    pick_gemv_tiles,
    rows_per_thread,
)
from baleen.kernels.quant import block_dequant, block_quant

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton interpreter runs the kernels on CPU

# Variants the benchmarks sweep: split K (with its reduction launch), prefetch, warps split along K or
# rows. Wide tiles keep the interpreter fast (it pays per program).
TILES = [
    GemvTiles(16, 128),
    GemvTiles(32, 64, split_k=2, prefetch=True),
    GemvTiles(16, 32, split_k=3, num_warps=2),
]



def make_case(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    # Rows of very different magnitude per 128-block, so a wrong scale lookup shows.
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * torch.rand(1, k, generator=g)
    w_q, w_s = block_quant(w)
    # Drawn on CPU from a seeded generator, then moved: the same values on every machine.
    return x.to(DEV), w_q.to(DEV), w_s.to(DEV)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n,k", [(256, 256), (200, 272), (96, 160)])
def test_gemv_matches_ref(m: int, n: int, k: int) -> None:
    # CPU interpreter in fp32 (its bf16 is broken); N 200 / K 272 and 160 leave partial scale blocks.
    x, w_q, w_s = make_case(m, n, k, seed=m * 1000 + n + k)
    ref = fp8_block_gemv_ref(x, w_q, w_s)
    assert torch.allclose(ref, x @ block_dequant(w_q, w_s).t())
    for tiles in TILES[:2] if n == 256 else TILES[1:]:
        out = fp8_block_gemv(x, w_q, w_s, tiles=tiles)
        assert out.shape == (m, n) and out.dtype == torch.float32
        assert rel_err(out, ref) < 1e-5, tiles


@pytest.mark.parametrize("m", [1, 8])
def test_gemv_default_and_narrow_tiles(m: int) -> None:
    # The picked tiles (one or two rows per program here) and a narrow prefetching split-K variant.
    x, w_q, w_s = make_case(m, 40, 160, seed=m)
    ref = fp8_block_gemv_ref(x, w_q, w_s)
    for tiles in (None, GemvTiles(2, 64, split_k=2, prefetch=True, num_warps=2)):
        assert rel_err(fp8_block_gemv(x, w_q, w_s, tiles=tiles), ref) < 1e-5, tiles


def test_gemv_odd_block_and_out_dtype() -> None:
    # A 48x48 block: a block_n of 32 would straddle two scale rows and is lowered to 16; 16-column chunks
    # still sit inside one 48-column scale block. fp16 output is the fp32 result rounded once.
    x, _, _ = make_case(3, 100, 96, seed=7)
    w = torch.randn(100, 96).to(DEV) * 0.1
    w_q, w_s = block_quant(w, (48, 48))
    ref = fp8_block_gemv_ref(x, w_q, w_s, (48, 48))
    for tiles in (GemvTiles(32, 64), GemvTiles(8, 16, split_k=4)):
        out = fp8_block_gemv(x, w_q, w_s, (48, 48), tiles=tiles)
        assert rel_err(out, ref) < 1e-5, tiles
    half = fp8_block_gemv(x, w_q, w_s, (48, 48), out_dtype=torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref.half().float(), rtol=2e-3, atol=1e-4)


def test_gemv_zero_rows() -> None:
    _, w_q, w_s = make_case(1, 64, 128, seed=3)
    assert fp8_block_gemv(torch.empty(0, 128, device=DEV), w_q, w_s).shape == (0, 64)


def test_gemv_rejects_bad_inputs() -> None:
    x, w_q, w_s = make_case(MAX_GEMV_M + 1, 64, 128, seed=5)
    with pytest.raises(ValueError, match="at most"):
        fp8_block_gemv(x, w_q, w_s)
    with pytest.raises(ValueError, match="w_scale_inv"):
        fp8_block_gemv(x[:2], w_q, w_s[:, :0])
    with pytest.raises(ValueError, match="K="):
        fp8_block_gemv(x[:2, :64], w_q, w_s)
    with pytest.raises(ValueError, match="float8"):
        fp8_block_gemv(x[:2], w_q.float(), w_s)
    x_odd, w_odd, s_odd = make_case(2, 64, 112, seed=6)
    fp8_block_gemv(x_odd, w_odd, s_odd, tiles=TILES[0])  # K = 112: a multiple of 16, fine
    w_bad, s_bad = block_quant(torch.randn(64, 100).to(DEV))
    with pytest.raises(ValueError, match="multiple of 16"):
        fp8_block_gemv(torch.randn(2, 100).to(DEV), w_bad, s_bad)
    with pytest.raises(ValueError, match="powers of two"):
        fp8_block_gemv(x[:2], w_q, w_s, tiles=GemvTiles(3, 64))


def test_pick_gemv_tiles_v3_shapes() -> None:
    # Every V3 decode linear: bounded registers (rows per thread), a grid that fills 132 SMs at least twice
    # over (or split K), and a K step that divides K where a power of two >= 512 does.
    for n, k in [(2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (36864, 7168),
                 (7168, 18432), (4096, 7168), (7168, 2048)]:  # fmt: skip
        for m, max_rows in ((1, 8), (2, 4), (4, 4), (8, 2)):
            t = pick_gemv_tiles(m, n, k)
            assert rows_per_thread(t.block_n, t.block_k, t.num_warps) <= max_rows, (m, n, k, t)
            assert -(-n // t.block_n) * t.split_k >= 2 * 132, (m, n, k, t)
            assert k % t.block_k == 0, (m, n, k, t)


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4, 8])
@pytest.mark.parametrize("n,k", [(2112, 7168), (576, 7168), (24576, 1536), (7168, 16384), (7168, 2048)])
def test_gemv_gpu_v3_shapes(m: int, n: int, k: int) -> None:
    torch.manual_seed(m * 7 + n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w_q, w_s = block_quant(torch.randn(n, k, device="cuda") * 0.02)
    ref = fp8_block_gemv_ref(x, w_q, w_s, out_dtype=torch.float32)
    for tiles in (None, GemvTiles(8, 1024, prefetch=True), GemvTiles(4, 2048, split_k=2)):
        out = fp8_block_gemv(x, w_q, w_s, tiles=tiles)
        assert out.shape == (m, n) and out.dtype == torch.bfloat16
        assert rel_err(out, ref) < 8e-3, tiles  # bf16 output rounding only


@pytest.mark.parametrize("m", [1, 3])
def test_batched_gemv_matches_per_head_reference(m: int) -> None:
    """One launch over heads, on strided views like the absorbed-MLA weights (a slice of kv_b_proj's rows)."""
    from baleen.kernels.fp8_gemv import fp8_block_gemv_batched

    gen = torch.Generator().manual_seed(m)
    heads, nope, v, rank, block = 3, 32, 16, 64, (16, 16)
    w_full, s_full = block_quant(torch.randn(heads * (nope + v), rank, generator=gen).to(DEV), block)
    w = w_full.view(heads, nope + v, rank)[:, nope:]  # [H, v, rank], rows strided by nope + v
    s = s_full.view(heads, (nope + v) // 16, rank // 16)[:, nope // 16 :]
    x = torch.randn(m, heads * 2, rank, generator=gen).to(DEV)[:, ::2]  # [M, H, rank], heads strided
    got = fp8_block_gemv_batched(x, w, s, block)
    assert got.shape == (m, heads, v)
    for h in range(heads):
        want = fp8_block_gemv_ref(x[:, h].contiguous(), w[h].contiguous(), s[h].contiguous(), block)
        torch.testing.assert_close(got[:, h], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expected x"):
        fp8_block_gemv_batched(x[0], w, s, block)
