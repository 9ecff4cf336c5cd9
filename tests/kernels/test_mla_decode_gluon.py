"""The Gluon (Hopper, warp-specialised) MLA decode kernel against the torch reference; CPU: clean import only."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import rel_err

from baleen.kernels.mla_decode import mla_decode_ref
from baleen.kernels.mla_decode_gluon import gluon_mla_decode_supported, mla_decode_gluon

D_LATENT, D_ROPE = 512, 64


def make_case(seq_lens: list[int], heads: int, page_size: int) -> tuple[torch.Tensor, ...]:
    """bf16 queries and cache on CUDA; pages shuffled across sequences, spare pages, finite junk past each end."""
    batch = len(seq_lens)
    pages_per_seq = [(n + page_size - 1) // page_size for n in seq_lens]
    num_pages = sum(pages_per_seq) + 3
    perm = torch.randperm(num_pages).tolist()
    table = torch.zeros(batch, max(pages_per_seq) + 1, dtype=torch.int32)
    at = 0
    for b, p in enumerate(pages_per_seq):
        table[b, :p] = torch.tensor(perm[at : at + p], dtype=torch.int32)
        at += p
    cache = torch.randn(num_pages, page_size, D_LATENT + D_ROPE)
    # Rows past a sequence's end in its last page: TMA reads them whole, only the score mask keeps them out.
    for b, n in enumerate(seq_lens):
        cache[int(table[b, (n - 1) // page_size]), (n - 1) % page_size + 1 :] = 30.0
    q_nope = torch.randn(batch, heads, D_LATENT)
    q_pe = torch.randn(batch, heads, D_ROPE)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    to = lambda t: t.to("cuda", torch.bfloat16)
    return to(q_nope), to(q_pe), to(cache), table.cuda(), lens.cuda()



def _need_hopper() -> None:
    if not gluon_mla_decode_supported("cuda", 128, D_LATENT, D_ROPE, 64):
        pytest.skip("needs an sm_90 GPU and a Triton with Gluon")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "heads,page_size,splits,seq_lens",
    [
        (128, 64, 1, [1000]),  # one split: bf16 output written directly, no merge
        (128, 64, 4, [1, 63, 64, 65, 1000]),  # ragged; seq 1 leaves three splits empty; bf16 partials merged
        (128, 128, 1, [65, 1, 300]),
        (128, 128, 3, [64, 1000, 63]),
        (64, 64, 2, [129, 7, 64]),  # one head block
        (128, 64, None, [5 + 31 * i for i in range(33)]),  # batch 33, the default split heuristic
    ],
)
def test_mla_decode_gluon_matches_ref(
    heads: int, page_size: int, splits: int | None, seq_lens: list[int]
) -> None:
    _need_hopper()
    torch.manual_seed(heads + page_size + (splits or 0) + len(seq_lens))
    q_nope, q_pe, cache, table, lens = make_case(seq_lens, heads, page_size)
    out = mla_decode_gluon(q_nope, q_pe, cache, table, lens, 0.0625, num_kv_splits=splits)
    ref = mla_decode_ref(q_nope, q_pe, cache, table, lens, 0.0625)
    assert out.shape == q_nope.shape and out.dtype == torch.bfloat16
    for b in range(len(seq_lens)):  # per sequence, so one broken length is named
        assert rel_err(out[b], ref[b]) < 1e-2, f"sequence {b} (len {seq_lens[b]})"


@pytest.mark.gpu
def test_mla_decode_gluon_strided_queries() -> None:
    # q_nope as a view with a head stride != 512 (e.g. the W_UK bmm's [H, B, D] output transposed).
    _need_hopper()
    torch.manual_seed(7)
    q_nope, q_pe, cache, table, lens = make_case([200, 77, 1], 128, 64)
    q_t = q_nope.transpose(0, 1).contiguous().transpose(0, 1)  # [B, H, D], strides (512, B * 512, 1)
    out = mla_decode_gluon(q_t, q_pe, cache, table, lens, 0.0625, num_kv_splits=2)
    ref = mla_decode_ref(q_nope, q_pe, cache, table, lens, 0.0625)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, None])
def test_mla_decode_gluon_extend_rows(splits: int | None) -> None:
    # Extend: every new token is a query row with its own causal length, reading its sequence's page-table row.
    _need_hopper()
    from baleen.kernels.mla_extend import extend_rows, mla_extend_ref

    torch.manual_seed(11)
    prefix, extend = [0, 700, 64, 1], [130, 3, 64, 1]
    q_nope, q_pe, cache, table, _ = make_case([p + e for p, e in zip(prefix, extend)], 128, 64)
    num_tokens = sum(extend)
    q_nope = torch.randn(num_tokens, 128, D_LATENT, device="cuda").to(torch.bfloat16)
    q_pe = torch.randn(num_tokens, 128, D_ROPE, device="cuda").to(torch.bfloat16)
    qo = torch.tensor([0, *torch.tensor(extend).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    lens = torch.tensor([p + e for p, e in zip(prefix, extend)], dtype=torch.int32, device="cuda")
    seq_idx, kv_lens = extend_rows(qo, lens, num_tokens)
    out = mla_decode_gluon(q_nope, q_pe, cache, table, kv_lens, 0.0625, num_kv_splits=splits, seq_idx=seq_idx)
    ref = mla_extend_ref(q_nope, q_pe, cache, table, qo, lens, 0.0625)
    for i in range(len(prefix)):
        a, b = int(qo[i]), int(qo[i + 1])
        assert rel_err(out[a:b], ref[a:b]) < 1e-2, f"sequence {i} (prefix {prefix[i]}, extend {extend[i]})"


def test_gluon_mla_decode_unsupported_on_cpu() -> None:
    assert not gluon_mla_decode_supported("cpu", 128, D_LATENT, D_ROPE, 64)
    q = torch.zeros(1, 128, D_LATENT, dtype=torch.bfloat16)
    cache = torch.zeros(2, 64, D_LATENT + D_ROPE, dtype=torch.bfloat16)
    one = torch.ones(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="use mla_decode"):
        mla_decode_gluon(q, q[..., :D_ROPE].contiguous(), cache, one, one[0], 0.1)
