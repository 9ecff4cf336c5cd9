"""One-batch benchmark: the engine's model runner on a dummy-weight preset, prefill and decode, vs roofline.

    python loadtest/bench_one_batch.py --preset v3-shape --batch-sizes 1 32 128 --context-len 1024

It builds the runner exactly as a worker does (`build_runner`: weights, KV cache sized from memory, CUDA
graphs), feeds it hand-made StepPlans, and reports prefill tokens/s and the decode step time against the
bytes a decode step must read at the device's measured bandwidth: every non-expert weight, the routed
experts the batch touches (expected distinct experts under uniform routing), and the batch's KV cache.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from array import array
from datetime import date
from pathlib import Path

import torch

from baleen.messages import PageUpdate, SamplingParams, SeqRow, SlotInit, StepPlan
from baleen.model.build import WorkerConfig, build_runner
from baleen.model.config import ModelConfig
from baleen.model.presets import preset
from baleen.model.runner import ModelRunner

HBM_BYTES_PER_S = 3.0e12  # H100 device copy, measured 2026-11-23 (docs/PERF.md)


def _i32(xs: list[int]) -> bytes:
    return array("i", xs).tobytes()


def weight_bytes(runner: ModelRunner, cfg: ModelConfig, batch: int) -> tuple[float, float]:
    """(bytes of weights a decode step of `batch` rows reads, of which routed experts)."""
    dense, per_expert, moe_layers = 0.0, 0.0, 0
    for name, p in runner.model.named_parameters():
        n = p.numel() * p.element_size()
        if name.endswith("embed_tokens.weight"):
            continue  # only `batch` rows are read
        if ".mlp.experts." in name:
            per_expert += n / p.shape[0]  # stacked [slots, ...]; a shared-expert slot is counted as dense below
            moe_layers += name.endswith(".w13")
            continue
        dense += n
    experts = 0.0
    if cfg.n_routed_experts and cfg.num_experts_per_tok:
        e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        touched = e * (1 - (1 - k / e) ** batch)  # expected distinct experts per layer
        experts = touched * per_expert / max(moe_layers, 1) * moe_layers
    return dense + experts, experts


class Driver:
    """Hand-made plans for the runner: fixed slots, pages handed out in order."""

    def __init__(self, runner: ModelRunner, vocab: int) -> None:
        self.runner = runner
        self.vocab = vocab
        self.page_size = runner.config.page_size
        self.next_page = 1
        self.step = 0
        self.lens: dict[int, int] = {}
        self.pages: dict[int, int] = {}

    def _pages(self, slot: int, new_len: int) -> list[PageUpdate]:
        need = -(-new_len // self.page_size) - self.pages.get(slot, 0)
        if need <= 0:
            return []
        start = self.pages.get(slot, 0)
        pages = list(range(self.next_page, self.next_page + need))
        if pages[-1] >= self.runner.kv_cache.num_pages:
            raise ValueError("the KV pool is too small for this benchmark: lower the batch or the context")
        self.next_page += need
        self.pages[slot] = start + need
        return [PageUpdate(slot, start, _i32(pages))]

    def run(self, plan_rows: list[SeqRow], inits: list[SlotInit], updates: list[PageUpdate]) -> float:
        plan = StepPlan(step_id=self.step, rows=plan_rows, new_slots=inits, page_updates=updates)
        self.step += 1
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        t = time.perf_counter()
        self.runner.finish(self.runner.launch(plan))
        return time.perf_counter() - t

    def prefill(self, slots: list[int], input_len: int, gen: torch.Generator) -> float:
        rows, inits, updates = [], [], []
        for s in slots:
            ids = torch.randint(16, self.vocab, (input_len,), generator=gen).tolist()
            if s not in self.lens:
                inits.append(SlotInit(s, f"r{s}", SamplingParams(temperature=0.0), _i32(ids)))
            prefix = self.lens.get(s, 0)
            updates += self._pages(s, prefix + input_len)
            rows.append(SeqRow(s, prefix, input_len, _i32(ids), True))
            self.lens[s] = prefix + input_len
        return self.run(rows, inits, updates)

    def _decode_plan(self, slots: list[int]) -> StepPlan:
        rows, updates = [], []
        for s in slots:
            updates += self._pages(s, self.lens[s] + 1)
            rows.append(SeqRow(s, self.lens[s], 1, b"", True))
            self.lens[s] += 1
        self.step += 1
        return StepPlan(step_id=self.step, rows=rows, page_updates=updates)

    def decode(self, slots: list[int]) -> float:
        """One step, launched and read back before the next (host time adds to the step)."""
        plan = self._decode_plan(slots)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        t = time.perf_counter()
        self.runner.finish(self.runner.launch(plan))
        return time.perf_counter() - t

    def decode_overlapped(self, slots: list[int], steps: int) -> float:
        """Steps as the worker runs them: step N+1 is launched before step N is read. Mean seconds per step."""
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        t = time.perf_counter()
        pending = None
        for _ in range(steps):
            launched = self.runner.launch(self._decode_plan(slots))
            if pending is not None:
                self.runner.finish(pending)
            pending = launched
        assert pending is not None
        self.runner.finish(pending)
        return (time.perf_counter() - t) / steps


def profile_decode(d: Driver, slots: list[int], bs: int, steps: int = 4, top: int = 12) -> None:
    """Top kernels by GPU time over `steps` overlapped decode steps, and the GPU-busy share of the wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        wall = d.decode_overlapped(slots, steps) * steps
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"] if torch.cuda.is_available() else []
    total = sum(e.self_device_time_total for e in events) / 1e3  # ms over all steps
    print(f"## profile, batch {bs}: GPU busy {total / steps:.2f} ms of {wall / steps * 1e3:.2f} ms per step")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        share = e.self_device_time_total / 1e3 / max(total, 1e-9)
        print(f"  {e.self_device_time_total / 1e3 / steps:8.3f} ms/step {share:6.1%}  x{e.count // steps:<4} {e.key[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="v3-shape")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--context-len", type=int, default=1024, help="prompt tokens per request before decoding")
    ap.add_argument("--prefill-tokens", type=int, default=8192, help="tokens in the timed prefill batch")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--disable-cuda-graph", action="store_true")
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto | bf16 | fp8_e4m3 (the roofline counts its bytes)")
    ap.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--profile", action="store_true", help="print the top GPU kernels of a few decode steps")
    ap.add_argument("--profile-top", type=int, default=12, help="how many kernels --profile lists")
    ap.add_argument("--gemv-max-m", type=int, default=None,
                    help="override Fp8BlockLinearMethod.GEMV_MAX_M (0: FP8 linears never take the GEMV)")
    ap.add_argument("--skinny-max-m", type=int, default=None,
                    help="override Fp8BlockLinearMethod.SKINNY_MAX_M (0: FP8 linears never take the skinny GEMM)")
    ap.add_argument("--fp8-tiled-weights", choices=("on", "off"), default="on",
                    help="tiled weight copies for the FP8 GEMM at 2-64 tokens (the server's default on one GPU)")
    args = ap.parse_args()
    from baleen.model.layers import Fp8BlockLinearMethod

    if args.gemv_max_m is not None:
        Fp8BlockLinearMethod.GEMV_MAX_M = args.gemv_max_m
    if args.skinny_max_m is not None:
        Fp8BlockLinearMethod.SKINNY_MAX_M = args.skinny_max_m

    cuda = args.device.startswith("cuda")
    max_bs = max(args.batch_sizes)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(preset(args.preset)))
        cfg = ModelConfig.from_hf(tmp)
        context = args.context_len + args.decode_steps + 8
        started = time.perf_counter()
        runner = build_runner(
            WorkerConfig(
                model_path=tmp,
                device=args.device,
                dtype="bfloat16" if cuda else "float32",
                load_format="dummy",
                attention_backend=args.attention_backend or ("triton" if cuda else "torch"),
                page_size=args.page_size,
                max_running_requests=max(max_bs, 4),  # the prefill measurement uses 4 slots
                max_context_len=max(context, args.prefill_tokens),
                chunked_prefill_size=args.prefill_tokens,  # the memory plan measures the chunk the bench prefills
                max_total_tokens=max_bs * (context + args.page_size) + 2 * args.prefill_tokens,
                disable_cuda_graph=args.disable_cuda_graph or not cuda,
                cuda_graph_bs=tuple(args.batch_sizes),
                fp8_tiled_weights=args.fp8_tiled_weights == "on",
                kv_cache_dtype=args.kv_cache_dtype,
            )
        )
    load_s = time.perf_counter() - started
    gen = torch.Generator().manual_seed(0)
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    results: dict[str, object] = {"device": device_name, "date": date.today().isoformat(), "preset": args.preset,
                                  "setup_s": load_s}
    # Prefill: one batch of --prefill-tokens tokens split over 4 fresh requests (warm-up first).
    pf = Driver(runner, cfg.vocab_size)
    per = args.prefill_tokens // 4
    pf.prefill([0, 1, 2, 3], per, gen)
    pf = Driver(runner, cfg.vocab_size)
    t = pf.prefill([0, 1, 2, 3], per, gen)
    results["prefill_tokens_per_s"] = 4 * per / t
    rows = []
    for bs in args.batch_sizes:
        d = Driver(runner, cfg.vocab_size)
        slots = list(range(bs))
        group = max(1, args.prefill_tokens // args.context_len)
        for i in range(0, bs, group):
            for done in range(0, args.context_len, args.prefill_tokens):  # long contexts: chunks of the prefill size
                d.prefill(slots[i : i + group], min(args.prefill_tokens, args.context_len - done), gen)
        for _ in range(3):
            d.decode(slots)  # warm-up
        times = sorted(d.decode(slots) for _ in range(args.decode_steps))
        serial = times[len(times) // 2]
        step = d.decode_overlapped(slots, args.decode_steps)
        if args.profile:
            profile_decode(d, slots, bs, top=args.profile_top)
        wbytes, ebytes = weight_bytes(runner, cfg, bs)
        kv = bs * (args.context_len + 8) * cfg.kv_cache_dim * runner.kv_cache.layers[0].element_size() * cfg.num_hidden_layers
        roof = (wbytes + kv) / HBM_BYTES_PER_S
        rows.append({"batch": bs, "step_ms": step * 1e3, "serial_step_ms": serial * 1e3, "tokens_per_s": bs / step, "weight_GB": wbytes / 1e9,
                     "expert_GB": ebytes / 1e9, "kv_GB": kv / 1e9, "roofline_ms": roof * 1e3,
                     "x_roofline": step / roof})
    results["decode"] = rows
    results["fp8_tiled_weights"] = args.fp8_tiled_weights
    results["kv_cache_dtype"] = args.kv_cache_dtype
    results["context_len"] = args.context_len
    print(f"# bench_one_batch — {args.preset} on {device_name}, {results['date']}, dummy weights, "
          f"FP8 tiled weights {args.fp8_tiled_weights}, KV cache {args.kv_cache_dtype}, context {args.context_len}")
    print(f"setup (weights + KV + graphs): {load_s:.1f} s; prefill {results['prefill_tokens_per_s']:.0f} tokens/s "
          f"(4 x {per} tokens)")
    print("| batch | decode step ms (overlapped) | serial ms | tokens/s | weights GB | of which experts | KV GB "
          "| roofline ms | x roofline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['step_ms']:.2f} | {r['serial_step_ms']:.2f} | {r['tokens_per_s']:.0f} | {r['weight_GB']:.2f} | "
              f"{r['expert_GB']:.2f} | {r['kv_GB']:.3f} | {r['roofline_ms']:.2f} | {r['x_roofline']:.2f} |")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
