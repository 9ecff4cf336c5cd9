"""Block-FP8 GEMM paths side by side at the V3 shapes: `python -P loadtest/kernel_bench/bench_gemm.py`.

For every linear of `bench_util.GEMM_SHAPES` and M in 1..4096 it times (CUDA-graph replays, L2 flushed):
  triton      : our kernel with the default tiles (`pick_gemm_tiles`)
  <tile>...   : Triton tile variants for M >= 64
  cublas      : cuBLASLt block scaling through torch._scaled_mm (operands already in its layout)
  scaled_mm   : torch._scaled_mm row-wise on the same fp8 operands (the speed target, other numerics)
  +q triton   : M <= 64, the activation-quantization launch included
and the max |diff| of each block-scaled path against the float32 dequantize-and-multiply reference.
The last table gives, per row, the best of our paths, which one won, and scaled_mm / best (> 1: ours faster).
A variant that fails to compile or run is skipped with a line; `--budget-s` bounds the whole run.

A second part times the decode GEMV (`fp8_gemv.fp8_block_gemv`, bf16 activations, no quantization) at
M = 1, 2, 4, 8 against today's small-M path (activation quantization + Triton GEMM + split-K reduce, as
`fp8_block_linear` runs it) with the share of 3.0 TB/s for the weight bytes; `--gemv-sweep-s` also times
tile variants; `--gemv-only` skips the GEMM part (~1 min instead of several).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from functools import partial

# NOTE: these are scripts (`python -P loadtest/kernel_bench/<name>.py`); PYTHONSAFEPATH keeps their folder off
# sys.path, so say it explicitly for the sibling modules. This folder holds only the kernel benchmarks.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from bench_util import GEMM_SHAPES, Deadline, Table, bench_graph_ms, header, print_compile_stats, roofline_ms

from baleen.kernels.act_quant import dequant_token_groups, per_token_group_quant_fp8
from baleen.kernels.fp8_cublas import (
    cublas_block_fp8_shape_ok,
    cublas_block_fp8_supported,
    w8a8_block_fp8_matmul_cublas,
)
from baleen.kernels.fp8_gemm import (
    GemmTiles,
    pick_gemm_tiles,
    w8a8_block_fp8_matmul,
    w8a8_block_fp8_matmul_kernel,
)
from baleen.kernels.fp8_gemv import (
    MAX_GEMV_M,
    GemvTiles,
    fp8_block_gemv,
    fp8_block_gemv_kernel,
    pick_gemv_tiles,
)
from baleen.kernels.quant import FP8_DTYPE, block_dequant

BENCH_MS = (1, 16, 64, 256, 1024, 4096)
# Large-M Triton variants: name -> tiles.
LARGE_M_VARIANTS = {
    "128x128w8s3": GemmTiles(128, 128, num_warps=8, num_stages=3),
    "128x128w4s3": GemmTiles(128, 128, num_warps=4, num_stages=3),
    "64x128w4s3": GemmTiles(64, 128, num_warps=4, num_stages=3),
}
# Shorter timing windows than bench_kernels.py: ~380 timings must fit in the device lease.
WARMUP_MS, REP_MS = 10.0, 30.0


def _time(fn: Callable[[], object]) -> float:
    return bench_graph_ms(fn, WARMUP_MS, REP_MS)


def quant_then_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    w_s: torch.Tensor,
    tiles: GemmTiles | None = None,
) -> torch.Tensor:
    """An FP8 linear from bf16 x as two launches: per-token-group quantization + our Triton W8A8 GEMM."""
    return w8a8_block_fp8_matmul(*per_token_group_quant_fp8(x), w, w_s, tiles=tiles)


def _max_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max())


def bench_shape(
    name: str, n: int, k: int, detail: Table, summary: Table, deadline: Deadline, use_cublas: bool
) -> None:
    """All M rows of one linear: every path's time and error, then one summary line per M."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).to(FP8_DTYPE)
    w_s = torch.rand(math.ceil(n / 128), math.ceil(k / 128), device="cuda") * 1e-3 + 1e-4
    w_ref = block_dequant(w, w_s)  # [N, K] fp32
    w_col = torch.rand(1, n, device="cuda") * 1e-3  # row-wise scales for scaled_mm
    cublas_ok = use_cublas and cublas_block_fp8_shape_ok(n, k)
    for m in BENCH_MS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        x_q, x_s = per_token_group_quant_fp8(x)
        ref = dequant_token_groups(x_q, x_s) @ w_ref.t()  # [M, N] fp32
        t0 = pick_gemm_tiles(m, n, k)
        cands: dict[str, Callable[[], torch.Tensor]] = {
            "triton": partial(w8a8_block_fp8_matmul, x_q, x_s, w, w_s),
        }
        if m >= 64 and not deadline.expired():
            for vname, tiles in LARGE_M_VARIANTS.items():
                cands[vname] = partial(w8a8_block_fp8_matmul, x_q, x_s, w, w_s, tiles=tiles)
        if m <= 64:
            cands["+q triton"] = partial(quant_then_gemm, x, w, w_s)  # from bf16: what a decode linear costs
        if cublas_ok:
            # The layout fp8_block_linear quantizes into for cuBLAS: M padded to 4, column-major scales.
            xp_q, xp_s = per_token_group_quant_fp8(x, column_major_scales=True, pad_rows_to=4)
            cands["cublas"] = partial(w8a8_block_fp8_matmul_cublas, xp_q, xp_s, w, w_s)
        times: dict[str, float] = {}
        for cname, fn in cands.items():
            try:
                diff = _max_diff(fn()[:m], ref)
                times[cname] = ms = _time(fn)
            except Exception as e:  # a variant that does not compile or run is reported and skipped
                print(f"    {name} M={m} {cname}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                continue
            detail.add(name, n, k, m, cname, ms, 2 * m * n * k / ms / 1e9, diff, float(ref.abs().max()))
        try:
            mm = _time(partial(torch._scaled_mm, x_q, w.t(), x_s[:, :1].contiguous(), w_col, out_dtype=torch.bfloat16))
        except RuntimeError as e:
            print(f"    {name} M={m} scaled_mm: {str(e).splitlines()[0][:100]}")
            mm = float("nan")
        detail.add(name, n, k, m, "scaled_mm", mm, 2 * m * n * k / mm / 1e9, float("nan"), float("nan"))
        # GEMM-only paths compete; the "+q" rows include the quantization and are compared among themselves.
        gemm_only = {c: v for c, v in times.items() if not c.startswith("+q")}
        if not gemm_only:
            continue
        triton_best = min(((v, c) for c, v in gemm_only.items() if c != "cublas"), default=(float("nan"), "-"))
        best_ms, best = min((v, c) for c, v in gemm_only.items())
        default_cfg = f"{t0.block_m}x{t0.block_n} s{t0.split_k}"
        summary.add(
            name, n, k, m, times.get("triton", float("nan")), default_cfg, triton_best[0], triton_best[1],
            times.get("cublas", float("nan")), mm, mm / best_ms, best,
        )  # fmt: skip


GEMV_MS = (1, 2, 4, 8)
# Tile variants the GEMV sweep times (block_n, block_k, split_k, num_warps, prefetch), filtered per shape.
GEMV_VARIANTS = [
    GemvTiles(bn, bk, split_k=sk, num_warps=nw, prefetch=pf)
    for bn, bk, sk, nw, pf in [
        (1, 2048, 1, 4, True), (2, 1024, 1, 4, True), (2, 2048, 1, 4, True), (4, 1024, 1, 4, False),
        (4, 2048, 1, 4, False), (4, 2048, 1, 4, True), (8, 2048, 1, 4, False), (8, 1024, 1, 4, False),
        (16, 512, 1, 4, False), (16, 1024, 1, 4, False), (8, 4096, 1, 8, False), (16, 2048, 1, 8, False),
        (4, 2048, 2, 4, False), (2, 2048, 4, 4, True), (1, 1024, 4, 4, True),
        (8, 512, 1, 4, False), (4, 512, 1, 4, False), (32, 512, 1, 4, False), (2, 4096, 1, 8, False),
        (4, 4096, 1, 8, False), (2, 2048, 1, 4, False), (8, 2048, 1, 8, False), (16, 1024, 1, 8, False),
        (8, 1024, 1, 2, False), (4, 1024, 1, 2, False), (16, 512, 1, 2, False), (8, 512, 1, 2, False),
    ]
]  # fmt: skip


def bench_gemv_shape(
    name: str, n: int, k: int, table: Table, deadline: Deadline, m_values: tuple[int, ...] = GEMV_MS
) -> None:
    """GEMV vs quant + Triton GEMM at M <= 8 for one linear; with a sweep while the deadline allows."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).to(FP8_DTYPE)
    w_s = torch.rand(math.ceil(n / 128), math.ceil(k / 128), device="cuda") * 1e-3 + 1e-4
    w_ref = block_dequant(w, w_s)  # [N, K] fp32
    roof = roofline_ms(n * k)  # weight bytes only: x and y are < 0.3% of them at these shapes
    for m in m_values:
        if m > MAX_GEMV_M:
            continue
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w_ref.t()  # [M, N]: the W8A16 answer; the W8A8 path differs by its x rounding
        t0 = pick_gemv_tiles(m, n, k)
        gemv = partial(fp8_block_gemv, x, w, w_s)
        base = partial(quant_then_gemm, x, w, w_s)
        try:
            gemv_diff, gemv_ms = _max_diff(gemv(), ref), _time(gemv)
        except Exception as e:  # report and go on: the GEMM rows still mean something
            print(f"    {name} M={m} gemv: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
            continue
        base_diff, base_ms = _max_diff(base(), ref), _time(base)
        best_ms, best_cfg = gemv_ms, "default"
        if not deadline.expired() and m in (1, 4):
            for t in GEMV_VARIANTS:
                if t == t0 or t.block_k > 2 * max(k, 512) or math.ceil(n / t.block_n) * t.split_k < 132:
                    continue
                if deadline.expired():
                    break
                try:
                    ms = _time(partial(fp8_block_gemv, x, w, w_s, tiles=t))
                except Exception as e:  # out of registers / shared memory on this Triton
                    print(f"    {name} M={m} {t}: skipped ({type(e).__name__})")
                    continue
                if 0 < ms < best_ms:
                    best_ms, best_cfg = ms, f"{t.block_n}x{t.block_k} s{t.split_k} w{t.num_warps}{' pf' if t.prefetch else ''}"
        cfg = f"{t0.block_n}x{t0.block_k} s{t0.split_k}{' pf' if t0.prefetch else ''}"
        table.add(
            name, n, k, m, gemv_ms, cfg, 100 * roof / gemv_ms, base_ms, 100 * roof / base_ms, base_ms / gemv_ms,
            gemv_diff, base_diff, best_ms, best_cfg, 100 * roof / best_ms,
        )  # fmt: skip


def bench_gemv(sweep_s: float, m_values: tuple[int, ...] = GEMV_MS, layers: tuple[str, ...] | None = None) -> Table:
    """The decode GEMV against quant + Triton GEMM at every V3 linear, M = 1, 2, 4, 8."""
    table = Table("FP8 GEMV (W8A16) vs quant + Triton W8A8 GEMM at decode M (graph-timed ms; % of 3.0 TB/s for the weight)", [
        "layer", "N", "K", "M", "gemv", "cfg", "gemv %roof", "q+gemm", "q+gemm %roof", "q+gemm/gemv",
        "gemv max|diff|", "q+gemm max|diff|", "best gemv", "best cfg", "best %roof",
    ])  # fmt: skip
    deadline = Deadline(sweep_s)
    for name, n, k in GEMM_SHAPES:
        if layers is None or name in layers:
            bench_gemv_shape(name, n, k, table, deadline, m_values)
        torch.cuda.empty_cache()
    print_compile_stats(fp8_block_gemv_kernel)
    return table


def main() -> None:
    """Run every shape and print the detail and summary tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=200.0, help="after this, large-M variants are skipped")
    parser.add_argument("--no-cublas", action="store_true", help="leave out cuBLAS block scaling")
    parser.add_argument("--gemv-only", action="store_true", help="run only the decode GEMV part")
    parser.add_argument("--gemv-sweep-s", type=float, default=0.0, help="seconds for GEMV tile variants (0: none)")
    parser.add_argument("--gemv-ms", type=int, nargs="+", default=list(GEMV_MS), help="the M values of the GEMV table")
    parser.add_argument("--gemv-layers", nargs="+", default=None, help="only these layers (names as in the table)")
    args = parser.parse_args()
    print(header())
    gemv = bench_gemv(args.gemv_sweep_s, tuple(args.gemv_ms), tuple(args.gemv_layers) if args.gemv_layers else None)
    if args.gemv_only:
        print()
        print(gemv.render())
        return
    use_cublas = not args.no_cublas and cublas_block_fp8_supported(torch.device("cuda"))
    print(f"cuBLAS block scaling: {'available' if use_cublas else 'not available'} (torch CUDA {torch.version.cuda})")
    detail = Table("Block-FP8 GEMM paths (graph-timed ms; max|diff| vs fp32 dequant reference)", [
        "layer", "N", "K", "M", "path", "ms", "TF/s", "max|diff|", "max|ref|",
    ])  # fmt: skip
    summary = Table("Summary: best of ours vs torch._scaled_mm row-wise (mm/best > 1: ours faster)", [
        "layer", "N", "K", "M", "triton", "default", "best triton", "cfg", "cublas", "scaled_mm", "mm/best", "winner",
    ])  # fmt: skip
    deadline = Deadline(args.budget_s)
    for name, n, k in GEMM_SHAPES:
        bench_shape(name, n, k, detail, summary, deadline, use_cublas)
        torch.cuda.empty_cache()
    print_compile_stats(w8a8_block_fp8_matmul_kernel)
    print()
    print(detail.render())
    print()
    print(summary.render())
    print()
    print(gemv.render())


if __name__ == "__main__":
    main()
