"""What FP8 (e4m3) queries, and FP8 softmax probabilities, would cost in accuracy on the trained default model.

A decision input for an FP8-MMA MLA decode kernel. Today the kernel dequantizes the FP8 (e4m3) latent cache to
bf16 and runs bf16 MMAs; an FP8 QK^T MMA needs the query in e4m3 too, and an FP8 P.V MMA (FlashMLA's FP8 kernel,
FlashAttention-3's FP8 path) rounds the softmax probabilities to e4m3 as well. All on CPU, with
--kv-cache-dtype fp8_e4m3 and the torch attention backend, this patches `TorchAttentionBackend._absorbed` (the
absorbed-MLA reference that decode runs) with one of:
- base: unchanged: the FP8 cache dequantized (entries * kv_scale), q in full precision;
- q8: per (token, head) row, one scale over the concatenated [q_latent | q_pe] (amax / 448, amax clamped to
  1e-12), q rounded to e4m3 (`.to(torch.float8_e4m3fn)`) and dequantized before the scores: what an FP8 MMA with
  fp32 accumulation followed by a scale multiply computes;
- q8p8: q8, and in the online softmax the probabilities exp(s - m) (in [0, 1], m the running max) rounded to e4m3
  with no scale before P.V, while the running sum l adds the UNquantized probabilities (as FA3 and FlashMLA do:
  the row sum comes from the fp32 P in registers, the e4m3 copy only feeds the second MMA);
- q8p8l (not run unless asked): q8p8 with l summed from the quantized probabilities instead (then the output is a
  true convex combination of the values; it shows what the choice of l is worth).
The variants that round P walk the keys in blocks of 64 (a kernel's tile), so P is rounded against the running
max as a kernel would; base and q8 keep the reference's blocks (fp32 math: the blocks do not matter there). By
default every absorbed call is patched: decode, and the prefill chunks that extend a cached prefix (a radix-cache
hit on the chat template); --scope decode patches decode-only layouts (one query row per sequence), the decode
kernel's share alone. The model runs in float32 on CPU (bfloat16 on CUDA): base's q is float32 here.

Measures, for each variant against base:
1. greedy ids in process (Engine, the worker in this process): --prompts prompts (half chat-template questions
   of bench_accuracy.questions() rendered as the server's deepseek-r1 template does, half held-out Shakespeare
   starts) x --new-tokens tokens (ignore_eos): positions equal, per prompt the first divergence, and the chat
   prompts' positions up to base's first eos (the answer; ignore_eos runs on past it). Two references beside
   them: base run again (must agree 100%: the runs are deterministic) and the same prompts over an unquantized
   (float32) cache (what the FP8 cache itself already costs);
2. bench_accuracy's families, --num questions each, greedy, through an HTTP server started per variant as
   `python -P -c "<load this file; install(variant)>; serve_main([... '--single-process' ...])"`:
   --single-process runs the worker in a thread of the server process (EngineConfig.multiprocess=False), so the
   patch reaches it; the patched function logs "probe_fp8_qk: <variant> active in pid N" on its first call and
   the script checks that line names the server's pid. Also how many answers are identical to base's (tool-call
   ids, which are random, left out);
3. the attention outputs' relative error ||out_variant - out_base|| / ||out_base|| per layer on real
   activations: during the in-process base run, at every --error-every-th decode step that holds all the prompts
   (a hook on `_absorbed`), every variant is run on the call's inputs; reported for one step (--error-step) and
   as mean and max over the steps measured. Beside them: `impl` (the blocked code without rounding: the
   differences come from the rounding alone), `q16p16` (q and P through bf16: today's bf16-MMA kernel, for
   scale), and, during the float32-cache run, `kv8` (the reference over that cache rounded to e4m3 against it:
   the error the FP8 cache itself makes).

    .venv/bin/python -P loadtest/probe_fp8_qk.py --out /tmp/probe_fp8_qk.json
    .venv/bin/python -P loadtest/probe_fp8_qk.py --variants base,q8,q8p8l --scope decode --skip-server

About 70 s on an idle 2-core machine with the defaults (torch's 2 threads; about 15 s per server); the same run
took 11 minutes while another process's tests loaded the machine (the servers' decode slowed ten-fold or more).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from baleen.model.attention import TorchAttentionBackend, TorchPlan

VARIANTS = ("base", "q8", "q8p8", "q8p8l")
E4M3_MAX = 448.0
AMAX_MIN = 1e-12
KEY_BLOCK = 64  # keys per block of the variants' online softmax: a kernel's tile
FP8 = torch.float8_e4m3fn

_ORIGINAL = TorchAttentionBackend._absorbed
# variant: the one installed; scope: "absorbed" (every call) or "decode" (one query row per sequence only);
# hook: called with every call's inputs before it runs (measurement 3).
_STATE: dict[str, Any] = {"variant": "base", "scope": "absorbed", "announced": False, "hook": None}


# ---- the variants -------------------------------------------------------------------------------------------------
def quantize_q(q_c: torch.Tensor, q_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., C], [..., R] float32 -> both rounded through e4m3 with one scale per row of [q_c | q_r]."""
    q = torch.cat([q_c, q_r], dim=-1)
    scale = q.abs().amax(-1, keepdim=True).clamp_min(AMAX_MIN) / E4M3_MAX
    deq = (q / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8).float() * scale
    return deq[..., : q_c.shape[-1]], deq[..., q_c.shape[-1] :]


def variant_absorbed(
    self: TorchAttentionBackend, q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache_layer: torch.Tensor,
    scale: float, kv_scale: float, p: TorchPlan, variant: str,
) -> torch.Tensor:
    """TorchAttentionBackend._absorbed in KEY_BLOCK-key blocks, with `variant`'s roundings: "impl" none, "q16p16"
    q and P through bf16 (today's bf16-MMA kernel; the dequantized e4m3 cache is exact in bf16 when kv_scale is
    a power of two), the others as the module docstring says."""
    rank = q_latent.shape[-1]
    q_c, q_r = self._pad(q_latent.float(), p), self._pad(q_pe.float(), p)  # [S, E, H, C], [S, E, H, R]
    if variant == "q16p16":
        q_c, q_r = q_c.bfloat16().float(), q_r.bfloat16().float()
    elif variant != "impl":
        q_c, q_r = quantize_q(q_c, q_r)
    p_dtype = {"q8p8": FP8, "q8p8l": FP8, "q16p16": torch.bfloat16}.get(variant)
    l_from_quantized = variant == "q8p8l"
    flat = kv_cache_layer.view(-1, kv_cache_layer.shape[-1])
    # P rounded (or "impl", which checks this blocked online softmax): a kernel's tiles, so P is rounded against
    # the running max as there; q8 does not depend on the blocks (fp32): the reference's, which is faster here.
    block = KEY_BLOCK if p_dtype is not None or variant == "impl" else self.key_block(
        p.num_seqs * q_latent.shape[1] * p.max_extend_len)
    m = l = acc = None  # running max [S, H, E], sum [S, H, E], unnormalised output [S, H, E, C]
    for k0 in range(0, p.max_seq_len, block):
        k_pos = torch.arange(k0, min(k0 + block, p.max_seq_len), device=q_c.device)
        slots = p.page_table[:, k_pos // p.page_size].to(torch.int64) * p.page_size + k_pos % p.page_size
        kv = flat[slots].float()
        if kv_scale != 1.0:
            kv = kv * kv_scale
        c_kv, k_pe = kv[..., :rank], kv[..., rank:]
        scores = torch.einsum("sqhc,skc->shqk", q_c, c_kv) + torch.einsum("sqhr,skr->shqk", q_r, k_pe)
        mask = k_pos.view(1, 1, -1) <= p.q_pos.unsqueeze(-1)
        scores = (scores * scale).masked_fill(~mask.unsqueeze(1), float("-inf"))
        m_new = scores.amax(-1) if m is None else torch.maximum(m, scores.amax(-1))  # block 0 holds key 0: finite
        probs = torch.exp(scores - m_new.unsqueeze(-1))  # in [0, 1]
        pv = probs.to(p_dtype).float() if p_dtype is not None else probs  # what the P.V MMA reads
        row_sum = (pv if l_from_quantized else probs).sum(-1)
        block_out = torch.einsum("shqk,skc->shqc", pv, c_kv)
        if m is None or l is None or acc is None:
            l, acc = row_sum, block_out
        else:
            alpha = torch.exp(m - m_new)
            l, acc = l * alpha + row_sum, acc * alpha.unsqueeze(-1) + block_out
        m = m_new
    assert l is not None and acc is not None
    out = (acc / l.unsqueeze(-1)).transpose(1, 2)
    return out.reshape(-1, *out.shape[2:])[p.token_rows].to(q_latent.dtype)


def _patched_absorbed(
    self: TorchAttentionBackend, q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache_layer: torch.Tensor,
    scale: float, kv_scale: float, p: TorchPlan,
) -> torch.Tensor:
    hook = _STATE["hook"]
    if hook is not None:
        hook(self, q_latent, q_pe, kv_cache_layer, scale, kv_scale, p)
    variant = _STATE["variant"]
    if variant == "base" or (_STATE["scope"] == "decode" and p.max_extend_len != 1):
        return _ORIGINAL(self, q_latent, q_pe, kv_cache_layer, scale, kv_scale, p)
    if not _STATE["announced"]:
        _STATE["announced"] = True
        print(f"probe_fp8_qk: {variant} active in pid {os.getpid()}", file=sys.stderr, flush=True)
    return variant_absorbed(self, q_latent, q_pe, kv_cache_layer, scale, kv_scale, p, variant)


def install(variant: str, scope: str = "absorbed") -> None:
    """Make every TorchAttentionBackend of this process run `variant` (the server subprocess calls this)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    _STATE.update(variant=variant, scope=scope, announced=False)
    TorchAttentionBackend._absorbed = _patched_absorbed  # type: ignore[method-assign]


# ---- 1 and 3: in process ------------------------------------------------------------------------------------------
def _load_sibling(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"loadtest_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def make_prompts(n: int, model_path: str, bench: Any) -> tuple[list[list[int]], list[str]]:
    """Half chat-template questions (as the server renders them, deepseek-r1), half held-out Shakespeare starts."""
    from tokenizers import Tokenizer

    from baleen.model import corpus

    tok = Tokenizer.from_file(f"{model_path}/tokenizer.json")
    n_chat = (n + 1) // 2
    qs = bench.questions(n_chat, 7, bench.FAMILIES)  # n_chat of every family; take them round-robin
    by_family = [qs[i * n_chat : (i + 1) * n_chat] for i in range(len(bench.FAMILIES))]
    picked = [by_family[i % len(by_family)][i // len(by_family)] for i in range(n_chat)]
    prompts, kinds = [], []
    for q in picked:
        text = corpus.chat("", q.body["messages"][-1]["content"], "", q.body.get("tools"), r1=True)[0][0]
        prompts.append(tok.encode(text, add_special_tokens=False).ids)
        kinds.append(f"chat:{q.family}")
    rng, play = random.Random(0), corpus.shakespeare(heldout=True)
    for _ in range(n - n_chat):
        prompts.append(tok.encode(corpus.text_doc(rng, play, 400, 600).pieces[1][0]).ids[:48])
        kinds.append("text")
    return prompts, kinds


async def _generate(model_path: str, kv_cache_dtype: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from baleen.actors.engine import Engine, EngineConfig
    from baleen.messages import SamplingParams

    cfg = EngineConfig(model_path=model_path, device="cpu", attention_backend="torch", kv_cache_dtype=kv_cache_dtype)
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def one(engine: Engine, p: list[int]) -> list[int]:
        ids: list[int] = []
        async for out in engine.generate(p, sampling):
            if out.error is not None:
                raise RuntimeError(out.error)
            ids += out.token_ids
        return ids

    async with await Engine.start(cfg) as engine:
        return list(await asyncio.gather(*[one(engine, p) for p in prompts]))


class ErrorHook:
    """At every decode step holding all `num_seqs` prompts: each variant's output against the reference's.

    Over an FP8 cache the variants are those of `variant_absorbed`. Over an unquantized cache (`kv8_scale` set)
    there is one, "kv8": the reference over the cache rounded to e4m3 (entries / kv8_scale), i.e. the error the
    FP8 cache itself makes on the same activations.
    """

    def __init__(self, num_seqs: int, variants: list[str], kv8_scale: float | None = None, every: int = 1) -> None:
        self.num_seqs, self.variants, self.kv8_scale, self.every = num_seqs, variants, kv8_scale, every
        self.seen = 0  # full-batch decode steps seen; every `every`-th one is measured
        self.layers: dict[int, int] = {}  # cache layer's data_ptr -> layer index, in first-call order
        self.steps: list[dict[str, Any]] = []  # per decode step: {"max_seq_len", variant: [per-layer error]}
        self.kv_scales: set[float] = set()
        self.cache_shape: tuple[int, ...] = ()

    def __call__(self, backend: TorchAttentionBackend, q_latent: torch.Tensor, q_pe: torch.Tensor,
                 cache: torch.Tensor, scale: float, kv_scale: float, p: TorchPlan) -> None:
        layer = self.layers.setdefault(cache.data_ptr(), len(self.layers))
        self.kv_scales.add(kv_scale)
        self.cache_shape = tuple(cache.shape)
        if p.max_extend_len != 1 or p.num_seqs != self.num_seqs:
            return
        if layer == 0:
            self.seen += 1
            if (self.seen - 1) % self.every == 0:
                self.steps.append({"decode_step": self.seen - 1, "max_seq_len": p.max_seq_len,
                                   **{v: [] for v in self.variants}})
        if not self.steps or self.steps[-1]["decode_step"] != self.seen - 1:
            return
        ref = _ORIGINAL(backend, q_latent, q_pe, cache, scale, kv_scale, p).float()
        for v in self.variants:
            if v == "kv8":
                assert self.kv8_scale is not None
                pages = p.page_table.unique().to(torch.int64)  # only the pages this step reads: the pool is big
                cache8 = torch.zeros(cache.shape, dtype=FP8, device=cache.device)
                cache8[pages] = (cache[pages].float() / self.kv8_scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
                out = _ORIGINAL(backend, q_latent, q_pe, cache8, scale, self.kv8_scale, p).float()
            else:
                out = variant_absorbed(backend, q_latent, q_pe, cache, scale, kv_scale, p, v).float()
            self.steps[-1][v].append(((out - ref).norm() / ref.norm()).item())

    def report(self, step: int) -> dict[str, Any]:
        out: dict[str, Any] = {"decode_steps": len(self.steps), "every": self.every, "variants": self.variants,
                               "kv_scales": sorted(self.kv_scales)}
        if not self.steps:
            return out
        one = min(self.steps, key=lambda s: abs(s["decode_step"] - step))
        out["one_step"] = {"step": one["decode_step"], "max_seq_len": one["max_seq_len"],
                           **{v: [round(e, 6) for e in one[v]] for v in self.variants}}
        for stat, fn in (("mean", lambda xs: sum(xs) / len(xs)), ("max", max)):
            out[stat] = {v: [round(fn([s[v][i] for s in self.steps]), 6) for i in range(len(one[v]))]
                         for v in self.variants}
        return out


def greedy_agreement(got: list[list[int]], want: list[list[int]], eos: int, kinds: list[str]) -> dict[str, Any]:
    """Positions equal; per prompt the first divergence (None: identical); and the chat prompts' positions up to
    the reference's first eos (the answer itself; ignore_eos generates past it)."""
    firsts = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(got, want)]
    equal = sum(a == b for x, y in zip(got, want) for a, b in zip(x, y))
    total = sum(len(y) for y in want)
    ends = [y.index(eos) + 1 if eos in y else len(y) for y in want]
    chat = [i for i, k in enumerate(kinds) if k.startswith("chat")]
    ans_equal = sum(a == b for i in chat for a, b in zip(got[i][: ends[i]], want[i][: ends[i]]))
    ans_total = sum(ends[i] for i in chat)
    return {"equal": equal, "total": total, "fraction": round(equal / max(1, total), 4),
            "prompts_identical": sum(f is None for f in firsts), "first_divergence": firsts,
            "chat_answer_equal": f"{ans_equal}/{ans_total}", "chat_answer_ends": [ends[i] for i in chat]}


def in_process(args: argparse.Namespace, variants: list[str], bench: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    prompts, kinds = make_prompts(args.prompts, args.model_path, bench)
    outs: dict[str, list[list[int]]] = {}
    hook = ErrorHook(len(prompts), ["impl", "q16p16", *[v for v in VARIANTS if v != "base"]], every=args.error_every)
    runs = [*variants, "base_rerun", "f32cache"] if args.references else list(variants)
    cache_hook: ErrorHook | None = None
    for name in runs:
        t0 = time.monotonic()
        variant = "base" if name in ("base_rerun", "f32cache") else name
        install(variant, args.scope)
        if name == "f32cache":
            cache_hook = ErrorHook(len(prompts), ["kv8"], kv8_scale=max(hook.kv_scales, default=1.0),
                                   every=args.error_every)
        _STATE["hook"] = hook if name == "base" else cache_hook if name == "f32cache" else None
        dtype = "auto" if name == "f32cache" else "fp8_e4m3"
        outs[name] = asyncio.run(_generate(args.model_path, dtype, prompts, args.new_tokens))
        _STATE["hook"] = None
        print(f"[in-process] {name}: {time.monotonic() - t0:.1f}s", flush=True)
    greedy: dict[str, Any] = {"prompt_kinds": kinds, "prompt_lens": [len(p) for p in prompts],
                              "new_tokens": args.new_tokens}
    eos = json.loads((Path(args.model_path) / "config.json").read_text())["eos_token_id"]
    for name in runs:
        if name != "base":
            greedy[name] = greedy_agreement(outs[name], outs["base"], eos, kinds)
    greedy["ids"] = outs
    errors = hook.report(args.error_step)
    errors["cache_shape"] = list(hook.cache_shape)
    if cache_hook is not None:
        errors["fp8_cache_vs_f32_cache"] = cache_hook.report(args.error_step)
    return greedy, errors


# ---- 2: through the patched server --------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_and_bench(
    args: argparse.Namespace, variant: str, bench: Any, log_dir: Path
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    port = _free_port()
    flags = ["--model-path", args.model_path, "--port", str(port), "--chat-template", "deepseek-r1",
             "--reasoning-parser", "deepseek-r1", "--tool-call-parser", "deepseekv3", "--device", "cpu",
             "--kv-cache-dtype", "fp8_e4m3", "--attention-backend", "torch", "--single-process"]
    code = (f"import importlib.util as u, sys; s = u.spec_from_file_location('probe_fp8_qk', {str(Path(__file__))!r}); "
            f"m = u.module_from_spec(s); sys.modules['probe_fp8_qk'] = m; s.loader.exec_module(m); "
            f"m.install({variant!r}, {args.scope!r}); "
            f"from baleen.api.cli import serve_main; raise SystemExit(serve_main({flags!r}))")
    log_path = log_dir / f"server_{variant}.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
        proc = subprocess.Popen([sys.executable, "-P", "-c", code], stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(f"{base_url}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() - t0 > 180:
                    raise RuntimeError(f"{variant} server did not come up; see {log_path}") from None
                time.sleep(1)
        up_s = time.monotonic() - t0
        qs = bench.questions(args.num, 1, bench.FAMILIES)
        results = {q.family: bench.Result() for q in qs}
        answers: list[tuple[str, str]] = []  # (family, the message as JSON, or the error)
        errors = 0

        def ask(q: Any) -> tuple[Any, dict[str, Any] | None, str]:
            try:
                return q, bench.post(f"{base_url}/v1", q.body, 900.0), ""
            except Exception as e:  # a failed request counts as wrong, and is shown
                return q, None, f"{type(e).__name__}: {e}"

        t1 = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            for q, resp, err in pool.map(ask, qs):
                if resp is None:
                    results[q.family].add(False, {}, err)
                    answers.append((q.family, err))
                    errors += 1
                    continue
                ok, checks = q.check(resp)
                msg = resp["choices"][0]["message"]
                shown = json.dumps({"asked": q.body["messages"][-1]["content"], "got": msg}, ensure_ascii=False)
                results[q.family].add(ok, checks, shown)
                kept = dict(msg, tool_calls=[{k: c[k] for k in c if k != "id"} for c in msg.get("tool_calls") or []])
                answers.append((q.family, json.dumps(kept, sort_keys=True, ensure_ascii=False)))  # call ids: random
        summary: dict[str, Any] = {fam: r.summary() for fam, r in results.items()}
        summary["request_errors"] = errors  # failed requests (timeouts under a loaded machine): counted wrong
        summary["bench_s"], summary["server_up_s"] = round(time.monotonic() - t1, 1), round(up_s, 1)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log_path.read_text(errors="replace")
    marker = f"probe_fp8_qk: {variant} active in pid {proc.pid}"
    summary["patch_in_server_pid"] = marker in text if variant != "base" else None
    if variant != "base" and marker not in text:
        print(f"WARNING: {marker!r} missing from {log_path}: the patch did not reach the worker", flush=True)
    return summary, answers


# ---- main ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from baleen.model.make_model import default_model_path

    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--variants", default="base,q8,q8p8", help=f"comma-separated, from {','.join(VARIANTS)}")
    ap.add_argument("--num", type=int, default=20, help="bench_accuracy questions per family")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight at the server")
    ap.add_argument("--prompts", type=int, default=16, help="in-process greedy prompts (half chat, half text)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--error-step", type=int, default=15, help="the decode step whose per-layer errors are shown")
    ap.add_argument("--error-every", type=int, default=3, help="measure the errors at every n-th decode step")
    ap.add_argument("--scope", choices=("absorbed", "decode"), default="absorbed",
                    help="absorbed: every absorbed call; decode: one-query-row layouts only")
    ap.add_argument("--model-path", default=None, help="default: the trained default model")
    ap.add_argument("--no-references", dest="references", action="store_false",
                    help="skip the base rerun and float32-cache greedy runs")
    ap.add_argument("--skip-server", action="store_true", help="measurements 1 and 3 only")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads here and in the servers (default: torch's; 1 holds up better on a busy machine)")
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if any(v not in VARIANTS for v in variants):
        ap.error(f"--variants: choose from {','.join(VARIANTS)}")
    if "base" not in variants:
        variants.insert(0, "base")
    variants.sort(key=lambda v: v != "base")
    args.model_path = args.model_path or str(default_model_path())
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = _load_sibling("bench_accuracy")
    t0 = time.monotonic()
    out: dict[str, Any] = {"model_path": args.model_path, "variants": variants, "scope": args.scope,
                           "key_block": KEY_BLOCK, "torch_threads": torch.get_num_threads()}

    def save() -> None:
        out["wall_s"] = round(time.monotonic() - t0, 1)
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2, ensure_ascii=False))

    out["greedy"], out["attn_rel_error"] = in_process(args, variants, bench)
    save()
    _print_in_process(out)
    if not args.skip_server:
        log_dir = Path(args.out).parent if args.out else Path("/tmp")
        out["accuracy"], answers = {}, {}
        for v in variants:
            out["accuracy"][v], answers[v] = serve_and_bench(args, v, bench, log_dir)
            print(f"[server] {v}: up {out['accuracy'][v]['server_up_s']}s, bench {out['accuracy'][v]['bench_s']}s",
                  flush=True)
            if v != "base":
                same = [a == b for a, b in zip(answers[v], answers["base"])]
                out["accuracy"][v]["answers_identical_to_base"] = f"{sum(same)}/{len(same)}"
                per_family: dict[str, list[int]] = {}
                for (fam, _), eq in zip(answers["base"], same):
                    per_family.setdefault(fam, [0, 0])
                    per_family[fam][0] += eq
                    per_family[fam][1] += 1
                out["accuracy"][v]["identical_by_family"] = {f: f"{a}/{n}" for f, (a, n) in per_family.items()}
            save()
        for v in variants:
            acc = out["accuracy"][v]
            same = f", answers identical to base {acc['answers_identical_to_base']}" if v != "base" else ""
            print(f"\n{v} (failed requests {acc['request_errors']}{same})")
            if v != "base":
                print("identical by family: " + ", ".join(f"{f} {x}" for f, x in acc["identical_by_family"].items()))
            print(bench.table(out["accuracy"][v]))
    save()
    print(f"\nwall {out['wall_s']}s")
    return 0


def _print_in_process(out: dict[str, Any]) -> None:
    g, e = out["greedy"], out["attn_rel_error"]
    print("\ngreedy ids against base (in process):")
    for name, r in g.items():
        if isinstance(r, dict) and "equal" in r:
            print(f"  {name:10s} {r['equal']}/{r['total']} = {r['fraction']:.1%} positions equal, "
                  f"{r['prompts_identical']} prompts identical, first divergence {r['first_divergence']}; "
                  f"chat answers up to eos {r['chat_answer_equal']}")
    fmt: Callable[[list[float]], str] = lambda xs: " ".join(f"{x:.2e}" for x in xs)
    for label, r in (("FP8 cache (base = reference over it)", e), ("f32 cache (kv8 = the FP8 cache's own error)",
                                                                     e.get("fp8_cache_vs_f32_cache", {}))):
        if "one_step" not in r:
            continue
        s = r["one_step"]
        print(f"attention output rel. error per layer, {label}: decode step {s['step']} (max_seq_len "
              f"{s['max_seq_len']}) | mean | max over {r['decode_steps']} full-batch decode steps (every "
              f"{r['every']}):")
        for v in r["variants"]:
            print(f"  {v:6s} step {fmt(s[v])} | mean {fmt(r['mean'][v])} | max {fmt(r['max'][v])}")

if __name__ == "__main__":
    sys.exit(main())
