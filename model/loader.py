"""Build the model on the meta device, then fill it tensor by tensor from mmap'd safetensors (or randomly).

`load_model(path, config, ...)` returns the `DeepseekV3ForCausalLM`; with `with_mtp=True` it returns a
`LoadedModel(model, mtp)` instead, where `mtp` is None when the config has no NextN layer or the checkpoint
holds none of its weights.

FP8 checkpoints (e4m3 weights with a float32 `weight_scale_inv` per block): on CUDA the FP8 linear method
keeps them as they are; elsewhere, or where the FP8 kernels cannot take the model's shapes
(model/kernel_choice.py), each weight is dequantized into the compute dtype as it is read, and the model is
built without quantization.

Tensors reach the weight loaders as lazy `TensorSource`s over safetensors' `get_slice`: a rank reads only
the rows and columns of its shard (and nothing of another EP rank's experts), never whole tensors.

KV-cache scales: a checkpoint quantized for an FP8 KV cache may carry per-layer scalars named
`model.layers.N.self_attn.{k_scale,v_scale,kv_scale}` (also under `self_attn.attn.`, as some quantizers write
them). They are not parameters: `load_model` skips them and `read_kv_scales` returns one scale per cache layer.
MLA caches one latent that is both key and value, so a layer's scale is the largest of its named scales (no
value the quantizer saw saturates); a layer without one gets 1.0.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from baleen.kernels.quant import FP8_MAX, block_dequant
from baleen.model.config import ModelConfig, ParallelConfig
from baleen.model.deepseek import (
    SCALE_SUFFIX,
    DeepseekMTP,
    DeepseekV3ForCausalLM,
    check_complete,
    tile_decode_weights,
)
from baleen.model.kernel_choice import choose_kernels
from baleen.model.layers import TensorSource, materialize
from baleen.model.moe import ExpertsFactory
from baleen.model.parallel import ParallelGroups

log = logging.getLogger("baleen.loader")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass
class LoadedModel:
    """The main model and, when asked for and present, the MTP (NextN) layer."""

    model: DeepseekV3ForCausalLM
    mtp: DeepseekMTP | None


CHECKPOINT_FILES = ("model.safetensors.index.json", "model.safetensors")  # what `Checkpoint` reads, one of


class Checkpoint:
    """The tensors of a checkpoint directory: one `model.safetensors` or the shards of its index, mmap'd."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        index, single = (path / name for name in CHECKPOINT_FILES)
        self.files: dict[str, Path] = {}  # tensor name -> file
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self.files = {name: path / f for name, f in weight_map.items()}
        elif single.exists():
            with safe_open(single, framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise ValueError(f"no model.safetensors or model.safetensors.index.json in {path}")
        self._open: dict[Path, Any] = {}
        self.num_bytes_read = 0  # what the slices handed out have read so far

    @property
    def names(self) -> list[str]:
        return sorted(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _file(self, name: str) -> Any:
        file = self.files[name]
        if file not in self._open:
            if not file.exists():
                raise ValueError(f"checkpoint tensor {name!r} is listed in {file.name}, which does not exist")
            self._open[file] = safe_open(file, framework="pt")
        return self._open[file]

    def get(self, name: str) -> torch.Tensor:
        """One whole tensor, read from the mmap'd file (no other tensor is materialised)."""
        return self._file(name).get_tensor(name)

    def source(self, name: str) -> SliceSource:
        """One tensor, not read yet: indexing the result reads just that slice."""
        return SliceSource(self, self._file(name).get_slice(name))

    def close(self) -> None:
        self._open.clear()

    def num_elements(self) -> int:
        """Elements of all its tensors (FP8 weights' scales included), from the safetensors headers alone."""
        return sum(math.prod(self._file(name).get_slice(name).get_shape()) for name in self.files)

    def weights(
        self,
        names: list[str],
        dequantize: bool,
        block: tuple[int, int],
        dtype: torch.dtype,
        progress: tqdm | None = None,
    ) -> Iterator[tuple[str, TensorSource]]:
        """(name, lazy tensor) for each name; with `dequantize`, FP8 weights read dense, scales consumed."""
        for name in names:
            if progress is not None:
                progress.update(1)
            if dequantize and name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in self:
                continue  # consumed with its weight
            tensor: TensorSource = self.source(name)
            if dequantize and name + SCALE_SUFFIX in self:
                tensor = DequantSource(name, self.source(name), self.source(name + SCALE_SUFFIX), block, dtype)
            elif dequantize and tensor.dtype == torch.float8_e4m3fn:
                raise ValueError(f"checkpoint tensor {name!r} is FP8 but has no {name + SCALE_SUFFIX!r}")
            yield name, tensor


def _ranges(index: Any, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """A basic index (Ellipsis, slices, a tuple of them) -> [start, stop) per dimension."""
    parts = list(index) if isinstance(index, tuple) else [index]
    if parts and parts[-1] is Ellipsis:
        parts.pop()
    if len(parts) > len(shape) or not all(isinstance(p, slice) and p.step in (None, 1) for p in parts):
        raise TypeError(f"a lazy checkpoint tensor takes contiguous slices only, got {index!r}")
    parts += [slice(None)] * (len(shape) - len(parts))
    return [p.indices(n)[:2] for p, n in zip(parts, shape)]


class SliceSource:
    """One safetensors tensor, not read yet; `src[a:b, c:d]` reads only that slice of the mmap'd file."""

    def __init__(self, checkpoint: Checkpoint, safe_slice: Any) -> None:
        self._checkpoint = checkpoint
        self._slice = safe_slice
        self.shape = tuple(safe_slice.get_shape())
        self.dtype = _SAFETENSORS_DTYPES[safe_slice.get_dtype()]

    def __getitem__(self, index: Any) -> torch.Tensor:
        tensor: torch.Tensor = self._slice[index]
        self._checkpoint.num_bytes_read += tensor.numel() * tensor.element_size()
        return tensor


class DequantSource:
    """An FP8 weight read dense: each slice reads the blocks that cover it and their scales, dequantized."""

    def __init__(
        self, name: str, weight: SliceSource, scale: SliceSource, block: tuple[int, int], dtype: torch.dtype
    ) -> None:
        self.name = name
        self.weight = weight
        self.scale = scale
        self.block = block
        self.shape = weight.shape
        self.dtype = dtype

    def __getitem__(self, index: Any) -> torch.Tensor:
        if len(self.shape) != 2:
            raise ValueError(f"checkpoint tensor {self.name!r} has a scale but is not a 2-D weight")
        (r0, r1), (c0, c1) = _ranges(index, self.shape)
        (n, k), (bn, bk) = self.shape, self.block
        # Widen to whole blocks (edge blocks may be partial), dequantize, then cut the slice asked for.
        rb0, rb1, cb0, cb1 = r0 // bn, -(-r1 // bn), c0 // bk, -(-c1 // bk)
        w = self.weight[rb0 * bn : min(rb1 * bn, n), cb0 * bk : min(cb1 * bk, k)]
        want = (-(-n // bn), -(-k // bk))
        if tuple(self.scale.shape) != want:
            raise ValueError(
                f"checkpoint tensor {self.name + SCALE_SUFFIX!r}: weight_scale_inv has shape "
                f"{tuple(self.scale.shape)}, expected {want} for a {n}x{k} weight"
            )
        dense = block_dequant(w, self.scale[rb0:rb1, cb0:cb1], self.block, self.dtype)
        return dense[r0 - rb0 * bn : r1 - rb0 * bn, c0 - cb0 * bk : c1 - cb0 * bk]


class ZeroPadded:
    """A checkpoint tensor seen at a larger shape (`ModelConfig.padded_for_tp`): what lies past its own extent in
    any dimension reads as zeros."""

    def __init__(self, name: str, source: TensorSource, shape: tuple[int, ...]) -> None:
        if len(shape) != len(source.shape) or any(s < n for s, n in zip(shape, source.shape)):
            raise ValueError(f"checkpoint tensor {name!r} of shape {tuple(source.shape)} cannot be padded to {shape}")
        self.source = source
        self.shape = shape
        self.dtype = source.dtype

    def __getitem__(self, index: Any) -> torch.Tensor:
        ranges = _ranges(index, self.shape)
        out = torch.zeros([b - a for a, b in ranges], dtype=self.dtype)
        real = [(a, min(b, n)) for (a, b), n in zip(ranges, self.source.shape)]
        if all(b > a for a, b in real):
            out[tuple(slice(0, b - a) for a, b in real)] = self.source[tuple(slice(a, b) for a, b in real)]
        return out


# checkpoint name -> (the dimension padded, the `TpPadding` size it is a multiple of)
_TP_PADDED = (
    (re.compile(r".*\.self_attn\.(q_b_proj|q_proj|kv_b_proj)\.weight"), 0, "num_attention_heads"),
    (re.compile(r".*\.self_attn\.o_proj\.weight"), 1, "num_attention_heads"),
    (re.compile(r".*\.mlp\.(gate_proj|up_proj)\.weight"), 0, "intermediate_size"),
    (re.compile(r".*\.mlp\.down_proj\.weight"), 1, "intermediate_size"),
    (re.compile(r".*\.mlp\.(experts\.\d+|shared_experts)\.(gate_proj|up_proj)\.weight"), 0, "moe_intermediate_size"),
    (re.compile(r".*\.mlp\.(experts\.\d+|shared_experts)\.down_proj\.weight"), 1, "moe_intermediate_size"),
)


def pad_weights(weights: Iterable[tuple[str, TensorSource]], config: ModelConfig) -> Iterator[tuple[str, TensorSource]]:
    """The checkpoint's tensors at the shapes of a model padded for uneven TP (`ModelConfig.padded_for_tp`): heads
    appended after the last one (the projections are head-major), intermediate rows / columns after the last; the
    rest unchanged. Every padded dimension is a whole number of its units (a head's rows, a shared expert's width)."""
    padded_from = config.tp_padded_from
    for name, tensor in weights:
        if padded_from is not None:
            for pattern, dim, field_name in _TP_PADDED:
                if not pattern.fullmatch(name):
                    continue
                orig, new = getattr(padded_from, field_name), getattr(config, field_name)
                size = tensor.shape[dim]
                if size % orig:
                    raise ValueError(f"checkpoint tensor {name!r}: dimension {dim} of {tuple(tensor.shape)} is not a "
                                     f"multiple of {field_name}={orig}")
                if orig != new:
                    shape = list(tensor.shape)
                    shape[dim] = size // orig * new
                    tensor = ZeroPadded(name, tensor, tuple(shape))
                break
        yield name, tensor


_KV_SCALE_RE = re.compile(r"model\.layers\.(\d+)\.self_attn\.(?:attn\.)?(?:k_scale|v_scale|kv_scale)")


def read_kv_scales(path: str | Path, num_layers: int) -> list[float] | None:
    """One FP8 KV-cache scale per cache layer (0 .. num_layers - 1; the MTP layer's index is num_hidden_layers)
    from the checkpoint's `*.self_attn.{k,v,kv}_scale` scalars, the largest where a layer has several, 1.0 where
    it has none; None when the checkpoint has none at all. ValueError naming a tensor that is not a finite
    positive scalar."""
    ckpt = Checkpoint(path)
    try:
        found: dict[int, float] = {}
        for name in ckpt.names:
            m = _KV_SCALE_RE.fullmatch(name)
            if m is None or int(m.group(1)) >= num_layers:
                continue
            value = ckpt.get(name).to(torch.float32)
            if value.numel() != 1 or not 0.0 < float(value) < math.inf:
                raise ValueError(f"checkpoint tensor {name!r} must be one finite positive KV-cache scale, got "
                                 f"{value.flatten()[:4].tolist()}")  # fmt: skip
            layer = int(m.group(1))
            found[layer] = max(found.get(layer, 0.0), float(value))
    finally:
        ckpt.close()
    return [found.get(i, 1.0) for i in range(num_layers)] if found else None


def _mtp_prefix(config: ModelConfig) -> str:
    return f"model.layers.{config.num_hidden_layers}."


def _is_mtp_name(name: str, config: ModelConfig) -> bool:
    # Layers past the decoder stack are NextN layers (V3 has one, at index num_hidden_layers).
    parts = name.split(".")
    return (
        len(parts) > 2
        and parts[:2] == ["model", "layers"]
        and parts[2].isdigit()
        and int(parts[2]) >= config.num_hidden_layers
    )


@overload
def load_model(
    path: str | Path | None,
    config: ModelConfig,
    *,
    parallel: ParallelConfig = ...,
    device: torch.device | str = ...,
    dtype: torch.dtype = ...,
    load_format: str = ...,
    seed: int = ...,
    mla_mode: str = ...,
    with_mtp: Literal[False] = ...,
    progress: bool = ...,
    experts_method: ExpertsFactory | None = ...,
    groups: ParallelGroups | None = ...,
    tile_fp8: bool = ...,
) -> DeepseekV3ForCausalLM: ...


@overload
def load_model(
    path: str | Path | None,
    config: ModelConfig,
    *,
    parallel: ParallelConfig = ...,
    device: torch.device | str = ...,
    dtype: torch.dtype = ...,
    load_format: str = ...,
    seed: int = ...,
    mla_mode: str = ...,
    with_mtp: Literal[True],
    progress: bool = ...,
    experts_method: ExpertsFactory | None = ...,
    groups: ParallelGroups | None = ...,
    tile_fp8: bool = ...,
) -> LoadedModel: ...


@overload
def load_model(
    path: str | Path | None,
    config: ModelConfig,
    *,
    parallel: ParallelConfig = ...,
    device: torch.device | str = ...,
    dtype: torch.dtype = ...,
    load_format: str = ...,
    seed: int = ...,
    mla_mode: str = ...,
    with_mtp: bool,
    progress: bool = ...,
    experts_method: ExpertsFactory | None = ...,
    groups: ParallelGroups | None = ...,
    tile_fp8: bool = ...,
) -> DeepseekV3ForCausalLM | LoadedModel: ...


def load_model(
    path: str | Path | None,
    config: ModelConfig,
    *,
    parallel: ParallelConfig = ParallelConfig(),
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    load_format: str = "auto",
    seed: int = 0,
    mla_mode: str = "auto",
    with_mtp: bool = False,
    progress: bool = True,
    experts_method: ExpertsFactory | None = None,
    groups: ParallelGroups | None = None,
    tile_fp8: bool = False,
) -> DeepseekV3ForCausalLM | LoadedModel:
    """Build on meta, materialise on `device`, load (or randomise) the weights, run post_load().

    `progress` shows a tqdm bar; `experts_method` picks how MoE layers compute (default TorchExperts);
    `groups` are the rank's process groups (default: the default group, see DeepseekV3ForCausalLM);
    `tile_fp8` gives the FP8 linears that decode runs a tiled copy of their weights (`tile_decode_weights`:
    faster GEMMs at 2-64 tokens for as much memory again as those weights).
    """
    _check_load_format(load_format)
    if config.is_nextn_export:
        raise ValueError(f"{path} holds an MTP (NextN) layer alone, not a model to serve: give it as "
                         "--speculative-draft-model-path beside its target model")
    device = torch.device(device)
    kernels = choose_kernels(config, parallel)
    if device.type == "cuda" and parallel.tp_rank == 0:
        for line in kernels.fallbacks:  # the CPU path runs the references anyway: nothing to say there
            log.warning("%s", line)
    # NOTE: FP8 weights stay FP8 only where the block-FP8 kernels run them (CUDA, shapes they take); elsewhere
    # they are dequantized.
    model_config = config if device.type == "cuda" and kernels.fp8_weights else config.with_(quant=None)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(model_config, parallel, dtype, mla_mode, experts_method, groups, kernels)
    mtp: DeepseekMTP | None = None
    if load_format == "dummy":
        if with_mtp and config.has_mtp:
            with torch.device("meta"):
                mtp = DeepseekMTP(model_config, parallel, dtype, mla_mode, experts_method, groups, kernels)
        for module in (model, mtp):
            if module is not None:
                materialize(module, device)
                init_dummy_weights(module, seed)
    else:
        if path is None:
            raise ValueError(
                f"load_format={load_format!r} needs a checkpoint path (or use load_format='dummy')"
            )
        ckpt = Checkpoint(path)
        try:
            names = [n for n in ckpt.names if _KV_SCALE_RE.fullmatch(n) is None]  # KV scales: read_kv_scales
            mtp_names = [n for n in names if _is_mtp_name(n, config)]
            main_names = [n for n in names if not _is_mtp_name(n, config)]
            if with_mtp and config.has_mtp and mtp_names:
                with torch.device("meta"):
                    mtp = DeepseekMTP(model_config, parallel, dtype, mla_mode, experts_method, groups, kernels)
            bar = tqdm(
                total=len(main_names) + (len(mtp_names) if mtp else 0),
                desc="loading weights",
                disable=not progress,
            )
            dequant = model_config.quant is None and config.quant is not None
            block = config.quant.weight_block_size if config.quant is not None else (128, 128)
            materialize(model, device)
            loaded = model.load_weights(pad_weights(ckpt.weights(main_names, dequant, block, dtype, bar), config))
            check_complete(model, loaded)
            if mtp is not None:
                _fill_mtp(mtp, ckpt, _mtp_prefix(config), model, device, dequant, block, dtype, bar)
            bar.close()
            log.info("read %.2f GiB of the checkpoint's tensors", ckpt.num_bytes_read / 2**30)
        finally:
            ckpt.close()
    model.post_load()
    if mtp is not None:
        mtp.post_load()
    if tile_fp8 and device.type == "cuda":
        added = sum(tile_decode_weights(m) for m in (model, mtp) if m is not None)
        log.info("tiled copies of the decode FP8 weights: %.2f GiB", added / 2**30)
    if with_mtp:
        return LoadedModel(model, mtp)
    return model


def _check_load_format(load_format: str) -> None:
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"load_format={load_format!r} is not supported; use 'auto', 'safetensors' or 'dummy'")


def _fill_mtp(mtp: DeepseekMTP, ckpt: Checkpoint, prefix: str, target: DeepseekV3ForCausalLM, device: torch.device,
              dequant: bool, block: tuple[int, int], dtype: torch.dtype, bar: tqdm | None) -> None:
    """Materialise `mtp` (on meta) and load the checkpoint's `{prefix}*` tensors into it as its own
    `model.layers.{L}.*`; an embedding or output head the checkpoint does not hold is the target's."""
    names = [n for n in ckpt.names if n.startswith(prefix) and _KV_SCALE_RE.fullmatch(n) is None]
    shared = [name for name in ("embed_tokens.weight", "shared_head.head.weight") if prefix + name not in ckpt]
    if "embed_tokens.weight" in shared:
        mtp.share_embedding(target.model.embed_tokens)
    if "shared_head.head.weight" in shared:
        mtp.share_head(target.lm_head)
    materialize(mtp, device)
    weights = pad_weights(ckpt.weights(names, dequant, block, dtype, bar), mtp.config)
    loaded = mtp.load_weights((mtp.prefix + name.removeprefix(prefix), t) for name, t in weights)
    loaded.update(shared)
    check_complete(mtp, loaded, lambda name: prefix + mtp.checkpoint_name(name).removeprefix(mtp.prefix))


def load_mtp(
    path: str | Path | None,
    config: ModelConfig,
    target: DeepseekV3ForCausalLM,
    *,
    parallel: ParallelConfig = ParallelConfig(),
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    load_format: str = "auto",
    seed: int = 0,
    mla_mode: str = "auto",
    progress: bool = True,
    experts_method: ExpertsFactory | None = None,
    groups: ParallelGroups | None = None,
    tile_fp8: bool = False,
) -> DeepseekMTP:
    """The MTP (NextN) layer of the checkpoint at `path` alone, for the target model `target` (built from
    `config`): a draft model (--speculative-draft-model-path). Nothing of that checkpoint's main model is read.

    The checkpoint is either SGLang's NextN export (architectures [DeepseekV3ForCausalLMNextN], the layer as
    `model.layers.0.*`, without embedding or head) or a whole DeepSeek checkpoint (its `model.layers.{its L}.*`).
    The layer is built with the target's layer index, so it caches its latents in the target's KV-cache layer L;
    its attention shapes and vocabulary must be the target's. An embedding or head the checkpoint lacks is the
    target's (V3's MTP layer shares both). `load_format="dummy"`: seeded random weights of the draft's shapes.
    """
    _check_load_format(load_format)
    if path is None:
        raise ValueError("load_mtp needs the draft checkpoint's path (its config.json gives the layer's shapes)")
    draft = ModelConfig.from_hf(path).padded_for_tp(parallel)  # as the target's (model/build.py)
    misfits = config.draft_misfits(draft)
    if misfits:
        raise ValueError(f"the draft model at {path} does not fit the target: {', '.join(misfits)}")
    prefix = "model.layers.0." if draft.is_nextn_export else f"model.layers.{draft.num_hidden_layers}."
    # The layer takes the target's index (its KV-cache layer and the MoE rule's layer id) and the draft's own shapes.
    layer_config = draft.with_(architecture=config.architecture, num_hidden_layers=config.num_hidden_layers,
                               num_nextn_predict_layers=1)
    device = torch.device(device)
    kernels = choose_kernels(layer_config, parallel)
    if not kernels.fp8_weights or device.type != "cuda":
        layer_config = layer_config.with_(quant=None)
    with torch.device("meta"):
        mtp = DeepseekMTP(layer_config, parallel, dtype, mla_mode, experts_method, groups, kernels)
    if load_format == "dummy":
        mtp.share_embedding(target.model.embed_tokens)
        mtp.share_head(target.lm_head)
        materialize(mtp, device)
        for own in (mtp.enorm, mtp.hnorm, mtp.eh_proj, mtp.block, mtp.shared_head.norm):  # not the target's
            init_dummy_weights(own, seed)
    else:
        ckpt = Checkpoint(path)
        try:
            if prefix + "eh_proj.weight" not in ckpt:
                raise ValueError(f"the draft model at {path} has no MTP layer: no {prefix}eh_proj.weight"
                                 + ("" if draft.is_nextn_export else " (num_nextn_predict_layers = "
                                    f"{draft.num_nextn_predict_layers})"))  # fmt: skip
            dequant = layer_config.quant is None and draft.quant is not None
            block = draft.quant.weight_block_size if draft.quant is not None else (128, 128)
            bar = tqdm(desc="loading the draft layer", disable=not progress)
            _fill_mtp(mtp, ckpt, prefix, target, device, dequant, block, dtype, bar)
            bar.close()
            log.info("draft layer: read %.2f GiB of %s", ckpt.num_bytes_read / 2**30, path)
        finally:
            ckpt.close()
    mtp.post_load()
    if tile_fp8 and device.type == "cuda":
        tile_decode_weights(mtp)
    return mtp


@torch.no_grad()
def init_dummy_weights(module: nn.Module, seed: int) -> None:
    """Seeded random weights on the parameters' device, scaled so activations stay finite layer after layer.

    Linear weights ~ N(0, 1/fan_in) keep each block's output near unit scale; norms are 1; FP8 weights get
    e4m3 values with one constant scale per block so their dequantized std is the same.
    """
    named = list(module.named_parameters())
    params = dict(named)
    for index, (name, param) in enumerate(named):
        if name.endswith(SCALE_SUFFIX):
            continue
        gen = torch.Generator(device=param.device)
        gen.manual_seed(seed * 1_000_003 + index)
        if param.dim() == 1:
            if name.endswith("e_score_correction_bias"):
                param.uniform_(0.0, 0.05, generator=gen)
            else:
                param.fill_(1.0)  # RMSNorm weights
            continue
        fan_in = param.shape[-1]
        if name.endswith("embed_tokens.weight"):
            std = 1.0
        else:
            std = 1.0 / math.sqrt(fan_in)
        if param.dtype != torch.float8_e4m3fn:
            param.normal_(0.0, std, generator=gen)
            continue
        # FP8: values ~ N(0, 1) * 64 clipped to e4m3, dequantized by a constant scale std / 64.
        # `x.weight` -> `x.weight_scale_inv`; stacked experts: `w13` -> `w13_weight_scale_inv`
        scale = params.get(name + SCALE_SUFFIX, params.get(name + "_weight" + SCALE_SUFFIX))
        if scale is None:
            raise ValueError(f"FP8 parameter {name} has no block scales")
        rows = param.view(-1, param.shape[-1])
        for chunk in rows.split(4096):
            dense = torch.randn(chunk.shape, generator=gen, device=param.device) * 64.0
            chunk.view(torch.uint8).copy_(
                dense.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
            )
        scale.fill_(std / 64.0)
