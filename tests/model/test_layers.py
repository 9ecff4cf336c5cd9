"""Unit tests of the building blocks: sharded loaders, FP8 linear, rotary, routing, experts, cache, attention."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from baleen.kernels.quant import block_dequant, block_quant
from baleen.kernels.rotary import apply_rotary_interleaved_ref
from baleen.model.attention import TorchAttentionBackend
from baleen.model.batch import ForwardBatch
from baleen.model.config import ParallelConfig, RopeConfig
from baleen.model.kv_cache import KVCache
from baleen.model.layers import (
    ColumnParallelLinear,
    Fp8BlockLinearMethod,
    ParallelLMHead,
    ReplicatedLinear,
    RMSNorm,
    RowParallelLinear,
    UnquantizedLinearMethod,
    VocabParallelEmbedding,
    get_weight_loader,
    materialize,
)
from baleen.model.mla import make_mla_policy
from baleen.model.moe import MoEExperts, select_experts
from baleen.model.rotary import RotaryEmbedding, rope_inv_freq

RANK1 = ParallelConfig(tp_rank=1, tp_size=2)
F32 = UnquantizedLinearMethod(torch.float32)


def load(module: torch.nn.Module, **full: torch.Tensor) -> None:
    for name, tensor in full.items():
        param = getattr(module, name)
        get_weight_loader(param)(param, tensor)


def test_rmsnorm() -> None:
    norm = RMSNorm(6, eps=1e-5)
    w, x = torch.randn(6), torch.randn(3, 6)
    load(norm, weight=w)
    torch.testing.assert_close(norm(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w)


def test_linear_shards_on_rank1_of_2() -> None:
    w = torch.randn(8, 6)
    col, rep = ColumnParallelLinear(6, 8, F32, RANK1), ReplicatedLinear(6, 8, F32, RANK1)
    row = RowParallelLinear(6, 8, F32, RANK1, reduce_results=False)  # no process group in this test
    for layer in (col, row, rep):
        load(layer, weight=w)
    torch.testing.assert_close(col.weight, w[4:])
    torch.testing.assert_close(row.weight, w[:, 3:])
    torch.testing.assert_close(rep.weight, w)
    x = torch.randn(2, 6)
    torch.testing.assert_close(col(x), (x @ w.T)[:, 4:])
    torch.testing.assert_close(row(x[:, 3:]), x[:, 3:] @ w[:, 3:].T)  # rank 1's partial sum
    with pytest.raises(ValueError, match="has shape \\[8, 5\\], expected \\[8, 6\\]"):
        load(col, weight=w[:, :5])
    with pytest.raises(ValueError, match="out_features=7 is not divisible by tp_size=2"):
        ColumnParallelLinear(6, 7, F32, RANK1)


def test_vocab_embedding_and_head_shard_with_padding() -> None:
    w = torch.randn(7, 4)  # 7 rows over 2 ranks: 4 per rank, rank 1 holds rows 4..6 and one zero row
    emb, head = VocabParallelEmbedding(7, 4, RANK1, torch.float32), ParallelLMHead(7, 4, RANK1, torch.float32)
    load(emb, weight=w)
    load(head, weight=w)
    torch.testing.assert_close(emb.weight[:3], w[4:])
    assert emb.weight[3].abs().sum() == 0
    torch.testing.assert_close(head.weight, emb.weight)
    # tp_size 1: the full table
    full = VocabParallelEmbedding(7, 4, ParallelConfig(), torch.float32)
    load(full, weight=w)
    torch.testing.assert_close(full(torch.tensor([6, 0])), w[[6, 0]])


def test_fp8_linear_scales_shard_and_compute() -> None:
    block = (2, 4)
    w = torch.randn(8, 10)
    q, s = block_quant(w, block)  # scales [4, 3]: the last column block is partial (10 = 4 + 4 + 2)
    col = ColumnParallelLinear(10, 8, Fp8BlockLinearMethod(block), RANK1)
    load(col, weight=q, weight_scale_inv=s)
    assert col.weight.dtype == torch.float8_e4m3fn and col.weight_scale_inv.shape == (2, 3)
    torch.testing.assert_close(col.weight_scale_inv, s[2:])
    torch.testing.assert_close(
        block_dequant(col.weight, col.weight_scale_inv, block), block_dequant(q, s, block)[4:]
    )
    row = RowParallelLinear(8, 10, Fp8BlockLinearMethod((2, 4)), RANK1)  # weight [10, 8]: columns 4..7
    q2, s2 = block_quant(w.T.contiguous(), block)
    load(row, weight=q2, weight_scale_inv=s2)
    torch.testing.assert_close(row.weight_scale_inv, s2[:, 1:])
    with pytest.raises(ValueError, match="not a multiple of the block"):
        ColumnParallelLinear(10, 12, Fp8BlockLinearMethod((4, 4)), RANK1)  # 6 rows per rank, block 4
    pytest.importorskip("baleen.kernels.fp8_gemm")
    rep = ReplicatedLinear(10, 8, Fp8BlockLinearMethod(block), ParallelConfig())
    load(rep, weight=q, weight_scale_inv=s)
    x = torch.randn(3, 10)
    torch.testing.assert_close(rep(x), x @ block_dequant(q, s, block).T, rtol=1e-5, atol=1e-5)


def test_fp8_tiled_copy_needs_cuda() -> None:
    q, s = block_quant(torch.randn(128, 256))
    rep = ReplicatedLinear(256, 128, Fp8BlockLinearMethod((128, 128)), ParallelConfig())
    load(rep, weight=q, weight_scale_inv=s)
    assert rep.method.tile_weight(rep) == 0 and rep.weight_tiled is None  # CPU: the reference path reads no tiles


@pytest.mark.gpu
@pytest.mark.parametrize("tiled", [False, True])
# GEMV, W8A8 GEMM (tiled to 64 with a tiled copy), skinny W8A16 (17-32 without one), W8A8 again
@pytest.mark.parametrize("m", [1, 5, 16, 17, 24, 32, 40, 64, 100])
def test_fp8_linear_paths_on_cuda_match_dequant(m: int, tiled: bool) -> None:
    # Each token-count regime of Fp8BlockLinearMethod against the float32 dequantized weight. The W8A16 paths
    # (GEMV, skinny) keep bf16 activations; W8A8 rounds them to e4m3 per 128 columns (~2-3% relative). With a
    # tiled weight copy, 2-64 tokens run the tiled GEMM.
    torch.manual_seed(m)
    q, s = block_quant(torch.randn(384, 1024) * 0.05)
    rep = ReplicatedLinear(1024, 384, Fp8BlockLinearMethod((128, 128)), ParallelConfig())
    load(rep, weight=q, weight_scale_inv=s)
    rep.to("cuda")
    if tiled:
        assert rep.method.tile_weight(rep) == 384 * 1024
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    want = x.float() @ block_dequant(q, s).cuda().T
    got = rep(x)
    assert got.shape == (m, 384) and got.dtype == torch.bfloat16
    w8a16 = m <= Fp8BlockLinearMethod.GEMV_MAX_M or (
        not tiled and Fp8BlockLinearMethod.SKINNY_MIN_M <= m <= Fp8BlockLinearMethod.SKINNY_MAX_M
    )
    rel = float((got.float() - want).norm() / want.norm())
    assert rel < (1e-2 if w8a16 else 5e-2), f"M={m}: relative error {rel:.3g}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("m", [1, 4, 40, 100])
def test_norm_then_linear_equals_the_two(device: str, m: int) -> None:
    # RMSNorm.then writes FP8 activations itself where the linear's tiled GEMM would quantize them (CUDA,
    # 2-64 tokens): bit for bit the unfused pair. Elsewhere (CPU, the GEMV, cuBLAS sizes) it is the pair.
    torch.manual_seed(m)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, s = block_quant(torch.randn(256, 512) * 0.05)
    lin = ColumnParallelLinear(512, 256, Fp8BlockLinearMethod((128, 128)), ParallelConfig())
    load(lin, weight=q, weight_scale_inv=s)
    norm = RMSNorm(512, 1e-6, dtype)
    norm.weight.data = torch.rand(512, dtype=dtype) + 0.5
    lin.to(device)
    norm.to(device)
    if device == "cuda":
        assert lin.method.tile_weight(lin) > 0
    x = (torch.randn(m, 640, dtype=dtype, device=device) * 2)[:, :512]  # a column slice, as q_c is
    torch.testing.assert_close(norm.then(lin, x), lin(norm(x)), rtol=0, atol=0)


def test_materialize_keeps_weight_loaders() -> None:
    with torch.device("meta"):
        col = ColumnParallelLinear(6, 8, F32, RANK1)
    materialize(col, "cpu")
    assert not col.weight.is_meta
    w = torch.randn(8, 6)
    load(col, weight=w)
    torch.testing.assert_close(col.weight, w[4:])


def test_yarn_frequencies_match_transformers() -> None:
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(
        factor=40.0,
        original_max_position_embeddings=4096,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=0.7,
    )
    hf = DeepseekV3Config(
        qk_rope_head_dim=64,
        max_position_embeddings=163840,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **params},
    )
    want_freq, want_scale = ROPE_INIT_FUNCTIONS["yarn"](hf)
    got_freq, got_scale = rope_inv_freq(64, RopeConfig(theta=10000.0, kind="yarn", **params))
    torch.testing.assert_close(got_freq, want_freq)
    assert math.isclose(got_scale, want_scale, rel_tol=1e-9) and got_scale != 1.0
    plain, scale = rope_inv_freq(64, RopeConfig(theta=10000.0))
    assert scale == 1.0 and not torch.allclose(plain, got_freq)


def test_rotary_rotates_interleaved_pairs() -> None:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    rope = RotaryEmbedding(8, 16, RopeConfig(theta=100.0))
    pos = torch.tensor([0, 3, 17, 5])  # 17 is past max_position_embeddings: the cache grows
    q, k = torch.randn(4, 2, 8), torch.randn(4, 8)
    cs = rope.cos_sin(pos, max_position=17)
    freqs = pos[:, None].float() * rope.inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)  # transformers' [T, dim] layout
    want_q, want_k = apply_rotary_pos_emb_interleave(q, k[:, None], emb.cos(), emb.sin())
    # The model's rotation (kernels/mla_prep.py) reads row t of the per-token [cos | sin] table for token t.
    got_q, got_k = q.clone(), k.clone()
    apply_rotary_interleaved_ref(got_q, got_k, torch.arange(4), cs.reshape(4, 8))
    # transformers de-interleaves its output (evens then odds); we keep the pairs in place.
    perm = torch.cat([torch.arange(0, 8, 2), torch.arange(1, 8, 2)])
    torch.testing.assert_close(got_q[..., perm], want_q)
    torch.testing.assert_close(got_k[..., perm], want_k[:, 0])
    same_q = q.clone()
    apply_rotary_interleaved_ref(same_q, k.clone(), torch.arange(4), rope.cos_sin(torch.zeros(4, dtype=torch.long)).reshape(4, 8))
    torch.testing.assert_close(same_q, q)


def brute_force_route(logits: torch.Tensor, bias: torch.Tensor | None, **kw: Any) -> list[set[int]]:
    """Per-token Python reference of DeepSeek's group-limited routing (selection only)."""
    out = []
    n_group, topk_group, k = kw["n_group"], kw["topk_group"], kw["top_k"]
    for row in logits:
        s = row.sigmoid() if kw["scoring_func"] == "sigmoid" else row.softmax(-1)
        c = s + bias if bias is not None else s
        size = len(c) // n_group
        groups = [c[g * size : (g + 1) * size] for g in range(n_group)]
        if kw["topk_method"] == "noaux_tc":
            gscore = [float(g.topk(2).values.sum()) for g in groups]
        else:
            gscore = [float(g.max()) for g in groups]
        keep = (
            sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
            if kw["topk_method"] != "greedy"
            else range(n_group)
        )
        cand = [(float(c[e]), e) for g in keep for e in range(g * size, (g + 1) * size)]
        out.append({e for _, e in sorted(cand, reverse=True)[:k]})
    return out


@pytest.mark.parametrize(
    ("method", "scoring", "n_group", "topk_group", "norm"),
    [
        ("noaux_tc", "sigmoid", 4, 2, True),
        ("noaux_tc", "sigmoid", 1, 1, False),
        ("group_limited_greedy", "softmax", 4, 1, False),
        ("greedy", "softmax", 1, 1, True),
    ],
)
def test_select_experts(method: str, scoring: str, n_group: int, topk_group: int, norm: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 16, generator=gen)
    bias = 0.5 * torch.rand(16, generator=gen) if method == "noaux_tc" else None
    kw: dict[str, Any] = dict(
        top_k=3, scoring_func=scoring, topk_method=method, n_group=n_group, topk_group=topk_group
    )
    weights, ids = select_experts(
        logits, correction_bias=bias, norm_topk_prob=norm, routed_scaling_factor=2.5, **kw
    )
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert [set(r) for r in ids.tolist()] == brute_force_route(logits, bias, **kw)
    scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
    want = scores.gather(1, ids.long())  # weights come from the UNBIASED scores
    if norm:
        want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, want * 2.5)


def naive_moe(
    x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            gate, up = (w13[ids[t, j]] @ x[t]).chunk(2)
            out[t] += w[t, j] * (w2[ids[t, j]] @ (F.silu(gate) * up))
    return out


def make_experts(parallel: ParallelConfig, block: tuple[int, int] | None = None) -> MoEExperts:
    return MoEExperts(8, 12, 8, parallel, torch.float32, block)


def fill_experts(
    ex: MoEExperts, w13: torch.Tensor, w2: torch.Tensor, block: tuple[int, int] | None = None
) -> None:
    for j in range(8):
        if not ex.is_local(j):
            continue
        for proj, full in (("gate_proj", w13[j, :8]), ("up_proj", w13[j, 8:]), ("down_proj", w2[j])):
            if block is None:
                ex.load_expert(j, proj, False, full)
            else:
                q, s = block_quant(full, block)
                ex.load_expert(j, proj, False, q)
                ex.load_expert(j, proj, True, s)


def test_torch_experts_match_naive_and_split_over_ep_ranks() -> None:
    gen = torch.Generator().manual_seed(1)
    w13, w2 = torch.randn(8, 16, 12, generator=gen), torch.randn(8, 12, 8, generator=gen)
    x = torch.randn(9, 12, generator=gen)
    ids = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(9)]).to(torch.int32)
    w = torch.rand(9, 3, generator=gen)
    want = naive_moe(x, ids.long(), w, w13, w2)
    full = make_experts(ParallelConfig())
    fill_experts(full, w13, w2)
    torch.testing.assert_close(full(x, ids, w), want, rtol=1e-5, atol=1e-5)
    parts = []
    for rank in (0, 1):
        ex = make_experts(ParallelConfig(tp_rank=rank, tp_size=2, ep_size=2))
        fill_experts(ex, w13, w2)
        assert ex.expert_start == 4 * rank and ex.w13.shape == (4, 16, 12)
        parts.append(ex(x, ids, w))
    torch.testing.assert_close(parts[0] + parts[1], want, rtol=1e-5, atol=1e-5)


def test_fp8_experts_stack_scales_and_match_dequantized() -> None:
    block = (4, 8)  # H = 12 ends in a partial block; I = 8 is a multiple of bn
    gen = torch.Generator().manual_seed(2)
    w13, w2 = torch.randn(8, 16, 12, generator=gen), torch.randn(8, 12, 8, generator=gen)
    ex = make_experts(ParallelConfig(), block)
    fill_experts(ex, w13, w2, block)
    assert ex.w13_weight_scale_inv is not None and ex.w13_weight_scale_inv.shape == (8, 4, 2)
    deq13 = torch.stack(
        [
            torch.cat(
                [block_dequant(*block_quant(w13[j, h], block), block) for h in (slice(0, 8), slice(8, 16))]
            )
            for j in range(8)
        ]
    )
    deq2 = torch.stack([block_dequant(*block_quant(w2[j], block), block) for j in range(8)])
    x = torch.randn(5, 12, generator=gen)
    ids = torch.tensor([[0, 7], [3, 4], [4, 0], [1, 2], [6, 5]], dtype=torch.int32)
    w = torch.rand(5, 2, generator=gen)
    torch.testing.assert_close(ex(x, ids, w), naive_moe(x, ids.long(), w, deq13, deq2), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the weight block"):
        make_experts(ParallelConfig(), (16, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_kv_cache_write_and_budget(dtype: torch.dtype) -> None:
    cache = KVCache(num_layers=2, num_pages=4, page_size=3, kv_cache_dim=5, dtype=dtype)
    latent = torch.randn(2, 5)
    cache.write(1, torch.tensor([4, 11]), latent)  # page 1 offset 1, page 3 offset 2
    got = cache.layer(1).float()
    tol = 0.07 if dtype != torch.float32 else 0.0
    torch.testing.assert_close(got[1, 1], latent[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[3, 2], latent[1], rtol=tol, atol=tol)
    # nothing else was written
    assert int((got.abs().sum(-1) > 0).sum()) == 2 and cache.layer(0).float().abs().sum() == 0
    per_page = KVCache.bytes_per_page(61, 64, 576, torch.bfloat16)
    assert per_page == 61 * 64 * 576 * 2
    assert KVCache.num_pages_for_budget(10 * per_page + 5, 61, 64, 576, torch.bfloat16) == 10
    with pytest.raises(ValueError, match="at least 2"):
        KVCache.num_pages_for_budget(per_page, 61, 64, 576, torch.bfloat16)


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: list[int], scale: float
) -> torch.Tensor:
    """q [n, H, D], k [L, H, D], v [L, H, Dv]: query i sees keys 0..q_pos[i]."""
    out = []
    for i, p in enumerate(q_pos):
        s = torch.einsum("hd,lhd->hl", q[i], k[: p + 1]) * scale
        out.append(torch.einsum("hl,lhv->hv", s.softmax(-1), v[: p + 1]))
    return torch.stack(out)


def test_torch_attention_matches_naive_per_sequence() -> None:
    gen = torch.Generator().manual_seed(3)
    heads, rank, rope, ps = 3, 6, 4, 3
    prefix, extend = [4, 0, 7], [3, 5, 1]
    tables = [[9, 2, 4], [5, 1], [3, 8, 6]]  # scattered pages; page 0 is never used
    cache = KVCache(1, 10, ps, rank + rope, torch.float32)
    # Every sequence's full latent history; the prefix part is written as if by earlier steps.
    hist = [torch.randn(p + e, rank + rope, generator=gen) for p, e in zip(prefix, extend)]
    slots = [[tables[i][t // ps] * ps + t % ps for t in range(len(h))] for i, h in enumerate(hist)]
    for h, sl in zip(hist, slots):
        cache.write(0, torch.tensor(sl), h)
    batch = ForwardBatch.build([1] * sum(extend), prefix, extend, tables, ps)
    torch.testing.assert_close(
        batch.out_loc, torch.tensor([s for p, sl in zip(prefix, slots) for s in sl[p:]])
    )
    attn = TorchAttentionBackend()
    attn.plan(batch)
    q_lat, q_pe = torch.randn(9, heads, rank, generator=gen), torch.randn(9, heads, rope, generator=gen)
    got = attn.run_absorbed(q_lat, q_pe, cache.layer(0), 0.3)
    rows = torch.split(torch.arange(9), extend)
    for i, r in enumerate(rows):
        k = hist[i].unsqueeze(1).expand(-1, heads, -1)  # MQA: one latent key shared by the heads
        q = torch.cat([q_lat[r], q_pe[r]], dim=-1)
        want = naive_attention(q, k, k[..., :rank], list(range(prefix[i], prefix[i] + extend[i])), 0.3)
        torch.testing.assert_close(got[r], want)

    # The expanded form over a prefix-free batch: causal within each sequence's new tokens.
    batch = ForwardBatch.build([1] * 9, [0, 0, 0], [3, 5, 1], tables, ps)
    attn.plan(batch)
    q, k, v = (
        torch.randn(9, heads, 5, generator=gen),
        torch.randn(9, heads, 5, generator=gen),
        torch.randn(9, heads, 2, generator=gen),
    )
    got = attn.run_expanded(q, k, v, 0.5)
    for r in torch.split(torch.arange(9), [3, 5, 1]):
        torch.testing.assert_close(got[r], naive_attention(q[r], k[r], v[r], list(range(len(r))), 0.5))


def test_mla_policies() -> None:
    no_prefix = ForwardBatch.build([1, 2], [0], [2], [[1]], 4)
    with_prefix = ForwardBatch.build([1, 2], [0, 3], [1, 1], [[1], [2]], 4)
    auto, absorbed, expanded = (make_mla_policy(m) for m in ("auto", "absorbed", "expanded"))
    assert not auto.use_absorbed(no_prefix) and auto.use_absorbed(with_prefix)
    assert absorbed.use_absorbed(no_prefix) and not expanded.use_absorbed(no_prefix)
    with pytest.raises(ValueError, match="cached prefix"):
        expanded.use_absorbed(with_prefix)
    with pytest.raises(ValueError, match="mla_mode='fast'"):
        make_mla_policy("fast")
