"""Structured output's token mask: the rows a grammar constrains get -inf wherever their bitmask bit is 0.

The bitmask is xgrammar's layout: row i holds ceil(vocab / 32) int32 words, bit b of word w allows token
32 * w + b. Only the constrained rows of a batch carry a bitmask; `rows` says which logits row each one masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BITS = 32  # tokens per bitmask word


@triton.jit
def apply_token_bitmask_kernel(
    logits_ptr,
    bitmask_ptr,
    rows_ptr,
    vocab_size,
    num_words,
    stride_logits,
    BLOCK: tl.constexpr,
):
    # Program (i, b): bitmask row i, vocab ids [b * BLOCK, (b + 1) * BLOCK) of logits row rows[i].
    i = tl.program_id(0)
    b = tl.program_id(1)
    row = tl.load(rows_ptr + i)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    inside = offs < vocab_size
    words = tl.load(bitmask_ptr + i * num_words + offs // 32, mask=inside, other=0)
    allowed = (words >> (offs % 32)) & 1  # an arithmetic shift still leaves bit k at position 0
    tl.store(logits_ptr + row * stride_logits + offs, float("-inf"), mask=inside & (allowed == 0))


def _check(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [n, vocab] with unit stride along vocab, got {tuple(logits.shape)}")
    k = rows.shape[0]
    words = -(-logits.shape[1] // BITS)
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2 or bitmask.shape[0] != k or bitmask.shape[1] < words:
        raise ValueError(f"bitmask must be int32 [{k}, >= {words}], got {bitmask.dtype} {tuple(bitmask.shape)}")
    if rows.dim() != 1 or rows.dtype != torch.int64:
        raise ValueError(f"rows must be int64 [k], got {rows.dtype} {tuple(rows.shape)}")


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Set logits[rows[i], t] = -inf wherever bit t of bitmask[i] is 0, in place; returns `logits`.

    logits [n, vocab] float (unit stride along vocab); bitmask [k, >= ceil(vocab / 32)] int32, contiguous;
    rows [k] int64, distinct indices into logits. Bits past `vocab` are ignored.
    """
    _check(logits, bitmask, rows)
    k, vocab = rows.shape[0], logits.shape[1]
    if k == 0:
        return logits
    bitmask = bitmask.contiguous()
    block = 1024
    grid = (k, triton.cdiv(vocab, block))
    apply_token_bitmask_kernel[grid](logits, bitmask, rows, vocab, bitmask.shape[1], logits.stride(0), BLOCK=block,
                                     num_warps=4)  # fmt: skip
    return logits


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bitmask [k, words] int32 -> allowed [k, vocab_size] bool."""
    shifts = torch.arange(BITS, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.to(torch.int32)[:, :, None] >> shifts) & 1  # [k, words, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The pure-torch twin of `apply_token_bitmask` (the CPU path)."""
    _check(logits, bitmask, rows)
    if rows.shape[0] == 0:
        return logits
    allowed = unpack_bitmask(bitmask, logits.shape[1])  # [k, vocab]
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits
