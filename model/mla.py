"""Multi-head latent attention (DeepSeek-V2/V3): the MLA module, which form runs (absorbed or expanded), and
the per-step context every layer shares (rotary angles, KV cache, attention backend).
"""

from __future__ import annotations

from typing import Protocol

import torch

from baleen.kernels.fp8_gemv import fp8_block_gemv_batched
from baleen.kernels.mla_prep import mla_prep, mla_prep_ref
from baleen.kernels.quant import block_dequant
from baleen.model.attention import AttentionBackend
from baleen.model.batch import ForwardBatch
from baleen.model.config import ModelConfig, ParallelConfig
from baleen.model.kernel_choice import KernelChoice, KernelModule
from baleen.model.kv_cache import KVCache
from baleen.model.layers import (
    ColumnParallelLinear,
    FusedLinear,
    LinearBase,
    LinearMethod,
    ReplicatedLinear,
    RMSNorm,
    RowParallelLinear,
    fuse_linears,
)
from baleen.model.parallel import Comm
from baleen.model.rotary import RotaryEmbedding


# ---- which MLA form runs -----------------------------------------------------------------------------
class MlaPolicy(Protocol):
    """Chooses absorbed (True) or expanded (False) attention for a batch."""

    def use_absorbed(self, batch: ForwardBatch) -> bool: ...


class AutoMla:
    """Expanded MHA for prefill without a cached prefix (cheaper there), absorbed MQA otherwise."""

    def use_absorbed(self, batch: ForwardBatch) -> bool:
        return batch.has_prefix


class AbsorbedMla:
    """Always the absorbed form."""

    def use_absorbed(self, batch: ForwardBatch) -> bool:
        return True


class ExpandedMla:
    """Always the expanded form (tests); a batch with a cached prefix cannot run it."""

    def use_absorbed(self, batch: ForwardBatch) -> bool:
        if batch.has_prefix:
            raise ValueError("mla_mode='expanded' cannot run a batch with a cached prefix; use 'auto'")
        return False


def make_mla_policy(mode: str) -> MlaPolicy:
    """'auto', 'absorbed' or 'expanded'."""
    policies: dict[str, MlaPolicy] = {"auto": AutoMla(), "absorbed": AbsorbedMla(), "expanded": ExpandedMla()}
    if mode not in policies:
        raise ValueError(f"mla_mode={mode!r} is not supported; expected one of {sorted(policies)}")
    return policies[mode]


class StepContext:
    """What every layer needs for one step: the batch, its rotary angles, the cache and the backend."""

    def __init__(
        self,
        batch: ForwardBatch,
        cos_sin: torch.Tensor,
        kv_cache: KVCache,
        attn: AttentionBackend,
        absorbed: bool,
    ) -> None:
        self.batch = batch
        self.cos_sin = cos_sin  # [T, 2, qk_rope_head_dim/2]
        self.kv_cache = kv_cache
        self.attn = attn
        self.absorbed = absorbed
        # DP attention: every DP rank's token count this step (the MLP gather/scatter shapes); else None
        self.dp_num_tokens = batch.dp_num_tokens


class DeepseekV3Attention(KernelModule):
    """Multi-head latent attention: the latent (kv_lora_rank) + shared rope key is all that is cached.

    Heads are split over the ranks `parallel` describes and `comm` sums o_proj over: all TP ranks, or with
    DP attention the ranks of this rank's DP group (just itself when tp_size == dp_size).
    """

    # Tokens up to which absorbed decode multiplies by the FP8 W_UK / W_UV blocks (the FP8 GEMV's regime).
    FP8_ABSORB_MAX_T = 1

    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        parallel: ParallelConfig,
        dtype: torch.dtype,
        method: LinearMethod,
        kernels: KernelChoice,
        comm: Comm | None = None,
    ) -> None:
        super().__init__()
        c = config
        if c.attention_bias:
            raise ValueError(
                "attention_bias=true is not supported (DeepSeek-V2/V3 checkpoints have no biases)"
            )
        if c.num_attention_heads % parallel.tp_size:
            raise ValueError(
                f"num_attention_heads={c.num_attention_heads} is not divisible by the {parallel.tp_size} ranks that "
                "split attention (tp_size, or tp_size / dp_size with DP attention)"
            )
        self.layer_id = layer_id
        self.num_heads = c.num_attention_heads // parallel.tp_size  # heads on this rank
        self.nope = c.qk_nope_head_dim
        self.rope = c.qk_rope_head_dim
        self.v_dim = c.v_head_dim
        self.rank = c.kv_lora_rank  # width of the cached latent before the rope part
        self.scale = c.softmax_scale
        self.dtype = dtype
        # What CUDA runs, chosen once from the shapes (model/kernel_choice.py); `prep` is what runs here (bind_kernels).
        self.cuda_prep = mla_prep if kernels.mla_prep else mla_prep_ref
        self.fp8_absorb = kernels.fp8_absorb
        q_out = c.num_attention_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(c.hidden_size, q_out, method, parallel)
        else:
            self.q_a_proj = ReplicatedLinear(c.hidden_size, c.q_lora_rank, method, parallel)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, dtype, kernels.glue)
            self.q_b_proj = ColumnParallelLinear(c.q_lora_rank, q_out, method, parallel)
        self.q_lora = c.q_lora_rank is not None
        self.kv_a_proj_with_mqa = ReplicatedLinear(c.hidden_size, c.kv_cache_dim, method, parallel)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps, dtype, kernels.glue)
        kv_b_out = c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim)
        self.kv_b_proj = ColumnParallelLinear(c.kv_lora_rank, kv_b_out, method, parallel)
        self.o_proj = RowParallelLinear(
            c.num_attention_heads * c.v_head_dim, c.hidden_size, method, parallel, comm=comm
        )
        # Filled by post_load(): kv_b_proj split into its key and value halves, per head.
        self.w_uk: torch.Tensor | None = None  # [H, nope, kv_lora_rank]
        self.w_uv: torch.Tensor | None = None  # [H, v_head_dim, kv_lora_rank]
        # With FP8 kv_b_proj on CUDA, decode at M = 1 multiplies by the e4m3 blocks themselves (half the bytes
        # of the bf16 copies): (weight, scales, block) of W_UK^T [H, rank, nope] (a transposed copy) and of
        # W_UV [H, v, rank] (views of kv_b_proj).
        self.w_uk_t_fp8: tuple[torch.Tensor, torch.Tensor, tuple[int, int]] | None = None
        self.w_uv_fp8: tuple[torch.Tensor, torch.Tensor, tuple[int, int]] | None = None
        # q_a_proj and kv_a_proj_with_mqa read the same x: one GEMM after post_load() when they can share it.
        self.qkv_a: FusedLinear | None = None
        self.bind_kernels()

    def bind_kernels(self) -> None:
        # latent norm + rotary + cache write: the fused launch where the weights are on CUDA, else the reference
        self.prep = self.cuda_prep if self.kv_a_layernorm.weight.is_cuda else mla_prep_ref

    def post_load(self) -> None:
        """Derive W_UK / W_UV from kv_b_proj (dequantized when FP8) for the absorbed form."""
        proj = self.kv_b_proj
        w: torch.Tensor = proj.weight
        if proj.block_size is not None:
            w = block_dequant(w, proj.weight_scale_inv, proj.block_size, self.dtype)
        w = w.to(self.dtype).view(self.num_heads, self.nope + self.v_dim, self.rank)
        self.w_uk = w[:, : self.nope].contiguous()
        self.w_uv = w[:, self.nope :].contiguous()
        block = proj.block_size
        if block is not None and proj.weight.is_cuda and self.fp8_absorb:
            bn, bk = block
            wq = proj.weight.view(self.num_heads, self.nope + self.v_dim, self.rank)
            sq = proj.weight_scale_inv.view(self.num_heads, (self.nope + self.v_dim) // bn, -1)
            self.w_uk_t_fp8 = (
                wq[:, : self.nope].transpose(1, 2).contiguous(),
                sq[:, : self.nope // bn].transpose(1, 2).contiguous(),
                (bk, bn),
            )
            self.w_uv_fp8 = (wq[:, self.nope :], sq[:, self.nope // bn :], block)
        if self.q_lora:
            self.qkv_a = fuse_linears([self.q_a_proj, self.kv_a_proj_with_mqa])

    def decode_linears(self) -> list[LinearBase | FusedLinear]:
        """The linears a decode step runs (after post_load()): kv_b_proj is not one, its absorbed halves are."""
        if self.qkv_a is not None:
            first: list[LinearBase | FusedLinear] = [self.qkv_a]
        else:
            first = [self.q_a_proj if self.q_lora else self.q_proj, self.kv_a_proj_with_mqa]
        return [*first, *([self.q_b_proj] if self.q_lora else []), self.o_proj]

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        num_tokens = x.shape[0]
        if num_tokens == 0:
            # An idle DP rank: it only joins the MLP collectives (its DP group's ranks all skip this).
            return x.new_zeros((0, self.o_proj.out_features))
        if self.qkv_a is not None:
            q_c, latent = self.qkv_a(x)  # [T, q_lora_rank], [T, kv_lora_rank + rope]
        else:
            q_c, latent = (self.q_a_proj(x) if self.q_lora else x), self.kv_a_proj_with_mqa(x)
        q = self.q_a_layernorm.then(self.q_b_proj, q_c) if self.q_lora else self.q_proj(q_c)
        q = q.view(num_tokens, self.num_heads, self.nope + self.rope)
        # Normalise c_kv, rotate k_pe and q_pe (in q, in place), write the cache row: one launch on CUDA.
        kv = None if ctx.absorbed else torch.empty_like(latent)  # the expanded form reads c_kv, k_pe back
        norm = self.kv_a_layernorm
        # An FP8 cache holds latent / kv_scale; kv (the expanded form's input) gets the cached row times kv_scale, so
        # a prefill attends to the (FP8-rounded) values every later step reads.
        kv_scale = ctx.kv_cache.scale(self.layer_id)
        self.prep(latent, norm.weight, norm.eps, q, ctx.cos_sin, ctx.batch.out_loc, ctx.kv_cache.layer(self.layer_id),
                  self.rope, kv, cache_scale=kv_scale)  # fmt: skip
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)  # [T, H, nope], [T, H, rope]
        if ctx.absorbed:
            if self.w_uk is None or self.w_uv is None:
                raise ValueError("absorbed MLA needs post_load() after the weights are loaded")
            uk, uv = self.w_uk_t_fp8, self.w_uv_fp8
            fp8 = (uk, uv) if uk is not None and uv is not None and num_tokens <= self.FP8_ABSORB_MAX_T else None
            # [T, H, kv_lora_rank]
            q_latent = (
                fp8_block_gemv_batched(q_nope, *fp8[0]) if fp8 else torch.einsum("thd,hdc->thc", q_nope, self.w_uk)
            )
            o_latent = ctx.attn.run_absorbed(q_latent, q_pe, ctx.kv_cache.layer(self.layer_id), self.scale,
                                             kv_scale=kv_scale)  # fmt: skip
            # [T, H, v_head_dim]
            o = fp8_block_gemv_batched(o_latent, *fp8[1]) if fp8 else torch.einsum("thc,hvc->thv", o_latent, self.w_uv)
        else:
            assert kv is not None
            c_kv, k_pe = kv.split([self.rank, self.rope], dim=-1)  # [T, kv_lora_rank], [T, rope]
            kv_up = self.kv_b_proj(c_kv).view(num_tokens, self.num_heads, self.nope + self.v_dim)
            k_nope, v = kv_up.split([self.nope, self.v_dim], dim=-1)
            k_pe_heads = k_pe.unsqueeze(1).expand(-1, self.num_heads, -1)  # one rope key shared by all heads
            k = torch.cat([k_nope, k_pe_heads], dim=-1)  # [T, H, nope + rope]
            o = ctx.attn.run_expanded(q, k, v.contiguous(), self.scale)  # q = [q_nope | rotated q_pe]
        return self.o_proj(o.reshape(num_tokens, self.num_heads * self.v_dim))


def step_context(
    rotary: RotaryEmbedding, policy: MlaPolicy, batch: ForwardBatch, kv_cache: KVCache, attn: AttentionBackend
) -> StepContext:
    """Per-step work shared by all layers: rotary angles of the batch's positions and the MLA form."""
    cos_sin = rotary.cos_sin(batch.positions, batch.max_seq_len)
    return StepContext(batch, cos_sin, kv_cache, attn, policy.use_absorbed(batch))
