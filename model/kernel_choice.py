"""Kernel or reference: which fused CUDA kernels a model's shapes allow (chosen once, when the model is built), and
which one a module runs (chosen once per device, never per call) (habit 9).

Each kernel has limits its pure-torch reference does not (power-of-two widths, a 128-column FP8 block, block-
aligned TP shards). `choose_kernels` checks a model's shapes against them; where a kernel cannot take a layer's
shape, that layer runs its reference instead and `KernelChoice.fallbacks` says so in one line naming the layer,
the config field and the limit (the loader logs each once). The modules get the choice at construction; each
`KernelModule` then binds the callable it runs from where its weights are (`bind_kernels`): the kernel the
choice allows on CUDA, the reference elsewhere (CPU, meta), again whenever its parameters move.
The MLA decode kernel is the attention backend's: `triton_decode_unsupported` says why the Triton backend
cannot serve a model, and the engine picks the torch backend or raises (actors/engine_config.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import torch
from torch import nn

from baleen.kernels.fp8_gemm import fp8_gemm_unsupported
from baleen.kernels.fp8_gemv import fp8_gemv_unsupported
from baleen.kernels.fused_moe import fused_moe_unsupported
from baleen.kernels.mla_decode import mla_decode_unsupported
from baleen.kernels.mla_prep import mla_prep_unsupported
from baleen.kernels.moe_route import moe_route_unsupported
from baleen.model.config import ModelConfig, ParallelConfig


@dataclass(frozen=True)
class KernelChoice:
    """Per kernel, True where the CUDA path may run it; `fallbacks` explains every False that costs speed."""

    mla_prep: bool = True  # latent norm + rotary + cache write in one launch (else `mla_prep_ref`)
    moe_route: bool = True  # V3 routing in one launch (else the torch selection)
    fp8_weights: bool = True  # FP8 linears and experts stay FP8 (else dequantized at load, as on CPU)
    fp8_absorb: bool = True  # absorbed decode multiplies by the FP8 W_UK / W_UV blocks (else dense copies)
    # The rest of the decode glue: RMSNorm (+ residual, + FP8 quantization), SwiGLU, the router's float32-output GEMM.
    # No kernel here has a backward: training (model/train.py) turns every field off.
    glue: bool = True
    fallbacks: tuple[str, ...] = ()


class KernelModule(nn.Module, ABC):
    """A module that runs fused CUDA kernels where its weights are on CUDA and their torch references elsewhere.

    `bind_kernels` makes the choice from the device its parameters are on and keeps the callables its forward
    runs: call it at the end of `__init__` (parameters on meta or CPU: the references); it runs again after every
    move (`.to()`, `.cuda()`, `Module._apply`; `materialize` in model/layers.py), so forward never asks.
    """

    @abstractmethod
    def bind_kernels(self) -> None:
        """Choose kernel or reference for the device this module's parameters are on now."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        super()._apply(fn, recurse)  # children first: a module may read its children's parameters
        self.bind_kernels()
        return self


def _fp8_limit(config: ModelConfig, parallel: ParallelConfig) -> str | None:
    """Why FP8 weights cannot stay FP8 on the GPU (the GEMMs, the fused MoE, block-aligned TP shards), or None."""
    assert config.quant is not None
    block = config.quant.weight_block_size
    why = fp8_gemm_unsupported(block)
    if why is not None:
        return f"quantization_config.{why}"
    bn, bk = block
    c = config
    attn_tp = parallel.tp_size // parallel.dp_size
    heads = c.num_attention_heads // attn_tp
    # (what, its size on one rank, whether it is split, rows (column split) or columns (row split))
    shards: list[tuple[str, int, bool, bool]] = [
        (f"q_b_proj: {heads} heads x qk_head_dim {c.qk_head_dim}", heads * c.qk_head_dim, attn_tp > 1, True),
        (f"kv_b_proj: {heads} heads x (qk_nope_head_dim + v_head_dim) {c.qk_nope_head_dim + c.v_head_dim}",
         heads * (c.qk_nope_head_dim + c.v_head_dim), attn_tp > 1, True),
        (f"o_proj: {heads} heads x v_head_dim {c.v_head_dim}", heads * c.v_head_dim, attn_tp > 1, False),
    ]  # fmt: skip
    tp = parallel.tp_size
    if any(not c.is_moe_layer(i) for i in range(c.num_hidden_layers)):
        for rows in (True, False):
            shards.append((f"the dense MLP's intermediate_size {c.intermediate_size} / --tp {tp}",
                           c.intermediate_size // tp, tp > 1, rows))  # fmt: skip
    if c.n_routed_experts is not None:
        moe_tp = tp // parallel.ep_size
        inter = c.moe_intermediate_size // moe_tp
        why = fused_moe_unsupported(inter, block)
        if why is not None:
            return f"the routed experts' moe_intermediate_size {c.moe_intermediate_size} / {moe_tp} ranks: {why}"
        shards.append((f"the routed experts' moe_intermediate_size {c.moe_intermediate_size} / {moe_tp} ranks",
                       inter, moe_tp > 1, False))  # fmt: skip
        if c.n_shared_experts:
            width = c.n_shared_experts * c.moe_intermediate_size
            for rows in (True, False):
                shards.append((f"the shared experts' n_shared_experts x moe_intermediate_size {width} / --tp {tp}",
                               width // tp, tp > 1, rows))  # fmt: skip
    for what, size, split, rows in shards:
        unit = bn if rows else bk
        if split and size % unit:
            side = "rows" if rows else "columns"
            return f"{what} = {size} {side} a rank, not a multiple of the weight block's {unit} {side}"
    return None


def _absorb_limit(config: ModelConfig) -> str | None:
    """Why absorbed decode cannot multiply by the FP8 blocks of kv_b_proj (W_UK^T and W_UV), or None."""
    assert config.quant is not None
    bn, bk = config.quant.weight_block_size
    c = config
    for name, size in (("qk_nope_head_dim", c.qk_nope_head_dim), ("v_head_dim", c.v_head_dim)):
        if size % bn:
            return f"{name}={size} is not a multiple of the weight block's {bn} rows (blocks straddle heads)"
    # W_UK^T [H, kv_lora_rank, nope] in (bk, bn) blocks reads K = nope; W_UV [H, v, kv_lora_rank] K = kv_lora_rank.
    for name, k, block in (("qk_nope_head_dim", c.qk_nope_head_dim, (bk, bn)), ("kv_lora_rank", c.kv_lora_rank, (bn, bk))):
        why = fp8_gemv_unsupported(1, k, block)
        if why is not None:
            return f"{name}={k}: {why}"
    return None


def choose_kernels(config: ModelConfig, parallel: ParallelConfig = ParallelConfig()) -> KernelChoice:
    """Check the model's shapes (on this rank layout) against each kernel's limits; see `KernelChoice`."""
    c = config
    fallbacks: list[str] = []
    fields = f"kv_lora_rank={c.kv_lora_rank}, qk_rope_head_dim={c.qk_rope_head_dim}"
    why = mla_prep_unsupported(c.kv_lora_rank, c.qk_rope_head_dim)
    if why is not None:
        fallbacks.append(f"MLA prep (self_attn, {fields}): the fused kernel's limit: {why}; running mla_prep_ref")
    route = c.n_routed_experts is not None and c.topk_method == "noaux_tc" and c.scoring_func == "sigmoid"
    route_why = moe_route_unsupported(c.n_routed_experts, c.n_group) if c.n_routed_experts is not None else None
    if route and route_why is not None:
        fallbacks.append(f"MoE routing (mlp.gate, n_routed_experts={c.n_routed_experts}, n_group={c.n_group}): the "
                         f"fused kernel's limit: {route_why}; routing in torch")  # fmt: skip
    fp8_why = _fp8_limit(c, parallel) if c.quant is not None else None
    if fp8_why is not None:
        fallbacks.append(f"FP8 linears and experts: {fp8_why}; their weights are dequantized at load (more memory)")
    absorb_why = _absorb_limit(c) if c.quant is not None and fp8_why is None else None
    if absorb_why is not None:
        fallbacks.append(f"FP8 absorbed decode (self_attn W_UK / W_UV): {absorb_why}; multiplying by dense copies")
    return KernelChoice(
        mla_prep=why is None,
        moe_route=route and route_why is None,
        fp8_weights=fp8_why is None,
        fp8_absorb=c.quant is not None and fp8_why is None and absorb_why is None,
        fallbacks=tuple(fallbacks),
    )


def triton_decode_unsupported(config: ModelConfig) -> str | None:
    """Why the Triton attention backend's MLA decode kernel cannot serve this model, naming the fields, or None.

    No reference stands in for it inside that backend (its decode runs under CUDA graphs): the torch backend,
    without CUDA graphs, serves any shape."""
    why = mla_decode_unsupported(config.kv_lora_rank, config.qk_rope_head_dim)
    if why is None:
        return None
    return (f"kv_lora_rank={config.kv_lora_rank}, qk_rope_head_dim={config.qk_rope_head_dim}: the Triton MLA decode "
            f"kernel's limit: {why}")  # fmt: skip
