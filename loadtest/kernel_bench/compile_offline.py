"""Compile the Gluon MLA decode kernels for sm_90a on a machine without a GPU: compile errors, ptxas registers,
spills and shared memory, in seconds, before a device call.

The GPU box runs Triton 3.6 (whose Gluon API the kernels are written against); install it beside the project's
own Triton, with a CPU torch, and put the repository on the path as the package `baleen`:

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install -q triton==3.6.0 torch==2.13.0 numpy
    mkdir -p /tmp/pkgroot && ln -sfn "$PWD" /tmp/pkgroot/baleen
    PYTHONPATH=/tmp/pkgroot /tmp/t36/bin/python -P loadtest/kernel_bench/compile_offline.py [--ptx-dir DIR]

Each kernel is bound to small CPU tensors through Triton's own argument binder (so its specialisation is the one
a launch would compile), compiled with `triton.compile` for GPUTarget("cuda", 90, 32), and the PTX is run through
the ptxas Triton ships. A kernel that fails to compile prints its error; the others still run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

import torch


def compile_sm90(kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any], ptx_path: Path) -> str:
    """Compile `kernel` as a launch with (args, kwargs) would, for sm_90a; returns a one-line ptxas summary."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    from triton.experimental.gluon._runtime import GluonASTSource

    started = time.perf_counter()
    compiled = triton.compile(GluonASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)  # fmt: skip
    seconds = time.perf_counter() - started
    ptx_path.write_text(compiled.asm["ptx"])
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    r = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(ptx_path), "-o", os.devnull],
                       capture_output=True, text=True)  # fmt: skip
    report = [ln.split(":", 1)[-1].strip() for ln in (r.stdout + r.stderr).splitlines()
              if "registers" in ln or "spill" in ln or "rror" in ln]  # fmt: skip
    return f"{seconds:.1f} s, shared {compiled.metadata.shared} B; " + "; ".join(report)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ptx-dir", type=Path, default=Path("/tmp"), help="where the PTX of each kernel is written")
    ap.add_argument("--splits", type=int, default=2, help="KV splits of the compiled launch (1: no LSE stores)")
    args = ap.parse_args()
    from baleen.kernels import mla_decode_gluon as g
    from baleen.kernels import mla_decode_gluon_fp8 as f
    from baleen.kernels.mla_decode import split_buffers

    batch, heads, page = 4, 128, 64
    q = torch.zeros(batch, heads, 512, dtype=torch.bfloat16)
    q_pe = torch.zeros(batch, heads, 64, dtype=torch.bfloat16)
    cache8 = torch.zeros(40, page, 576, dtype=torch.float8_e4m3fn)
    table = torch.zeros(batch, 10, dtype=torch.int32)
    lens = torch.full((batch,), 300, dtype=torch.int32)
    o_part, lse, strides = split_buffers(torch.empty_like(q), args.splits)
    common = (table, lens, None, o_part, lse, strides, args.splits, 0.1, 1.0)
    builds = {
        "bf16 cache": lambda: (g.mla_decode_gluon_kernel,
                               *g.kernel_launch_args(q, q_pe, cache8.to(torch.bfloat16), *common)),
        "e4m3 cache, converted to bf16": lambda: (g.mla_decode_gluon_kernel,
                                                  *g.kernel_launch_args(q, q_pe, cache8, *common)),
    }  # fmt: skip
    for vname, variant in f.FP8_MMA_VARIANTS.items():  # the FP8-MMA kernel's variants (the default is "mma")
        builds[f"e4m3 cache, FP8 MMAs {vname}"] = partial(
            lambda v: (f.mla_decode_gluon_fp8_kernel, *f.fp8_kernel_launch_args(q, q_pe, cache8, *common, v)),
            variant,
        )
    for name, build in builds.items():
        try:
            kernel, kargs, kkwargs = build()
            ptx = args.ptx_dir / f"{kernel.__name__}-{name.split()[0]}-{name.split()[-1].replace('+', '-')}.ptx"
            print(f"{name}: {compile_sm90(kernel, kargs, kkwargs, ptx)} ({ptx})", flush=True)
        except Exception:  # one kernel's error must not hide the others
            print(f"{name}: FAILED\n{traceback.format_exc(limit=-3)}", flush=True)


if __name__ == "__main__":
    main()
