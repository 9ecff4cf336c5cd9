"""GPU: the model on each attention backend against the torch reference, and CUDA-graph decode against eager.

Uses a small model at DeepSeek's real MLA shape (kv_lora_rank 512, rope 64) so FlashInfer's kernels run,
with dummy weights; bf16 and block-FP8.
"""

from __future__ import annotations

import json
import random
from array import array
from pathlib import Path

import pytest
import torch

from baleen.messages import PageUpdate, SamplingParams, SeqRow, SlotInit, StepPlan
from baleen.model.attention import TorchAttentionBackend
from baleen.model.batch import ForwardBatch
from baleen.model.build import WorkerConfig, build_runner, make_attention_backend
from baleen.model.config import ModelConfig
from baleen.model.fused_experts import FusedExperts
from baleen.model.kv_cache import KVCache
from baleen.model.loader import load_model

pytestmark = pytest.mark.gpu

MLA_SHAPE = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 2048,
    "hidden_size": 512, "intermediate_size": 1024, "moe_intermediate_size": 256, "num_hidden_layers": 3,
    "num_attention_heads": 16, "q_lora_rank": 256, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 16, "n_shared_experts": 1,
    "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "max_position_embeddings": 4096, "rope_theta": 10000, "rms_norm_eps": 1e-6,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}  # fmt: skip
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
PAGE = 16


def _config(fp8: bool) -> dict:
    return {**MLA_SHAPE, **({"quantization_config": FP8} if fp8 else {})}


def _batches() -> list[tuple[list[int], list[int]]]:
    # (prefix_lens, extend_lens): prefill, extend over a prefix, decode
    return [([0, 0, 0], [37, 5, 64]), ([37, 5, 64], [20, 3, 1]), ([57, 8, 65], [1, 1, 1])]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_backend_logits_match_torch_reference(backend: str, fp8: bool) -> None:
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    cfg = ModelConfig.from_dict(_config(fp8))
    dev = torch.device("cuda")
    model = load_model(None, cfg, device=dev, dtype=torch.bfloat16, load_format="dummy", seed=3,
                       experts_method=FusedExperts)
    caches = {name: KVCache.for_model(cfg, 64, PAGE, torch.bfloat16, dev) for name in ("ref", "gpu")}
    backends = {"ref": TorchAttentionBackend(), "gpu": make_attention_backend(backend, dev)}
    rng = random.Random(0)
    pages = rng.sample(range(1, 64), 20)
    tables = [pages[0:6], pages[6:8], pages[8:14]]
    report = []
    for prefix, extend in _batches():
        ids = [rng.randrange(16, cfg.vocab_size) for _ in range(sum(extend))]
        batch = ForwardBatch.build(ids, prefix, extend, tables, PAGE, device=dev)
        logits = {}
        for name in ("ref", "gpu"):
            backends[name].plan(batch)
            with torch.inference_mode():
                hidden = model(batch, caches[name], backends[name])
                logits[name] = model.compute_logits(hidden[batch.logits_indices]).float()
        err = float((logits["gpu"] - logits["ref"]).abs().max() / logits["ref"].abs().max())
        cos = float(torch.nn.functional.cosine_similarity(logits["gpu"], logits["ref"], dim=-1).min())
        report.append((prefix, extend, err, cos))
    print(f"{backend} {'fp8' if fp8 else 'bf16'}: " + "; ".join(f"extend {e}: rel {r:.3g} cos {c:.5f}" for _, e, r, c in report))
    for prefix, extend, err, cos in report:
        # Block-FP8 re-quantizes activations per 128-channel group: a float32 reference and a fused kernel
        # differ by rounding, which flips e4m3 steps and grows through random dummy weights (the two GPU
        # backends, which share their prefill path, stay identical: test_fp8_backends_agree). So FP8 is only
        # held to the direction of the logits here, bf16 to their values.
        ok = cos > 0.85 if fp8 else err < 3e-2
        assert ok, f"{backend} vs torch at prefix={prefix} extend={extend}: relative error {err:.3g}, cosine {cos:.5f}"


def test_fp8_backends_agree() -> None:
    """Triton and FlashInfer on one FP8 model: the same prefill, then extend and decode through each kernel."""
    pytest.importorskip("flashinfer")
    cfg = ModelConfig.from_dict(_config(fp8=True))
    dev = torch.device("cuda")
    model = load_model(None, cfg, device=dev, dtype=torch.bfloat16, load_format="dummy", seed=3,
                       experts_method=FusedExperts)
    names = ("triton", "flashinfer")
    caches = {n: KVCache.for_model(cfg, 64, PAGE, torch.bfloat16, dev) for n in names}
    backends = {n: make_attention_backend(n, dev) for n in names}
    rng = random.Random(0)
    pages = rng.sample(range(1, 64), 20)
    tables = [pages[0:6], pages[6:8], pages[8:14]]
    for prefix, extend in _batches():
        ids = [rng.randrange(16, cfg.vocab_size) for _ in range(sum(extend))]
        batch = ForwardBatch.build(ids, prefix, extend, tables, PAGE, device=dev)
        logits = {}
        for n in names:
            backends[n].plan(batch)
            with torch.inference_mode():
                logits[n] = model.compute_logits(model(batch, caches[n], backends[n])[batch.logits_indices]).float()
        cos = float(torch.nn.functional.cosine_similarity(logits["triton"], logits["flashinfer"], dim=-1).min())
        assert cos > 0.99, f"FP8 triton vs flashinfer at prefix={prefix} extend={extend}: cosine {cos:.5f}"


class _Driver:
    def __init__(self, runner, vocab: int) -> None:
        self.runner, self.vocab, self.step, self.next_page = runner, vocab, 0, 1
        self.lens: dict[int, int] = {}
        self.pages: dict[int, int] = {}

    def _grow(self, slot: int, n: int) -> list[PageUpdate]:
        have = self.pages.get(slot, 0)
        need = -(-n // PAGE) - have
        if need <= 0:
            return []
        new = list(range(self.next_page, self.next_page + need))
        self.next_page += need
        self.pages[slot] = have + need
        return [PageUpdate(slot, have, array("i", new).tobytes())]

    def run(self, prompts: list[list[int]], steps: int, params: list[SamplingParams] | None = None) -> list[list[int]]:
        params = params or [SamplingParams(temperature=0.0)] * len(prompts)
        inits = [SlotInit(s, f"r{s}", params[s], array("i", p).tobytes()) for s, p in enumerate(prompts)]
        rows, updates = [], []
        for s, p in enumerate(prompts):
            updates += self._grow(s, len(p))
            rows.append(SeqRow(s, 0, len(p), array("i", p).tobytes(), True))
            self.lens[s] = len(p)
        out: list[list[int]] = [[] for _ in prompts]
        plan = StepPlan(step_id=0, rows=rows, new_slots=inits, page_updates=updates)
        for step in range(steps):
            result = self.runner.finish(self.runner.launch(plan))
            for s, tok in enumerate(array("i", result.token_ids)):
                out[s].append(tok)
            rows, updates = [], []
            for s in range(len(prompts)):
                updates += self._grow(s, self.lens[s] + 1)
                rows.append(SeqRow(s, self.lens[s], 1, b"", True))
                self.lens[s] += 1
            plan = StepPlan(step_id=step + 1, rows=rows, page_updates=updates)
        return out


SAMPLING = {
    "greedy": [SamplingParams(temperature=0.0)] * 5,  # the captured greedy tail
    "mixed": [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=3),
              SamplingParams(temperature=0.0, logprobs=True), SamplingParams(temperature=1.0, top_k=20, seed=4),
              SamplingParams(temperature=0.0)],  # the graph, then the eager sampler
}  # fmt: skip


@pytest.mark.parametrize("backend, sampling, fp8, kv", [
    ("triton", "greedy", False, "auto"), ("triton", "mixed", False, "auto"), ("flashinfer", "greedy", False, "auto"),
    ("triton", "greedy", True, "auto"), ("flashinfer", "greedy", False, "fp8_e4m3"),
    ("triton", "greedy", False, "fp8_e4m3"),
])  # fmt: skip
def test_cuda_graph_decode_equals_eager(backend: str, sampling: str, fp8: bool, kv: str, tmp_path: Path) -> None:
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    # The FP8 case runs decode's linears over their tiled weight copies (4 and 5 rows: the tiled W8A8 GEMM); the
    # fp8_e4m3 cases capture graphs over an e4m3 cache (FlashInfer: planned with an e4m3 kv_data_type, per-layer
    # scales at run time).
    (tmp_path / "config.json").write_text(json.dumps(_config(fp8=fp8)))
    rng = random.Random(1)
    prompts = [[rng.randrange(16, 2048) for _ in range(n)] for n in (3, 17, 40, 9, 64)]  # 5 rows: padded to 8
    runner = build_runner(WorkerConfig(
        model_path=str(tmp_path), device="cuda", dtype="bfloat16", load_format="dummy", attention_backend=backend,
        page_size=PAGE, max_running_requests=8, max_context_len=512, max_total_tokens=4096,
        cuda_graph_bs=(1, 4, 8), random_seed=5, fp8_tiled_weights=fp8, kv_cache_dtype=kv,
    ))  # fmt: skip
    assert runner.graphs is not None  # one replay path for both backends; FlashInfer re-plans on the host first
    replayed = _Driver(runner, 2048).run(prompts, 16, SAMPLING[sampling])
    runner.graphs = None  # the same runner, eager: same weights, same kernels, same split counts
    eager = _Driver(runner, 2048).run(prompts, 16, SAMPLING[sampling])
    assert replayed == eager
    assert len({tuple(o) for o in eager}) > 1  # different prompts, different continuations


def test_cuda_glue_matches_the_cpu_model() -> None:
    """The CUDA-only fused glue (norm + residual, MLA prep, routing, SwiGLU, fused GEMMs) against the CPU path.

    The same weights run on the GPU in bf16 (Triton glue and attention) and on the CPU in float32 (plain torch
    ops, torch attention). A wiring mistake (a wrong slice, a skipped norm) scrambles the logits; bf16
    rounding only nudges them.
    """
    cfg = ModelConfig.from_dict(_config(fp8=False))
    dev = torch.device("cuda")
    gpu = load_model(None, cfg, device=dev, dtype=torch.bfloat16, load_format="dummy", seed=3,
                     experts_method=FusedExperts)
    cpu = load_model(None, cfg, device=torch.device("cpu"), dtype=torch.float32, load_format="dummy", seed=3,
                     experts_method=FusedExperts)
    with torch.no_grad():
        for p_cpu, p_gpu in zip(cpu.parameters(), gpu.parameters()):
            p_cpu.copy_(p_gpu.cpu())
    cpu.post_load()  # re-derive W_UK / W_UV and the fused GEMM weights from the copied parameters
    runs = {
        "gpu": (gpu, make_attention_backend("triton", dev), dev, torch.bfloat16),
        "cpu": (cpu, TorchAttentionBackend(), torch.device("cpu"), torch.float32),
    }
    caches = {n: KVCache.for_model(cfg, 64, PAGE, dt, d) for n, (_, _, d, dt) in runs.items()}
    rng = random.Random(0)
    pages = rng.sample(range(1, 64), 20)
    tables = [pages[0:6], pages[6:8], pages[8:14]]
    for prefix, extend in _batches():
        ids = [rng.randrange(16, cfg.vocab_size) for _ in range(sum(extend))]
        logits = {}
        for n, (model, attn, d, _) in runs.items():
            batch = ForwardBatch.build(ids, prefix, extend, tables, PAGE, device=d)
            attn.plan(batch)
            with torch.inference_mode():
                logits[n] = model.compute_logits(model(batch, caches[n], attn)[batch.logits_indices]).float().cpu()
        err = float((logits["gpu"] - logits["cpu"]).abs().max() / logits["cpu"].abs().max())
        cos = float(torch.nn.functional.cosine_similarity(logits["gpu"], logits["cpu"], dim=-1).min())
        assert err < 0.1 and cos > 0.99, f"GPU glue vs CPU model at extend={extend}: rel {err:.3g}, cosine {cos:.5f}"


def test_fp8_absorbed_weights_match_the_bf16_copies() -> None:
    """Single-token absorbed MLA multiplies by kv_b_proj's e4m3 blocks (a transposed W_UK copy, W_UV views):
    against float32 products with the dequantized weights it is at least as close as the bf16 W_UK / W_UV."""
    from baleen.kernels.fp8_gemv import fp8_block_gemv_batched
    from baleen.kernels.quant import block_dequant
    from baleen.model.mla import DeepseekV3Attention

    cfg = ModelConfig.from_dict(_config(fp8=True))
    dev = torch.device("cuda")
    model = load_model(None, cfg, device=dev, dtype=torch.bfloat16, load_format="dummy", seed=4,
                       experts_method=FusedExperts)
    layers = [m for m in model.modules() if isinstance(m, DeepseekV3Attention)]
    assert layers and all(m.w_uk_t_fp8 is not None and m.w_uv_fp8 is not None for m in layers)
    m = layers[0]
    assert m.w_uk_t_fp8 is not None and m.w_uv_fp8 is not None and m.w_uk is not None and m.w_uv is not None
    proj = m.kv_b_proj
    w = block_dequant(proj.weight, proj.weight_scale_inv, proj.block_size, torch.float32)
    w = w.view(m.num_heads, m.nope + m.v_dim, m.rank)  # [H, nope + v, rank] float32
    gen = torch.Generator(device=dev).manual_seed(0)
    q_nope = torch.randn(1, m.num_heads, m.nope, device=dev, generator=gen).to(torch.bfloat16)
    o_latent = torch.randn(1, m.num_heads, m.rank, device=dev, generator=gen).to(torch.bfloat16)
    cases = {
        "W_UK": (fp8_block_gemv_batched(q_nope, *m.w_uk_t_fp8), torch.einsum("thd,hdc->thc", q_nope, m.w_uk),
                 torch.einsum("thd,hdc->thc", q_nope.float(), w[:, : m.nope])),
        "W_UV": (fp8_block_gemv_batched(o_latent, *m.w_uv_fp8), torch.einsum("thc,hvc->thv", o_latent, m.w_uv),
                 torch.einsum("thc,hvc->thv", o_latent.float(), w[:, m.nope :])),
    }  # fmt: skip
    for name, (fp8, bf16, want) in cases.items():
        err_fp8 = float((fp8.float() - want).norm() / want.norm())
        err_bf16 = float((bf16.float() - want).norm() / want.norm())
        assert err_fp8 < 1e-2 and err_fp8 <= 1.5 * err_bf16 + 1e-3, (name, err_fp8, err_bf16)


def test_tiled_fp8_weights_give_the_same_decode() -> None:
    """tile_decode_weights gives attention's and the dense MLP's linears a tiled copy (not the shared expert run
    inside the fused MoE); the extend (24 tokens) and decode (3) batches then run the tiled GEMM: same logits up
    to rounding."""
    from baleen.model.deepseek import DeepseekV3MoE, tile_decode_weights
    from baleen.model.mla import DeepseekV3Attention

    cfg = ModelConfig.from_dict(_config(fp8=True))
    dev = torch.device("cuda")
    model = load_model(None, cfg, device=dev, dtype=torch.bfloat16, load_format="dummy", seed=3,
                       experts_method=FusedExperts)
    backend = TorchAttentionBackend()

    def run() -> list[torch.Tensor]:
        cache = KVCache.for_model(cfg, 64, PAGE, torch.bfloat16, dev)
        rng = random.Random(0)
        pages = rng.sample(range(1, 64), 20)
        tables = [pages[0:6], pages[6:8], pages[8:14]]
        out = []
        for prefix, extend in _batches():
            ids = [rng.randrange(16, cfg.vocab_size) for _ in range(sum(extend))]
            batch = ForwardBatch.build(ids, prefix, extend, tables, PAGE, device=dev)
            backend.plan(batch)
            with torch.inference_mode():
                out.append(model.compute_logits(model(batch, cache, backend)[batch.logits_indices]).float())
        return out

    before = run()
    added = tile_decode_weights(model)
    attn = [m for m in model.modules() if isinstance(m, DeepseekV3Attention)]
    assert all(lin.weight_tiled is not None for m in attn for lin in m.decode_linears())
    dense = model.model.layers[0].mlp
    assert dense.gate_up is not None and dense.gate_up.weight_tiled is not None
    assert dense.down_proj.weight_tiled is not None
    moe = [m for m in model.modules() if isinstance(m, DeepseekV3MoE)]
    assert moe and all(m.fused_shared and m.shared_experts.down_proj.weight_tiled is None for m in moe)
    want = sum(lin.weight_tiled.num_bytes for m in attn for lin in m.decode_linears())
    assert added == want + dense.gate_up.weight_tiled.num_bytes + dense.down_proj.weight_tiled.num_bytes
    after = run()
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)  # the prefill (106 tokens) reads no tiles
    # NOTE: the tiled GEMM quantizes activations to FP8 per token group (~2.6% from the float product, measured on
    # the H100), where the untiled path took the W8A16 skinny GEMM at 24 tokens (0.2%) and another W8A8 kernel at 3;
    # in later layers tiny differences flip activation roundings: the dummy model's logits over three layers agree
    # to a cosine of ~0.98, not more. Each tiled linear is checked against the W8A8 product it computes instead.
    for b, a in zip(before[1:], after[1:]):
        cos = float(torch.nn.functional.cosine_similarity(b, a, dim=-1).min())
        assert cos > 0.95, f"logits over tiled weights: cosine {cos:.5f}"
    from baleen.kernels.act_quant import dequant_token_groups, per_token_group_quant_fp8
    from baleen.kernels.fp8_gemv import dequant_linear_ref

    gen = torch.Generator(device=dev).manual_seed(0)
    for lin in [lin for m in attn for lin in m.decode_linears()] + [dense.gate_up, dense.down_proj]:
        assert lin is not None
        for m in (3, 24):
            x = torch.randn(m, lin.weight.shape[1], device=dev, dtype=torch.bfloat16, generator=gen)
            x8 = dequant_token_groups(*per_token_group_quant_fp8(x, 128))  # the activations the W8A8 GEMM reads
            want = dequant_linear_ref(x8, lin.weight, lin.weight_scale_inv, lin.method.block_size, torch.float32)
            got = lin.method.apply(lin, x).float()
            err = float((got - want).norm() / want.norm())
            assert err < 0.01, (tuple(lin.weight.shape), m, err)


def test_staged_step_with_one_token_prompt_chunks_equals_eager(tmp_path: Path) -> None:
    """Staged graph steps whose rows mix decode rows with one-token prompt chunks (an explicit input id; the
    first chunk samples nothing, the last one does): the same tokens as the eager forward."""
    (tmp_path / "config.json").write_text(json.dumps(_config(fp8=False)))
    runner = build_runner(WorkerConfig(
        model_path=str(tmp_path), device="cuda", dtype="bfloat16", load_format="dummy", attention_backend="triton",
        page_size=PAGE, max_running_requests=8, max_context_len=512, max_total_tokens=4096,
        cuda_graph_bs=(1, 4, 8), random_seed=5,
    ))  # fmt: skip
    assert runner.graphs is not None
    a, b = [5, 17, 99, 3, 250, 8], [44, 81, 7, 19, 300, 2, 61]
    pages = [PageUpdate(0, 0, array("i", [1]).tobytes()), PageUpdate(1, 0, array("i", [2]).tobytes())]

    def run() -> list[list[int]]:
        inits = [SlotInit(s, f"r{s}", SamplingParams(temperature=0.0), array("i", p).tobytes())
                 for s, p in enumerate((a, b))]  # fmt: skip
        def ids(xs: list[int]) -> bytes:
            return array("i", xs).tobytes()

        plans = [
            [SeqRow(0, 0, len(a), ids(a), True), SeqRow(1, 0, len(b) - 2, ids(b[:-2]), False)],
            [SeqRow(0, len(a), 1, b"", True), SeqRow(1, len(b) - 2, 1, ids(b[-2:-1]), False)],  # staged: 1 sampled row
            [SeqRow(0, len(a) + 1, 1, b"", True), SeqRow(1, len(b) - 1, 1, ids(b[-1:]), True)],  # explicit id, sampled
            [SeqRow(0, len(a) + 2, 1, b"", True), SeqRow(1, len(b), 1, b"", True)],
            [SeqRow(0, len(a) + 3, 1, b"", True), SeqRow(1, len(b) + 1, 1, b"", True)],
        ]
        out: list[list[int]] = [[], []]
        for step, rows in enumerate(plans):
            plan = StepPlan(step_id=step, rows=rows, new_slots=inits if step == 0 else [],
                            page_updates=pages if step == 0 else [])  # fmt: skip
            if step in (1, 2):
                assert runner.graphs is None or runner.staged_rows(plan) is not None
            result = runner.finish(runner.launch(plan))
            sampled = [r.slot for r in rows if r.sample]
            for slot, tok in zip(sampled, array("i", result.token_ids)):
                out[slot].append(tok)
        return out

    replayed = run()
    runner.graphs = None
    eager = run()
    assert replayed == eager
    assert len(replayed[0]) == 5 and len(replayed[1]) == 3
