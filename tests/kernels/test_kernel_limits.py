"""Kernel-only limits stay on the kernels: every pure-torch reference takes the shapes its kernel refuses.

Each kernel says why it cannot take a shape (`*_unsupported`, what model/kernel_choice.py reads at build time)
and its wrapper raises with that reason; the reference beside it runs the same shape (the CPU path runs only
references, so a limit there would break a checkpoint only at its first request).
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import rel_err

from baleen.kernels.act_quant import dequant_token_groups, per_token_group_quant_fp8_ref
from baleen.kernels.fp8_gemm import fp8_gemm_unsupported, w8a8_block_fp8_matmul, w8a8_block_fp8_matmul_ref
from baleen.kernels.fp8_gemv import fp8_block_gemv, fp8_block_gemv_ref, fp8_gemv_unsupported
from baleen.kernels.fp8_skinny import fp8_skinny_gemm, fp8_skinny_gemm_ref, fp8_skinny_unsupported
from baleen.kernels.fused_moe import fused_moe_unsupported, select_experts_noaux_tc
from baleen.kernels.mla_decode import mla_decode, mla_decode_ref, mla_decode_unsupported
from baleen.kernels.mla_prep import mla_prep, mla_prep_ref, mla_prep_unsupported
from baleen.kernels.moe_route import moe_route_unsupported, route_noaux_tc
from baleen.kernels.quant import block_dequant, block_quant
from baleen.kernels.rotary import apply_rotary_interleaved, apply_rotary_interleaved_ref, rotary_unsupported


def test_mla_prep_ref_takes_widths_the_kernel_does_not() -> None:
    # kv_lora_rank 40 and rope 12 (rope/2 = 6): the shapes of the checkpoint whose first request died.
    rank, rope, heads, nope, num_tokens = 40, 12, 3, 8, 4
    assert mla_prep_unsupported(rank, rope) == "kv_lora_rank=40 is not a power of two"
    assert mla_prep_unsupported(32, rope) == "rope/2=6 is not a power of two"
    assert mla_prep_unsupported(512, 64) is None
    torch.manual_seed(0)
    latent = torch.randn(num_tokens, rank + rope)
    w = torch.rand(rank) + 0.5
    q = torch.randn(num_tokens, heads, nope + rope)
    angles = torch.rand(num_tokens, rope // 2) * 6
    cos_sin = torch.stack([angles.cos(), angles.sin()], dim=1)  # [T, 2, rope/2]
    out_loc = torch.tensor([5, 0, 9, 2])
    cache = torch.zeros(3, 4, rank + rope)
    with pytest.raises(ValueError, match="cannot take this shape: kv_lora_rank=40"):
        mla_prep(latent, w, 1e-6, q.clone(), cos_sin, out_loc, cache.clone(), rope)
    q_out, kv_out = q.clone(), torch.empty_like(latent)
    mla_prep_ref(latent, w, 1e-6, q_out, cos_sin, out_loc, cache, rope, kv_out)
    # The unfused arithmetic: RMSNorm of c_kv, each (even, odd) pair of k_pe and q_pe rotated by its token's angles.
    c = latent[:, :rank]
    c = w * c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6)
    cos, sin = angles.cos(), angles.sin()

    def rotated(x: torch.Tensor) -> torch.Tensor:  # [T, ..., rope]
        c_, s_ = cos.view(num_tokens, *[1] * (x.dim() - 2), -1), sin.view(num_tokens, *[1] * (x.dim() - 2), -1)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * c_ - x1 * s_, x1 * c_ + x0 * s_], dim=-1).flatten(-2)

    row = torch.cat([c, rotated(latent[:, rank:])], dim=-1)
    torch.testing.assert_close(cache.view(-1, rank + rope)[out_loc], row)
    torch.testing.assert_close(kv_out, row)
    torch.testing.assert_close(q_out[..., nope:], rotated(q[..., nope:]))
    assert torch.equal(q_out[..., :nope], q[..., :nope])


def test_rotary_ref_takes_any_even_dim() -> None:
    assert rotary_unsupported(12) == "rotary dim/2=6 is not a power of two" and rotary_unsupported(64) is None
    q, k = torch.randn(3, 2, 12), torch.randn(3, 12)
    table = torch.randn(8, 12)
    with pytest.raises(ValueError, match="cannot take this shape"):
        apply_rotary_interleaved(q.clone(), k.clone(), torch.arange(3), table)
    apply_rotary_interleaved_ref(q, k, torch.arange(3), table)  # runs
    with pytest.raises(ValueError, match="must be even"):
        apply_rotary_interleaved_ref(q[..., :11], k[..., :11], torch.arange(3), table[:, :11])


def test_mla_decode_ref_takes_widths_the_kernel_does_not() -> None:
    assert mla_decode_unsupported(512, 64) is None
    assert "D_LATENT (kv_lora_rank)=40" in str(mla_decode_unsupported(40, 16))
    assert "D_ROPE (qk_rope_head_dim)=8 is not a power of two >= 16" in str(mla_decode_unsupported(32, 8))
    torch.manual_seed(1)
    cache = torch.randn(3, 4, 52)
    q_nope, q_pe = torch.randn(2, 3, 40), torch.randn(2, 3, 12)
    table = torch.tensor([[1, 2], [0, 1]], dtype=torch.int32)
    lens = torch.tensor([7, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="cannot take this shape"):
        mla_decode(q_nope, q_pe, cache, table, lens, 0.1)
    out = mla_decode_ref(q_nope, q_pe, cache, table, lens, 0.1)
    kv = cache.view(-1, 52)[torch.tensor([4, 5, 6, 7, 8, 9, 10])]  # sequence 0: pages 1, 2
    p = torch.softmax(torch.cat([q_nope[0], q_pe[0]], -1) @ kv.t() * 0.1, dim=-1)
    torch.testing.assert_close(out[0], p @ kv[:, :40])


def test_fp8_gemm_ref_takes_any_block() -> None:
    block = (64, 32)  # a K side that is not the 128-column activation group
    assert "K side of 32, not 128" in str(fp8_gemm_unsupported(block)) and fp8_gemm_unsupported((128, 128)) is None
    torch.manual_seed(2)
    w_q, w_s = block_quant(torch.randn(80, 100), block)
    x_q, x_s = per_token_group_quant_fp8_ref(torch.randn(3, 100), block[1])
    with pytest.raises(ValueError, match="K side of 32"):
        w8a8_block_fp8_matmul(x_q, x_s, w_q, w_s, block, torch.float32)
    got = w8a8_block_fp8_matmul_ref(x_q, x_s, w_q, w_s, block, torch.float32)
    want = dequant_token_groups(x_q, x_s, block[1]) @ block_dequant(w_q, w_s, block).t()
    assert rel_err(got, want) < 1e-6


def test_w8a16_refs_take_any_rows_and_columns() -> None:
    assert fp8_gemv_unsupported(1, 128, (128, 128)) is None
    assert "at most 8 rows" in str(fp8_gemv_unsupported(9, 128, (128, 128)))
    assert "K=100 is not a multiple of 16" in str(fp8_gemv_unsupported(1, 100, (128, 128)))
    assert "at most 32 rows" in str(fp8_skinny_unsupported(40, (128, 128)))
    assert "power of two >= 16" in str(fp8_skinny_unsupported(4, (128, 96)))
    torch.manual_seed(3)
    w_q, w_s = block_quant(torch.randn(48, 100), (128, 96))
    x = torch.randn(40, 100)  # past both kernels' row limits, K not a multiple of 16, a 96-column block
    want = x @ block_dequant(w_q, w_s, (128, 96)).t()
    with pytest.raises(ValueError, match="cannot take this shape"):
        fp8_block_gemv(x[:1], w_q, w_s, (128, 96))
    with pytest.raises(ValueError, match="cannot take this shape"):
        fp8_skinny_gemm(x[:4], w_q, w_s, (128, 96))
    for ref in (fp8_block_gemv_ref, fp8_skinny_gemm_ref):
        assert rel_err(ref(x, w_q, w_s, (128, 96)), want) < 1e-6


def test_routing_limits_are_the_kernels_alone() -> None:
    assert moe_route_unsupported(256, 8) is None
    assert "powers of two" in str(moe_route_unsupported(6, 2))
    assert "exceed" in str(moe_route_unsupported(2048, 8))
    logits, bias = torch.randn(4, 6), torch.rand(6)
    with pytest.raises(ValueError, match="cannot take this shape"):
        route_noaux_tc(logits, bias, 3, 2, 1)
    weights, ids = select_experts_noaux_tc(logits, bias, 3, 2, 1)  # the torch selection routes 6 experts
    assert ids.shape == (4, 3) and bool(((ids // 3) == ids[:, :1] // 3).all())  # all from one group
    assert torch.allclose(weights.sum(-1), torch.ones(4))


def test_fused_moe_limits() -> None:
    assert fused_moe_unsupported(256, (128, 128)) is None and fused_moe_unsupported(None, (64, 128)) is None
    assert "not a multiple of the weight block's 128 rows" in str(fused_moe_unsupported(96, (128, 128)))
    assert "K side of 64" in str(fused_moe_unsupported(128, (128, 64)))
