"""Few-token FP8 linears at the V3 shapes: `python -m baleen.kernels.bench_skinny`.

For each decode linear and M = 2..32 it times (CUDA-graph replays, L2 flushed), from bf16 activations:
  q+gemm  : per-token-group quantization + Triton W8A8 GEMM + split-K reduce (the engine's path at M >= 2)
  gemv    : the W8A16 CUDA-core GEMV (`fp8_gemv`, M <= 8)
  skinny  : the W8A16 tensor-core GEMM (`fp8_skinny`) with `pick_skinny_tiles`
  best    : the fastest skinny tile variant while `--budget-s` lasts (and, at M <= 16, the fastest
            W8A8 GEMM tile variant: "q+gemm best")
with the share of 3.0 TB/s for the weight bytes ("roof %"; the target is >= 77%, i.e. within 1.3x) and each
path's max |diff| against the float32 dequantize-and-multiply reference on the same bf16 x.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from functools import partial

import torch

from baleen.kernels.bench import GEMM_SHAPES, print_compile_stats
from baleen.kernels.bench_gemm import quant_then_gemm
from baleen.kernels.bench_util import Deadline, Table, bench_graph_ms, header, roofline_ms
from baleen.kernels.fp8_gemm import GemmTiles
from baleen.kernels.fp8_gemv import MAX_GEMV_M, fp8_block_gemv
from baleen.kernels.fp8_skinny import SkinnyTiles, fp8_skinny_gemm, fp8_skinny_gemm_kernel, pick_skinny_tiles
from baleen.kernels.quant import FP8_DTYPE, block_dequant

LAYERS = ("q_a+kv_a", "q_b", "o_proj", "dense gate+up", "dense down")
MS = (4, 16, 32)
WARMUP_MS, REP_MS = 10.0, 30.0
NUM_SMS = 132


def variants(m: int, n: int, k: int) -> list[SkinnyTiles]:
    """Tile variants: rows a program x warps x (K unroll, stages), each with ~2 and ~4 programs an SM."""
    out = []
    for bn, warps in ((32, 2), (64, 4)):
        for unroll, stages in ((1, 3), (1, 4), (2, 2), (2, 3), (4, 2)):
            tiles = math.ceil(n / bn)
            k_steps = math.ceil(k / 128)
            for per_sm in (2, 4):
                split = max(1, min(math.ceil(per_sm * NUM_SMS / tiles), k_steps // (4 * unroll), 16))
                out.append(SkinnyTiles(bn, 128, split, warps, stages, unroll))
    return list(dict.fromkeys(out))


def gemm_variants(m: int, n: int, k: int) -> list[GemmTiles]:
    """W8A8 Triton GEMM variants at M <= 16 (never swept there before): tile width x programs an SM x stages."""
    out = []
    for bn in (32, 64, 128):
        for per_sm in (2, 4, 6):
            for stages in (4, 6):
                split = max(1, min(math.ceil(per_sm * NUM_SMS / math.ceil(n / bn)), math.ceil(k / 128) // 4, 16))
                out.append(GemmTiles(16, bn, split_k=split, num_warps=4, num_stages=stages))
    return list(dict.fromkeys(out))


def _time(fn: Callable[[], object]) -> float:
    return bench_graph_ms(fn, WARMUP_MS, REP_MS)


def _cfg(t: SkinnyTiles) -> str:
    return f"{t.block_n}x{t.block_k} s{t.split_k} w{t.num_warps} st{t.num_stages} u{t.k_unroll}"


def _gcfg(t: GemmTiles) -> str:
    return f"{t.block_m}x{t.block_n} s{t.split_k} st{t.num_stages}"


def bench_layer(name: str, n: int, k: int, table: Table, deadline: Deadline, ms: tuple[int, ...]) -> None:
    """Every path at every M for one linear; the sweep while the deadline allows."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).to(FP8_DTYPE)
    w_s = torch.rand(math.ceil(n / 128), math.ceil(k / 128), device="cuda") * 1e-3 + 1e-4
    w_ref = block_dequant(w, w_s)  # [N, K] fp32
    roof = roofline_ms(n * k)
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w_ref.t()
        scale = float(ref.abs().max())

        def diff(out: torch.Tensor) -> float:
            return float((out.float() - ref).abs().max()) / scale  # noqa: B023 - used within this iteration

        base = partial(quant_then_gemm, x, w, w_s)
        base_ms, base_d = _time(base), diff(base())
        gemv_ms = math.nan
        if m <= MAX_GEMV_M:
            gemv = partial(fp8_block_gemv, x, w, w_s)
            gemv_ms = _time(gemv)
        t0 = pick_skinny_tiles(m, n, k)
        skinny = partial(fp8_skinny_gemm, x, w, w_s)
        sk_ms, sk_d = _time(skinny), diff(skinny())
        best_ms, best_cfg = sk_ms, _cfg(t0) + " (default)"
        for t in variants(m, n, k):
            if t == t0 or deadline.expired():
                continue
            try:
                fn = partial(fp8_skinny_gemm, x, w, w_s, tiles=t)
                if diff(fn()) > 0.02:
                    print(f"    {name} M={m} {_cfg(t)}: WRONG", flush=True)
                    continue
                t_ms = _time(fn)
            except Exception as e:  # out of shared memory or registers on this Triton
                print(f"    {name} M={m} {_cfg(t)}: skipped ({type(e).__name__})", flush=True)
                continue
            if t_ms < best_ms:
                best_ms, best_cfg = t_ms, _cfg(t)
        g_best, g_cfg = base_ms, "default"
        for g in gemm_variants(m, n, k) if m <= 16 else []:
            if deadline.expired():
                break
            try:
                g_ms = _time(partial(quant_then_gemm, x, w, w_s, g))
            except Exception as e:  # out of shared memory on this Triton
                print(f"    {name} M={m} gemm {_gcfg(g)}: skipped ({type(e).__name__})", flush=True)
                continue
            if g_ms < g_best:
                g_best, g_cfg = g_ms, _gcfg(g)
        print(f"  {name} M={m}: q+gemm {base_ms:.4f} (best {g_best:.4f} {g_cfg}) gemv {gemv_ms:.4f} skinny {sk_ms:.4f} best {best_ms:.4f} {best_cfg}", flush=True)
        table.add(
            name, m, base_ms, 100 * roof / base_ms, g_best, 100 * roof / g_best, g_cfg, gemv_ms, sk_ms, 100 * roof / sk_ms, _cfg(t0),
            best_ms, 100 * roof / best_ms, best_cfg, base_ms / sk_ms, base_d, sk_d,
        )  # fmt: skip


def main() -> None:
    """Run every layer and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=90.0, help="stop sweeping tile variants after this long")
    parser.add_argument("--ms", type=int, nargs="+", default=list(MS), help="the M values")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), help="layer names as in bench.GEMM_SHAPES")
    args = parser.parse_args()
    print(header(), flush=True)
    table = Table("FP8 linear at few tokens: W8A16 skinny GEMM vs quant + W8A8 GEMM (graph-timed ms; roof % of 3.0 TB/s)", [
        "layer", "M", "q+gemm", "roof %", "q+gemm best", "roof %", "gemm cfg", "gemv", "skinny", "roof %", "cfg", "best", "roof %", "best cfg",
        "q+gemm/skinny", "q+gemm rel diff", "skinny rel diff",
    ])  # fmt: skip
    deadline = Deadline(args.budget_s)
    for name, n, k in GEMM_SHAPES:
        if name in args.layers:
            bench_layer(name, n, k, table, deadline, tuple(args.ms))
            torch.cuda.empty_cache()
    print_compile_stats(fp8_skinny_gemm_kernel)
    print()
    print(table.render())


if __name__ == "__main__":
    main()
