"""Rotary position embedding with DeepSeek's YaRN, on interleaved (even, odd) pairs.

The released checkpoints rotate dims (0,1), (2,3), ... of q_pe / k_pe by one frequency each
(transformers' `rope_interleave=True`). We keep that interleaved layout on the way out; only q.k matters,
and q and k are rotated the same way.
"""

from __future__ import annotations

import math

import torch

from baleen.model.config import RopeConfig, yarn_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    # The rotary dim whose wavelength fits `num_rotations` times into the original context.
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(dim: int, rope: RopeConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (float32) and the cos/sin multiplier (YaRN's mscale ratio)."""
    # NOTE: explicit CPU tensors: the model may be constructed under `torch.device("meta")`.
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if not rope.is_yarn:
        return inv_freq, 1.0
    if rope.original_max_position_embeddings is None:
        raise ValueError("YaRN rope needs rope_scaling.original_max_position_embeddings")
    orig = rope.original_max_position_embeddings
    low = float(max(math.floor(_correction_dim(rope.beta_fast, dim, rope.theta, orig)), 0))
    high = float(min(math.ceil(_correction_dim(rope.beta_slow, dim, rope.theta, orig)), dim - 1))
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    # High frequencies (ramp 0) are kept; low frequencies (ramp 1) are interpolated by 1/factor.
    inv_freq = inv_freq / rope.factor * ramp + inv_freq * (1 - ramp)
    mscale = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return inv_freq, mscale


class RotaryEmbedding:
    """cos/sin cache [max_positions, dim/2] (float32), built on first use on the positions' device."""

    def __init__(self, dim: int, max_position_embeddings: int, rope: RopeConfig) -> None:
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.inv_freq, self.mscale = rope_inv_freq(dim, rope)
        self._cos_sin: torch.Tensor | None = None  # [max_positions, 2, dim/2]
        self._fixed = False  # reserved: captured CUDA graphs read the cache's storage, so it may not grow

    def _build(self, num_positions: int, device: torch.device) -> torch.Tensor:
        t = torch.arange(num_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(t, self.inv_freq.to(device))  # [num_positions, dim/2]
        return torch.stack([freqs.cos(), freqs.sin()], dim=1) * self.mscale

    def reserve(self, num_positions: int, device: torch.device) -> None:
        """Build the cache for positions 0 .. num_positions - 1 on `device` now, and never rebuild it after.

        NOTE: call before capturing CUDA graphs that run this embedding. A graph keeps reading the storage the
        cache had at its capture; a cache that grew later would free that storage under the graph (seen on the
        H100: the MTP draft graph captured before the draft-extend grew the MTP layer's cache read freed memory,
        stale cos/sin at best, an illegal address once the allocator released the block)."""
        cache = self._cos_sin
        if cache is None or cache.shape[0] < num_positions or cache.device != device:
            self._cos_sin = self._build(max(num_positions, self.max_position_embeddings), device)
        self._fixed = True

    def cos_sin(self, positions: torch.Tensor, max_position: int | None = None) -> torch.Tensor:
        """positions [T] -> [T, 2, dim/2]; `max_position` (a host int bound) lets the cache grow without a sync."""
        need = max(self.max_position_embeddings, (max_position or 0) + 1)
        cache = self._cos_sin
        if cache is None or cache.shape[0] < need or cache.device != positions.device:
            if self._fixed or (positions.is_cuda and torch.cuda.is_current_stream_capturing()):
                held = 0 if cache is None else cache.shape[0]
                raise RuntimeError(f"the rotary cache holds {held} positions and this step needs {need}: it may not "
                                   "grow once CUDA graphs read it (reserve() enough positions before the capture)")
            size = need if cache is None else max(need, 2 * cache.shape[0])
            cache = self._cos_sin = self._build(size, positions.device)
        return cache[positions]

