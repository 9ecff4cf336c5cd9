"""The kernels on the prefill path do not specialise on token counts (issue 20): Triton ignores a
`do_not_specialize` name that is no parameter, so each one is checked here against its kernel's signature."""

from __future__ import annotations

from typing import Any

import pytest

from baleen.kernels import act_quant, fp8_gemm, fp8_skinny, fused_moe, mla_decode, split_k

UNSPECIALISED = [
    (act_quant.per_token_group_quant_fp8_kernel, {"M", "stride_sm", "stride_sg"}),
    (fp8_gemm.w8a8_block_fp8_matmul_kernel, {"M", "k_blocks_per_split", "num_splits"}),
    (fp8_gemm.w8a8_block_fp8_matmul_tma_kernel, {"M", "k_blocks_per_split", "num_splits"}),
    (split_k.splitk_reduce_kernel, {"num_splits"}),
    (fp8_skinny.fp8_skinny_gemm_kernel, {"M", "k_per_split", "num_splits"}),
    (fused_moe.moe_align_kernel, {"num_slots", "max_blocks"}),
    (fused_moe.fused_moe_kernel, {"num_slots"}),
    (mla_decode.mla_decode_kernel, {"num_splits", "stride_pt_b", "stride_lse_b", "stride_lse_h"}),
    (mla_decode.mla_decode_tokm_kernel, {"num_splits", "stride_pt_b", "stride_lse_b", "stride_lse_h"}),
    (mla_decode.mla_decode_merge_kernel, {"num_splits", "stride_lse_b", "stride_lse_h"}),
]


def _names(kernel: Any) -> tuple[set[str], list[str]]:
    """(the kernel's parameters, its do_not_specialize list): a JITFunction, or the interpreter's stand-in."""
    if hasattr(kernel, "params"):
        return {p.name for p in kernel.params}, list(kernel.do_not_specialize)
    return set(kernel.arg_names), list(kernel.kwargs["do_not_specialize"])


@pytest.mark.parametrize("kernel,expected", UNSPECIALISED, ids=lambda k: getattr(k, "__name__", ""))
def test_token_counts_are_not_specialised(kernel: Any, expected: set[str]) -> None:
    params, unspecialised = _names(kernel)
    assert set(unspecialised) == expected and expected <= params
