"""Rotary position embedding on interleaved (even, odd) pairs, in place, for MLA's q_pe and k_pe.

Pair i of a head, (x[2i], x[2i+1]), is rotated by angle pos * inv_freq[i]. HF's `rope_interleave=True`
path de-interleaves before rotating; that permutes q and k identically, so attention scores are the same.
The cos/sin cache holds one row per position: [cos(pos * inv_freq) (D/2) | sin(pos * inv_freq) (D/2)].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rotary_interleaved_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    cache_ptr,
    num_q_heads,
    num_k_heads,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cache,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # One program per token: rotates all of its q heads and k heads with the same cos/sin row.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_i = tl.arange(0, HALF)
    cos = tl.load(cache_ptr + pos * stride_cache + offs_i)[None, :].to(tl.float32)  # [1, HALF]
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + offs_i)[None, :].to(tl.float32)
    for h0 in range(0, num_q_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < num_q_heads)[:, None]
        ptrs = q_ptr + t * stride_qt + heads[:, None] * stride_qh + 2 * offs_i[None, :]  # [BLOCK_H, HALF] even
        x0 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(ptrs + 1, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (x0 * cos - x1 * sin).to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(ptrs + 1, (x1 * cos + x0 * sin).to(q_ptr.dtype.element_ty), mask=mask)
    for h0 in range(0, num_k_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < num_k_heads)[:, None]
        ptrs = k_ptr + t * stride_kt + heads[:, None] * stride_kh + 2 * offs_i[None, :]
        x0 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(ptrs + 1, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (x0 * cos - x1 * sin).to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(ptrs + 1, (x1 * cos + x0 * sin).to(k_ptr.dtype.element_ty), mask=mask)


def _as_3d(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 2:
        return x.unsqueeze(1)  # [T, D] -> [T, 1, D], a view: writes land in x
    if x.dim() != 3:
        raise ValueError(f"{name} must be [T, D] or [T, heads, D], got {tuple(x.shape)}")
    return x


def rotary_unsupported(dim: int) -> str | None:
    """Why `apply_rotary_interleaved` cannot rotate a head of `dim` values, or None when it can: a program
    holds the D/2 pairs as one power-of-two block. The reference takes any even dim."""
    half = dim // 2
    if half < 1 or half & (half - 1):
        return f"rotary dim/2={half} is not a power of two"
    return None


def _check(
    q3: torch.Tensor, k3: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[int, int]:
    # Layout checks shared by the kernel and the reference: (tokens, rotary dim).
    num_tokens, _, dim = q3.shape
    if k3.shape[0] != num_tokens or k3.shape[2] != dim or positions.shape != (num_tokens,):
        raise ValueError(f"q_pe {tuple(q3.shape)}, k_pe {tuple(k3.shape)}, positions {tuple(positions.shape)} disagree")
    if dim % 2:
        raise ValueError(f"rotary dim {dim} must be even (pairs)")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != dim:
        raise ValueError(f"cos_sin_cache must be [max_pos, {dim}], got {tuple(cos_sin_cache.shape)}")
    return num_tokens, dim


def apply_rotary_interleaved(
    q_pe: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    """Rotate q_pe [T, Hq, D] and k_pe [T, D] or [T, Hk, D] in place by their token's position.

    positions [T] (any int dtype) index cos_sin_cache [max_pos, D] = [cos | sin], float32 or q's dtype.
    The last dimension of q_pe and k_pe must be contiguous (their rows may be strided views); D/2 must be a
    power of two (`rotary_unsupported`).
    """
    q3, k3 = _as_3d(q_pe, "q_pe"), _as_3d(k_pe, "k_pe")
    num_tokens, dim = _check(q3, k3, positions, cos_sin_cache)
    why = rotary_unsupported(dim)
    if why is not None:
        raise ValueError(f"the rotary kernel cannot take this shape: {why} (apply_rotary_interleaved_ref can)")
    if q3.stride(2) != 1 or k3.stride(2) != 1 or cos_sin_cache.stride(1) != 1:
        raise ValueError("q_pe, k_pe and cos_sin_cache must be contiguous in their last dimension")
    if num_tokens == 0:
        return
    block_h = min(16, triton.next_power_of_2(max(q3.shape[1], k3.shape[1])))
    rotary_interleaved_kernel[(num_tokens,)](
        q3, k3, positions, cos_sin_cache, q3.shape[1], k3.shape[1],
        q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), cos_sin_cache.stride(0),
        HALF=dim // 2, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip


def apply_rotary_interleaved_ref(
    q_pe: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    """Pure-torch twin of `apply_rotary_interleaved` (also in place), for any even rotary dim."""
    q3, k3 = _as_3d(q_pe, "q_pe"), _as_3d(k_pe, "k_pe")
    _check(q3, k3, positions, cos_sin_cache)
    half = cos_sin_cache.shape[1] // 2
    rows = cos_sin_cache[positions.to(torch.int64)].to(torch.float32)  # [T, D]
    cos, sin = rows[:, None, :half], rows[:, None, half:]  # [T, 1, D/2]
    for x in (q3, k3):
        x0 = x[..., 0::2].to(torch.float32)
        x1 = x[..., 1::2].to(torch.float32)
        out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
        x.copy_(out.to(x.dtype))


def build_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, mscale: float = 1.0) -> torch.Tensor:
    """[max_positions, D] float32 table of [cos | sin] of pos * inv_freq, times `mscale` (YaRN's attention factor)."""
    pos = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    angles = pos[:, None] * inv_freq.to(torch.float32)[None, :]  # [max_pos, D/2]
    return torch.cat([angles.cos() * mscale, angles.sin() * mscale], dim=-1).contiguous()
