"""DeepSeek-V3's router selection (sigmoid scores, noaux_tc grouped top-k) in one launch per batch.

The torch version (`kernels.fused_moe.select_experts_noaux_tc`) is ~16 small launches (sigmoid, three
top-k's, scatter, masks, gathers, the renormalisation); at decode that is more GPU time than the math.
One program per token holds its E scores in registers and picks groups and experts by repeated argmax.
Ties go to the lower expert id (torch.topk leaves their order unspecified).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def moe_route_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    stride_logits,
    routed_scaling_factor,
    NUM_EXPERTS: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    SHARED_ID: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    PER_GROUP: tl.constexpr = NUM_EXPERTS // NUM_GROUPS
    offs_e = tl.arange(0, NUM_EXPERTS)
    scores = tl.sigmoid(tl.load(logits_ptr + t * stride_logits + offs_e).to(tl.float32))  # [E]
    biased = scores + tl.load(bias_ptr + offs_e).to(tl.float32)  # picks experts; weights stay unbiased

    # A group scores the sum of its two best biased experts.
    grouped = tl.reshape(biased, (NUM_GROUPS, PER_GROUP))
    in_group = tl.arange(0, PER_GROUP)[None, :]
    best1 = tl.max(grouped, axis=1)
    if PER_GROUP > 1:
        first = tl.argmax(grouped, axis=1)
        best2 = tl.max(tl.where(in_group == first[:, None], float("-inf"), grouped), axis=1)
        group_score = best1 + best2  # [NUM_GROUPS]
    else:
        group_score = best1
    offs_g = tl.arange(0, NUM_GROUPS)
    keep_group = offs_g < 0  # all False
    for _ in tl.static_range(TOPK_GROUP):
        g = tl.argmax(tl.where(keep_group, float("-inf"), group_score), axis=0)
        keep_group = keep_group | (offs_g == g)
    # An expert stays a candidate when its group was kept: [E, NUM_GROUPS] membership, reduced over groups.
    member = (offs_e[:, None] // PER_GROUP == offs_g[None, :]) & keep_group[None, :]
    cand = tl.where(tl.max(member.to(tl.int32), axis=1) > 0, biased, float("-inf"))

    offs_k = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_K,), dtype=tl.int32)
    weights = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for i in tl.static_range(TOP_K):
        e = tl.argmax(cand, axis=0)
        w = tl.sum(tl.where(offs_e == e, scores, 0.0), axis=0)
        ids = tl.where(offs_k == i, e.to(tl.int32), ids)
        weights = tl.where(offs_k == i, w, weights)
        cand = tl.where(offs_e == e, float("-inf"), cand)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    weights = weights * routed_scaling_factor
    # A shared expert computed as one more expert of the fused MoE: column TOP_K, weight 1 (not scaled).
    ROW: tl.constexpr = TOP_K + (SHARED_ID >= 0)
    if SHARED_ID >= 0:
        ids = tl.where(offs_k == TOP_K, SHARED_ID, ids)
        weights = tl.where(offs_k == TOP_K, 1.0, weights)
    mask = offs_k < ROW
    tl.store(ids_ptr + t * ROW + offs_k, ids, mask=mask)
    tl.store(weights_ptr + t * ROW + offs_k, weights, mask=mask)


MAX_EXPERTS = 1024  # a program holds every expert's score in registers


def moe_route_unsupported(num_experts: int, num_groups: int) -> str | None:
    """Why `route_noaux_tc` cannot route over `num_experts` experts in `num_groups` groups, or None when it can:
    the kernel holds the E scores and the groups as power-of-two blocks, at most MAX_EXPERTS scores a program.
    The torch selection (`select_experts_noaux_tc`, `model.moe.select_experts`) takes any grouping."""
    if num_groups < 1 or num_experts % num_groups:
        return f"{num_experts} experts do not split into {num_groups} groups"
    per_group = num_experts // num_groups
    if not all(v & (v - 1) == 0 for v in (num_experts, num_groups, per_group)):
        return f"{num_experts} experts in {num_groups} groups: both (and their ratio) must be powers of two"
    if num_experts > MAX_EXPERTS:
        return f"{num_experts} experts exceed the kernel's {MAX_EXPERTS}"
    return None


def route_supported(num_experts: int, num_groups: int) -> bool:
    """Whether `route_noaux_tc` takes this grouping (`moe_route_unsupported` says why not)."""
    return moe_route_unsupported(num_experts, num_groups) is None


def route_noaux_tc(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    num_groups: int,
    topk_group: int,
    routed_scaling_factor: float = 1.0,
    renormalize: bool = True,
    shared_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights [T, k] float32, topk_ids [T, k] int32), as `select_experts_noaux_tc`.

    E, the group count and E / groups must be powers of two (`moe_route_unsupported`); ids come best first.
    With `shared_id` each row gets one more column, (shared_id, weight 1.0): the shared expert, stored as
    one more expert of the fused MoE, then runs in the same launches as the routed ones.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got {tuple(router_logits.shape)}")
    num_tokens, num_experts = router_logits.shape
    why = moe_route_unsupported(num_experts, num_groups)
    if why is not None:
        raise ValueError(f"the routing kernel cannot take this shape: {why} (select_experts_noaux_tc can)")
    if not 1 <= topk_group <= num_groups or not 1 <= top_k <= topk_group * (num_experts // num_groups):
        raise ValueError(f"top_k={top_k}, topk_group={topk_group} do not fit {num_experts} experts in {num_groups} groups")
    if correction_bias.shape != (num_experts,):
        raise ValueError(f"correction_bias must be [{num_experts}], got {tuple(correction_bias.shape)}")
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    if shared_id is not None and shared_id < 0:
        raise ValueError(f"shared_id must be >= 0, got {shared_id}")
    cols = top_k + (shared_id is not None)
    ids = torch.empty((num_tokens, cols), dtype=torch.int32, device=logits.device)
    weights = torch.empty((num_tokens, cols), dtype=torch.float32, device=logits.device)
    if num_tokens:
        moe_route_kernel[(num_tokens,)](
            logits, correction_bias, weights, ids, logits.stride(0), float(routed_scaling_factor),
            NUM_EXPERTS=num_experts, NUM_GROUPS=num_groups, TOPK_GROUP=topk_group, TOP_K=top_k,
            BLOCK_K=triton.next_power_of_2(cols), RENORMALIZE=renormalize,
            SHARED_ID=-1 if shared_id is None else shared_id, num_warps=4 if num_experts > 64 else 1,
        )  # fmt: skip
    return weights, ids
