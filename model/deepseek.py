"""DeepSeek-V3 (and V2) in PyTorch over a flat token batch: MLA (model/mla.py) with a paged latent cache, MoE, MTP.

Submodule names are the checkpoint keys (`model.layers.{i}.self_attn.kv_b_proj.weight`, ...), except the
routed experts, which are stacked (`mlp.experts.w13` / `w2`, see moe.py) and loaded expert by expert.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from baleen.kernels.activation import silu_and_mul, silu_and_mul_ref
from baleen.model.attention import AttentionBackend
from baleen.model.batch import ForwardBatch
from baleen.model.config import ModelConfig, ParallelConfig
from baleen.model.kernel_choice import KernelChoice, KernelModule, choose_kernels
from baleen.model.kv_cache import KVCache
from baleen.model.layers import (
    ColumnParallelLinear,
    Fp8BlockLinearMethod,
    FusedLinear,
    LinearBase,
    LinearMethod,
    ParallelLMHead,
    ReplicatedLinear,
    RMSNorm,
    RowParallelLinear,
    TensorSource,
    UnquantizedLinearMethod,
    VocabParallelEmbedding,
    fuse_linears,
    get_weight_loader,
    make_linear_method,
)
from baleen.model.mla import DeepseekV3Attention, StepContext, make_mla_policy, step_context
from baleen.model.moe import ExpertsFactory, MoEExperts, MoEGate
from baleen.model.parallel import MlpExchange, ParallelGroups, make_exchange
from baleen.model.rotary import RotaryEmbedding

SCALE_SUFFIX = "_scale_inv"
_EXPERT_RE = re.compile(
    r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$"
)
# Checkpoint entries that are not weights (old checkpoints carry the rotary inverse frequencies).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---- modules ------------------------------------------------------------------------------------------
class DeepseekV3MLP(KernelModule):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)); with reduce_results=False each rank returns its partial sum.

    `fused=False` keeps the torch SwiGLU on CUDA too (KernelChoice.glue).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        parallel: ParallelConfig,
        method: LinearMethod,
        reduce_results: bool = True,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, method, parallel)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, method, parallel)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, method, parallel, reduce_results)
        self.gate_up: FusedLinear | None = None  # gate_proj and up_proj as one GEMM, after post_load()
        self.fused = fused
        self.bind_kernels()

    def bind_kernels(self) -> None:
        # [T, 2 * intermediate] -> [T, intermediate]: one launch where the weights are on CUDA
        self.silu_and_mul = silu_and_mul if self.fused and self.down_proj.weight.is_cuda else silu_and_mul_ref

    def post_load(self) -> None:
        """Fuse gate_proj and up_proj into one GEMM (their weights become views of the fused one)."""
        if self.gate_up is None:  # a MoE layer may have fused its shared expert into an expert slot already
            self.gate_up = fuse_linears([self.gate_proj, self.up_proj])

    def decode_linears(self) -> list[LinearBase | FusedLinear]:
        """The linears this MLP runs (after post_load())."""
        first: list[LinearBase | FusedLinear] = [self.gate_up] if self.gate_up is not None else [self.gate_proj, self.up_proj]
        return [*first, self.down_proj]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.silu_and_mul(self.gate_up.joint(x)))  # [T, 2 * intermediate] -> [T, intermediate]


class DeepseekV3MoE(nn.Module):
    """Routed experts (top-k of n_routed_experts) plus always-on shared experts; returns this rank's partial sum.

    Every rank routes every token it is given; it computes its experts (EP) or its slice of every expert's
    intermediate dim (TP). Dispatch is implicit (all ranks hold the tokens) and the combine is the layer's
    exchange: an all-reduce, or with DP attention a reduce-scatter back to each DP group.

    When the experts method can (the fused MoE) and the shared expert has a routed expert's shape on this
    rank (one shared expert, no EP), its weights live in one more expert slot: up to FUSED_SHARED_MAX_TOKENS
    tokens (decode) it runs as a ninth expert of weight 1 inside the MoE launches, saving its own GEMMs,
    quantizations and activation launches; larger batches (prefill) run it as its own MLP, whose weights
    are views of that slot.
    """

    FUSED_SHARED_MAX_TOKENS = 256

    def __init__(
        self,
        config: ModelConfig,
        parallel: ParallelConfig,
        dtype: torch.dtype,
        method: LinearMethod,
        kernels: KernelChoice,
        experts_method: ExpertsFactory | None = None,
    ) -> None:
        super().__init__()
        assert config.n_routed_experts is not None
        self.parallel = parallel
        self.gate = MoEGate(config, dtype, kernels)
        block = None if config.quant is None else config.quant.weight_block_size
        fuse_shared = (
            config.n_shared_experts == 1
            and parallel.ep_size == 1
            and getattr(experts_method, "fuses_shared_expert", False)
        )
        self.experts = MoEExperts(
            config.n_routed_experts,
            config.hidden_size,
            config.moe_intermediate_size,
            parallel,
            dtype,
            block,
            experts_method,
            shared_slot=fuse_shared,
        )
        self.shared_experts: DeepseekV3MLP | None = None
        if config.n_shared_experts:
            width = config.n_shared_experts * config.moe_intermediate_size
            self.shared_experts = DeepseekV3MLP(
                config.hidden_size, width, parallel, method, reduce_results=False, fused=kernels.glue
            )
        self.fused_shared = False  # set by post_load() once the shared expert sits in its expert slot

    def post_load(self) -> None:
        """Copy the shared expert into its expert slot; its own linears become views of that slot."""
        ex, shared, slot = self.experts, self.shared_experts, self.experts.shared_slot
        if shared is None or slot is None or self.fused_shared:
            return  # (again: the shared linears already are views of the slot, so the slot is up to date)
        rows = shared.gate_proj.weight.shape[0] + shared.up_proj.weight.shape[0]
        if ex.w13.shape[1:] != (rows, shared.gate_proj.weight.shape[1]) or ex.w2.shape[1:] != shared.down_proj.weight.shape:
            return  # this rank's shared-expert shard is not a routed expert's shape: it stays its own MLP
        w13_scale = None if ex.w13_weight_scale_inv is None else ex.w13_weight_scale_inv.data[slot]
        w2_scale = None if ex.w2_weight_scale_inv is None else ex.w2_weight_scale_inv.data[slot]
        shared.gate_up = fuse_linears([shared.gate_proj, shared.up_proj], into=(ex.w13.data[slot], w13_scale))
        if shared.gate_up is None:
            return  # the shapes do not stack (e.g. an FP8 block straddles gate and up): keep it separate
        down = shared.down_proj
        ex.w2.data[slot].copy_(down.weight.data)
        down.weight.data = ex.w2.data[slot]
        if w2_scale is not None:
            w2_scale.copy_(down.weight_scale_inv.data)
            down.weight_scale_inv.data = w2_scale
        self.fused_shared = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_shared and x.shape[0] <= self.FUSED_SHARED_MAX_TOKENS:
            topk_weights, topk_ids = self.gate(x, shared_id=self.experts.shared_slot)  # [T, k + 1]
            return self.experts(x, topk_ids, topk_weights)
        topk_weights, topk_ids = self.gate(x)
        out = self.experts(x, topk_ids, topk_weights)  # [T, H], this rank's partial sum
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DeepseekV3DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)); the MLP/MoE runs over all ranks.

    `exchange` moves tokens around the MLP block: nothing to do but an all-reduce under plain TP; under DP
    attention a gather of every DP group's tokens before it and a reduce-scatter after (model/parallel.py).
    """

    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        groups: ParallelGroups,
        dtype: torch.dtype,
        kernels: KernelChoice,
        experts_method: ExpertsFactory | None = None,
    ) -> None:
        super().__init__()
        method = make_linear_method(config.quant, dtype)
        parallel = groups.parallel
        self.self_attn = DeepseekV3Attention(
            config, layer_id, groups.attn_parallel, dtype, method, kernels, groups.attn
        )
        self.mlp: DeepseekV3MLP | DeepseekV3MoE
        # MTP layers (layer_id >= num_hidden_layers) follow the same rule: V3's is an MoE block.
        if config.is_moe_layer(layer_id):
            self.mlp = DeepseekV3MoE(config, parallel, dtype, method, kernels, experts_method)
        else:
            self.mlp = DeepseekV3MLP(
                config.hidden_size, config.intermediate_size, parallel, method, reduce_results=False,
                fused=kernels.glue,
            )
        self.exchange: MlpExchange = make_exchange(groups)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, kernels.glue)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, kernels.glue)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp_out, residual) such that the block's output is mlp_out + residual.

        The sum is left to the next norm, which fuses it (`RMSNorm.add_norm`); residual is None on the first
        layer, where x is the embedding itself.
        """
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_norm(x, residual)  # [T, H], this rank's tokens
        y, residual = self.post_attention_layernorm.add_norm(self.self_attn(h, ctx), residual)
        y = self.exchange.gather(y, ctx.dp_num_tokens)  # [T or all, H]
        return self.exchange.combine(self.mlp(y), ctx.dp_num_tokens), residual


def make_embedding(config: ModelConfig, groups: ParallelGroups, dtype: torch.dtype) -> VocabParallelEmbedding:
    """Vocab split over the ranks that share tokens: all TP ranks, or one DP group (whole when attn TP is 1)."""
    return VocabParallelEmbedding(config.vocab_size, config.hidden_size, groups.attn_parallel, dtype, groups.attn)


def make_lm_head(config: ModelConfig, groups: ParallelGroups, dtype: torch.dtype) -> ParallelLMHead:
    """Like the embedding: under DP attention each DP group computes its own logits, no cross-DP gather."""
    return ParallelLMHead(config.vocab_size, config.hidden_size, groups.attn_parallel, dtype, groups.attn)


class DeepseekV3Model(nn.Module):
    """Embedding, decoder layers, final norm."""

    def __init__(
        self,
        config: ModelConfig,
        groups: ParallelGroups,
        dtype: torch.dtype,
        kernels: KernelChoice,
        experts_method: ExpertsFactory | None = None,
    ) -> None:
        super().__init__()
        self.embed_tokens = make_embedding(config, groups, dtype)
        self.layers = nn.ModuleList(
            DeepseekV3DecoderLayer(config, i, groups, dtype, kernels, experts_method)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, kernels.glue)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        h = self.embed_tokens(ctx.batch.input_ids)  # [T, H]
        residual: torch.Tensor | None = None
        for layer in self.layers:
            h, residual = layer(h, residual, ctx)
        return self.norm.add_norm(h, residual)[0] if residual is not None else self.norm(h)


def make_rotary(config: ModelConfig) -> RotaryEmbedding:
    """The rotary embedding of the config's rope dims and scaling."""
    return RotaryEmbedding(config.qk_rope_head_dim, config.max_position_embeddings, config.rope)


def load_named(
    module: nn.Module, weights: Iterable[tuple[str, TensorSource]], rename: dict[str, str] | None = None
) -> set[str]:
    """Load checkpoint tensors into `module`'s parameters by name; stacked experts are routed per expert.

    Returns the names of the parameters filled (stacked experts as `...experts.w13[5].up_proj`). Raises a
    ValueError naming the tensor for an unknown name or a wrong shape.
    """
    params = dict(module.named_parameters())
    modules = dict(module.named_modules())
    loaded: set[str] = set()
    for ckpt_name, tensor in weights:
        name = ckpt_name
        for old, new in (rename or {}).items():
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        try:
            m = _EXPERT_RE.match(name)
            if m is not None and isinstance(modules.get(m.group(1)), MoEExperts):
                experts = modules[m.group(1)]
                assert isinstance(experts, MoEExperts)
                expert_id, proj, kind = int(m.group(2)), m.group(3), m.group(4)
                if expert_id >= experts.num_experts:
                    raise ValueError(f"is expert {expert_id} but the model has {experts.num_experts}")
                if experts.is_local(expert_id):
                    target = experts.load_expert(expert_id, proj, kind == "weight_scale_inv", tensor)
                    loaded.add(f"{m.group(1)}.{target}[{expert_id}].{proj}")
                continue  # another EP rank's expert
            if name not in params:
                raise ValueError("is not a parameter of this model (an unexpected tensor in the checkpoint)")
            param = params[name]
            get_weight_loader(param)(param, tensor)
            loaded.add(name)
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} {e}") from e
    return loaded


def _checkpoint_shape(owner: nn.Module, pname: str, param: nn.Parameter) -> list[int]:
    # The FULL shape the checkpoint stores (parameters of sharded layers hold one rank's slice).
    if isinstance(owner, LinearBase):
        if pname == "weight":
            return [owner.out_features, owner.in_features]
        if owner.block_size is not None:
            bn, bk = owner.block_size
            return [-(-owner.out_features // bn), -(-owner.in_features // bk)]
    if isinstance(owner, VocabParallelEmbedding):
        return [owner.vocab_size, owner.hidden_size]
    return list(param.shape)


def _expert_shape(ex: MoEExperts, proj: str, is_scale: bool) -> list[int]:
    shape = (
        [ex.hidden_size, ex.intermediate_size]
        if proj == "down_proj"
        else [ex.intermediate_size, ex.hidden_size]
    )
    if is_scale and ex.block_size is not None:
        shape = [-(-shape[0] // ex.block_size[0]), -(-shape[1] // ex.block_size[1])]
    return shape


def _same_name(name: str) -> str:
    return name


def missing_weights(
    module: nn.Module, loaded: set[str], checkpoint_name: Callable[[str], str] = _same_name
) -> list[str]:
    """Checkpoint names, with their expected full shapes, of parameters that `loaded` does not cover."""
    missing: list[str] = []
    modules = dict(module.named_modules())
    for name, param in module.named_parameters():
        owner_name, _, pname = name.rpartition(".")
        owner = modules[owner_name]
        if isinstance(owner, MoEExperts):
            projs = ("gate_proj", "up_proj") if pname.startswith("w13") else ("down_proj",)
            is_scale = pname.endswith(SCALE_SUFFIX)
            suffix = "weight_scale_inv" if is_scale else "weight"
            for j in range(owner.expert_start, owner.expert_start + owner.num_local_experts):
                for proj in projs:
                    if f"{owner_name}.{pname}[{j}].{proj}" not in loaded:
                        shape = _expert_shape(owner, proj, is_scale)
                        ckpt_name = checkpoint_name(f"{owner_name}.{j}.{proj}.{suffix}")
                        missing.append(f"{ckpt_name} (expected shape {shape})")
        elif name not in loaded:
            shape = _checkpoint_shape(owner, pname, param)
            missing.append(f"{checkpoint_name(name)} (expected shape {shape})")
    return missing


def check_complete(
    module: nn.Module, loaded: set[str], checkpoint_name: Callable[[str], str] = _same_name
) -> None:
    """Raise a ValueError listing the parameters no checkpoint tensor filled."""
    missing = missing_weights(module, loaded, checkpoint_name)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"the checkpoint is missing {len(missing)} tensor(s): {shown}")


def post_load_all(module: nn.Module) -> None:
    """Run every attention, MLP and MoE layer's post_load() (absorbed-MLA matrices, fused GEMMs, shared-expert slots)."""
    for m in module.modules():  # pre-order: a MoE layer places its shared expert before that MLP's turn
        if isinstance(m, (DeepseekV3Attention, DeepseekV3MLP, DeepseekV3MoE)):
            m.post_load()


def tile_decode_weights(module: nn.Module) -> int:
    """Give every FP8 linear that decode runs a tiled copy of its weight for the few-token GEMM
    (`Fp8BlockLinearMethod.tile_weight`): attention's q_a + kv_a, q_b and o_proj, and the dense MLPs and shared
    experts, unless a shared expert runs inside the fused MoE at decode. Call after post_load(); returns the
    bytes added."""
    inside_moe = {id(m.shared_experts) for m in module.modules() if isinstance(m, DeepseekV3MoE) and m.fused_shared}
    added = 0
    for m in module.modules():
        if isinstance(m, (DeepseekV3Attention, DeepseekV3MLP)) and id(m) not in inside_moe:
            for linear in m.decode_linears():
                if isinstance(linear.method, Fp8BlockLinearMethod):
                    added += linear.method.tile_weight(linear)
    return added


def _groups(parallel: ParallelConfig, groups: ParallelGroups | None) -> ParallelGroups:
    if groups is None:
        return ParallelGroups.default(parallel)
    if groups.parallel != parallel:
        raise ValueError(f"the process groups were made for {groups.parallel}, not {parallel}")
    return groups


class DeepseekV3ForCausalLM(nn.Module):
    """The whole model: `forward(batch, kv_cache, attn)` -> final hidden [T, H]; `compute_logits`.

    `experts_method` builds each MoE layer's experts method from its stacked weights (default: TorchExperts).
    `groups` are the process groups of `parallel` (default: the default group, enough without DP attention).
    `kernels` says which fused kernels the shapes allow on CUDA (default: `choose_kernels(config, parallel)`).
    """

    def __init__(
        self,
        config: ModelConfig,
        parallel: ParallelConfig = ParallelConfig(),
        dtype: torch.dtype = torch.bfloat16,
        mla_mode: str = "auto",
        experts_method: ExpertsFactory | None = None,
        groups: ParallelGroups | None = None,
        kernels: KernelChoice | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.parallel = parallel
        self.groups = _groups(parallel, groups)
        self.dtype = dtype
        self.mla_policy = make_mla_policy(mla_mode)
        self.rotary = make_rotary(config)
        kernels = kernels or choose_kernels(config, parallel)
        self.model = DeepseekV3Model(config, self.groups, dtype, kernels, experts_method)
        self.lm_head = make_lm_head(config, self.groups, dtype)

    def forward(self, batch: ForwardBatch, kv_cache: KVCache, attn: AttentionBackend) -> torch.Tensor:
        """Run every layer over the flat batch; returns the normed hidden states [num_tokens, H]."""
        return self.model(step_context(self.rotary, self.mla_policy, batch, kv_cache, attn))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, H] -> logits [n, vocab] float32."""
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, TensorSource]]) -> set[str]:
        """Load main-model checkpoint tensors (the MTP layer's are not accepted here); returns params filled."""
        loaded = load_named(self, weights)
        if self.config.tie_word_embeddings and "lm_head.weight" not in loaded:
            self.lm_head.weight = self.model.embed_tokens.weight
            loaded.add("lm_head.weight")
        return loaded

    def post_load(self) -> None:
        """Derive the absorbed-MLA matrices; call once after load_weights."""
        post_load_all(self)


class SharedHead(nn.Module):
    """The MTP layer's own final norm and output projection."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups, dtype: torch.dtype, kernels: KernelChoice) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, kernels.glue)
        self.head = make_lm_head(config, groups, dtype)


class DeepseekMTP(nn.Module):
    """The NextN layer `model.layers.{L}`: h = block(eh_proj([enorm(embed(next_ids)); hnorm(h_prev)])).

    Its checkpoint tensors live under `model.layers.{L}.`; the block's own (`self_attn.*`, `mlp.*`, the two
    layernorms) sit directly under that prefix. It caches its latents in KV-cache layer L.
    """

    def __init__(
        self,
        config: ModelConfig,
        parallel: ParallelConfig = ParallelConfig(),
        dtype: torch.dtype = torch.bfloat16,
        mla_mode: str = "auto",
        experts_method: ExpertsFactory | None = None,
        groups: ParallelGroups | None = None,
        kernels: KernelChoice | None = None,
    ) -> None:
        super().__init__()
        layer_id = config.num_hidden_layers
        groups = _groups(parallel, groups)
        self.config = config
        self.layer_id = layer_id
        self.prefix = f"model.layers.{layer_id}."
        self.mla_policy = make_mla_policy(mla_mode)
        self.rotary = make_rotary(config)
        kernels = kernels or choose_kernels(config, parallel)
        self.embed_tokens = make_embedding(config, groups, dtype)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, kernels.glue)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, kernels.glue)
        # NOTE: V3 keeps eh_proj in bf16 even in FP8 checkpoints.
        self.eh_proj = ReplicatedLinear(
            2 * config.hidden_size, config.hidden_size, UnquantizedLinearMethod(dtype), parallel
        )
        self.block = DeepseekV3DecoderLayer(config, layer_id, groups, dtype, kernels, experts_method)
        self.shared_head = SharedHead(config, groups, dtype, kernels)

    def share_embedding(self, embed: VocabParallelEmbedding) -> None:
        """Use the main model's embedding (checkpoints that omit `model.layers.{L}.embed_tokens.weight`)."""
        self.embed_tokens = embed

    def share_head(self, head: ParallelLMHead) -> None:
        """Use the main model's output head (checkpoints that omit `model.layers.{L}.shared_head.head.weight`)."""
        self.shared_head.head = head

    def forward(
        self, batch: ForwardBatch, hidden_prev: torch.Tensor, kv_cache: KVCache, attn: AttentionBackend
    ) -> torch.Tensor:
        """batch.input_ids are the NEXT tokens; hidden_prev [T, H] the main model's output at the same rows.

        Returns hidden [T, H] after shared_head.norm.
        """
        ctx = step_context(self.rotary, self.mla_policy, batch, kv_cache, attn)
        e = self.enorm(self.embed_tokens(batch.input_ids))
        h = self.eh_proj(torch.cat([e, self.hnorm(hidden_prev)], dim=-1))  # [T, H]
        out, residual = self.block(h, None, ctx)
        return self.shared_head.norm.add_norm(out, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, H] -> logits [n, vocab] float32."""
        return self.shared_head.head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, TensorSource]]) -> set[str]:
        """Load `model.layers.{L}.*` tensors; returns the parameters filled (names relative to this module)."""
        p = self.prefix
        rename = {p + k: k for k in ("embed_tokens.", "enorm.", "hnorm.", "eh_proj.", "shared_head.")}
        rename[p] = "block."
        return load_named(self, weights, rename)

    def checkpoint_name(self, name: str) -> str:
        """This module's parameter name -> the checkpoint's (`block.mlp.gate.weight` -> `model.layers.L.mlp...`)."""
        return self.prefix + name.removeprefix("block.")

    def post_load(self) -> None:
        """Derive the absorbed-MLA matrices; call once after load_weights."""
        post_load_all(self)
