"""loadtest/bench_accuracy.py against the served default (trained) model, on a small sample: R1 template, R1
reasoning parser and V3 tool calls, as the device run measures it (docs/PERF.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # the shared harness
from harness import ServerProcess

from baleen.model.make_model import default_model_path

BENCH = Path(__file__).resolve().parents[2] / "loadtest" / "bench_accuracy.py"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess("--chat-template", "deepseek-r1", "--reasoning-parser", "deepseek-r1", "--tool-call-parser",
                       "deepseekv3", "--single-process") as s:
        yield s


def test_small_sample_every_family(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "acc.json"
    run = subprocess.run([sys.executable, str(BENCH), "--base-url", server.base_url, "--num", "2", "--seed", "3",
                          "--json", str(out), "--mtp-model-path", str(default_model_path()), "--mtp-passages", "4"],
                         capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    families = ("capitals", "capital_lists", "add", "sub", "mul", "tools", "tools_none", "reasoning")
    assert all(res[f]["n"] == 2 for f in families)
    # What the shipped model does reliably: 100% of 40 on the H100 (capitals, lists, held-out weather calls, no-tool
    # requests); 95-97.5% (arithmetic, capital checks: one slip in 40, e.g. 33 * 57 on this seed in float32), so one
    # of two here. The full bench's numbers are in docs/PERF.md.
    assert all(res[f]["accuracy"] == 1.0 for f in ("capitals", "capital_lists", "tools", "tools_none")), res
    assert all(res[f]["accuracy"] >= 0.5 for f in ("add", "sub", "mul", "reasoning")), res
    tools = res["tools"]
    assert tools["finish_tool_calls"] == tools["parses"] == tools["right_name"] == tools["right_arguments"] == 1.0
    assert res["reasoning"]["reasoning_split"] == res["add"]["reasoning_split"] == 1.0  # in reasoning_content
    assert res["mtp"]["mtp_agreement_chat_answers"] >= 0.8, res["mtp"]
    bins = res["mtp"]["mtp_agreement_greedy_by_main_p1"]  # [share of positions, agreement] by the main's top-1 prob.
    assert list(bins) == ["0.0-0.3", "0.3-0.6", "0.6-0.9", "0.9-1.0"] and abs(sum(b[0] for b in bins.values()) - 1) < 0.01
    assert 0 < res["mtp"]["main_p1_mean_greedy"] <= 1
