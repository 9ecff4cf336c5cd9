"""A tiny OpenAI-compatible fake server for the load-tool tests: SSE token-by-token, tool calls, /metrics.

Run: `python tests/loadtest/fake_openai_server.py --port 0`; it prints `PORT <n>` on its first stdout line.
Token counts are deterministic functions of the request, so tests can check what the clients report:
a prompt string costs one token per whitespace-separated word (a token-id list one per id), plus
CHAT_OVERHEAD_PER_MESSAGE per chat message and CHAT_OVERHEAD; with `ignore_eos` the output is exactly
`max_tokens` tokens, without it a random length in [1, max_tokens]. A prefix cache is faked too: a request's
cached tokens (usage.prompt_tokens_details.cached_tokens) are its longest common prefix of words (or ids) with any
earlier request, and /metrics reports their share of all prompt tokens as `sglang:cache_hit_rate`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

CHAT_OVERHEAD = 2
CHAT_OVERHEAD_PER_MESSAGE = 3
DEFAULT_MAX_TOKENS = 16
PAGE_SIZE = 16
_WORDS = ("the", "model", "says", "hello", "and", "then", "some", "more", "text", "here", "ok", "yes")


@dataclass(frozen=True)
class FakeConfig:
    """Behaviour knobs of the fake server."""

    model: str = "fake-deepseek"
    ttft_ms: float = 20.0
    prefill_ms_per_token: float = 0.01
    itl_ms: float = 3.0
    fail_every: int = 0  # every Nth generation request answers HTTP 500 (0: never)
    truncate_every: int = 0  # every Nth streamed request stops without finish_reason or [DONE]
    base_pages: int = 0  # pages the /metrics gauge reports when idle


@dataclass
class FakeState:
    """Counters the tests read back through /fake/stats."""

    num_requests: int = 0
    num_completed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    active_tokens: dict[str, int] = field(default_factory=dict)
    seen_prompts: list[list[str]] = field(default_factory=list)  # every request's prompt words, for the fake cache
    all_prompt_tokens: int = 0  # since start, for the hit rate
    cached_prompt_tokens: int = 0

    def cache_lookup(self, words: list[str]) -> int:
        """Prompt words an earlier request shared as a prefix (the fake cache hit); remembers this prompt."""
        best = 0
        for seen in self.seen_prompts:
            n = 0
            for a, b in zip(seen, words):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        self.seen_prompts.append(words)
        return best

    def reset_counters(self) -> None:
        """Zero the totals; requests in flight stay counted."""
        self.num_requests = self.num_completed = self.prompt_tokens = self.completion_tokens = 0
        self.max_in_flight = self.in_flight


def count_prompt_tokens(body: dict[str, Any], chat: bool) -> int:
    """The fake's tokenizer: words for text, ids for token lists, plus a fixed template overhead for chat."""
    if chat:
        total = CHAT_OVERHEAD
        for message in body.get("messages", []):
            content = message.get("content") or ""
            if isinstance(content, list):
                content = " ".join(part.get("text", "") for part in content)
            total += CHAT_OVERHEAD_PER_MESSAGE + len(content.split())
        return total
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        if prompt and isinstance(prompt[0], list):  # a batch of id lists: we serve the first only
            prompt = prompt[0]
        if prompt and isinstance(prompt[0], int):
            return len(prompt)
        prompt = " ".join(str(p) for p in prompt)
    return len(str(prompt).split())


def prompt_words(body: dict[str, Any], chat: bool) -> list[str]:
    """The prompt as the fake cache keys it: its words (or ids), chat messages' contents one after the other."""
    if chat:
        return [w for m in body.get("messages", []) for w in str(m.get("content") or "").split()]
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and isinstance(prompt[0], list) else prompt
        return [str(p) for p in prompt]
    return str(prompt).split()


def tool_call_fragments(tool: dict[str, Any]) -> tuple[str, list[str]]:
    """A tool's name and its JSON arguments cut into 3-character fragments (one token each)."""
    function = tool.get("function", {})
    properties = function.get("parameters", {}).get("properties", {}) or {"x": {}}
    arguments = json.dumps({name: "Qingdao" for name in properties})
    return function.get("name", "tool"), [arguments[i : i + 3] for i in range(0, len(arguments), 3)]


def error(status: int, message: str) -> JSONResponse:
    """An OpenAI-style error body."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


def build_app(cfg: FakeConfig) -> Starlette:
    """The Starlette app; all state lives in this closure."""
    state = FakeState()
    rng = random.Random(0)

    def pages_used() -> int:
        return cfg.base_pages + sum(math.ceil(n / PAGE_SIZE) for n in state.active_tokens.values())

    async def models(_: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": cfg.model, "object": "model", "owned_by": "fake"}]}
        )

    async def health(_: Request) -> Response:
        return PlainTextResponse("ok")

    async def metrics(_: Request) -> Response:
        text = (
            "# HELP baleen_pages_used KV pages in use\n# TYPE baleen_pages_used gauge\n"
            f'baleen_pages_used{{rank="0"}} {pages_used()}\n'
            f"baleen_requests_running {state.in_flight}\n"
            "# HELP sglang:cache_hit_rate The prefix cache hit rate\n# TYPE sglang:cache_hit_rate gauge\n"
            f'sglang:cache_hit_rate{{model_name="{cfg.model}"}} '
            f"{state.cached_prompt_tokens / max(1, state.all_prompt_tokens)}\n"
        )
        return PlainTextResponse(text)

    async def stats(_: Request) -> Response:
        fields = ("num_requests", "num_completed", "prompt_tokens", "completion_tokens", "max_in_flight")
        return JSONResponse({name: getattr(state, name) for name in fields} | {"pages_used": pages_used()})

    async def reset(_: Request) -> Response:
        state.reset_counters()
        return JSONResponse({"ok": True})

    async def generate(request: Request, chat: bool) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error(400, "body is not JSON")
        if body.get("model") != cfg.model:
            return error(404, f"model {body.get('model')!r} not found; try {cfg.model!r}")
        state.num_requests += 1
        index = state.num_requests
        if cfg.fail_every and index % cfg.fail_every == 0:
            return error(500, "injected failure")
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS)
        num_out = max_tokens if body.get("ignore_eos") else rng.randint(1, max_tokens)
        prompt_tokens = count_prompt_tokens(body, chat)
        cached = min(prompt_tokens, state.cache_lookup(prompt_words(body, chat)))
        state.all_prompt_tokens += prompt_tokens
        state.cached_prompt_tokens += cached
        tools = body.get("tools") if chat and body.get("tool_choice") != "none" else None
        stream = bool(body.get("stream"))
        truncate = stream and cfg.truncate_every > 0 and index % cfg.truncate_every == 0
        run = _Generation(cfg, state, rng, chat, body, prompt_tokens, num_out, max_tokens, tools, truncate)
        run.cached_tokens = cached
        if stream:
            return StreamingResponse(run.stream(), media_type="text/event-stream")
        return JSONResponse(await run.whole())

    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    routes = [
        Route("/v1/models", models),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/fake/stats", stats),
        Route("/fake/reset", reset, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    return Starlette(routes=routes)


class _Generation:
    """One request's token stream: waits like a server would and yields OpenAI chunks."""

    def __init__(
        self,
        cfg: FakeConfig,
        state: FakeState,
        rng: random.Random,
        chat: bool,
        body: dict[str, Any],
        prompt_tokens: int,
        num_out: int,
        max_tokens: int,
        tools: list[dict[str, Any]] | None,
        truncate: bool,
    ) -> None:
        self.cfg, self.state, self.rng, self.chat, self.truncate = cfg, state, rng, chat, truncate
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:12]}"
        self.name: str | None = None
        if tools:
            self.name, fragments = tool_call_fragments(tools[0])
            self.pieces = fragments[: max(0, max_tokens - 1)]  # the name costs one token
            self.finish = "tool_calls" if len(self.pieces) == len(fragments) else "length"
            self.num_out = 1 + len(self.pieces)
        else:
            self.pieces = [" " + rng.choice(_WORDS) for _ in range(num_out)]
            self.finish = "length" if num_out == max_tokens else "stop"
            self.num_out = num_out

    def _usage(self) -> dict[str, Any]:
        total = self.prompt_tokens + self.num_out
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.num_out, "total_tokens": total,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def _chunk(self, delta: dict[str, Any] | str, finish: str | None) -> bytes:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body = {
            "id": self.id,
            "object": obj,
            "created": int(time.time()),
            "model": self.cfg.model,
            "choices": [choice],
        }
        return f"data: {json.dumps(body)}\n\n".encode()

    async def _tokens(self) -> AsyncGenerator[dict[str, Any] | str, None]:
        """Yields one delta per output token, sleeping the prefill time first and an ITL between tokens."""
        state, key = self.state, self.id
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        state.active_tokens[key] = self.prompt_tokens
        try:
            await asyncio.sleep((self.cfg.ttft_ms + self.cfg.prefill_ms_per_token * self.prompt_tokens) / 1e3)
            if self.name is not None:
                call = {"index": 0, "id": f"call_{key[-8:]}", "type": "function"}
                yield {"tool_calls": [call | {"function": {"name": self.name, "arguments": ""}}]}
            for i, piece in enumerate(self.pieces):
                if i or self.name is not None:
                    await asyncio.sleep(self.cfg.itl_ms * self.rng.uniform(0.7, 1.3) / 1e3)
                state.active_tokens[key] += 1
                if self.name is not None:
                    yield {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
                else:
                    yield {"content": piece} if self.chat else piece
        finally:
            state.in_flight -= 1
            del state.active_tokens[key]

    async def stream(self) -> AsyncIterator[bytes]:
        """The SSE body: role chunk, token chunks, finish chunk, optional usage chunk, [DONE]."""
        if self.chat:
            yield self._chunk({"role": "assistant", "content": ""}, None)
        async with contextlib.aclosing(self._tokens()) as tokens:
            sent = 0
            async for delta in tokens:
                yield self._chunk(delta, None)
                sent += 1
                if self.truncate and sent * 2 >= self.num_out:
                    return  # a broken stream: no finish_reason, no [DONE]
        yield self._chunk({} if self.chat else "", self.finish)
        self._count()
        if self.include_usage:
            body = {"id": self.id, "object": "chat.completion.chunk", "model": self.cfg.model, "choices": []}
            yield f"data: {json.dumps(body | {'usage': self._usage()})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def whole(self) -> dict[str, Any]:
        """The non-streamed response body."""
        content, args = [], []
        async for delta in self._tokens():
            if isinstance(delta, str):
                content.append(delta)
            elif "content" in delta:
                content.append(delta["content"])
            else:
                args.append(delta["tool_calls"][0].get("function", {}).get("arguments", ""))
        self._count()
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish}
        if not self.chat:
            choice["text"] = "".join(content)
        elif self.name is not None:
            call: dict[str, Any] = {"id": f"call_{self.id[-8:]}", "type": "function"}
            call["function"] = {"name": self.name, "arguments": "".join(args)}
            choice["message"] = {"role": "assistant", "content": None, "tool_calls": [call]}
        else:
            choice["message"] = {"role": "assistant", "content": "".join(content)}
        obj = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "model": self.cfg.model,
            "choices": [choice],
            "usage": self._usage(),
        }

    def _count(self) -> None:
        self.state.num_completed += 1
        self.state.prompt_tokens += self.prompt_tokens
        self.state.completion_tokens += self.num_out


@contextlib.contextmanager
def running_fake_server(*flags: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Start this server in a subprocess on a free port; yields its base URL and process, stops it after."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--port", "0", *flags], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"fake server did not start (exit code {proc.poll()}): {line!r}")
        url = f"http://127.0.0.1:{int(line.split()[1])}"
        deadline = time.monotonic() + 30
        while True:  # the socket is bound before uvicorn listens on it
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this (child) process when its parent dies: uvicorn exits by re-raising SIGTERM."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> None:
    """Serve until killed; `--spawn-child` starts a `sleep` child to stand in for worker processes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default=FakeConfig.model)
    parser.add_argument("--ttft-ms", type=float, default=FakeConfig.ttft_ms)
    parser.add_argument("--itl-ms", type=float, default=FakeConfig.itl_ms)
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--truncate-every", type=int, default=0)
    parser.add_argument("--base-pages", type=int, default=0)
    parser.add_argument("--spawn-child", action="store_true")
    args = parser.parse_args(argv)
    cfg = FakeConfig(
        model=args.model,
        ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms,
        fail_every=args.fail_every,
        truncate_every=args.truncate_every,
        base_pages=args.base_pages,
    )
    child = subprocess.Popen(["sleep", "3600"], preexec_fn=_die_with_parent) if args.spawn_child else None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(build_app(cfg), log_level="warning", lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        if child is not None:
            child.terminate()
            child.wait()


if __name__ == "__main__":
    main(sys.argv[1:])
