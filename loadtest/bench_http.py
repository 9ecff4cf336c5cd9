"""Streaming throughput of the HTTP layer alone: the real app over a fake engine that yields tokens as fast as it can.

    .venv/bin/python loadtest/bench_http.py                    # concurrency 1, 8, 32, 128
    .venv/bin/python loadtest/bench_http.py --concurrency 16 --tokens 1000 --rounds 3

The server (a subprocess: baleen's Starlette app, uvicorn (httptools), uvloop, orjson) serves
/v1/chat/completions from `FastEngine`, which has the Engine's generate() surface and yields one token per
output without any model. N clients, each a raw asyncio socket that only counts SSE events (so the client
costs little next to the server), stream `--tokens` tokens each at the same time. The table gives tokens/s
through SSE, per-stream rates and time to the first chunk: the ceiling the frontend puts on any engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from baleen.actors.admission import Limits
from baleen.messages import CacheFlushed, RequestOutput, SamplingParams


class FastEngine:
    """The Engine surface with no model: generate() yields one token per output, yielding to the loop between."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer

        from baleen.model.make_model import default_model_path

        self.tokenizer = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
        self.model_path = "fast-fake"
        self.limits = Limits(max_context_len=1 << 20)
        self.num_requests = 0  # generate() streams open
        self.last_output_at = 0.0  # /health_generate then waits for its own token, which comes at once
        self.metrics: dict[str, float] = {}
        self.error: str | None = None

    @property
    def healthy(self) -> bool:
        return True

    async def generate(self, prompt: str | Sequence[int], sampling: SamplingParams | None = None, *,
                       rid: str | None = None) -> AsyncIterator[RequestOutput]:
        n = (sampling.max_new_tokens if sampling else None) or 16
        rid = rid or "r"
        self.num_requests += 1
        try:
            for i in range(1, n + 1):
                await asyncio.sleep(0)  # let the other streams (and the HTTP writes) run, as the detokenizer does
                yield RequestOutput(rid=rid, text=" tok", token_ids=[400 + i % 500],
                                    finish_reason="length" if i == n else None, prompt_tokens=len(prompt),
                                    completion_tokens=i)
        finally:
            self.num_requests -= 1

    async def abort(self, rid: str) -> None:
        return None

    async def abort_all(self) -> None:
        return None

    async def flush_cache(self, timeout: float = 30.0) -> CacheFlushed:
        return CacheFlushed(num_pages=0, num_held_pages=0)  # it caches nothing

    def info(self) -> dict[str, Any]:
        return {"model_path": self.model_path}


async def serve() -> None:
    """Run the real app over FastEngine on a free port; print `PORT n` once it listens."""
    from baleen.api.chat_template import ChatTemplate
    from baleen.api.server import create_app
    from baleen.api.state import ServerConfig, ServerState
    from baleen.launch_server import UvicornServer, uvicorn_config

    config = ServerConfig(port=0, log_level="warning")
    state = ServerState(FastEngine(), config, ChatTemplate.builtin("deepseek-v3"), None)
    server = UvicornServer(uvicorn_config(create_app(state), config), state)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    print("PORT", server.bound_url().rsplit(":", 1)[1], flush=True)
    await task


async def one_stream(port: int, tokens: int) -> tuple[int, float, float]:
    """(SSE events before [DONE], seconds to the first event, total seconds) of one streamed chat request."""
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens,
                       "stream": True}).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    events, first, tail = 0, 0.0, b""
    while True:
        data = await reader.read(1 << 16)
        if not data:
            break
        buf = tail + data  # `tail` keeps an event marker cut between two reads
        events += buf.count(b"data: ") - tail.count(b"data: ")
        if events and not first:
            first = time.perf_counter() - start
        if b"data: [DONE]" in buf:
            break
        tail = buf[-16:]
    writer.close()
    return events - 1, first, time.perf_counter() - start  # minus [DONE]


async def run_level(port: int, concurrency: int, tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    results = await asyncio.gather(*(one_stream(port, tokens) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    total = sum(r[0] for r in results)
    return {"concurrency": concurrency, "tokens": total, "seconds": wall, "tokens_per_s": total / wall,
            "per_stream_tokens_per_s": statistics.mean(r[0] / r[2] for r in results),
            "first_chunk_ms": 1000 * statistics.mean(r[1] for r in results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--tokens", type=int, default=2000, help="tokens per stream (default 2000)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat each level, report the best (default 1)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server subprocess
    args = parser.parse_args(argv)
    if args.serve:
        from baleen.actors.actor import run

        run(serve())
        return 0
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise SystemExit(f"the bench server did not start: {line!r}")
        port = int(line.split()[1])
        asyncio.run(run_level(port, 2, 50))  # warm-up
        rows = []
        for level in args.concurrency:
            runs = [asyncio.run(run_level(port, level, args.tokens)) for _ in range(args.rounds)]
            rows.append(max(runs, key=lambda r: r["tokens_per_s"]))
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"HTTP streaming through SSE, fake engine, {args.tokens} tokens per stream, {os.cpu_count()} CPU cores")
    print(f"{'streams':>8} {'tokens':>9} {'seconds':>8} {'tokens/s':>10} {'per stream tok/s':>17} {'first chunk ms':>15}")
    for r in rows:
        print(f"{r['concurrency']:>8} {r['tokens']:>9} {r['seconds']:>8.2f} {r['tokens_per_s']:>10.0f} "
              f"{r['per_stream_tokens_per_s']:>17.0f} {r['first_chunk_ms']:>15.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
