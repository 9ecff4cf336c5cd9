"""Helpers shared by the kernel tests (imported as a sibling module, like tests/actors/fake_worker.py)."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; a must be finite (a NaN or inf fails here, not as a small number)."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "output has NaN/inf"
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def assert_quant_close(q: torch.Tensor, s: torch.Tensor, qr: torch.Tensor, sr: torch.Tensor) -> None:
    """Per-token-group quantizations (q, s) and (qr, sr) agree: equal scales, values at most one e4m3 step apart."""
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    a, b = q.float(), qr.float()
    bad = a != b
    # GPU division may land a value on the other side of a rounding boundary: one e4m3 step, rarely.
    assert bad.float().mean() <= 1e-3, f"{int(bad.sum())} of {bad.numel()} quantized values differ"
    assert ((a - b).abs() <= b.abs() / 8 + 2**-9)[bad].all()
