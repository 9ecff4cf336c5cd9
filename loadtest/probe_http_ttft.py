"""Where a streamed request's first token spends its time over HTTP: a per-hop timeline, one request at a time.

    python -P loadtest/probe_http_ttft.py                         # the tiny model, 16-token prompts, 30 requests
    python -P loadtest/probe_http_ttft.py --lengths 16 256 --requests 50 --route chat -- --device cpu

The server (`launch_server` with the flags after `--`; the tiny model by default) runs in a subprocess started from
this file, which wraps a few functions of the frontend and of the rank process (spawned children import this file
again, so they are wrapped too) to append `label pid perf_counter_ns` lines to one trace file. perf_counter is
CLOCK_MONOTONIC on Linux, one clock for every process of the machine, so the lines of all processes and of the
client sort into one timeline. Each request's timeline starts at the client's send; the table gives each hop's
first time after it (median and best over the requests) and the step from the hop before. Timing wrappers cost a
few microseconds each (~20 hops), and only this probe has them: bench_ttft.py measures the unwrapped server.
The client is bench_ttft's (`HttpClient`): one keep-alive connection for every request, as pooling clients (the
openai SDK) send; `--new-connections` opens one a request (its connect is before the send, outside the timeline).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import inspect
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

_TRACE = "BALEEN_PROBE_TRACE"  # the trace file, inherited by the server and its spawned rank processes


# ---- the tracer (server side) ------------------------------------------------------------------------------
class Tracer:
    """Appends `label pid ns` lines to the trace file (O_APPEND: one write per line, whole, from any process)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.pid = os.getpid()

    def mark(self, label: str) -> None:
        os.write(self.fd, f"{label} {self.pid} {time.perf_counter_ns()}\n".encode())

    def wrap(self, owner: Any, name: str, label: Callable[..., str | None] | str, at: str = "exit") -> None:
        """Mark `label` (or `label(*args)`, None: no mark) when owner.name is entered or returns."""
        fn = getattr(owner, name)
        name_of: Callable[..., str | None] = label if callable(label) else (lambda *a, **k: label)
        mark = self.mark

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
                tag = name_of(*args, **kwargs)
                if tag and at == "enter":
                    mark(tag)
                out = await fn(*args, **kwargs)
                if tag and at == "exit":
                    mark(tag)
                return out

            setattr(owner, name, wrapped_async)
            return

        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            tag = name_of(*args, **kwargs)
            if tag and at == "enter":
                mark(tag)
            out = fn(*args, **kwargs)
            if tag and at == "exit":
                mark(tag)
            return out

        setattr(owner, name, wrapped)


def _msg_label(prefix: str, kinds: tuple[str, ...]) -> Callable[..., str | None]:
    def label(self: Any, msg: Any, *rest: Any) -> str | None:
        kind = type(msg).__name__
        return f"{prefix} {kind}" if kind in kinds else None
    return label


def _batch_label(prefix: str, kinds: tuple[str, ...]) -> Callable[..., str | None]:
    def label(self: Any, messages: list[Any]) -> str | None:
        found = [type(m).__name__ for m in messages if type(m).__name__ in kinds]
        return f"{prefix} {found[0]}" if found else None
    return label


def install(path: str) -> None:
    """Wrap the hops of a request's first token in this process (frontend or rank process)."""
    from uvicorn.protocols.http import h11_impl

    from baleen.actors import channel, detokenizer, scheduler, worker
    from baleen.api import generation, server, serving_chat, serving_completion

    t = Tracer(path)
    kinds = ("NewRequest", "StepPlan", "StepResult", "TokenDeltas")
    t.wrap(h11_impl.H11Protocol, "data_received", "1 http bytes in", at="enter")
    try:
        from uvicorn.protocols.http import httptools_impl

        t.wrap(httptools_impl.HttpToolsProtocol, "data_received", "1 http bytes in", at="enter")
    except ImportError:
        pass
    t.wrap(server._Frontend, "_authorized", "2 asgi app entered", at="enter")  # not __call__: uvicorn calls the app
    # with no arguments to tell a factory, and a wrapped __call__ would not raise the TypeError that says "no"
    for module in (serving_completion, serving_chat):
        t.wrap(module, "read_body", "3 body read")
    t.wrap(serving_completion.p, "decode_completion_request", "4 body decoded")
    t.wrap(serving_chat.p, "decode_chat_request", "4 body decoded")
    t.wrap(serving_completion, "_prepare", "5 tokenized + admitted")
    t.wrap(serving_chat, "_prepare", "5 tokenized + admitted")
    for cls in (channel.ShmChannel, channel.LocalChannel):
        t.wrap(cls, "send", _msg_label("send", kinds), at="enter")
    t.wrap(scheduler.SchedulerActor, "decide", _batch_label("scheduler got", ("NewRequest", "StepResult")), at="enter")
    t.wrap(worker.WorkerActor, "_cpu_step", "step start", at="enter")
    t.wrap(worker.WorkerActor, "_cpu_step", "step computed")
    t.wrap(detokenizer.DetokenizerActor, "decide", _batch_label("detokenizer got", ("TokenDeltas",)), at="enter")
    t.wrap(generation.Generation, "first", "first output in route")

    def asgi_send(self: Any, message: dict[str, Any]) -> str | None:
        if message["type"] == "http.response.body" and message.get("body"):
            return "SSE body chunk written"
        return "headers written" if message["type"] == "http.response.start" else None

    t.wrap(h11_impl.RequestResponseCycle, "send", asgi_send, at="enter")
    try:
        from uvicorn.protocols.http import httptools_impl

        t.wrap(httptools_impl.RequestResponseCycle, "send", asgi_send, at="enter")
    except ImportError:
        pass


if os.environ.get(_TRACE) and __name__ == "__mp_main__":  # a spawned rank process of the traced server
    install(os.environ[_TRACE])


# ---- the client --------------------------------------------------------------------------------------------
def _load_sibling(name: str) -> Any:
    """A loadtest script beside this one, loaded as a module (loadtest is not a package)."""
    spec = importlib.util.spec_from_file_location(f"loadtest_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A completions chunk is sent for every output with tokens (its text may be "": a partial UTF-8 character); a chat
# stream's first chunk names the role, with content "" until there is text.
_CARRIES_TEXT = {"completions": re.compile(rb'"text"'), "chat": re.compile(rb'"content":"[^"]')}
_CLIENT_MARKS = {"send": "0 client send", "first token": "client got first token"}


def _payload(args: argparse.Namespace, prompt: list[int]) -> tuple[bytes, dict[str, Any]]:
    if args.route == "chat":
        text = " ".join(str(x) for x in prompt)  # about len(prompt) tokens of the default tokenizer
        path, payload = b"/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}
    else:
        path, payload = b"/v1/completions", {"prompt": prompt}
    return path, payload | {"model": "default", "max_tokens": args.max_tokens, "temperature": 0.0,
                            "ignore_eos": True, "stream": True}


Target = Callable[[list[int]], Awaitable[float]]  # a prompt's TTFT (s); marks its send and its first token


def http_target(args: argparse.Namespace, host: str, port: int, t: Tracer) -> tuple[Target, Callable[[], None]]:
    """Streamed requests to a server through bench_ttft's client, over one keep-alive connection (or a new connection
    a request with --new-connections); and the client's close."""
    client = _load_sibling("bench_ttft").HttpClient(host, port, fresh=args.new_connections,
                                                    mark=lambda event: t.mark(_CLIENT_MARKS[event]))

    async def ttft(prompt: list[int]) -> float:
        times = await client.post(*_payload(args, prompt), _CARRIES_TEXT[args.route])
        if not times:
            raise RuntimeError("a stream ended without a token")
        return times[0]

    return ttft, client.close


def engine_target(args: argparse.Namespace, engine: Any, t: Tracer) -> Target:
    """The in-process Engine's TTFT: generate() to its first output with tokens."""
    from baleen.messages import SamplingParams

    sampling = SamplingParams(max_new_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)

    async def ttft(prompt: list[int]) -> float:
        t.mark("0 client send")
        started, first = time.perf_counter(), None
        async for out in engine.generate(prompt, sampling):
            if first is None and out.token_ids:
                t.mark("client got first token")
                first = time.perf_counter() - started
        if first is None:
            raise RuntimeError("a request ended without a token")
        return first

    return ttft


async def run_requests(args: argparse.Namespace, targets: list[Target], length: int) -> list[list[float]]:
    """Per target, the TTFTs of 3 warm-ups + --requests requests of `length` prompt tokens: one request at a time,
    each round the same prompt to every target in turn, the order reversed each round (a request right after one
    to the same server finds its processes warmer: ~0.15 ms on the 2-core VM)."""
    rng = random.Random(5)
    ttfts: list[list[float]] = [[] for _ in targets]
    order = list(range(len(targets)))
    for i in range(3 + args.requests):
        prompt = [rng.randrange(100, 1000) for _ in range(length)]
        for k in order:
            await asyncio.sleep(args.gap_ms / 1e3)
            ttft = await targets[k](prompt)
            if i >= 3:
                ttfts[k].append(ttft)
        order.reverse()
    return ttfts


def _by_target(requests: list[dict[str, int]], num_targets: int) -> list[list[dict[str, int]]]:
    """run_requests' timelines per target, warm-ups dropped."""
    out: list[list[dict[str, int]]] = [[] for _ in range(num_targets)]
    order = list(range(num_targets))
    for i in range(0, len(requests), num_targets):
        for k, r in zip(order, requests[i : i + num_targets]):
            out[k].append(r)
        order.reverse()
    return [rows[3:] for rows in out]


async def probe(args: argparse.Namespace, names: list[str], servers: list[tuple[str, int]], trace: Path) -> None:
    """Time every length over each target (the servers, and with --engine / --vs-engine the in-process Engine first),
    alternating; print each target's timeline table and, for two targets, their difference paired by round."""
    t = Tracer(str(trace))
    targets: list[Target] = []
    async with contextlib.AsyncExitStack() as stack:
        if args.engine or args.vs_engine:
            from baleen.actors.engine import Engine, EngineConfig
            from baleen.model.make_model import tiny_model_path

            install(str(trace))  # this process runs the engine's actors: trace them as the server's
            engine = await stack.enter_async_context(await Engine.start(EngineConfig(model_path=str(tiny_model_path()))))
            targets.append(engine_target(args, engine, t))
        for host, port in servers:
            target, close = http_target(args, host, port, t)
            targets.append(target)
            stack.callback(close)
        for length in args.lengths:
            trace.write_text("")
            ttfts = await run_requests(args, targets, length)
            requests = timeline(trace)  # one per request, in the order sent
            assert len(requests) == len(targets) * (3 + args.requests), "a request's trace is incomplete"
            per_target = _by_target(requests, len(targets))
            for k, name in enumerate(names):
                _print(f"{name}, {length}-token prompt", ttfts[k], per_target[k])
            if len(targets) == 2:  # paired by round: both requests of a round met the same load
                print(f"## {names[1]} - {names[0]}: {paired(*(_rest(rows) for rows in per_target))}")
            if args.keep_trace is not None:
                args.keep_trace.write_text(trace.read_text())


@contextlib.contextmanager
def traced_server(flags: list[str], trace: Path, baseline: Path | None) -> Iterator[tuple[str, int]]:
    """A `launch_server` subprocess traced into `trace` (of the code under `baseline`/baleen when given): its address."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{_TRACE: str(trace)})
    if baseline is not None:
        if not (baseline / "baleen" / "__init__.py").is_file():
            raise SystemExit(f"--baseline {baseline}: no baleen/ checkout in it (e.g. `git worktree add "
                             f"{baseline}/baleen <commit>`)")
        env["PYTHONPATH"] = str(baseline)  # ahead of the installed (editable) baleen
    cmd = [sys.executable, "-P", __file__, "--serve", "--", *flags, "--port", "0"]
    with _load_sibling("bench_ttft").server_process(cmd, env) as address:
        yield address


_AFTER_STEP = ("send StepResult", "scheduler got StepResult", "send TokenDeltas", "detokenizer got TokenDeltas",
               "first output in route", "headers written", "SSE body chunk written")


def _rest(requests: list[dict[str, int]]) -> list[int]:
    """Each request's TTFT less its first step's forward (ns): the forward varies most on a shared machine; without
    it the rest is what HTTP and the actors add."""
    return [r["client got first token"] - (r["step computed"] - r["step start"]) for r in requests
            if "step start" in r and "step computed" in r]


def paired(before: list[int], after: list[int]) -> str:
    """after - before, paired by round (ns lists): the mean with its 95 % interval over the rounds (the tenth of
    rounds furthest from the median on each side dropped: a stall of a few ms on a shared machine), the median, the
    rounds lower, and the difference of the bests."""
    diffs = sorted(b - a for a, b in zip(before, after, strict=True))
    cut = len(diffs) // 10
    kept = diffs[cut : len(diffs) - cut] if len(diffs) > 2 * cut + 1 else diffs
    mean, half = statistics.fmean(kept), 1.96 * statistics.stdev(kept) / len(kept) ** 0.5 if len(kept) > 1 else 0.0
    return (f"paired by round, TTFT less the forward: trimmed mean {mean / 1e3:+.0f} +- {half / 1e3:.0f} us, median "
            f"{statistics.median(diffs) / 1e3:+.0f} us, {sum(d < 0 for d in diffs)} of {len(diffs)} rounds lower; "
            f"best {(min(after) - min(before)) / 1e3:+.0f} us")


def _print(title: str, ttfts: list[float], requests: list[dict[str, int]]) -> None:
    rest = _rest(requests)
    print(f"## {title}, {len(ttfts)} requests: TTFT median {statistics.median(ttfts) * 1e3:.2f} ms, "
          f"best {min(ttfts) * 1e3:.2f} ms; TTFT less the first step's forward: median "
          f"{statistics.median(rest) / 1e6:.2f} ms, best {min(rest) / 1e6:.2f} ms")
    print(table(requests))


def timeline(path: Path) -> list[dict[str, int]]:
    """Per request: each label's first time (ns) after the client's send, relative to it.

    The hops after the step count only once its first step is computed: the previous request's tail (its abort,
    its last metrics, the write of its [DONE]) may still run after the next request was sent."""
    rows = sorted((int(ns), label) for label, _, ns in
                  (line.rsplit(" ", 2) for line in path.read_text().splitlines() if line))
    out: list[dict[str, int]] = []
    current: dict[str, int] | None = None
    start = 0
    for ns, label in rows:
        if label == "0 client send":
            current, start = {}, ns
            out.append(current)
        elif current is not None and label not in current:
            if label in _AFTER_STEP and "step computed" not in current:
                continue
            current[label] = ns - start
    return [r for r in out if "client got first token" in r]


def table(requests: list[dict[str, int]]) -> str:
    """Each hop's time after the send and its step from the hop before (medians and bests over the requests)."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for r in requests:
        for label, ns in r.items():
            if ns <= r["client got first token"]:
                by_label[label].append(ns)
    order = sorted(by_label, key=lambda k: statistics.median(by_label[k]))
    lines = ["| hop | at: median us | best us | step from the hop before: median us | best us | seen in |",
             "|---|---|---|---|---|---|"]
    for i, label in enumerate(order):
        at = by_label[label]
        steps = [r[label] - (r[order[i - 1]] if i else 0) for r in requests if label in r and (i == 0 or order[i - 1] in r)]
        lines.append(f"| {label} | {statistics.median(at) / 1e3:.0f} | {min(at) / 1e3:.0f} | "
                     f"{statistics.median(steps) / 1e3:.0f} | {min(steps) / 1e3:.0f} | {len(at)}/{len(requests)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16])
    ap.add_argument("--requests", type=int, default=30, help="requests per length (after 3 warm-ups)")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--gap-ms", type=float, default=0.0,
                    help="pause between requests (the previous request's tail then no longer overlaps the next)")
    ap.add_argument("--route", choices=("completions", "chat"), default="completions")
    ap.add_argument("--new-connections", action="store_true",
                    help="a new connection a request (default: one keep-alive connection, as pooling clients send)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a folder holding a `baleen` checkout (a git worktree of the base commit): a second server "
                         "runs that code, and the requests alternate between the two (an A/B under the same noise)")
    ap.add_argument("--engine", action="store_true", help="trace the in-process Engine instead (the tiny model)")
    ap.add_argument("--vs-engine", action="store_true",
                    help="alternate the in-process Engine (the tiny model) and the server: what HTTP adds, paired")
    ap.add_argument("--keep-trace", type=Path, default=None, help="copy the raw trace here")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the traced server subprocess
    ap.add_argument("server_flags", nargs="*", help="launch_server flags (after --)")
    args = ap.parse_args(argv)
    if args.serve:
        install(os.environ[_TRACE])
        from baleen.api.cli import serve_main

        return serve_main(args.server_flags, prog="probe server")

    if (args.engine or args.vs_engine) and args.route != "completions":
        ap.error("the in-process Engine is given token ids: --engine and --vs-engine time --route completions")
    trace = Path(tempfile.mkstemp(prefix="probe-ttft-", suffix=".trace")[1])
    connection = "a new connection a request" if args.new_connections else "one keep-alive connection"
    names = [] if not (args.engine or args.vs_engine) else ["in-process Engine"]
    if not args.engine:
        names += ([] if args.baseline is None else [f"HTTP, baseline {args.baseline}"]) + ["HTTP, this checkout"]
    names = [f"{n}, {args.route}, {connection}" if n.startswith("HTTP") else n for n in names]
    try:
        with contextlib.ExitStack() as stack:
            from baleen.actors.actor import run
            from baleen.model.make_model import tiny_model_path

            flags = args.server_flags
            if "--model-path" not in flags:
                flags = ["--model-path", str(tiny_model_path()), *flags]
            servers = [stack.enter_context(traced_server(flags, trace, args.baseline if "baseline" in n else None))
                       for n in names if n.startswith("HTTP")]  # fmt: skip
            run(probe(args, names, servers, trace))
    finally:
        trace.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
