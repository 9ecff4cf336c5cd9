"""Speculative decoding sweep, as SGLang's bench_speculative: decode tokens/s, accept length and the speed-up over no
speculation, per (num_steps, eagle_topk, num_draft_tokens) and batch size, on the in-process Engine.

    python loadtest/bench_speculative.py                                   # the trained default model, CPU
    python loadtest/bench_speculative.py --device cuda --batch-sizes 1 32 --steps 1 2 3 --out spec.json
    python loadtest/bench_speculative.py --preset v3-shape --device cuda   # dummy weights: accept length ~1

Each configuration starts its own engine (as SGLang's script starts a server per configuration), warms it with one
batch, then runs `--repeats` batches of B concurrent greedy requests (prompts from the default model's corpus of
held-out questions, or random ids for a preset), each generating `--max-new-tokens` tokens with ignore_eos. Decode
tokens/s counts every generated token after each request's first over the wall time from the batch's first to its
last token; accept length is completion tokens / verify steps (SGLang's spec_verify_ct), averaged over requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch

from baleen.actors.engine import Engine, EngineConfig
from baleen.messages import SamplingParams
from baleen.model.make_model import default_model_path, dummy_checkpoint

PROMPTS = [
    "The capital of France is",
    "What is 27 + 58?",
    "To be, or not to be, that is the question:",
    "Name the capital of Japan.",
    "What is 9 * 7?",
    "Once more unto the breach, dear friends,",
    "What is the capital of Kenya?",
    "Compute 140 - 67.",
]


@dataclass(frozen=True)
class SpecConfig:
    steps: int  # 0: no speculation
    topk: int = 1
    draft_tokens: int = 0

    @property
    def label(self) -> str:
        return "off" if not self.steps else f"{self.steps}/{self.topk}/{self.draft_tokens}"


@contextmanager
def model_dir(args: argparse.Namespace) -> Iterator[Path]:
    if args.preset is None:
        yield Path(args.model_path) if args.model_path else default_model_path()
        return
    with dummy_checkpoint(args.preset) as path:
        yield path


def prompts(args: argparse.Namespace, path: Path, n: int) -> list[list[int]]:
    rng = random.Random(0)
    if args.preset is not None:
        return [[rng.randrange(100, 2000) for _ in range(args.prompt_len)] for _ in range(n)]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return [tok.encode(PROMPTS[i % len(PROMPTS)]).ids for i in range(n)]


async def one_batch(engine: Engine, batch: list[list[int]], max_new: int) -> tuple[float, int, list[float]]:
    """(seconds from the batch's first token to its last, decode tokens, accept length of each request)."""
    firsts: list[float] = []
    lasts: list[float] = []
    accept: list[float] = []

    async def run(ids: list[int]) -> int:
        n = 0
        verify = None
        async for out in engine.generate(ids, SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)):
            if out.error is not None:
                raise RuntimeError(out.error)
            if out.token_ids:
                now = time.perf_counter()
                if n == 0:
                    firsts.append(now)
                n += len(out.token_ids)
                lasts.append(now)
            verify = out.spec_verify_ct
        if verify:
            accept.append((n - 1) / verify)  # the first token comes from the prefill, not a verify step
        return n

    counts = await asyncio.gather(*(run(ids) for ids in batch))
    return max(lasts) - min(firsts), sum(c - 1 for c in counts), accept


async def measure(args: argparse.Namespace, path: Path, spec: SpecConfig, batch_sizes: list[int]) -> list[dict[str, Any]]:
    config = EngineConfig(
        model_path=str(path), device=args.device, dtype=args.dtype, context_length=args.context_length,
        load_format="dummy" if args.preset else "auto", max_running_requests=max(batch_sizes),
        speculative_algorithm="EAGLE" if spec.steps else None,
        speculative_num_steps=spec.steps or None, speculative_eagle_topk=spec.topk if spec.steps else None,
        speculative_num_draft_tokens=spec.draft_tokens if spec.steps else None,
    )  # fmt: skip
    rows = []
    async with await Engine.start(config) as engine:
        for bs in batch_sizes:
            batch = prompts(args, path, bs)
            await one_batch(engine, batch, args.max_new_tokens)  # warm: first-use compiles of this shape
            runs = [await one_batch(engine, batch, args.max_new_tokens) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r[0] / max(r[1], 1))
            seconds, tokens, accept = best
            rows.append({"config": spec.label, "batch_size": bs, "tokens_per_s": tokens / seconds,
                         "accept_length": statistics.fmean(accept) if accept else 1.0})  # fmt: skip
            print(f"{spec.label:>8}  bs {bs:>4}: {tokens / seconds:9.1f} tok/s, accept length "
                  f"{rows[-1]['accept_length']:.2f}", flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model-path", default=None, help="a checkpoint (default: the trained default model)")
    src.add_argument("--preset", default=None, help="dummy weights of a preset instead, e.g. v3-shape")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--context-length", type=int, default=None)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3], help="--speculative-num-steps values")
    ap.add_argument("--topk", type=int, nargs="+", default=[1], help="--speculative-eagle-topk values")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64, help="random prompt tokens (with --preset)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = [SpecConfig(0)] + [SpecConfig(s, k, s + 1) for s in args.steps for k in args.topk]
    with model_dir(args) as path:
        rows = [r for spec in configs for r in asyncio.run(measure(args, path, spec, args.batch_sizes))]
    base = {r["batch_size"]: r["tokens_per_s"] for r in rows if r["config"] == "off"}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\n# bench_speculative — {args.preset or 'trained default model'} on {device}, {date.today().isoformat()}")
    print("| steps/topk/draft tokens | batch | tokens/s | accept length | speed-up |\n|---|---|---|---|---|")
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base[r["batch_size"]]
        print(f"| {r['config']} | {r['batch_size']} | {r['tokens_per_s']:.1f} | {r['accept_length']:.2f} | "
              f"{r['speedup']:.2f}x |")
    if args.out is not None:
        args.out.write_text(json.dumps({"device": device, "date": date.today().isoformat(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
