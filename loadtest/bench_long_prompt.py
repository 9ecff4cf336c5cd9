"""Time to first token against prompt length, against the compute the prompt needs (dummy-weight preset, GPU).

    python loadtest/bench_long_prompt.py --preset v3-shape --lengths 1024 4096 16384 131072 --out long.json

An in-process Engine (radix cache off, so every prompt is computed) serves one prompt of fresh random ids at a
time with max_new_tokens=1. Each length's target is what its chunks cost at the measured rates:
  sum over chunks of (chunk tokens / prefill throughput) + attention FLOPs / MLA rate,
where the prefill throughput is a one-chunk prompt's tokens over its TTFT (attention included, overheads too),
the attention FLOPs count only the part that grows with the prefix (the later chunks' absorbed attention over
everything before them: 2 * (kv_lora_rank + rope) + 2 * kv_lora_rank per query head and key), and the MLA rate
is measured side by side on this device at one such chunk: our extend path (what the engine runs) and
FlashInfer's MLA (when installed). The first chunk's own attention is inside the prefill throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from baleen.actors.engine import Engine, EngineConfig
from baleen.messages import SamplingParams
from baleen.model.batch import ForwardBatch
from baleen.model.config import ModelConfig
from baleen.model.make_model import dummy_checkpoint

DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]


def attention_flops(prompt_len: int, chunk: int, cfg: ModelConfig) -> float:
    """FLOPs of the absorbed attention of every chunk after the first over the keys before and within it."""
    per_pair = cfg.num_attention_heads * (2 * cfg.kv_cache_dim + 2 * cfg.kv_lora_rank) * cfg.num_hidden_layers
    total = 0.0
    for start in range(chunk, prompt_len, chunk):
        n = min(chunk, prompt_len - start)
        total += n * (start + (n + 1) / 2) * per_pair  # token j of the chunk sees start + j + 1 keys
    return total


def _extend_case(cfg: ModelConfig, chunk: int, prefix: int, page_size: int) -> tuple[ForwardBatch, torch.Tensor, ...]:
    dev = torch.device("cuda")
    pages = -(-(prefix + chunk) // page_size)
    perm = torch.randperm(pages).add(1).tolist()
    batch = ForwardBatch.build([0] * chunk, [prefix], [chunk], [perm], page_size, device=dev)
    cache = torch.randn(pages + 1, page_size, cfg.kv_cache_dim, device=dev, dtype=torch.bfloat16)
    h = cfg.num_attention_heads
    q = torch.randn(chunk, h, cfg.kv_lora_rank, device=dev, dtype=torch.bfloat16)
    q_pe = torch.randn(chunk, h, cfg.qk_rope_head_dim, device=dev, dtype=torch.bfloat16)
    return batch, cache, q, q_pe


def mla_rates(cfg: ModelConfig, chunk: int, prefix: int, page_size: int, flashinfer: bool = True) -> dict[str, float]:
    """TFLOP/s of the absorbed extend of `chunk` new tokens over `prefix` cached ones, per backend."""
    from baleen.model.attention_triton import TritonAttentionBackend

    batch, cache, q, q_pe = _extend_case(cfg, chunk, prefix, page_size)
    flops = chunk * (prefix + (chunk + 1) / 2) * cfg.num_attention_heads * (2 * cfg.kv_cache_dim + 2 * cfg.kv_lora_rank)
    backends: dict[str, Any] = {"baleen": TritonAttentionBackend()}
    try:
        from baleen.model.attention_flashinfer import FlashInferAttentionBackend

        if flashinfer:
            backends["flashinfer"] = FlashInferAttentionBackend(torch.device("cuda"))
    except ImportError:
        pass
    rates, outs = {}, {}
    for name, attn in backends.items():
        attn.plan(batch)
        for _ in range(2):
            outs[name] = attn.run_absorbed(q, q_pe, cache, 0.07)
        torch.cuda.synchronize()
        reps = 5
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            attn.run_absorbed(q, q_pe, cache, 0.07)
        end.record()
        torch.cuda.synchronize()
        rates[name] = flops / (start.elapsed_time(end) / reps / 1e3) / 1e12
    if "flashinfer" in outs:
        err = (outs["baleen"].float() - outs["flashinfer"].float()).norm() / outs["flashinfer"].float().norm()
        rates["rel_err_vs_flashinfer"] = float(err)
    return rates


async def _ttft(engine: Engine, length: int, rng: random.Random, vocab: int) -> float:
    prompt = [rng.randrange(100, vocab - 100) for _ in range(length)]
    started = time.perf_counter()
    async for out in engine.generate(prompt, SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)):
        if out.error is not None:
            raise RuntimeError(f"{length}-token prompt failed: {out.error}")
    return time.perf_counter() - started


async def run(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    cfg = ModelConfig.from_hf(str(model_dir))
    rng = random.Random(0)
    config = EngineConfig(model_path=str(model_dir), load_format="dummy", context_length=max(args.lengths) + 64,
                          chunked_prefill_size=args.chunk, disable_radix_cache=True,
                          max_running_requests=args.max_running_requests)
    rows = []
    async with await Engine.start(config) as engine:
        await _ttft(engine, args.chunk, rng, cfg.vocab_size)  # warm: first-use compiles of prefill shapes
        one_chunk = min([await _ttft(engine, args.chunk, rng, cfg.vocab_size) for _ in range(2)])
        prefill_tps = args.chunk / one_chunk
        rates = mla_rates(cfg, args.chunk, 2 * args.chunk, 64, flashinfer=not args.no_flashinfer)
        mla_rate = rates.get("flashinfer", rates["baleen"]) * 1e12
        for length in args.lengths:
            ttft = min([await _ttft(engine, length, rng, cfg.vocab_size) for _ in range(1 if length > 16384 else 2)])
            linear = length / prefill_tps
            attn = attention_flops(length, args.chunk, cfg) / mla_rate
            rows.append({"prompt_len": length, "ttft_s": ttft, "target_s": linear + attn, "linear_s": linear,
                         "attention_s": attn, "ratio": ttft / (linear + attn)})
            print(f"{length:>7} tokens: TTFT {ttft * 1e3:9.1f} ms, target {(linear + attn) * 1e3:9.1f} ms "
                  f"({linear * 1e3:.1f} prefill + {attn * 1e3:.1f} attention) -> {ttft / (linear + attn):.2f}x",
                  flush=True)
        alive = await _ttft(engine, 16, rng, cfg.vocab_size)
        peaks = step_peaks(engine, cfg, args.chunk, [args.chunk, 8 * args.chunk])
    return {"device": torch.cuda.get_device_name(), "date": date.today().isoformat(), "preset": args.preset,
            "chunk": args.chunk, "prefill_tokens_per_s": prefill_tps, "mla_tflops": rates, "rows": rows,
            "ttft_after_s": alive, "step_peak_bytes_by_prefix": peaks}


def step_peaks(engine: Engine, cfg: ModelConfig, chunk: int, prefixes: list[int]) -> dict[int, int]:
    """The memory plan's measurement of a chunk over each prefix length: the same bytes whatever the prefix."""
    from baleen.actors.worker import WorkerActor
    from baleen.model.memory_plan import StepShape, dummy_batch, measure_step_peak

    runner = next(a for a in engine._actors if isinstance(a, WorkerActor)).runner
    dev = runner.device
    return {p: measure_step_peak(runner.model, runner.attn, cfg, dummy_batch(StepShape(chunk, p, 0), 64, dev),
                                 runner.kv_cache.dtype, dev) for p in prefixes}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="v3-shape")
    ap.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS)
    ap.add_argument("--chunk", type=int, default=8192, help="--chunked-prefill-size (default 8192, as on the H100)")
    ap.add_argument("--max-running-requests", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--no-flashinfer", action="store_true",
                    help="the MLA rate from baleen's kernel alone (skips FlashInfer's ~25 s first-use JIT)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with dummy_checkpoint(args.preset) as model_dir:
        results = asyncio.run(run(args, model_dir))
    print(f"\n# bench_long_prompt — {args.preset} on {results['device']}, {results['date']}, chunk {args.chunk}")
    print(f"prefill {results['prefill_tokens_per_s']:.0f} tok/s (one-chunk TTFT); MLA extend TFLOP/s: "
          + ", ".join(f"{k} {v:.3g}" for k, v in results["mla_tflops"].items()))
    print("step peak by prefix (GiB): " + ", ".join(f"{p}: {b / 2**30:.3f}"
                                                    for p, b in results["step_peak_bytes_by_prefix"].items()))
    print("| prompt | TTFT ms | target ms | ratio |\n|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['prompt_len']} | {r['ttft_s'] * 1e3:.1f} | {r['target_s'] * 1e3:.1f} | {r['ratio']:.2f} |")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
