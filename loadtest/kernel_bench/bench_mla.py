"""MLA decode variants against FlashInfer: `python -P loadtest/kernel_bench/bench_mla.py [--quick]`.

For 128 heads (and 16 as a control) x batch 1/32/128 x context 4k/8k x page 64 (and page 1 at 4k), it times
every `MlaDecodeTiles` variant at a few KV split counts (CUDA-graph replays, L2 flushed), checks each
variant's output against FlashInfer (or the torch reference when FlashInfer is absent), prints the Triton
compile stats (registers, spills, shared memory, wgmma or not) and ends with one table: shape, best variant,
ours ms, FlashInfer ms, FI/ours (> 1: we are faster). A variant that fails to compile or launch is skipped
with a line; one more than PRUNE_RATIO x slower than the best at a shape of batch >= 32 is dropped for the
shapes after it.
The run stops sweeping at `--budget-s` (default 170 s, compiles included) and then times only the
defaults, so it ends inside a 4-minute device lease.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

# NOTE: these are scripts (`python -P loadtest/kernel_bench/<name>.py`); PYTHONSAFEPATH keeps their folder off
# sys.path, so say it explicitly for the sibling modules. This folder holds only the kernel benchmarks.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from bench_util import Deadline, Table, bench_graph_ms, header, print_compile_stats

from baleen.kernels.flashinfer_mla import FlashInferMLA
from baleen.kernels.mla_decode import (
    MlaDecodeTiles,
    mla_decode,
    mla_decode_kernel,
    mla_decode_ref,
    mla_decode_tokm_kernel,
    pick_mla_decode_tiles,
    pick_num_kv_splits,
)

D_LATENT, D_ROPE = 512, 64
SM_SCALE = 1.0 / math.sqrt(192)
PRUNE_RATIO = 1.6
MAX_DIFF = 0.05  # bf16 outputs of two kernels over 4k-8k keys agree to ~1e-2; more is a bug

# name -> tiles. "base" is today's default (heads on M); "tokm" puts tokens on M (see mla_decode.py).
VARIANTS_128: dict[str, MlaDecodeTiles] = {
    "base h64n64w8": MlaDecodeTiles(64, 64, 8, 1),
    "dv h64n64w4s2": MlaDecodeTiles(64, 64, 4, 2, split_dv=True),
    "tokm h64n128w8": MlaDecodeTiles(64, 128, 8, 1, tokens_on_m=True),
    "tokm h64n128w8 tma": MlaDecodeTiles(64, 128, 8, 1, tokens_on_m=True, tma=True),
    "tokm h64n64w8s2 tma": MlaDecodeTiles(64, 64, 8, 2, tokens_on_m=True, tma=True),
    "tokm h32n64w4s2 tma": MlaDecodeTiles(32, 64, 4, 2, tokens_on_m=True, tma=True),
    "tokm h32n128w8": MlaDecodeTiles(32, 128, 8, 1, tokens_on_m=True),
    "tokm h32n128w8 tma": MlaDecodeTiles(32, 128, 8, 1, tokens_on_m=True, tma=True),
}
QUICK_128 = ("base h64n64w8", "tokm h64n128w8", "tokm h64n128w8 tma", "tokm h64n64w8s2 tma", "tokm h32n64w4s2 tma")
VARIANTS_16: dict[str, MlaDecodeTiles] = {
    "base h16n64w4s2": MlaDecodeTiles(16, 64, 4, 2),
    "tokm h16n128w8": MlaDecodeTiles(16, 128, 8, 1, tokens_on_m=True),
    "tokm h16n64w4s2 tma": MlaDecodeTiles(16, 64, 4, 2, tokens_on_m=True, tma=True),
}


@dataclass(frozen=True)
class Shape:
    """One benchmark point."""

    heads: int
    page_size: int
    batch: int
    seq_len: int

    def label(self) -> str:
        return f"h{self.heads} p{self.page_size} b{self.batch} {self.seq_len // 1024}k"


def shapes(quick: bool) -> list[Shape]:
    """128 heads first (the target; large batches first, so pruning learns from compute-bound shapes and
    page 1 is swept before the budget ends), then the 16-head control. Page 128 shows whole-block TMA."""
    out: list[Shape] = []
    for heads in (128, 16):
        batches = (128, 1) if quick else (128, 32, 1)
        for b in batches:
            out += [Shape(heads, 64, b, 4096), Shape(heads, 1, b, 4096)]
        if heads == 128:
            out.append(Shape(heads, 128, 128, 4096))
        if not quick:
            out += [Shape(heads, 64, b, 8192) for b in batches]
    return out


def make_case(s: Shape) -> tuple[torch.Tensor, ...]:
    """Random bf16 queries and a cache with the sequences' pages shuffled; a zeroed spare page at the end."""
    pages_per_seq = math.ceil(s.seq_len / s.page_size)
    num_pages = s.batch * pages_per_seq + 1
    table = torch.randperm(num_pages - 1, device="cuda").to(torch.int32).view(s.batch, pages_per_seq)
    cache = torch.randn(num_pages, s.page_size, D_LATENT + D_ROPE, device="cuda", dtype=torch.bfloat16)
    q_nope = torch.randn(s.batch, s.heads, D_LATENT, device="cuda", dtype=torch.bfloat16)
    q_pe = torch.randn(s.batch, s.heads, D_ROPE, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((s.batch,), s.seq_len, dtype=torch.int32, device="cuda")
    return q_nope, q_pe, cache, table, lens


def split_counts(s: Shape, t: MlaDecodeTiles) -> list[int]:
    """The heuristic's split count, half and double it, and 1; each split at least one block long."""
    blocks = math.ceil(s.heads / t.block_h)
    base = pick_num_kv_splits(s.batch, blocks, s.seq_len, 132, t.block_h)
    cands = {1, base, max(1, base // 2), base * 2}
    return sorted(c for c in cands if c * t.block_n <= s.seq_len and c <= 128)


def time_variant(fn: Callable[[], torch.Tensor], ref: torch.Tensor) -> tuple[float, float]:
    """(graph-timed ms, max |out - ref|); raises if the variant does not compile or launch."""
    diff = float((fn().float() - ref.float()).abs().max())
    return bench_graph_ms(fn, 5, 20), diff


def run_shape(
    s: Shape, fi: FlashInferMLA | None, variants: dict[str, MlaDecodeTiles], deadline: Deadline, summary: Table
) -> dict[str, float]:
    """Time FlashInfer, the default and (within the deadline) every variant x split; add a summary row."""
    q_nope, q_pe, cache, table, lens = make_case(s)
    fi_ms, ref = float("nan"), None
    if fi is not None:
        try:
            fi.plan(table, [s.seq_len] * s.batch, s.heads, s.page_size, SM_SCALE, torch.bfloat16)
            fi_fn = partial(fi.run, q_nope, q_pe, cache)
            ref = fi_fn()
            fi_ms = bench_graph_ms(fi_fn)
        except Exception as e:  # e.g. a page size FlashInfer does not take
            print(f"    FlashInfer failed at {s.label()}: {type(e).__name__}: {str(e)[:120]}")
    if ref is None:
        ref = mla_decode_ref(q_nope, q_pe, cache, table, lens, SM_SCALE)
    call = partial(mla_decode, q_nope, q_pe, cache, table, lens, SM_SCALE, max_seq_len=s.seq_len)
    default = pick_mla_decode_tiles(s.heads)
    best_ms, best_name, best_diff = math.inf, "-", math.nan
    try:
        best_ms, best_diff = time_variant(call, ref)
        best_name = f"default h{default.block_h}n{default.block_n}"
    except Exception as e:  # a broken default is reported, not fatal
        print(f"    default failed: {type(e).__name__}: {str(e)[:120]}")
    per_variant: dict[str, float] = {}
    for name, tiles in variants.items():
        if deadline.expired():
            print(f"    [{s.label()}] sweep budget spent; defaults only from here")
            break
        for splits in split_counts(s, tiles):
            tag = f"{name} s{splits}"
            try:
                ms, diff = time_variant(partial(call, num_kv_splits=splits, tiles=tiles), ref)
            except Exception as e:  # out of shared memory, compile error, ...
                print(f"    skip {tag}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
                break
            bad = "  WRONG" if not diff <= MAX_DIFF else ""
            print(f"    [{s.label()}] {tag}: {ms:.4f} ms  max|diff| {diff:.3g}{bad}", flush=True)
            if bad:
                break
            per_variant[name] = min(per_variant.get(name, math.inf), ms)
            if 0 < ms < best_ms:
                best_ms, best_name, best_diff = ms, tag, diff
    summary.add(s.label(), best_name, best_ms, fi_ms, fi_ms / best_ms, best_diff)
    return per_variant


def prune(variants: dict[str, MlaDecodeTiles], timed: dict[str, float], s: Shape) -> dict[str, MlaDecodeTiles]:
    """Keep variants within PRUNE_RATIO of the fastest at shape s, those not timed there, and TMA variants
    that s could not show (its page size is not a multiple of their block)."""
    if not timed:
        return variants
    fastest = min(timed.values())
    untried = {n for n, t in variants.items() if t.tma and s.page_size % t.block_n}
    dropped = [n for n, ms in timed.items() if ms > PRUNE_RATIO * fastest and n not in untried]
    if dropped:
        print(f"    pruned (> {PRUNE_RATIO}x the fastest): {', '.join(dropped)}")
    return {n: t for n, t in variants.items() if n not in dropped}


def main() -> None:
    """Parse flags, run every shape, print the compile stats and the summary table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and variants")
    parser.add_argument("--budget-s", type=float, default=170.0, help="stop sweeping variants after this long")
    args = parser.parse_args()
    print(header(), flush=True)
    deadline = Deadline(args.budget_s)
    fi: FlashInferMLA | None
    try:
        fi = FlashInferMLA("cuda")
    except Exception as e:  # absent or broken optional dependency
        print(f"FlashInfer unavailable ({e}); timing ours only, checking against the torch reference")
        fi = None
    summary = Table("MLA decode: best variant per shape (graph-timed ms)", [
        "shape", "best variant", "ours", "FI", "FI/ours", "max|diff|",
    ])  # fmt: skip
    v128 = {n: VARIANTS_128[n] for n in QUICK_128} if args.quick else dict(VARIANTS_128)
    v16 = dict(VARIANTS_16)
    for s in shapes(args.quick):
        variants = v128 if s.heads >= 64 else v16
        timed = run_shape(s, fi, variants, deadline, summary)
        if s.batch < 32:  # latency-bound shapes say little about the variants
            pass
        elif s.heads >= 64:
            v128 = prune(v128, timed, s)
        else:
            v16 = prune(v16, timed, s)
        torch.cuda.empty_cache()
    print("compile stats (heads on M):")
    print_compile_stats(mla_decode_kernel)
    print("compile stats (tokens on M):")
    print_compile_stats(mla_decode_tokm_kernel)
    print(summary.render())


if __name__ == "__main__":
    main()
