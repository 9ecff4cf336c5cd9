"""loadtest/chaos.py: its checks catch what they are for, and a short run against the default model (speculative
decoding, mixed chunks, a KV pool and decode reserve small enough to preempt) finds nothing and leaves the server
drained."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parents[2] / "loadtest" / "chaos.py"


def _module() -> Any:
    spec = importlib.util.spec_from_file_location("loadtest_chaos", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


chaos = _module()


def _judged(case: Any, status: int, body: Any, stream: bool = False) -> Any:
    out = chaos.Outcome(case, status=status)
    if stream:
        chaos.judge(out, None, body)
    else:
        chaos.judge(out, json.dumps(body), None)
    return out


def _completion(text: str, finish: str = "stop", index: int = 0) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def test_checks_catch_broken_answers() -> None:
    case = chaos.Case("completion", "/v1/completions", {"prompt": "x"}, choices=2, max_tokens=4, stops=["."])
    good = {"choices": [_completion("ab"), _completion("cd", "length", 1)], "usage": _usage(3, 6)}
    assert _judged(case, 200, good).violations == []
    bad = {"choices": [_completion("a. b"), _completion("cd", "length", 3)], "usage": _usage(3, 9)}
    found = " | ".join(_judged(case, 200, bad).violations)
    for what in ("choices [0, 3], expected 0..1", "stop string '.'", "9 completion tokens for 2 x max_tokens 4"):
        assert what in found, found
    one = chaos.Case("completion", "/v1/completions", {"prompt": "x"}, max_tokens=4)
    short = {"choices": [_completion("ab", "length")], "usage": _usage(3, 2)}
    assert "finish_reason length after 2 of max_tokens 4" in " ".join(_judged(one, 200, short).violations)


def test_checks_of_statuses_streams_json_and_tools() -> None:
    chat = chaos.Case("chat", "/v1/chat/completions", {"messages": []}, max_tokens=8, schema=chaos.SCHEMA,
                      tool_choice="none")
    message = {"content": '{"name": "a"}', "tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{"}}]}
    body = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": _usage(5, 3)}
    found = " | ".join(_judged(chat, 200, body).violations)
    for what in ("missing 'count'", "arguments are not JSON", "a tool call under tool_choice none",
                 "finish_reason stop with 1 tool calls"):
        assert what in found, found
    assert "status 500" in _judged(chat, 500, {"detail": "boom"}).violations[0]
    refused = _judged(chat, 400, {"error": {"message": "no", "type": "invalid_request_error"}})
    assert refused.violations == [] and refused.refusal == "no"
    bad = chaos.Case("bad:zero-n", "/v1/chat/completions", {"n": 0})
    assert "expected a 4xx" in _judged(bad, 200, {"choices": []}).violations[0]
    assert "without an OpenAI error body" in _judged(bad, 400, {"detail": "no"}).violations[0]
    streamed = chaos.Case("chat", "/v1/chat/completions", {"stream": True, "stream_options": {"include_usage": True}},
                          stream=True, max_tokens=8)
    chunks = [{"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    found = " | ".join(_judged(streamed, 200, chunks, stream=True).violations)
    assert "finish_reason 'stop' sent 2 times" in found and "no usage chunk" in found, found


def test_logprob_checks() -> None:
    def entry(token: str, lp: float, alts: list[float]) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "top_logprobs": [{"token": "t", "logprob": a} for a in alts]}

    def found(temperature: float, entries: list[dict[str, Any]]) -> str:
        case = chaos.Case("chat", "/v1/chat/completions", {"temperature": temperature}, max_tokens=8, top_logprobs=2)
        body = {"choices": [{"index": 0, "message": {"content": "ab"}, "finish_reason": "stop",
                             "logprobs": {"content": entries}}], "usage": _usage(4, len(entries))}
        return " | ".join(_judged(case, 200, body).violations)

    fine = [entry("a", -0.1, [-0.1, -2.5]), entry("b", -0.01, [-0.01, -5.0])]
    assert found(0.0, fine) == ""
    # the bug chaos found: a greedy request's EOS held back by its slot's previous request's min_tokens
    assert "greedy, but its logprob -7.3000 is not the top alternative's -0.0020" in found(
        0.0, [fine[0], entry("Ch", -7.3, [-0.002, -7.3])])
    assert found(1.0, [fine[0], entry("Ch", -7.3, [-0.002, -7.3])]) == ""  # sampled: any token may come
    assert "above 0" in found(1.0, [entry("a", 0.5, [0.5, -1.0]), fine[1]])
    assert "descending" in found(1.0, [entry("a", -2.0, [-2.0, -1.0]), fine[1]])


def test_random_cases_are_reproducible_and_cover_every_kind() -> None:
    import random

    def kinds(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [chaos.make_case(rng, 4096).kind for _ in range(400)]

    assert kinds(3) == kinds(3)
    seen = {k.split(":")[0] for k in kinds(3)}
    assert seen == {"chat", "completion", "generate", "bad"}


def test_a_short_run_against_the_default_model_finds_nothing() -> None:
    # a small pool and a small decode reserve: running requests outgrow it and the newest are preempted; mixed steps
    # hold at most 24 prompt tokens beside their decode rows
    flags = ["--tool-call-parser", "deepseekv3", "--speculative-algorithm", "EAGLE", "--enable-mixed-chunk",
             "--chunked-prefill-size", "64", "--mixed-chunk-size", "24", "--max-total-tokens", "640", "--page-size", "8",
             "--schedule-conservativeness", "0.03", "--max-running-requests", "6"]
    run = subprocess.run([sys.executable, "-P", str(SCRIPT), "--seconds", "20", "--concurrency", "6", "--seed", "5",
                          "--serve", "--", *flags], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    assert ", 0 failed their checks; server after the run: drained" in run.stdout, run.stdout[-3000:]
    assert "| chat/stream |" in run.stdout and "| bad |" in run.stdout, run.stdout
