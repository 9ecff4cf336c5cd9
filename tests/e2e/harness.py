"""Test harness for the HTTP server, shared by tests/e2e and tests/api (whose conftest puts this folder on sys.path).

`ServerProcess` runs `python -m baleen.launch_server` in a subprocess on port 0, reads the bound port from
its ready line and stops it with SIGTERM; its output goes to a file (a pipe nobody reads would fill up and
block it). PYTHONPATH holds tests/api so `--custom-logit-processor scripted=scripted_processor:...` imports
in the server and in its worker process. `ThreadServer` runs the real app over a `FakeEngine` in process.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from tokenizers import Tokenizer

from baleen.actors.admission import EngineDead, Limits
from baleen.api.chat_template import ChatTemplate
from baleen.api.server import create_app
from baleen.api.state import ServerConfig, ServerState
from baleen.launch_server import UvicornServer, uvicorn_config
from baleen.messages import CacheFlushed, RequestOutput, SamplingParams

TESTS_API = Path(__file__).resolve().parents[1] / "api"
SCRIPTED = "scripted=scripted_processor:ScriptedProcessor"
_READY = re.compile(r"baleen is ready: serving .* at (http://\S+)/v1 ")


class ServerProcess:
    """One server subprocess: `url`, `base_url` (…/v1), `pid`, its log, its child processes."""

    def __init__(self, *flags: str, ready_timeout: float = 120.0) -> None:
        self.flags = ["--port", "0", *flags]
        self.ready_timeout = ready_timeout
        self._log = tempfile.NamedTemporaryFile(prefix="baleen-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServerProcess:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_API), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "baleen.launch_server", *self.flags], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            m = _READY.search(self.log())
            if m:
                self.url = m.group(1)
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before it was ready:\n{self.log()}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server was not ready within {self.ready_timeout} s:\n{self.log()}")

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def children(self) -> list[int]:
        """Pids of the server's child processes (from /proc)."""
        return [pid for pid in _pids() if _ppid(pid) == self.pid]

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0, **kwargs)  # type: ignore[arg-type]

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; the exit code (the process is killed if it does not exit in time)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        try:
            return self.start()
        except BaseException:
            self.__exit__(None, None, None)  # the error message already holds the log
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None:
            self.stop()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gauge(text: str, name: str) -> float | None:
    """A Prometheus sample without labels from /metrics text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


class FakeEngine:
    """The Engine's surface with behaviour a test sets: tokens "a" at a time, or one error of a given kind."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.model_path = "fake-model"
        self.limits = Limits(max_context_len=256, vocab_size=tokenizer.get_vocab_size())
        self.metrics: dict[str, float] = {"num_used_pages": 3.0, "num_evictable_pages": 1.0}
        self.error: str | None = None
        self.error_kind: str | None = None  # "invalid" | "overloaded" | "internal": every request fails so
        self.crash: Exception | None = None  # generate() raises this before its first output
        self.aborted: list[str] = []
        self.num_requests = 0  # generate() streams open
        self.speculative = False  # outputs carry spec_verify_ct: one verify step per two tokens after the first
        self.delay_s = 0.0  # wait this long before each output (a queued request, a slow step)
        self.last_output_at = 0.0  # time.monotonic() of the latest output of any request

    @property
    def healthy(self) -> bool:
        return self.error is None

    async def generate(self, prompt: str | Sequence[int], sampling: SamplingParams | None = None, *,
                       rid: str | None = None) -> AsyncIterator[RequestOutput]:
        rid = rid or "r"
        if self.crash is not None:
            raise self.crash
        self.num_requests += 1
        try:
            if self.error_kind is not None:
                yield RequestOutput(rid=rid, finish_reason="error", error=f"fake {self.error_kind} error",
                                    error_kind=self.error_kind)
                return
            n = (sampling.max_new_tokens if sampling else None) or 4
            for i in range(n):
                await asyncio.sleep(self.delay_s)
                self.last_output_at = time.monotonic()
                yield RequestOutput(rid=rid, text="a", token_ids=[97], finish_reason="length" if i == n - 1 else None,
                                    prompt_tokens=len(prompt), completion_tokens=i + 1,
                                    spec_verify_ct=(i + 1) // 2 if self.speculative else None)
        finally:
            self.num_requests -= 1

    async def abort(self, rid: str) -> None:
        self.aborted.append(rid)

    async def abort_all(self) -> None:
        return None

    def info(self) -> dict[str, Any]:
        return {"model_path": self.model_path}

    async def flush_cache(self, timeout: float = 30.0) -> CacheFlushed:
        if self.error is not None:
            raise EngineDead(self.error)
        return CacheFlushed(num_pages=int(self.metrics.get("num_evictable_pages", 0)), num_held_pages=0)


class ThreadServer:
    """The real app and uvicorn server over a FakeEngine, on a loop in a background thread."""

    def __init__(self, engine: FakeEngine, config: ServerConfig) -> None:
        state = ServerState(engine, config, ChatTemplate.builtin("deepseek-v3"), None)
        self.server = UvicornServer(uvicorn_config(create_app(state), config), state)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)
        self.url = ""

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the in-process server failed to start")
            threading.Event().wait(0.02)
        self.url = self.server.bound_url()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
