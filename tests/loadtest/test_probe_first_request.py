"""loadtest/probe_first_request.py (issue 20): its Triton recorder on the hooks' own arguments, its A/B switches, and
a whole run on CPU with the tiny model (no Triton there: the table, the cached-prefix rows and the profile)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "loadtest" / "probe_first_request.py"


def _probe() -> Any:
    spec = importlib.util.spec_from_file_location("loadtest_probe_first_request", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are made
    spec.loader.exec_module(module)
    return module


def _hook_kwargs(kernel: str, key: str) -> dict[str, Any]:
    # What Triton 3.6's JITFunction._call_hook passes (runtime/jit.py): fn is a JitFunctionInfo, compile a dict
    # whose constants and configs are keyed by argument paths.
    params = [SimpleNamespace(name=n) for n in ("x_ptr", "M", "K", "BLOCK_M")]
    fn = SimpleNamespace(module=None, name=kernel, jit_function=SimpleNamespace(params=params))
    compile = {"key": key, "constants": {(3,): 16}, "configs": [{(0,): [["tt.divisibility", 16]],
               (2,): [["tt.divisibility", 16]]}], "num_warps": 4, "num_stages": 3}  # fmt: skip
    return {"key": key, "repr": "", "fn": fn, "compile": compile, "is_manual_warmup": False, "already_compiled": False}


def test_the_recorder_tells_compiles_from_disk_cache_loads() -> None:
    rec = _probe().TritonRecorder()
    mark = rec.mark()
    assert rec._before(**_hook_kwargs("gemm_kernel", "k1")) is None  # a true value would skip the compile
    rec._listen(src=None, metadata={}, metadata_group={}, times=None, cache_hit=False)
    rec._after(**_hook_kwargs("gemm_kernel", "k1"))
    rec._before(**_hook_kwargs("quant_kernel", "k2"))
    rec._listen(src=None, metadata={}, metadata_group={}, times=None, cache_hit=True)
    rec._after(**_hook_kwargs("quant_kernel", "k2"))
    rec._load_start(None, None, "quant_kernel", {}, "h")
    rec._load_end(None, None, "quant_kernel", {}, "h")
    compiles, loads = rec.since(mark)
    assert [(c.kernel, c.disk_cache_hit) for c in compiles] == [("gemm_kernel", False), ("quant_kernel", True)]
    assert compiles[0].key == "BLOCK_M=16 w4s3 | %16: x_ptr, K" and [name for name, _ in loads] == ["quant_kernel"]
    rec._after(key="k3", fn=None, compile={})  # a hook never raises into a launch
    assert rec.errors and rec.since(rec.mark()) == ([], [])


def test_the_switches_restore_the_old_behaviour(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.nn.attention import SDPBackend

    from baleen.model import attention_triton, warm_up

    monkeypatch.setattr(attention_triton, "EXPANDED_SDPA_BACKENDS", attention_triton.EXPANDED_SDPA_BACKENDS)
    monkeypatch.setattr(warm_up, "warm_up_shapes", warm_up.warm_up_shapes)
    probe = _probe()
    assert probe.apply_switches(probe.parse_args([])) == "none"
    said = probe.apply_switches(probe.parse_args(["--expanded-sdpa", "torch", "--no-shape-warmup"]))
    assert "torch's pick" in said and "no start-up shape warm-up" in said
    assert SDPBackend.CUDNN_ATTENTION in attention_triton.EXPANDED_SDPA_BACKENDS
    assert warm_up.warm_up_shapes(None, None, None, 8, 8) == 0


def test_the_probe_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    proc = subprocess.run(
        [sys.executable, "-P", str(SCRIPT), "--device", "cpu", "--lengths", "16", "17", "--cached-prefix", "48",
         "--suffix-lengths", "5", "--profile", "--profile-lengths", "9", "--top", "5", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "| 16 |" in text and "| 17 |" in text and "| 48 cached + 5 |" in text and "profiled 9 tokens" in text
    assert "no Triton launches on CPU" in text and "Nothing compiled during the requests." in text
    results = json.loads(out.read_text())
    first, second = results["lengths"]["16"]
    assert first["ttft_ms"] > 0 and second["ttft_ms"] > 0 and first["compiles"] == [] and first["alloc"] == {}
    assert len(results["profiled"]["9"][0]["profile"]) == 5
