"""The fused Triton MoE as an experts method (the GPU counterpart of `TorchExperts`): no host sync."""

from __future__ import annotations

from typing import ClassVar

import torch

from baleen.model.moe import MoEExperts


class FusedExperts:
    """Routed experts through `kernels.fused_moe.fused_experts`; CUDA-graph capturable.

    Ids may name the shared-expert slot (`experts.shared_slot`, expert parallelism off): the shared expert
    then runs as one more expert in the same launches.
    """

    fuses_shared_expert: ClassVar[bool] = True

    def __init__(self, experts: MoEExperts) -> None:
        self.experts = experts

    def apply(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        from baleen.kernels.fused_moe import fused_experts

        ex = self.experts
        ids, weights = topk_ids, topk_weights
        if ex.num_local_experts != ex.num_experts:
            # Expert parallel: experts of other ranks contribute nothing here. They are pointed at local
            # expert 0 with weight 0 rather than dropped, so shapes (and CUDA graphs) stay fixed.
            local = topk_ids.to(torch.int64) - ex.expert_start
            keep = (local >= 0) & (local < ex.num_local_experts)
            ids = torch.where(keep, local, 0)
            weights = torch.where(keep, topk_weights, 0.0)
        scales = (
            (ex.w13_weight_scale_inv, ex.w2_weight_scale_inv) if ex.block_size is not None else (None, None)
        )
        return fused_experts(
            x, ex.w13, ex.w2, ids.to(torch.int32), weights.to(torch.float32), scales[0], scales[1],
            ex.block_size or (128, 128),
        )  # fmt: skip
