"""Speculative decoding sweep, as SGLang's bench_speculative: decode tokens/s, accept length and the speed-up over no
speculation, per (num_steps, eagle_topk, num_draft_tokens) and batch size, on the in-process Engine.

    python loadtest/bench_speculative.py                                   # the trained default model, CPU
    python loadtest/bench_speculative.py --device cuda --batch-sizes 1 32 --steps 1 2 3 --out spec.json
    python loadtest/bench_speculative.py --preset v3-shape --device cuda   # dummy weights: accept length ~1
    python loadtest/bench_speculative.py --step-costs --batch-sizes 1 32   # v3-shape: graph replay costs, CUDA
    python loadtest/bench_speculative.py --grammar --steps 1 2 3           # accept length under grammars

Each configuration starts its own engine (as SGLang's script starts a server per configuration), warms it with one
batch, then times `--repeats` batches (the median is reported, with the spread) of B concurrent greedy requests (the
default model: two questions through its chat template for each free-text start, `QUESTIONS` / `TEXTS`; random ids
for a preset), each generating `--max-new-tokens` tokens with ignore_eos. Decode tokens/s counts every generated
token after each request's first over the wall time from the batch's first to its last token; accept length is
completion tokens / verify steps (SGLang's spec_verify_ct), averaged over requests; "steps graphed" is the share of
the engine's steps over the timed batches that replayed CUDA graphs.

`--step-costs` (CUDA) times the captured graphs themselves on one runner with dummy weights (`--preset`, default
v3-shape): the plain decode step (model/cuda_graph.py) against the speculative one's parts (model/spec_graphs.py:
the draft loop of k - 1 MTP steps, the verify forward over k + 1 tokens a row, the greedy tail, the draft-extend),
every request at `--context-len` cached tokens; GPU time per replay, from CUDA events over `--replays` replays.

`--grammar` runs the trained default model's structured-output cases instead (`GRAMMAR_CASES`, those of
tests/actors/test_engine_speculative.py: two JSON schemas greedy, one seeded, a regex; concurrently, float32), once
without speculation and once per --steps value: tokens a verify row (completion tokens over spec_verify_ct, summed
over the cases), whether every output equals the one without speculation, and completion tokens/s over --repeats more
runs of the four (after the first, which compiles the grammars).
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
from baleen.messages import GrammarSpec, PageUpdate, SamplingParams, SeqRow, SlotInit, StepPlan
from baleen.model.make_model import default_model_path, dummy_checkpoint

# What the default model is asked in serving: questions through its chat template (rendered as the API renders
# them), and free text to continue, alternately.
QUESTIONS = [
    "What is 27 + 58?",
    "Name the capital of Japan.",
    "What is 9 * 7?",
    "How's the weather like in Qingdao today",
    "What is the capital of Kenya?",
    "Compute 140 - 67.",
]
TEXTS = [
    "The capital of France is",
    "To be, or not to be, that is the question:",
    "Once more unto the breach, dear friends,",
]

_PERSON = GrammarSpec("json_schema", json.dumps({
    "type": "object", "properties": {"country": {"type": "string", "maxLength": 24},
                                     "capital": {"type": "string", "maxLength": 24}},
    "required": ["country", "capital"], "additionalProperties": False}))  # fmt: skip
_TOTAL = GrammarSpec("json_schema", json.dumps({
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}, "sum": {"type": "integer"}},
    "required": ["a", "b", "sum"]}))  # fmt: skip
GRAMMAR_CASES = [
    ("The capital of France is", SamplingParams(max_new_tokens=48, temperature=0.0, grammar=_PERSON)),
    ("What is 12 + 35?", SamplingParams(max_new_tokens=48, temperature=0.0, grammar=_TOTAL)),
    ("Name the capital of Japan.", SamplingParams(max_new_tokens=48, temperature=1.0, seed=3, grammar=_PERSON)),
    ("To be, or not to be, that is", SamplingParams(max_new_tokens=24, temperature=0.0,
                                                   grammar=GrammarSpec("regex", r"[a-z ]{4,40}\."))),
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

    from baleen.model import corpus

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tools = [corpus.QUERY_WEATHER]
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append(tok.encode(TEXTS[i // 3 % len(TEXTS)]).ids)
        else:
            q = QUESTIONS[(i - i // 3) % len(QUESTIONS)]
            prompt = corpus.chat("", q, "", tools if "weather" in q else None)[0][0]
            out.append(tok.encode(prompt, add_special_tokens=False).ids)
    return out


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


async def _step_counts(engine: Engine) -> tuple[int, int]:
    """The engine's (steps run, steps that replayed CUDA graphs) so far, after its next metrics report."""
    await asyncio.sleep(0.3)
    return int(engine.metrics.get("num_steps", 0)), int(engine.metrics.get("num_graphed_steps", 0))


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
            steps_before = await _step_counts(engine)
            runs = [await one_batch(engine, batch, args.max_new_tokens) for _ in range(args.repeats)]
            steps, graphed = (after - before for after, before in zip(await _step_counts(engine), steps_before))
            # the median run (a batch of one request is a few tens of ms: one run alone moved 1.06-1.60x between
            # H100 sessions), with the spread of all
            speeds = sorted(tokens / seconds for seconds, tokens, _ in runs)
            accept = [a for _, _, acc in runs for a in acc]
            rows.append({"config": spec.label, "batch_size": bs, "tokens_per_s": statistics.median(speeds),
                         "min_tokens_per_s": speeds[0], "max_tokens_per_s": speeds[-1],
                         "accept_length": statistics.fmean(accept) if accept else 1.0,
                         "graphed": graphed / max(steps, 1)})  # fmt: skip
            print(f"{spec.label:>8}  bs {bs:>4}: {rows[-1]['tokens_per_s']:9.1f} tok/s (median of {len(speeds)}, "
                  f"{speeds[0]:.1f}-{speeds[-1]:.1f}), accept length {rows[-1]['accept_length']:.2f}", flush=True)
    return rows


async def grammar_run(args: argparse.Namespace, path: Path,
                      steps: int) -> tuple[list[list[int]], int, int, float, float]:  # fmt: skip
    """GRAMMAR_CASES at once on one engine: each case's tokens, the completion tokens and verify rows of all, the
    completion tokens/s over --repeats more runs of them all (the first run warms the engine and compiles the
    grammars), and the share of the engine's steps that replayed CUDA graphs."""
    cpu = args.device == "cpu"
    config = EngineConfig(model_path=str(path), device=args.device, dtype="float32" if cpu else "auto",
                          context_length=512, speculative_algorithm="EAGLE" if steps else None,
                          speculative_num_steps=steps or None)  # fmt: skip
    async with await Engine.start(config) as engine:

        async def one(prompt: str, params: SamplingParams) -> tuple[list[int], int, int]:
            ids: list[int] = []
            last = None
            async for out in engine.generate(prompt, params):
                if out.error is not None:
                    raise RuntimeError(out.error)
                ids += out.token_ids
                last = out
            assert last is not None
            return ids, last.completion_tokens, last.spec_verify_ct or 0

        outs = await asyncio.gather(*(one(p, sp) for p, sp in GRAMMAR_CASES))
        tokens = 0
        started = time.perf_counter()
        for _ in range(args.repeats):
            again = await asyncio.gather(*(one(p, sp) for p, sp in GRAMMAR_CASES))
            tokens += sum(t for _, t, _ in again)
        seconds = time.perf_counter() - started
        steps, graphed = await _step_counts(engine)
    return ([ids for ids, _, _ in outs], sum(t for _, t, _ in outs), sum(v for _, _, v in outs), tokens / seconds,
            graphed / max(steps, 1))  # fmt: skip


def grammar_accept(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Tokens a verify row under the grammars per --steps value, and whether the outputs equal the plain ones."""
    with model_dir(args) as path:
        plain, plain_tokens, _, plain_speed, plain_graphed = asyncio.run(grammar_run(args, path, 0))
        rows = [{"steps": 0, "tokens": plain_tokens, "verify_rows": 0, "tokens_per_verify_row": 1.0,
                 "tokens_per_s": plain_speed, "graphed": plain_graphed, "equal": True}]  # fmt: skip
        for steps in args.steps:
            ids, tokens, verify, speed, graphed = asyncio.run(grammar_run(args, path, steps))
            rows.append({"steps": steps, "tokens": tokens, "verify_rows": verify, "tokens_per_s": speed,
                         "graphed": graphed, "tokens_per_verify_row": tokens / max(verify, 1),
                         "equal": ids == plain})  # fmt: skip
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\n# bench_speculative --grammar — trained default model on {device}, {date.today().isoformat()}")
    print("| steps | tokens | tokens/s | steps graphed | verify rows | tokens a verify row | outputs equal to no "
          "speculation |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps'] or 'off'} | {r['tokens']} | {r['tokens_per_s']:.1f} | {r['graphed']:.0%} | "
              f"{r['verify_rows']} | {r['tokens_per_verify_row']:.2f} | {'yes' if r['equal'] else 'NO'} |")
    return rows


def _gpu_ms(replay: Any, n: int) -> float:
    """GPU milliseconds per call of `replay` over n back-to-back calls (after 3 warm ones)."""
    for _ in range(3):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def step_costs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The decode graph vs the speculative step's graphs, per batch size, on one runner (see the docstring)."""
    from array import array

    from baleen.model.build import WorkerConfig, build_runner

    k, sizes, ctx = args.steps[-1], sorted(args.batch_sizes), args.cached_len
    chunk = 4096
    with model_dir(args) as path:
        runner = build_runner(WorkerConfig(
            model_path=str(path), device="cuda", dtype="bfloat16", load_format="dummy", attention_backend="triton",
            page_size=64, max_running_requests=max(sizes), max_context_len=ctx + 64, chunked_prefill_size=chunk,
            max_total_tokens=max(sizes) * (ctx + 128) + chunk, cuda_graph_bs=tuple(sizes), speculative_num_steps=k,
        ))  # fmt: skip
    sg = runner.spec_graphs
    assert sg is not None, "no speculative graphs captured"
    cfg = runner.model.config
    graphs = runner.capture_graphs(sizes, cfg.num_attention_heads)  # the plain decode step, on the same runner
    # every slot gets a ctx-token prompt, prefilled a few requests a step
    rng = random.Random(0)
    per_slot = -(-(ctx + 64) // 64)
    group = max(1, chunk // ctx)
    for first in range(0, max(sizes), group):
        slots = range(first, min(first + group, max(sizes)))
        ids = {s: array("i", [rng.randrange(100, min(cfg.vocab_size, 2000)) for _ in range(ctx)]).tobytes() for s in slots}
        plan = StepPlan(step_id=first, rows=[SeqRow(s, 0, ctx, ids[s], True) for s in slots],
                        new_slots=[SlotInit(s, f"r{s}", SamplingParams(temperature=0.0), ids[s]) for s in slots],
                        page_updates=[PageUpdate(s, 0, array("i", range(1 + s * per_slot, 1 + (s + 1) * per_slot)).tobytes())
                                      for s in slots])  # fmt: skip
        runner.finish(runner.launch(plan))
    rows = []
    for bs in sizes:
        spec_rows = torch.tensor([[s, ctx] for s in range(bs)], dtype=torch.int64)
        decode_rows = torch.tensor([[s, ctx + 1, -1, s] for s in range(bs)], dtype=torch.int64)
        graphs.step_rows[:bs].copy_(decode_rows)
        sg.draft_and_verify(spec_rows, bs)  # fills the step rows
        torch.cuda.synchronize()
        decode = _gpu_ms(graphs.graphs[bs][0].replay, args.replays)
        draft = _gpu_ms(sg.draft_graphs[bs].replay, args.replays) if k > 1 else 0.0
        verify = _gpu_ms(sg.verify_graphs[bs][0].replay, args.replays)
        tail = _gpu_ms(sg.tail_graphs[bs].replay, args.replays)
        extend = _gpu_ms(sg.extend_graphs[bs].replay, args.replays)
        full = draft + verify + tail + extend
        rows.append({"batch_size": bs, "decode_ms": decode, "draft_ms": draft, "verify_ms": verify, "tail_ms": tail,
                     "extend_ms": extend, "verify_over_decode": verify / decode, "draft_share": draft / verify,
                     "spec_step_over_decode": full / decode})  # fmt: skip
    return rows


def print_step_costs(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    k = args.steps[-1]
    print(f"\n# bench_speculative --step-costs — {args.preset or 'v3-shape'}, {k} drafts, context {args.cached_len}, "
          f"on {torch.cuda.get_device_name()}, {date.today().isoformat()} (GPU ms per graph replay)")
    print("| batch | decode | draft loop | verify | tail | extend | verify / decode (target <= 1.15 at 1, 1.5 at 32) "
          "| draft / verify (<= 0.15) | whole spec step / decode (break-even accept length) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['decode_ms']:.3f} | {r['draft_ms']:.3f} | {r['verify_ms']:.3f} | "
              f"{r['tail_ms']:.3f} | {r['extend_ms']:.3f} | {r['verify_over_decode']:.2f}x | {r['draft_share']:.1%} | "
              f"{r['spec_step_over_decode']:.2f}x |")


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
    ap.add_argument("--repeats", type=int, default=5, help="timed batches a configuration (the median is reported)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--step-costs", action="store_true", help="time the captured graphs instead (CUDA; --preset, "
                    "default v3-shape; the last --steps value drafts)")  # fmt: skip
    ap.add_argument("--cached-len", type=int, default=1024, help="cached tokens a request (--step-costs)")
    ap.add_argument("--replays", type=int, default=50, help="graph replays timed (--step-costs)")
    ap.add_argument("--grammar", action="store_true", help="the accept length under grammars instead (the trained "
                    "default model's structured-output cases, per --steps value)")  # fmt: skip
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step_costs:
        args.preset = args.preset or "v3-shape"
        rows = step_costs(args)
        print_step_costs(args, rows)
        if args.out is not None:
            args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "date": date.today().isoformat(),
                                            "step_costs": rows}, indent=1))  # fmt: skip
        return 0
    if args.grammar:
        rows = grammar_accept(args)
        if args.out is not None:
            args.out.write_text(json.dumps({"date": date.today().isoformat(), "grammar": rows}, indent=1))
        return 0 if all(r["equal"] for r in rows) else 1
    configs = [SpecConfig(0)] + [SpecConfig(s, k, s + 1) for s in args.steps for k in args.topk]
    with model_dir(args) as path:
        rows = [r for spec in configs for r in asyncio.run(measure(args, path, spec, args.batch_sizes))]
    base = {r["batch_size"]: r["tokens_per_s"] for r in rows if r["config"] == "off"}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\n# bench_speculative — {args.preset or 'trained default model'} on {device}, {date.today().isoformat()}")
    print("| steps/topk/draft tokens | batch | tokens/s (median) | min-max | accept length | speed-up | steps graphed |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base[r["batch_size"]]
        print(f"| {r['config']} | {r['batch_size']} | {r['tokens_per_s']:.1f} | {r['min_tokens_per_s']:.0f}-"
              f"{r['max_tokens_per_s']:.0f} | {r['accept_length']:.2f} | {r['speedup']:.2f}x | {r['graphed']:.0%} |")
    if args.out is not None:
        args.out.write_text(json.dumps({"device": device, "date": date.today().isoformat(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
