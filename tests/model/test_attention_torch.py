"""The torch backend's absorbed attention in key blocks (online softmax) equals the one-shot reference."""

from __future__ import annotations

import pytest
import torch

from baleen.kernels.mla_extend import mla_extend_ref
from baleen.model.attention import TorchAttentionBackend
from baleen.model.batch import ForwardBatch


def _case(prefix_lens: list[int], extend_lens: list[int], heads: int = 3, rank: int = 40, rope: int = 12,
          page_size: int = 4, seed: int = 0) -> tuple[ForwardBatch, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tables, next_page = [], 1
    for p, e in zip(prefix_lens, extend_lens):
        n = -(-(p + e) // page_size)
        tables.append(list(range(next_page, next_page + n))[::-1])  # pages out of order
        next_page += n
    num_tokens = sum(extend_lens)
    batch = ForwardBatch.build(list(range(num_tokens)), prefix_lens, extend_lens, tables, page_size)
    cache = torch.randn(next_page, page_size, rank + rope, generator=gen)
    q_latent = torch.randn(num_tokens, heads, rank, generator=gen)
    q_pe = torch.randn(num_tokens, heads, rope, generator=gen)
    return batch, cache, q_latent, q_pe


@pytest.mark.parametrize("budget", [1, 64, 1 << 26])  # 16 keys a block (the floor), a few blocks, one block
def test_blocked_absorbed_matches_reference(budget: int) -> None:
    batch, cache, q_latent, q_pe = _case([0, 37, 5, 90], [6, 1, 11, 3])
    attn = TorchAttentionBackend(score_budget=budget)
    attn.plan(batch)
    out = attn.run_absorbed(q_latent, q_pe, cache, 0.3)
    ref = mla_extend_ref(q_latent, q_pe, cache, batch.page_table, batch.qo_indptr, batch.seq_lens, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix_lens, extend_lens", [
    ([40, 0, 7, 90, 3], [1, 24, 1, 1, 9]),  # decode rows beside prefill chunks: two layouts
    ([5, 9, 30], [1, 1, 1]),  # decode rows only
    ([0, 12], [7, 5]),  # chunks only
], ids=["mixed", "decode", "chunks"])  # fmt: skip
def test_mixed_steps_run_decode_rows_apart_and_match(prefix_lens: list[int], extend_lens: list[int]) -> None:
    batch, cache, q_latent, q_pe = _case(prefix_lens, extend_lens, seed=1)
    attn = TorchAttentionBackend(score_budget=256)
    attn.plan(batch)
    mixed = 1 in extend_lens and max(extend_lens) > 1
    assert len(attn._absorbed_plans) == (2 if mixed else 1)
    out = attn.run_absorbed(q_latent, q_pe, cache, 0.3)
    ref = mla_extend_ref(q_latent, q_pe, cache, batch.page_table, batch.qo_indptr, batch.seq_lens, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_key_blocks_bound_the_scores_not_the_prefix() -> None:
    attn = TorchAttentionBackend(score_budget=1 << 20)
    # 128 heads x 512 new tokens: 16 keys a block whatever the prefix; one row: the whole budget.
    assert attn.key_block(128 * 512) == 16
    assert attn.key_block(1) == 1 << 20
