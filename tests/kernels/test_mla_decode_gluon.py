"""The Gluon (Hopper, warp-specialised) MLA decode kernel against the torch reference; CPU: clean import only."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import rel_err

from baleen.kernels.mla_decode import mla_decode_ref
from baleen.kernels.mla_decode_gluon import gluon_mla_decode_supported, mla_decode_gluon

D_LATENT, D_ROPE = 512, 64


def make_case(seq_lens: list[int], heads: int, page_size: int, device: str = "cuda") -> tuple[torch.Tensor, ...]:
    """bf16 queries and cache on `device`; pages shuffled across sequences, spare pages, finite junk past each end."""
    batch = len(seq_lens)
    pages_per_seq = [(n + page_size - 1) // page_size for n in seq_lens]
    num_pages = sum(pages_per_seq) + 3
    perm = torch.randperm(num_pages).tolist()
    table = torch.zeros(batch, max(pages_per_seq) + 1, dtype=torch.int32)
    at = 0
    for b, p in enumerate(pages_per_seq):
        table[b, :p] = torch.tensor(perm[at : at + p], dtype=torch.int32)
        at += p
    cache = torch.randn(num_pages, page_size, D_LATENT + D_ROPE)
    # Rows past a sequence's end in its last page: TMA reads them whole, only the score mask keeps them out.
    for b, n in enumerate(seq_lens):
        cache[int(table[b, (n - 1) // page_size]), (n - 1) % page_size + 1 :] = 30.0
    q_nope = torch.randn(batch, heads, D_LATENT)
    q_pe = torch.randn(batch, heads, D_ROPE)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    to = lambda t: t.to(device, torch.bfloat16)
    return to(q_nope), to(q_pe), to(cache), table.to(device), lens.to(device)


def make_extend_case() -> tuple[torch.Tensor, ...]:
    """An extend batch on CUDA: prefixes [0, 700, 64, 1] + [130, 3, 64, 1] new tokens, every new token a query row
    (the seq_idx form). Returns q_nope, q_pe [T, 128, D], the bf16 cache, page table, qo_indptr, seq_lens, seq_idx and
    each row's key count."""
    from baleen.kernels.mla_extend import extend_rows

    prefix, extend = [0, 700, 64, 1], [130, 3, 64, 1]
    _, _, cache, table, _ = make_case([p + e for p, e in zip(prefix, extend)], 128, 64)
    num_tokens = sum(extend)
    q_nope = torch.randn(num_tokens, 128, D_LATENT, device="cuda").to(torch.bfloat16)
    q_pe = torch.randn(num_tokens, 128, D_ROPE, device="cuda").to(torch.bfloat16)
    qo = torch.tensor([0, *torch.tensor(extend).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    lens = torch.tensor([p + e for p, e in zip(prefix, extend)], dtype=torch.int32, device="cuda")
    seq_idx, kv_lens = extend_rows(qo, lens, num_tokens)
    return q_nope, q_pe, cache, table, qo, lens, seq_idx, kv_lens


def _need_hopper() -> None:
    if not gluon_mla_decode_supported("cuda", 128, D_LATENT, D_ROPE, 64):
        pytest.skip("needs an sm_90 GPU and a Triton with Gluon")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "heads,page_size,splits,seq_lens",
    [
        (128, 64, 1, [1000]),  # one split: bf16 output written directly, no merge
        (128, 64, 4, [1, 63, 64, 65, 1000]),  # ragged; seq 1 leaves three splits empty; bf16 partials merged
        (128, 128, 1, [65, 1, 300]),
        (128, 128, 3, [64, 1000, 63]),
        (64, 64, 2, [129, 7, 64]),  # one head block
        (128, 64, None, [5 + 31 * i for i in range(33)]),  # batch 33, the default split heuristic
    ],
)
def test_mla_decode_gluon_matches_ref(
    heads: int, page_size: int, splits: int | None, seq_lens: list[int]
) -> None:
    _need_hopper()
    torch.manual_seed(heads + page_size + (splits or 0) + len(seq_lens))
    q_nope, q_pe, cache, table, lens = make_case(seq_lens, heads, page_size)
    out = mla_decode_gluon(q_nope, q_pe, cache, table, lens, 0.0625, num_kv_splits=splits)
    ref = mla_decode_ref(q_nope, q_pe, cache, table, lens, 0.0625)
    assert out.shape == q_nope.shape and out.dtype == torch.bfloat16
    for b in range(len(seq_lens)):  # per sequence, so one broken length is named
        assert rel_err(out[b], ref[b]) < 1e-2, f"sequence {b} (len {seq_lens[b]})"


@pytest.mark.gpu
def test_mla_decode_gluon_strided_queries() -> None:
    # q_nope as a view with a head stride != 512 (e.g. the W_UK bmm's [H, B, D] output transposed).
    _need_hopper()
    torch.manual_seed(7)
    q_nope, q_pe, cache, table, lens = make_case([200, 77, 1], 128, 64)
    q_t = q_nope.transpose(0, 1).contiguous().transpose(0, 1)  # [B, H, D], strides (512, B * 512, 1)
    out = mla_decode_gluon(q_t, q_pe, cache, table, lens, 0.0625, num_kv_splits=2)
    ref = mla_decode_ref(q_nope, q_pe, cache, table, lens, 0.0625)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, None])
def test_mla_decode_gluon_extend_rows(splits: int | None) -> None:
    # Extend: every new token is a query row with its own causal length, reading its sequence's page-table row.
    _need_hopper()
    from baleen.kernels.mla_extend import mla_extend_ref

    torch.manual_seed(11)
    q_nope, q_pe, cache, table, qo, lens, seq_idx, kv_lens = make_extend_case()
    out = mla_decode_gluon(q_nope, q_pe, cache, table, kv_lens, 0.0625, num_kv_splits=splits, seq_idx=seq_idx)
    ref = mla_extend_ref(q_nope, q_pe, cache, table, qo, lens, 0.0625)
    for i in range(len(qo) - 1):
        a, b = int(qo[i]), int(qo[i + 1])
        assert rel_err(out[a:b], ref[a:b]) < 1e-2, f"sequence {i}"


def test_gluon_mla_decode_unsupported_on_cpu() -> None:
    assert not gluon_mla_decode_supported("cpu", 128, D_LATENT, D_ROPE, 64)
    q = torch.zeros(1, 128, D_LATENT, dtype=torch.bfloat16)
    cache = torch.zeros(2, 64, D_LATENT + D_ROPE, dtype=torch.bfloat16)
    one = torch.ones(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="use mla_decode"):
        mla_decode_gluon(q, q[..., :D_ROPE].contiguous(), cache, one, one[0], 0.1)


# ---- FP8 (e4m3) cache ---------------------------------------------------------------------------------------


def to_fp8(cache: torch.Tensor, kv_scale: float) -> torch.Tensor:
    """The cache as an FP8 KV cache holds it: e4m3 of latent / kv_scale (kept inside e4m3's +-448)."""
    return (cache.float() / kv_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def check_fp8(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    cache8: torch.Tensor,
    table: torch.Tensor,
    lens: torch.Tensor,
    kv_scale: float,
    splits: int | None,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """The FP8-cache Gluon output; asserts it equals the bf16 Gluon kernel's over the cache upcast to bf16 (e4m3 ->
    bf16 is exact and the partitions after the loader are the same code) and is within 1e-2 of the Triton kernel's
    (FP8 cache, kv_scale folded the same way)."""
    from baleen.kernels.mla_decode import mla_decode

    out = mla_decode_gluon(q_nope, q_pe, cache8, table, lens, 0.0625, num_kv_splits=splits, seq_idx=seq_idx,
                           kv_scale=kv_scale)  # fmt: skip
    assert out.shape == q_nope.shape and out.dtype == torch.bfloat16
    up = mla_decode_gluon(q_nope, q_pe, cache8.to(torch.bfloat16), table, lens, 0.0625, num_kv_splits=splits,
                          seq_idx=seq_idx, kv_scale=kv_scale)  # fmt: skip
    diff = float((out.float() - up.float()).abs().max())
    assert torch.equal(out, up), f"FP8 path != bf16 path over the upcast cache: max |diff| {diff:.3g}"
    tri = mla_decode(q_nope, q_pe, cache8, table, lens, 0.0625, num_kv_splits=splits, seq_idx=seq_idx,
                     kv_scale=kv_scale)  # fmt: skip
    assert rel_err(out, tri) < 1e-2
    return out


# FP8-cache cases (heads, page_size, splits, seq_lens, kv_scale), shared with test_mla_decode_gluon_fp8.py
FP8_CASES = [
    (128, 64, 1, [1000], 0.5),  # one split: the output scaled in the kernel, no merge
    (128, 64, 4, [1, 63, 64, 65, 1000], 2.0),  # ragged; empty splits; partials merged
    (128, 128, 1, [65, 1, 300], 0.25),
    (128, 128, 3, [64, 1000, 63], 1.5),
    (64, 64, 2, [129, 7, 64], 0.5),  # one head block
    (128, 64, None, [5 + 31 * i for i in range(33)], 2.0),  # batch 33, the default split heuristic
    (128, 64, None, [4000, 4097], 1.0),
]


@pytest.mark.gpu
@pytest.mark.parametrize("heads,page_size,splits,seq_lens,kv_scale", FP8_CASES)
def test_mla_decode_gluon_fp8_matches_ref(
    heads: int, page_size: int, splits: int | None, seq_lens: list[int], kv_scale: float
) -> None:
    _need_hopper()
    torch.manual_seed(heads + page_size + (splits or 0) + len(seq_lens) + int(8 * kv_scale))
    q_nope, q_pe, cache, table, lens = make_case(seq_lens, heads, page_size)
    cache8 = to_fp8(cache, kv_scale)
    out = check_fp8(q_nope, q_pe, cache8, table, lens, kv_scale, splits)
    ref = mla_decode_ref(q_nope, q_pe, cache8, table, lens, 0.0625, kv_scale=kv_scale)  # dequantized in fp32
    for b in range(len(seq_lens)):  # per sequence, so one broken length is named
        assert rel_err(out[b], ref[b]) < 1e-2, f"sequence {b} (len {seq_lens[b]})"


@pytest.mark.gpu
def test_mla_decode_gluon_fp8_subnormals() -> None:
    # Latents mostly below e4m3's smallest normal (2^-6): the converter's bf16 multiply must keep the bf16
    # subnormals its bit trick makes of them (a flush to zero would break the equality with the upcast cache).
    _need_hopper()
    torch.manual_seed(5)
    q_nope, q_pe, cache, table, lens = make_case([300, 64, 129], 128, 64)
    cache8 = to_fp8(cache * 2.0**-8, 1.0)
    assert (cache8.float().abs() < 2.0**-6).float().mean() > 0.5
    q_nope, q_pe = q_nope * 64, q_pe * 64  # scores of order 1 over such small keys
    out = check_fp8(q_nope, q_pe, cache8, table, lens, 1.0, 2)
    ref = mla_decode_ref(q_nope, q_pe, cache8, table, lens, 0.0625)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, None])
def test_mla_decode_gluon_fp8_extend_rows(splits: int | None) -> None:
    # Extend over an FP8 cache: every new token a query row with its own causal length (the seq_idx form).
    _need_hopper()
    from baleen.kernels.mla_extend import mla_extend_ref

    torch.manual_seed(13)
    q_nope, q_pe, cache, table, qo, lens, seq_idx, kv_lens = make_extend_case()
    cache8 = to_fp8(cache, 0.5)
    out = check_fp8(q_nope, q_pe, cache8, table, kv_lens, 0.5, splits, seq_idx=seq_idx)
    ref = mla_extend_ref(q_nope, q_pe, cache8, table, qo, lens, 0.0625, kv_scale=0.5)
    for i in range(len(qo) - 1):
        a, b = int(qo[i]), int(qo[i + 1])
        assert rel_err(out[a:b], ref[a:b]) < 1e-2, f"sequence {i}"


def test_gluon_mla_decode_fp8_refused_on_cpu() -> None:
    assert not gluon_mla_decode_supported("cpu", 128, D_LATENT, D_ROPE, 64, torch.float8_e4m3fn)
    q = torch.zeros(1, 128, D_LATENT, dtype=torch.bfloat16)
    one = torch.ones(1, 1, dtype=torch.int32)
    cache8 = torch.zeros(2, 64, D_LATENT + D_ROPE, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="use mla_decode"):
        mla_decode_gluon(q, q[..., :D_ROPE].contiguous(), cache8, one, one[0], 0.1, kv_scale=0.5)
    q16 = q.to(torch.float16)  # fp16 q: the Gluon kernel takes bf16 only
    with pytest.raises(ValueError, match="bf16"):
        mla_decode_gluon(q16, q16[..., :D_ROPE].contiguous(), cache8, one, one[0], 0.1)


def test_gluon_launch_args_fold_kv_scale() -> None:
    # The scale contract of the Triton kernel: softmax scale x kv_scale (log2 domain), output x kv_scale; an
    # e4m3 cache goes in as a pointer to the 4-warp converter, a bf16 one would go as TMA descriptors.
    import math

    from baleen.kernels.mla_decode import split_buffers
    from baleen.kernels.mla_decode_gluon import FP8_LOADER_WARPS, kernel_launch_args

    q = torch.zeros(2, 128, D_LATENT, dtype=torch.bfloat16)
    qpe = torch.zeros(2, 128, D_ROPE, dtype=torch.bfloat16)
    cache8 = torch.zeros(4, 64, D_LATENT + D_ROPE, dtype=torch.float8_e4m3fn)
    table = torch.zeros(2, 2, dtype=torch.int32)
    lens = torch.ones(2, dtype=torch.int32)
    out = torch.empty_like(q)
    o_part, lse, strides = split_buffers(out, 3)
    args, kwargs = kernel_launch_args(q, qpe, cache8, table, lens, None, o_part, lse, strides, 3, 0.125, 0.5)
    assert args[2] is None and args[3] is None and args[4] is cache8  # no descriptors; the cache pointer
    assert math.isclose(args[10], 0.125 * 0.5 * math.log2(math.e)) and args[11] == 0.5
    assert kwargs["KV_FP8"] and kwargs["LOADER_WARPS"] == FP8_LOADER_WARPS and kwargs["STORE_LSE"]
    assert args[16] == cache8.stride(1)  # row stride in elements (= bytes for e4m3)


def test_e4m3_to_bf16_bit_trick_is_exact() -> None:
    # What _E4M3_TO_BF16_PTX computes, in torch: every finite e4m3 byte, subnormals and signed zeros included.
    x = torch.arange(256, dtype=torch.int32)
    bits = ((x & 0x80) << 8) | ((x & 0x7F) << 4)  # bf16 bits of value * 2^-120
    got = (bits << 16).view(torch.float32).double() * 2.0**120
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    finite = ~torch.isnan(want)
    assert torch.equal(got[finite], want[finite]) and int(finite.sum()) == 254


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["gluon", "triton"])
def test_rows_of_a_64k_token_step_with_the_einsum_head_stride(kernel: str) -> None:
    # An extend step's q_latent comes from the absorption einsum as [T, H, D] over an [H, T, D] buffer, so its head
    # stride is T * 512: at 65,600 rows, head 64 is 2^31 values in (int32 offsets read outside q: the 65.6k-token
    # crash on the H100, 2026-12-07; Triton's kernel from ~33k rows at 128 heads). Rows see 1-64 keys, for speed.
    from baleen.kernels.mla_decode import mla_decode

    if kernel == "gluon" and not gluon_mla_decode_supported(torch.device("cuda"), 128, D_LATENT, D_ROPE, 64):
        pytest.skip("the Gluon kernel needs sm_90")
    rows, heads = 65_600, 128
    torch.manual_seed(0)
    q_nope = torch.randn(heads, rows, D_LATENT, device="cuda", dtype=torch.bfloat16).transpose(0, 1)
    q_pe = torch.randn(rows, heads, D_ROPE, device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(2, 64, D_LATENT + D_ROPE, device="cuda", dtype=torch.bfloat16)
    table = torch.ones(rows, 1, device="cuda", dtype=torch.int32)
    lens = (torch.arange(rows, device="cuda", dtype=torch.int32) % 64) + 1
    out = (mla_decode_gluon if kernel == "gluon" else mla_decode)(q_nope, q_pe, cache, table, lens, 0.1)
    torch.cuda.synchronize()
    pick = torch.tensor([0, 1, 63, rows // 2, rows - 65, rows - 2, rows - 1], device="cuda")
    want = mla_decode_ref(q_nope[pick], q_pe[pick], cache, table[pick], lens[pick], 0.1)
    assert rel_err(out[pick], want) < 2e-2
