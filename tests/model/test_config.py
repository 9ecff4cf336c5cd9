"""ModelConfig parsing: released config.json files, transformers' spelling, the presets, and bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from baleen.model.config import ModelConfig
from baleen.model.presets import PRESET_NAMES, preset
from baleen.model.tokenizer_build import DEFAULT_VOCAB_SIZE

# deepseek-ai/DeepSeek-V3 config.json as released (auto_map left out: baleen does not run remote code).
RELEASED_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

# DeepSeek-V2-Lite style: no q LoRA, softmax scores, greedy top-k, no expert groups.
RELEASED_V2_LITE: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "v_head_dim": 128,
    "vocab_size": 102400,
}


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_released_v3(tmp_path: Path) -> None:
    cfg = ModelConfig.from_hf(_write(tmp_path, RELEASED_V3))
    assert cfg.architecture == "DeepseekV3ForCausalLM"
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_head_dim, cfg.kv_cache_dim) == (1536, 512, 192, 576)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group) == (256, 8, 8, 4)
    assert (cfg.topk_method, cfg.scoring_func, cfg.norm_topk_prob) == ("noaux_tc", "sigmoid", True)
    assert cfg.routed_scaling_factor == 2.5
    assert [cfg.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]
    assert cfg.has_mtp and cfg.num_nextn_predict_layers == 1
    assert cfg.rope.is_yarn and cfg.rope.factor == 40.0 and cfg.rope.theta == 10000.0
    assert cfg.rope.original_max_position_embeddings == 4096 and cfg.rope.mscale_all_dim == 1.0
    assert cfg.quant is not None and cfg.quant.weight_block_size == (128, 128)
    assert cfg.eos_token_ids == (1,) and cfg.bos_token_id == 0
    # YaRN: the softmax scale grows by mscale(40)^2 = (0.1 ln 40 + 1)^2
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2)


def test_released_v2_lite(tmp_path: Path) -> None:
    cfg = ModelConfig.from_hf(_write(tmp_path, RELEASED_V2_LITE) / "config.json")
    assert cfg.architecture == "DeepseekV2ForCausalLM"
    assert cfg.q_lora_rank is None
    assert (cfg.topk_method, cfg.scoring_func, cfg.norm_topk_prob) == ("greedy", "softmax", False)
    assert (cfg.n_shared_experts, cfg.n_group, cfg.topk_group) == (2, 1, 1)
    assert cfg.quant is None and not cfg.has_mtp
    assert cfg.rope.mscale == pytest.approx(0.707)
    assert cfg.eos_token_ids == (100001,)


def test_v2_group_limited_greedy(tmp_path: Path) -> None:
    # DeepSeek-V2 (236B): 160 experts in 8 groups, pick 3 groups, softmax scores.
    raw = {**RELEASED_V2_LITE, "q_lora_rank": 1536, "n_routed_experts": 160, "n_group": 8, "topk_group": 3}
    raw["topk_method"] = "group_limited_greedy"
    cfg = ModelConfig.from_hf(_write(tmp_path, raw))
    assert (cfg.topk_method, cfg.n_group, cfg.topk_group, cfg.q_lora_rank) == (
        "group_limited_greedy",
        8,
        3,
        1536,
    )


def test_transformers_spelling(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        first_k_dense_replace=1,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        rope_theta=50000.0,
    )
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written  # the spelling under test, not the released one
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.architecture == "DeepseekV3ForCausalLM"  # from model_type: no architectures field
    assert (cfg.topk_method, cfg.scoring_func) == ("noaux_tc", "sigmoid")  # V3 defaults, fields omitted
    assert cfg.rope.is_yarn and cfg.rope.theta == 50000.0 and cfg.rope.factor == 4.0
    assert cfg.rope.original_max_position_embeddings == 1024
    assert (cfg.q_lora_rank, cfg.kv_cache_dim, cfg.n_group, cfg.topk_group) == (48, 40, 2, 1)


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("fp8", [None, True, False])
def test_presets_parse(name: str, fp8: bool | None) -> None:
    raw = preset(name, fp8=fp8)
    cfg = ModelConfig.from_dict(raw)
    want_fp8 = fp8 if fp8 is not None else name not in ("tiny", "trained")
    assert (cfg.quant is not None) == want_fp8
    assert raw["architectures"] == ["DeepseekV3ForCausalLM"] and raw["model_type"] == "deepseek_v3"
    assert "rope_theta" in raw and raw["rope_scaling"]["type"] == "yarn"
    assert (raw["bos_token_id"], raw["eos_token_id"], raw["torch_dtype"]) == (0, 1, "bfloat16")


def test_preset_tiny_exercises_everything() -> None:
    cfg = ModelConfig.from_dict(preset("tiny"))
    assert cfg.q_lora_rank is not None and cfg.rope.is_yarn
    kinds = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
    assert kinds[0] is False and 2 <= sum(kinds) <= 3 and kinds.count(False) == 1
    assert cfg.n_routed_experts is not None and 8 <= cfg.n_routed_experts <= 16
    assert cfg.n_group > 1 and cfg.topk_group < cfg.n_group and cfg.n_shared_experts == 1
    assert cfg.has_mtp and cfg.max_position_embeddings >= 4096 and 64 <= cfg.hidden_size <= 128
    assert DEFAULT_VOCAB_SIZE < cfg.vocab_size <= 2048


def test_preset_v3_full_is_the_released_config() -> None:
    full = preset("v3-full")
    for key, value in RELEASED_V3.items():
        if key != "transformers_version":
            assert full[key] == value, key
    shape = preset("v3-shape")
    assert (
        shape["num_hidden_layers"],
        shape["first_k_dense_replace"],
        shape["num_nextn_predict_layers"],
    ) == (4, 1, 1)
    assert {k: v for k, v in shape.items() if k not in ("num_hidden_layers", "first_k_dense_replace")} == {
        k: v for k, v in full.items() if k not in ("num_hidden_layers", "first_k_dense_replace")
    }


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="tiny"):
        preset("v4")


def _without(key: str) -> dict[str, Any]:
    raw = copy.deepcopy(RELEASED_V3)
    del raw[key]
    return raw


def _with(**changes: Any) -> dict[str, Any]:
    return {**copy.deepcopy(RELEASED_V3), **changes}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (_without("hidden_size"), "hidden_size"),
        (_without("kv_lora_rank"), "kv_lora_rank"),
        (_with(hidden_size="7168"), "hidden_size"),
        (_with(num_hidden_layers=0), "num_hidden_layers"),
        (_with(q_lora_rank=1536.0), "q_lora_rank"),
        (_with(norm_topk_prob="yes"), "norm_topk_prob"),
        (_with(routed_scaling_factor="2.5"), "routed_scaling_factor"),
        (_with(topk_method="aux_free"), "topk_method"),
        (_with(scoring_func="relu"), "scoring_func"),
        (_with(topk_group=9), "topk_group"),
        (_with(num_experts_per_tok=300), "num_experts_per_tok"),
        (_with(n_group=7), "n_group"),
        (_with(rope_scaling={**RELEASED_V3["rope_scaling"], "type": "dynamic"}), "rope_scaling.type"),
        (
            _with(rope_scaling={"type": "yarn", "original_max_position_embeddings": 4096}),
            "rope_scaling.factor",
        ),
        (_with(rope_scaling="yarn"), "rope_scaling"),
        (_with(rope_theta=-1), "rope_theta"),
        (_with(architectures=["LlamaForCausalLM"], model_type="llama"), "architectures"),
        (_with(quantization_config={"quant_method": "awq"}), "quantization_config.quant_method"),
        (_with(quantization_config={"quant_method": "fp8", "weight_block_size": [128]}), "weight_block_size"),
        (
            _with(quantization_config={**RELEASED_V3["quantization_config"], "fmt": "e5m2"}),
            "quantization_config.fmt",
        ),
        (_with(quantization_config="fp8"), "quantization_config"),
        (_with(qk_rope_head_dim=63), "qk_rope_head_dim"),
        (_with(eos_token_id="</s>"), "eos_token_id"),
        (_with(eos_token_id=[1, -2]), "eos_token_id"),
        (_with(bos_token_id=1.5), "bos_token_id"),
        (_with(rms_norm_eps=-1e-6), "rms_norm_eps"),
        (_with(rope_scaling={**RELEASED_V3["rope_scaling"], "factor": 0}), "factor=0.0"),
        (_with(rope_scaling={**RELEASED_V3["rope_scaling"], "beta_slow": 0}), "beta_slow=0.0"),
    ],
)
def test_malformed_names_the_field(tmp_path: Path, raw: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ModelConfig.from_hf(_write(tmp_path, raw))


def test_dense_model_needs_no_moe_fields(tmp_path: Path) -> None:
    raw = _with(n_routed_experts=None, num_experts_per_tok=None)
    del raw["moe_intermediate_size"]
    cfg = ModelConfig.from_hf(_write(tmp_path, raw))
    assert cfg.n_routed_experts is None and not cfg.is_moe_layer(5)


def test_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 7168,')
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        ModelConfig.from_hf(tmp_path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no config\.json"):
        ModelConfig.from_hf(tmp_path)
