"""Why is a prompt length's first request slower than the next (issue 20)? TTFT of each length's first and
second request, and what the first one did that the second did not.

    python -P loadtest/probe_first_request.py --preset v3-shape --context-length 20000 \
        --cached-prefix 8192 --profile --out probe.json          # the H100 (in-process Engine, as bench_ttft)
    python -P loadtest/probe_first_request.py --device cpu --lengths 16 17 100 300 --profile   # tiny model

The Engine is built and warmed up as `bench_ttft.py --mode engine` builds it (its helpers), without bench_ttft's
bare-forward measurement first (whose compiles would hide the engine's). Then, for every --lengths length, two
fresh random prompts of that length (no prefix-cache hit), one after the other; during each the probe records
- Triton: every kernel compiled (or loaded from Triton's disk cache) and every binary loaded onto the device,
  with the kernel's name, constexprs and the arguments it was specialised on (% 16), and the time taken
  (`triton.knobs.runtime.jit_cache_hook` / `jit_post_compile_hook`, `knobs.compilation.listener` and the
  kernel-load hooks: Triton 3.6's names);
- torch's caching allocator: new segments (cudaMalloc), reserved MB and allocation retries (free + retry);
- with --profile, for --profile-lengths: a torch.profiler trace of a first and a second request (CPU + CUDA, all
  threads), the ops with the most self CPU time in the first, beside the second's.
`--cached-prefix N` adds the same for N cached tokens + --suffix-lengths new ones (the extend path). On CUDA it
also times scaled_dot_product_attention's first and second call at --sdpa-lengths on a fresh thread, per
backend, and says which one torch picks for the expanded prefill's shape (cuDNN builds a plan per shape and
keeps it per thread). A/B switches: `--expanded-sdpa torch` lets torch pick the expanded prefill's SDPA kernel
(cuDNN on Hopper with cuDNN > 9.15: before issue 20's fix); `--no-shape-warmup` skips model/warm_up.py.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import torch

from baleen.actors.engine import Engine
from baleen.model.config import ModelConfig

DEFAULT_LENGTHS = [16, 17, 33, 100, 256, 300, 1000, 2048, 2049, 3000]


def _sibling(name: str) -> Any:
    """loadtest/<name>.py (a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"loadtest_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_ttft = _sibling("bench_ttft")


# ---- Triton: what compiled ----------------------------------------------------------------------------------
@dataclass
class Compile:
    """One kernel the JIT had no binary for in memory: compiled, or loaded from Triton's disk cache."""

    kernel: str
    key: str  # constexprs, and the arguments specialised on (% 16 == 0)
    seconds: float
    disk_cache_hit: bool | None = None  # None: the compilation listener did not report


@dataclass
class TritonRecorder:
    """Triton's JIT hooks, installed for the whole run; `mark()` / `since(mark)` cut out one request's events.

    NOTE: a hook that raised would fail the kernel launch, so each swallows its own errors, and the cache hook
    returns None (a true value would skip the compile)."""

    compiles: list[Compile] = field(default_factory=list)
    loads: list[tuple[str, float]] = field(default_factory=list)  # (kernel, seconds) binaries loaded on the device
    errors: list[str] = field(default_factory=list)
    installed: str = ""  # why not, when empty after install()
    _started: dict[str, float] = field(default_factory=dict)
    _load_started: dict[str, float] = field(default_factory=dict)
    _last_hit: bool | None = None

    def install(self) -> bool:
        try:
            from triton import knobs

            knobs.runtime.jit_cache_hook = self._before
            knobs.runtime.jit_post_compile_hook = self._after
            knobs.compilation.listener = self._listen
            knobs.runtime.kernel_load_start_hook.add(self._load_start)
            knobs.runtime.kernel_load_end_hook.add(self._load_end)
        except Exception as e:  # another Triton: say so, the rest of the probe still runs
            self.installed = f"no Triton JIT hooks ({type(e).__name__}: {e})"
            return False
        self.installed = "ok"
        return True

    def mark(self) -> tuple[int, int]:
        return len(self.compiles), len(self.loads)

    def since(self, mark: tuple[int, int]) -> tuple[list[Compile], list[tuple[str, float]]]:
        return self.compiles[mark[0] :], self.loads[mark[1] :]

    def _before(self, *, key: str, fn: Any, **_: Any) -> None:
        try:
            self._started[f"{fn.name}|{key}"] = time.perf_counter()
            self._last_hit = None
        except Exception as e:
            self.errors.append(repr(e))
        return None

    def _listen(self, *, cache_hit: bool, **_: Any) -> None:
        self._last_hit = cache_hit

    def _after(self, *, key: str, fn: Any, compile: dict[str, Any], **_: Any) -> None:
        try:
            started = self._started.pop(f"{fn.name}|{key}", time.perf_counter())
            self.compiles.append(Compile(fn.name, describe_key(fn.jit_function, compile),
                                         time.perf_counter() - started, self._last_hit))  # fmt: skip
        except Exception as e:
            self.errors.append(repr(e))

    def _load_start(self, module: Any, function: Any, name: str, metadata_group: Any, hash: str) -> None:
        self._load_started[hash] = time.perf_counter()

    def _load_end(self, module: Any, function: Any, name: str, metadata_group: Any, hash: str) -> None:
        self.loads.append((name, time.perf_counter() - self._load_started.pop(hash, time.perf_counter())))


def describe_key(jit_fn: Any, compile: dict[str, Any]) -> str:
    """`BLOCK_M=16 ... | %16: M, stride_am` (constexprs, then the arguments Triton specialised as multiples of 16)."""
    names = [p.name for p in jit_fn.params]
    consts = [f"{names[path[0]]}={value}" for path, value in compile.get("constants", {}).items()
              if len(path) == 1 and path[0] < len(names)]  # fmt: skip
    attrs = compile.get("configs", [{}])[0]
    div16 = [names[path[0]] for path, kinds in attrs.items() if len(path) == 1 and path[0] < len(names)
             and any(k[0] == "tt.divisibility" for k in kinds)]  # fmt: skip
    opts = f"w{compile.get('num_warps')}s{compile.get('num_stages')}"
    return f"{' '.join(consts)} {opts} | %16: {', '.join(div16) or '-'}"


# ---- the allocator: what grew -------------------------------------------------------------------------------
ALLOC_KEYS = {"segment.all.allocated": "cudaMalloc", "num_alloc_retries": "retries", "num_device_alloc": "device_alloc"}


def alloc_stats(device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        return {}
    s = torch.cuda.memory_stats(device)
    out = {name: int(s.get(key, 0)) for key, name in ALLOC_KEYS.items()}
    out["reserved_mb"] = int(s.get("reserved_bytes.all.current", 0)) >> 20
    return out


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


# ---- one request, observed ----------------------------------------------------------------------------------
@dataclass
class Observed:
    ttft_ms: float
    compiles: list[Compile]
    loads: list[tuple[str, float]]
    alloc: dict[str, int]
    profile: list[dict[str, Any]] | None = None


@contextmanager
def profiled(out: dict[str, Any], top: int, trace: Path | None) -> Iterator[None]:
    """torch.profiler over the block, every thread (the CPU engine steps on its own torch thread); the `top` ops by
    self CPU time land in out["ops"]."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    try:
        cfg = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
        prof_cm = profile(activities=acts, experimental_config=cfg)
    except TypeError:  # a torch without it: the launching thread only
        prof_cm = profile(activities=acts)
    with prof_cm as prof:
        yield
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        device_us = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
        rows.append({"op": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                     "cpu_total_ms": e.cpu_time_total / 1e3, "self_device_ms": device_us / 1e3})  # fmt: skip
    out["ops"] = rows


async def observe(engine: Engine, prompt: list[int], args: argparse.Namespace, rec: TritonRecorder,
                  device: torch.device, profile_as: str | None = None) -> Observed:  # fmt: skip
    """One request's TTFT, and the compiles, loads and allocator growth while it ran (profiled if `profile_as`)."""
    mark, before, prof = rec.mark(), alloc_stats(device), {}
    if profile_as is None:
        ttft = (await bench_ttft.engine_stream(engine, prompt, args.new_tokens))[0]
    else:
        trace = args.trace_dir / f"{profile_as}.json" if args.trace_dir else None
        with profiled(prof, args.top, trace):
            ttft = (await bench_ttft.engine_stream(engine, prompt, args.new_tokens))[0]
    compiles, loads = rec.since(mark)
    return Observed(ttft * 1e3, compiles, loads, diff(alloc_stats(device), before), prof.get("ops"))


async def probe(args: argparse.Namespace, path: Path, vocab: int, rec: TritonRecorder) -> dict[str, Any]:
    rng = random.Random(20)
    device = torch.device(args.device if args.device != "cuda" else f"cuda:{torch.cuda.current_device()}")
    res: dict[str, Any] = {"lengths": {}, "cached": {}, "profiled": {}}
    mark, started = rec.mark(), time.perf_counter()
    async with await Engine.start(bench_ttft.engine_config(args, path)) as engine:
        compiles, loads = rec.since(mark)
        res["startup"] = {"seconds": time.perf_counter() - started, "compiles": len(compiles),
                          "compile_s": sum(c.seconds for c in compiles), "loads": len(loads)}  # fmt: skip
        for n in args.lengths:
            res["lengths"][n] = [await observe(engine, bench_ttft._prompt(rng, n, vocab), args, rec, device)
                                 for _ in range(2)]  # fmt: skip
        for s in args.suffix_lengths if args.cached_prefix else []:
            head = bench_ttft._prompt(rng, args.cached_prefix, vocab)
            await bench_ttft.engine_stream(engine, head, 1)  # caches its pages
            res["cached"][s] = [await observe(engine, head + bench_ttft._prompt(rng, s, vocab), args, rec, device)
                                for _ in range(2)]  # fmt: skip
        for n in args.profile_lengths if args.profile else []:
            res["profiled"][n] = [await observe(engine, bench_ttft._prompt(rng, n, vocab), args, rec, device,
                                                f"first-request-{n}-{which}") for which in ("first", "second")]
    return res


# ---- scaled_dot_product_attention on its own -------------------------------------------------------------------
def sdpa_probe(heads: int, head_dim: int, lengths: list[int]) -> dict[str, Any]:
    """Which SDPA kernel torch picks for the expanded prefill's shape (causal, bf16, [1, H, n, D]), and each
    backend's first and second call at each length on a fresh thread (cuDNN's plan cache is per thread)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {int(v): k for k, v in SDPBackend.__members__.items()}

    def qkv(n: int) -> torch.Tensor:  # [1, H, n, D] with the expanded prefill's strides (model/attention_triton.py)
        return torch.randn(n, heads, head_dim, dtype=torch.bfloat16, device="cuda").transpose(0, 1)[None]

    q = qkv(lengths[0])
    picked = names.get(int(torch._fused_sdp_choice(q, q, q, is_causal=True)), "?")
    out: dict[str, Any] = {"cudnn_version": torch.backends.cudnn.version(), "torch_picks": picked}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        times: dict[int, Any] = {}

        def run(backend: Any = backend, times: dict[int, Any] = times) -> None:
            with sdpa_kernel(backend):
                for n in lengths:
                    x = qkv(n)
                    calls = []
                    for _ in range(2):
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        try:
                            torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
                        except RuntimeError as e:
                            times[n] = f"not available: {str(e).splitlines()[0][:80]}"
                            return
                        torch.cuda.synchronize()
                        calls.append((time.perf_counter() - t) * 1e3)
                    times[n] = calls

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        out[backend.name] = times
    return out


# ---- report ----------------------------------------------------------------------------------------------------
def _row(label: str, pair: list[Observed]) -> str:
    first, second = pair
    real = [c for c in first.compiles if c.disk_cache_hit is not True]
    hits = [c for c in first.compiles if c.disk_cache_hit is True]
    a = first.alloc
    alloc = f"{a['cudaMalloc']} | {a['reserved_mb']} | {a['retries']}" if a else "- | - | -"
    return (f"| {label} | {first.ttft_ms:.1f} | {second.ttft_ms:.1f} | {first.ttft_ms - second.ttft_ms:+.1f} | "
            f"{len(real)} ({sum(c.seconds for c in real) * 1e3:.0f} ms) | {len(hits)} "
            f"({sum(c.seconds for c in hits) * 1e3:.0f} ms) | {len(first.loads)} | {alloc} | "
            f"{len(second.compiles)} |")


def _kernels(label: str, obs: Observed) -> list[str]:
    return [f"  {label}: {c.kernel} {c.key} — {c.seconds * 1e3:.1f} ms"
            + (" (disk cache)" if c.disk_cache_hit else "") for c in obs.compiles]


def _ops(label: str, first: Observed, second: Observed) -> list[str]:
    lines = [f"profiled {label}: TTFT {first.ttft_ms:.1f} ms first, {second.ttft_ms:.1f} ms second (profiler on)",
             "| op | calls | self CPU ms (1st) | self CPU ms (2nd) | self device ms (1st) |", "|---|---|---|---|---|"]
    seconds = {r["op"]: r for r in second.profile or []}
    for r in first.profile or []:
        s = seconds.get(r["op"], {})
        lines.append(f"| {r['op'][:60]} | {r['count']} | {r['self_cpu_ms']:.2f} | {s.get('self_cpu_ms', 0.0):.2f} | "
                     f"{r['self_device_ms']:.2f} |")
    return lines


def report(results: dict[str, Any]) -> str:
    st = results["startup"]
    lines = [f"# probe_first_request — {results['model']} on {results['device']}, {results['date']}; switches: "
             f"{results['switches']}; Triton hooks: {results['triton_hooks']}",
             f"Engine.start {st['seconds']:.1f} s: {st['compiles']} Triton compiles/loads ({st['compile_s']:.1f} s), "
             f"{st['loads']} binaries loaded",
             "| prompt | 1st TTFT ms | 2nd TTFT ms | 1st - 2nd | Triton compiles (1st) | disk-cache loads (1st) | "
             "binaries loaded (1st) | cudaMalloc (1st) | reserved MB + (1st) | alloc retries (1st) | compiles (2nd) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    detail: list[str] = []
    for n, pair in results["lengths"].items():
        lines.append(_row(str(n), pair))
        detail += _kernels(f"{n} tokens", pair[0]) + _kernels(f"{n} tokens (2nd)", pair[1])
    for s, pair in results["cached"].items():
        lines.append(_row(f"{results['cached_prefix']} cached + {s}", pair))
        detail += _kernels(f"cached + {s}", pair[0])
    lines += ["What compiled during the first requests:" if detail else "Nothing compiled during the requests.", *detail]
    for n, (first, second) in results["profiled"].items():
        lines += _ops(f"{n} tokens", first, second)
    if "sdpa" in results:
        sd = results["sdpa"]
        lines.append(f"SDPA for the expanded prefill's shape: torch picks {sd['torch_picks']} (cuDNN "
                     f"{sd['cudnn_version']}); first / second call ms on a fresh thread:")
        for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
            cells = [f"{n}: " + (f"{v[0]:.1f} / {v[1]:.1f}" if isinstance(v, list) else v)
                     for n, v in sd[backend].items()]  # fmt: skip
            lines.append(f"  {backend}: " + "; ".join(cells))
    if results["hook_errors"]:
        lines.append(f"hook errors: {results['hook_errors'][:3]}")
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------------------
def apply_switches(args: argparse.Namespace) -> str:
    """The A/B switches, set on the modules the in-process engine reads (this process only)."""
    done = []
    if args.expanded_sdpa == "torch":
        from torch.nn.attention import SDPBackend

        from baleen.model import attention_triton

        attention_triton.EXPANDED_SDPA_BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                                   SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)  # fmt: skip
        done.append("expanded SDPA: torch's pick")
    if args.no_shape_warmup:
        from baleen.model import warm_up

        skip: Callable[..., int] = lambda *a, **k: 0
        warm_up.warm_up_shapes = skip  # type: ignore[assignment]
        done.append("no start-up shape warm-up")
    return ", ".join(done) or "none"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_ttft.add_engine_args(ap)
    ap.add_argument("--page-size", type=int, default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, help="prompt lengths, each new")
    ap.add_argument("--new-tokens", type=int, default=2, help="tokens asked of each request")
    ap.add_argument("--cached-prefix", type=int, default=0, help="also probe this many cached tokens + a suffix")
    ap.add_argument("--suffix-lengths", type=int, nargs="+", default=[16, 17, 100])
    ap.add_argument("--profile", action="store_true", help="torch.profiler traces of a first and a second request")
    ap.add_argument("--profile-lengths", type=int, nargs="+", default=[777, 1501], help="fresh lengths to profile")
    ap.add_argument("--top", type=int, default=15, help="ops listed per profile")
    ap.add_argument("--trace-dir", type=Path, default=None, help="write the chrome traces here")
    ap.add_argument("--sdpa-lengths", type=int, nargs="*", default=[301, 1003, 3001, 16001],
                    help="CUDA: SDPA alone, first and second call per backend")
    ap.add_argument("--expanded-sdpa", choices=("baleen", "torch"), default="baleen")
    ap.add_argument("--no-shape-warmup", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    args.enable_mixed_chunk = False  # what bench_ttft.engine_config reads
    return args


def _jsonable(o: Any) -> Any:
    return asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    switches = apply_switches(args)
    rec = TritonRecorder()
    rec.install()
    if args.trace_dir is not None:
        args.trace_dir.mkdir(parents=True, exist_ok=True)
    with bench_ttft.model_dir(args) as path:
        cfg = ModelConfig.from_hf(str(path))
        context = args.context_length or cfg.max_position_embeddings
        fits = lambda n: n + args.new_tokens <= context
        args.lengths = [n for n in args.lengths if fits(n)]
        args.profile_lengths = [n for n in args.profile_lengths if fits(n)]
        if args.cached_prefix and not fits(args.cached_prefix + max(args.suffix_lengths)):
            raise SystemExit(f"--cached-prefix {args.cached_prefix} + a suffix does not fit the context of {context}")
        results = asyncio.run(probe(args, path, cfg.vocab_size, rec))
        results.update(model=args.preset or path.name, device=torch.cuda.get_device_name() if cuda else "CPU",
                       date=date.today().isoformat(), switches=switches, cached_prefix=args.cached_prefix,
                       triton_hooks=rec.installed if cuda else f"{rec.installed} (no Triton launches on CPU)",
                       hook_errors=rec.errors)  # fmt: skip
        if cuda and args.sdpa_lengths:
            results["sdpa"] = sdpa_probe(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
                                         args.sdpa_lengths)  # fmt: skip
    print(report(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1, default=_jsonable))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
