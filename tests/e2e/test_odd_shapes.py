"""Odd model shapes through the served path (HTTP, CPU, fp32): greedy ids equal transformers' `generate`.

No kernel limit belongs on the CPU path: a checkpoint whose kv_lora_rank and rope are not powers of two once
loaded, said "ready" and died on its first request. Two checkpoints carry the oddities between them, so few
servers start:
- `odd`: kv_lora_rank 40, qk_rope_head_dim 12 (rope/2 = 6), 6 heads, q LoRA, block-FP8 weights whose dims are
  not multiples of the 128 block (partial edge blocks on both sides), and an MTP layer in the checkpoint
  (transformers' save_pretrained writes none: it is added by hand; the server skips it). Served at one rank,
  --tp 2 and --enable-dp-attention --dp 2 --tp 2.
- `plain`: no q LoRA, kv_lora_rank 24, qk_rope_head_dim 6 (rope/2 = 3), 10 heads, 6 routed experts in 2 groups.
Requests: two token-id prompts in one /v1/completions call (one batch), then a prompt sharing the first one's
prefix (a prefix-cache hit: the absorbed form over cached latents); 8-token prefill chunks make the longer
prompts chunked too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import ServerProcess
from safetensors.torch import load_file, save_file

from baleen.kernels.quant import block_dequant, block_quant

COMMON: dict[str, Any] = dict(
    vocab_size=320, hidden_size=72, intermediate_size=160, moe_intermediate_size=32, num_hidden_layers=3,
    n_shared_experts=1, routed_scaling_factor=2.5, v_head_dim=16, qk_nope_head_dim=16, num_experts_per_tok=3,
    first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=256, initializer_range=0.15,
    rms_norm_eps=1e-6, topk_group=1, n_group=2,
)  # fmt: skip
SHAPES: dict[str, dict[str, Any]] = {
    "odd": dict(kv_lora_rank=40, qk_rope_head_dim=12, num_attention_heads=6, q_lora_rank=48, n_routed_experts=8),
    "plain": dict(kv_lora_rank=24, qk_rope_head_dim=6, num_attention_heads=10, q_lora_rank=None, n_routed_experts=6),
}
BLOCK = (128, 128)
PROMPTS = [[5, 77, 201, 9, 140, 33, 250, 18, 61, 99, 7, 300, 12, 45, 88, 160, 2, 71, 19, 230], [11, 3, 290]]
PREFIX_HIT = [*PROMPTS[0][:16], 42, 8, 120]  # shares two pages and more of PROMPTS[0]'s cached latents
NEW_TOKENS = 8
LAYOUTS = {"tp1": (), "tp2": ("--tp", "2"), "dp-attention": ("--enable-dp-attention", "--dp", "2", "--tp", "2")}


def _hf_model(shape: dict[str, Any], seed: int) -> Any:
    """A random fp32 transformers DeepseekV3ForCausalLM (YaRN rope) with norms away from 1 and non-zero biases."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    kw = {**COMMON, **shape, "num_key_value_heads": shape["num_attention_heads"]}
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}  # fmt: skip
    cfg = DeepseekV3Config(**kw, rope_parameters=rope, eos_token_id=None, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.rand(b.shape, generator=gen))
    return model


def _quantize(path: Path, hf: Any) -> None:
    """Every attention/MLP/expert projection to block FP8 in the checkpoint; `hf` gets the dequantized weights."""
    tensors = load_file(path / "model.safetensors")
    dense: dict[str, torch.Tensor] = {}
    for name in list(tensors):
        if name.endswith(".weight") and ".layers." in name and "_proj" in name.split(".")[-2]:  # kv_a_proj_with_mqa too
            q, s = block_quant(tensors[name], BLOCK)
            tensors[name], tensors[name + "_scale_inv"] = q, s
            dense[name] = block_dequant(q, s, BLOCK, torch.float32)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    # transformers keeps routed experts stacked in memory: write the dequantized ones back through its loader.
    hf.load_state_dict(_stacked(dense, hf), strict=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(BLOCK)}  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))


def _stacked(dense: dict[str, torch.Tensor], hf: Any) -> dict[str, torch.Tensor]:
    """Checkpoint names -> transformers' in-memory names (experts stacked as gate_up_proj / down_proj)."""
    state = hf.state_dict()
    out = {name: t for name, t in dense.items() if name in state}
    for name in state:
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            num = state[name].shape[0]
            out[name] = torch.stack([torch.cat([dense[f"{prefix}{e}.gate_proj.weight"], dense[f"{prefix}{e}.up_proj.weight"]])
                                     for e in range(num)])  # fmt: skip
            out[prefix + "down_proj"] = torch.stack([dense[f"{prefix}{e}.down_proj.weight"] for e in range(num)])
    assert all(state[n].shape == t.shape for n, t in out.items())
    return out


def _add_mtp_layer(path: Path, shape: dict[str, Any]) -> None:
    """Append a NextN layer `model.layers.{L}.*` (random; the served model must ignore it) and announce it."""
    tensors = load_file(path / "model.safetensors")
    layers = COMMON["num_hidden_layers"]
    gen = torch.Generator().manual_seed(11)
    for name, t in list(tensors.items()):
        if name.startswith(f"model.layers.{layers - 1}."):  # an MoE block's tensors (FP8 ones included)
            new = f"model.layers.{layers}." + name.removeprefix(f"model.layers.{layers - 1}.")
            tensors[new] = t.clone()
    hidden = COMMON["hidden_size"]
    for leaf, shp in (("enorm.weight", (hidden,)), ("hnorm.weight", (hidden,)), ("eh_proj.weight", (hidden, 2 * hidden)),
                      ("shared_head.norm.weight", (hidden,)), ("shared_head.head.weight", (COMMON["vocab_size"], hidden))):
        tensors[f"model.layers.{layers}.{leaf}"] = torch.randn(shp, generator=gen)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(cfg))


def _write_tokenizer(path: Path) -> None:
    """A word-level tokenizer.json covering the vocabulary (the prompts are token ids; outputs decode to words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(COMMON["vocab_size"])}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path / "tokenizer.json"))


def _reference(hf: Any) -> dict[str, list[int]]:
    """transformers' greedy continuation of each prompt (eos off, so always NEW_TOKENS)."""
    out = {}
    for key, prompt in (("0", PROMPTS[0]), ("1", PROMPTS[1]), ("hit", PREFIX_HIT)):
        with torch.no_grad():
            ids = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                              pad_token_id=0)  # fmt: skip
        out[key] = ids[0, len(prompt) :].tolist()
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, list[int]]]]:
    """name -> (checkpoint directory with a tokenizer, transformers' greedy ids)."""
    made = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        path = tmp_path_factory.mktemp(name)
        hf = _hf_model(shape, seed=3 + i)
        hf.save_pretrained(path)
        if name == "odd":
            _quantize(path, hf)
            _add_mtp_layer(path, shape)
        _write_tokenizer(path)
        made[name] = (path, _reference(hf))
    return made


def _serve(path: Path, *flags: str) -> ServerProcess:
    return ServerProcess("--model-path", str(path), "--device", "cpu", "--dtype", "float32", "--chunked-prefill-size",
                         "8", "--page-size", "8", *flags)  # fmt: skip


def _complete(server: ServerProcess, prompts: list[list[int]]) -> list[list[int]]:
    body = {"prompt": prompts, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    with server.client() as client:
        resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
    return [c["token_ids"] for c in choices]


def _check(server: ServerProcess, want: dict[str, list[int]]) -> None:
    assert _complete(server, PROMPTS) == [want["0"], want["1"]], server.log()[-3000:]
    assert _complete(server, [PREFIX_HIT]) == [want["hit"]], server.log()[-3000:]


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def odd_server(request: pytest.FixtureRequest, checkpoints: dict[str, Any]) -> Iterator[ServerProcess]:
    with _serve(checkpoints["odd"][0], *LAYOUTS[request.param]) as server:
        yield server


def test_odd_checkpoint_serves_transformers_greedy_ids(odd_server: ServerProcess, checkpoints: dict[str, Any]) -> None:
    _check(odd_server, checkpoints["odd"][1])


def test_plain_checkpoint_serves_transformers_greedy_ids(checkpoints: dict[str, Any]) -> None:
    with _serve(checkpoints["plain"][0]) as server:
        _check(server, checkpoints["plain"][1])


@pytest.mark.gpu
def test_odd_checkpoint_on_cuda_runs_references_where_kernels_cannot(checkpoints: dict[str, Any]) -> None:
    # kv_lora_rank 40 / rope 12: the MLA prep reference, the torch attention backend (no CUDA graphs); experts of
    # 32 rows in 128-row FP8 blocks: dequantized at load. Each said once at start-up, then the ids of transformers
    # (the first ones: the GPU kernels' fp32 dots may round differently from the CPU's).
    path, want = checkpoints["odd"]
    with ServerProcess("--model-path", str(path), "--device", "cuda", "--dtype", "float32") as server:
        got = _complete(server, PROMPTS)
        log = server.log()
    for line in ("MLA prep (self_attn, kv_lora_rank=40", "serving on the torch attention backend",
                 "FP8 linears and experts: the routed experts' moe_intermediate_size 32"):  # fmt: skip
        assert log.count(line) == 1, log
    assert [len(ids) for ids in got] == [NEW_TOKENS, NEW_TOKENS]
    assert [ids[:2] for ids in got] == [want["0"][:2], want["1"][:2]]
