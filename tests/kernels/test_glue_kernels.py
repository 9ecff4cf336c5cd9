"""The decode step's glue kernels (MLA prep, router selection) against their torch twins and the model's path."""

from __future__ import annotations

import pytest
import torch

from baleen.kernels.fused_moe import select_experts_noaux_tc
from baleen.kernels.mla_prep import mla_prep, mla_prep_ref
from baleen.kernels.moe_route import route_noaux_tc, route_supported
from baleen.kernels.rotary import apply_rotary_interleaved_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton interpreter runs the kernels on CPU


def prep_case(dtype: torch.dtype, num_tokens: int = 5, heads: int = 3, rank: int = 64, rope: int = 16):
    torch.manual_seed(11)
    fused = torch.randn(num_tokens, 40 + rank + rope).to(dtype).to(DEV)  # a fused projection: latent is a strided slice
    latent = fused[:, 40:]
    w = (torch.rand(rank) + 0.5).to(dtype)
    q = torch.randn(num_tokens, heads, 32 + rope).to(dtype)
    angles = torch.rand(num_tokens, rope // 2) * 6
    cos_sin = torch.stack([angles.cos(), angles.sin()], dim=1)  # [T, 2, rope/2]
    out_loc = torch.randperm(4 * 8)[:num_tokens]
    cache = torch.zeros(4, 8, rank + rope, dtype=dtype)
    return (latent, *(t.to(DEV) for t in (w, q, cos_sin, out_loc, cache)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_kv_out, heads", [(False, 3), (True, 20)])  # 20 heads: two head-block programs
def test_mla_prep_matches_ref_and_the_unfused_model_path(dtype: torch.dtype, with_kv_out: bool, heads: int) -> None:
    latent, w, q, cos_sin, out_loc, cache = prep_case(dtype, heads=heads)
    rank, rope = 64, 16
    runs = []
    for fn in (mla_prep, mla_prep_ref):
        qc, cc = q.clone(), cache.clone()
        kv_out = torch.empty_like(latent) if with_kv_out else None
        fn(latent, w, 1e-6, qc, cos_sin, out_loc, cc, rope, kv_out)
        runs.append((qc, cc, kv_out))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(runs[0], runs[1]):
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    # The unfused ops it replaces: RMSNorm, the standalone rotary reference on k_pe and q_pe, cat, write.
    def apply_rotary(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        k_dummy = torch.zeros(x.shape[0], x.shape[-1], dtype=x.dtype, device=x.device)
        out = x.clone()
        apply_rotary_interleaved_ref(out, k_dummy, torch.arange(x.shape[0], device=x.device), cos_sin.reshape(x.shape[0], -1))
        return out

    c = latent[:, :rank].float()
    c = (w * (c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)).to(dtype)
    k_pe = apply_rotary(latent[:, rank:], cos_sin)
    row = torch.cat([c, k_pe], dim=-1)
    qc, cc, kv_out = runs[0]
    torch.testing.assert_close(cc.view(-1, rank + rope)[out_loc], row, rtol=tol, atol=tol)
    torch.testing.assert_close(qc[..., 32:], apply_rotary(q[..., 32:], cos_sin), rtol=tol, atol=tol)
    assert torch.equal(qc[..., :32], q[..., :32])  # q_nope untouched
    untouched = torch.ones(32, dtype=torch.bool, device=DEV)
    untouched[out_loc] = False
    assert cc.view(-1, rank + rope)[untouched].abs().sum() == 0  # only the tokens' slots are written
    if kv_out is not None:
        torch.testing.assert_close(kv_out, row, rtol=tol, atol=tol)


@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_mla_prep_hands_the_expanded_form_an_fp8_cache_s_rounded_rows(scale: float) -> None:
    # kv_out is the row as the FP8 cache holds it, times the scale: what every later read of the cache sees.
    latent, w, q, cos_sin, out_loc, cache = prep_case(torch.bfloat16)
    rank, rope = 64, 16
    cache = cache.to(torch.float8_e4m3fn)
    runs = []
    for fn in (mla_prep, mla_prep_ref):
        cc, kv_out = cache.clone(), torch.empty_like(latent)
        fn(latent, w, 1e-6, q.clone(), cos_sin, out_loc, cc, rope, kv_out, cache_scale=scale)
        runs.append((cc, kv_out))
    for c, kv in runs:  # each hands over what it stored (the interpreter may round to bf16 1 ulp apart)
        held = c.view(-1, rank + rope)[out_loc.to(torch.int64)].float() * scale
        torch.testing.assert_close(kv.float(), held, rtol=2**-7, atol=0)
    if DEV == "cuda":  # NOTE: the Triton interpreter's float32 -> e4m3 cast truncates and can drop a carry (1.95 -> 1.0)
        # kernel and ref may round the norm 1 bf16 ulp apart, which can cross an e4m3 rounding boundary: one step
        torch.testing.assert_close(runs[0][1].float(), runs[1][1].float(), rtol=2**-3, atol=scale * 2**-9)
    kv_ref = runs[1][1]
    fresh = torch.empty_like(latent)
    mla_prep_ref(latent, w, 1e-6, q.clone(), cos_sin, out_loc, torch.zeros_like(cache, dtype=torch.float32), rope, fresh)
    assert not torch.equal(kv_ref, fresh)  # e4m3 rounded them (3 mantissa bits against bf16's 7)
    torch.testing.assert_close(kv_ref.float(), fresh.float(), rtol=2**-4, atol=scale * 2**-9)  # half an e4m3 step


def test_mla_prep_rejects_bad_shapes() -> None:
    latent, w, q, cos_sin, out_loc, cache = prep_case(torch.float32)
    with pytest.raises(ValueError, match="cache rows"):
        mla_prep(latent, w, 1e-6, q, cos_sin, out_loc, cache[..., :-1], 16)
    with pytest.raises(ValueError, match="disagree"):
        mla_prep(latent, w, 1e-6, q[:-1], cos_sin, out_loc, cache, 16)


@pytest.mark.parametrize(
    "num_experts, groups, topk_group, top_k, renorm",
    [(64, 8, 4, 8, True), (32, 4, 2, 6, True), (16, 1, 1, 4, False), (64, 8, 8, 8, True)],
)
def test_route_matches_torch_selection(num_experts: int, groups: int, topk_group: int, top_k: int, renorm: bool) -> None:
    torch.manual_seed(num_experts + top_k)
    logits = (torch.randn(9, num_experts) * 2).to(DEV)
    bias = (torch.randn(num_experts) * 0.3).to(DEV)
    w, ids = route_noaux_tc(logits, bias, top_k, groups, topk_group, 2.5, renorm)
    w_ref, ids_ref = select_experts_noaux_tc(logits, bias, top_k, groups, topk_group, 2.5, renorm)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, ids_ref)  # best first, same order (random scores have no ties)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6)
    if groups > topk_group:  # the chosen experts really come from at most topk_group groups
        assert all(len(set((ids[t] // (num_experts // groups)).tolist())) <= topk_group for t in range(9))


def test_route_appends_the_shared_expert_column() -> None:
    torch.manual_seed(5)
    logits, bias = (torch.randn(7, 64) * 2).to(DEV), (torch.randn(64) * 0.3).to(DEV)
    w, ids = route_noaux_tc(logits, bias, 8, 8, 4, 2.5, True)
    w9, ids9 = route_noaux_tc(logits, bias, 8, 8, 4, 2.5, True, shared_id=64)
    assert ids9.shape == (7, 9) and w9.shape == (7, 9)
    assert torch.equal(ids9[:, :8], ids) and (ids9[:, 8] == 64).all()
    torch.testing.assert_close(w9[:, :8], w, rtol=0, atol=0)  # the routed weights are untouched (scaled, renormalised)
    assert (w9[:, 8] == 1.0).all()
    with pytest.raises(ValueError, match="shared_id"):
        route_noaux_tc(logits, bias, 8, 8, 4, shared_id=-2)


def test_route_rejects_what_it_cannot_do() -> None:
    assert not route_supported(48, 8) and route_supported(256, 8)
    with pytest.raises(ValueError, match="powers of two"):
        route_noaux_tc(torch.randn(2, 48), torch.zeros(48), 4, 8, 4)
    with pytest.raises(ValueError, match="do not fit"):
        route_noaux_tc(torch.randn(2, 16), torch.zeros(16), 9, 4, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_torch(dtype: torch.dtype) -> None:
    from baleen.kernels.activation import silu_and_mul, silu_and_mul_ref

    torch.manual_seed(5)
    gu = (torch.randn(3, 2 * 1500) * 3).to(dtype).to(DEV)  # not a power of two: the column mask matters
    out = silu_and_mul(gu)
    tol = (1e-6, 1e-5) if dtype == torch.float32 else (2e-2, 1e-2)  # bf16: 1-2 ulp from the sigmoid form
    torch.testing.assert_close(out, silu_and_mul_ref(gu), rtol=tol[0], atol=tol[1])
    with pytest.raises(ValueError, match="2I"):
        silu_and_mul(gu[:, :-1])
