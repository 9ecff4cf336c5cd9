"""Per-token-group FP8 quantization of activations against its torch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_quant_close

from baleen.kernels.act_quant import (
    dequant_token_groups,
    per_token_group_quant_fp8,
    per_token_group_quant_fp8_ref,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton interpreter runs the kernels on CPU


@pytest.mark.parametrize("shape", [(1, 128), (5, 300), (17, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_token_group_quant_matches_ref(shape: tuple[int, int], dtype: torch.dtype) -> None:
    torch.manual_seed(shape[0])
    x = (torch.randn(shape) * torch.rand(shape[0], 1) * 10).to(dtype).to(DEV)
    x[0, :7] = 0.0  # a partly-zero group
    q, s = per_token_group_quant_fp8(x)
    qr, sr = per_token_group_quant_fp8_ref(x)
    assert s.shape == (shape[0], (shape[1] + 127) // 128)
    assert_quant_close(q, s, qr, sr)
    # Round trip: every value within half an e4m3 step (relative 1/16) of the input, plus subnormal slack.
    back = dequant_token_groups(q, s)
    assert ((back - x.float()).abs() <= x.float().abs() / 16 + s.repeat_interleave(128, 1)[:, : shape[1]] * 2**-9).all()


def test_quant_column_major_padded_layout() -> None:
    torch.manual_seed(5)
    x = torch.randn(6, 300).to(DEV)
    q, s = per_token_group_quant_fp8(x)
    qp, sp = per_token_group_quant_fp8(x, column_major_scales=True, pad_rows_to=4)
    assert qp.shape == (8, 300) and sp.shape == (8, 3) and sp.stride() == (1, 8)
    assert torch.equal(qp[:6].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(sp[:6], s)
    assert (qp[6:].float() == 0).all() and (sp[6:] > 0).all()
    with pytest.raises(ValueError, match="pad_rows_to"):
        per_token_group_quant_fp8(x, pad_rows_to=0)
