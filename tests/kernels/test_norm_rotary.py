"""Fused RMSNorm and interleaved rotary against torch references and HF's DeepSeek-V3 modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from baleen.kernels.act_quant import per_token_group_quant_fp8
from baleen.kernels.norm import rms_norm, rms_norm_quant_fp8, rms_norm_ref
from baleen.kernels.rotary import apply_rotary_interleaved, apply_rotary_interleaved_ref, build_cos_sin_cache


@pytest.fixture(autouse=True)
def _on_the_gpu_when_present() -> Iterator[None]:
    # Triton runs CUDA tensors on a GPU machine and CPU tensors only under the interpreter (CPU machines).
    if torch.cuda.is_available():
        with torch.device("cuda"):
            yield
    else:
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_ref(dtype: torch.dtype, with_residual: bool) -> None:
    torch.manual_seed(1)
    x = (torch.randn(3, 5, 100) * 3).to(dtype)
    residual = torch.randn(3, 5, 100).to(dtype) if with_residual else None
    w = torch.randn(100).to(dtype)
    out, new_res = rms_norm(x, w, 1e-6, residual)
    ref, ref_res = rms_norm_ref(x, w, 1e-6, residual)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(new_res, ref_res, rtol=0, atol=0)
    if residual is not None:
        assert not torch.equal(new_res, x)  # the sum, not the input


@pytest.mark.parametrize("m,n,dtype", [(3, 1536, torch.bfloat16), (2, 300, torch.float32), (5, 7168, torch.bfloat16)])
def test_rms_norm_quant_fp8_is_norm_then_quant(m: int, n: int, dtype: torch.dtype) -> None:
    # One launch, bit for bit the two it replaces; a strided view (q_c is a column slice of the q_a + kv_a
    # output) and a partial last group (N = 300) included.
    torch.manual_seed(m + n)
    wide = (torch.randn(m, n + 64) * 3).to(dtype)
    x = wide[:, :n]
    w = (torch.rand(n) + 0.5).to(dtype)
    x[0, :200] = 0.0  # an all-zero group gets the smallest scale
    q, s = rms_norm_quant_fp8(x, w, 1e-6)
    q_ref, s_ref = per_token_group_quant_fp8(rms_norm(x, w, 1e-6)[0])
    assert q.shape == (m, n) and s.shape == (m, -(-n // 128))
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s, s_ref)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_quant_fp8(x, w[:-1], 1e-6)


def test_rms_norm_matches_hf() -> None:
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    torch.manual_seed(2)
    norm = DeepseekV3RMSNorm(64, eps=1e-6)
    norm.weight.data.normal_()
    x = torch.randn(7, 64)
    out, _ = rms_norm(x, norm.weight.data, 1e-6)
    torch.testing.assert_close(out, norm(x), rtol=1e-5, atol=1e-5)


def rotary_case(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    cache = build_cos_sin_cache(inv_freq, 300, mscale=1.0)
    q = torch.randn(6, 5, 64).to(dtype)
    k = torch.randn(6, 64).to(dtype)
    pos = torch.tensor([0, 1, 299, 17, 17, 128])
    return q, k, pos, cache, inv_freq


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_matches_ref(dtype: torch.dtype) -> None:
    q, k, pos, cache, _ = rotary_case(dtype)
    q1, k1 = q.clone(), k.clone()
    apply_rotary_interleaved(q1, k1, pos, cache)
    q2, k2 = q.clone(), k.clone()
    apply_rotary_interleaved_ref(q2, k2, pos, cache)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(q1, q2, rtol=tol, atol=tol)
    torch.testing.assert_close(k1, k2, rtol=tol, atol=tol)
    assert torch.equal(q1[0], q[0])  # position 0 is the identity
    assert not torch.allclose(q1[2], q[2])


def test_rotary_strided_views_in_place() -> None:
    # q_pe is usually the tail of a [T, H, 192] projection: rotate a view, leave the rest untouched.
    q, k, pos, cache, _ = rotary_case(torch.float32)
    full = torch.randn(6, 5, 192)
    full[..., 128:] = q
    keep = full[..., :128].clone()
    apply_rotary_interleaved(full[..., 128:], k.clone(), pos, cache)
    q_ref, k_ref = q.clone(), k.clone()
    apply_rotary_interleaved_ref(q_ref, k_ref, pos, cache)
    torch.testing.assert_close(full[..., 128:], q_ref)
    assert torch.equal(full[..., :128], keep)


def test_rotary_scores_match_hf_interleave() -> None:
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    q, k, pos, cache, inv_freq = rotary_case(torch.float32)
    q1, k1 = q.clone(), k.clone()
    apply_rotary_interleaved(q1, k1, pos, cache)
    freqs = pos[:, None].float() * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)  # HF's cos/sin layout
    # HF wants [batch, heads, seq, dim]; treat tokens as the sequence.
    hq, hk = apply_rotary_pos_emb_interleave(
        q.transpose(0, 1)[None], k[None, None], emb.cos()[None], emb.sin()[None]
    )
    # HF returns the de-interleaved layout; attention scores q.k are layout-independent.
    ours = torch.einsum("thd,sd->hts", q1, k1)
    theirs = hq[0] @ hk[0, 0].transpose(0, 1)  # [H, T, T]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_norm_rotary_gpu() -> None:
    torch.manual_seed(4)
    x = torch.randn(300, 7168, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(300, 7168, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(7168, device="cuda", dtype=torch.bfloat16)
    out, new_res = rms_norm(x, w, 1e-6, r)
    ref, ref_res = rms_norm_ref(x, w, 1e-6, r)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(new_res, ref_res)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float32, device="cuda") / 64))
    cache = build_cos_sin_cache(inv_freq, 4096)
    q = torch.randn(300, 128, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16)
    pos = torch.randint(0, 4096, (300,), device="cuda")
    q1, k1, q2, k2 = q.clone(), k.clone(), q.clone(), k.clone()
    apply_rotary_interleaved(q1, k1, pos, cache)
    apply_rotary_interleaved_ref(q2, k2, pos, cache)
    torch.testing.assert_close(q1.float(), q2.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(k1.float(), k2.float(), rtol=1e-2, atol=1e-2)
