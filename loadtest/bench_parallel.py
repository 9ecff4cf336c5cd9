"""Parallel layouts on the GPUs of one host: tiny-model greedy agreement (1 GPU vs TP2, TP2+EP2, DP2) and V3-shape
decode throughput per layout.

    python loadtest/bench_parallel.py OUTDIR tiny-bfloat16,1gpu,tp2,dp2
"""
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from baleen.actors.engine import Engine, EngineConfig
from baleen.messages import SamplingParams
from baleen.model.make_model import tiny_model_path
from baleen.model.presets import preset

OUT = Path(sys.argv[1])
WHAT = sys.argv[2].split(",")


def emit(rec):
    line = json.dumps(rec)
    print(line, flush=True)
    with (OUT / "results.jsonl").open("a") as f:
        f.write(line + "\n")


async def generate(engine, prompts, n, stamps=None):
    async def one(p):
        ids = []
        async for out in engine.generate(p, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)):
            if out.error:
                raise RuntimeError(out.error)
            ids += out.token_ids
            if stamps is not None and out.token_ids:
                stamps.append((time.perf_counter(), len(out.token_ids)))
        return ids
    return await asyncio.gather(*[one(p) for p in prompts])


LAYOUTS = {
    "1gpu": {},
    "tp2": dict(tp_size=2),
    "tp2-ep2": dict(tp_size=2, ep_size=2),
    "dp2": dict(tp_size=2, dp_size=2, enable_dp_attention=True),
}


async def correctness(dtype):
    path = str(tiny_model_path())
    rng = random.Random(0)
    prompts = [[rng.randrange(16, 1000) for _ in range(rng.randint(3, 200))] for _ in range(32)]
    ref = None
    for name, kw in LAYOUTS.items():
        t = time.perf_counter()
        try:
            cfg = EngineConfig(model_path=path, dtype=dtype, cuda_graph_max_bs=32, **kw)
            async with await Engine.start(cfg) as e:
                outs = await generate(e, prompts, 24)
        except Exception:
            emit({"check": "tiny", "dtype": dtype, "layout": name, "error": traceback.format_exc()[-3000:]})
            continue
        if ref is None:
            ref = outs
        same = sum(a == b for a, b in zip(outs, ref))
        prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(outs, ref)]
        tok = sum(x == y for a, b in zip(outs, ref) for x, y in zip(a, b)) / sum(map(len, ref))
        emit({"check": "tiny", "dtype": dtype, "layout": name, "identical_requests": f"{same}/{len(ref)}",
              "min_common_prefix": min(prefix), "token_agreement": round(tok, 4), "s": round(time.perf_counter() - t, 1)})


async def throughput(name, bs=256, prompt_len=64, new=128):
    d = Path(tempfile.mkdtemp())
    (d / "config.json").write_text(json.dumps(preset("v3-shape")))
    tiny = tiny_model_path()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / f, d / f)
    kw = LAYOUTS[name]
    graphs = (bs,) if "dp_size" not in kw else None
    cfg = EngineConfig(model_path=str(d), load_format="dummy", max_running_requests=bs, context_length=4096,
                       cuda_graph_bs=graphs, **kw)
    t0 = time.perf_counter()
    try:
        async with await Engine.start(cfg) as e:
            started = time.perf_counter() - t0
            rng = random.Random(1)
            await generate(e, [[rng.randrange(16, 120000) for _ in range(prompt_len)] for _ in range(16)], 8)
            prompts = [[rng.randrange(16, 120000) for _ in range(prompt_len)] for _ in range(bs)]
            stamps = []
            t = time.perf_counter()
            outs = await generate(e, prompts, new, stamps)
            total = time.perf_counter() - t
    except Exception:
        emit({"check": "v3-shape", "layout": name, "error": traceback.format_exc()[-3000:]})
        return
    stamps.sort()
    # The decode window: token-count milestones past the prefill ramp and before the tail.
    n_all = sum(c for _, c in stamps)
    lo, hi = bs * 4, n_all - bs * 4  # skip the prefill ramp and the tail
    acc, t_lo, t_hi, n_lo, n_hi = 0, None, None, 0, 0
    for ts, c in stamps:
        acc += c
        if t_lo is None and acc >= lo:
            t_lo, n_lo = ts, acc
        if t_hi is None and acc >= hi:
            t_hi, n_hi = ts, acc
    tput = (n_hi - n_lo) / (t_hi - t_lo)
    emit({"check": "v3-shape", "layout": name, "batch": bs, "start_s": round(started, 1),
          "decode_tok_s": round(tput), "step_ms": round(1000 * bs / tput, 2),
          "end_to_end_tok_s": round(n_all / total), "graphs": graphs is not None,
          "all_lengths_ok": all(len(o) == new for o in outs)})


async def main():
    emit({"torch": torch.__version__, "gpus": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
          "date": time.strftime("%Y-%m-%d")})
    for w in WHAT:
        if w.startswith("tiny-"):
            await correctness(w.removeprefix("tiny-"))
        else:
            await throughput(w)


if __name__ == "__main__":
    asyncio.run(main())
