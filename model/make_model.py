"""`baleen make-model`: checkpoints in the released DeepSeek-V3 file layout, seeded random or the trained one.

A checkpoint is config.json, safetensors shards (+ model.safetensors.index.json when sharded), tokenizer.json,
tokenizer_config.json and generation_config.json, with the exact weight names of released V3 checkpoints.
Weights are generated tensor by tensor from a per-tensor seed and streamed into their files, so the whole
model is never in memory and the same seed always gives byte-identical files.

Preset `trained` writes the trained default model instead: its distinct weights ship in model/data/
(`trained-weights-*.safetensors`, BF16, written by model/train.py); the MTP layer's copies of the embedding and
the head are added here, and its FP8 variant comes from our block quantizer, so both layouts are rebuilt
deterministically from the same files. `default_model_path()` caches it for `baleen serve`; `tiny_model_path()`
caches the seeded random tiny model the tests run on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tqdm import tqdm

from baleen.kernels.quant import FP8_DTYPE, block_quant
from baleen.model.config import ModelConfig
from baleen.model.presets import preset as preset_config
from baleen.model.tokenizer_build import (
    CORPUS_FILES,
    build_tokenizer,
    data_dir,
    default_chat_template,
    write_tokenizer,
)

# Bump when the files make_model writes change, so cached default models are rebuilt.
FORMAT_VERSION = 2
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' "5GB"
# The embedded default model is split into a few shards, so every engine test loads through the index.
DEFAULT_MODEL_SHARD_BYTES = 2 * 2**20
# The trained model's distinct weights, in model/data/ (each file under the 16 MiB a device run returns).
TRAINED_PREFIX = "trained-"
TRAINED_SHARD_BYTES = 12 * 2**20

_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    FP8_DTYPE: "F8_E4M3",
}
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint: its name, shape, stored dtype and how its values are drawn."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    init: str  # "embed" | "norm" | "linear" | "out" | "gate" | "bias" | "head" | "scale"
    source: str  # the name its seeded values come from (MTP copies of embed/head share the main ones)
    live_rows: int | None = None  # head only: rows past the tokenizer's vocabulary get tiny logits

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def checkpoint_tensors(cfg: ModelConfig, fp8: bool, live_vocab: int | None = None) -> list[TensorSpec]:
    """Every tensor of a checkpoint for cfg, in file order, named exactly as released V3 checkpoints.

    live_vocab: the tokenizer's size; lm_head rows past it are damped so that, like a trained model, the
    random one rarely emits ids the tokenizer cannot decode.
    """
    dt = _TORCH_DTYPES.get(cfg.torch_dtype)
    if dt is None:
        raise ValueError(
            f"torch_dtype={cfg.torch_dtype!r} is not supported; use one of {sorted(_TORCH_DTYPES)}"
        )
    block = (cfg.quant.weight_block_size if cfg.quant else (128, 128)) if fp8 else None
    specs: list[TensorSpec] = []

    def add(
        name: str, shape: tuple[int, ...], init: str, source: str | None = None, dtype: torch.dtype = dt
    ) -> None:
        rows = live_vocab if init == "head" else None
        specs.append(TensorSpec(name, shape, dtype, init, source or name, rows))

    def proj(name: str, out_dim: int, in_dim: int, init: str = "linear") -> None:
        # attention / MLP / expert projections: FP8 + block scales in an FP8 checkpoint, as V3 ships them
        if block is None:
            add(name, (out_dim, in_dim), init)
            return
        add(name, (out_dim, in_dim), init, dtype=FP8_DTYPE)
        scales = (-(-out_dim // block[0]), -(-in_dim // block[1]))
        add(f"{name}_scale_inv", scales, "scale", source=name, dtype=torch.float32)

    h, heads = cfg.hidden_size, cfg.num_attention_heads
    add("model.embed_tokens.weight", (cfg.vocab_size, h), "embed")
    for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        p = f"model.layers.{i}"
        if i >= cfg.num_hidden_layers:  # MTP module: its own norms/projection, copies of embed and head
            add(f"{p}.embed_tokens.weight", (cfg.vocab_size, h), "embed", source="model.embed_tokens.weight")
            add(f"{p}.enorm.weight", (h,), "norm")
            add(f"{p}.hnorm.weight", (h,), "norm")
            add(f"{p}.eh_proj.weight", (h, 2 * h), "linear")
            add(f"{p}.shared_head.norm.weight", (h,), "norm")
            add(f"{p}.shared_head.head.weight", (cfg.vocab_size, h), "head", source="lm_head.weight")
        add(f"{p}.input_layernorm.weight", (h,), "norm")
        a = f"{p}.self_attn"
        if cfg.q_lora_rank is None:
            proj(f"{a}.q_proj.weight", heads * cfg.qk_head_dim, h)
        else:
            proj(f"{a}.q_a_proj.weight", cfg.q_lora_rank, h)
            add(f"{a}.q_a_layernorm.weight", (cfg.q_lora_rank,), "norm")
            proj(f"{a}.q_b_proj.weight", heads * cfg.qk_head_dim, cfg.q_lora_rank)
        proj(f"{a}.kv_a_proj_with_mqa.weight", cfg.kv_cache_dim, h)
        add(f"{a}.kv_a_layernorm.weight", (cfg.kv_lora_rank,), "norm")
        proj(f"{a}.kv_b_proj.weight", heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        proj(f"{a}.o_proj.weight", h, heads * cfg.v_head_dim, "out")
        add(f"{p}.post_attention_layernorm.weight", (h,), "norm")
        m = f"{p}.mlp"
        if not cfg.is_moe_layer(i):
            _mlp(proj, m, h, cfg.intermediate_size)
            continue
        assert cfg.n_routed_experts is not None
        add(f"{m}.gate.weight", (cfg.n_routed_experts, h), "gate")
        if cfg.topk_method == "noaux_tc":
            add(f"{m}.gate.e_score_correction_bias", (cfg.n_routed_experts,), "bias", dtype=torch.float32)
        for j in range(cfg.n_routed_experts):
            _mlp(proj, f"{m}.experts.{j}", h, cfg.moe_intermediate_size)
        if cfg.n_shared_experts:
            _mlp(proj, f"{m}.shared_experts", h, cfg.moe_intermediate_size * cfg.n_shared_experts)
    add("model.norm.weight", (h,), "norm")
    if not cfg.tie_word_embeddings:
        add("lm_head.weight", (cfg.vocab_size, h), "head")
    return specs


def _mlp(proj: Any, prefix: str, hidden: int, inter: int) -> None:
    proj(f"{prefix}.gate_proj.weight", inter, hidden)
    proj(f"{prefix}.up_proj.weight", inter, hidden)
    proj(f"{prefix}.down_proj.weight", hidden, inter, "out")


# ---- values ---------------------------------------------------------------------------------------------------
def _tensor_seed(seed: int, key: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed wants a non-negative int64


def _uniform(seed: int, key: str, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    # torch.rand draws from integer bits: the same seed gives the same floats on every CPU.
    g = torch.Generator().manual_seed(_tensor_seed(seed, key))
    return torch.rand(shape, generator=g, dtype=torch.float32) * (high - low) + low


# Standard deviations, chosen so a random model's forward stays finite and its greedy output varies:
# unit-variance embeddings, projections that keep the residual's scale (outputs a little smaller, as many
# of them add up), and an lm_head that gives logits a spread of a few units.
_OUT_GAIN = 0.5
_HEAD_GAIN = 3.0
_NORM_SPREAD = 0.2
_BIAS_SPREAD = 0.1
_DEAD_ROW_GAIN = 0.01


def dense_values(spec: TensorSpec, seed: int) -> torch.Tensor:
    """The float32 values of a (non-scale) tensor before it is cast or quantized for storage."""
    shape = spec.shape
    match spec.init:
        case "embed":
            bound = math.sqrt(3.0)
        case "norm":
            return _uniform(seed, spec.source, shape, 1.0 - _NORM_SPREAD, 1.0 + _NORM_SPREAD)
        case "bias":
            return _uniform(seed, spec.source, shape, -_BIAS_SPREAD, _BIAS_SPREAD)
        case "linear" | "gate":
            bound = math.sqrt(3.0 / shape[1])
        case "out":
            bound = _OUT_GAIN * math.sqrt(3.0 / shape[1])
        case "head":
            bound = _HEAD_GAIN * math.sqrt(3.0 / shape[1])
            w = _uniform(seed, spec.source, shape, -bound, bound)
            if spec.live_rows is not None:
                w[spec.live_rows :] *= _DEAD_ROW_GAIN  # [vocab - live_rows, hidden]
            return w
        case _:
            raise ValueError(f"tensor {spec.name} has no values of its own (init={spec.init!r})")
    return _uniform(seed, spec.source, shape, -bound, bound)


ValuesFn = Callable[[TensorSpec], torch.Tensor]


def _materialize(
    specs: list[TensorSpec], values: ValuesFn, block: tuple[int, int] | None
) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
    # Yields (spec, stored tensor); an FP8 weight is followed by its scale, both from one quantization.
    by_name = {s.name: s for s in specs}
    for spec in specs:
        if spec.init == "scale":
            continue
        dense = values(spec)
        if spec.dtype != FP8_DTYPE:
            yield spec, dense.to(spec.dtype)
            continue
        assert block is not None
        # Quantize the bf16-rounded weight, so the FP8 and BF16 checkpoints of one seed agree within e4m3.
        q, scale_inv = block_quant(dense.to(torch.bfloat16).float(), block)
        yield spec, q
        yield by_name[f"{spec.name}_scale_inv"], scale_inv


# ---- safetensors, streamed ------------------------------------------------------------------------------------
def _header(specs: list[TensorSpec]) -> tuple[bytes, dict[str, int]]:
    # Same layout as safetensors' own writer: widest dtypes first, then by name; header padded to 8 bytes
    # so every tensor is aligned to its item size.
    ordered = sorted(specs, key=lambda s: (-s.dtype.itemsize, s.name))
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets: dict[str, int] = {}
    pos = 0
    for s in ordered:
        meta[s.name] = {
            "dtype": _SAFETENSORS_DTYPES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [pos, pos + s.nbytes],
        }
        offsets[s.name] = pos
        pos += s.nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


def _write_bytes(f: BinaryIO, t: torch.Tensor) -> None:
    f.write(t.contiguous().view(torch.uint8).numpy().tobytes())


def write_safetensors(
    path: Path, specs: list[TensorSpec], tensors: Iterator[tuple[TensorSpec, torch.Tensor]]
) -> None:
    """Write the tensors (one at a time, any order) of `specs` into one safetensors file."""
    header, offsets = _header(specs)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(s.nbytes for s in specs))
        written = set()
        for spec, t in tensors:
            if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                raise RuntimeError(
                    f"{spec.name}: made {tuple(t.shape)} {t.dtype}, planned {spec.shape} {spec.dtype}"
                )
            f.seek(len(header) + offsets[spec.name])
            _write_bytes(f, t)
            written.add(spec.name)
    missing = {s.name for s in specs} - written
    if missing:
        raise RuntimeError(f"{path.name}: tensors never written: {sorted(missing)[:5]}")


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split specs, in order, into shards of at most max_shard_bytes (an FP8 weight stays with its scale)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    units: list[list[TensorSpec]] = []
    for s in specs:
        if s.init == "scale":
            units[-1].append(s)
        else:
            units.append([s])
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for unit in units:
        unit_bytes = sum(s.nbytes for s in unit)
        if shards[-1] and size + unit_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += unit_bytes
    return shards


# ---- the checkpoint -------------------------------------------------------------------------------------------
def generation_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json as DeepSeek-V3 ships it (its recommended sampling defaults)."""
    return {
        "_from_model_config": True,
        "bos_token_id": cfg["bos_token_id"],
        "do_sample": True,
        "eos_token_id": cfg["eos_token_id"],
        "temperature": 0.6,
        "top_p": 0.95,
        "transformers_version": cfg.get("transformers_version", "4.46.3"),
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_model(
    out_dir: str | Path,
    preset: str,
    *,
    fp8: bool | None = None,
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    config_overrides: dict[str, Any] | None = None,
    progress: bool = False,
) -> Path:
    """Write a seeded random checkpoint of `preset` into out_dir (created; must be empty) and return it.

    fp8=None keeps the preset's choice (tiny: BF16, v3-*: FP8). config_overrides replaces config.json fields
    (e.g. {"q_lora_rank": None}) before the weights are laid out.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} is not an empty directory; make-model writes a fresh checkpoint")
    raw = preset_config(preset, fp8=fp8)
    raw.update(config_overrides or {})
    cfg = ModelConfig.from_dict(raw)  # validates the overrides too
    values: ValuesFn
    if preset == "trained":
        if config_overrides:
            raise ValueError("the trained model's shape is fixed: config_overrides apply to random presets only")
        tok = Tokenizer.from_file(str(data_dir() / f"{TRAINED_PREFIX}tokenizer.json"))
        stored = load_trained_weights()
        values = lambda spec: stored[spec.source].float()
    else:
        tok = build_tokenizer()
        values = lambda spec: dense_values(spec, seed)
    if cfg.vocab_size < tok.get_vocab_size():
        raise ValueError(
            f"vocab_size={cfg.vocab_size} is smaller than the tokenizer's {tok.get_vocab_size()} tokens"
        )
    is_fp8 = cfg.quant is not None
    specs = checkpoint_tensors(cfg, is_fp8, live_vocab=tok.get_vocab_size())
    shards = plan_shards(specs, max_shard_bytes)
    block = cfg.quant.weight_block_size if cfg.quant else None

    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", dict(sorted(raw.items())))
    _write_json(out / "generation_config.json", generation_config(raw))
    write_tokenizer(out, model_max_length=min(cfg.max_position_embeddings, 16384), tokenizer=tok)
    bar = tqdm(total=len(specs), desc="writing weights", unit="tensor", disable=not progress)

    def tensors(shard: list[TensorSpec]) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        for item in _materialize(shard, values, block):
            bar.update(1)
            yield item

    with bar:
        if len(shards) == 1:
            write_safetensors(out / "model.safetensors", specs, tensors(specs))
            return out
        weight_map: dict[str, str] = {}
        for k, shard in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / fname, shard, tensors(shard))
            weight_map.update((s.name, fname) for s in shard)
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in specs)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    _write_json(out / "model.safetensors.index.json", index)
    return out


def _inputs_digest(files: list[Path]) -> str:
    # A cached model depends on its input files and the chat template as well as on this code.
    h = hashlib.sha256(str(FORMAT_VERSION).encode())
    for f in files:
        h.update(f.read_bytes())
    h.update((default_chat_template() or "").encode())
    return h.hexdigest()[:10]


# ---- the trained model's files ----------------------------------------------------------------------------------
def trained_weight_files() -> list[Path]:
    """The shipped shards of the trained model's distinct weights, in order."""
    files = sorted(data_dir().glob(f"{TRAINED_PREFIX}weights-*.safetensors"))
    if not files:
        raise ValueError(f"no {TRAINED_PREFIX}weights-*.safetensors in {data_dir()}: the trained model is missing")
    return files


def load_trained_weights() -> dict[str, torch.Tensor]:
    """Every distinct tensor of the trained model by its released name (MTP copies of embed/head not included)."""
    out: dict[str, torch.Tensor] = {}
    for f in trained_weight_files():
        out.update(load_file(f))
    return out


def save_trained_weights(
    out_dir: str | Path, tensors: dict[str, torch.Tensor], cfg: ModelConfig | None = None
) -> list[Path]:
    """Write a trained model's distinct tensors (float, by released name) as the shards model/data/ ships."""
    cfg = cfg or ModelConfig.from_dict(preset_config("trained"))
    specs = [s for s in checkpoint_tensors(cfg, fp8=False) if s.source == s.name]
    missing = sorted({s.name for s in specs} - set(tensors))
    extra = sorted(set(tensors) - {s.name for s in specs})
    if missing or extra:
        raise ValueError(f"trained tensors do not match the preset: missing {missing[:4]}, unexpected {extra[:4]}")
    shards = plan_shards(specs, TRAINED_SHARD_BYTES)
    paths = []
    for k, shard in enumerate(shards, start=1):
        path = Path(out_dir) / f"{TRAINED_PREFIX}weights-{k}-of-{len(shards)}.safetensors"
        write_safetensors(path, shard, ((s, tensors[s.name].to(s.dtype)) for s in shard))
        paths.append(path)
    return paths


def default_cache_dir() -> Path:
    """Where generated models are cached: $XDG_CACHE_HOME/baleen/models (or ~/.cache/baleen/models)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "baleen" / "models"


def default_model_path(cache_dir: str | Path | None = None, *, fp8: bool = False) -> Path:
    """The embedded default model (the trained one, BF16 or block-FP8), built once into the cache and reused after."""
    files = [*trained_weight_files(), data_dir() / f"{TRAINED_PREFIX}tokenizer.json"]
    name = f"trained{'-fp8' if fp8 else ''}-v{FORMAT_VERSION}-{_inputs_digest(files)}"
    return _cached(cache_dir, name, lambda out: make_model(
        out, "trained", fp8=fp8, max_shard_bytes=DEFAULT_MODEL_SHARD_BYTES))


def tiny_model_path(cache_dir: str | Path | None = None) -> Path:
    """The seeded random tiny model the tests run on (preset tiny, seed 0), cached like the default model."""
    name = f"tiny-v{FORMAT_VERSION}-{_inputs_digest([data_dir() / n for n in CORPUS_FILES])}"
    return _cached(cache_dir, name, lambda out: make_model(out, "tiny", seed=0,
                                                            max_shard_bytes=DEFAULT_MODEL_SHARD_BYTES))


def _cached(cache_dir: str | Path | None, name: str, build: Callable[[Path], Path]) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / name
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: readers never see a half-written model, and when two
    # processes race, the loser's rename fails and it uses the winner's identical copy.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def dummy_checkpoint(preset_name: str) -> Iterator[Path]:
    """A temporary folder holding a preset's config.json and the tiny model's tokenizer, for load_format="dummy"
    (benchmarks of a shape, e.g. v3-shape): ids past the tokenizer's vocabulary decode to nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "config.json").write_text(json.dumps(preset_config(preset_name)))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_model_path() / name, out / name)
        yield out


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2MiB', '1e9' or a plain byte count -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
    s = text.strip().upper()
    num = s.rstrip("KMGTIB")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise ValueError(f"size {text!r} is not understood; write e.g. 5GB, 500MB, 2MiB or a byte count")
    return int(value * units[unit])
