"""Shared pieces of the kernel benchmarks: medians over CUDA events (L2 flushed, or cold copies), tables,
headers, the V3 linear shapes and Triton compile stats."""

from __future__ import annotations

import datetime
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

# Measured on the H100 box (FACTS.md): a large device-to-device copy moves ~3.0 TB/s (read + write).
HBM_BYTES_PER_S = 3.0e12
# (name, N, K) from DeepSeek-V3's linear layers.
GEMM_SHAPES = [
    ("q_a+kv_a", 2112, 7168), ("q_a", 1536, 7168), ("kv_a", 576, 7168), ("q_b", 24576, 1536),
    ("kv_b", 32768, 512), ("o_proj", 7168, 16384), ("dense gate+up", 36864, 7168), ("dense down", 7168, 18432),
    ("shared gate+up", 4096, 7168), ("shared down", 7168, 2048),
]  # fmt: skip


def bench_ms(fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median milliseconds of fn() on the current CUDA device.

    triton.testing.do_bench times each call with CUDA events and overwrites a 256 MB buffer before every
    call, so weights and caches start cold in L2, as they do inside a real forward pass.
    """
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def bench_graph_ms(fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Like bench_ms, but fn is captured once in a CUDA graph and its replays are timed.

    This is how decode steps run in the server, and it removes Python and launch overhead, so the number
    is the GPU time of the kernels alone. Falls back to eager timing (returned negated) if capture fails.
    """
    try:
        graph = _capture(fn)
    except RuntimeError as e:
        print(f"    graph capture failed ({str(e).splitlines()[0][:80]}); timing eagerly")
        torch.cuda.synchronize()
        return -bench_ms(fn, warmup_ms, rep_ms)
    return bench_ms(graph.replay, warmup_ms, rep_ms)


def _capture(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """fn run once eagerly and once on a side stream (lazy allocations, autotuning), then captured."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def bench_cold_ms(calls: list[Callable[[], object]], reps: int = 30) -> float:
    """Median milliseconds per call of `calls` (the same op on distinct weight copies) run back to back in one
    CUDA graph, without a flush: how a forward pass meets its weights. Cold in L2 when the copies add up to
    well over L2 (`cold_copies`), and unlike do_bench's flush (a 256 MB memset) the L2 holds no dirty lines
    that must be written back while the op reads: on the H100 that write-back cost a 117 MB read 14% of its
    bandwidth (docs/PERF.md).
    """
    graph = _capture(lambda: [c() for c in calls])
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2] / len(calls)


def cold_copies(num_bytes: int, total: float = 240e6) -> int:
    """How many copies of a num_bytes operand `bench_cold_ms` cycles through: >= 240 MB (~5x the H100's L2)."""
    return max(2, -(-int(total) // max(num_bytes, 1)))


@triton.jit
def _read_kernel(p, out, n, BLOCK: tl.constexpr):
    # Grid-stride read of n int32 words in 16-byte vectors; one sum a program keeps the loads live.
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        acc += tl.load(p + i + offs, mask=i + offs < n, other=0, eviction_policy="evict_first")
    tl.store(out + pid, tl.sum(acc))


def read_bytes(t: torch.Tensor, sink: torch.Tensor) -> None:
    """Read every byte of t once (t's size a multiple of 4) as fast as a plain kernel can: the ceiling that a
    memory-bound op on the same bytes is held to. sink: int32, >= 8 x the SM count elements."""
    words = t.view(-1).view(torch.int32)
    _read_kernel[(sink.numel(),)](words, sink, words.numel(), BLOCK=2048, num_warps=8)


def roofline_ms(num_bytes: float, bytes_per_s: float = HBM_BYTES_PER_S) -> float:
    """Milliseconds to move num_bytes at the measured HBM bandwidth."""
    return num_bytes / bytes_per_s * 1e3


def header() -> str:
    """Device name, software versions and the date, for the top of every benchmark log."""
    props = torch.cuda.get_device_properties(0)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"device: {props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB) | "
        f"torch {torch.__version__} | triton {triton.__version__} | python {platform.python_version()} | {now}"
    )


@dataclass
class Table:
    """A fixed-column text table that prints rows as they are added and renders again at the end."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *values: object) -> None:
        cells = [_fmt(v) for v in values]
        self.rows.append(cells)
        print(f"  [{self.title}] " + " | ".join(cells), flush=True)

    def render(self) -> str:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c) for i, c in enumerate(self.columns)]
        line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
        out = [f"### {self.title}", line(self.columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in self.rows]
        return "\n".join(out)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if v == 0.0 or 0.01 <= abs(v) < 1e5:
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


class Deadline:
    """Wall-clock budget for optional work (sweeps), so a run ends inside the device lease."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


def print_compile_stats(kernel: object) -> None:
    """Registers, spills and shared memory of every compiled variant of a @triton.jit kernel."""
    try:
        for caches in kernel.device_caches.values():  # type: ignore[attr-defined]
            for compiled in caches[0].values():
                meta = compiled.metadata
                ptx = getattr(compiled, "asm", {}).get("ptx", "")
                mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "no-mma")
                print(
                    f"    {getattr(kernel, '__name__', 'kernel')}: {mma} warps {meta.num_warps} stages {meta.num_stages} shared {meta.shared} "
                    f"regs {getattr(compiled, 'n_regs', '?')} spills {getattr(compiled, 'n_spills', '?')} "
                    f"consts {getattr(compiled, 'src', None) and compiled.src.constants}"
                )
    except Exception as e:  # introspection only; Triton internals move between releases
        print(f"    compile stats unavailable: {type(e).__name__}: {e}")
