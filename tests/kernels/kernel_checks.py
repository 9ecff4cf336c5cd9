"""Helpers shared by the kernel tests (imported as a sibling module, like tests/actors/fake_worker.py)."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; a must be finite (a NaN or inf fails here, not as a small number)."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "output has NaN/inf"
    return float((a - b).norm() / b.norm().clamp(min=1e-30))
