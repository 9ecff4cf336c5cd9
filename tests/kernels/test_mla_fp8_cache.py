"""An FP8 (e4m3) latent cache with a per-tensor scale: the MLA prep kernel's writes, the decode and extend
kernels' reads, against their torch references (the Triton interpreter on CPU, the kernels on CUDA)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import rel_err
from test_mla_decode import make_case as decode_case
from test_mla_extend import make_case as extend_case

from baleen.kernels.mla_decode import MlaDecodeTiles, mla_decode, mla_decode_ref
from baleen.kernels.mla_extend import mla_extend, mla_extend_ref
from baleen.kernels.mla_prep import mla_prep, mla_prep_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton interpreter runs the kernels on CPU
FP8 = torch.float8_e4m3fn
KV_SCALE = 0.05  # cache entries ~N(0, 1) / 0.05: most of e4m3's range, none saturated


def to_fp8(cache: torch.Tensor, kv_scale: float) -> torch.Tensor:
    """The e4m3 cache of a float cache with per-tensor scale kv_scale (entries = value / scale)."""
    return (cache.float() / kv_scale).to(FP8)


def dequant(cache8: torch.Tensor, kv_scale: float, dtype: torch.dtype) -> torch.Tensor:
    return (cache8.float() * kv_scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "page_size,splits,tiles",
    [
        (1, 3, MlaDecodeTiles(16, 16, 4, 1, split_dv=True)),
        (16, 2, MlaDecodeTiles(16, 16, 4, 1)),
        (4, 1, MlaDecodeTiles(16, 16, 4, 1)),
        (8, 2, MlaDecodeTiles(16, 16, 4, 1, tokens_on_m=True)),  # pointer loads
        (16, 2, MlaDecodeTiles(16, 16, 4, 1, tokens_on_m=True, tma=True)),  # whole-block TMA loads of e4m3 rows
    ],
)
def test_mla_decode_reads_an_fp8_cache(dtype: torch.dtype, page_size: int, splits: int, tiles: MlaDecodeTiles) -> None:
    torch.manual_seed(page_size * 7 + splits)
    q_nope, q_pe, cache, table, lens = decode_case([1, 40, 77], 5, 64, 32, page_size, dtype, DEV)
    cache8 = to_fp8(cache, KV_SCALE)
    out = mla_decode(q_nope, q_pe, cache8, table, lens, 0.1, num_kv_splits=splits, tiles=tiles, kv_scale=KV_SCALE)
    ref = mla_decode_ref(q_nope, q_pe, cache8, table, lens, 0.1, kv_scale=KV_SCALE)
    assert out.dtype == dtype
    # The kernel converts e4m3 to q's dtype exactly and folds the scale into the softmax scale and the output,
    # so it is as close to the dequantizing reference as the float cache's kernel is to its reference.
    tol = 1e-5 if dtype == torch.float32 and DEV == "cpu" else 2e-3
    assert rel_err(out, ref) < tol
    # ... which is attention over the dequantized cache (the reference's own definition of kv_scale).
    deq = dequant(cache8, KV_SCALE, torch.float32)
    assert rel_err(ref, mla_decode_ref(q_nope, q_pe, deq, table, lens, 0.1)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("page_size,splits", [(1, 1), (16, 2)])
def test_mla_extend_reads_an_fp8_cache(dtype: torch.dtype, page_size: int, splits: int) -> None:
    torch.manual_seed(page_size + splits + 3)
    q_nope, q_pe, cache, table, qo, lens = extend_case([0, 21, 5], [4, 3, 1], 3, 64, 32, page_size, dtype, DEV)
    cache8 = to_fp8(cache, KV_SCALE)
    out = mla_extend(q_nope, q_pe, cache8, table, qo, lens, 0.15, True, splits, tiles=MlaDecodeTiles(16, 16, 4, 1),
                     kv_scale=KV_SCALE)  # fmt: skip
    ref = mla_extend_ref(q_nope, q_pe, cache8, table, qo, lens, 0.15, True, kv_scale=KV_SCALE)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 and DEV == "cpu" else 2e-3)


def test_mla_decode_refuses_a_cache_of_another_float_dtype() -> None:
    q_nope, q_pe, cache, table, lens = decode_case([5], 2, 64, 32, 4, torch.float32, DEV)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        mla_decode(q_nope, q_pe, cache.half(), table, lens, 0.1)


def prep_case(dtype: torch.dtype, cache_dtype: torch.dtype, num_tokens: int = 6, heads: int = 3, rank: int = 64,
              rope: int = 16) -> tuple[torch.Tensor, ...]:  # fmt: skip
    torch.manual_seed(5)
    latent = (torch.randn(num_tokens, rank + rope) * 4).to(dtype).to(DEV)
    latent[0, rank:] *= 100  # a rope key past 448 * scale: both writers saturate it
    w = (torch.rand(rank) + 0.5).to(dtype).to(DEV)
    q = torch.randn(num_tokens, heads, 32 + rope).to(dtype).to(DEV)
    angles = torch.rand(num_tokens, rope // 2) * 6
    cos_sin = torch.stack([angles.cos(), angles.sin()], dim=1).to(DEV)  # [T, 2, rope/2]
    out_loc = torch.randperm(4 * 8)[:num_tokens].to(DEV)
    cache = torch.zeros(4, 8, rank + rope, dtype=cache_dtype, device=DEV)
    return latent, w, q, cos_sin, out_loc, cache


def assert_bytes_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Two e4m3 caches written from values equal up to float32 rounding: the same bytes but for a value on a
    rounding boundary (rare), and then one e4m3 step apart."""
    differ = got.view(torch.uint8) != want.view(torch.uint8)
    assert differ.float().mean() <= 0.01, f"{int(differ.sum())} of {differ.numel()} bytes differ"
    assert ((got.float() - want.float()).abs() <= want.float().abs() / 8 + 2**-9)[differ].all()


def run_prep(dtype: torch.dtype, cache_dtype: torch.dtype, cache_scale: float) -> list[tuple[torch.Tensor, ...]]:
    """(q, cache, kv_out) after the kernel, then after the reference."""
    latent, w, q, cos_sin, out_loc, cache = prep_case(dtype, cache_dtype)
    runs = []
    for fn in (mla_prep, mla_prep_ref):
        qc, cc, kv_out = q.clone(), cache.clone(), torch.empty_like(latent)
        fn(latent, w, 1e-6, qc, cos_sin, out_loc, cc, 16, kv_out, cache_scale=cache_scale)
        runs.append((qc, cc, kv_out, out_loc))
    return runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cache_scale", [1.0, 0.37])
def test_mla_prep_scales_the_cache_values_as_its_reference(dtype: torch.dtype, cache_scale: float) -> None:
    # NOTE: the Triton interpreter (3.9) casts float32 to e4m3 without carry, saturation or subnormals (0.497 ->
    # 0.25, 739 -> 384), so on CPU the kernel writes a float32 cache: its values / scale must be the reference's,
    # and rounding those to e4m3 as torch does (the GPU's cvt.rn.satfinite) must give the reference's FP8 bytes.
    # The kernel's own bytes are compared on CUDA (test_mla_prep_fp8_bytes_gpu).
    (q_k, c_k, kv_k, out_loc), (q_r, c_r, kv_r, _) = run_prep(dtype, torch.float32, cache_scale)
    tol = 1e-6 if dtype == torch.float32 else 1e-3  # the norm's and rotary's float32 math round differently
    torch.testing.assert_close(c_k, c_r, rtol=tol, atol=tol)
    torch.testing.assert_close(q_k, q_r, rtol=tol, atol=tol)
    torch.testing.assert_close(kv_k, kv_r, rtol=tol, atol=tol)  # kv_out keeps the unscaled latent
    latent, w, q, cos_sin, _, cache8 = prep_case(dtype, FP8)
    c8, kv8 = cache8, torch.empty_like(latent)
    mla_prep_ref(latent, w, 1e-6, q, cos_sin, out_loc, c8, 16, kv8, cache_scale=cache_scale)
    assert_bytes_close(c_k.to(FP8), c8)
    # The FP8 cache holds kv_out / scale rounded to e4m3 (3 mantissa bits: within 1/16 relative) or saturated.
    assert c8.float().abs().max() == 448.0  # the large rope key saturated (no NaN byte)
    stored = c8.view(-1, c8.shape[2])[out_loc].float() * cache_scale
    want = kv8.float().clamp(-448 * cache_scale, 448 * cache_scale)
    assert ((stored - want).abs() <= want.abs() / 16 + 2**-9 * cache_scale).all()


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("heads,page_size,seq_lens", [(128, 64, [4096, 1000, 17, 2500]), (16, 1, [8192, 300, 1]),
                                                      (128, 1, [5, 700])])  # fmt: skip
def test_mla_decode_fp8_cache_gpu(heads: int, page_size: int, seq_lens: list[int]) -> None:
    torch.manual_seed(heads + page_size + 5)
    q_nope, q_pe, cache, table, lens = decode_case(seq_lens, heads, 512, 64, page_size, torch.bfloat16, "cuda")
    cache8 = to_fp8(cache, KV_SCALE)
    ref = mla_decode_ref(q_nope, q_pe, cache8, table, lens, 0.0722, kv_scale=KV_SCALE)
    for splits in (None, 1, 5):
        out = mla_decode(q_nope, q_pe, cache8, table, lens, 0.0722, num_kv_splits=splits, kv_scale=KV_SCALE)
        assert rel_err(out, ref) < 2e-2, splits
    tokm = (MlaDecodeTiles(64, 128, 8, 1, tokens_on_m=True), MlaDecodeTiles(64, 64, 8, 2, tokens_on_m=True, tma=True))
    for tiles in (MlaDecodeTiles(64, 64, 4, 2, split_dv=True), MlaDecodeTiles(16, 64, 4, 2), *tokm):
        out = mla_decode(q_nope, q_pe, cache8, table, lens, 0.0722, num_kv_splits=3, tiles=tiles, kv_scale=KV_SCALE)
        assert rel_err(out, ref) < 2e-2, tiles


@pytest.mark.gpu
@pytest.mark.parametrize("heads,page_size", [(128, 64), (16, 1)])
def test_mla_extend_fp8_cache_gpu(heads: int, page_size: int) -> None:
    torch.manual_seed(heads + 1)
    q_nope, q_pe, cache, table, qo, lens = extend_case([0, 3000, 517], [64, 8, 3], heads, 512, 64, page_size,
                                                       torch.bfloat16, "cuda")  # fmt: skip
    cache8 = to_fp8(cache, KV_SCALE)
    out = mla_extend(q_nope, q_pe, cache8, table, qo, lens, 0.0722, kv_scale=KV_SCALE)
    ref = mla_extend_ref(q_nope, q_pe, cache8, table, qo, lens, 0.0722, kv_scale=KV_SCALE)
    assert rel_err(out, ref) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_scale", [1.0, 0.37])
def test_mla_prep_fp8_bytes_gpu(dtype: torch.dtype, cache_scale: float) -> None:
    (_, c_k, _, _), (_, c_r, _, _) = run_prep(dtype, FP8, cache_scale)
    assert c_k.float().abs().max() == 448.0  # saturated, as torch's cast (no NaN byte)
    assert_bytes_close(c_k, c_r)
