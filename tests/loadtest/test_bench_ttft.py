"""loadtest/bench_ttft.py end to end on CPU with the tiny model: in process and over HTTP (a keep-alive connection
and a new connection a request), with a cached prefix on both sides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "loadtest" / "bench_ttft.py"


def test_bench_ttft_times_the_engine_and_http_with_a_cached_prefix(tmp_path: Path) -> None:
    out = tmp_path / "ttft.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-P", str(SCRIPT), "--device", "cpu", "--lengths", "16", "40",
                          "--cached-prefix", "64", "--repeats", "2", "--decode-tokens", "4", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    for side in ("engine", "http"):
        assert set(res[side]["ttft"]) == {"16", "40"}, res[side]
        assert all(0 < t < 30 for t in res[side]["ttft"].values())
        with_prefix, alone = res[side]["cached"]["64"]
        assert 0 < with_prefix < 30 and 0 < alone < 30
    assert set(res["http"]["ttft_new_connection"]) == {"16", "40"}
    assert "HTTP: cached 64 + 16 new" in run.stdout and "HTTP, new connection ms" in run.stdout
