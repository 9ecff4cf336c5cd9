"""Which fused kernels a model's shapes allow (model/kernel_choice.py), and the start-up checks beside it.

The choice takes shapes, not a device, so the CUDA path's decisions are tested here on CPU: a kernel that
cannot take a layer's shape gives that layer its reference and one line naming the layer, the field and the
limit; the Triton attention backend gives way to the torch one, or start-up fails naming the fields.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from baleen.actors.engine_config import EngineConfig, plan_startup
from baleen.kernels.mla_prep import mla_prep, mla_prep_ref
from baleen.model.config import ModelConfig, ParallelConfig
from baleen.model.deepseek import DeepseekV3ForCausalLM, DeepseekV3MoE
from baleen.model.kernel_choice import KernelChoice, choose_kernels, triton_decode_unsupported
from baleen.model.parallel import rank_layout
from baleen.model.presets import preset

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
# Small, every width a power of two, FP8 blocks aligned at one rank: every kernel takes it.
SMALL: dict[str, Any] = dict(
    architectures=["DeepseekV3ForCausalLM"], vocab_size=512, hidden_size=256, intermediate_size=512,
    moe_intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=64,
    qk_nope_head_dim=128, qk_rope_head_dim=32, v_head_dim=128, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, max_position_embeddings=1024,
)  # fmt: skip


def config(**changes: Any) -> ModelConfig:
    return ModelConfig.from_dict({**SMALL, **changes})


def test_released_v3_runs_every_kernel() -> None:
    v3 = ModelConfig.from_dict(preset("v3-full", fp8=True))
    for parallel in (ParallelConfig(), ParallelConfig(tp_size=8), ParallelConfig(tp_size=8, dp_size=8)):
        assert choose_kernels(v3, parallel) == KernelChoice()
    assert triton_decode_unsupported(v3) is None
    assert choose_kernels(config(quantization_config=FP8)) == KernelChoice()


def test_mla_widths_fall_back_to_the_reference_prep() -> None:
    choice = choose_kernels(config(kv_lora_rank=40, qk_rope_head_dim=12))
    assert not choice.mla_prep and choice.moe_route
    [line] = choice.fallbacks
    assert "MLA prep" in line and "kv_lora_rank=40" in line and "not a power of two" in line and "mla_prep_ref" in line
    assert "rope/2=6 is not a power of two" in choose_kernels(config(qk_rope_head_dim=12)).fallbacks[0]
    # The Triton decode kernel also wants >= 16 (a dot's K side): rope 8 is fine for the prep, not for it.
    assert choose_kernels(config(qk_rope_head_dim=8)).mla_prep
    why = triton_decode_unsupported(config(qk_rope_head_dim=8))
    assert why is not None and "qk_rope_head_dim=8" in why and ">= 16" in why


def test_routing_falls_back_to_torch_only_where_the_kernel_would_run() -> None:
    choice = choose_kernels(config(n_routed_experts=12, n_group=4, topk_group=2))
    assert not choice.moe_route
    assert "n_routed_experts=12" in choice.fallbacks[0] and "routing in torch" in choice.fallbacks[0]
    # V2's softmax scoring never runs the V3 routing kernel: torch is its path, not a fallback.
    v2 = choose_kernels(config(scoring_func="softmax", topk_method="group_limited_greedy"))
    assert not v2.moe_route and v2.fallbacks == ()


@pytest.mark.parametrize(
    "changes, parallel, names",
    [
        (dict(quantization_config={**FP8, "weight_block_size": [128, 64]}), ParallelConfig(), "weight_block_size"),
        (dict(moe_intermediate_size=96), ParallelConfig(), "moe_intermediate_size 96"),
        (dict(num_attention_heads=6, qk_nope_head_dim=16, qk_rope_head_dim=12, moe_intermediate_size=256),
         ParallelConfig(tp_size=2), "q_b_proj: 3 heads"),
        (dict(intermediate_size=384, moe_intermediate_size=256), ParallelConfig(tp_size=2, dp_size=2),
         "dense MLP's intermediate_size 384"),
        (dict(moe_intermediate_size=640), ParallelConfig(tp_size=4, ep_size=4, dp_size=4), "shared experts"),
    ],
)
def test_fp8_weights_the_kernels_cannot_take_are_dequantized(
    changes: dict[str, Any], parallel: ParallelConfig, names: str
) -> None:
    cfg = config(**{"quantization_config": FP8, **changes})
    choice = choose_kernels(cfg, parallel)
    assert not choice.fp8_weights and not choice.fp8_absorb
    [line] = [f for f in choice.fallbacks if f.startswith("FP8")]
    assert names in line and "dequantized at load" in line
    assert choose_kernels(cfg.with_(quant=None), parallel).fallbacks == tuple(f for f in choice.fallbacks if f != line)


def test_fp8_absorbed_decode_needs_whole_blocks_per_head() -> None:
    choice = choose_kernels(config(quantization_config=FP8, qk_nope_head_dim=64, num_attention_heads=16))
    assert choice.fp8_weights and not choice.fp8_absorb
    assert "qk_nope_head_dim=64" in choice.fallbacks[0] and "dense copies" in choice.fallbacks[0]
    assert not choose_kernels(config()).fp8_absorb and choose_kernels(config()).fallbacks == ()  # nothing FP8


def test_the_model_is_built_with_the_choice() -> None:
    with torch.device("meta"):
        odd = DeepseekV3ForCausalLM(config(kv_lora_rank=40, n_routed_experts=12, n_group=4), dtype=torch.float32)
        fits = DeepseekV3ForCausalLM(config(), dtype=torch.float32)
    for model, prep, route in ((odd, mla_prep_ref, False), (fits, mla_prep, True)):
        layers = list(model.model.layers)
        assert all(layer.self_attn.cuda_prep is prep for layer in layers)  # meta: what runs is the reference
        assert all(layer.mlp.gate.kernel_route is route for layer in layers if isinstance(layer.mlp, DeepseekV3MoE))


def _plan_for(cfg: ModelConfig, **flags: Any) -> Any:
    return plan_startup(EngineConfig(model_path="m", **flags), "m", cfg)


def test_triton_backend_gives_way_or_fails_naming_the_fields(caplog: pytest.LogCaptureFixture) -> None:
    odd = config(kv_lora_rank=40)
    with caplog.at_level(logging.WARNING, logger="baleen.engine"):
        worker = _plan_for(odd, device="cuda").worker
    assert (worker.attention_backend, worker.disable_cuda_graph) == ("torch", True)
    [record] = [r for r in caplog.records if "kv_lora_rank=40" in r.getMessage()]
    assert "torch attention backend" in record.getMessage()
    with pytest.raises(ValueError, match=r"--attention-backend triton cannot serve this model .*kv_lora_rank=40"):
        _plan_for(odd, device="cuda", attention_backend="triton")
    worker = _plan_for(config(), device="cuda").worker
    assert (worker.attention_backend, worker.disable_cuda_graph) == ("triton", False)
    assert _plan_for(odd, device="cpu").worker.attention_backend == "torch"


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(page_size=0), "--page-size must be >= 1"),
        (dict(context_length=-1), "--context-length must be >= 1"),
        (dict(max_running_requests=0), "--max-running-requests"),
        (dict(max_total_tokens=8, page_size=16), "--max-total-tokens 8 must hold one page"),
        (dict(chunked_prefill_size=0), "--chunked-prefill-size"),
        (dict(max_queued_requests=0), "--max-queued-requests"),
        (dict(mem_fraction_static=1.5), "--mem-fraction-static"),
        (dict(kv_cache_dtype="int4"), "--kv-cache-dtype"),
        (dict(dtype="float64"), "--dtype"),
        (dict(device="tpu"), "--device"),
        (dict(dist_timeout=0.0), "--dist-timeout"),
        (dict(cuda_graph_max_bs=0), "--cuda-graph-max-bs"),
    ],
)
def test_engine_config_values_no_start_up_serves_are_refused(flags: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _plan_for(config(), **{"device": "cpu", **flags})


@pytest.mark.parametrize(
    "changes, flags, field",
    [
        (dict(intermediate_size=100), dict(tp_size=8), "intermediate_size=100"),
        (dict(moe_intermediate_size=102, n_shared_experts=None), dict(tp_size=8, ep_size=2),
         "moe_intermediate_size=102 cannot be split over 4"),
        (dict(moe_intermediate_size=100), dict(tp_size=8, ep_size=8), "n_shared_experts x moe_intermediate_size"),
        (dict(num_attention_heads=6), dict(tp_size=4), "6 attention heads"),
        (dict(n_routed_experts=12, n_group=4), dict(tp_size=8, ep_size=8), "12 routed experts"),
    ],
)
def test_rank_layout_names_the_field_that_does_not_split(changes: dict[str, Any], flags: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        rank_layout(config(**changes), **flags)
    if "routed experts" not in field:  # on CPU those are zero-padded instead (SGLang's --tp 6 on a Xeon)
        assert rank_layout(config(**changes), **flags, pad_uneven=True).tp_size == flags["tp_size"]


def test_deepseek_v3_at_tp6_pads_heads_and_moe_width() -> None:
    """The seeds' CPU command (--tp 6): 128 heads -> 132 (22 a rank), moe_intermediate_size 2048 -> 2064 (344 a rank,
    16-byte rows), the dense 18432 splits exactly; at --tp 8 nothing changes."""
    v3 = ModelConfig.from_dict(preset("v3-full", fp8=True))
    with pytest.raises(ValueError, match="on CPU such splits are zero-padded"):
        rank_layout(v3, tp_size=6)
    parallel = rank_layout(v3, tp_size=6, pad_uneven=True)
    padded = v3.padded_for_tp(parallel)
    assert (padded.num_attention_heads, padded.moe_intermediate_size, padded.intermediate_size) == (132, 2064, 18432)
    assert padded.tp_padded_from is not None and padded.tp_padded_from.num_attention_heads == 128
    assert v3.padded_for_tp(ParallelConfig(tp_size=8)) is v3
