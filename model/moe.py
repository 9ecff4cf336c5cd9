"""Mixture of experts: the router (gate), stacked expert weights, and the torch experts method.

Experts are stored stacked for the fused kernel: `w13` [num_local_experts, 2*I, H] holds each expert's
gate_proj rows then its up_proj rows, `w2` [num_local_experts, H, I] its down_proj. With FP8 weights the
block scales are stacked the same way: `w13_weight_scale_inv` [E, 2*ceil(I/bn), ceil(H/bk)] (gate blocks,
then up blocks) and `w2_weight_scale_inv` [E, ceil(H/bn), ceil(I/bk)].
Experts are addressed by global id; this rank owns ids expert_start .. expert_start + num_local_experts - 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from baleen.kernels.moe_route import route_noaux_tc
from baleen.kernels.quant import block_dequant
from baleen.model.config import ModelConfig, ParallelConfig
from baleen.model.kernel_choice import KernelChoice, KernelModule
from baleen.model.layers import TensorSource, check_shape, copy_into, new_param


# ---- routing -----------------------------------------------------------------------------------------
def select_experts(
    router_logits: torch.Tensor,
    *,
    top_k: int,
    scoring_func: str = "sigmoid",
    topk_method: str = "noaux_tc",
    n_group: int = 1,
    topk_group: int = 1,
    correction_bias: torch.Tensor | None = None,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] (float32) -> (topk_weights [T, k] float32, topk_ids [T, k] int32)."""
    num_tokens, num_experts = router_logits.shape
    if scoring_func == "sigmoid":
        scores = router_logits.sigmoid()
    elif scoring_func == "softmax":
        scores = router_logits.softmax(dim=-1)
    else:
        raise ValueError(f"scoring_func={scoring_func!r} is not supported (sigmoid or softmax)")
    choice = scores
    if topk_method == "noaux_tc":
        if correction_bias is None:
            raise ValueError("topk_method=noaux_tc needs e_score_correction_bias")
        # The bias steers which experts are picked; the weights still come from the unbiased scores.
        choice = scores + correction_bias.float()
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, n_group]
    elif topk_method == "group_limited_greedy":
        group_scores = choice.view(num_tokens, n_group, num_experts // n_group).amax(dim=-1)
    elif topk_method == "greedy":
        group_scores = None
    else:
        raise ValueError(f"topk_method={topk_method!r} is not supported")
    if group_scores is not None and topk_group < n_group:
        keep = group_scores.topk(topk_group, dim=-1).indices  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask.repeat_interleave(num_experts // n_group, dim=1)  # [T, E]
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    topk_ids = choice.topk(top_k, dim=-1).indices  # [T, k]
    weights = scores.gather(1, topk_ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, topk_ids.to(torch.int32)


class MoEGate(KernelModule):
    """The router: logits in float32 from `weight` [E, H], then `select_experts`."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, kernels: KernelChoice) -> None:
        super().__init__()
        assert config.n_routed_experts is not None and config.num_experts_per_tok is not None
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.weight = new_param((config.n_routed_experts, config.hidden_size), dtype)
        self.e_score_correction_bias: nn.Parameter | None = None
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = new_param((config.n_routed_experts,), torch.float32)
        # V3/R1 routing runs as one Triton launch on CUDA where its shapes allow (kernels/moe_route.py); other
        # schemes stay in torch.
        self.kernel_route = kernels.moe_route
        # NOTE: the out_dtype GEMM and the routing kernel have no backward: a gate being trained runs in torch.
        self.glue = kernels.glue
        self.bind_kernels()

    def bind_kernels(self) -> None:
        cuda = self.weight.is_cuda
        self.fp32_out_gemm = cuda and self.glue  # the logits of bf16 x and weight by a float32-output GEMM
        self.route = cuda and self.glue and self.kernel_route and self.e_score_correction_bias is not None

    def forward(self, x: torch.Tensor, shared_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_weights [T, k] float32, topk_ids [T, k] int32).

        With `shared_id`, one more column (shared_id, weight 1.0) per row: the shared expert as an extra expert.
        """
        c = self.config
        if self.fp32_out_gemm and x.dtype != torch.float32:
            # bf16 products are exact in float32: a float32-output GEMM equals the upcast one (up to summation order).
            logits = torch.mm(x, self.weight.t(), out_dtype=torch.float32)  # [T, E]
        else:
            logits = F.linear(x.float(), self.weight.float())  # [T, E]
        bias = self.e_score_correction_bias
        if self.route and bias is not None:
            return route_noaux_tc(
                logits, bias, self.top_k, c.n_group, c.topk_group, c.routed_scaling_factor, c.norm_topk_prob,
                shared_id,
            )
        weights, ids = select_experts(
            logits,
            top_k=self.top_k,
            scoring_func=c.scoring_func,
            topk_method=c.topk_method,
            n_group=c.n_group,
            topk_group=c.topk_group,
            correction_bias=self.e_score_correction_bias,
            norm_topk_prob=c.norm_topk_prob,
            routed_scaling_factor=c.routed_scaling_factor,
        )
        if shared_id is None:
            return weights, ids
        extra_w = torch.ones((x.shape[0], 1), dtype=weights.dtype, device=x.device)
        extra_id = torch.full((x.shape[0], 1), shared_id, dtype=ids.dtype, device=x.device)
        return torch.cat([weights, extra_w], dim=1), torch.cat([ids, extra_id], dim=1)


# ---- experts -----------------------------------------------------------------------------------------
class ExpertsMethod(Protocol):
    """How the routed experts are computed; the fused Triton method has the same signature.

    `fuses_shared_expert`: the method can also run the shared expert, stored as one more expert slot.
    """

    fuses_shared_expert: ClassVar[bool]

    def apply(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_ids [T, k] int32 (global ids), topk_weights [T, k] float32 -> [T, H]."""
        ...


ExpertsFactory = Callable[["MoEExperts"], ExpertsMethod]


class MoEExperts(nn.Module):
    """This rank's routed experts, stacked; the computation is delegated to an experts method.

    With `shared_slot`, the stacks hold one more expert after the local ones (index `num_local_experts`):
    the layer's shared expert, copied there after loading (`DeepseekV3MoE.post_load`) so that decode runs
    it inside the fused MoE launches.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        parallel: ParallelConfig,
        dtype: torch.dtype,
        block_size: tuple[int, int] | None = None,
        method: ExpertsFactory | None = None,
        shared_slot: bool = False,
    ) -> None:
        super().__init__()
        if num_experts % parallel.ep_size:
            raise ValueError(f"n_routed_experts={num_experts} is not divisible by ep_size={parallel.ep_size}")
        # Ranks that share an expert set split its intermediate dim (TP inside the MoE).
        moe_tp_size, moe_tp_rank = parallel.tp_size // parallel.ep_size, parallel.tp_rank // parallel.ep_size
        if intermediate_size % moe_tp_size:
            raise ValueError(
                f"moe_intermediate_size={intermediate_size} is not divisible by {moe_tp_size} ranks"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // parallel.ep_size
        self.expert_start = parallel.ep_rank * self.num_local_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.inter_local = intermediate_size // moe_tp_size
        self.inter_start = moe_tp_rank * self.inter_local
        self.block_size = block_size
        if shared_slot and parallel.ep_size > 1:
            raise ValueError("a shared-expert slot needs expert parallelism off (every rank holds every expert)")
        self.shared_slot: int | None = self.num_local_experts if shared_slot else None
        e, h, i = self.num_local_experts + int(shared_slot), hidden_size, self.inter_local
        weight_dtype = dtype if block_size is None else torch.float8_e4m3fn
        self.w13 = new_param((e, 2 * i, h), weight_dtype)  # gate rows, then up rows
        self.w2 = new_param((e, h, i), weight_dtype)
        self.w13_weight_scale_inv: nn.Parameter | None = None
        self.w2_weight_scale_inv: nn.Parameter | None = None
        if block_size is not None:
            bn, bk = block_size
            if i % bn or (moe_tp_size > 1 and i % bk):
                raise ValueError(
                    f"FP8 experts need moe_intermediate_size per rank ({i}) to be a multiple of the weight "
                    f"block {block_size}: gate and up blocks are stacked into one w13 scale tensor"
                )
            self.w13_weight_scale_inv = new_param((e, 2 * i // bn, -(-h // bk)), torch.float32)
            self.w2_weight_scale_inv = new_param((e, -(-h // bn), -(-i // bk)), torch.float32)
        self.method: ExpertsMethod = (method or TorchExperts)(self)

    def is_local(self, expert_id: int) -> bool:
        return self.expert_start <= expert_id < self.expert_start + self.num_local_experts

    def load_expert(self, expert_id: int, proj: str, is_scale: bool, loaded: TensorSource) -> str:
        """Copy this rank's slice of one checkpoint tensor (`{gate,up,down}_proj.weight[_scale_inv]`) into its slot.

        Returns the name of the stacked parameter it went to.
        """
        e = expert_id - self.expert_start
        h, i, i0, full_i = self.hidden_size, self.inter_local, self.inter_start, self.intermediate_size
        if is_scale:
            if self.block_size is None:
                raise ValueError("is an FP8 scale but the experts are not FP8")
            bn, bk = self.block_size
            if proj == "down_proj":
                check_shape(loaded, (-(-h // bn), -(-full_i // bk)))
                assert self.w2_weight_scale_inv is not None
                copy_into(self.w2_weight_scale_inv.data[e], loaded[:, i0 // bk : i0 // bk + -(-i // bk)])
                return "w2_weight_scale_inv"
            check_shape(loaded, (-(-full_i // bn), -(-h // bk)))
            assert self.w13_weight_scale_inv is not None
            rows = i // bn
            dst = (
                self.w13_weight_scale_inv.data[e, :rows]
                if proj == "gate_proj"
                else self.w13_weight_scale_inv.data[e, rows:]
            )
            copy_into(dst, loaded[i0 // bn : i0 // bn + rows])
            return "w13_weight_scale_inv"
        if proj == "down_proj":
            check_shape(loaded, (h, full_i))
            copy_into(self.w2.data[e], loaded[:, i0 : i0 + i])
            return "w2"
        check_shape(loaded, (full_i, h))
        dst = self.w13.data[e, :i] if proj == "gate_proj" else self.w13.data[e, i:]
        copy_into(dst, loaded[i0 : i0 + i])
        return "w13"

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Local expert e's (w13 [2I, H], w2 [H, I]) in `dtype`, dequantized when FP8."""
        if self.block_size is None:
            return self.w13[e], self.w2[e]
        assert self.w13_weight_scale_inv is not None and self.w2_weight_scale_inv is not None
        w13 = block_dequant(self.w13[e], self.w13_weight_scale_inv[e], self.block_size, dtype)
        w2 = block_dequant(self.w2[e], self.w2_weight_scale_inv[e], self.block_size, dtype)
        return w13, w2

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """This rank's share of the routed output [T, H] (experts it does not own contribute zero)."""
        return self.method.apply(x, topk_ids, topk_weights)


class TorchExperts:
    """Reference and CPU path: the (token, expert) pairs sorted by expert, one GEMM pair per expert, one scatter.

    On CPU the per-expert GEMMs are one grouped GEMM each (`F.grouped_mm`, offsets from the sorted pairs); FP8
    experts (dequantized one at a time) and other devices loop over the experts touched. Either way the outputs
    go back to their tokens in one `index_add_`, in expert order per token (the sum the per-expert loop made).
    """

    fuses_shared_expert: ClassVar[bool] = False

    def __init__(self, experts: MoEExperts) -> None:
        self.experts = experts

    def apply(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        ex = self.experts
        num_tokens, top_k = topk_ids.shape
        local = topk_ids.reshape(-1).to(torch.int64) - ex.expert_start  # [T*k]
        token = torch.arange(num_tokens, device=x.device).repeat_interleave(top_k)  # [T*k]
        weight = topk_weights.reshape(-1)
        if ex.num_local_experts < ex.num_experts:  # EP: keep the pairs of this rank's experts
            keep = (local >= 0) & (local < ex.num_local_experts)
            local, token, weight = local[keep], token[keep], weight[keep]
        order = torch.argsort(local, stable=True)
        local, token, weight = local[order], token[order], weight[order]  # [N] sorted by expert
        num_slots = ex.w13.shape[0]  # local experts (+ the shared-expert slot, which routes no pair here)
        ends = torch.bincount(local, minlength=num_slots).cumsum(0)  # [E] end of each expert's pairs
        xs = x[token]  # [N, H]
        if x.device.type == "cpu" and ex.block_size is None:
            offs = ends.to(torch.int32)
            gate, up = F.grouped_mm(xs, ex.w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)  # [N, I] each
            y = F.grouped_mm(F.silu(gate) * up, ex.w2.transpose(1, 2), offs=offs)  # [N, H]
        else:
            y = torch.empty_like(xs)
            start = 0
            for e, end in enumerate(ends.tolist()):  # host sync: reference only (CUDA serves with FusedExperts)
                if end > start:
                    w13, w2 = ex.expert_weights(e, x.dtype)
                    gate, up = F.linear(xs[start:end], w13).chunk(2, dim=-1)  # [n, I] each
                    y[start:end] = F.linear(F.silu(gate) * up, w2)  # [n, H]
                start = end
        return torch.zeros_like(x).index_add_(0, token, y * weight[:, None].to(y.dtype))
