"""loadtest/probe_long_context.py: a small case through the Triton kernel on CPU (the interpreter), so the probe runs
when a GPU session gets to it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "loadtest" / "probe_long_context.py"


def test_a_small_case_runs_through_the_triton_kernel() -> None:
    spec = importlib.util.spec_from_file_location("loadtest_probe_long_context", SCRIPT)
    assert spec is not None and spec.loader is not None
    probe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = probe
    spec.loader.exec_module(probe)
    said = probe.run_case("triton", 40, 2, dev="cpu", heads=16)
    assert said.startswith("ok (42 rows") and "finite: True" in said, said
