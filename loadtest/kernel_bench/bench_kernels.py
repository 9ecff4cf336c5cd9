"""Kernel benchmarks on one CUDA GPU, side by side: `python -P loadtest/kernel_bench/bench_kernels.py`.

  mla  : Triton MLA decode vs FlashInfer's MLA wrapper (batch 1/32/128 x 4k/8k, 128 and 16 heads, pages 64/1)
  gemm : block-FP8 GEMM vs torch._scaled_mm row-wise at V3 shapes, M = 1..4096, and vs the bytes roofline
  moe  : fused experts at V3 expert shapes (256 x [2x2048, 7168], top-8) vs the bytes they must read
Times are medians of CUDA-graph replays (GPU time, as decode runs in the server) with L2 flushed before
each replay; "eager" columns time plain Python calls (launch overhead included). Ratios > 1 mean ours is
faster; "roof" is the bytes-only time at 3.0 TB/s over our time. `--sweep` also times alternative tiles
and split counts within `--sweep-budget-s`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial

# NOTE: these are scripts (`python -P loadtest/kernel_bench/<name>.py`); PYTHONSAFEPATH keeps their folder off
# sys.path, so say it explicitly for the sibling modules. This folder holds only the kernel benchmarks.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from bench_util import (
    GEMM_SHAPES,
    Deadline,
    Table,
    bench_graph_ms,
    bench_ms,
    header,
    print_compile_stats,
    roofline_ms,
)

from baleen.kernels.act_quant import per_token_group_quant_fp8
from baleen.kernels.flashinfer_mla import FlashInferMLA
from baleen.kernels.fp8_gemm import (
    GemmTiles,
    pick_gemm_tiles,
    w8a8_block_fp8_matmul,
    w8a8_block_fp8_matmul_kernel,
)
from baleen.kernels.fused_moe import (
    MoeTiles,
    fused_experts_triton,
    fused_moe_kernel,
    moe_align_block_size,
    moe_gemm,
    pick_moe_tiles,
)
from baleen.kernels.mla_decode import MlaDecodeTiles, mla_decode, mla_decode_kernel, pick_mla_decode_tiles
from baleen.kernels.quant import FP8_DTYPE

D_LATENT, D_ROPE = 512, 64
SM_SCALE = 1.0 / math.sqrt(192)


def _sweep(candidates: Sequence[tuple[str, Callable[[], object]]], default_ms: float, default_cfg: str) -> tuple[float, str]:
    """Fastest (graph-timed) candidate, or the default; configs that fail to compile are skipped."""
    best, cfg = default_ms, default_cfg
    for name, fn in candidates:
        try:
            ms = bench_graph_ms(fn, 5, 20)
        except Exception as e:  # out of shared memory / registers
            print(f"    skip {name}: {type(e).__name__}")
            continue
        print(f"    {name}: {ms:.4f} ms")
        if 0 < ms < best:
            best, cfg = ms, name
    return best, cfg


# ------------------------------------------------------------------------------------------------ MLA


def _mla_case(batch: int, seq_len: int, heads: int, page_size: int) -> tuple[torch.Tensor, ...]:
    pages_per_seq = math.ceil(seq_len / page_size)
    num_pages = batch * pages_per_seq
    table = torch.randperm(num_pages, device="cuda").to(torch.int32).view(batch, pages_per_seq)
    cache = torch.randn(num_pages, page_size, D_LATENT + D_ROPE, device="cuda", dtype=torch.bfloat16)
    q_nope = torch.randn(batch, heads, D_LATENT, device="cuda", dtype=torch.bfloat16)
    q_pe = torch.randn(batch, heads, D_ROPE, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    return q_nope, q_pe, cache, table, lens


def bench_mla(sweep_s: float) -> Table:
    """Triton decode vs FlashInfer at equal inputs; also checks the two agree."""
    fi: FlashInferMLA | None
    try:
        fi = FlashInferMLA("cuda")
    except ValueError as e:
        print(f"FlashInfer unavailable: {e}")
        fi = None
    table = Table("MLA decode (bf16; graph-timed ms)", [
        "heads", "page", "batch", "ctx", "ours", "FI", "FI/ours", "ours eager", "ours GB/s", "ours TF/s",
        "max|diff|", "best", "best cfg", "FI/best",
    ])  # fmt: skip
    if fi is not None:  # build FlashInfer's JIT kernels before the sweep clock starts
        for heads in (128, 16):
            q_nope, q_pe, cache, pt, _ = _mla_case(1, 64, heads, 64)
            fi.plan(pt, [64], heads, 64, SM_SCALE, torch.bfloat16)
            fi.run(q_nope, q_pe, cache)
    deadline = Deadline(sweep_s)
    for heads in (128, 16):
        for page_size in (64, 1):
            for batch in (1, 32, 128):
                for seq_len in (4096, 8192):
                    # Tiles and split counts are swept at 4k context with 64-token pages (they carry over).
                    sweep = not deadline.expired() and seq_len == 4096 and page_size == 64
                    _mla_row(table, fi, heads, page_size, batch, seq_len, sweep)
    print_compile_stats(mla_decode_kernel)
    return table


def _mla_row(
    table: Table, fi: FlashInferMLA | None, heads: int, page_size: int, batch: int, seq_len: int, sweep: bool
) -> None:
    q_nope, q_pe, cache, pt, lens = _mla_case(batch, seq_len, heads, page_size)
    ours_fn = partial(mla_decode, q_nope, q_pe, cache, pt, lens, SM_SCALE, max_seq_len=seq_len)
    out = ours_fn()
    ours = bench_graph_ms(ours_fn)
    eager = bench_ms(ours_fn)
    fi_ms, diff = float("nan"), float("nan")
    if fi is not None:
        fi.plan(pt, [seq_len] * batch, heads, page_size, SM_SCALE, torch.bfloat16)
        fi_fn = partial(fi.run, q_nope, q_pe, cache)
        diff = float((fi_fn().float() - out.float()).abs().max())
        fi_ms = bench_graph_ms(fi_fn)
    kv_bytes = batch * seq_len * (D_LATENT + D_ROPE) * 2
    flops = 2 * batch * heads * seq_len * (2 * D_LATENT + D_ROPE)
    best, cfg = ours, "default"
    if sweep:
        base = pick_mla_decode_tiles(heads)
        if heads >= 64:
            tiles = [base, MlaDecodeTiles(64, 32, 8, 2), MlaDecodeTiles(128, 32, 8, 1, True),
                     MlaDecodeTiles(128, 64, 8, 1, True), MlaDecodeTiles(128, 32, 8, 2, True),
                     MlaDecodeTiles(128, 16, 8, 2, True)]  # fmt: skip
        else:
            tiles = [base, MlaDecodeTiles(16, 64, 4, 2), MlaDecodeTiles(16, 32, 4, 3), MlaDecodeTiles(16, 64, 4, 3),
                     MlaDecodeTiles(16, 128, 4, 2), MlaDecodeTiles(16, 64, 8, 2), MlaDecodeTiles(16, 16, 4, 4)]  # fmt: skip
        programs = batch * math.ceil(heads / 64)
        splits = [s for s in (1, 2, 4, 8, 16, 32, 64, 128) if programs * s <= 4 * 132 and s * 64 <= seq_len]
        cands = [
            (f"h{t.block_h} n{t.block_n} w{t.num_warps} st{t.num_stages}{' dv' if t.split_dv else ''} s{s}",
             partial(mla_decode, q_nope, q_pe, cache, pt, lens, SM_SCALE, s, tiles=t))
            for t in tiles for s in splits
        ]  # fmt: skip
        best, cfg = _sweep(cands, ours, "default")
    table.add(
        heads, page_size, batch, seq_len, ours, fi_ms, fi_ms / ours, eager, kv_bytes / ours / 1e6, flops / ours / 1e9,
        diff, best, cfg, fi_ms / best,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- GEMM

GEMM_MS = (1, 4, 16, 64, 256, 1024, 4096)
SWEEP_GEMMS = ("o_proj", "dense gate+up", "kv_b")


def bench_gemm(sweep_s: float) -> Table:
    """Block-scaled FP8 GEMM vs row-wise scaled_mm (same fp8 operands), plus the bytes roofline at small M."""
    table = Table("FP8 GEMM (ours block-scaled vs torch._scaled_mm row-wise; graph-timed ms)", [
        "layer", "N", "K", "M", "ours", "+quant", "ours eager", "scaled_mm", "mm/ours", "roof", "TF/s",
        "best", "best cfg",
    ])  # fmt: skip
    deadline = Deadline(sweep_s)
    for name, n, k in GEMM_SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).to(FP8_DTYPE)
        w_s = torch.rand(math.ceil(n / 128), math.ceil(k / 128), device="cuda") * 1e-3
        for m in GEMM_MS:
            sweep = not deadline.expired() and m in (1024, 4096) and name in SWEEP_GEMMS
            _gemm_row(table, name, w, w_s, m, sweep)
    print_compile_stats(w8a8_block_fp8_matmul_kernel)
    return table


def _gemm_row(table: Table, name: str, w: torch.Tensor, w_s: torch.Tensor, m: int, sweep: bool) -> None:
    n, k = w.shape
    w_col = torch.rand(1, n, device="cuda") * 1e-3
    w_t = w.t()  # [K, N] column-major, what _scaled_mm wants for its second operand
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x_q, x_s = per_token_group_quant_fp8(x)
    x_row = x_s[:, :1].contiguous()
    ours_fn = partial(w8a8_block_fp8_matmul, x_q, x_s, w, w_s)
    ours = bench_graph_ms(ours_fn)
    eager = bench_ms(ours_fn)
    with_q = bench_graph_ms(lambda: w8a8_block_fp8_matmul(*per_token_group_quant_fp8(x), w, w_s))
    try:
        mm = bench_graph_ms(partial(torch._scaled_mm, x_q, w_t, x_row, w_col, out_dtype=torch.bfloat16))
    except RuntimeError as e:
        print(f"    scaled_mm {m}x{n}x{k}: {e}".splitlines()[0])
        mm = float("nan")
    num_bytes = n * k + m * k + 2 * m * n + 4 * (w_s.numel() + x_s.numel())
    roof = roofline_ms(num_bytes) / ours if m <= 16 else float("nan")
    t0 = pick_gemm_tiles(m, n, k)
    default_cfg = f"{t0.block_m}x{t0.block_n} s{t0.split_k} w{t0.num_warps} st{t0.num_stages}"
    best, cfg = ours, default_cfg
    if sweep:
        if m <= 16:
            opts = [GemmTiles(16, bn, split_k=s, num_warps=4, num_stages=st)
                    for bn in (32, 64, 128) for s in (1, 2, 4, 8) for st in (4, 6)]  # fmt: skip
        elif m <= 64:
            opts = [GemmTiles(bm, bn, split_k=s, num_warps=4, num_stages=4)
                    for bm in (32, 64) for bn in (64, 128) for s in (1, 2, 4)]  # fmt: skip
        else:
            opts = [GemmTiles(64, 128, num_warps=4, num_stages=3), GemmTiles(64, 128, num_warps=4, num_stages=5),
                    GemmTiles(128, 128, num_warps=8, num_stages=3), GemmTiles(64, 256, num_warps=8, num_stages=3),
                    GemmTiles(128, 64, num_warps=4, num_stages=4), GemmTiles(64, 128, group_m=16, num_warps=4, num_stages=4),
                    GemmTiles(64, 64, num_warps=4, num_stages=4)]  # fmt: skip
        cands = [(f"{t.block_m}x{t.block_n} s{t.split_k} w{t.num_warps} st{t.num_stages}",
                  partial(w8a8_block_fp8_matmul, x_q, x_s, w, w_s, tiles=t)) for t in opts]  # fmt: skip
        best, cfg = _sweep(cands, ours, default_cfg)
    table.add(name, n, k, m, ours, with_q, eager, mm, mm / ours, roof, 2 * m * n * k / ours / 1e9, best, cfg)


# ------------------------------------------------------------------------------------------------ MoE

MOE_EXPERTS, MOE_HIDDEN, MOE_INTER, MOE_TOP_K = 256, 7168, 2048, 8


def _expert_weights(fp8: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    e, h, i = MOE_EXPERTS, MOE_HIDDEN, MOE_INTER
    if fp8:
        # Random finite e4m3 bytes (no NaN codes: magnitude bits < 0x78) with a random sign.
        def rand_fp8(*shape: int) -> torch.Tensor:
            b = torch.randint(0, 0x78, shape, dtype=torch.uint8, device="cuda")
            b |= torch.randint(0, 2, shape, dtype=torch.uint8, device="cuda") << 7
            return b.view(FP8_DTYPE)

        s13 = torch.rand(e, 2 * i // 128, h // 128, device="cuda") * 1e-4
        s2 = torch.rand(e, h // 128, i // 128, device="cuda") * 1e-4
        return rand_fp8(e, 2 * i, h), rand_fp8(e, h, i), s13, s2
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16) * 0.02
    return w13, w2, None, None


def bench_moe(sweep_s: float, fp8_only: bool = False) -> Table:
    """Fused experts end to end (align + quant + both GEMMs + sum) vs the expert bytes at 3.0 TB/s."""
    table = Table("Fused MoE (V3 experts: 256 x [2x2048, 7168], top-8; graph-timed ms)", [
        "dtype", "tokens", "experts hit", "weight MB", "ms", "eager", "GB/s", "of 3.0 TB/s", "gemm1", "gemm2",
        "best", "best cfg",
    ])  # fmt: skip
    deadline = Deadline(sweep_s)
    for fp8 in (True, False) if not fp8_only else (True,):
        w13, w2, s13, s2 = _expert_weights(fp8)
        elem = 1 if fp8 else 2
        scales = 4 * 3 * (MOE_INTER // 128) * (MOE_HIDDEN // 128) if fp8 else 0
        per_expert = 3 * MOE_INTER * MOE_HIDDEN * elem + scales
        for tokens in (1, 4, 16, 32, 64, 512, 4096):
            sweep = fp8 and tokens <= 64 and not deadline.expired()
            _moe_row(table, w13, w2, s13, s2, tokens, per_expert, sweep)
        del w13, w2, s13, s2
        torch.cuda.empty_cache()
    print_compile_stats(fused_moe_kernel)
    return table


def _moe_row(
    table: Table, w13: torch.Tensor, w2: torch.Tensor, s13: torch.Tensor | None, s2: torch.Tensor | None,
    tokens: int, per_expert: int, sweep: bool,
) -> None:  # fmt: skip
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    scores = torch.rand(tokens, MOE_EXPERTS, device="cuda", generator=gen)
    ids = scores.topk(MOE_TOP_K, dim=-1).indices.to(torch.int32)
    weights = torch.rand(tokens, MOE_TOP_K, device="cuda", generator=gen)
    x = torch.randn(tokens, MOE_HIDDEN, device="cuda", dtype=torch.bfloat16)
    hit = int(torch.unique(ids).numel())
    num_bytes = hit * per_expert
    fn = partial(fused_experts_triton, x, w13, w2, ids, weights, s13, s2)
    ms = bench_graph_ms(fn)
    eager = bench_ms(fn)
    # The two expert GEMMs alone (where the bytes are), to separate them from alignment and quantization.
    t = pick_moe_tiles(tokens * MOE_TOP_K, MOE_EXPERTS)
    sorted_ids, expert_ids, num_padded = moe_align_block_size(ids, MOE_EXPERTS, t.block_m)
    slots = tokens * MOE_TOP_K
    fp8 = w13.dtype == FP8_DTYPE
    a1, a1_s = per_token_group_quant_fp8(x) if fp8 else (x, None)
    act = torch.randn(slots, MOE_INTER, device="cuda", dtype=torch.bfloat16)
    a2, a2_s = per_token_group_quant_fp8(act) if fp8 else (act, None)
    y = torch.empty(slots, MOE_HIDDEN, device="cuda", dtype=torch.bfloat16)
    flat_w = weights.reshape(-1).contiguous()
    blk = (128, 128)
    g1 = bench_graph_ms(partial(moe_gemm, a1, a1_s, w13, s13, act, None, sorted_ids, expert_ids, num_padded,
                                MOE_TOP_K, True, blk, t))  # fmt: skip
    g2 = bench_graph_ms(partial(moe_gemm, a2, a2_s, w2, s2, y, flat_w, sorted_ids, expert_ids, num_padded,
                                MOE_TOP_K, False, blk, t))  # fmt: skip
    best, cfg = ms, f"{t.block_m}x{t.block_n} w{t.num_warps} st{t.num_stages}"
    if sweep:
        opts = [MoeTiles(16, bn, wp, st) for bn in (32, 64, 128) for wp, st in ((4, 3), (4, 4), (4, 5), (8, 4))]
        cands = [(f"{o.block_m}x{o.block_n} w{o.num_warps} st{o.num_stages}",
                  partial(fused_experts_triton, x, w13, w2, ids, weights, s13, s2, tiles=o)) for o in opts]  # fmt: skip
        best, cfg = _sweep(cands, ms, cfg)
    gbps = num_bytes / ms / 1e6
    table.add("fp8" if fp8 else "bf16", tokens, hit, num_bytes / 1e6, ms, eager, gbps, gbps / 3000, g1, g2, best, cfg)


def main() -> None:
    """Run the chosen sections and print their tables last."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="mla,gemm,moe", help="comma-separated: mla, gemm, moe")
    parser.add_argument("--sweep-s", default="0,0,0", help="sweep seconds per section (mla,gemm,moe)")
    parser.add_argument("--moe-fp8-only", action="store_true", help="skip the 22 GB bf16 expert set")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the kernel benchmarks need a CUDA GPU")
    budgets = dict(zip(("mla", "gemm", "moe"), (float(v) for v in args.sweep_s.split(","))))
    print(header(), flush=True)
    tables: list[Table] = []
    for section in args.sections.split(","):
        if section == "mla":
            tables.append(bench_mla(budgets["mla"]))
        elif section == "gemm":
            tables.append(bench_gemm(budgets["gemm"]))
        elif section == "moe":
            tables.append(bench_moe(budgets["moe"], args.moe_fp8_only))
        else:
            raise SystemExit(f"unknown section {section!r}: choose from mla, gemm, moe")
    print()
    print(header())
    for t in tables:
        print()
        print(t.render())


if __name__ == "__main__":
    main()
