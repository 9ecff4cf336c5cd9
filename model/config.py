"""Model and parallel configuration, parsed once from a checkpoint's config.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")
# SGLang's NextN export (scripts/export_deepseek_nextn.py): the MTP layer alone, as `model.layers.0.*`, no embedding
# or head; a draft model (--speculative-draft-model-path), never a model to serve.
NEXTN_ARCHITECTURE = "DeepseekV3ForCausalLMNextN"
SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
SCORING_FUNCS = ("sigmoid", "softmax")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding with optional YaRN scaling, as DeepSeek-V2/V3 use it."""

    theta: float = 10000.0
    kind: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @property
    def is_yarn(self) -> bool:
        return self.kind == "yarn"


def yarn_mscale(scale: float, mscale: float) -> float:
    """YaRN's attention temperature correction: 0.1 * mscale * ln(scale) + 1 for scale > 1."""
    return 0.1 * mscale * math.log(scale) + 1.0 if scale > 1.0 else 1.0


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class TpPadding:
    """The checkpoint's sizes of a model padded for uneven tensor parallelism (`ModelConfig.padded_for_tp`)."""

    num_attention_heads: int
    intermediate_size: int
    moe_intermediate_size: int


@dataclass(frozen=True)
class QuantConfig:
    """Block-wise FP8 (e4m3) weights with one `weight_scale_inv` per block."""

    method: str = "fp8"
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"
    weight_block_size: tuple[int, int] = (128, 128)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a DeepSeek-V2/V3-family checkpoint."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    # MLA
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # MoE
    moe_intermediate_size: int
    n_routed_experts: int | None
    n_shared_experts: int | None
    num_experts_per_tok: int | None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    # everything else
    num_nextn_predict_layers: int = 0
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    quant: QuantConfig | None = None
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    # Set by `padded_for_tp`: the checkpoint's own sizes, where this config's were zero-padded for uneven TP
    tp_padded_from: TpPadding | None = None

    # ---- derived values -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Width of one cached latent: kv_lora_rank + qk_rope_head_dim (576 for V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.rope.is_yarn and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def is_nextn_export(self) -> bool:
        """An MTP layer alone (NEXTN_ARCHITECTURE), loaded with `load_mtp` beside its target model."""
        return self.architecture == NEXTN_ARCHITECTURE

    def draft_misfits(self, draft: ModelConfig) -> list[str]:
        """What keeps `draft`'s MTP layer from drafting for this target: its fields that must match and do not, as
        "name draft (target value)"; empty when it fits (the layer caches in the target's KV cache and reads its
        embeddings and vocabulary)."""
        same = ("hidden_size", "vocab_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim")
        return [f"{k} {getattr(draft, k)} (target {getattr(self, k)})" for k in same
                if getattr(draft, k) != getattr(self, k)]

    @property
    def has_mtp(self) -> bool:
        return self.num_nextn_predict_layers > 0

    def is_moe_layer(self, layer_id: int) -> bool:
        """DeepSeek's rule: dense for the first k layers, then MoE every `moe_layer_freq` layers."""
        return (
            self.n_routed_experts is not None
            and layer_id >= self.first_k_dense_replace
            and layer_id % self.moe_layer_freq == 0
        )

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    def padded_for_tp(self, parallel: ParallelConfig) -> ModelConfig:
        """This config with its attention heads a multiple of the ranks that split attention (tp_size / dp_size)
        and its dense and MoE intermediate widths a multiple of tp_size, where they are not, padded with zero
        weights (the loader pads the checkpoint's tensors, model/loader.py `pad_weights`); itself where every split
        is exact.

        As SGLang does on CPU (e.g. --tp 6 on a Xeon with 6 NUMA nodes: DeepSeek-V3's 128 heads become 132, its
        moe_intermediate_size 2048 becomes 2064). A zero head's query is zero and its o_proj columns are zero, so it
        adds nothing; a zero intermediate row gives silu(0) * 0 = 0 into zero down_proj columns. The outputs are
        the unpadded model's. Only dense weights are padded (FP8 checkpoints are dequantized where this runs).
        NOTE: `--load-format dummy` draws random weights for the padding too: another random model than tp 1's."""
        tp = parallel.tp_size
        heads = _round_up(self.num_attention_heads, tp // parallel.dp_size)
        # widths: a multiple of tp_size (the routed experts split over tp / ep ranks, the shared ones over tp), and
        # each rank's share a multiple of 8 elements (the grouped GEMMs of the MoE want 16-byte strides)
        inter = self.intermediate_size if self.intermediate_size % tp == 0 else _round_up(self.intermediate_size, 8 * tp)
        moe = self.moe_intermediate_size
        if self.n_routed_experts and moe % tp:
            moe = _round_up(moe, 8 * tp)
        if (heads, inter, moe) == (self.num_attention_heads, self.intermediate_size, self.moe_intermediate_size):
            return self
        if self.tp_padded_from is not None:
            raise ValueError("padded_for_tp of a config padded already")
        return replace(self, num_attention_heads=heads, intermediate_size=inter, moe_intermediate_size=moe,
                       tp_padded_from=TpPadding(self.num_attention_heads, self.intermediate_size,
                                                self.moe_intermediate_size))  # fmt: skip

    # ---- parsing --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path: str | Path) -> ModelConfig:
        """Read a checkpoint directory's config.json (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise ValueError(f"no config.json at {path}")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{file} must hold a JSON object")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Validate and normalise a config.json dict (released or transformers spelling)."""
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        arch = next((a for a in archs if a in (*SUPPORTED_ARCHITECTURES, NEXTN_ARCHITECTURE)), None)
        if arch is None:
            if model_type in SUPPORTED_MODEL_TYPES:
                arch = "DeepseekV3ForCausalLM" if model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
            else:
                raise ValueError(
                    f"architectures={archs!r} (model_type={model_type!r}) is not supported: "
                    f"baleen serves {', '.join(SUPPORTED_ARCHITECTURES)}"
                )
        r = _Reader(raw)
        # transformers' DeepseekV3Config omits the gating fields: V3 means noaux_tc over sigmoid scores.
        is_v3 = arch in ("DeepseekV3ForCausalLM", NEXTN_ARCHITECTURE)
        n_routed = r.get_opt_int("n_routed_experts")
        cfg = cls(
            architecture=arch,
            vocab_size=r.get_int("vocab_size"),
            hidden_size=r.get_int("hidden_size"),
            intermediate_size=r.get_int("intermediate_size"),
            num_hidden_layers=r.get_int("num_hidden_layers"),
            num_attention_heads=r.get_int("num_attention_heads"),
            q_lora_rank=r.get_opt_int("q_lora_rank"),
            kv_lora_rank=r.get_int("kv_lora_rank"),
            qk_nope_head_dim=r.get_int("qk_nope_head_dim"),
            qk_rope_head_dim=r.get_int("qk_rope_head_dim"),
            v_head_dim=r.get_int("v_head_dim"),
            moe_intermediate_size=r.get_int(
                "moe_intermediate_size", required=n_routed is not None, default=0, minimum=int(n_routed is not None)
            ),
            n_routed_experts=n_routed,
            n_shared_experts=r.get_opt_int("n_shared_experts"),
            num_experts_per_tok=r.get_opt_int("num_experts_per_tok"),
            first_k_dense_replace=r.get_int("first_k_dense_replace", default=0, minimum=0),
            moe_layer_freq=r.get_int("moe_layer_freq", default=1),
            topk_method=r.get_choice("topk_method", TOPK_METHODS, default="noaux_tc" if is_v3 else "greedy"),
            scoring_func=r.get_choice("scoring_func", SCORING_FUNCS, default="sigmoid" if is_v3 else "softmax"),
            n_group=r.get_opt_int("n_group") or 1,
            topk_group=r.get_opt_int("topk_group") or 1,
            routed_scaling_factor=r.get_float("routed_scaling_factor", default=1.0),
            norm_topk_prob=r.get_bool("norm_topk_prob", default=False),
            num_nextn_predict_layers=r.get_int("num_nextn_predict_layers", default=0, minimum=0),
            max_position_embeddings=r.get_int("max_position_embeddings", default=4096),
            rms_norm_eps=r.get_float("rms_norm_eps", default=1e-6),
            hidden_act=r.get_choice("hidden_act", ("silu",), default="silu"),
            tie_word_embeddings=r.get_bool("tie_word_embeddings", default=False),
            attention_bias=r.get_bool("attention_bias", default=False),
            rope=_parse_rope(raw),
            quant=_parse_quant(raw.get("quantization_config")),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.n_routed_experts is not None:
            if not self.num_experts_per_tok or self.num_experts_per_tok > self.n_routed_experts:
                raise ValueError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..n_routed_experts="
                    f"{self.n_routed_experts}"
                )
            if self.n_routed_experts % self.n_group:
                raise ValueError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.topk_method == "noaux_tc" and per_group < 2:
                raise ValueError("topk_method=noaux_tc needs at least 2 experts per group (n_routed_experts/n_group)")
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise ValueError(
                    f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in topk_group="
                    f"{self.topk_group} groups"
                )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if self.moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq={self.moe_layer_freq} must be >= 1")
        if not self.rms_norm_eps >= 0:
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps} must be >= 0")
        rope = self.rope
        if rope.is_yarn and not (rope.factor > 0 and rope.beta_fast > 0 and rope.beta_slow > 0):
            raise ValueError(
                f"rope_scaling factor={rope.factor}, beta_fast={rope.beta_fast} and beta_slow={rope.beta_slow} must "
                "all be > 0"
            )
        for name, ids in (("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id)):
            listed = ids if isinstance(ids, list) else [] if ids is None else [ids]
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in listed):
                raise ValueError(f"{name}={ids!r} must be a token id (an integer >= 0), a list of them, or null")


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    # Released checkpoints: top-level rope_theta + rope_scaling {type: yarn, ...}.
    # transformers >= 5: rope_parameters {rope_type, rope_theta, ...}.
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    theta = raw.get("rope_theta")
    spec: dict[str, Any] = {}
    if isinstance(params, dict):
        spec = dict(params)
        theta = spec.get("rope_theta", theta)
    if isinstance(scaling, dict):
        spec = {**spec, **scaling}
    elif scaling is not None:
        raise ValueError(f"rope_scaling must be an object or null, got {scaling!r}")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"rope_parameters must be an object, got {params!r}")
    kind = spec.get("type") or spec.get("rope_type") or "default"
    if theta is None:
        theta = 10000.0
    if not isinstance(theta, int | float) or theta <= 0:
        raise ValueError(f"rope_theta must be a positive number, got {theta!r}")
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind != "yarn":
        raise ValueError(f"rope_scaling.type={kind!r} is not supported (use 'yarn' or none)")
    r = _Reader(spec, prefix="rope_scaling.")
    return RopeConfig(
        theta=float(theta),
        kind="yarn",
        factor=r.get_float("factor"),
        original_max_position_embeddings=r.get_int("original_max_position_embeddings"),
        beta_fast=r.get_float("beta_fast", default=32.0),
        beta_slow=r.get_float("beta_slow", default=1.0),
        mscale=r.get_float("mscale", default=1.0),
        mscale_all_dim=r.get_float("mscale_all_dim", default=0.0),
    )


def _parse_quant(q: Any) -> QuantConfig | None:
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ValueError(f"quantization_config must be an object, got {q!r}")
    method = q.get("quant_method")
    if method != "fp8":
        raise ValueError(f"quantization_config.quant_method={method!r} is not supported (only block-wise 'fp8')")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"quantization_config.fmt={fmt!r} is not supported (only 'e4m3')")
    block = q.get("weight_block_size")
    if (
        not isinstance(block, list | tuple)
        or len(block) != 2
        or not all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise ValueError(f"quantization_config.weight_block_size must be two positive ints, got {block!r}")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ValueError(f"quantization_config.activation_scheme={scheme!r} is not supported (only 'dynamic')")
    return QuantConfig(fmt=fmt, activation_scheme=scheme, weight_block_size=(block[0], block[1]))


class _Reader:
    """Typed access to a config dict; every error names the field."""

    def __init__(self, raw: dict[str, Any], prefix: str = "") -> None:
        self.raw = raw
        self.prefix = prefix

    def _get(self, key: str, required: bool, default: Any) -> Any:
        if key not in self.raw or self.raw[key] is None:
            if required and default is None:
                raise ValueError(f"config field {self.prefix}{key} is missing")
            return default
        return self.raw[key]

    def get_int(self, key: str, default: int | None = None, required: bool = True, minimum: int = 1) -> int:
        v = self._get(key, required, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"config field {self.prefix}{key} must be an integer >= {minimum}, got {v!r}")
        return v

    def get_opt_int(self, key: str) -> int | None:
        v = self.raw.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"config field {self.prefix}{key} must be a positive integer or null, got {v!r}")
        return v

    def get_float(self, key: str, default: float | None = None) -> float:
        v = self._get(key, True, default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"config field {self.prefix}{key} must be a number, got {v!r}")
        return float(v)

    def get_bool(self, key: str, default: bool) -> bool:
        v = self._get(key, False, default)
        if not isinstance(v, bool):
            raise ValueError(f"config field {self.prefix}{key} must be true or false, got {v!r}")
        return v

    def get_choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        v = self._get(key, False, default)
        if v not in options:
            raise ValueError(f"config field {self.prefix}{key}={v!r} is not supported; expected one of {options}")
        return str(v)


@dataclass(frozen=True)
class ParallelConfig:
    """Where this process sits among the ranks. Only tp_size == 1 is built so far."""

    tp_rank: int = 0
    tp_size: int = 1
    ep_size: int = 1  # experts split over ep_size ranks (ep_rank == tp_rank); 1 means no EP
    dp_size: int = 1  # DP attention groups; attention runs on all heads per group when > 1

    @property
    def ep_rank(self) -> int:
        return self.tp_rank % self.ep_size

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank={self.tp_rank} must be in 0..tp_size-1={self.tp_size - 1}")
        if self.tp_size % self.ep_size or self.tp_size % self.dp_size:
            raise ValueError(f"tp_size={self.tp_size} must be divisible by ep_size and dp_size")
