"""Serving benchmark for any OpenAI-compatible server (or SGLang's native /generate): TTFT, TPOT, ITL, E2E latency
and token throughput.

    python loadtest/bench_serving.py --backend openai --dataset-name random --random-input-len 1024 \
        --random-output-len 128 --num-prompts 200 --request-rate 8 --output-file out.json --plot out.png

Token counts come from the server's `usage` (streamed with `stream_options.include_usage`; /generate's
`meta_info`); the prompt lengths asked for are only targets. `--soak-seconds N` runs a fixed rate for N seconds and reports
failures, the RSS of `--watch-pid` processes and their children, and a Prometheus gauge once idle.

One file on purpose (past the usual 500 lines): it is copied to client machines and run there without
baleen installed (httpx, numpy and orjson are all it needs; --plot also loads plot.py beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

# Short common English words: each is one token in the usual BPE vocabularies, so N words ~ N tokens.
_WORD_TEXT = """
    the of and to in is you that it he was for on are as with his they at be this have from or one had by
    word but not what all were we when your can said there use an each which she do how their if will up
    other about out many then them these so some her would make like him into time has look two more
    write go see number no way could people my than first water been call who its now find long down day
    did get come made may part over new sound take only little work know place year live me back give
    most very after thing our just name good man think say great where help through much before line
    right too mean old any same tell boy follow came want show also around form three small set put end
    does another well large must big even such because turn here why ask went men read need land
    different home us move try kind hand picture again change off play air away animal house point page
    letter mother answer found study still learn should world high
"""
WORDS = tuple(_WORD_TEXT.split())
# --backend names users know from sglang.bench_serving, mapped to the API they exercise.
BACKENDS = {
    "openai": "chat",
    "openai-chat": "chat",
    "sglang-oai-chat": "chat",
    "openai-completions": "completions",
    "sglang-oai": "completions",
    "vllm": "completions",
    "sglang": "generate",  # SGLang's native API, as sglang.bench_serving --backend sglang
    "sglang-native": "generate",
}
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "generate": "/generate"}
PERCENTILES = {"mean": None, "median": 50.0, "p90": 90.0, "p99": 99.0}


def random_prompt(rng: random.Random, num_words: int) -> str:
    """`num_words` random common words: a fresh, uncacheable prompt of about that many tokens."""
    return " ".join(rng.choices(WORDS, k=num_words))


def sample_len(rng: random.Random, target: int, range_ratio: float) -> int:
    """A length uniform in [target * range_ratio, target] (at least 1), as sglang's random dataset does."""
    return rng.randint(max(1, int(target * range_ratio)), max(1, target))


class StreamError(ValueError):
    """The server's SSE stream was malformed, truncated or carried an error."""


def sse_data(line: str) -> str | None:
    """The payload of an SSE `data:` line ("[DONE]" or JSON text); None for blank lines and SSE comments/fields."""
    line = line.strip()
    if not line or line.startswith((":", "event:", "id:", "retry:")):
        return None
    if not line.startswith("data:"):
        raise StreamError(f"not an SSE data line: {line[:80]!r}")
    return line[5:].strip()


def parse_chunk(data: str) -> dict[str, Any]:
    """One chunk's JSON object; StreamError when it is not one, or is an error chunk."""
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise StreamError(f"chunk is not JSON ({exc}): {data[:80]!r}") from exc
    if not isinstance(chunk, dict):
        raise StreamError(f"chunk is not an object: {data[:80]!r}")
    if "error" in chunk:
        raise StreamError(f"server error in stream: {chunk['error']}")
    return chunk


@dataclass
class StreamParser:
    """Reads one OpenAI SSE response line by line and records when token-bearing chunks arrive."""

    start: float  # time.perf_counter() when the request was sent
    token_times: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    tool_names: dict[int, str] = field(default_factory=dict)
    tool_args: dict[int, list[str]] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False

    def feed(self, line: str, now: float) -> None:
        """Consume one line of the body; raises StreamError on anything a client could not parse."""
        data = sse_data(line)
        if data is None:
            return
        if self.done:
            raise StreamError("data after [DONE]")
        if data == "[DONE]":
            self.done = True
            return
        self.feed_chunk(parse_chunk(data), now)

    def feed_chunk(self, chunk: dict[str, Any], now: float) -> None:
        """Consume one OpenAI chunk."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise StreamError(f"chunk without a choices list: {str(chunk)[:80]!r}")
        self.finish_reason = chunk.get("finish_reason") or self.finish_reason  # seen at top level too
        try:
            got_token = [self._read_choice(choice) for choice in choices]  # a list: read every choice
        except (AttributeError, TypeError) as exc:
            raise StreamError(f"malformed choice ({exc}): {str(chunk)[:80]!r}") from exc
        if any(got_token):
            self.token_times.append(now)

    def _read_choice(self, choice: dict[str, Any]) -> bool:
        """Record one choice's delta; True when it carried generated text, reasoning, a tool call, or token ids.

        Token ids (`return_token_ids`, as vLLM and baleen send them) count on their own: a token that decodes
        to no text yet (part of a character, or a dummy-weight model's id the tokenizer lacks) still arrived.
        """
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        has_ids = bool(choice.get("token_ids"))
        delta = choice.get("delta")
        if delta is None:  # a text completion chunk
            piece = choice.get("text") or ""
            self.text.append(piece)
            return bool(piece) or has_ids
        got = has_ids or bool(delta.get("reasoning_content"))
        if delta.get("content"):
            self.text.append(delta["content"])
            got = True
        for call in delta.get("tool_calls") or []:
            index = call.get("index") or 0
            function = call.get("function") or {}
            if function.get("name"):
                self.tool_names[index] = function["name"]
                got = True
            if function.get("arguments"):
                self.tool_args.setdefault(index, []).append(function["arguments"])
                got = True
        return got

    def check_complete(self) -> None:
        """Raise StreamError unless the stream ended properly and its tool-call arguments are JSON."""
        if not self.done:
            raise StreamError("stream ended before 'data: [DONE]'")
        if self.finish_reason is None:
            raise StreamError("stream ended without a finish_reason")
        if self.finish_reason == "tool_calls":
            for index, name in self.tool_names.items():
                args = "".join(self.tool_args.get(index, []))
                try:
                    json.loads(args or "{}")
                except ValueError as exc:
                    raise StreamError(f"tool call {name!r} has invalid JSON arguments {args[:80]!r}") from exc

    @property
    def ttft(self) -> float | None:
        """Seconds from sending to the first generated token."""
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def itl(self) -> list[float]:
        """Seconds between consecutive token-bearing chunks."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def completion_tokens(self) -> int:
        """Output tokens from the server's usage; the number of token chunks when it sent none."""
        if self.usage and self.usage.get("completion_tokens") is not None:
            return int(self.usage["completion_tokens"])
        return len(self.token_times)


@dataclass
class GenerateStreamParser(StreamParser):
    """Reads one stream of SGLang's /generate: every chunk holds the text so far and `meta_info` (token counts,
    finish_reason {"type": ...}); a chunk whose completion_tokens grew carried tokens."""

    num_tokens: int = 0

    def feed_chunk(self, chunk: dict[str, Any], now: float) -> None:
        """Consume one /generate chunk."""
        meta, text = chunk.get("meta_info"), chunk.get("text")
        if not isinstance(meta, dict) or not isinstance(text, str):
            raise StreamError(f"a /generate chunk needs text and meta_info: {str(chunk)[:80]!r}")
        count = int(meta.get("completion_tokens") or 0)
        if count > self.num_tokens:
            self.token_times.append(now)
            self.num_tokens = count
        self.text = [text]  # cumulative
        reason = meta.get("finish_reason")
        if reason:
            self.finish_reason = str(reason.get("type") if isinstance(reason, dict) else reason)
        self.usage = {"prompt_tokens": meta.get("prompt_tokens"), "completion_tokens": count,
                      "prompt_tokens_details": {"cached_tokens": meta.get("cached_tokens")}}


@dataclass(frozen=True)
class RequestSpec:
    """One request: chat messages or a completion prompt (text or token ids), and its output budget."""

    output_len: int
    prompt_len_estimate: int
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # tools / tool_choice from a jsonl line


@dataclass
class RequestRecord:
    """What one request measured; times in seconds, `start` relative to the benchmark start."""

    index: int
    expected_output_len: int
    ok: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float | None = None
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_len: int = 0
    output_len: int = 0
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens: prompt tokens the server had cached
    usage_reported: bool = False
    finish_reason: str | None = None
    num_tool_calls: int = 0
    text: str = ""

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first."""
        if self.ttft is None or self.output_len < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_len - 1)


@dataclass(frozen=True)
class BenchConfig:
    """Where and how to send requests."""

    base_url: str
    api: str  # "chat" or "completions"
    model: str
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    request_rate: float = math.inf
    max_concurrency: int | None = None
    timeout: float = 3600.0

    @property
    def url(self) -> str:
        """The generation endpoint."""
        return self.base_url + PATHS[self.api]


def load_tokenizer_vocab(path: str) -> tuple[Any, list[int]]:
    """A `tokenizers` tokenizer from a tokenizer.json (or a folder holding one) and its non-special ids."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ValueError(f"--tokenizer {path}: no tokenizer.json there (give the file or its folder)")
    tokenizer = Tokenizer.from_file(str(file))
    special = set(tokenizer.get_added_tokens_decoder())
    ids = sorted(set(tokenizer.get_vocab(with_added_tokens=False).values()) - special)
    return tokenizer, ids


def random_dataset(
    num: int, input_len: int, output_len: int, range_ratio: float, seed: int, api: str, tokenizer: str | None
) -> list[RequestSpec]:
    """Random prompts: common words, or random token ids when a tokenizer is given."""
    rng = random.Random(seed)
    tok, ids = load_tokenizer_vocab(tokenizer) if tokenizer else (None, [])
    specs: list[RequestSpec] = []
    for _ in range(num):
        n_in, n_out = sample_len(rng, input_len, range_ratio), sample_len(rng, output_len, range_ratio)
        prompt: str | list[int] = rng.choices(ids, k=n_in) if tok else random_prompt(rng, n_in)
        if api == "chat":
            text = tok.decode(prompt) if tok else prompt
            specs.append(RequestSpec(n_out, n_in, messages=[{"role": "user", "content": text}]))
        else:
            specs.append(RequestSpec(n_out, n_in, prompt=prompt))
    return specs


def shared_prefix_dataset(
    num_groups: int, prompts_per_group: int, system_prompt_len: int, question_len: int, output_len: int, seed: int,
    api: str, tokenizer: str | None,
) -> list[RequestSpec]:
    """SGLang's generated-shared-prefix: `num_groups` random system prompts, `prompts_per_group` requests each (the
    group's system prompt, then a random question of its own), shuffled. Words, or token ids with a tokenizer."""
    rng = random.Random(seed)
    tok, ids = load_tokenizer_vocab(tokenizer) if tokenizer else (None, [])

    def text(n: int) -> str | list[int]:
        return rng.choices(ids, k=n) if tok else random_prompt(rng, n)

    systems = [text(system_prompt_len) for _ in range(num_groups)]
    specs: list[RequestSpec] = []
    for system in systems:
        for _ in range(prompts_per_group):
            question = text(question_len)
            n_in = system_prompt_len + question_len
            if isinstance(system, list) and isinstance(question, list) and api != "chat":
                specs.append(RequestSpec(output_len, n_in, prompt=system + question))
                continue
            prompt = (f"{tok.decode(system)}\n\n{tok.decode(question)}" if tok
                      else f"{system}\n\n{question}")  # fmt: skip
            if api == "chat":
                specs.append(RequestSpec(output_len, n_in, messages=[{"role": "user", "content": prompt}]))
            else:
                specs.append(RequestSpec(output_len, n_in, prompt=prompt))
    rng.shuffle(specs)
    return specs


def jsonl_dataset(path: str, num: int, default_output_len: int, api: str) -> list[RequestSpec]:
    """Up to `num` lines of {"messages": [...]} or {"prompt": ..., "max_tokens": ...}."""
    specs: list[RequestSpec] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(specs) >= num:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from exc
            output_len = int(row.get("max_tokens") or default_output_len)
            extra = {k: row[k] for k in ("tools", "tool_choice") if k in row}
            if "messages" in row:
                if api != "chat":
                    raise ValueError(f"{path}:{lineno} has 'messages': use --backend openai or give 'prompt'")
                words = sum(len(str(m.get("content") or "").split()) for m in row["messages"])
                specs.append(RequestSpec(output_len, words, messages=row["messages"], extra=extra))
            elif "prompt" in row:
                prompt = row["prompt"]
                n_in = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
                if api == "chat":
                    if not isinstance(prompt, str):
                        raise ValueError(f"{path}:{lineno}: token-id prompts need openai-completions")
                    messages = [{"role": "user", "content": prompt}]
                    specs.append(RequestSpec(output_len, n_in, messages=messages, extra=extra))
                else:
                    specs.append(RequestSpec(output_len, n_in, prompt=prompt, extra=extra))
            else:
                raise ValueError(f"{path}:{lineno}: a line needs 'messages' or 'prompt'")
    if not specs:
        raise ValueError(f"{path}: no requests in the file")
    return specs


def build_body(cfg: BenchConfig, spec: RequestSpec) -> dict[str, Any]:
    """The JSON body of one streamed request."""
    if cfg.api == "generate":  # what sglang.bench_serving --backend sglang sends
        sampling = {"temperature": cfg.temperature, "max_new_tokens": spec.output_len, "ignore_eos": cfg.ignore_eos}
        prompt_key = "text" if isinstance(spec.prompt, str) else "input_ids"
        return {prompt_key: spec.prompt, "sampling_params": sampling, "stream": True} | spec.extra | cfg.extra_body
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": spec.output_len,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.api == "chat":
        body["messages"] = spec.messages
    else:
        body["prompt"] = spec.prompt
    return body | spec.extra | cfg.extra_body


async def send_one(
    client: httpx.AsyncClient, cfg: BenchConfig, spec: RequestSpec, index: int, t0: float
) -> RequestRecord:
    """Send one streamed request and time every token-bearing chunk."""
    rec = RequestRecord(index=index, expected_output_len=spec.output_len)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    start = time.perf_counter()
    rec.start = start - t0
    parser = GenerateStreamParser(start) if cfg.api == "generate" else StreamParser(start)
    try:
        content = orjson.dumps(build_body(cfg, spec))
        async with client.stream("POST", cfg.url, content=content, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {body[:300]}"
            else:
                async for line in resp.aiter_lines():
                    parser.feed(line, time.perf_counter())
                parser.check_complete()
                rec.ok = True
    except (httpx.HTTPError, StreamError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.e2e = time.perf_counter() - start
    rec.ttft, rec.itl, rec.finish_reason = parser.ttft, parser.itl, parser.finish_reason
    rec.output_len, rec.text = parser.completion_tokens, "".join(parser.text)
    rec.num_tool_calls = len(parser.tool_names)
    usage = parser.usage or {}
    rec.usage_reported = usage.get("prompt_tokens") is not None
    rec.prompt_len = int(usage["prompt_tokens"]) if rec.usage_reported else spec.prompt_len_estimate
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    rec.cached_tokens = int(cached) if cached is not None else None
    return rec


async def run_load(
    client: httpx.AsyncClient,
    cfg: BenchConfig,
    specs: list[RequestSpec],
    seed: int,
    soak_seconds: float | None,
) -> tuple[list[RequestRecord], float]:
    """Send requests with Poisson arrivals (or all at once) under an optional concurrency cap.

    Without `soak_seconds` each spec is sent once; with it the specs are cycled until the time is up.
    """
    rng = random.Random(seed)
    limit = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

    async def limited(spec: RequestSpec, index: int) -> RequestRecord:
        if limit is None:
            return await send_one(client, cfg, spec, index, t0)
        async with limit:
            return await send_one(client, cfg, spec, index, t0)

    t0 = time.perf_counter()
    tasks: list[asyncio.Task[RequestRecord]] = []
    next_arrival = 0.0  # seconds after t0; an absolute schedule so sleeping late does not drift the rate
    index = 0
    while soak_seconds is not None or index < len(specs):
        if soak_seconds is not None and next_arrival >= soak_seconds:
            break
        delay = next_arrival - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(limited(specs[index % len(specs)], index)))
        index += 1
        if math.isfinite(cfg.request_rate):
            next_arrival += rng.expovariate(cfg.request_rate)
    records = list(await asyncio.gather(*tasks))
    return records, time.perf_counter() - t0


def stats_ms(values_s: list[float]) -> dict[str, float | None]:
    """Mean, median, p90, p99 and max in milliseconds (None when there are no values)."""
    if not values_s:
        return {name: None for name in [*PERCENTILES, "max"]}
    ms = np.asarray(values_s) * 1e3
    out: dict[str, float | None] = {
        name: float(ms.mean() if q is None else np.percentile(ms, q)) for name, q in PERCENTILES.items()
    }
    return out | {"max": float(ms.max())}


def summarize(records: list[RequestRecord], duration: float) -> dict[str, Any]:
    """Counts, throughputs and latency percentiles over the successful requests."""
    ok = [r for r in records if r.ok]
    total_in, total_out = sum(r.prompt_len for r in ok), sum(r.output_len for r in ok)
    errors = Counter(r.error[:120] for r in records if not r.ok)
    cached = [r for r in ok if r.cached_tokens is not None]
    return {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "usage_reported": all(r.usage_reported for r in ok),
        "request_throughput": len(ok) / duration,
        "input_throughput": total_in / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "mean_concurrency": sum(r.e2e for r in records) / duration,
        "ttft_ms": stats_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": stats_ms([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": stats_ms([gap for r in ok for gap in r.itl]),
        "e2e_ms": stats_ms([r.e2e for r in ok]),
        # Prompt tokens the server reported as cached (usage.prompt_tokens_details.cached_tokens) over all prompt
        # tokens, over the requests that reported it; None when none did. The /metrics gauge is added by bench().
        "cache_hit_rate_usage": (sum(r.cached_tokens or 0 for r in cached) / max(1, sum(r.prompt_len for r in cached))
                                 if cached else None),
        "cache_hit_rate_metrics": None,
        "errors": dict(errors.most_common(10)),
    }


def format_summary(summary: dict[str, Any], title: str) -> str:
    """The human-readable result table."""
    rows = [
        ("Successful requests", summary["completed"]),
        ("Failed requests", summary["failed"]),
        ("Benchmark duration (s)", f"{summary['duration_s']:.2f}"),
        ("Total input tokens", summary["total_input_tokens"]),
        ("Total output tokens", summary["total_output_tokens"]),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("Input token throughput (tok/s)", f"{summary['input_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}"),
        ("Mean concurrency", f"{summary['mean_concurrency']:.2f}"),
    ]
    for key, name in (("cache_hit_rate_metrics", "/metrics"), ("cache_hit_rate_usage", "usage cached_tokens")):
        if summary.get(key) is not None:
            rows.append((f"Cache hit rate ({name})", f"{summary[key]:.3f}"))
    lines = [f"{' ' + title + ' ':=^66}", *(f"{name + ':':<44}{value:>22}" for name, value in rows)]
    if not summary["usage_reported"]:
        lines.append("NOTE: the server sent no usage; token counts are estimates (chunks, prompt words)")
    lines.append(f"{'Latency (ms)':<14}" + "".join(f"{name:>13}" for name in [*PERCENTILES, "max"]))
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        cells = [summary[key][name] for name in [*PERCENTILES, "max"]]
        text = ["-" if c is None else f"{c:.2f}" for c in cells]
        lines.append(f"{key[:-3].upper():<14}" + "".join(f"{t:>13}" for t in text))
    lines.extend(f"error x{count}: {message}" for message, count in summary["errors"].items())
    lines.append("=" * 66)
    return "\n".join(lines)


def process_tree(roots: list[int]) -> list[int]:
    """The given pids and all their live descendants (from /proc/<pid>/stat parent links)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ..."
        except (OSError, IndexError, ValueError):
            continue  # the process exited while we looked
        children.setdefault(ppid, []).append(int(stat.parent.name))
    seen: list[int] = []
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.append(pid)
            stack.extend(children.get(pid, []))
    return seen


def rss_snapshot(roots: list[int]) -> dict[str, Any]:
    """VmRSS (kB) of every process in the watched trees, and their sum."""
    processes = []
    for pid in process_tree(roots):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if "VmRSS" in fields:  # kernel threads have none
            rss_kb = int(fields["VmRSS"].split()[0])
            processes.append({"pid": pid, "name": fields.get("Name", "").strip(), "rss_kb": rss_kb})
    return {"processes": processes, "total_kb": sum(p["rss_kb"] for p in processes)}


def parse_gauge(text: str, name: str) -> float | None:
    """The value of a Prometheus gauge in exposition text, summed over its label sets; None if absent."""
    values = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        metric, _, rest = line.partition("{") if "{" in line.split()[0] else line.partition(" ")
        if metric.strip() == name:
            fields = (rest.rsplit("}", 1)[-1] if "{" in line else rest).split()  # value [timestamp]
            try:
                values.append(float(fields[0]))
            except (IndexError, ValueError):
                print(f"warning: unreadable metrics line {line[:80]!r}", file=sys.stderr)
    return sum(values) if values else None


CACHE_HIT_GAUGES = ("sglang:cache_hit_rate", "baleen_cache_hit_rate")


async def read_cache_hit_rate(client: httpx.AsyncClient, url: str) -> float | None:
    """The server's prefix-cache hit rate gauge at `url` (SGLang's name, or baleen's); None when it has none.

    NOTE: what the gauge spans is the server's choice: baleen's counts every prompt token since it started, SGLang's
    its last prefill batch. The usage-based rate in the summary covers exactly this run's requests.
    """
    try:
        resp = await client.get(url)
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        print(f"note: no cache hit rate from {url} ({exc})", file=sys.stderr)
        return None
    for name in CACHE_HIT_GAUGES:
        value = parse_gauge(resp.text, name)
        if value is not None:
            return value
    return None


class SoakWatcher:
    """Soak-mode observations: RSS of the watched process trees and a Prometheus gauge, before and after."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        pids: list[int],
        metrics_url: str | None,
        gauge: str,
        idle_timeout: float,
    ) -> None:
        self.client, self.pids, self.url, self.gauge = client, pids, metrics_url, gauge
        self.idle_timeout = idle_timeout
        self.samples: list[tuple[float, int]] = []  # (seconds since start, total RSS kB)
        self.t0 = time.perf_counter()

    async def read_gauge(self) -> float | None:
        """The gauge's current value (None without --metrics-url, or when the server does not export it)."""
        if not self.url:
            return None
        try:
            resp = await self.client.get(self.url)
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            print(f"warning: cannot read {self.url}: {exc}", file=sys.stderr)
            return None
        return parse_gauge(resp.text, self.gauge)

    async def _sample(self) -> None:
        while True:
            self.samples.append((time.perf_counter() - self.t0, rss_snapshot(self.pids)["total_kb"]))
            await asyncio.sleep(1.0)

    async def begin(self) -> None:
        """Take the start readings and start sampling RSS once a second."""
        missing = [pid for pid in self.pids if not Path(f"/proc/{pid}").exists()]
        if missing:
            raise ValueError(f"--watch-pid: no process {missing} (is the server running? on Linux?)")
        self.t0 = time.perf_counter()
        self.rss_start, self.gauge_start = rss_snapshot(self.pids), await self.read_gauge()
        self.sampler = asyncio.create_task(self._sample())

    async def end(self, records: list[RequestRecord]) -> dict[str, Any]:
        """Wait until the gauge settles (3 equal readings 0.5 s apart) and take the end readings."""
        self.sampler.cancel()
        idle_start = time.perf_counter()
        readings = [await self.read_gauge()]
        while time.perf_counter() - idle_start < self.idle_timeout and not (
            len(readings) >= 3 and readings[-1] == readings[-2] == readings[-3]
        ):
            await asyncio.sleep(0.5)
            readings.append(await self.read_gauge())
        rss_end = rss_snapshot(self.pids)
        self.samples.append((time.perf_counter() - self.t0, rss_end["total_kb"]))
        return {
            "requests": len(records),
            "failed": sum(not r.ok for r in records),
            "watch_pids": self.pids,
            "rss_start": self.rss_start,
            "rss_end": rss_end,
            "rss_peak_kb": max(kb for _, kb in self.samples),
            "rss_samples": self.samples,
            "gauge": self.gauge,
            "gauge_start": self.gauge_start,
            "gauge_end": readings[-1],
            "gauge_settle_s": time.perf_counter() - idle_start,
        }


def format_soak(report: dict[str, Any]) -> str:
    """The human-readable soak report."""
    start, end = report["rss_start"], report["rss_end"]
    lines = [
        f"{' Soak ':=^66}",
        f"{report['seconds']:.0f} s at {report['request_rate']} req/s: {report['requests']} requests, "
        f"{report['failed']} failed",
    ]
    before = {p["pid"]: p["rss_kb"] for p in start["processes"]}
    for proc in end["processes"]:
        old = before.get(proc["pid"])
        change = "new" if old is None else f"{(proc['rss_kb'] - old) / 1024:+.1f} MiB"
        mib = proc["rss_kb"] / 1024
        lines.append(f"  pid {proc['pid']:>7} {proc['name']:<16} {mib:10.1f} MiB  ({change})")
    mib0, mib1, peak = start["total_kb"] / 1024, end["total_kb"] / 1024, report["rss_peak_kb"] / 1024
    lines.append(f"RSS total: {mib0:.1f} -> {mib1:.1f} MiB (peak {peak:.1f}, change {mib1 - mib0:+.1f})")
    g0, g1, settle = report["gauge_start"], report["gauge_end"], report["gauge_settle_s"]
    if g0 is None and g1 is None:
        lines.append(f"{report['gauge']}: not read (give --metrics-url, or the server does not export it)")
    else:
        lines.append(f"{report['gauge']}: {g0} at start -> {g1} when idle ({settle:.1f} s after the end)")
    if g0 is not None and g1 is not None and g1 > g0:
        lines.append(f"WARNING: {report['gauge']} did not return to its start value (leak?)")
    return "\n".join([*lines, "=" * 66])


def load_sibling(name: str) -> Any:
    """Import loadtest/<name>.py (loadtest/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"loadtest_{name}", Path(__file__).with_name(f"{name}.py"))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load loadtest/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def detect_model(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    """The first model the server lists at /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = await client.get(base_url + "/v1/models", headers=headers)
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"no model name from {base_url}/v1/models ({exc}); pass --model") from exc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags; the names follow sglang.bench_serving where one exists."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--backend", choices=sorted(BACKENDS), default="openai",
        help="openai: /v1/chat/completions; openai-completions (and sglang-oai, vllm): /v1/completions; "
             "sglang (and sglang-native): SGLang's native /generate")
    add("--base-url", help="server URL, e.g. http://127.0.0.1:30000 (overrides --host/--port)")
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=30000)
    add("--model", help="model name to send (default: the first one /v1/models lists)")
    add("--api-key", help="sent as 'Authorization: Bearer <key>'")
    add("--dataset-name", choices=["random", "jsonl", "generated-shared-prefix"], default="random")
    add("--dataset-path", help="jsonl: a {'messages': [...]} or {'prompt': ..., 'max_tokens': n} per line")
    add("--random-input-len", "--random-input", type=int, default=1024, help="prompt tokens (words)")
    add("--random-output-len", "--random-output", type=int, default=128, help="output tokens")
    add("--random-range-ratio", type=float, default=0.0,
        help="lengths are uniform in [len * ratio, len]; 1.0 makes them exact")
    add("--output-len", type=int, default=128, help="jsonl: output tokens of lines without max_tokens")
    add("--gsp-num-groups", type=int, default=64, help="generated-shared-prefix: system prompts (groups)")
    add("--gsp-prompts-per-group", type=int, default=16, help="generated-shared-prefix: requests per system prompt")
    add("--gsp-system-prompt-len", type=int, default=2048, help="generated-shared-prefix: system prompt tokens")
    add("--gsp-question-len", type=int, default=128, help="generated-shared-prefix: question tokens per request")
    add("--gsp-output-len", type=int, default=256, help="generated-shared-prefix: output tokens per request")
    add("--tokenizer", help="tokenizer.json or its folder: random prompts become random token ids")
    add("--num-prompts", type=int, default=1000,
        help="requests to send (soak: the prompt pool; generated-shared-prefix sends groups x prompts per group)")
    add("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: all at once)")
    add("--max-concurrency", type=int, help="at most this many requests in flight")
    add("--seed", type=int, default=1)
    add("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
        help="ask for outputs as long as max_tokens (--no-ignore-eos for strict OpenAI servers)")
    add("--temperature", type=float, default=0.0)
    add("--extra-body", type=json.loads, default={}, help="JSON object merged into every request body")
    add("--warmup-requests", type=int, default=1, help="untimed requests sent first; a failure aborts")
    add("--timeout", type=float, default=3600.0, help="seconds one request may take")
    add("--output-file", help="config, summary and per-request records as JSON (.jsonl: append a line)")
    add("--plot", metavar="PNG", help="latency CDFs and throughput over time")
    add("--soak-seconds", type=float, help="soak: send at --request-rate for this long")
    add("--watch-pid", type=int, action="append", default=[], help="soak: RSS of this process and children")
    add("--metrics-url", help="Prometheus endpoint for the cache hit rate and the soak gauge (default: <base>/metrics)")
    add("--gauge", default="baleen_pages_used", help="soak: gauge read from --metrics-url")
    add("--idle-timeout", type=float, default=30.0, help="soak: most seconds to wait for the gauge to settle")
    args = p.parse_args(argv)
    if args.dataset_name == "jsonl" and not args.dataset_path:
        p.error("--dataset-name jsonl needs --dataset-path")
    if args.soak_seconds is not None and not math.isfinite(args.request_rate):
        p.error("--soak-seconds needs a finite --request-rate")
    if args.request_rate <= 0 or args.num_prompts < 1 or (args.max_concurrency or 1) < 1:
        p.error("--request-rate, --num-prompts and --max-concurrency must be positive")
    gsp = (args.gsp_num_groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len, args.gsp_output_len)
    if args.dataset_name == "generated-shared-prefix" and (min(gsp) < 1 or args.gsp_question_len < 0):
        p.error("--gsp-* counts and lengths must be positive (--gsp-question-len may be 0)")
    return args


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark the flags describe; returns the result written to --output-file."""
    host = args.host if "://" in args.host else f"http://{args.host}"
    base_url = (args.base_url or f"{host}:{args.port}").rstrip("/").removesuffix("/v1")
    api = BACKENDS[args.backend]
    if args.dataset_name == "random":
        if args.dataset_path:
            print("note: --dataset-path is not used by the random dataset", file=sys.stderr)
        specs = random_dataset(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.seed, api, args.tokenizer)
    elif args.dataset_name == "generated-shared-prefix":
        specs = shared_prefix_dataset(args.gsp_num_groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len,
                                      args.gsp_question_len, args.gsp_output_len, args.seed, api, args.tokenizer)
    else:
        specs = jsonl_dataset(args.dataset_path, args.num_prompts, args.output_len, api)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(args.timeout, connect=30.0)) as client:
        model = args.model or await detect_model(client, base_url, args.api_key)
        cfg = BenchConfig(
            base_url, api, model, args.api_key, args.ignore_eos, args.temperature, args.extra_body,
            args.request_rate, args.max_concurrency, args.timeout,
        )  # fmt: skip
        for i in range(args.warmup_requests):
            warm = await send_one(client, cfg, specs[i % len(specs)], -1, time.perf_counter())
            if not warm.ok:
                raise ValueError(f"warm-up request to {cfg.url} failed: {warm.error}")
        watcher = SoakWatcher(client, args.watch_pid, args.metrics_url, args.gauge, args.idle_timeout)
        if args.soak_seconds is not None:
            await watcher.begin()
        records, duration = await run_load(client, cfg, specs, args.seed, args.soak_seconds)
        soak = None
        if args.soak_seconds is not None:
            soak = {"seconds": args.soak_seconds, "request_rate": args.request_rate}
            soak |= await watcher.end(records)
        hit_rate = await read_cache_hit_rate(client, args.metrics_url or base_url + "/metrics")
    summary = summarize(records, duration)
    summary["cache_hit_rate_metrics"] = hit_rate
    print(f"{args.backend} {cfg.url}  model {model}  rate {args.request_rate}/s  "
          f"max concurrency {args.max_concurrency or 'none'}")
    print(format_summary(summary, "Serving Benchmark Result"))
    if soak is not None:
        print(format_soak(soak))
    config = {k: v for k, v in vars(args).items() if k != "api_key"} | {"base_url": base_url, "model": model}
    config["request_rate"] = str(args.request_rate)  # inf is not JSON
    return {"config": config, "summary": summary, "soak": soak, "requests": [asdict(r) for r in records]}


def run(coro: Any) -> Any:
    """Run a coroutine on uvloop when it is installed."""
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        return runner.run(coro)


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit status 0 when at least one request succeeded."""
    args = parse_args(argv)
    try:
        result = run(bench(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output_file:
        text = json.dumps(result)
        mode = "a" if args.output_file.endswith(".jsonl") else "w"  # .jsonl collects one line per run
        with open(args.output_file, mode, encoding="utf-8") as f:
            f.write(text + "\n")
        print(f"wrote {args.output_file}")
    if args.plot:
        load_sibling("plot").plot_result(result, args.plot)
        print(f"wrote {args.plot}")
    return 0 if result["summary"]["completed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
