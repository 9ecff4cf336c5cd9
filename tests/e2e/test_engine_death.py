"""Through `python -m baleen.launch_server`: a dead worker is logged and ends the server, a failed warm-up too.

A SIGKILLed rank process gives an ERROR line with the cause, an error event to every open stream, then exit
code 1 within 5 s (for a supervisor to restart the server); `--stay-up-after-engine-death` keeps the server
up, answering 503. A warm-up generation that fails, or a rank process that fails to build its model, makes the
server exit 1 with the cause in its log, before "ready".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from harness import ServerProcess

from baleen.model.make_model import default_model_path

BODY = {"model": "default", "messages": [{"role": "user", "content": "go"}], "max_tokens": 4000,
        "ignore_eos": True, "stream": True}


def _rank_process(server: ServerProcess) -> int:
    """The pid of the server's rank process (not multiprocessing's resource tracker)."""
    ranks = [pid for pid in server.children() if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(ranks) == 1, ranks
    return ranks[0]


class Stream(threading.Thread):
    """One streamed chat completion read on a thread: its `data:` payloads."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events: list[str] = []
        self.first = threading.Event()
        self.failure: Exception | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=BODY, timeout=30) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.first.set()
        except Exception as e:
            self.failure = e


def _open_streams(server: ServerProcess, n: int) -> list[Stream]:
    streams = [Stream(server.url) for _ in range(n)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.first.wait(30), server.log()
    return streams


def test_killed_worker_is_logged_fails_its_streams_and_the_server_exits_nonzero() -> None:
    with ServerProcess() as server:
        streams = _open_streams(server, 2)
        rank = _rank_process(server)
        os.kill(rank, signal.SIGKILL)
        killed = time.monotonic()
        assert server.proc is not None
        code = server.proc.wait(timeout=10)
        assert time.monotonic() - killed < 5.0, server.log()
        assert code == 1, server.log()
        log = server.log()
        for s in streams:
            s.join(5)
            assert s.failure is None and s.events[-1] == "[DONE]", (s.events[-3:], s.failure)
            error = json.loads(s.events[-2])["error"]
            assert "baleen-rank0" in error["message"] and "died" in error["message"]
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert any(f"pid {rank}) died: killed by SIGKILL" in line for line in errors), log
        assert "baleen is ready" in log


def test_stay_up_flag_keeps_the_server_answering_503_after_worker_death() -> None:
    with ServerProcess("--stay-up-after-engine-death") as server, server.client() as client:
        assert client.get("/health").status_code == 200
        [stream] = _open_streams(server, 1)
        os.kill(_rank_process(server), signal.SIGKILL)
        stream.join(5)
        assert json.loads(stream.events[-2])["error"], stream.events[-3:]
        time.sleep(2.0)  # without the flag the server would be gone by now (the test above: well under 2 s)
        assert server.proc is not None and server.proc.poll() is None, server.log()
        health = client.get("/health")
        assert health.status_code == 503 and "died" in health.json()["error"]["message"]
        assert "stays up" in server.log()


def test_failed_warm_up_exits_nonzero_with_the_cause_before_ready(tmp_path: Path) -> None:
    # The model runner fails its first step (the warm-up's prefill), in-process (--single-process).
    script = tmp_path / "serve_broken.py"
    script.write_text(
        "from baleen.model.runner import ModelRunner\n"
        "def launch(self, plan):\n"
        "    raise RuntimeError('injected first-step failure')\n"
        "ModelRunner.launch = launch\n"
        "from baleen.api.cli import serve_main\n"
        "raise SystemExit(serve_main(['--single-process', '--port', '0']))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-P", str(script)], capture_output=True, text=True, timeout=120, env=env,
                          stdin=subprocess.DEVNULL)
    log = done.stdout + done.stderr
    assert done.returncode == 1, log
    assert "warm-up generation failed" in log and "RuntimeError: injected first-step failure" in log, log
    assert "could not start" in log and "baleen is ready" not in log


def test_worker_that_fails_to_build_exits_nonzero_with_the_cause(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(default_model_path(), broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])  # the rank process fails while loading its weights
    with pytest.raises(RuntimeError, match="exited with 1 before it was ready") as failed:
        ServerProcess("--model-path", str(broken)).start()
    log = str(failed.value)
    assert " ERROR baleen.server: the engine could not start" in log and "SafetensorError" in log, log
