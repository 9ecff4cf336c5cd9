"""bench_serving against the fake OpenAI server: load modes, datasets, failures, soak, and its parsers."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from fake_openai_server import CHAT_OVERHEAD, CHAT_OVERHEAD_PER_MESSAGE, running_fake_server

LOADTEST = Path(__file__).resolve().parents[2] / "loadtest"
FAKE_TTFT_MS = 20.0  # the fake's default time to first token: a floor for every measured TTFT


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_serving_under_test", LOADTEST / "bench_serving.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    with running_fake_server("--spawn-child", "--base-pages", "7") as running:
        yield running


def fake_stats(url: str, reset: bool = False) -> dict[str, Any]:
    if reset:
        httpx.post(url + "/fake/reset").raise_for_status()
    return dict(httpx.get(url + "/fake/stats").json())


def run_bench(tmp_path: Path, flags: str, out_name: str = "result.json") -> dict[str, Any]:
    """Run bench_serving with these flags (space-separated) and return its --output-file (last line)."""
    out = tmp_path / out_name
    cmd = [sys.executable, str(LOADTEST / "bench_serving.py"), *flags.split(), "--output-file", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Serving Benchmark Result" in proc.stdout
    return dict(json.loads(out.read_text().splitlines()[-1]))


def check_latencies(summary: dict[str, Any]) -> None:
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = summary[key]
        assert 0 < s["median"] <= s["p90"] <= s["p99"] <= s["max"], (key, s)
        assert 0 < s["mean"] <= s["max"], (key, s)
    assert summary["ttft_ms"]["median"] >= FAKE_TTFT_MS  # the fake sleeps that long before the first token
    assert summary["e2e_ms"]["median"] > summary["ttft_ms"]["median"]


# ---------------------------------------------------------------- end to end, as a subprocess


def test_rate_mode_chat_counts_and_plot(server: tuple[str, Any], tmp_path: Path) -> None:
    url, _ = server
    fake_stats(url, reset=True)
    png = tmp_path / "plot.png"
    flags = f"--base-url {url} --num-prompts 12 --request-rate 40 --random-input-len 24 --random-output-len 8"
    result = run_bench(tmp_path, f"{flags} --random-range-ratio 0.5 --warmup-requests 0 --plot {png}")
    summary, records, truth = result["summary"], result["requests"], fake_stats(url)
    assert result["config"]["model"] == "fake-deepseek"  # auto-detected from /v1/models
    assert (summary["completed"], summary["failed"]) == (12, 0) == (truth["num_completed"], 0)
    # ignore_eos: every output is exactly as long as asked, and the server agrees
    assert summary["total_output_tokens"] == sum(r["expected_output_len"] for r in records)
    assert summary["total_output_tokens"] == truth["completion_tokens"]
    # input tokens are the server's usage (template overhead included), not the word counts sent
    assert summary["total_input_tokens"] == truth["prompt_tokens"]
    assert all(r["prompt_len"] >= CHAT_OVERHEAD + CHAT_OVERHEAD_PER_MESSAGE + 12 for r in records)
    assert summary["usage_reported"]
    assert len({r["expected_output_len"] for r in records}) > 1  # the range ratio spread the lengths
    assert max(r["start"] for r in records) > 0.05  # Poisson arrivals, not all at once
    assert all(len(r["itl"]) == r["output_len"] - 1 for r in records)
    check_latencies(summary)
    assert summary["request_throughput"] == pytest.approx(12 / summary["duration_s"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_concurrency_mode_completions_without_ignore_eos(server: tuple[str, Any], tmp_path: Path) -> None:
    url, _ = server
    fake_stats(url, reset=True)
    flags = f"--base-url {url} --backend openai-completions --num-prompts 10 --max-concurrency 3"
    flags += " --random-input-len 16 --random-output-len 12 --random-range-ratio 1 --no-ignore-eos"
    result = run_bench(tmp_path, flags + " --warmup-requests 0")
    summary, truth = result["summary"], fake_stats(url)
    assert (summary["completed"], summary["failed"]) == (10, 0)
    assert truth["max_in_flight"] == 3  # the cap was reached and never exceeded
    assert min(r["start"] for r in result["requests"][3:]) > 0.01  # the later ones waited for a slot
    assert summary["total_input_tokens"] == truth["prompt_tokens"] == 10 * 16  # one token per word
    assert summary["total_output_tokens"] == truth["completion_tokens"] < 10 * 12  # EOS came early somewhere
    assert {r["finish_reason"] for r in result["requests"]} <= {"stop", "length"}
    check_latencies(summary)


def test_failures_are_counted(tmp_path: Path) -> None:
    # requests 4, 8, ..., 20 answer HTTP 500; 5, 10, 15 stop mid-stream without [DONE]
    with running_fake_server("--fail-every", "4", "--truncate-every", "5") as (url, _):
        flags = f"--base-url {url} --num-prompts 20 --max-concurrency 4 --random-input-len 8"
        flags += " --random-output-len 6 --random-range-ratio 1 --warmup-requests 0"
        result = run_bench(tmp_path, flags)
        truth = fake_stats(url)
    summary = result["summary"]
    assert (summary["completed"], summary["failed"]) == (12, 8)
    errors = " ".join(summary["errors"])
    assert "HTTP 500" in errors and "[DONE]" in errors
    assert sum(summary["errors"].values()) == 8
    assert summary["total_output_tokens"] == truth["completion_tokens"] == 12 * 6


def test_wrong_model_aborts_at_warmup(server: tuple[str, Any]) -> None:
    script = str(LOADTEST / "bench_serving.py")
    cmd = [sys.executable, script, "--base-url", server[0], "--model", "nope", "--num-prompts", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "warm-up request" in proc.stderr and "HTTP 404" in proc.stderr


def test_jsonl_dataset_chat(server: tuple[str, Any], tmp_path: Path) -> None:
    url, _ = server
    tool = {"type": "function", "function": {"name": "query_weather", "parameters": {"type": "object"}}}
    system, user = {"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}
    lines = [
        {"messages": [system, user], "max_tokens": 5},
        {"prompt": "four five", "max_tokens": 7},
        {"messages": [{"role": "user", "content": "weather?"}], "tools": [tool]},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    fake_stats(url, reset=True)
    flags = f"--base-url {url} --dataset-name jsonl --dataset-path {data} --output-len 30 --max-concurrency 2"
    result = run_bench(tmp_path, flags + " --warmup-requests 0")
    summary, records = result["summary"], sorted(result["requests"], key=lambda r: r["index"])
    assert (summary["completed"], summary["failed"]) == (3, 0)
    words = [5, 2, 1]  # "be brief" + "one two three", "four five", "weather?"
    num_messages = [2, 1, 1]
    expected_in = sum(CHAT_OVERHEAD + CHAT_OVERHEAD_PER_MESSAGE * m + w for m, w in zip(num_messages, words))
    assert summary["total_input_tokens"] == expected_in == fake_stats(url)["prompt_tokens"]
    assert [r["output_len"] for r in records[:2]] == [5, 7]
    assert records[2]["num_tool_calls"] == 1 and records[2]["finish_reason"] == "tool_calls"


def test_token_id_prompts_with_tokenizer(server: tuple[str, Any], tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(50)} | {"[UNK]": 50}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.add_special_tokens(["<eos>"])
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    _, ids = bench.load_tokenizer_vocab(str(tmp_path))
    assert 51 not in ids and len(ids) == 51  # the special token is never sampled
    fake_stats(url := server[0], reset=True)
    flags = f"--base-url {url} --backend openai-completions --tokenizer {path} --num-prompts 4"
    flags += " --random-input-len 33 --random-output-len 3 --random-range-ratio 1 --warmup-requests 0"
    result = run_bench(tmp_path, flags)
    assert result["summary"]["total_input_tokens"] == 4 * 33 == fake_stats(url)["prompt_tokens"]
    gsp = bench.shared_prefix_dataset(2, 3, 9, 4, 1, 0, "completions", str(path))
    assert all(len(s.prompt) == 13 and set(s.prompt) <= set(ids) for s in gsp)  # id lists: the prefix is exact
    assert len({tuple(s.prompt[:9]) for s in gsp}) == 2


def test_generated_shared_prefix_reports_the_cache_hit_rate(tmp_path: Path) -> None:
    # A server of its own: its cache and hit-rate gauge then see this run alone (one warm-up request, then 2 groups
    # x 3 requests, one at a time): every request but a group's first shares its 40-word system prompt at least,
    # and the warm-up repeats one of the requests.
    with running_fake_server() as (url, _):
        flags = f"--base-url {url} --backend openai-completions --dataset-name generated-shared-prefix --max-concurrency 1"
        flags += " --gsp-num-groups 2 --gsp-prompts-per-group 3 --gsp-system-prompt-len 40 --gsp-question-len 5"
        flags += " --gsp-output-len 4"
        result = run_bench(tmp_path, flags)
    summary, records = result["summary"], result["requests"]
    assert summary["completed"] == 6 and summary["total_input_tokens"] == 6 * 45
    assert all(r["output_len"] == 4 for r in records)
    cached = [r["cached_tokens"] for r in records]
    assert sum(c >= 40 for c in cached) == 5 and max(cached) == 45, cached  # the other group's first: < 40
    assert summary["cache_hit_rate_usage"] == pytest.approx(sum(cached) / (6 * 45))
    # The gauge also counts the warm-up request (45 prompt tokens, the first it saw: nothing cached).
    assert summary["cache_hit_rate_metrics"] == pytest.approx(sum(cached) / (7 * 45))


def test_shared_prefix_dataset_groups() -> None:
    specs = bench.shared_prefix_dataset(3, 4, 20, 6, 7, 0, "completions", None)
    assert len(specs) == 12 and all(s.output_len == 7 and s.prompt_len_estimate == 26 for s in specs)
    systems = Counter(s.prompt.split("\n\n")[0] for s in specs)
    assert sorted(systems.values()) == [4, 4, 4] and all(len(p.split()) == 20 for p in systems)
    assert len({s.prompt for s in specs}) == 12  # each question its own
    order = [s.prompt.split("\n\n")[0] for s in specs]
    assert order != sorted(order, key=list(systems).index), "not shuffled"
    assert specs == bench.shared_prefix_dataset(3, 4, 20, 6, 7, 0, "completions", None)  # seeded
    chat = bench.shared_prefix_dataset(1, 2, 5, 0, 3, 0, "chat", None)
    assert [len(s.messages[0]["content"].split()) for s in chat] == [5, 5]


def test_soak_reports_rss_and_gauge(server: tuple[str, Any], tmp_path: Path) -> None:
    url, proc = server
    port = url.rsplit(":", 1)[1]
    (tmp_path / "runs.jsonl").write_text('{"an earlier run": 1}\n')
    # the seed's spellings: --host/--port, --random-input/--random-output; .jsonl output gets a line appended
    flags = f"--host 127.0.0.1 --port {port} --random-input 8 --random-output 4 --num-prompts 5"
    flags += f" --soak-seconds 2 --request-rate 10 --watch-pid {proc.pid} --metrics-url {url}/metrics"
    result = run_bench(tmp_path, flags, out_name="runs.jsonl")
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2
    soak, summary = result["soak"], result["summary"]
    assert 5 <= soak["requests"] <= 45 and soak["failed"] == 0 == summary["failed"]
    assert soak["requests"] == summary["completed"]
    for snapshot in (soak["rss_start"], soak["rss_end"]):
        pids = {p["pid"]: p for p in snapshot["processes"]}
        assert proc.pid in pids and len(pids) == 2  # the server and its `sleep` child
        assert {p["name"] for p in pids.values()} >= {"sleep"}
        assert snapshot["total_kb"] == sum(p["rss_kb"] for p in pids.values()) > 10_000
    assert soak["gauge_start"] == 7 == soak["gauge_end"]  # pages back to the idle baseline
    assert soak["gauge_settle_s"] >= 1.0  # three equal readings, 0.5 s apart
    assert len(soak["rss_samples"]) >= 3
    # plot.py's command line re-plots a saved run, soak RSS panel included
    png = tmp_path / "soak.png"
    plot = subprocess.run([sys.executable, str(LOADTEST / "plot.py"), str(tmp_path / "runs.jsonl"), str(png)])
    assert plot.returncode == 0 and png.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- pure helpers, in process


def sse(obj: Any) -> str:
    return "data: " + (obj if isinstance(obj, str) else json.dumps(obj))


def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
    return sse({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def test_stream_parser_times_tokens_and_reads_usage() -> None:
    parser = bench.StreamParser(start=10.0)
    lines = [
        (chunk({"role": "assistant", "content": ""}), 10.01),  # role only: not a token
        (": keep-alive", 10.02),
        (chunk({"reasoning_content": "hm"}), 10.05),
        ("", 10.05),
        (chunk({"content": "Hi"}), 10.07),
        (chunk({"content": " there"}), 10.10),
        (chunk({}, "stop"), 10.11),
        (sse({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5}}), 10.12),
        (sse("[DONE]"), 10.12),
    ]
    for line, now in lines:
        parser.feed(line, now)
    parser.check_complete()
    assert parser.ttft == pytest.approx(0.05)
    assert parser.itl == pytest.approx([0.02, 0.03])
    assert parser.completion_tokens == 5  # the usage wins over the 3 chunks seen
    assert "".join(parser.text) == "Hi there" and parser.finish_reason == "stop"
    parser.usage = None
    assert parser.completion_tokens == 3


def test_stream_parser_tool_call_fragments() -> None:
    parser = bench.StreamParser(start=0.0)
    first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    for now, line in enumerate(
        [
            chunk({"tool_calls": [first]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": '}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
            sse(
                {"choices": [{"delta": {"tool_calls": None}}], "finish_reason": "tool_calls"}
            ),  # the seed's shape
            sse("[DONE]"),
        ]
    ):
        parser.feed(line, float(now))
    parser.check_complete()
    assert parser.tool_names == {0: "f"} and "".join(parser.tool_args[0]) == '{"a": 1}'
    assert len(parser.token_times) == 3


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([sse("{not json")], "not JSON"),
        ([sse({"error": {"message": "boom"}})], "server error"),
        ([chunk({"content": "x"}), sse("[DONE]")], "finish_reason"),
        ([chunk({"content": "x"}, "stop")], "[DONE]"),
        ([chunk({"content": "x"}, "stop"), sse("[DONE]"), chunk({"content": "y"})], "after [DONE]"),
        ([sse({"id": "no choices"})], "choices"),
        ([sse({"choices": ["text"]})], "malformed choice"),
        ([sse({"choices": [{"delta": {"tool_calls": [7]}}]})], "malformed choice"),
        (["event: x", "garbage"], "SSE data line"),
        (
            [
                chunk(
                    {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{bad"}}]},
                    "tool_calls",
                ),
                sse("[DONE]"),
            ],
            "invalid JSON arguments",
        ),
    ],
)
def test_stream_parser_rejects_malformed_streams(lines: list[str], message: str) -> None:
    parser = bench.StreamParser(start=0.0)
    with pytest.raises(bench.StreamError, match=message.replace("[", r"\[").replace("]", r"\]")):
        for line in lines:
            parser.feed(line, 1.0)
        parser.check_complete()


def test_summarize_percentiles() -> None:
    records = []
    for i in range(100):  # e2e 1..100 ms, ttft a tenth of it, 5 output tokens
        e2e = (i + 1) / 1e3
        records.append(
            bench.RequestRecord(
                index=i,
                expected_output_len=5,
                ok=True,
                ttft=e2e / 10,
                e2e=e2e,
                itl=[e2e / 5] * 4,
                prompt_len=3,
                output_len=5,
            )
        )
    records.append(bench.RequestRecord(index=100, expected_output_len=5, error="HTTP 500: x"))
    s = bench.summarize(records, duration=2.0)
    assert (s["completed"], s["failed"], s["errors"]) == (100, 1, {"HTTP 500: x": 1})
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (300, 500)
    assert s["output_throughput"] == 250.0 and s["request_throughput"] == 50.0
    e2e = s["e2e_ms"]
    # numpy's linear interpolation over 1..100: p50 = 50.5, p90 = 90.1, p99 = 99.01
    assert (e2e["mean"], e2e["median"], e2e["p90"], e2e["p99"], e2e["max"]) == pytest.approx(
        (50.5, 50.5, 90.1, 99.01, 100.0)
    )
    assert s["ttft_ms"]["median"] == pytest.approx(5.05)
    assert s["tpot_ms"]["mean"] == pytest.approx(50.5 * 0.9 / 4)  # (e2e - ttft) / (5 - 1)
    assert bench.summarize([], 1.0)["itl_ms"]["p99"] is None
    table = bench.format_summary(s, "T")
    assert "Failed requests" in table and "99.01" in table


def test_random_dataset_lengths_and_prompts() -> None:
    specs = bench.random_dataset(200, 40, 10, 0.5, 0, "completions", None)
    assert all(20 <= s.prompt_len_estimate <= 40 and 5 <= s.output_len <= 10 for s in specs)
    assert all(len(s.prompt.split()) == s.prompt_len_estimate for s in specs)
    assert len({s.prompt for s in specs}) == 200  # fresh prompts: no accidental prefix-cache hits
    assert {s.output_len for s in specs} == set(range(5, 11))
    chat = bench.random_dataset(3, 8, 2, 1.0, 0, "chat", None)
    assert all(s.messages[0]["role"] == "user" and len(s.messages[0]["content"].split()) == 8 for s in chat)
    rng = random.Random(0)
    assert all(bench.sample_len(rng, 1, 0.0) == 1 for _ in range(5))


def test_jsonl_messages_need_the_chat_backend(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="--backend openai"):
        bench.jsonl_dataset(str(path), 10, 8, "completions")
    path.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="'messages' or 'prompt'"):
        bench.jsonl_dataset(str(path), 10, 8, "chat")


def test_parse_gauge() -> None:
    text = (
        "# HELP baleen_pages_used pages\n# TYPE baleen_pages_used gauge\n"
        'baleen_pages_used{rank="0",model="a}b"} 3\n'
        'baleen_pages_used{rank="1"} 4.5 1700000000\n'
        "baleen_pages_used_total 100\n"
        "other 1\n"
    )
    assert bench.parse_gauge(text, "baleen_pages_used") == 7.5
    assert bench.parse_gauge(text, "other") == 1.0
    assert bench.parse_gauge(text, "missing") is None


def test_process_tree_and_rss_include_children() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        tree = bench.process_tree([os.getpid()])
        assert tree[0] == os.getpid() and child.pid in tree
        snapshot = bench.rss_snapshot([os.getpid()])
        by_pid = {p["pid"]: p for p in snapshot["processes"]}
        assert by_pid[child.pid]["name"] == "sleep" and by_pid[os.getpid()]["rss_kb"] > 10_000
    finally:
        child.kill()
        child.wait()


def test_chunks_with_token_ids_but_no_text_count_as_tokens() -> None:
    parser = bench.StreamParser(start=0.0)
    parser.feed('data: {"choices": [{"index": 0, "text": "", "token_ids": [7]}]}', 0.5)
    parser.feed('data: {"choices": [{"index": 0, "text": "", "token_ids": []}]}', 0.6)
    parser.feed('data: {"choices": [{"index": 0, "delta": {"content": ""}, "token_ids": [8]}]}', 0.75)
    parser.feed('data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}', 0.8)
    parser.feed("data: [DONE]", 0.8)
    assert parser.token_times == [0.5, 0.75]
    assert parser.ttft == 0.5 and parser.itl == [0.25]
