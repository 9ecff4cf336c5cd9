"""Absorbed-MLA extend (several new tokens per sequence) against its torch reference and decode."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import rel_err

from baleen.kernels.mla_decode import MlaDecodeTiles, mla_decode
from baleen.kernels.mla_extend import extend_rows, mla_extend, mla_extend_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton interpreter runs the kernels on CPU



def make_case(
    prefix_lens: list[int], extend_lens: list[int], heads: int, d_latent: int, d_rope: int, page_size: int,
    dtype: torch.dtype, device: str,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    pages_per_seq = [(n + page_size - 1) // page_size for n in seq_lens]
    num_pages = sum(pages_per_seq) + 3
    perm = torch.randperm(num_pages).tolist()
    table = torch.zeros(len(seq_lens), max(pages_per_seq) + 1, dtype=torch.int32)
    at = 0
    for i, p in enumerate(pages_per_seq):
        table[i, :p] = torch.tensor(perm[at : at + p], dtype=torch.int32)
        at += p
    num_tokens = sum(extend_lens)
    qo = torch.tensor([0, *torch.tensor(extend_lens).cumsum(0).tolist()], dtype=torch.int32)
    cache = torch.randn(num_pages, page_size, d_latent + d_rope, device=device).to(dtype)
    q_nope = torch.randn(num_tokens, heads, d_latent, device=device).to(dtype)
    q_pe = torch.randn(num_tokens, heads, d_rope, device=device).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return q_nope, q_pe, cache, table.to(device), qo.to(device), lens


def test_extend_rows() -> None:
    # extend_rows is pure torch: CPU on every machine.
    qo = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    seq_lens = torch.tensor([10, 1, 5], dtype=torch.int32)
    seq_idx, kv_lens = extend_rows(qo, seq_lens, 6)
    assert seq_idx.tolist() == [0, 0, 0, 1, 2, 2]
    assert kv_lens.tolist() == [8, 9, 10, 1, 4, 5]
    assert extend_rows(qo, seq_lens, 6, causal=False)[1].tolist() == [10, 10, 10, 1, 5, 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("page_size,splits,causal", [(1, 1, True), (16, 2, True), (8, 1, False)])
def test_mla_extend_matches_ref(dtype: torch.dtype, page_size: int, splits: int, causal: bool) -> None:
    torch.manual_seed(page_size + splits)
    case = make_case([0, 21, 5], [4, 3, 1], 3, 64, 32, page_size, dtype, DEV)
    out = mla_extend(*case, 0.15, causal, splits, tiles=MlaDecodeTiles(16, 16, 4, 1))
    ref = mla_extend_ref(*case, 0.15, causal)
    # NOTE: on CUDA, Triton's fp32 tl.dot runs in TF32, whose 10-bit mantissa is fp16's: the fp16 tolerance
    # (an emulation with truncated TF32 operands gave rel_err <= 6e-4 on these shapes).
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 and DEV == "cpu" else 2e-3)


def test_mla_extend_of_one_token_is_decode() -> None:
    torch.manual_seed(9)
    q_nope, q_pe, cache, table, qo, lens = make_case([7, 30], [1, 1], 2, 64, 32, 8, torch.float32, DEV)
    tiles = MlaDecodeTiles(16, 16, 4, 1)
    out = mla_extend(q_nope, q_pe, cache, table, qo, lens, 0.2, tiles=tiles)
    torch.testing.assert_close(out, mla_decode(q_nope, q_pe, cache, table, lens, 0.2, tiles=tiles))


@pytest.mark.gpu
@pytest.mark.parametrize("heads,page_size", [(128, 64), (16, 1)])
def test_mla_extend_gpu(heads: int, page_size: int) -> None:
    torch.manual_seed(heads)
    case = make_case([0, 3000, 517], [64, 8, 3], heads, 512, 64, page_size, torch.bfloat16, "cuda")
    out = mla_extend(*case, 0.0722)
    assert rel_err(out, mla_extend_ref(*case, 0.0722)) < 2e-2
