"""loadtest/probe_http_ttft.py on CPU with the tiny model: the server and the in-process Engine alternated (each
request's hops traced across the processes), and the chat route over new connections."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parents[2] / "loadtest" / "probe_http_ttft.py"


def _probe(*flags: str) -> str:
    run = subprocess.run([sys.executable, "-P", str(SCRIPT), "--requests", "3", "--max-tokens", "2", *flags],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _module() -> Any:
    spec = importlib.util.spec_from_file_location("loadtest_probe_http_ttft", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_http_against_the_in_process_engine_paired() -> None:
    out = _probe("--vs-engine")
    assert "## in-process Engine, 16-token prompt, 3 requests" in out
    assert "## HTTP, this checkout, completions, one keep-alive connection, 16-token prompt, 3 requests" in out
    assert "paired by round, TTFT less the forward" in out and "of 3 rounds lower" in out
    # every hop of the server side was traced, the rank process's included
    for hop in ("| 1 http bytes in |", "| scheduler got NewRequest |", "| step computed |", "| SSE body chunk written |"):
        assert hop in out, out
    assert out.count("| client got first token |") == 2, out


def test_chat_over_new_connections() -> None:
    out = _probe("--route", "chat", "--new-connections")
    assert "## HTTP, this checkout, chat, a new connection a request, 16-token prompt, 3 requests" in out
    assert "| 5 tokenized + admitted |" in out


def test_timelines_are_split_by_target_in_the_alternating_order() -> None:
    by_target = _module()._by_target
    # rounds alternate the order: A B | B A | A B | B A ...; the first 3 rounds are warm-ups
    sent = ["a0", "b0", "b1", "a1", "a2", "b2", "b3", "a3", "a4", "b4"]
    rows = [{"i": name} for name in sent]
    assert by_target(rows, 2) == [[{"i": "a3"}, {"i": "a4"}], [{"i": "b3"}, {"i": "b4"}]]
