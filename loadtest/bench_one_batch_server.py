"""One batch at a time against a running server's /generate (the client half of SGLang's bench_one_batch_server): for
every combination of --batch-size, --input-len and --output-len, one streamed request carries a batch of random
prompts, and the latency, TTFT and input and output throughput are printed (and appended to --result-filename).

    python loadtest/bench_one_batch_server.py --base-url http://127.0.0.1:30000 --model /path/to/DeepSeek-V3 \
        --batch-size 1 16 64 --input-len 1024 --output-len 16

The prompts are random token ids of exactly --input-len when the tokenizer is at hand (--tokenizer, or --model
naming a checkpoint folder or tokenizer.json), else random common words (about one token each); the token counts
reported are the server's. The measures are SGLang's: TTFT is when the last request of the batch got its first
token; input throughput = prompt tokens / TTFT; output throughput = output tokens / (latency - TTFT); overall = all
tokens / latency. Unlike SGLang's it does not call /flush_cache (fresh random prompts miss the prefix cache
anyway). Needs what bench_serving.py needs (its prompts and stream parser are reused from it).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson


def _load_bench_serving() -> Any:
    """loadtest/bench_serving.py, beside this file (loadtest/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("loadtest_bench_serving", Path(__file__).with_name("bench_serving.py"))
    if spec is None or spec.loader is None:
        raise ImportError("cannot load loadtest/bench_serving.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench_serving()


def make_prompts(rng: random.Random, batch_size: int, input_len: int, vocab: list[int] | None) -> list[Any]:
    """Random token ids (with a vocabulary) or random common words, one prompt per request of the batch."""
    if vocab:
        return [rng.choices(vocab, k=input_len) for _ in range(batch_size)]
    return [bench.random_prompt(rng, input_len) for _ in range(batch_size)]


def run_one_case(client: httpx.Client, url: str, prompts: list[Any], output_len: int, temperature: float,
                 headers: dict[str, str]) -> dict[str, Any]:
    """Send one batch in one streamed /generate request; its latency, TTFT and token counts."""
    body = {"text" if isinstance(prompts[0], str) else "input_ids": prompts,
            "sampling_params": {"temperature": temperature, "max_new_tokens": output_len, "ignore_eos": True},
            "stream": True}
    tic = time.perf_counter()
    parsers = [bench.GenerateStreamParser(tic) for _ in prompts]
    with client.stream("POST", url + "/generate", content=orjson.dumps(body), headers=headers) as resp:
        if resp.status_code != 200:
            raise bench.StreamError(f"HTTP {resp.status_code}: {resp.read().decode(errors='replace')[:300]}")
        for line in resp.iter_lines():
            data = bench.sse_data(line)
            if data == "[DONE]":
                for parser in parsers:
                    parser.done = True
            elif data is not None:
                chunk = bench.parse_chunk(data)
                parsers[int(chunk.get("index", 0))].feed_chunk(chunk, time.perf_counter())
    latency = time.perf_counter() - tic
    for parser in parsers:
        parser.check_complete()
    ttfts = [p.ttft for p in parsers]
    if any(t is None for t in ttfts):
        raise bench.StreamError("a request of the batch produced no token")
    ttft = max(t for t in ttfts if t is not None)
    prompt_tokens = sum(int((p.usage or {}).get("prompt_tokens") or 0) for p in parsers)
    output_tokens = sum(p.completion_tokens for p in parsers)
    return {"latency": latency, "ttft": ttft, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "input_throughput": prompt_tokens / ttft,
            "output_throughput": output_tokens / (latency - ttft) if latency > ttft else 0.0,
            "overall_throughput": (prompt_tokens + output_tokens) / latency}


def find_tokenizer(args: argparse.Namespace) -> str | None:
    """--tokenizer, else --model when it is a local checkpoint folder or tokenizer file."""
    if args.tokenizer:
        return str(args.tokenizer)
    if not args.model:
        return None
    model = Path(args.model)
    found = (model / "tokenizer.json").is_file() or (model.suffix == ".json" and model.is_file())
    return str(model) if found else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """SGLang's flag names."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--base-url", default="http://127.0.0.1:30000", help="the server (it must already be running)")
    add("--model", help="the checkpoint folder: its tokenizer.json makes the prompts random token ids")
    add("--tokenizer", help="tokenizer.json or its folder (overrides --model's)")
    add("--batch-size", type=int, nargs="+", default=[1], help="requests per batch (one case each)")
    add("--input-len", type=int, nargs="+", default=[1024], help="prompt tokens (one case each)")
    add("--output-len", type=int, nargs="+", default=[16], help="output tokens (one case each)")
    add("--temperature", type=float, default=0.0)
    add("--result-filename", default="result.jsonl", help="one JSON line per case is appended ('' writes none)")
    add("--run-name", default="default", help="the run_name of the result lines")
    add("--skip-warmup", action="store_true", help="do not send the untimed first case")
    add("--seed", type=int, default=1)
    add("--api-key", help="sent as 'Authorization: Bearer <key>'")
    add("--timeout", type=float, default=3600.0, help="seconds one batch may take")
    args = p.parse_args(argv)
    if min(args.batch_size + args.input_len + args.output_len) < 1:
        p.error("--batch-size, --input-len and --output-len must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every case; exit status 0, 1 when a batch failed, 2 on a usage error."""
    args = parse_args(argv)
    base_url = args.base_url.rstrip("/").removesuffix("/v1")
    tokenizer = find_tokenizer(args)
    try:
        vocab = bench.load_tokenizer_vocab(tokenizer)[1] if tokenizer else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    cases = list(itertools.product(args.batch_size, args.input_len, args.output_len))
    print(f"{base_url}/generate, prompts: {'token ids from ' + tokenizer if tokenizer else 'random words'}")
    with httpx.Client(timeout=httpx.Timeout(args.timeout, connect=30.0)) as client:
        try:
            if not args.skip_warmup:  # the first case once, untimed, with prompts of its own
                bs, il, ol = cases[0]
                prompts = make_prompts(random.Random(args.seed - 1), bs, il, vocab)
                run_one_case(client, base_url, prompts, ol, args.temperature, headers)
            for i, (bs, il, ol) in enumerate(cases):
                prompts = make_prompts(random.Random(args.seed + 1000 * i), bs, il, vocab)  # fresh: no cache hits
                res = run_one_case(client, base_url, prompts, ol, args.temperature, headers)
                report(args, bs, il, ol, res)
        except (httpx.HTTPError, bench.StreamError) as exc:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    if args.result_filename:
        print(f"\nResults are saved to {args.result_filename}")
    return 0


def report(args: argparse.Namespace, batch_size: int, input_len: int, output_len: int, res: dict[str, Any]) -> None:
    """Print one case and append its JSON line to --result-filename."""
    print(f"batch size: {batch_size}\ninput_len: {input_len} (server: {res['prompt_tokens']} prompt tokens)\n"
          f"output_len: {output_len} (server: {res['output_tokens']} output tokens)\n"
          f"latency: {res['latency']:.3f} s\nttft: {res['ttft']:.3f} s\n"
          f"input throughput: {res['input_throughput']:.2f} tok/s\n"
          f"output throughput: {res['output_throughput']:.2f} tok/s\n"
          f"(input + output) throughput: {res['overall_throughput']:.2f} tok/s\n")
    if args.result_filename:
        row = {"run_name": args.run_name, "batch_size": batch_size, "input_len": input_len, "output_len": output_len,
               **{k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}}
        with open(args.result_filename, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
