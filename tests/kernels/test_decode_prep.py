"""The in-graph decode input prep against its torch twin (Triton interpreter on CPU, the GPU when present)."""

from __future__ import annotations

import pytest
import torch

from baleen.kernels.decode_prep import decode_prep, decode_prep_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("page_size", [1, 4, 64])
def test_decode_prep_matches_torch(page_size: int) -> None:
    gen = torch.Generator().manual_seed(page_size)
    num_slots, max_pages = 6, 300  # 300 pages: the page copy takes two 256-wide steps at page size 1
    page_table = torch.randint(1, 1000, (num_slots + 1, max_pages), generator=gen, dtype=torch.int32)
    page_table[num_slots] = 0  # the scratch slot: the padding page only
    slot_tokens = torch.randint(0, 5000, (num_slots + 1,), generator=gen)
    cap = max_pages * page_size
    rows = torch.tensor([[3, cap], [0, 1], [5, page_size + 1], [num_slots, 1], [1, min(cap, 2 * page_size)]])
    rows = torch.cat([rows, torch.full((5, 2), -1)], dim=1).to(DEV)  # [n, 4]: prep reads the first two columns
    n = rows.shape[0]
    outs = (torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int32),
            torch.zeros(n, dtype=torch.int64), torch.full((n, max_pages), -1, dtype=torch.int32))  # fmt: skip
    ids, pos, lens, loc, table = (t.to(DEV) for t in outs)
    decode_prep(rows, slot_tokens.to(DEV), page_table.to(DEV), page_size, ids, pos, lens, loc, table)
    want = decode_prep_ref(rows.cpu(), slot_tokens, page_table, page_size)
    for got, ref in zip((ids, pos, lens, loc), want[:4]):
        assert torch.equal(got.cpu(), ref)
    for r in range(n):  # the pages a row uses are copied; the rest is left alone
        used = -(-int(rows[r, 1]) // page_size)
        assert torch.equal(table[r, :used].cpu(), want[4][r, :used])
        assert (table[r, used:] == -1).all()
    assert int(loc[3]) < page_size  # the scratch row writes into the padding page


def test_decode_prep_rejects_bad_rows() -> None:
    z = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="int64"):
        decode_prep(torch.zeros(2, 2, dtype=torch.int32), z, torch.zeros(2, 2, dtype=torch.int32), 4, z, z,
                    z.int(), z, torch.zeros(2, 2, dtype=torch.int32))  # fmt: skip
