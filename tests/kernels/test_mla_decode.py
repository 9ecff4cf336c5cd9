"""MLA decode over the paged latent cache (Triton) against the torch reference, and FlashInfer on GPU."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_checks import rel_err

from baleen.kernels.flashinfer_mla import page_table_to_csr
from baleen.kernels.mla_decode import (
    MlaDecodeTiles,
    merge_splits,
    mla_decode,
    mla_decode_ref,
    pick_merge_blocks,
    pick_num_kv_splits,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton interpreter runs the kernels on CPU
# NOTE: on CUDA, Triton's fp32 tl.dot runs in TF32, whose 10-bit mantissa is fp16's: fp32 gets fp16's tolerance
# (an emulation with truncated TF32 operands gave rel_err <= 6e-4 on these shapes).
FP32_TOL = 1e-5 if DEV == "cpu" else 2e-3



def make_case(
    seq_lens: list[int], heads: int, d_latent: int, d_rope: int, page_size: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, ...]:
    """Random queries and a cache whose pages are shuffled across sequences (plus unused pages)."""
    batch = len(seq_lens)
    pages_per_seq = [(n + page_size - 1) // page_size for n in seq_lens]
    num_pages = sum(pages_per_seq) + 5
    perm = torch.randperm(num_pages).tolist()
    table = torch.zeros(batch, max(pages_per_seq) + 2, dtype=torch.int32)
    at = 0
    for b, p in enumerate(pages_per_seq):
        table[b, :p] = torch.tensor(perm[at : at + p], dtype=torch.int32)
        at += p
    cache = torch.randn(num_pages, page_size, d_latent + d_rope, device=device).to(dtype)
    q_nope = torch.randn(batch, heads, d_latent, device=device).to(dtype)
    q_pe = torch.randn(batch, heads, d_rope, device=device).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return q_nope, q_pe, cache, table.to(device), lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "page_size,splits,split_dv", [(1, 1, False), (1, 3, True), (16, 2, False), (32, 4, True), (4, 1, False)]
)
def test_mla_decode_matches_ref(dtype: torch.dtype, page_size: int, splits: int, split_dv: bool) -> None:
    torch.manual_seed(page_size * 10 + splits)
    q_nope, q_pe, cache, table, lens = make_case([1, 40, 77], 5, 64, 32, page_size, dtype, DEV)
    tiles = MlaDecodeTiles(16, 16, 4, 1, split_dv=split_dv)
    out = mla_decode(q_nope, q_pe, cache, table, lens, 0.1, num_kv_splits=splits, tiles=tiles)
    ref = mla_decode_ref(q_nope, q_pe, cache, table, lens, 0.1)
    assert out.shape == q_nope.shape and out.dtype == dtype
    assert rel_err(out, ref) < (FP32_TOL if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize(
    "page_size,splits,tiles",
    [
        (1, 3, MlaDecodeTiles(16, 16, 4, 1, tokens_on_m=True)),  # pointer loads, gathered rows
        (16, 2, MlaDecodeTiles(16, 16, 4, 1, tokens_on_m=True, tma=True)),  # whole-block TMA loads
        (32, 1, MlaDecodeTiles(16, 16, 4, 1, tokens_on_m=True, tma=True)),  # TMA, one split (no merge)
        (8, 2, MlaDecodeTiles(16, 16, 4, 1, tokens_on_m=True, tma=True)),  # page < block: pointer fallback
    ],
)
def test_mla_decode_tokens_on_m_matches_ref(page_size: int, splits: int, tiles: MlaDecodeTiles) -> None:
    torch.manual_seed(page_size + splits)
    q_nope, q_pe, cache, table, lens = make_case([1, 40, 77], 5, 64, 32, page_size, torch.float16, DEV)
    # Rows past each sequence's end in its last page hold large finite junk (another token's data):
    # TMA reads them whole, so only the score mask keeps them out.
    for b, n in enumerate(lens.tolist()):
        last = int(table[b, (n - 1) // page_size])
        cache[last, (n - 1) % page_size + 1 :] = 1000.0
    out = mla_decode(q_nope, q_pe, cache, table, lens, 0.1, num_kv_splits=splits, tiles=tiles)
    ref = mla_decode_ref(q_nope, q_pe, cache, table, lens, 0.1)
    assert out.shape == q_nope.shape and out.dtype == torch.float16
    assert rel_err(out, ref) < 2e-3


def test_mla_decode_tokens_on_m_extend_rows() -> None:
    # seq_idx: several query rows read one page-table row with their own causal lengths.
    q_nope, q_pe, cache, table, _ = make_case([50], 3, 64, 32, 16, torch.float32, DEV)
    rows = torch.tensor([17, 33, 50], dtype=torch.int32, device=DEV)
    q_nope = q_nope.expand(3, -1, -1).contiguous() + torch.randn(3, 3, 64, device=DEV)
    q_pe = q_pe.expand(3, -1, -1).contiguous()
    tiles = MlaDecodeTiles(16, 16, 4, 1, tokens_on_m=True, tma=True)
    seq_idx = torch.zeros(3, dtype=torch.int32, device=DEV)
    out = mla_decode(q_nope, q_pe, cache, table, rows, 0.1, num_kv_splits=2, tiles=tiles, seq_idx=seq_idx)
    ref = mla_decode_ref(q_nope, q_pe, cache, table.expand(3, -1), rows, 0.1)
    assert rel_err(out, ref) < FP32_TOL


def test_mla_decode_more_splits_than_blocks() -> None:
    # 40 splits of a 20-token sequence: most splits are empty and must get no weight in the merge,
    # and the merge walks the splits in several chunks.
    q_nope, q_pe, cache, table, lens = make_case([20, 3], 2, 64, 32, 8, torch.float32, DEV)
    out = mla_decode(q_nope, q_pe, cache, table, lens, 0.2, num_kv_splits=40, tiles=MlaDecodeTiles(16, 16, 4, 1))
    assert rel_err(out, mla_decode_ref(q_nope, q_pe, cache, table, lens, 0.2)) < FP32_TOL


@pytest.mark.parametrize("heads,d_latent,splits", [(12, 64, 3), (2, 40, 9), (128, 32, 2)])
def test_merge_splits_matches_torch(heads: int, d_latent: int, splits: int) -> None:
    # Random partials and log2-domain LSEs; ragged lengths leave trailing splits unwritten (NaN here):
    # the merge must read only the splits that the decode kernels cut from seq_len.
    torch.manual_seed(heads + splits)
    seq_lens = [1, 9, 64, 200, 1000][: 2 + splits % 3]
    batch, block_n = len(seq_lens), 8
    o_part = torch.full((batch, heads, splits, d_latent), float("nan"))
    lse = torch.full((batch, heads, splits), float("nan"))
    want = torch.empty(batch, heads, d_latent)
    for b, n in enumerate(seq_lens):
        chunk = math.ceil(math.ceil(n / splits) / block_n) * block_n
        active = math.ceil(n / chunk)
        o_part[b, :, :active] = torch.randn(heads, active, d_latent)
        lse[b, :, :active] = torch.randn(heads, active) * 4
        w = torch.softmax(lse[b, :, :active] * torch.log(torch.tensor(2.0)), dim=1)
        want[b] = (w[..., None] * o_part[b, :, :active]).sum(1)
    out = torch.empty(batch, heads, d_latent, device=DEV)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    merge_splits(o_part.to(DEV), lse.to(DEV), out, lens, splits, block_n)
    assert rel_err(out.cpu(), want) < 1e-5


def test_merge_blocks() -> None:
    # ~4096 floats a step, then narrower until two programs an SM; the head block divides the head count.
    assert pick_merge_blocks(32, 128, 512, 2, 132) == (2, 4, 512)
    assert pick_merge_blocks(16, 128, 512, 4, 132) == (4, 2, 512)
    assert pick_merge_blocks(1, 128, 512, 32, 132) == (32, 1, 128)  # all 32 splits in one step
    assert pick_merge_blocks(1, 16, 512, 64, 132) == (32, 1, 128)
    assert pick_merge_blocks(8, 12, 512, 2, 132) == (2, 1, 128)
    assert pick_merge_blocks(64, 12, 512, 2, 132) == (2, 2, 512)


def test_mla_decode_rejects_bad_layout() -> None:
    # check_mla_decode_inputs is mla_decode's first step: these raise before any launch.
    q_nope, q_pe, cache, table, lens = make_case([5], 2, 64, 32, 4, torch.float32, DEV)
    with pytest.raises(ValueError, match="cache rows"):
        mla_decode(q_nope, q_pe, cache[..., :80], table, lens, 0.1)
    with pytest.raises(ValueError, match="int32"):
        mla_decode(q_nope, q_pe, cache, table.long(), lens, 0.1)


def test_split_heuristic() -> None:
    # 64-head programs: about one wave; 16-head programs: about two.
    assert pick_num_kv_splits(128, 2, 4096, 132, block_h=64) == 1
    assert pick_num_kv_splits(32, 2, 4096, 132, block_h=64) == 2
    assert pick_num_kv_splits(128, 1, 4096, 132, block_h=16) == 2
    assert pick_num_kv_splits(32, 1, 4096, 132, block_h=16) == 8
    assert pick_num_kv_splits(1, 1, 4096, 132) == 64  # capped at 64 tokens per split
    assert pick_num_kv_splits(1, 1, 100, 132) == 1
    assert pick_num_kv_splits(1, 2, 8192, 132, block_h=64) == 32  # 64-head programs: at most 32 splits
    assert pick_num_kv_splits(16, 2, 4096, 132, block_h=64) == 4


def test_page_table_to_csr() -> None:
    table = torch.tensor([[4, 7, 9, 0], [2, 0, 0, 0], [5, 6, 1, 3]], dtype=torch.int32)
    indptr, indices = page_table_to_csr(table, [9, 1, 16], 4)
    assert indptr.tolist() == [0, 3, 4, 8]
    assert indices.tolist() == [4, 7, 9, 2, 5, 6, 1, 3]


# --------------------------------------------------------------------------------------------- GPU


GPU_CASES = [(128, 64, [4096, 1000, 17, 2500]), (16, 1, [8192, 300, 1]), (128, 1, [5, 700]), (16, 64, [3000] * 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("heads,page_size,seq_lens", GPU_CASES)
def test_mla_decode_gpu(heads: int, page_size: int, seq_lens: list[int]) -> None:
    torch.manual_seed(heads + page_size)
    q_nope, q_pe, cache, table, lens = make_case(seq_lens, heads, 512, 64, page_size, torch.bfloat16, "cuda")
    ref = mla_decode_ref(q_nope, q_pe, cache, table, lens, 0.0722)
    for splits in (None, 1, 5):
        out = mla_decode(q_nope, q_pe, cache, table, lens, 0.0722, num_kv_splits=splits)
        assert rel_err(out, ref) < 2e-2, splits
    tokm = (MlaDecodeTiles(64, 128, 8, 1, tokens_on_m=True), MlaDecodeTiles(64, 64, 8, 2, tokens_on_m=True, tma=True),
            MlaDecodeTiles(32, 64, 4, 2, tokens_on_m=True, tma=True))  # fmt: skip
    for tiles in (MlaDecodeTiles(64, 64, 4, 2, split_dv=True), MlaDecodeTiles(16, 64, 4, 2), *tokm):
        out = mla_decode(q_nope, q_pe, cache, table, lens, 0.0722, num_kv_splits=3, tiles=tiles)
        assert rel_err(out, ref) < 2e-2, tiles


@pytest.mark.gpu
@pytest.mark.parametrize("heads,page_size,seq_lens", GPU_CASES)
def test_flashinfer_mla_gpu(heads: int, page_size: int, seq_lens: list[int]) -> None:
    pytest.importorskip("flashinfer")
    from baleen.kernels.flashinfer_mla import FlashInferMLA

    torch.manual_seed(heads + page_size + 1)
    q_nope, q_pe, cache, table, lens = make_case(seq_lens, heads, 512, 64, page_size, torch.bfloat16, "cuda")
    fi = FlashInferMLA("cuda")
    fi.plan(table, seq_lens, heads, page_size, 0.0722, torch.bfloat16)
    out = fi.run(q_nope, q_pe, cache)
    assert rel_err(out, mla_decode_ref(q_nope, q_pe, cache, table, lens, 0.0722)) < 2e-2
