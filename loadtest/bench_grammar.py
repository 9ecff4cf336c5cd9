"""Structured-output benchmark: a decode step with every row under a JSON-schema grammar against an unconstrained
one, on the model runner with a dummy-weight preset, plus first-use compile times, measured apart.

    python loadtest/bench_grammar.py --preset v3-shape --batch-sizes 32 128          # the H100 target
    python loadtest/bench_grammar.py --preset tiny --device cpu --batch-sizes 2 4 --decode-steps 4   # smoke

The runner is built as a worker builds it (`build_runner`: CUDA graphs, overlap as the worker runs steps: step
N+1 launched before step N is read). A dummy checkpoint has no tokenizer, so one is made up with the model's
vocab_size: byte-level BPE pieces (words of the bundled corpus with and without a leading space, numbers, JSON
punctuation, random letter strings) and DeepSeek's special tokens; pass --tokenizer to use a real tokenizer.json
(DeepSeek-V3's, for numbers to quote). The grammar is an array of records (strings, integers, numbers, enums,
booleans) with a huge minItems, so no row can finish it during the measurement and every step fills real masks.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import random
import re
import shutil
import statistics
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from baleen.messages import GrammarSpec, SamplingParams, SeqRow, SlotInit
from baleen.model.build import WorkerConfig, build_runner
from baleen.model.config import ModelConfig
from baleen.model.grammar import GrammarCache, GrammarSlots
from baleen.model.presets import preset
from baleen.model.tokenizer_build import TOOL_CALL_TOKENS

RECORD = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]}, "maxItems": 4},
    "active": {"type": "boolean"}, "score": {"type": "number"}},
    "required": ["name", "age", "tags", "active", "score"]}  # fmt: skip
SCHEMA = {"type": "array", "items": RECORD, "minItems": 1_000_000}
SECOND = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
          "required": ["city"]}  # a typical tool's parameters, for a second cold compile
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", *TOOL_CALL_TOKENS]


def _load_sibling(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"loadtest_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    """A byte-level BPE tokenizer of exactly `vocab_size` ids (BOS 0, EOS 1), made of plausible pieces."""
    rng = random.Random(seed)
    corpus = Path(__file__).resolve().parents[1] / "model" / "data" / "shakespeare.txt.gz"
    text = gzip.decompress(corpus.read_bytes()).decode("utf-8", "replace") if corpus.exists() else ""
    words = [w for w, _ in Counter(re.findall(r"[A-Za-z]+", text)).most_common(20000)]
    pieces = [*SPECIALS, *pre_tokenizers.ByteLevel.alphabet()]
    for w in words:
        pieces += [w, "Ġ" + w, w.lower(), "Ġ" + w.lower(), w.capitalize(), "Ġ" + w.capitalize()]
    pieces += [str(i) for i in range(1000)] + ["Ġ" + str(i) for i in range(100)]
    punct = ['{"', '"}', '":', '",', '":Ġ', '",Ġ"', 'Ġ"', '"', "},", "Ġ{", "[", "]", "],", "Ġ[", "{", "}", ",Ġ", ":Ġ",
             '"]', '["', "ĊĠĠ", "ĊĠĠĠĠ", "Ċ", "ĠĠ", ".", ",", "!", "?", "'", "-", "_", "(", ")", "Ġ-", "Ġ("]
    pieces += punct
    letters = "abcdefghijklmnopqrstuvwxyz"
    seen: set[str] = set()
    unique = [p for p in pieces if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]
    while len(unique) < vocab_size:
        p = ("Ġ" if rng.random() < 0.5 else "") + "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
        if p not in seen:
            seen.add(p)
            unique.append(p)
    vocab = {p: i for i, p in enumerate(unique[:vocab_size])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def _ms(seconds: float) -> float:
    return seconds * 1e3


def compile_times(tokenizer: Tokenizer, vocab_size: int) -> dict[str, float]:
    """First use, cold: xgrammar's vocabulary, then two schemas; a cache hit; matchers and one row's mask."""
    cache = GrammarCache(tokenizer, vocab_size, [1])
    spec, second = GrammarSpec("json_schema", json.dumps(SCHEMA)), GrammarSpec("json_schema", json.dumps(SECOND))
    t = time.perf_counter()
    cache._compiler(False)  # import xgrammar, build the vocabulary (done in the background at worker start on CUDA)
    vocab_s = time.perf_counter() - t
    t = time.perf_counter()
    cache.compiled(spec)
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    cache.compiled(second)
    second_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(100):
        cache.compiled(spec)
    hit_s = (time.perf_counter() - t) / 100
    slots = GrammarSlots(cache)
    t = time.perf_counter()
    for s in range(100):
        slots.set_slot(s, spec)
    matcher_s = (time.perf_counter() - t) / 100
    rows = slots.rows(list(range(100)))
    t = time.perf_counter()
    for _ in range(20):
        slots.fill(rows[:1])
    fill_s = (time.perf_counter() - t) / 20
    cache.close()
    return {"vocabulary_ms": _ms(vocab_s), "first_schema_compile_ms": _ms(first_s), "second_schema_compile_ms":
            _ms(second_s), "cache_hit_us": hit_s * 1e6, "new_matcher_us": matcher_s * 1e6, "one_row_fill_us":
            fill_s * 1e6}  # fmt: skip


def start(d: Any, slots: list[int], input_len: int, params: list[SamplingParams], gen: torch.Generator,
          per_step: int) -> None:
    """Prefill fresh requests in `slots`, `per_step` a step, each with its own sampling parameters."""
    for i in range(0, len(slots), per_step):
        rows, inits, updates = [], [], []
        for s, p in zip(slots[i : i + per_step], params[i : i + per_step]):
            ids = torch.randint(16, d.vocab, (input_len,), generator=gen).tolist()
            inits.append(SlotInit(s, f"r{s}", p, _i32(ids)))
            updates += d._pages(s, input_len)
            rows.append(SeqRow(s, 0, input_len, _i32(ids), True))
            d.lens[s] = input_len
        d.run(rows, inits, updates)


def decode_like_worker(d: Any, slots: list[int], steps: int) -> float:
    """Overlapped decode steps as WorkerActor runs them: launch N+1 (a constrained step returns with its forward
    queued), wait for step N's tokens, complete N+1's sampling, then finish N. Mean seconds per step."""
    runner = d.runner
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    pending = None
    for _ in range(steps):
        step = runner.launch(d._decode_plan(slots))
        if step.deferred is not None:
            event = runner.tokens_awaited(step)
            if event is not None:
                event.synchronize()
            runner.complete(step)
        if pending is not None:
            runner.finish(pending)
        pending = step
    assert pending is not None
    runner.finish(pending)
    return (time.perf_counter() - t) / steps


def _i32(xs: list[int]) -> bytes:
    from array import array

    return array("i", xs).tobytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="v3-shape")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--context-len", type=int, default=256, help="prompt tokens per request before decoding")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (the median is reported)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer.json (default: a synthetic one)")
    ap.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    one_batch = _load_sibling("bench_one_batch")
    cuda = args.device.startswith("cuda")
    max_bs = max(args.batch_sizes)
    tmp = Path(tempfile.mkdtemp(prefix="bench-grammar-"))
    try:
        config = preset(args.preset)
        (tmp / "config.json").write_text(json.dumps(config))
        vocab_size = config["vocab_size"]
        if args.tokenizer is not None:
            shutil.copy(args.tokenizer, tmp / "tokenizer.json")
        else:
            synthetic_tokenizer(vocab_size).save(str(tmp / "tokenizer.json"))
        tokenizer = Tokenizer.from_file(str(tmp / "tokenizer.json"))
        cfg = ModelConfig.from_hf(str(tmp))
        compiled = compile_times(tokenizer, vocab_size)
        context = args.context_len + args.decode_steps + 8
        per_step = max(1, 2048 // args.context_len)  # prefill requests a step
        runner = build_runner(WorkerConfig(
            model_path=str(tmp), device=args.device, dtype="bfloat16" if cuda else "float32", load_format="dummy",
            attention_backend="triton" if cuda else "torch", page_size=args.page_size,
            max_running_requests=max_bs, max_context_len=context,
            max_total_tokens=max_bs * (context + args.page_size), disable_cuda_graph=not cuda,
            chunked_prefill_size=per_step * args.context_len,
            cuda_graph_bs=tuple(args.batch_sizes), fp8_tiled_weights=cuda))  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert runner.grammars is not None
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    runner.grammars.cache.compiled(spec)  # compiled before the timing, as the scheduler admits requests
    gen = torch.Generator().manual_seed(0)
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    rows: list[dict[str, Any]] = []
    for bs in args.batch_sizes:
        slots = list(range(bs))
        for temp in args.temperatures:
            step_ms: dict[str, float] = {}
            host_ms = 0.0
            for mode in ("free", "json"):
                times = []
                for _ in range(args.repeats):
                    d = one_batch.Driver(runner, cfg.vocab_size)
                    params = [SamplingParams(max_new_tokens=None, temperature=temp, seed=s, ignore_eos=True,
                                             grammar=spec if mode == "json" else None) for s in slots]
                    start(d, slots, args.context_len, params, gen, per_step)
                    for _ in range(3):
                        d.decode(slots)  # warm-up
                    times.append(decode_like_worker(d, slots, args.decode_steps))
                step_ms[mode] = _ms(statistics.median(times))
                if mode == "json":
                    live = runner.grammars.rows(slots)
                    assert len(live) == bs and all(g.plain for _, g in live), "a row left its grammar"
                    t = time.perf_counter()
                    runner.grammars.fill(live)
                    host_ms = _ms(time.perf_counter() - t)
            rows.append({"batch": bs, "temperature": temp, "free_step_ms": step_ms["free"],
                         "json_step_ms": step_ms["json"], "ratio": step_ms["json"] / step_ms["free"],
                         "mask_fill_ms": host_ms})  # fmt: skip
    results = {"device": device_name, "date": date.today().isoformat(), "preset": args.preset,
               "tokenizer": str(args.tokenizer or "synthetic"), "compile": compiled, "decode": rows}
    print(f"# bench_grammar — {args.preset} on {device_name}, {results['date']}, dummy weights, tokenizer "
          f"{results['tokenizer']} ({vocab_size} ids)")
    print("first use: vocabulary {vocabulary_ms:.0f} ms; JSON schema compile {first_schema_compile_ms:.1f} ms cold, "
          "a second schema {second_schema_compile_ms:.1f} ms; cache hit {cache_hit_us:.1f} us; new matcher "
          "{new_matcher_us:.1f} us; one row's mask {one_row_fill_us:.1f} us".format(**compiled))
    print("| batch | temperature | unconstrained step ms | JSON-schema step ms | ratio | host mask fill ms (all rows) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['temperature']:g} | {r['free_step_ms']:.3f} | {r['json_step_ms']:.3f} | "
              f"{r['ratio']:.3f} | {r['mask_fill_ms']:.3f} |")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
