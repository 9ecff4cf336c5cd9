"""The FP8-MMA Gluon MLA decode kernel (e4m3 q, P and cache) against its float32 emulation and the exact reference.

CPU: the emulation's own error against exact attention, and the V^T row permutation the kernel loads by."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import rel_err
from test_mla_decode_gluon import D_LATENT, D_ROPE, FP8_CASES, make_case, make_extend_case, to_fp8

from baleen.kernels.mla_decode import mla_decode_ref
from baleen.kernels.mla_decode_gluon import gluon_mla_decode_supported
from baleen.kernels.mla_decode_gluon_fp8 import (
    FP8_MMA_VARIANTS,
    Fp8MmaVariant,
    mla_decode_fp8_math_ref,
    mla_decode_gluon_fp8,
)

SM_SCALE = 0.0625
# The kernel against its emulation: the same roundings, fp32 sums in another order (and the e4m3 rounding of a P
# that order moves across a boundary). Against exact attention over the same cache: q and P in e4m3. On these
# random cases the outputs are averages of zero-mean rows (small norms), and P's 3 mantissa bits (~3% an entry)
# give 2-5% relative error; on the trained model's activations it is ~2% a layer (docs/PERF.md).
EMULATION_TOL = 1e-2
EXACT_TOL = 6e-2


def _need_hopper() -> None:
    if not gluon_mla_decode_supported("cuda", 128, D_LATENT, D_ROPE, 64, torch.float8_e4m3fn):
        pytest.skip("needs an sm_90 GPU and a Triton with Gluon")


# ---- CPU --------------------------------------------------------------------------------------------------------


def test_vt_rows_are_a_permutation_matching_the_load_layout() -> None:
    # The kernel loads V^T's row m from latent column c(m) (`vt_column`): c must be a bijection of 0..255, and
    # _VT_LOAD_LAYOUT must be the wgmma A-operand layout with each row basis m replaced by c(m). The wgmma layout's
    # bases (PTX's m64nNk32 8-bit A fragment, 4 warps, M = 256, K = 64), as Triton 3.6's to_linear_layout gives them:
    from baleen.kernels import mla_decode_gluon_fp8 as k

    if not hasattr(k, "_VT_LOAD_LAYOUT"):
        pytest.skip("no Gluon in this Triton")
    dot_regs = [[0, 1], [0, 2], [8, 0], [0, 16], [0, 32], [64, 0], [128, 0]]
    dot_lanes = [[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]]
    dot_warps = [[16, 0], [32, 0]]
    col = k.vt_column
    assert sorted(col(m) for m in range(256)) == list(range(256))
    to_c = lambda bases: sorted((col(m), t) for m, t in bases)
    layout = k._VT_LOAD_LAYOUT.value
    assert sorted(map(tuple, layout.reg_bases)) == to_c(dot_regs)
    assert [tuple(b) for b in layout.lane_bases] == [(col(m), t) for m, t in dot_lanes]
    assert [tuple(b) for b in layout.warp_bases] == [(col(m), t) for m, t in dot_warps]
    # a thread's 8 rows (register bases along m) are 8 consecutive columns: one 8-byte load a token
    assert [tuple(b) for b in layout.reg_bases[:3]] == [(1, 0), (2, 0), (4, 0)]


@pytest.mark.parametrize("splits", [1, 3])
def test_fp8_math_emulation_close_to_exact(splits: int) -> None:
    # The emulation rounds q and P (so it is not the exact reference) and stays within EXACT_TOL of it.
    torch.manual_seed(splits)
    lens = [1, 64, 65, 700]
    q_nope, q_pe, cache, table, seq_lens = make_case(lens, 64, 64, device="cpu")
    cache8 = to_fp8(cache, 0.5)
    emu = mla_decode_fp8_math_ref(q_nope, q_pe, cache8, table, seq_lens, SM_SCALE, splits, kv_scale=0.5)
    ref = mla_decode_ref(q_nope, q_pe, cache8, table, seq_lens, SM_SCALE, kv_scale=0.5)
    for b in range(len(lens)):
        err = rel_err(emu[b], ref[b])
        assert err < EXACT_TOL, f"sequence {b} (len {lens[b]}): {err:.3g}"
    assert rel_err(emu, ref) > 1e-3  # q and P are rounded: not the exact attention


def test_fp8_math_emulation_zero_query_rows() -> None:
    # An all-zero query row has no amax: scale 1, scores 0, a uniform average of the values.
    torch.manual_seed(3)
    q_nope, q_pe, cache, table, lens = make_case([100], 64, 64, device="cpu")
    q_nope[0, 5].zero_()
    q_pe[0, 5].zero_()
    cache8 = to_fp8(cache, 1.0)
    emu = mla_decode_fp8_math_ref(q_nope, q_pe, cache8, table, lens, SM_SCALE)
    pos = torch.arange(100)
    rows = cache8[table[0, pos // 64].long(), pos % 64, :D_LATENT].float()
    torch.testing.assert_close(emu[0, 5].float(), rows.mean(0), rtol=2e-2, atol=2e-2)


def test_lazy_rescale_at_threshold_zero_is_the_eager_numerics() -> None:
    # Threshold 0 moves a row's max whenever it grows: the default kernel's roundings, bit for bit.
    torch.manual_seed(5)
    q_nope, q_pe, cache, table, lens = make_case([700, 65], 64, 64, device="cpu")
    cache8 = to_fp8(cache, 0.5)
    args = (q_nope, q_pe, cache8, table, lens, SM_SCALE, 2)
    eager = mla_decode_fp8_math_ref(*args, kv_scale=0.5)
    lazy0 = mla_decode_fp8_math_ref(*args, kv_scale=0.5, variant=Fp8MmaVariant(lazy_rescale=True))
    assert torch.equal(eager, lazy0)


@pytest.mark.parametrize("name", ["lazy0.8", "lazy2.8"])
def test_lazy_rescale_emulation_close_to_exact(name: str) -> None:
    # A lagging max keeps P <= 2^tau, P * p_scale <= 448: the error against exact attention stays the eager one's.
    torch.manual_seed(11)
    lens = [1, 64, 65, 700, 2000]
    q_nope, q_pe, cache, table, seq_lens = make_case(lens, 64, 64, device="cpu")
    cache8 = to_fp8(cache, 0.5)
    args = (q_nope, q_pe, cache8, table, seq_lens, SM_SCALE, 2)
    ref = mla_decode_ref(*args[:6], kv_scale=0.5)
    eager = mla_decode_fp8_math_ref(*args, kv_scale=0.5)
    lazy = mla_decode_fp8_math_ref(*args, kv_scale=0.5, variant=FP8_MMA_VARIANTS[name])
    for b in range(len(lens)):
        err, err_eager = rel_err(lazy[b], ref[b]), rel_err(eager[b], ref[b])
        assert err < EXACT_TOL and err < 1.5 * err_eager + 1e-3, f"sequence {b}: {err:.3g} (eager {err_eager:.3g})"
    assert not torch.equal(lazy, eager)  # the lagging max did change some roundings


def test_fp8_variant_refuses_what_would_leave_e4m3() -> None:
    Fp8MmaVariant(lazy_rescale=True, rescale_tau=0.8)  # 256 x 2^0.8 = 445.7
    with pytest.raises(ValueError, match="448"):
        Fp8MmaVariant(lazy_rescale=True, rescale_tau=1.0)  # 256 x 2 = 512
    with pytest.raises(ValueError, match="power of two"):
        Fp8MmaVariant(p_scale=100.0)
    with pytest.raises(ValueError, match="only with lazy_rescale"):
        Fp8MmaVariant(rescale_tau=0.5)


def test_fp8_kernel_refused_on_cpu() -> None:
    q = torch.zeros(1, 128, D_LATENT, dtype=torch.bfloat16)
    one = torch.ones(1, 1, dtype=torch.int32)
    cache8 = torch.zeros(2, 64, D_LATENT + D_ROPE, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="use mla_decode"):
        mla_decode_gluon_fp8(q, q[..., :D_ROPE].contiguous(), cache8, one, one[0], 0.1)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        mla_decode_gluon_fp8(q, q[..., :D_ROPE].contiguous(), cache8.to(torch.bfloat16), one, one[0], 0.1)


# ---- GPU --------------------------------------------------------------------------------------------------------


def check(q_nope, q_pe, cache8, table, lens, kv_scale, splits, seq_idx=None, names=None, exact_tol=EXACT_TOL,  # type: ignore[no-untyped-def]
          variant=FP8_MMA_VARIANTS["mma"]):  # fmt: skip
    """The kernel's output; asserts it is within EMULATION_TOL of the emulation and `exact_tol` (None: not checked)
    of exact attention, per query row group (`names`: (label, first row, end row))."""
    from baleen.kernels.mla_decode import pick_num_kv_splits

    used = splits or pick_num_kv_splits(len(lens), q_nope.shape[1] // 64, table.shape[1] * cache8.shape[1],
                                        torch.cuda.get_device_properties(0).multi_processor_count, 64)  # fmt: skip
    emu = mla_decode_fp8_math_ref(q_nope, q_pe, cache8, table, lens, SM_SCALE, used, kv_scale, seq_idx, variant)
    exact = mla_decode_ref(q_nope, q_pe, cache8, table, lens, SM_SCALE, kv_scale=kv_scale) \
        if seq_idx is None and exact_tol is not None else None  # fmt: skip
    out = mla_decode_gluon_fp8(q_nope, q_pe, cache8, table, lens, SM_SCALE, num_kv_splits=splits, seq_idx=seq_idx,
                               kv_scale=kv_scale, variant=variant)  # fmt: skip
    assert out.shape == q_nope.shape and out.dtype == torch.bfloat16
    for label, a, b in names or [(f"row {i}", i, i + 1) for i in range(len(lens))]:
        e = rel_err(out[a:b], emu[a:b])
        assert e < EMULATION_TOL, f"{label}: {e:.3g} from the emulation"
        if exact is not None:
            assert rel_err(out[a:b], exact[a:b]) < exact_tol, f"{label}: far from exact attention"


@pytest.mark.gpu
@pytest.mark.parametrize("heads,page_size,splits,seq_lens,kv_scale", FP8_CASES)
def test_mla_decode_gluon_fp8_mma_matches_emulation(
    heads: int, page_size: int, splits: int | None, seq_lens: list[int], kv_scale: float
) -> None:
    _need_hopper()
    torch.manual_seed(heads + page_size + (splits or 0) + len(seq_lens))
    q_nope, q_pe, cache, table, lens = make_case(seq_lens, heads, page_size)
    check(q_nope, q_pe, to_fp8(cache, kv_scale), table, lens, kv_scale, splits)


@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n in FP8_MMA_VARIANTS if n != "mma"])
@pytest.mark.parametrize("splits,seq_lens", [(1, [1000, 1, 65]), (3, [64, 1000, 63, 129]), (None, [4096, 4096])])
def test_mla_decode_gluon_fp8_mma_variants(name: str, splits: int | None, seq_lens: list[int]) -> None:
    # Every variant against the emulation of its own roundings: odd and even tile counts (the pipelined QK takes
    # tiles in pairs), one tile, splits.
    _need_hopper()
    torch.manual_seed(len(seq_lens) + (splits or 0))
    q_nope, q_pe, cache, table, lens = make_case(seq_lens, 128, 64)
    check(q_nope, q_pe, to_fp8(cache, 0.5), table, lens, 0.5, splits, variant=FP8_MMA_VARIANTS[name])


@pytest.mark.gpu
def test_mla_decode_gluon_fp8_mma_query_scales() -> None:
    # Query rows of very different magnitudes (one scale a row), a zero row, peaked softmaxes. Only against the
    # emulation: at the largest rows (scores ~ 15) q's e4m3 rounding moves scores by ~0.5, 10% of the output (what
    # FP8 queries cost there, as in any FP8 MLA kernel, not a kernel error).
    _need_hopper()
    torch.manual_seed(7)
    q_nope, q_pe, cache, table, lens = make_case([300, 64, 129], 128, 64)
    q_nope[0] *= torch.logspace(-3, 1, 128, device="cuda")[:, None].to(q_nope.dtype)
    q_nope[1, 17].zero_()
    q_pe[1, 17].zero_()
    check(q_nope, q_pe, to_fp8(cache, 1.0), table, lens, 1.0, 2, exact_tol=None)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, None])
def test_mla_decode_gluon_fp8_mma_extend_rows(splits: int | None) -> None:
    # Extend over an FP8 cache: every new token a query row with its own causal length (the seq_idx form).
    _need_hopper()
    torch.manual_seed(13)
    q_nope, q_pe, cache, table, qo, _, seq_idx, kv_lens = make_extend_case()
    names = [(f"sequence {i}", int(qo[i]), int(qo[i + 1])) for i in range(len(qo) - 1)]
    check(q_nope, q_pe, to_fp8(cache, 0.5), table, kv_lens, 0.5, splits, seq_idx=seq_idx, names=names)


def test_fp8_launch_args_fold_kv_scale() -> None:
    # The scale contract of the other kernels (softmax scale x kv_scale in the log2 domain, output x kv_scale), the
    # e4m3 cache as TMA descriptors, and the register budget: 16 warps x MAX_REGS fit the 64K registers, the
    # partitions' own budgets (softmax warpgroup: what the P V warpgroups and the loader leave) fit 4 x MAX_REGS.
    import math

    from baleen.kernels import mla_decode_gluon_fp8 as k
    from baleen.kernels.mla_decode import split_buffers

    if not hasattr(k, "_VT_LOAD_LAYOUT"):
        pytest.skip("no Gluon in this Triton")
    q = torch.zeros(2, 128, D_LATENT, dtype=torch.bfloat16)
    qpe = torch.zeros(2, 128, D_ROPE, dtype=torch.bfloat16)
    cache8 = torch.zeros(4, 64, D_LATENT + D_ROPE, dtype=torch.float8_e4m3fn)
    table = torch.zeros(2, 2, dtype=torch.int32)
    lens = torch.ones(2, dtype=torch.int32)
    o_part, lse, strides = split_buffers(torch.empty_like(q), 3)
    args, kwargs = k.fp8_kernel_launch_args(q, qpe, cache8, table, lens, None, o_part, lse, strides, 3, 0.125, 0.5)
    assert args[2] is not None and args[3] is not None  # latent and rope descriptors
    assert math.isclose(args[9], 0.125 * 0.5 * math.log2(math.e)) and args[10] == 0.5
    assert kwargs["STORE_LSE"] and kwargs["NUM_STAGES"] == k.NUM_STAGES and kwargs["P_SCALE"] == k.P_SCALE
    assert 16 * 32 * kwargs["maxnreg"] <= 65536
    assert 2 * kwargs["PV_REGS"] + kwargs["LOADER_REGS"] < 4 * kwargs["maxnreg"]
