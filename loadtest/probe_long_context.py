"""Which kernel faults on a step of very many prompt tokens (CUDA): the MLA extend kernels over one long chunk.

On the H100 (2026-12-07) a runner whose memory-plan step was one 65.6k-token chunk (`--chunked-prefill-size -1`
at a 64k context) died with an illegal address in the Gluon MLA kernel's extend launch (`CUDA_LAUNCH_BLOCKING=1`),
and a 49k-token one in the fused MoE's `moe_sum_kernel`. Both were int32 offsets, found by reading afterwards and
made int64: moe_sum's rows, and q's head offset (q_latent comes from the absorption einsum with a head stride of
T * 512, so head 64 of a 65,536-row step is 2^31 values in). The engine cuts steps at `MAX_CUDA_STEP_TOKENS` until
this probe (and the GPU tests named in gpu_session.sh) pass past it. Each case runs in a child process (an illegal
address poisons the CUDA context) with launches synchronous, over the memory plan's stand-in (a two-page zero
cache, every page-table entry page 1), q in the einsum's layout: rows = one chunk of new tokens (each sees the
keys up to itself) plus decode rows.

    python -P loadtest/probe_long_context.py                    # the default cases
    python -P loadtest/probe_long_context.py --case gluon 65536 0
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

# (kernel, chunk tokens, decode rows)
CASES = [("gluon", 32768, 63), ("gluon", 49152, 63), ("gluon", 65536, 0), ("gluon", 65536, 63),
         ("triton", 65536, 63), ("gluon", 40000, 0), ("gluon", 45000, 0)]  # fmt: skip


def run_case(kernel: str, chunk: int, decode_rows: int, dev: str = "cuda", heads: int = 128) -> str:
    import torch

    from baleen.kernels.mla_decode import mla_decode
    from baleen.kernels.mla_decode_gluon import mla_decode_gluon

    page = 64
    rows = chunk + decode_rows
    q = torch.randn(heads, rows, 512, device=dev, dtype=torch.bfloat16).transpose(0, 1)  # as einsum returns it
    q_pe = torch.randn(rows, heads, 64, device=dev, dtype=torch.bfloat16)
    cache = torch.zeros(2, page, 576, device=dev, dtype=torch.bfloat16)
    seqs = 1 + decode_rows
    table = torch.ones(seqs, -(-(chunk + 1) // page), device=dev, dtype=torch.int32)
    seq_idx = torch.tensor([0] * chunk + list(range(1, seqs)), device=dev, dtype=torch.int32)
    lens = torch.tensor([*range(1, chunk + 1), *[chunk] * decode_rows], device=dev, dtype=torch.int32)
    fn = mla_decode_gluon if kernel == "gluon" else mla_decode
    out = fn(q, q_pe, cache, table, lens, 0.1, seq_idx=seq_idx)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    return f"ok ({rows} rows, {q.numel() / 2**31:.2f} x 2^31 query values, finite: {bool(out.isfinite().all())})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", nargs=3, metavar=("KERNEL", "CHUNK", "DECODE_ROWS"), help="run one case here")
    args = ap.parse_args()
    if args.case:
        print(run_case(args.case[0], int(args.case[1]), int(args.case[2])))
        return 0
    print("| kernel | chunk | decode rows | result |\n|---|---|---|---|")
    for kernel, chunk, decode_rows in CASES:
        p = subprocess.run([sys.executable, "-P", __file__, "--case", kernel, str(chunk), str(decode_rows)],
                           capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, CUDA_LAUNCH_BLOCKING="1"))  # fmt: skip
        lines = (p.stdout + p.stderr).strip().splitlines()
        said = lines[-1] if p.returncode == 0 else " / ".join(x for x in lines if "Error" in x)[-200:]
        print(f"| {kernel} | {chunk} | {decode_rows} | {said} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
