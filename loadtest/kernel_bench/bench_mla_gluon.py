"""Gluon MLA decode (Hopper) vs FlashInfer and Triton: `python -P loadtest/kernel_bench/bench_mla_gluon.py`.

First the Gluon kernel is checked against `mla_decode_ref` at small shapes, over bf16 and FP8 (e4m3, kv_scale
0.5) caches, in a child process with a time limit (max |diff|, PASS/FAIL), so a compile error, a fault or a
deadlock is reported and ends the run cleanly before anything is timed. Then (`--section bf16`) 128 heads x batch
1/32/128 x context 4k/8k at page 64 (and page 128 at 128 x 4k): CUDA-graph-timed ms of the Gluon kernel (best
over the default split count and a few others while the budget lasts, as `ms@splits`), FlashInfer and the plain
Triton kernel, and FI/gluon, triton/gluon (> 1: Gluon is faster). Then (`--section fp8`) the FP8 KV cache at 128
heads, page 64, batch 1/32/128 x context 4k/8k/32k, default split counts: the Gluon kernel over a bf16 cache, over
the same cache in e4m3, the Triton kernel over the e4m3 cache, each as ms and GB/s of KV bytes read (576 values a
token, 2 or 1 bytes each), and bf16/fp8 (> 1: the FP8 cache is faster; issue 20 asks >= 1.4 at 32 x 8k) and
triton/fp8. Ends with the compile stats. Budget: ~3 minutes for both sections (`--section all`, the default).
`--section fp8-variants` (issue 20): the bf16-cache kernel against every FP8-MMA variant (`FP8_MMA_VARIANTS`) at
batch x context 1x4k .. 128x32k, each variant first checked at small ragged shapes in the child and then, per shape,
on sequence 0 against the emulation of its own roundings; ~1-2 minutes.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from functools import partial

# NOTE: these are scripts (`python -P loadtest/kernel_bench/<name>.py`); PYTHONSAFEPATH keeps their folder off
# sys.path, so say it explicitly for the sibling modules. This folder holds only the kernel benchmarks.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from bench_util import Deadline, Table, bench_graph_ms, header, print_compile_stats

from baleen.kernels.flashinfer_mla import FlashInferMLA
from baleen.kernels.mla_decode import mla_decode, mla_decode_ref, pick_num_kv_splits
from baleen.kernels.mla_decode_gluon import (
    BLOCK_H,
    gluon_mla_decode_supported,
    mla_decode_gluon,
    mla_decode_gluon_kernel,
)
from baleen.kernels.mla_decode_gluon_fp8 import (
    FP8_MMA_VARIANTS,
    mla_decode_fp8_math_ref,
    mla_decode_gluon_fp8,
    mla_decode_gluon_fp8_kernel,
)

D_LATENT, D_ROPE = 512, 64
SM_SCALE = 1.0 / math.sqrt(192)
MAX_DIFF = 0.05  # bf16 outputs agree to ~1e-2 over thousands of keys; more is a bug
KV_SCALE = 0.5  # the FP8 cases' per-layer scale (the cache holds latent / KV_SCALE)
CHECK_TIMEOUT_S = 150.0  # the child's checks: CUDA start-up, then compiles and nine small cases (bf16 and FP8)
# (--variants: seven FP8-MMA compiles, four small cases each)


def report_error(what: str, e: BaseException) -> None:
    """One line naming the failure, then the first 40 lines of its traceback."""
    print(f"    {what} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    lines = "".join(traceback.format_exception(e)).splitlines()
    print("\n".join("      " + line for line in lines[:40]), flush=True)


def make_case(batch: int, seq_lens: list[int], heads: int, page_size: int) -> tuple[torch.Tensor, ...]:
    """Random bf16 queries and cache; every sequence's pages are shuffled; 1000.0 junk past each end."""
    pages_per_seq = max(math.ceil(n / page_size) for n in seq_lens)
    num_pages = batch * pages_per_seq + 1
    table = torch.randperm(num_pages - 1, device="cuda").to(torch.int32).view(batch, pages_per_seq)
    cache = torch.randn(num_pages, page_size, D_LATENT + D_ROPE, device="cuda", dtype=torch.bfloat16)
    for b, n in enumerate(seq_lens):
        if n % page_size:
            cache[int(table[b, n // page_size]), n % page_size :] = 1000.0
    q_nope = torch.randn(batch, heads, D_LATENT, device="cuda", dtype=torch.bfloat16)
    q_pe = torch.randn(batch, heads, D_ROPE, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    return q_nope, q_pe, cache, table, lens


def to_fp8(cache: torch.Tensor, kv_scale: float = KV_SCALE) -> torch.Tensor:
    """The cache as an FP8 KV cache holds it: e4m3 of latent / kv_scale (the junk rows clamped to e4m3's 448)."""
    return (cache.float() / kv_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def check_kernel() -> bool:
    """Small shapes against the torch reference (ragged lengths, splits 1 and several, pages 64 and 128), over
    bf16 caches and then e4m3 ones (the reference dequantizes them)."""
    cases = [  # heads, page, splits, seq_lens, fp8
        (128, 64, 1, [1000, 1, 65], False),
        (128, 64, 4, [1, 63, 64, 65, 1000], False),
        (128, 128, 3, [64, 1000, 63, 129], False),
        (64, 64, 2, [129, 7, 64], False),
        (128, 64, None, [4096] * 4, False),
        (128, 64, 1, [1000, 1, 65], True),
        (128, 64, 4, [1, 63, 64, 65, 1000], True),
        (128, 128, 3, [64, 1000, 63, 129], True),
        (128, 64, None, [4096] * 4, True),
    ]
    ok_all = True
    for heads, page, splits, seq_lens, fp8 in cases:
        tag = f"{'fp8' if fp8 else 'bf16'} h{heads} p{page} splits {splits} lens {seq_lens}"
        try:
            q_nope, q_pe, cache, table, lens = make_case(len(seq_lens), seq_lens, heads, page)
            kv_scale = KV_SCALE if fp8 else 1.0
            if fp8:
                cache = to_fp8(cache)
            out = mla_decode_gluon(
                q_nope, q_pe, cache, table, lens, SM_SCALE, num_kv_splits=splits, kv_scale=kv_scale
            )
            ref = mla_decode_ref(q_nope, q_pe, cache, table, lens, SM_SCALE, kv_scale=kv_scale)
            torch.cuda.synchronize()
            diff = float((out.float() - ref.float()).abs().max())
            ok = math.isfinite(diff) and diff <= MAX_DIFF
            print(f"  check {tag}: max|diff| {diff:.3g} {'PASS' if ok else 'FAIL'}", flush=True)
        except Exception as e:  # a compile error must not end the run
            report_error(f"check {tag}", e)
            ok = False
        ok_all = ok_all and ok
    for heads, page, splits, seq_lens, _ in [c for c in cases if c[4]]:
        tag = f"fp8-mma h{heads} p{page} splits {splits} lens {seq_lens}"
        try:
            q_nope, q_pe, cache, table, lens = make_case(len(seq_lens), seq_lens, heads, page)
            cache = to_fp8(cache)
            used = splits or pick_num_kv_splits(len(seq_lens), heads // BLOCK_H, table.shape[1] * page,
                                                torch.cuda.get_device_properties(0).multi_processor_count, BLOCK_H)
            emu = mla_decode_fp8_math_ref(q_nope, q_pe, cache, table, lens, SM_SCALE, used, kv_scale=KV_SCALE)
            ref = mla_decode_ref(q_nope, q_pe, cache, table, lens, SM_SCALE, kv_scale=KV_SCALE)
            out = mla_decode_gluon_fp8(q_nope, q_pe, cache, table, lens, SM_SCALE, num_kv_splits=used,
                                       kv_scale=KV_SCALE)
            torch.cuda.synchronize()
            e_emu, e_ref = rel(out, emu), rel(out, ref)
            ok = math.isfinite(e_emu) and e_emu <= 1e-2 and e_ref <= 6e-2
            print(f"  check {tag}: rel err vs emulation {e_emu:.3g}, vs exact {e_ref:.3g} {'PASS' if ok else 'FAIL'}",
                  flush=True)
        except Exception as e:  # a compile error must not end the run
            report_error(f"check {tag}", e)
            ok = False
        ok_all = ok_all and ok
    return ok_all


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_variants() -> bool:
    """Every FP8-MMA variant at small ragged shapes (odd and even tile counts, splits 1 and several) against the
    emulation of its own roundings and against exact attention."""
    cases = [(64, 1, [1000, 1, 65]), (64, 4, [1, 63, 64, 65, 1000]), (128, 3, [64, 1000, 63, 129]),
             (64, 2, [4096] * 2)]  # fmt: skip
    ok_all = True
    for page, splits, seq_lens in cases:
        q_nope, q_pe, cache, table, lens = make_case(len(seq_lens), seq_lens, 128, page)
        cache = to_fp8(cache)
        ref = mla_decode_ref(q_nope, q_pe, cache, table, lens, SM_SCALE, kv_scale=KV_SCALE)
        for name, variant in FP8_MMA_VARIANTS.items():
            tag = f"fp8-mma {name} p{page} splits {splits} lens {seq_lens}"
            try:
                emu = mla_decode_fp8_math_ref(q_nope, q_pe, cache, table, lens, SM_SCALE, splits, kv_scale=KV_SCALE,
                                              variant=variant)  # fmt: skip
                out = mla_decode_gluon_fp8(q_nope, q_pe, cache, table, lens, SM_SCALE, num_kv_splits=splits,
                                           kv_scale=KV_SCALE, variant=variant)  # fmt: skip
                torch.cuda.synchronize()
                e_emu, e_ref = rel(out, emu), rel(out, ref)
                ok = math.isfinite(e_emu) and e_emu <= 1e-2 and e_ref <= 6e-2
                print(f"  check {tag}: rel err vs emulation {e_emu:.3g}, vs exact {e_ref:.3g} "
                      f"{'PASS' if ok else 'FAIL'}", flush=True)  # fmt: skip
            except Exception as e:  # a compile error must not end the run
                report_error(f"check {tag}", e)
                ok = False
            ok_all = ok_all and ok
    return ok_all


def check_in_child(variants: bool = False) -> bool:
    """check_kernel (or, with `variants`, check_variants) in a child process with a time limit; True when the
    child says PASS.

    A fault or a deadlock in the child cannot take this process (and its CUDA context) down.
    """
    cmd = [sys.executable, "-P", os.path.abspath(__file__), "--check-only"] + (["--variants"] if variants else [])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
        stdout, tail = r.stdout, r.stderr[-3000:]
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        tail = f"no answer in {CHECK_TIMEOUT_S:.0f} s (deadlock?)"
    print(stdout.rstrip(), flush=True)
    passed = "VERDICT PASS" in stdout.splitlines()
    if not passed:
        print(f"  check FAILED\n{tail}", flush=True)
    return passed


def time_or_nan(what: str, fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor | None]:
    """(graph-timed ms, output), or (nan, None) with the error printed."""
    try:
        out = fn()
        return bench_graph_ms(fn, 10, 40), out
    except Exception as e:
        report_error(what, e)
        return float("nan"), None


def run_shape(
    batch: int, seq_len: int, page: int, fi: FlashInferMLA | None, deadline: Deadline, table: Table
) -> None:
    """Time the Gluon kernel (default splits, then alternatives), FlashInfer and Triton at one shape; add a row."""
    heads = 128
    label = f"h{heads} p{page} b{batch} {seq_len // 1024}k"
    q_nope, q_pe, cache, pt, lens = make_case(batch, [seq_len] * batch, heads, page)
    fi_ms, ref = float("nan"), None
    if fi is not None:
        try:
            fi.plan(pt, [seq_len] * batch, heads, page, SM_SCALE, torch.bfloat16)
            fi_ms, ref = time_or_nan(f"FlashInfer {label}", partial(fi.run, q_nope, q_pe, cache))
        except Exception as e:
            report_error(f"FlashInfer plan {label}", e)
    tri_ms, tri_out = time_or_nan(
        f"triton {label}", partial(mla_decode, q_nope, q_pe, cache, pt, lens, SM_SCALE, max_seq_len=seq_len)
    )
    ref = ref if ref is not None else tri_out
    call = partial(mla_decode_gluon, q_nope, q_pe, cache, pt, lens, SM_SCALE, max_seq_len=seq_len)
    default = pick_num_kv_splits(
        batch, heads // BLOCK_H, seq_len, torch.cuda.get_device_properties(0).multi_processor_count, BLOCK_H
    )
    best_ms, best_splits = math.inf, default
    for splits in dict.fromkeys([default, max(1, default // 2), default * 2, 1, 2, 4]):
        if splits != default and (deadline.expired() or splits * 64 > seq_len):
            continue
        ms, out = time_or_nan(f"gluon {label} s{splits}", partial(call, num_kv_splits=splits))
        d = (
            float((out.float() - ref.float()).abs().max())
            if out is not None and ref is not None
            else math.nan
        )
        bad = "  WRONG" if not d <= MAX_DIFF else ""
        print(f"    [{label}] gluon s{splits}: {ms:.4f} ms  max|diff| {d:.3g}{bad}", flush=True)
        if ms < best_ms and not bad:
            best_ms, best_splits = ms, splits
    cell = f"{best_ms:.4f}@s{best_splits}" if math.isfinite(best_ms) else "fail"
    table.add(label, cell, fi_ms, tri_ms, fi_ms / best_ms, tri_ms / best_ms)


def run_fp8_shape(batch: int, seq_len: int, table: Table) -> None:
    """Gluon over a bf16 cache, Gluon and Triton over the same cache in e4m3 (default split counts); add a row."""
    heads, page = 128, 64
    label = f"h{heads} p{page} b{batch} {seq_len // 1024}k"
    q_nope, q_pe, cache, pt, lens = make_case(batch, [seq_len] * batch, heads, page)
    cache8 = to_fp8(cache)
    args = (q_nope, q_pe)
    bf_ms, _ = time_or_nan(
        f"gluon bf16 {label}",
        partial(mla_decode_gluon, *args, cache, pt, lens, SM_SCALE, max_seq_len=seq_len),
    )
    del cache
    f8_ms, f8_out = time_or_nan(
        f"gluon fp8 {label}",
        partial(mla_decode_gluon, *args, cache8, pt, lens, SM_SCALE, max_seq_len=seq_len, kv_scale=KV_SCALE),
    )
    tri_ms, tri_out = time_or_nan(
        f"triton fp8 {label}",
        partial(mla_decode, *args, cache8, pt, lens, SM_SCALE, max_seq_len=seq_len, kv_scale=KV_SCALE),
    )
    mma_ms, mma_out = time_or_nan(
        f"gluon fp8-mma {label}",
        partial(mla_decode_gluon_fp8, *args, cache8, pt, lens, SM_SCALE, max_seq_len=seq_len, kv_scale=KV_SCALE),
    )
    d_mma = math.nan
    if mma_out is not None and tri_out is not None:
        d_mma = float((mma_out.double() - tri_out.double()).norm() / tri_out.double().norm())
    d = math.nan
    if f8_out is not None and tri_out is not None:
        d = float((f8_out.float() - tri_out.float()).abs().max())
    splits = pick_num_kv_splits(
        batch, heads // BLOCK_H, seq_len, torch.cuda.get_device_properties(0).multi_processor_count, BLOCK_H
    )
    tokens = batch * seq_len * (D_LATENT + D_ROPE)  # KV values read (once from HBM at best)
    gbs = lambda num_bytes, ms: num_bytes / (ms * 1e-3) / 1e9 if ms > 0 else math.nan
    bad = "" if d <= MAX_DIFF else " WRONG"
    table.add(
        label, splits, f"{bf_ms:.4f}", f"{f8_ms:.4f}", f"{tri_ms:.4f}", f"{gbs(2 * tokens, bf_ms):.0f}",
        f"{gbs(tokens, f8_ms):.0f}", f"{gbs(tokens, tri_ms):.0f}", f"{bf_ms / f8_ms:.2f}", f"{tri_ms / f8_ms:.2f}",
        f"{d:.3g}{bad}", f"{mma_ms:.4f}", f"{gbs(tokens, mma_ms):.0f}", f"{bf_ms / mma_ms:.2f}", f"{d_mma:.3g}",
    )  # fmt: skip


def run_fi_fp8_shape(batch: int, seq_len: int, fi: FlashInferMLA, table: Table) -> None:
    """FlashInfer's MLA over a bf16 cache and over the same cache in e4m3 (its FA3 kernel converts the tiles to bf16),
    beside our Gluon kernel over each (FP8 MMAs over e4m3); FlashInfer's e4m3 output checked against its bf16
    output over the dequantized cache; add a row."""
    heads, page = 128, 64
    label = f"b{batch} x {seq_len // 1024}k"
    q_nope, q_pe, cache, pt, lens = make_case(batch, [seq_len] * batch, heads, page)
    cache8 = to_fp8(cache)
    del cache
    deq = (cache8.float() * KV_SCALE).to(torch.bfloat16)
    lens_cpu = [seq_len] * batch
    cells: dict[str, float] = {}
    outs: dict[str, torch.Tensor | None] = {}
    for name, kv, c in (("fi bf16", torch.bfloat16, deq), ("fi fp8", torch.float8_e4m3fn, cache8)):
        try:
            fi.plan(pt, lens_cpu, heads, page, SM_SCALE, torch.bfloat16, kv_dtype=kv)
            cells[name], outs[name] = time_or_nan(f"{name} {label}", partial(fi.run, q_nope, q_pe, c, kv_scale=KV_SCALE))
        except Exception as e:
            report_error(f"{name} plan {label}", e)
            cells[name], outs[name] = math.nan, None
    cells["gluon bf16"], _ = time_or_nan(f"gluon bf16 {label}",
                                         partial(mla_decode_gluon, q_nope, q_pe, deq, pt, lens, SM_SCALE,
                                                 max_seq_len=seq_len))  # fmt: skip
    cells["fp8-mma"], _ = time_or_nan(f"fp8-mma {label}",
                                      partial(mla_decode_gluon_fp8, q_nope, q_pe, cache8, pt, lens, SM_SCALE,
                                              max_seq_len=seq_len, kv_scale=KV_SCALE))  # fmt: skip
    a, b = outs["fi fp8"], outs["fi bf16"]
    err = rel(a, b) if a is not None and b is not None else math.nan
    c = cells
    table.add(label, *(f"{c[k]:.4f}" for k in ("fi bf16", "fi fp8", "gluon bf16", "fp8-mma")),
              f"{c['fi bf16'] / c['fi fp8']:.2f}", f"{c['fi fp8'] / c['fp8-mma']:.2f}",
              f"{c['fi bf16'] / c['fp8-mma']:.2f}", f"{err:.2g}{'' if err <= 1e-2 else ' WRONG'}")  # fmt: skip


def run_variant_shape(batch: int, seq_len: int, table: Table) -> None:
    """The bf16-cache Gluon kernel and every FP8-MMA variant over the same cache in e4m3 (default splits); each
    variant's sequence 0 checked against the emulation of its roundings and exact attention first; add a row."""
    heads, page = 128, 64
    label = f"b{batch} x {seq_len // 1024}k"
    q_nope, q_pe, cache, pt, lens = make_case(batch, [seq_len] * batch, heads, page)
    cache8 = to_fp8(cache)
    bf_ms, _ = time_or_nan(f"gluon bf16 {label}",
                           partial(mla_decode_gluon, q_nope, q_pe, cache, pt, lens, SM_SCALE, max_seq_len=seq_len))
    del cache
    splits = pick_num_kv_splits(
        batch, heads // BLOCK_H, seq_len, torch.cuda.get_device_properties(0).multi_processor_count, BLOCK_H
    )
    one = (q_nope[:1], q_pe[:1], cache8, pt[:1], lens[:1], SM_SCALE)  # sequence 0 alone: the emulation is slow
    exact = mla_decode_ref(*one, kv_scale=KV_SCALE)
    cells, worst = [], 0.0
    for name, variant in FP8_MMA_VARIANTS.items():
        call = partial(mla_decode_gluon_fp8, q_nope, q_pe, cache8, pt, lens, SM_SCALE, max_seq_len=seq_len,
                       kv_scale=KV_SCALE, variant=variant)  # fmt: skip
        try:
            out = call()[:1]
            emu = mla_decode_fp8_math_ref(*one, splits, kv_scale=KV_SCALE, variant=variant)
            e_emu, e_ref = rel(out, emu), rel(out, exact)
        except Exception as e:
            report_error(f"{name} {label}", e)
            cells.append("fail")
            continue
        bad = not (e_emu <= 1e-2 and e_ref <= 6e-2)
        worst = max(worst, e_emu)
        ms, _ = (math.nan, None) if bad else time_or_nan(f"{name} {label}", call)
        print(f"    [{label}] {name}: {ms:.4f} ms, rel err vs emulation {e_emu:.3g}, vs exact {e_ref:.3g}"
              f"{'  WRONG' if bad else ''}", flush=True)  # fmt: skip
        cells.append(f"{ms:.4f}" + (" WRONG" if bad else ""))
    times = {n: float(c) for n, c in zip(FP8_MMA_VARIANTS, cells) if c.replace(".", "", 1).isdigit()}
    best = min(times, key=lambda n: times[n]) if times else "none"
    base = times.get("mma", math.nan)
    table.add(label, splits, f"{bf_ms:.4f}", *cells, f"{bf_ms / base:.2f}",
              f"{bf_ms / times[best]:.2f} ({best})" if times else "nan", f"{worst:.2g}")  # fmt: skip


def main() -> None:
    """Check the kernel (child process), time every shape, print the compile stats and the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--budget-s", type=float, default=100.0, help="no extra split counts after this long (from the start)"
    )
    parser.add_argument(
        "--section",
        choices=["all", "bf16", "fp8", "fp8-variants", "fp8-fi"],
        default="all",
        help="bf16: Gluon vs FlashInfer vs Triton over bf16 caches; fp8: bf16 vs FP8 caches (default: both); "
        "fp8-variants: the bf16-cache kernel vs every FP8-MMA variant (issue 20; not part of all); "
        "fp8-fi: FlashInfer over bf16 and e4m3 caches beside ours (not part of all)",
    )
    # --check-only [--variants]: what check_in_child runs in its child process
    parser.add_argument("--check-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variants", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.check_only:
        ok = check_variants() if args.variants else check_kernel()
        print(f"VERDICT {'PASS' if ok else 'FAIL'}", flush=True)
        return
    print(header(), flush=True)
    if not gluon_mla_decode_supported("cuda", 128, D_LATENT, D_ROPE, 64):
        print("Gluon MLA decode unsupported here (needs sm_90 and Triton's Gluon); nothing to time")
        return
    deadline = Deadline(args.budget_s)
    if not check_in_child(variants=args.section == "fp8-variants"):
        print("the Gluon kernel failed its checks; nothing timed")
        return
    tables = []
    if args.section == "fp8-variants":
        table = Table(
            f"MLA decode 128 heads, page 64: bf16 cache vs FP8-MMA variants over it in e4m3 (kv_scale {KV_SCALE}), "
            "graph-timed ms; bf16/x > 1: the FP8 kernel is faster",
            ["shape", "splits", "bf16", *FP8_MMA_VARIANTS, "bf16/mma", "bf16/best", "max rel err vs emu"],
        )
        for batch, seq_len in [(1, 4096), (1, 32768), (32, 4096), (32, 8192), (32, 32768), (128, 8192),
                               (128, 32768)]:  # fmt: skip
            run_variant_shape(batch, seq_len, table)
            torch.cuda.empty_cache()
        tables.append(table)
    if args.section == "fp8-fi":
        fi8 = FlashInferMLA("cuda")
        table = Table(
            f"MLA decode 128 heads, page 64: FlashInfer and ours over bf16 and e4m3 (kv_scale {KV_SCALE}) caches, "
            "graph-timed ms; the bf16 cache is the e4m3 one dequantized",
            ["shape", "FI bf16", "FI fp8", "gluon bf16", "ours fp8-mma", "FI bf16/FI fp8", "FI fp8/ours fp8",
             "FI bf16/ours fp8", "rel|FI fp8 - FI bf16|"],
        )  # fmt: skip
        for batch, seq_len in [(1, 8192), (32, 8192), (32, 32768), (128, 8192)]:
            run_fi_fp8_shape(batch, seq_len, fi8, table)
            torch.cuda.empty_cache()
        tables.append(table)
    if args.section in ("all", "bf16"):
        fi: FlashInferMLA | None
        try:
            fi = FlashInferMLA("cuda")
        except Exception as e:  # absent optional dependency
            print(f"FlashInfer unavailable ({e}); comparing with the Triton kernel only")
            fi = None
        table = Table(
            "MLA decode 128 heads: Gluon (best ms@splits) vs FlashInfer vs Triton (graph-timed ms)",
            ["shape", "gluon", "FI", "triton", "FI/gluon", "triton/gluon"],
        )
        shapes = [(b, ctx, 64) for b in (128, 32, 1) for ctx in (4096, 8192)] + [(128, 4096, 128)]
        for batch, seq_len, page in shapes:
            run_shape(batch, seq_len, page, fi, deadline, table)
            torch.cuda.empty_cache()
        tables.append(table)
    if args.section in ("all", "fp8"):
        table = Table(
            f"MLA decode 128 heads, bf16 vs FP8 (e4m3, kv_scale {KV_SCALE}) KV cache (graph-timed ms, GB/s of KV)",
            ["shape", "splits", "gluon bf16", "gluon fp8", "triton fp8", "GB/s bf16", "GB/s fp8", "GB/s tri fp8",
             "bf16/fp8", "triton/fp8", "max|fp8-tri|", "fp8-mma", "GB/s mma", "bf16/mma", "rel|mma-tri|"],
        )  # fmt: skip
        for batch in (1, 32, 128):
            for seq_len in (4096, 8192, 32768):
                run_fp8_shape(batch, seq_len, table)
                torch.cuda.empty_cache()
        tables.append(table)
    print("compile stats (regs is the launch budget; the partitions set theirs with setmaxnreg):")
    print_compile_stats(mla_decode_gluon_kernel)
    print_compile_stats(mla_decode_gluon_fp8_kernel)
    for table in tables:
        print(table.render())


if __name__ == "__main__":
    main()
