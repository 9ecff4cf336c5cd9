"""The shared expert stored as one more expert slot and run inside the fused MoE (decode batches)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from baleen.model.config import ModelConfig, ParallelConfig
from baleen.model.deepseek import DeepseekV3ForCausalLM, DeepseekV3MoE, check_complete
from baleen.model.fused_experts import FusedExperts
from baleen.model.layers import materialize
from baleen.model.loader import Checkpoint, load_model
from baleen.model.moe import MoEExperts

SEQS = [[5, 6, 7, 8, 9, 10, 11, 250], [100, 200, 3]]


def moe_layers(model: Any) -> list[DeepseekV3MoE]:
    return [m for m in model.modules() if isinstance(m, DeepseekV3MoE)]


def assert_shared_in_slot(moe: DeepseekV3MoE) -> None:
    """The shared MLP's weights are views of the slot (no second copy) and the slot holds them."""
    ex, shared, slot = moe.experts, moe.shared_experts, moe.experts.shared_slot
    assert moe.fused_shared and shared is not None and slot == ex.num_local_experts
    assert ex.w13.shape[0] == ex.num_local_experts + 1
    i = ex.inter_local
    assert shared.gate_proj.weight.data_ptr() == ex.w13[slot].data_ptr()
    assert shared.up_proj.weight.data_ptr() == ex.w13[slot, i:].data_ptr()
    assert shared.down_proj.weight.data_ptr() == ex.w2[slot].data_ptr()
    if ex.w2_weight_scale_inv is not None:
        assert shared.down_proj.weight_scale_inv.data_ptr() == ex.w2_weight_scale_inv[slot].data_ptr()


def test_fused_shared_expert_matches_transformers(tiny: Any) -> None:
    path, hf = tiny.checkpoint(seed=21)
    model = load_model(path, ModelConfig.from_hf(path), experts_method=FusedExperts, progress=False)
    layers = moe_layers(model)
    assert len(layers) == 2
    for moe in layers:
        assert_shared_in_slot(moe)
    fused = tiny.prefill_logits(model, SEQS)
    for got, s in zip(fused, SEQS):
        tiny.assert_logits_close(got, tiny.hf_logits(hf, s))
    for moe in layers:  # the prefill form: the shared expert as its own MLP, reading the same slot
        moe.FUSED_SHARED_MAX_TOKENS = 0
    for got, want in zip(tiny.prefill_logits(model, SEQS), fused):
        tiny.assert_logits_close(got, want, rel=1e-5)


def test_fused_shared_expert_fp8(tiny: Any) -> None:
    """FP8 block weights: the shared expert's block scales move into the stacked scale tensors too."""
    path, _ = tiny.checkpoint(seed=22)
    tiny.quantize_checkpoint(path, (16, 16))
    config = ModelConfig.from_hf(path)
    outs = []
    for method in (None, FusedExperts):
        with torch.device("meta"):
            model = DeepseekV3ForCausalLM(config, dtype=torch.float32, mla_mode="absorbed", experts_method=method)
        materialize(model, "cpu")
        ckpt = Checkpoint(path)
        check_complete(model, model.load_weights((n, ckpt.get(n)) for n in ckpt.names))
        model.post_load()
        outs.append(tiny.prefill_logits(model, SEQS))
    for moe in moe_layers(model):
        assert_shared_in_slot(moe)
        assert moe.experts.w13_weight_scale_inv is not None
        assert moe.experts.w13_weight_scale_inv.shape[0] == 9
    for got, want in zip(outs[1], outs[0]):
        tiny.assert_logits_close(got, want, rel=1e-5)


def test_no_slot_without_the_fused_method_or_with_expert_parallelism(tiny: Any) -> None:
    path, _ = tiny.checkpoint(seed=23)
    model = load_model(path, ModelConfig.from_hf(path), progress=False)  # TorchExperts
    assert all(m.experts.shared_slot is None and not m.fused_shared for m in moe_layers(model))
    with pytest.raises(ValueError, match="expert parallelism"):
        MoEExperts(8, 16, 8, ParallelConfig(tp_rank=0, tp_size=2, ep_size=2), torch.float32, shared_slot=True)
