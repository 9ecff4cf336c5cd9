"""Model presets: config.json dicts spelled as released DeepSeek-V3 checkpoints spell them.

- `tiny`: seeded random weights for the tests. Small enough for fast CPU tests, yet it exercises every feature:
  q LoRA, YaRN, 1 dense + 3 MoE layers, grouped routing (4 groups, pick 2), a shared expert, an MTP layer.
- `trained`: the embedded default model (trained by model/train.py; `make-model --preset trained` writes its
  trained weights, not random ones): 2 dense + 2 MoE layers of 16 experts, an MTP layer, every weight a
  whole number of 128-wide FP8 blocks in at least one dimension, ~9M parameters.
- `v3-shape`: DeepSeek-V3's real layer sizes with 1 dense + 3 MoE layers (+ MTP), FP8.
- `v3-full`: DeepSeek-V3 itself (61 layers), FP8; for dummy-weight benchmarks on 8 GPUs.
"""

from __future__ import annotations

from typing import Any

from baleen.model.tokenizer_build import DEFAULT_VOCAB_SIZE

PRESET_NAMES = ("tiny", "trained", "v3-shape", "v3-full")
TRAINED_VOCAB_SIZE = 4096  # the trained model's tokenizer has 4000 tokens


def fp8_quantization_config() -> dict[str, Any]:
    """quantization_config of the released FP8 checkpoints: e4m3, dynamic activations, 128x128 blocks."""
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }


def _v3_common() -> dict[str, Any]:
    # Fields every released V3 config.json carries, including those baleen does not read.
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "model_type": "deepseek_v3",
        "moe_layer_freq": 1,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_nextn_predict_layers": 1,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": True,
    }


def _small_routing_and_rope() -> dict[str, Any]:
    # The small presets' routing (16 experts in 4 groups, pick 2 groups, 4 experts a token) and YaRN over 8k.
    return {
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "max_position_embeddings": 8192,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 4,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 2048,
            "type": "yarn",
        },
    }


def _tiny() -> dict[str, Any]:
    heads = 4
    return {
        **_v3_common(),
        "vocab_size": DEFAULT_VOCAB_SIZE + 24,  # a little above the tokenizer, as V3's 129280 is
        "hidden_size": 128,
        "intermediate_size": 320,  # not a multiple of 128: FP8 edge blocks get exercised
        "moe_intermediate_size": 64,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "q_lora_rank": 96,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        **_small_routing_and_rope(),
    }


def _trained() -> dict[str, Any]:
    heads = 4
    return {
        **_v3_common(),
        "vocab_size": TRAINED_VOCAB_SIZE,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,  # one FP8 block: the stacked expert scales need whole blocks
        "num_hidden_layers": 4,
        "first_k_dense_replace": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "q_lora_rank": 128,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,  # = qk_nope + qk_rope: training's attention runs as one fused SDPA
        **_small_routing_and_rope(),
    }


def _v3_full() -> dict[str, Any]:
    return {
        **_v3_common(),
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "first_k_dense_replace": 3,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "max_position_embeddings": 163840,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "quantization_config": fp8_quantization_config(),
    }


def _v3_shape() -> dict[str, Any]:
    return {**_v3_full(), "num_hidden_layers": 4, "first_k_dense_replace": 1}


def preset(name: str, *, fp8: bool | None = None) -> dict[str, Any]:
    """A fresh config.json dict for preset `name`; fp8 adds or drops quantization_config (None: as preset)."""
    builders = {"tiny": _tiny, "trained": _trained, "v3-shape": _v3_shape, "v3-full": _v3_full}
    if name not in builders:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESET_NAMES)}")
    cfg = builders[name]()
    if fp8 is True:
        cfg["quantization_config"] = fp8_quantization_config()
    elif fp8 is False:
        cfg.pop("quantization_config", None)
    return dict(sorted(cfg.items()))
