"""A decode step's inputs, derived on the device from each row's slot and length in one launch.

A decode row (one new token after a cached prefix) is fully described by its slot and its new sequence
length: the input token is the slot's last sampled token, the position is length - 1, the KV slot comes
from the slot's page table. Doing that derivation inside the CUDA graph leaves the host one copy per step
(slots and lengths) instead of a dozen small launches of index arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def decode_prep_kernel(
    rows_ptr,
    slot_tokens_ptr,
    page_table_ptr,
    input_ids_ptr,
    positions_ptr,
    seq_lens_ptr,
    out_loc_ptr,
    rows_page_table_ptr,
    stride_rows,
    stride_pt,
    stride_rpt,
    PAGE_SIZE: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # One program per row; row r of rows_ptr starts (slot, new sequence length) as int64.
    r = tl.program_id(0)
    slot = tl.load(rows_ptr + r * stride_rows)
    seq_len = tl.load(rows_ptr + r * stride_rows + 1)
    pos = seq_len - 1
    tl.store(input_ids_ptr + r, tl.load(slot_tokens_ptr + slot))
    tl.store(positions_ptr + r, pos)
    tl.store(seq_lens_ptr + r, seq_len.to(tl.int32))
    src = page_table_ptr + slot * stride_pt
    page = tl.load(src + pos // PAGE_SIZE).to(tl.int64)
    tl.store(out_loc_ptr + r, page * PAGE_SIZE + pos % PAGE_SIZE)
    # Only the pages the row uses are copied; entries past them are never read (seq_lens bounds them).
    offs = tl.arange(0, BLOCK_P)
    used = (seq_len + PAGE_SIZE - 1) // PAGE_SIZE
    for p0 in range(0, used, BLOCK_P):
        p = p0 + offs
        tl.store(rows_page_table_ptr + r * stride_rpt + p, tl.load(src + p, mask=p < used), mask=p < used)


def decode_prep(
    rows: torch.Tensor,
    slot_tokens: torch.Tensor,
    page_table: torch.Tensor,
    page_size: int,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    seq_lens: torch.Tensor,
    out_loc: torch.Tensor,
    rows_page_table: torch.Tensor,
) -> None:
    """Fill the step's inputs in place from rows [n, >= 2] int64 (slot, new sequence length >= 1, ...).

    slot_tokens [num_slots] int64 and page_table [num_slots, max_pages] int32 are the per-slot state;
    outputs: input_ids [n] int64, positions [n] int64, seq_lens [n] int32, out_loc [n] int64 (cache row of
    the new token), rows_page_table [n, >= pages used] int32 (each row's page-table row).
    """
    n = rows.shape[0]
    if rows.dim() != 2 or rows.shape[1] < 2 or rows.dtype != torch.int64 or rows.stride(1) != 1:
        raise ValueError(f"rows must be int64 [n, >= 2] with unit column stride, got {rows.dtype} {tuple(rows.shape)}")
    if page_table.stride(1) != 1 or rows_page_table.stride(1) != 1:
        raise ValueError("page tables must be contiguous along their pages")
    if n == 0:
        return
    decode_prep_kernel[(n,)](
        rows, slot_tokens, page_table, input_ids, positions, seq_lens, out_loc, rows_page_table, rows.stride(0),
        page_table.stride(0), rows_page_table.stride(0), PAGE_SIZE=page_size, BLOCK_P=256, num_warps=1,
    )  # fmt: skip


def decode_prep_ref(
    rows: torch.Tensor, slot_tokens: torch.Tensor, page_table: torch.Tensor, page_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch twin: (input_ids, positions, seq_lens int32, out_loc, rows' page-table rows)."""
    slots, seq_lens = rows[:, 0], rows[:, 1]
    pos = seq_lens - 1
    table = page_table[slots]  # [n, max_pages]
    out_loc = table.gather(1, (pos // page_size)[:, None])[:, 0].to(torch.int64) * page_size + pos % page_size
    return slot_tokens[slots], pos, seq_lens.to(torch.int32), out_loc, table
