"""Block-FP8 GEMM paths side by side at the V3 shapes: `python -m baleen.kernels.bench_gemm`.

For every linear of `bench.GEMM_SHAPES` and M in 1..4096 it times (CUDA-graph replays, L2 flushed):
  triton      : our kernel with the default tiles (`pick_gemm_tiles`)
  <tile>...   : Triton tile variants for M >= 64
  cublas      : cuBLASLt block scaling through torch._scaled_mm (operands already in its layout)
  scaled_mm   : torch._scaled_mm row-wise on the same fp8 operands (the speed target, other numerics)
  +q triton   : M <= 64, the activation-quantization launch included
and the max |diff| of each block-scaled path against the float32 dequantize-and-multiply reference.
The last table gives, per row, the best of our paths, which one won, and scaled_mm / best (> 1: ours faster).
A variant that fails to compile or run is skipped with a line; `--budget-s` bounds the whole run.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from functools import partial

import torch

from baleen.kernels.bench import GEMM_SHAPES, print_compile_stats
from baleen.kernels.bench_util import Deadline, Table, bench_graph_ms, header
from baleen.kernels.fp8_gemm import (
    GemmTiles,
    cublas_block_fp8_shape_ok,
    cublas_block_fp8_supported,
    dequant_token_groups,
    per_token_group_quant_fp8,
    pick_gemm_tiles,
    w8a8_block_fp8_matmul,
    w8a8_block_fp8_matmul_cublas,
    w8a8_block_fp8_matmul_kernel,
)
from baleen.kernels.quant import FP8_DTYPE, block_dequant

BENCH_MS = (1, 16, 64, 256, 1024, 4096)
# Large-M Triton variants: name -> tiles.
LARGE_M_VARIANTS = {
    "128x128w8s3": GemmTiles(128, 128, num_warps=8, num_stages=3),
    "128x128w4s3": GemmTiles(128, 128, num_warps=4, num_stages=3),
    "64x128w4s3": GemmTiles(64, 128, num_warps=4, num_stages=3),
}
# Shorter timing windows than bench.py: ~380 timings must fit in the device lease.
WARMUP_MS, REP_MS = 10.0, 30.0


def _time(fn: Callable[[], object]) -> float:
    return bench_graph_ms(fn, WARMUP_MS, REP_MS)


def _quant_then_gemm(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
    return w8a8_block_fp8_matmul(*per_token_group_quant_fp8(x), w, w_s)


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
            cands["+q triton"] = partial(_quant_then_gemm, x, w, w_s)  # from bf16: what a decode linear costs
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


def main() -> None:
    """Run every shape and print the detail and summary tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=200.0, help="after this, large-M variants are skipped")
    parser.add_argument("--no-cublas", action="store_true", help="leave out cuBLAS block scaling")
    args = parser.parse_args()
    print(header())
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


if __name__ == "__main__":
    main()
