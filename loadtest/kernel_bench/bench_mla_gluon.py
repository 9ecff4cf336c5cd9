"""Gluon MLA decode (Hopper) vs FlashInfer and Triton: `python -P loadtest/kernel_bench/bench_mla_gluon.py`.

First the Gluon kernel is checked against `mla_decode_ref` at small shapes in a child process with a time limit
(max |diff|, PASS/FAIL), so a compile error, a fault or a deadlock is reported and ends the run cleanly before
anything is timed. Then 128 heads x batch 1/32/128 x context 4k/8k at page 64 (and page 128 at 128 x 4k):
CUDA-graph-timed ms of the Gluon kernel (best over the default split count and a few others while the budget
lasts, as `ms@splits`), FlashInfer and the plain Triton kernel, and FI/gluon, triton/gluon (> 1: Gluon is
faster). Ends with the compile stats. Budget: < 3 minutes.
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

D_LATENT, D_ROPE = 512, 64
SM_SCALE = 1.0 / math.sqrt(192)
MAX_DIFF = 0.05  # bf16 outputs agree to ~1e-2 over thousands of keys; more is a bug
CHECK_TIMEOUT_S = 90.0  # the child's checks: CUDA start-up, then compiles and five small cases


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


def check_kernel() -> bool:
    """Small shapes against the torch reference (ragged lengths, splits 1 and several, pages 64 and 128)."""
    cases = [  # heads, page, splits, seq_lens
        (128, 64, 1, [1000, 1, 65]),
        (128, 64, 4, [1, 63, 64, 65, 1000]),
        (128, 128, 3, [64, 1000, 63, 129]),
        (64, 64, 2, [129, 7, 64]),
        (128, 64, None, [4096] * 4),
    ]
    ok_all = True
    for heads, page, splits, seq_lens in cases:
        tag = f"h{heads} p{page} splits {splits} lens {seq_lens}"
        try:
            q_nope, q_pe, cache, table, lens = make_case(len(seq_lens), seq_lens, heads, page)
            out = mla_decode_gluon(q_nope, q_pe, cache, table, lens, SM_SCALE, num_kv_splits=splits)
            ref = mla_decode_ref(q_nope, q_pe, cache, table, lens, SM_SCALE)
            torch.cuda.synchronize()
            diff = float((out.float() - ref.float()).abs().max())
            ok = math.isfinite(diff) and diff <= MAX_DIFF
            print(f"  check {tag}: max|diff| {diff:.3g} {'PASS' if ok else 'FAIL'}", flush=True)
        except Exception as e:  # a compile error must not end the run
            report_error(f"check {tag}", e)
            ok = False
        ok_all = ok_all and ok
    return ok_all


def check_in_child() -> bool:
    """check_kernel in a child process with a time limit; True when the child says PASS.

    A fault or a deadlock in the child cannot take this process (and its CUDA context) down.
    """
    cmd = [sys.executable, "-P", os.path.abspath(__file__), "--check-only"]
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


def main() -> None:
    """Check the kernel (child process), time every shape, print the compile stats and the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--budget-s", type=float, default=100.0, help="no extra split counts after this long (from the start)"
    )
    # --check-only: what check_in_child runs in its child process
    parser.add_argument("--check-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.check_only:
        print(f"VERDICT {'PASS' if check_kernel() else 'FAIL'}", flush=True)
        return
    print(header(), flush=True)
    if not gluon_mla_decode_supported("cuda", 128, D_LATENT, D_ROPE, 64):
        print("Gluon MLA decode unsupported here (needs sm_90 and Triton's Gluon); nothing to time")
        return
    deadline = Deadline(args.budget_s)
    if not check_in_child():
        print("the Gluon kernel failed its checks; nothing timed")
        return
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
    print("compile stats (regs is the launch budget; the partitions set theirs with setmaxnreg):")
    print_compile_stats(mla_decode_gluon_kernel)
    print(table.render())


if __name__ == "__main__":
    main()
