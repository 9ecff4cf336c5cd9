"""Inter-token latency of running streams while long prompts arrive, with and without --enable-mixed-chunk.

    python loadtest/bench_mixed_chunk.py --preset v3-shape --device cuda --context-length 20000 \
        --streams 32 --long-prompt-len 16384 --out mixed.json                      # the issue's case, H100
    python loadtest/bench_mixed_chunk.py --streams 4 --long-prompt-len 768 --chunked-prefill-size 128 \
        --seconds 4 --arrival-interval 1                                            # a CPU smoke run

For each mode (off, then on; a fresh in-process `Engine` each, the flag being an engine setting): --streams
greedy streams of short prompts decode for the whole run (ignore_eos). First --seconds with nothing else (the
baseline), then --seconds while a fresh --long-prompt-len prompt arrives every --arrival-interval seconds (each
generating --long-new-tokens tokens). An inter-token latency (ITL) is the gap between two outputs of a stream,
counted in the phase its later output falls in. Reported per mode: ITL median / p90 / p99 / max of both phases,
the long prompts' TTFT, and p99 with arrivals over the median without (issue 20's target: <= 2 with the flag).

Without the flag a step with prefill work runs no decode rows (SGLang's default), so every long prompt stalls the
streams for all its chunks; with it, each chunk carries every stream's decode row, and a stream's gap is one
chunk's step. That step must stay within 2 decode steps for the target: pick --chunked-prefill-size so that a
chunk's compute is about one decode step (chunk ~ decode step x prefill tokens/s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import random
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from baleen.actors.engine import Engine, EngineConfig
from baleen.messages import SamplingParams
from baleen.model.config import ModelConfig


def _sibling(name: str) -> Any:
    """loadtest/<name>.py (a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"loadtest_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stats_ms(gaps: list[float]) -> dict[str, float]:
    if not gaps:
        return {"n": 0}
    a = np.asarray(gaps) * 1e3
    return {"n": len(gaps), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


async def _stream(engine: Engine, prompt: list[int], max_new: int, stop: asyncio.Event) -> list[float]:
    """Arrival times of a greedy stream's outputs until `stop` is set (then it is aborted)."""
    times: list[float] = []
    sampling = SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
    async with contextlib.aclosing(engine.generate(prompt, sampling)) as outputs:
        async for out in outputs:
            if out.error is not None:
                raise RuntimeError(f"a stream failed: {out.error}")
            if out.token_ids:
                times.append(time.perf_counter())
            if stop.is_set():
                break
    return times


async def _ttft(engine: Engine, prompt: list[int], new_tokens: int) -> float:
    started = time.perf_counter()
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    first = None
    async for out in engine.generate(prompt, sampling):
        if out.error is not None:
            raise RuntimeError(f"a long prompt failed: {out.error}")
        if first is None and out.token_ids:
            first = time.perf_counter() - started
    assert first is not None
    return first


async def run_mode(args: argparse.Namespace, path: Path, mixed: bool) -> dict[str, Any]:
    cfg = ModelConfig.from_hf(str(path))
    context = args.context_length or cfg.max_position_embeddings
    rng = random.Random(0)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, cfg.vocab_size - 100) for _ in range(n)]

    config = EngineConfig(model_path=str(path), device=args.device, dtype=args.dtype,
                          load_format="dummy" if args.preset else "auto", context_length=args.context_length,
                          chunked_prefill_size=args.chunked_prefill_size, disable_radix_cache=True,
                          max_running_requests=args.streams + 8, enable_mixed_chunk=mixed,
                          mixed_chunk_size=args.mixed_chunk_size if mixed else None)
    async with await Engine.start(config) as engine:
        await _ttft(engine, prompt(args.long_prompt_len), args.long_new_tokens)  # first-use compiles, off the clock
        stop = asyncio.Event()
        max_new = context - args.stream_prompt_len - 1
        streams = [asyncio.ensure_future(_stream(engine, prompt(args.stream_prompt_len), max_new, stop))
                   for _ in range(args.streams)]  # fmt: skip
        await asyncio.sleep(args.settle)  # every stream prefilled and decoding
        t0 = time.perf_counter()
        await asyncio.sleep(args.seconds)
        t1 = time.perf_counter()
        arrivals = []
        while time.perf_counter() < t1 + args.seconds:
            arrivals.append(asyncio.ensure_future(_ttft(engine, prompt(args.long_prompt_len), args.long_new_tokens)))
            await asyncio.sleep(args.arrival_interval)
        t2 = time.perf_counter()
        ttfts = await asyncio.gather(*arrivals)
        stop.set()
        times = await asyncio.gather(*streams)
    quiet, busy = [], []
    for ts in times:
        for a, b in itertools.pairwise(ts):
            if t0 <= b < t1:
                quiet.append(b - a)
            elif t1 <= b < t2:
                busy.append(b - a)
    q, bz = stats_ms(quiet), stats_ms(busy)
    ratio = bz["p99"] / q["median"] if q["n"] and bz["n"] else float("nan")
    return {"mixed_chunk": mixed, "quiet": q, "arrivals": bz, "p99_over_quiet_median": ratio,
            "long_prompts": len(ttfts), "long_ttft_ms": [t * 1e3 for t in ttfts]}


def report(results: dict[str, Any]) -> str:
    lines = [f"# bench_mixed_chunk — {results['model']} on {results['device']}, {results['date']}: {results['streams']} "
             f"streams, a {results['long_prompt_len']}-token prompt every {results['arrival_interval']} s, chunk "
             f"{results['chunk']}" + (f", mixed chunk {results['mixed_chunk_size']}" if results.get("mixed_chunk_size")
                                       else ""),
             "| --enable-mixed-chunk | ITL median ms (no arrivals) | p99 | ITL median ms (arrivals) | p90 | p99 | max "
             "| p99 / quiet median | long-prompt TTFT ms (median) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["modes"]:
        q, b = r["quiet"], r["arrivals"]
        ttft = float(np.median(r["long_ttft_ms"])) if r["long_ttft_ms"] else float("nan")
        lines.append(f"| {'on' if r['mixed_chunk'] else 'off'} | {q.get('median', 0):.2f} | {q.get('p99', 0):.2f} | "
                     f"{b.get('median', 0):.2f} | {b.get('p90', 0):.2f} | {b.get('p99', 0):.2f} | {b.get('max', 0):.2f} "
                     f"| {r['p99_over_quiet_median']:.2f} | {ttft:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _sibling("bench_ttft").add_engine_args(ap)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--stream-prompt-len", type=int, default=32)
    ap.add_argument("--long-prompt-len", type=int, default=16384)
    ap.add_argument("--long-new-tokens", type=int, default=8)
    ap.add_argument("--arrival-interval", type=float, default=2.0, help="seconds between long prompts")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds for the streams to start before timing")
    ap.add_argument("--modes", nargs="+", choices=("off", "on"), default=["off", "on"])
    ap.add_argument("--mixed-chunk-size", type=int, default=None,
                    help="with the flag on: the prompt tokens of a step with decode rows (default: the chunk)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    with _sibling("bench_ttft").model_dir(args) as path:
        context = args.context_length or ModelConfig.from_hf(str(path)).max_position_embeddings
        if args.long_prompt_len + args.long_new_tokens > context:
            raise SystemExit(f"--long-prompt-len {args.long_prompt_len} does not fit the context of {context} tokens")
        modes = [asyncio.run(run_mode(args, path, m == "on")) for m in args.modes]
        results = {"model": args.preset or path.name, "device": torch.cuda.get_device_name() if cuda else "CPU",
                   "date": date.today().isoformat(), "streams": args.streams, "long_prompt_len": args.long_prompt_len,
                   "arrival_interval": args.arrival_interval,
                   "chunk": args.chunked_prefill_size or (8192 if cuda else 1024),
                   "mixed_chunk_size": args.mixed_chunk_size, "modes": modes}
    print(report(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
