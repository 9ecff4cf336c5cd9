"""Time to first token and per-token time against the prefill compute: in-process Engine and over HTTP.

    python loadtest/bench_ttft.py                                  # CPU: the tiny model, 16 tokens to its context
    python loadtest/bench_ttft.py --preset v3-shape --device cuda --context-length 20000 \
        --lengths 16 128 512 2048 8192 16384 --cached-prefix 2048 8192 16384 --out ttft.json

Every prompt is fresh random token ids (no prefix-cache hit unless asked for), generated greedily. Per length:
- compute: the model forward alone over the prompt, in chunks of --chunked-prefill-size as the engine runs it, plus
  its last token's logits, on a runner built as the worker builds it (`build_runner`), before the engine starts;
  the prefill throughput at that length is prompt tokens / compute;
- engine: TTFT of the in-process `Engine` (from `generate()` to its first output; --ttft-new-tokens tokens asked,
  more than one, so that a first token held back until the next step is computed shows);
- http: TTFT through `launch_server` in a subprocess (a streamed /v1/completions of the token ids, from the request
  to the first SSE chunk that carries a token; a raw socket client, so the client adds little), over one
  keep-alive connection as pooling clients (the openai SDK) send, and with a new connection a request;
Target (issue 20): TTFT <= 2 ms + 1.2 x prompt tokens / prefill throughput; the "x target" columns are TTFT over
that (<= 1 meets it). Per-token time: (last - first token) / (tokens - 1) of one --decode-tokens greedy stream.
`--cached-prefix L ...`: TTFT of L cached tokens + --suffix-len new ones, after one request cached those L, against
the suffix alone (the issue's target: within 1.3x). Each time is the best of --repeats (the machine may be shared);
the last column is each length's first request (a Triton compile of a new shape on the request path shows there).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import torch

from baleen.actors.engine import Engine
from baleen.actors.engine_config import EngineConfig, default_attention_backend
from baleen.messages import SamplingParams
from baleen.model.batch import ForwardBatch
from baleen.model.config import ModelConfig

DEFAULT_LENGTHS = [16, 64, 256, 1024, 4096, 16384]
FIXED_S, SLOPE = 2e-3, 1.2  # the target: TTFT <= 2 ms + 1.2 x tokens / prefill throughput
T = TypeVar("T")
_READY = re.compile(r"baleen is ready: serving .* at http://([\d.]+):(\d+)/v1 ")
_COMPLETION_TEXT = re.compile(rb'"text"')  # a /v1/completions chunk with text (may be "": a token's partial UTF-8)


def target_s(tokens: int, compute_s: float) -> float:
    """The issue's TTFT budget for a prompt whose forward alone takes `compute_s`."""
    return FIXED_S + SLOPE * compute_s if tokens else FIXED_S


@contextlib.contextmanager
def model_dir(args: argparse.Namespace) -> Iterator[Path]:
    """--model-path, or a dummy-weight --preset in a temporary folder (the tiny model's tokenizer beside it)."""
    if args.model_path is not None:
        yield Path(args.model_path)
        return
    from baleen.model.make_model import dummy_checkpoint, tiny_model_path

    if args.preset is None:
        yield tiny_model_path()
        return
    with dummy_checkpoint(args.preset) as path:
        yield path


def engine_config(args: argparse.Namespace, path: Path) -> EngineConfig:
    return EngineConfig(model_path=str(path), device=args.device, dtype=args.dtype,
                        load_format="dummy" if args.preset else "auto", context_length=args.context_length,
                        chunked_prefill_size=args.chunked_prefill_size, page_size=args.page_size,
                        enable_mixed_chunk=args.enable_mixed_chunk)


def serve_flags(args: argparse.Namespace, path: Path) -> list[str]:
    flags = ["--model-path", str(path), "--port", "0"]  # at log level info: its ready line says the port
    for name in ("device", "dtype", "context_length", "chunked_prefill_size", "page_size"):
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    if args.preset:
        flags += ["--load-format", "dummy"]
    if args.enable_mixed_chunk:
        flags.append("--enable-mixed-chunk")
    return flags


# ---- compute: the forward alone ----------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def compute_times(args: argparse.Namespace, path: Path, lengths: list[int], chunk: int,
                  cached: dict[int, float] | None = None) -> dict[int, float]:
    """Seconds of the model forward (+ last-token logits) over each prompt length, chunked; best of --repeats.
    With `cached`, also fills it: for each --cached-prefix, the forward of --suffix-len new tokens over that many
    cached ones (the prefix's latents written first, untimed)."""
    from baleen.actors.engine_config import plan_startup  # the worker settings the engine would start with

    cfg = ModelConfig.from_hf(str(path))
    from baleen.model.build import build_runner

    worker = plan_startup(engine_config(args, path), str(path), cfg).worker
    runner = build_runner(worker)
    device, ps = runner.device, worker.page_size
    rng = random.Random(1)
    out: dict[int, float] = {}
    try:
        pages = list(range(1, 1 + -(-max(lengths) // ps)))
        if pages[-1] >= runner.kv_cache.num_pages:
            raise SystemExit(f"the KV pool ({runner.kv_cache.num_pages} pages) is too small for {max(lengths)} tokens")
        for length in [lengths[0], *lengths]:  # the first run warms up
            best = float("inf")
            for _ in range(args.repeats):
                ids = [rng.randrange(100, cfg.vocab_size - 100) for _ in range(length)]
                batches = [ForwardBatch.build(ids[s : s + chunk], [s], [min(chunk, length - s)], [pages], ps,
                                              device=device) for s in range(0, length, chunk)]  # fmt: skip
                _sync(device)
                started = time.perf_counter()
                for batch in batches:
                    runner.attn.plan(batch)
                    hidden = runner.model(batch, runner.kv_cache, runner.attn)
                runner.model.compute_logits(hidden[-1:]).argmax(-1).cpu()
                best = min(best, time.perf_counter() - started)
            out[length] = best
        if cached is not None:
            _cached_compute(runner, args, cached, chunk, rng, cfg.vocab_size)
    finally:
        del runner
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _cached_compute(runner: Any, args: argparse.Namespace, out: dict[int, float], chunk: int, rng: random.Random,
                    vocab: int) -> None:
    """out[prefix] = seconds of the --suffix-len-token forward (+ its last logits) over `prefix` cached tokens."""
    device, ps = runner.device, runner.kv_cache.page_size
    for prefix in args.cached_prefix:
        total = prefix + args.suffix_len
        pages = list(range(1, 1 + -(-total // ps)))
        if pages[-1] >= runner.kv_cache.num_pages:
            continue  # the bare runner's pool is too small for it
        head = [rng.randrange(100, vocab - 100) for _ in range(prefix)]
        for s in range(0, prefix, chunk):  # the prefix's latents, untimed
            batch = ForwardBatch.build(head[s : s + chunk], [s], [min(chunk, prefix - s)], [pages], ps, device=device)
            runner.attn.plan(batch)
            runner.model(batch, runner.kv_cache, runner.attn)
        best = float("inf")
        for _ in range(args.repeats + 1):  # the first warms up
            suffix = [rng.randrange(100, vocab - 100) for _ in range(args.suffix_len)]
            batch = ForwardBatch.build(suffix, [prefix], [args.suffix_len], [pages], ps, device=device)
            _sync(device)
            started = time.perf_counter()
            runner.attn.plan(batch)
            hidden = runner.model(batch, runner.kv_cache, runner.attn)
            runner.model.compute_logits(hidden[-1:]).argmax(-1).cpu()
            best = min(best, time.perf_counter() - started)
        out[prefix] = best


def off_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a thread that ends after it: its OpenMP team goes with it (one team per process; see
    actors/worker.py `cpu_thread`: a second one would slow the engine measured next)."""
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)))
    thread.start()
    thread.join()
    if not out:
        raise SystemExit("the compute measurement failed (its traceback is above)")
    return out[0]


# ---- the in-process Engine ---------------------------------------------------------------------------------
def _prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab - 100) for _ in range(n)]


def per_token(times: list[float]) -> float:
    """Seconds per token after the first, over one stream's token arrival times."""
    return (times[-1] - times[0]) / max(1, len(times) - 1)


async def engine_stream(engine: Engine, prompt: list[int], max_new: int) -> list[float]:
    """Seconds from generate() to each output that carries tokens."""
    times: list[float] = []
    started = time.perf_counter()
    sampling = SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
    async for out in engine.generate(prompt, sampling):
        if out.error is not None:
            raise RuntimeError(f"a {len(prompt)}-token prompt failed: {out.error}")
        if out.token_ids:
            times.append(time.perf_counter() - started)
    return times


async def engine_run(args: argparse.Namespace, path: Path, lengths: list[int], vocab: int) -> dict[str, Any]:
    rng = random.Random(2)
    res: dict[str, Any] = {"ttft": {}, "ttft_first": {}, "cached": {}}
    async with await Engine.start(engine_config(args, path)) as engine:
        for length in [lengths[0], *lengths]:  # the first round warms up
            ttfts = [(await engine_stream(engine, _prompt(rng, length, vocab), args.ttft_new_tokens))[0]
                     for _ in range(args.repeats)]  # fmt: skip
            res["ttft"][length] = min(ttfts)
            res["ttft_first"].setdefault(length, ttfts[0])  # a length's first request: any compile on its path
        res["per_token"] = min([per_token(await engine_stream(engine, _prompt(rng, 16, vocab), args.decode_tokens))
                                for _ in range(args.repeats)])  # fmt: skip
        for prefix in args.cached_prefix:
            res["cached"][prefix] = await _cached_ttft(functools.partial(engine_stream, engine), rng, prefix, args, vocab)
    return res


async def _cached_ttft(stream: Callable[[list[int], int], Awaitable[list[float]]], rng: random.Random, prefix: int,
                       args: argparse.Namespace, vocab: int) -> tuple[float, float]:
    """(TTFT of a cached `prefix` + --suffix-len new tokens, TTFT of the suffix alone), best of --repeats."""
    with_prefix, alone = float("inf"), float("inf")
    for _ in range(args.repeats):
        head = _prompt(rng, prefix, vocab)
        await stream(head, 1)  # caches its pages
        suffix = _prompt(rng, args.suffix_len, vocab)
        n = args.ttft_new_tokens
        with_prefix = min(with_prefix, (await stream(head + suffix, n))[0])
        alone = min(alone, (await stream(_prompt(rng, args.suffix_len, vocab), n))[0])
    return with_prefix, alone


# ---- over HTTP ---------------------------------------------------------------------------------------------
class HttpClient:
    """A raw-socket client of streamed OpenAI routes: one keep-alive connection reused by every request (as the
    openai SDK's pooled connections are), or with `fresh` a new connection a request whose connect is timed too.
    `mark(event)`, when given, is called at the request's "send" (after any connect) and its "first token"
    (probe_http_ttft.py stamps them into its trace)."""

    def __init__(self, host: str, port: int, fresh: bool = False, mark: Callable[[str], None] | None = None) -> None:
        self.host, self.port, self.fresh, self.mark = host, port, fresh, mark
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def stream(self, prompt: list[int], max_new: int) -> list[float]:
        """A streamed /v1/completions of token ids: seconds from the request to each SSE chunk that carries text."""
        return await self.post(b"/v1/completions", {"model": "default", "prompt": prompt, "max_tokens": max_new,
                                                    "temperature": 0.0, "ignore_eos": True, "stream": True},
                               _COMPLETION_TEXT)

    async def post(self, path: bytes, payload: dict[str, Any], carries_text: re.Pattern[bytes]) -> list[float]:
        """Seconds from sending a streamed request to each SSE chunk that `carries_text` matches ([DONE] excluded)."""
        body = json.dumps(payload).encode()
        started = time.perf_counter()
        if self._conn is None or self.fresh:
            self._conn = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._conn
        if self.mark is not None:
            self.mark("send")
        writer.write(b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: %s\r\n\r\n%s"
                     % (path, len(body), b"close" if self.fresh else b"keep-alive", body))
        times: list[float] = []
        buf = b""
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    raise RuntimeError(f"the stream ended without [DONE]: {buf[-300:]!r}")
                now = time.perf_counter() - started
                buf += data
                *events, buf = buf.split(b"\n\n")
                for event in events:
                    chunk = event.partition(b"data: ")[2]
                    if chunk == b"[DONE]":
                        if not self.fresh:  # the chunked body's last chunk ends the response on this connection
                            while not buf.endswith(b"0\r\n\r\n"):
                                buf += await reader.read(1 << 16)
                        return times
                    if b'"error"' in chunk:
                        raise RuntimeError(f"the server sent an error: {chunk[:300]!r}")
                    if carries_text.search(chunk):
                        if not times and self.mark is not None:
                            self.mark("first token")
                        times.append(now)
        except BaseException:
            self.close()
            raise
        finally:
            if self.fresh:
                self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None


async def http_run(args: argparse.Namespace, host: str, port: int, lengths: list[int], vocab: int) -> dict[str, Any]:
    rng = random.Random(3)
    res: dict[str, Any] = {"ttft": {}, "ttft_first": {}, "ttft_new_connection": {}, "cached": {}}
    client, fresh = HttpClient(host, port), HttpClient(host, port, fresh=True)
    try:
        for length in [lengths[0], *lengths]:
            ttfts = [(await client.stream(_prompt(rng, length, vocab), args.ttft_new_tokens))[0]
                     for _ in range(args.repeats)]  # fmt: skip
            res["ttft"][length] = min(ttfts)
            res["ttft_first"].setdefault(length, ttfts[0])
            res["ttft_new_connection"][length] = min([
                (await fresh.stream(_prompt(rng, length, vocab), args.ttft_new_tokens))[0]
                for _ in range(args.repeats)])  # fmt: skip
        res["per_token"] = min([per_token(await client.stream(_prompt(rng, 16, vocab), args.decode_tokens))
                                for _ in range(args.repeats)])  # fmt: skip
        for prefix in args.cached_prefix:
            res["cached"][prefix] = await _cached_ttft(client.stream, rng, prefix, args, vocab)
    finally:
        client.close()
    return res


@contextlib.contextmanager
def server_process(cmd: list[str], env: dict[str, str], timeout_s: float = 600.0) -> Iterator[tuple[str, int]]:
    """A server subprocess (`cmd`, logging to a temporary file) until it says it is ready: its (host, port). A server
    that died before the block ended is a SystemExit with its log's end."""
    log = tempfile.NamedTemporaryFile(prefix="baleen-server-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while (m := _READY.search(Path(log.name).read_text(errors="replace"))) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{Path(log.name).read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        yield m.group(1), int(m.group(2))
        if proc.poll() is not None:
            raise SystemExit(f"the server died during the run:\n{Path(log.name).read_text(errors='replace')[-3000:]}")
    finally:
        proc.terminate()
        proc.wait(30)
        os.unlink(log.name)


def serve_and_run(args: argparse.Namespace, path: Path, lengths: list[int], vocab: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "baleen.launch_server", *serve_flags(args, path)]
    with server_process(cmd, env, args.server_timeout) as (host, port):
        return asyncio.run(http_run(args, host, port, lengths, vocab))


# ---- report ------------------------------------------------------------------------------------------------
def report(results: dict[str, Any]) -> str:
    lines = [f"# bench_ttft — {results['model']} on {results['device']}, {results['date']}, "
             f"chunk {results['chunk']}, {results['cpu_count']} CPU cores",
             "| prompt | compute ms | prefill tok/s | target ms | engine TTFT ms | x target | HTTP TTFT ms | x target "
             "| HTTP, new connection ms | first request: engine / HTTP ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    eng, http = results.get("engine", {}), results.get("http", {})

    def cols(ttft: float | None, target: float) -> str:
        return "- | -" if ttft is None else f"{ttft * 1e3:.2f} | {ttft / target:.2f}"

    def ms(t: float | None) -> str:
        return "-" if t is None else f"{t * 1e3:.2f}"

    def first(r: dict[str, Any], n: int) -> str:
        t = r.get("ttft_first", {}).get(n)
        return "-" if t is None else f"{t * 1e3:.1f}"

    for n, c in results["compute_s"].items():
        t = target_s(n, c)
        lines.append(f"| {n} | {c * 1e3:.2f} | {n / c:.0f} | {t * 1e3:.2f} | {cols(eng.get('ttft', {}).get(n), t)} | "
                     f"{cols(http.get('ttft', {}).get(n), t)} | {ms(http.get('ttft_new_connection', {}).get(n))} | "
                     f"{first(eng, n)} / {first(http, n)} |")
    per = [f"{name} {r['per_token'] * 1e3:.2f} ms" for name, r in (("engine", eng), ("HTTP", http)) if r]
    lines.append(f"per token after the first (one {results['decode_tokens']}-token stream): " + ", ".join(per))
    for prefix, c in results.get("cached_compute_s", {}).items():
        alone = results["compute_s"].get(results["suffix_len"])
        vs = f" (the suffix alone: {alone * 1e3:.2f} ms)" if alone else ""
        lines.append(f"compute: cached {prefix} + {results['suffix_len']} new: {c * 1e3:.2f} ms{vs}")
    for name, r in (("engine", eng), ("HTTP", http)):
        for prefix, (with_prefix, alone) in r.get("cached", {}).items():
            lines.append(f"{name}: cached {prefix} + {results['suffix_len']} new: TTFT {with_prefix * 1e3:.2f} ms vs the "
                         f"suffix alone {alone * 1e3:.2f} ms -> {with_prefix / alone:.2f}x (target <= 1.3x)")
    return "\n".join(lines)


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    """The model and engine flags `model_dir` and `engine_config` read (bench_mixed_chunk takes them too)."""
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model-path", default=None, help="a checkpoint (default: the seeded tiny model)")
    src.add_argument("--preset", default=None, help="dummy weights of a preset instead, e.g. v3-shape")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--context-length", type=int, default=None)
    ap.add_argument("--chunked-prefill-size", type=int, default=None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap)
    ap.add_argument("--page-size", type=int, default=None)
    ap.add_argument("--enable-mixed-chunk", action="store_true")
    ap.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS,
                    help="prompt lengths (those past the context are dropped)")
    ap.add_argument("--ttft-new-tokens", type=int, default=4, help="tokens asked of each TTFT request (default 4)")
    ap.add_argument("--decode-tokens", type=int, default=64, help="tokens of the stream timed per token")
    ap.add_argument("--cached-prefix", type=int, nargs="*", default=[], help="cached prefix lengths to time")
    ap.add_argument("--suffix-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs each")
    ap.add_argument("--mode", choices=("both", "engine", "http"), default="both")
    ap.add_argument("--server-timeout", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with model_dir(args) as path:
        cfg = ModelConfig.from_hf(str(path))
        context = args.context_length or cfg.max_position_embeddings
        lengths = sorted({n for n in args.lengths if n + args.ttft_new_tokens <= context})
        args.cached_prefix = [n for n in args.cached_prefix if n + args.suffix_len + 1 <= context]
        if not lengths:
            raise SystemExit(f"no prompt length fits the context of {context} tokens")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        args.device = device
        chunk = args.chunked_prefill_size or (8192 if device.startswith("cuda") else 1024)
        results: dict[str, Any] = {
            "model": args.preset or path.name, "device": torch.cuda.get_device_name() if device.startswith("cuda")
            else "CPU", "date": date.today().isoformat(), "cpu_count": os.cpu_count(), "chunk": chunk,
            "attention_backend": default_attention_backend(device.startswith("cuda")), "suffix_len": args.suffix_len,
            "decode_tokens": args.decode_tokens,
        }  # fmt: skip
        cached: dict[int, float] = {}
        results["compute_s"] = off_thread(compute_times, args, path, lengths, chunk, cached)
        results["cached_compute_s"] = cached
        if args.mode != "http":
            results["engine"] = asyncio.run(engine_run(args, path, lengths, cfg.vocab_size))
            gc.collect()  # the server's rank process plans its memory from what is free: give back the engine's
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        if args.mode != "engine":
            results["http"] = serve_and_run(args, path, lengths, cfg.vocab_size)
    print(report(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
