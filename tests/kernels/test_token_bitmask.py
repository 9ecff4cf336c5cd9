"""The token-bitmask kernel against its torch twin (Triton interpreter on CPU, the GPU when present)."""

from __future__ import annotations

import pytest
import torch

from baleen.kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_ref, unpack_bitmask

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("vocab", "dtype"), [(100, torch.float32), (1100, torch.float16)])
def test_bitmask_kernel_matches_torch(vocab: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(vocab)
    n, words = 5, -(-vocab // 32) + 1  # one spare word: bits past the vocabulary are ignored
    logits = torch.randn(n, vocab, generator=gen).to(dtype)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), generator=gen, dtype=torch.int64).to(torch.int32)
    bitmask[1] = -1  # every token allowed
    rows = torch.tensor([4, 0, 2])
    want = apply_token_bitmask_ref(logits.clone(), bitmask, rows)
    got = apply_token_bitmask(logits.to(DEV), bitmask.to(DEV), rows.to(DEV)).cpu()
    assert torch.equal(got, want)
    allowed = unpack_bitmask(bitmask, vocab)
    assert torch.equal(torch.isinf(want[4]), ~allowed[0])  # masked exactly where the bit is 0
    assert torch.equal(want[0], logits[0]) and torch.equal(want[1], logits[1])  # all allowed; not a mask row


def test_bitmask_bit_order() -> None:
    bitmask = torch.zeros(1, 2, dtype=torch.int32)
    bitmask[0, 0] = 1 << 3
    bitmask[0, 1] = -(2**31)  # bit 31 of word 1: token 63
    logits = apply_token_bitmask_ref(torch.zeros(1, 64), bitmask, torch.tensor([0]))
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [3, 63]


def test_bitmask_rejects_bad_shapes() -> None:
    logits = torch.zeros(2, 64)
    with pytest.raises(ValueError, match="int32"):
        apply_token_bitmask(logits, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0]))
    with pytest.raises(ValueError, match="rows"):
        apply_token_bitmask(logits, torch.zeros(1, 2, dtype=torch.int32), torch.tensor([0], dtype=torch.int32))
