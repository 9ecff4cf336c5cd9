"""Chaos: a seeded random mix of the request shapes users send, against one server, each answer checked.

Every request is drawn at random from what the API takes: chat and completions (and SGLang's /generate), streamed or
not, n > 1, a batch of prompts, logprobs with alternatives, stop strings, min_tokens, penalties, logit_bias, seeds,
temperature / top-k / top-p / min-p, JSON objects and schemas, tools with every tool_choice, and besides those
clients that hang up mid-stream and bodies the server must refuse. Each answer is checked against what the request
asked for:

- a valid request gets 200 (a 4xx, or a 503 when the queue is full, is counted as a refusal and listed with its
  message), a bad one a 4xx with an OpenAI error body; never another 5xx, a body without its error, a malformed
  stream, or no answer within `--request-timeout`;
- `n` choices numbered 0..n-1 (n per prompt of a batch), one finish reason each (stop, length, tool_calls), a stream
  that ends with `[DONE]`, usage that adds up (`length` means max_tokens tokens; min_tokens holds when the model
  stopped on its own; with logprobs one entry a token and the alternatives asked for);
- no stop string in the text, JSON that parses when a response format asked for it (the schema's required keys
  with their types), tool-call arguments that parse, the named tool when tool_choice names one, none with "none";

then, once every client is done, that the server drained: no request running or queued, no KV page held (pages the
prefix cache may evict do not count), /health answers and a plain request still succeeds.

    python -P loadtest/chaos.py --base-url http://127.0.0.1:30000 --seconds 60 --concurrency 8
    python -P loadtest/chaos.py --seconds 60 --serve -- --speculative-algorithm EAGLE --enable-mixed-chunk
    python -P loadtest/chaos.py --seconds 60 --serve -- --speculative-algorithm EAGLE --debug-eager-graphs \
        --cuda-graph-bs 1 2 4 8 --max-running-requests 8    # on CPU: the CUDA-graph paths, their bodies run eagerly

With `--serve` it starts `python -P -m baleen.launch_server` (bench_ttft's `server_process`) with the flags after
`--` (the embedded default model unless they name one) and stops it at the end. The exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

FINISH_REASONS = {"stop", "length", "tool_calls"}
STOPS = [".", "\n", " the", ",", "2", "is", "capital of", "°", "🐋"]

WEATHER_TOOL = {"type": "function", "function": {
    "name": "query_weather", "description": "Get weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "query_time", "description": "Get the local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "count": {"type": "integer"}},
          "required": ["name", "count"]}
_TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
                                              "object": dict, "array": list}

CITIES = ["Qingdao", "Paris", "Lima", "Oslo", "Nairobi", "Quito", "Hanoi", "Perth"]
COUNTRIES = ["France", "Japan", "Kenya", "Peru", "Norway", "Chile", "Egypt", "Canada"]
TEXT = ["Shall I compare thee to a summer's day?", "Now is the winter of our discontent",
        "The quality of mercy is not strained;", "All the world's a stage, and all the men and women"]


def chat_prompts(rng: random.Random) -> tuple[list[dict[str, Any]], bool]:
    """A conversation, and whether it is a weather question (tools make sense)."""
    kind = rng.randrange(6)
    if kind == 0:
        q = f"What is the capital of {rng.choice(COUNTRIES)}?"
    elif kind == 1:
        q = f"What is {rng.randrange(1000)} {rng.choice('+-*')} {rng.randrange(100)}?"
    elif kind == 2:
        return [{"role": "user", "content": f"How's the weather like in {rng.choice(CITIES)} today"}], True
    elif kind == 3:
        q = f"List {rng.randrange(1, 5)} countries and their capitals."
    elif kind == 4 and rng.random() < 0.3:  # the seeds' second turn: the call made, the tool's answer back
        city = rng.choice(CITIES)
        call = {"id": "call_0", "type": "function",
                "function": {"name": "query_weather", "arguments": json.dumps({"city": city})}}
        return [{"role": "user", "content": f"How's the weather like in {city} today"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_0", "content": "Sunny, 24°C"}], True
    else:
        q = f"Continue the text: {rng.choice(TEXT)}" + rng.choice(["", " 🐋", " — «ça va»", " 你好"])
    messages = [{"role": "user", "content": q}]
    if rng.random() < 0.2:
        messages.insert(0, {"role": "system", "content": "You are a helpful assistant."})
    return messages, False


@dataclass
class Case:
    """One request and what its answer must satisfy."""

    kind: str  # chat | completion | generate | bad:<what>
    path: str
    body: dict[str, Any] | bytes
    stream: bool = False
    hang_up_after: int | None = None  # chunks read before the client closes the stream
    give_up_after: float | None = None  # seconds before a client waiting for a whole answer closes the connection
    choices: int = 1  # choices expected (n x prompts)
    max_tokens: int | None = None
    min_tokens: int = 0
    stops: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs asked
    schema: dict[str, Any] | None = None  # a JSON answer was asked for (an empty dict: any JSON object)
    tool_choice: Any = None
    constrained: bool = False  # a grammar (schema, regex, tools) may end the output before min_tokens
    echo_prompt: str | None = None

    @property
    def bad(self) -> bool:
        return self.kind.startswith("bad:")

    @property
    def fields(self) -> dict[str, Any]:
        """The body's fields ({} for a raw bad body)."""
        return self.body if isinstance(self.body, dict) else {}


def sampling(rng: random.Random, case: Case, body: dict[str, Any], max_key: str = "max_tokens") -> None:
    """Random sampling fields into `body` (the OpenAI spellings), recording what the checks need in `case`."""
    case.max_tokens = rng.choice([1, 2, 5, 16, 32, 48]) if rng.random() < 0.95 else rng.randrange(100, 300)
    body[max_key] = case.max_tokens
    if rng.random() < 0.6:
        body["temperature"] = 0.0
    else:
        body["temperature"] = round(rng.uniform(0.2, 1.5), 2)
        if rng.random() < 0.4:
            body["top_p"] = round(rng.uniform(0.3, 1.0), 2)
        if rng.random() < 0.3:
            body["top_k"] = rng.randrange(1, 50)
        if rng.random() < 0.2:
            body["min_p"] = round(rng.uniform(0.0, 0.2), 2)
        if rng.random() < 0.3:
            body["seed"] = rng.randrange(2**31)
    if rng.random() < 0.15:
        body["presence_penalty"] = round(rng.uniform(-1, 1), 2)
    if rng.random() < 0.15:
        body["frequency_penalty"] = round(rng.uniform(-1, 1), 2)
    if rng.random() < 0.1:
        body["repetition_penalty"] = round(rng.uniform(0.8, 1.3), 2)
    if rng.random() < 0.25:
        case.stops = rng.sample(STOPS, rng.randrange(1, 3))
        body["stop"] = case.stops if len(case.stops) > 1 or rng.random() < 0.5 else case.stops[0]
    if rng.random() < 0.15:
        body["ignore_eos"] = True
    if rng.random() < 0.1:
        body["logit_bias"] = {str(rng.randrange(0, 1000)): rng.choice([-100, -5.5, 2, 100]) for _ in range(3)}
    if rng.random() < 0.15:
        case.min_tokens = rng.randrange(1, case.max_tokens + 1)
        body["min_tokens"] = case.min_tokens
    if rng.random() < 0.25:
        n = rng.randrange(2, 4)
        body["n"] = n
        case.choices *= n


def chat_case(rng: random.Random) -> Case:
    messages, weather = chat_prompts(rng)
    body: dict[str, Any] = {"model": "default", "messages": messages}
    case = Case("chat", "/v1/chat/completions", body)
    sampling(rng, case, body, rng.choice(["max_tokens", "max_completion_tokens"]))
    if rng.random() < 0.3:
        body["logprobs"] = True
        case.top_logprobs = rng.randrange(0, 6)
        if case.top_logprobs or rng.random() < 0.5:
            body["top_logprobs"] = case.top_logprobs
    if weather and rng.random() < 0.7:
        body["tools"] = [WEATHER_TOOL, TIME_TOOL][: rng.randrange(1, 3)]
        case.tool_choice = rng.choice(["auto", "none", "required", "named", None])
        if case.tool_choice == "named":
            case.tool_choice = {"type": "function", "function": {"name": "query_weather"}}
        if case.tool_choice is not None:
            body["tool_choice"] = case.tool_choice
        case.stops, case.constrained = [], True  # a stop string inside a tool call's JSON is not what this checks
        body.pop("stop", None)
    elif rng.random() < 0.2:
        r = rng.random()
        if r < 0.35:
            body["response_format"] = {"type": "json_object"}
            case.schema = {}
        elif r < 0.7:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
            case.schema = SCHEMA
        elif r < 0.85:
            body["regex"] = "(Yes|No), [a-z]{1,8}[.]"
        else:
            body["ebnf"] = 'root ::= "[" num ("," num)* "]"\nnum ::= [1-9] [0-9]?'
        case.stops, case.constrained = [], True
        body.pop("stop", None)
    extras(rng, body)
    if rng.random() < 0.05 and messages[-1]["role"] == "user":  # the answer's start given: the model continues it
        messages.append({"role": "assistant", "content": "The answer is"})
    if rng.random() < 0.1:
        body["chat_template_kwargs"] = {"thinking": rng.random() < 0.5}
    if rng.random() < 0.1:
        body["separate_reasoning"] = False
    stream(rng, case, body)
    return case


def extras(rng: random.Random, body: dict[str, Any]) -> None:
    """Fields with nothing to check but that the server must take: stop ids, special tokens kept, token ids back."""
    if rng.random() < 0.1:  # NOTE: plain tokens too: the output may end anywhere, mid-JSON included (`check`)
        body["stop_token_ids"] = [rng.randrange(10, 400) for _ in range(rng.randrange(1, 3))]
    if rng.random() < 0.1:
        body["skip_special_tokens"] = False
    if rng.random() < 0.1:
        body["return_token_ids"] = True
    if rng.random() < 0.05:
        body["user"] = f"user-{rng.randrange(100)}"
    # the seeds' thinking budget, by its registered name (needs --enable-custom-logit-processor); beside a grammar
    # that forbids what it forces, the grammar wins
    if rng.random() < 0.05:
        body["custom_logit_processor"] = "deepseek_r1_thinking_budget"
        body["custom_params"] = {"thinking_budget": rng.randrange(1, 30)}


def completion_case(rng: random.Random) -> Case:
    texts: list[Any] = [rng.choice(TEXT) for _ in range(rng.choice([1, 1, 1, 2]))]
    ids = rng.random() < 0.15  # token ids instead of text: a list of ints, or a batch of them
    if ids:
        texts = [[rng.randrange(100, 1000) for _ in range(rng.randrange(1, 30))] for _ in texts]
    body: dict[str, Any] = {"model": "default", "prompt": texts[0] if len(texts) == 1 else texts}
    case = Case("completion", "/v1/completions", body, choices=len(texts))
    sampling(rng, case, body)
    if rng.random() < 0.3:
        case.top_logprobs = rng.randrange(0, 6)
        body["logprobs"] = case.top_logprobs
    if len(texts) == 1 and rng.random() < 0.15:
        body["echo"] = True
        case.echo_prompt = None if ids else texts[0]
    if rng.random() < 0.1:
        body["regex"] = "(yes|no|maybe)[.!]"
        case.stops, case.constrained = [], True
        body.pop("stop", None)
    extras(rng, body)
    stream(rng, case, body)
    return case


def generate_case(rng: random.Random) -> Case:
    """SGLang's /generate: text or token ids, SGLang's sampling field names."""
    params: dict[str, Any] = {}
    case = Case("generate", "/generate", {})
    sampling(rng, case, params)
    params["max_new_tokens"] = params.pop("max_tokens")
    if "min_tokens" in params:
        params["min_new_tokens"] = params.pop("min_tokens")
    body: dict[str, Any] = {"sampling_params": params}
    batch = rng.random() < 0.15
    if rng.random() < 0.5:
        body["text"] = [rng.choice(TEXT), rng.choice(TEXT)] if batch else rng.choice(TEXT)
    else:
        ids = [[rng.randrange(100, 1000) for _ in range(rng.randrange(1, 40))] for _ in range(2 if batch else 1)]
        body["input_ids"] = ids if batch else ids[0]
    case.choices *= 2 if batch else 1
    if rng.random() < 0.2:
        body["return_logprob"] = True
        body["top_logprobs_num"] = rng.randrange(0, 4)
        body["logprob_start_len"] = rng.choice([-1, -1, 0, 3])
    body["stream"] = case.stream = rng.random() < 0.5
    case.body = body
    return case


def stream(rng: random.Random, case: Case, body: dict[str, Any]) -> None:
    if rng.random() < 0.5:
        if rng.random() < 0.05:
            case.give_up_after = rng.uniform(0.0, 0.5)
        return
    body["stream"] = case.stream = True
    if rng.random() < 0.7:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.2:
        case.hang_up_after = rng.randrange(0, 3)


def bad_case(rng: random.Random, context_length: int) -> Case:
    """A body the server must refuse with a 4xx."""
    chat: dict[str, Any] = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    choices: list[tuple[str, dict[str, Any] | bytes]] = [
        ("malformed-json", b'{"messages": [{"role": "user", "content": "Hi"}'),
        ("not-an-object", b"[1, 2, 3]"),
        ("no-messages", {"model": "default"}),
        ("empty-messages", {**chat, "messages": []}),
        ("unknown-role", {**chat, "messages": [{"role": "robot", "content": "Hi"}]}),
        ("negative-max-tokens", {**chat, "max_tokens": -1}),
        ("zero-n", {**chat, "n": 0}),
        ("negative-temperature", {**chat, "temperature": -0.5}),
        ("top-p-above-one", {**chat, "top_p": 1.5}),
        ("too-many-top-logprobs", {**chat, "logprobs": True, "top_logprobs": 50}),
        ("min-above-max-tokens", {**chat, "min_tokens": 9}),
        ("logit-bias-not-a-token-id", {**chat, "logit_bias": {"whale": 1}}),
        ("logit-bias-out-of-range", {**chat, "logit_bias": {"5": 500}}),
        ("string-max-tokens", {**chat, "max_tokens": "four"}),
        ("bad-schema", {**chat, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}}),
        ("unknown-tool-choice", {**chat, "tools": [WEATHER_TOOL],
                                 "tool_choice": {"type": "function", "function": {"name": "no_such_tool"}}}),
        ("prompt-over-context", {"model": "default", "prompt": [5] * (context_length + 8), "max_tokens": 4}),
    ]
    what, body = rng.choice(choices)
    path = "/v1/completions" if what == "prompt-over-context" else "/v1/chat/completions"
    return Case(f"bad:{what}", path, body)


def make_case(rng: random.Random, context_length: int) -> Case:
    r = rng.random()
    if r < 0.45:
        return chat_case(rng)
    if r < 0.75:
        return completion_case(rng)
    if r < 0.88:
        return generate_case(rng)
    return bad_case(rng, context_length)


# ---- checks --------------------------------------------------------------------------------------------------
@dataclass
class Choice:
    """One choice's answer, assembled from a whole response or from its stream's chunks."""

    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    finishes: int = 0  # chunks that carried a finish reason (a stream must send one)
    tool_calls: dict[int, dict[str, str]] = field(default_factory=dict)  # index -> name, arguments
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # one per token: the token's entry
    tokens: int | None = None  # the server's count for this choice, where it gives one
    input_logprobs: list[Any] | None = None  # /generate's input_token_logprobs
    prompt_tokens: int | None = None  # /generate's meta_info.prompt_tokens


def _chat_choice(c: Choice, msg: dict[str, Any], finish: str | None, logprobs: dict[str, Any] | None) -> None:
    c.text += msg.get("content") or ""
    c.reasoning += msg.get("reasoning_content") or ""
    for i, call in enumerate(msg.get("tool_calls") or []):
        at = call.get("index", i)
        slot = c.tool_calls.setdefault(at, {"name": "", "arguments": ""})
        fn = call.get("function") or {}
        slot["name"] += fn.get("name") or ""
        slot["arguments"] += fn.get("arguments") or ""
    if logprobs and logprobs.get("content"):
        c.logprobs += [{"top": len(e.get("top_logprobs") or []), "logprob": e.get("logprob"),
                        "alternatives": [t.get("logprob") for t in e.get("top_logprobs") or []]}
                       for e in logprobs["content"]]
    if finish is not None:
        c.finish_reason = finish
        c.finishes += 1


def _completion_choice(c: Choice, ch: dict[str, Any]) -> None:
    c.text += ch.get("text") or ""
    lp = ch.get("logprobs")
    if lp and lp.get("tokens") is not None:
        tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
        c.logprobs += [{"top": len(t or {}), "logprob": v, "alternatives": sorted((t or {}).values(), reverse=True)}
                       for t, v in zip(tops, lp.get("token_logprobs") or [])]
    if ch.get("finish_reason") is not None:
        c.finish_reason = ch["finish_reason"]
        c.finishes += 1


def assemble(case: Case, bodies: list[dict[str, Any]]) -> tuple[dict[int, Choice], dict[str, Any] | None]:
    """The choices of a response (one body) or of a stream's chunks, and the usage if one came."""
    out: dict[int, Choice] = collections.defaultdict(Choice)
    usage = None
    for body in bodies:
        if case.kind == "generate":
            items = body if isinstance(body, list) else [body]
            for i, item in enumerate(items):
                at = item.get("index", i)
                c = out[at]
                c.text = item["text"]  # cumulative, streamed or not
                meta = item["meta_info"]
                c.tokens = meta.get("completion_tokens")
                c.input_logprobs = meta.get("input_token_logprobs")
                c.prompt_tokens = meta.get("prompt_tokens")
                fr = meta.get("finish_reason")
                c.finish_reason = fr.get("type") if isinstance(fr, dict) else fr
                c.finishes = 1 if fr is not None else 0
            continue
        usage = body.get("usage") or usage
        for ch in body.get("choices") or []:
            if case.kind == "chat":
                _chat_choice(out[ch["index"]], ch.get("delta") or ch.get("message") or {}, ch.get("finish_reason"),
                             ch.get("logprobs"))
            else:
                _completion_choice(out[ch["index"]], ch)
    return dict(out), usage


def _schema_errors(value: Any, schema: dict[str, Any]) -> list[str]:
    if not isinstance(value, dict):
        return [f"not a JSON object: {value!r:.80}"]
    errors = [f"missing {k!r}" for k in schema.get("required", []) if k not in value]
    for k, sub in schema.get("properties", {}).items():
        want = _TYPES.get(sub.get("type", ""))
        if k in value and want is not None and (not isinstance(value[k], want) or (isinstance(value[k], bool)
                                                 and sub.get("type") != "boolean")):
            errors.append(f"{k!r} is {type(value[k]).__name__}, not {sub['type']}")
    return errors


def check(case: Case, choices: dict[int, Choice], usage: dict[str, Any] | None) -> list[str]:
    """What the answer breaks of what the request asked (an empty list: nothing)."""
    v: list[str] = []
    if sorted(choices) != list(range(case.choices)):
        v.append(f"choices {sorted(choices)}, expected 0..{case.choices - 1}")
    for i, c in choices.items():
        where = f"choice {i}"
        if c.finishes != 1 or c.finish_reason not in FINISH_REASONS:
            v.append(f"{where}: finish_reason {c.finish_reason!r} sent {c.finishes} times")
        generated = c.text[len(case.echo_prompt):] if case.echo_prompt and c.text.startswith(case.echo_prompt) else c.text
        for s in case.stops:
            if s in generated:
                v.append(f"{where}: stop string {s!r} in the text {generated!r:.120}")
        echoed = bool(case.fields.get("echo")) and case.top_logprobs is not None
        if echoed and usage:  # the echoed prompt's tokens come first (the first without a logprob)
            head, c.logprobs = c.logprobs[: usage.get("prompt_tokens", 0)], c.logprobs[usage.get("prompt_tokens", 0):]
            if not head or head[0]["logprob"] is not None or any(e["logprob"] is None for e in head[1:]):
                v.append(f"{where}: echoed prompt logprobs {[e['logprob'] for e in head][:4]}...")
        elif echoed:  # no usage to tell where the prompt's tokens end: no output counts from the logprobs
            c.logprobs = []
        by_logprobs = case.top_logprobs is not None and not (echoed and not usage)
        counted = c.tokens if c.tokens is not None else (len(c.logprobs) if by_logprobs else None)
        if case.top_logprobs is not None and case.kind != "generate":
            if usage and case.choices == 1 and len(c.logprobs) != usage.get("completion_tokens"):
                v.append(f"{where}: {len(c.logprobs)} logprobs entries for {usage.get('completion_tokens')} tokens")
            # NOTE: completions' alternatives are a dict keyed by token text: tokens that decode alike (byte
            # pieces) collapse into one entry, so only the chat list must hold every alternative asked for
            short = [e["top"] for e in c.logprobs if e["top"] != case.top_logprobs]
            if short and case.kind == "chat":
                v.append(f"{where}: alternatives {sorted(set(short))} per token, {case.top_logprobs} asked")
        v += [f"{where}: {e}" for e in _logprob_errors(case, c.logprobs)]
        if counted is None and usage and case.choices == 1:
            counted = usage.get("completion_tokens")
        if counted is not None and case.max_tokens is not None:
            if counted > case.max_tokens:
                v.append(f"{where}: {counted} tokens, max_tokens {case.max_tokens}")
            if c.finish_reason == "length" and counted != case.max_tokens:
                v.append(f"{where}: finish_reason length after {counted} of max_tokens {case.max_tokens}")
            if c.finish_reason == "stop" and counted < case.min_tokens and not case.stops and not case.constrained:
                v.append(f"{where}: stopped after {counted} tokens, min_tokens {case.min_tokens}")
        v += [f"{where}: {e}" for e in _input_logprob_errors(case, c)]
        if case.echo_prompt is not None and not c.text.startswith(case.echo_prompt):
            v.append(f"{where}: echo without the prompt: {c.text!r:.80}")
        v += [f"{where}: {e}" for e in _structure_errors(case, c)]
    if usage is not None:
        total = usage.get("completion_tokens", 0)
        if case.max_tokens is not None and total > case.max_tokens * case.choices:
            v.append(f"usage: {total} completion tokens for {case.choices} x max_tokens {case.max_tokens}")
        if usage.get("prompt_tokens", 0) <= 0 or usage.get("total_tokens") != usage.get("prompt_tokens", 0) + total:
            v.append(f"usage does not add up: {usage}")
    return v


def _input_logprob_errors(case: Case, c: Choice) -> list[str]:
    """/generate's input_token_logprobs against logprob_start_len: the prompt's tokens from there, None at 0."""
    if case.kind != "generate" or c.input_logprobs is None or not c.prompt_tokens or not c.finishes:
        return []
    start = case.fields.get("logprob_start_len", -1)
    want = max(c.prompt_tokens - start, 0) if start >= 0 else 0
    lps = [e[0] for e in c.input_logprobs]
    if len(lps) == want and not (start == 0 and lps and lps[0] is not None) and all(
            lp is not None and lp <= 1e-4 for lp in lps[start == 0:]):  # fmt: skip
        return []
    return [f"input_token_logprobs {lps[:4]}... ({len(lps)}) for logprob_start_len {start} of {c.prompt_tokens} "
            "prompt tokens"]


def _structure_errors(case: Case, c: Choice) -> list[str]:
    """The JSON a response format asked for and the tool calls, unless the output was cut short: by max_tokens, or
    by a stop token id or string the request named (which may be any plain token or text, inside a call too: then
    finish_reason is "stop", not "tool_calls")."""
    stops = bool(case.fields.get("stop_token_ids") or case.fields.get("stop"))
    cut = c.finish_reason == "length" or (stops and c.finish_reason == "stop")
    if cut:
        return ["a tool call under tool_choice none"] if c.tool_calls and case.tool_choice == "none" else []
    errors = []
    if case.schema is not None and c.finish_reason == "stop":
        try:
            errors += _schema_errors(json.loads(c.text), case.schema)
        except ValueError:
            errors.append(f"response_format asked for JSON, got {c.text!r:.120}")
    for call in c.tool_calls.values():
        try:
            json.loads(call["arguments"])
        except ValueError:
            errors.append(f"tool call arguments are not JSON ({c.finish_reason}): {call['arguments']!r:.120}")
    names = [t["name"] for t in c.tool_calls.values()]
    named = case.tool_choice.get("function", {}).get("name") if isinstance(case.tool_choice, dict) else None
    if names and case.tool_choice == "none":
        errors.append("a tool call under tool_choice none")
    if named and names != [named]:
        errors.append(f"tool calls {names}, tool_choice names {named}")
    if case.tool_choice == "required" and not names:
        errors.append("no tool call under tool_choice required")
    if (c.finish_reason == "tool_calls") != bool(names):
        errors.append(f"finish_reason {c.finish_reason} with {len(names)} tool calls")
    return errors


def _num_prompts(case: Case) -> int:
    body = case.fields
    prompt = body.get("prompt", body.get("text", body.get("input_ids")))
    batch = isinstance(prompt, list) and bool(prompt) and (isinstance(prompt[0], (str, list)))
    return len(prompt) if batch and prompt is not None else 1


def _plain_greedy(case: Case) -> bool:
    """Whether each token must be the argmax of the distribution its logprobs come from (temperature 0, nothing
    that moves the logits first: penalties, min_tokens, a grammar)."""
    body = case.fields
    moved = (any(body.get(k) for k in ("presence_penalty", "frequency_penalty", "custom_logit_processor", "logit_bias"))
             or body.get("repetition_penalty", 1) != 1)
    return body.get("temperature") == 0 and not moved and not case.min_tokens and not case.constrained


def _logprob_errors(case: Case, entries: list[dict[str, Any]]) -> list[str]:
    """Logprobs that cannot be right: above 0, alternatives out of order, or a greedy token that is not the top."""
    errors = []
    for at, e in enumerate(entries):
        lp, alts = e["logprob"], [a for a in e.get("alternatives", []) if a is not None]
        if lp is None:
            continue
        if lp > 1e-4 or any(a > 1e-4 for a in alts):
            errors.append(f"token {at}: a logprob above 0 ({lp}, {alts[:3]})")
        elif alts != sorted(alts, reverse=True):
            errors.append(f"token {at}: alternatives not in descending order {alts}")
        elif alts and _plain_greedy(case) and abs(lp - alts[0]) > 1e-3 and len(alts) == case.top_logprobs:
            errors.append(f"token {at}: greedy, but its logprob {lp:.4f} is not the top alternative's {alts[0]:.4f}")
        if len(errors) >= 3:
            break
    return errors


def greedy_divergence(case: Case, choices: dict[int, Choice]) -> str | None:
    """Where n greedy choices of one prompt part ways (None: they agree, or the request is not plain greedy)."""
    per_prompt = case.choices // _num_prompts(case)
    if not _plain_greedy(case) or per_prompt < 2:
        return None
    for first in range(0, case.choices, per_prompt):
        texts = [choices[i].text for i in range(first, first + per_prompt) if i in choices]
        if len(set(texts)) > 1:
            common = next((i for i, cs in enumerate(zip(*texts)) if len(set(cs)) > 1), min(map(len, texts)))
            return f"after {common} of {max(map(len, texts))} characters: {[t[common:common + 20] for t in texts]}"
    return None


def _error_body(text: str) -> str | None:
    """The message of an OpenAI-style error body, or None when the body is not one."""
    try:
        err = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return None
    return err.get("message") if isinstance(err, dict) and isinstance(err.get("message"), str) else None


# ---- the client ----------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    case: Case
    status: int | None = None
    violations: list[str] = field(default_factory=list)
    refusal: str | None = None  # a valid request's 4xx message
    # n greedy choices of one prompt that differ: a bug, or a near-tie the choices' different batch rows (and with
    # speculation, verify shapes) rounded apart, which plain float arithmetic allows: reported, not failed
    diverged: str | None = None
    seconds: float = 0.0


async def run_case(client: httpx.AsyncClient, case: Case, timeout: float) -> Outcome:
    out = Outcome(case)
    started = time.perf_counter()
    content = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    try:
        async with asyncio.timeout(case.give_up_after or timeout):
            async with client.stream("POST", case.path, content=content,
                                     headers={"content-type": "application/json"}) as resp:  # fmt: skip
                out.status = resp.status_code
                if resp.status_code != 200 or not case.stream:
                    text = (await resp.aread()).decode(errors="replace")
                    judge(out, text, None)
                else:
                    await read_stream(out, resp)
    except TimeoutError:
        if case.give_up_after is None:
            out.violations.append(f"no complete answer within {timeout:.0f} s")
    except httpx.HTTPError as e:
        out.violations.append(f"transport error: {type(e).__name__}: {e}")
    out.seconds = time.perf_counter() - started
    return out


async def read_stream(out: Outcome, resp: httpx.Response) -> None:
    case, events, done, chunks = out.case, [], False, 0
    async for line in resp.aiter_lines():
        if not line or line.startswith(":"):
            continue
        if not line.startswith("data: "):
            out.violations.append(f"not an SSE data line: {line!r:.100}")
            continue
        data = line[len("data: "):]
        if done:
            out.violations.append(f"data after [DONE]: {data!r:.100}")
        if data == "[DONE]":
            done = True
            continue
        try:
            events.append(json.loads(data))
        except ValueError:
            out.violations.append(f"a chunk that is not JSON: {data!r:.100}")
            continue
        if "error" in events[-1]:
            out.violations.append(f"an error inside the stream: {events[-1]['error']}")
        chunks += 1
        if case.hang_up_after is not None and chunks > case.hang_up_after:
            return  # the client hangs up; leaving the context manager closes the connection
    if not done:
        out.violations.append("the stream ended without [DONE]")
    judge(out, None, events)


def judge(out: Outcome, text: str | None, events: list[dict[str, Any]] | None) -> None:
    case = out.case
    if case.bad:
        if out.status is None or not 400 <= out.status < 500:
            out.violations.append(f"status {out.status} for a bad body ({case.kind}), expected a 4xx")
        elif text is not None and _error_body(text) is None and case.path != "/generate":
            out.violations.append(f"a {out.status} without an OpenAI error body: {text!r:.160}")
        return
    if out.status != 200:
        message = _error_body(text or "") if text is not None else None
        # a 4xx, or back-pressure (429, 503 with the queue full), with an OpenAI error body: refused, not broken
        if out.status is not None and (400 <= out.status < 500 or out.status == 503) and message is not None:
            out.refusal = message
        else:
            out.violations.append(f"status {out.status}: {text!r:.200}")
        return
    if events is None:
        try:
            events = [json.loads(text or "")]
        except ValueError:
            out.violations.append(f"a 200 whose body is not JSON: {text!r:.160}")
            return
    choices, usage = assemble(case, events)
    if case.stream and case.kind != "generate":
        if (case.fields.get("stream_options") or {}).get("include_usage") and usage is None:
            out.violations.append("stream_options.include_usage, but no usage chunk")
    elif case.kind != "generate" and usage is None:
        out.violations.append("no usage in the response")
    out.violations += check(case, choices, usage)
    out.diverged = greedy_divergence(case, choices)


# ---- the server's state --------------------------------------------------------------------------------------
def gauges(text: str) -> dict[str, float]:
    """Unlabelled baleen_* gauges of a /metrics page."""
    found = {}
    for line in text.splitlines():
        m = re.match(r"(baleen_\w+) ([-+0-9.eE]+|nan)$", line)
        if m:
            found[m.group(1)] = float(m.group(2))
    return found


async def drained(client: httpx.AsyncClient, timeout: float) -> tuple[list[str], dict[str, float]]:
    """Wait for the server to go idle, then what is still held (an empty list: nothing), and its gauges."""
    deadline = time.monotonic() + timeout
    g: dict[str, float] = {}
    while time.monotonic() < deadline:
        g = gauges((await client.get("/metrics")).text)
        if not g.get("baleen_num_running_requests") and not g.get("baleen_num_waiting_requests") and not g.get(
                "baleen_pages_used"):  # fmt: skip
            break
        await asyncio.sleep(0.2)
    problems = [f"{name} = {g.get(name)} {timeout:.0f} s after the last request"
                for name in ("baleen_num_running_requests", "baleen_num_waiting_requests", "baleen_pages_used")
                if g.get(name)]
    if (await client.get("/health")).status_code != 200:
        problems.append("/health does not answer 200 after the run")
    final = Case("chat", "/v1/chat/completions", {"model": "default", "max_tokens": 8, "temperature": 0,
                                                  "messages": [{"role": "user", "content": "What is 2 + 2?"}]})
    last = await run_case(client, final, 60)
    problems += [f"a plain request after the run: {p}" for p in last.violations]
    return problems, g


async def context_length(client: httpx.AsyncClient) -> int:
    info = (await client.get("/get_server_info")).json()
    return int(info["max_context_len"])


async def chaos(base_url: str, seconds: float, concurrency: int, seed: int, timeout: float,
                verbose: bool) -> dict[str, Any]:  # fmt: skip
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        ctx = await context_length(client)
        rng = random.Random(seed)
        outcomes: list[Outcome] = []
        end = time.monotonic() + seconds

        async def user(k: int) -> None:
            user_rng = random.Random(rng.randrange(2**32) + k)
            while time.monotonic() < end:
                o = await run_case(client, make_case(user_rng, ctx), timeout)
                outcomes.append(o)
                if verbose and o.violations:
                    print(f"[{o.case.kind}] {o.violations} {json.dumps(o.case.body)[:300]}", file=sys.stderr)

        await asyncio.gather(*(user(k) for k in range(concurrency)))
        after, final = await drained(client, timeout=60)
    return {"outcomes": outcomes, "after": after, "gauges": final, "context_length": ctx}


def report(result: dict[str, Any]) -> tuple[str, int]:
    outcomes: list[Outcome] = result["outcomes"]
    by_kind: dict[str, list[Outcome]] = collections.defaultdict(list)
    for o in outcomes:
        by_kind[o.case.kind.split(":")[0] + ("/stream" if o.case.stream else "")].append(o)
    lines = ["| kind | requests | failed checks | refused (4xx, 503) | hung up | p50 s | max s |", "|---|---|---|---|---|---|---|"]
    for kind, os_ in sorted(by_kind.items()):
        secs = sorted(o.seconds for o in os_)
        gone = sum(o.case.hang_up_after is not None or o.case.give_up_after is not None for o in os_)
        lines.append(f"| {kind} | {len(os_)} | {sum(bool(o.violations) for o in os_)} | "
                     f"{sum(o.refusal is not None for o in os_)} | {gone} | {secs[len(secs) // 2]:.2f} | {secs[-1]:.2f} |")
    failed = [o for o in outcomes if o.violations]
    refusals = collections.Counter(o.refusal for o in outcomes if o.refusal is not None)
    if refusals:
        lines.append("\nvalid requests refused:")
        lines += [f"  {n} x {msg[:200]}" for msg, n in refusals.most_common()]
    if failed:
        lines.append(f"\n{len(failed)} requests failed their checks (first 20):")
        for o in failed[:20]:
            body = o.case.body if isinstance(o.case.body, bytes) else json.dumps(o.case.body)
            lines.append(f"  [{o.case.kind}{' stream' if o.case.stream else ''}] {'; '.join(o.violations)[:400]}\n"
                         f"      {str(body)[:1000]}")
    diverged = [o for o in outcomes if o.diverged]
    if diverged:
        lines.append(f"\n{len(diverged)} requests' greedy choices differ (a bug, or a near-tie rounded apart by "
                     "different batch rows; look at where):")
        lines += [f"  {o.diverged}" for o in diverged[:10]]
    if result["after"]:
        lines.append("\nafter the run:")
        lines += [f"  {p}" for p in result["after"]]
    g = result["gauges"]
    seen = {"preemptions": g.get("baleen_num_preemptions_total"), "prefix cache hit rate": g.get("baleen_cache_hit_rate"),
            "speculative accept length": g.get("baleen_spec_accept_length")}
    lines.append("\nserver: " + ", ".join(f"{k} {v:.3g}" for k, v in seen.items() if v is not None))
    problems = len(failed) + len(result["after"])
    lines.append(f"\n{len(outcomes)} requests, {len(failed)} failed their checks; server after the run: "
                 f"{'drained' if not result['after'] else 'NOT drained'}")
    return "\n".join(lines), problems


def _load_sibling(name: str) -> Any:
    """A loadtest script beside this one, loaded as a module (loadtest is not a package)."""
    spec = importlib.util.spec_from_file_location(f"loadtest_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    flags: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, flags = argv[:at], argv[at + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:30000", help="the server's root URL (not .../v1)")
    ap.add_argument("--serve", action="store_true", help="start a server with the flags after --, stop it at the end")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long clients keep sending")
    ap.add_argument("--concurrency", type=int, default=8, help="clients, each one request at a time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-timeout", type=float, default=120.0, help="a request not answered by then fails")
    ap.add_argument("--verbose", action="store_true", help="print each failed request as it happens")
    args = ap.parse_args(argv)

    def run(url: str) -> dict[str, Any]:
        return asyncio.run(chaos(url, args.seconds, args.concurrency, args.seed, args.request_timeout, args.verbose))

    if args.serve:  # NOTE: -P keeps the checkout's folders (kernels/, model/, ...) from shadowing PyPI modules
        cmd = [sys.executable, "-P", "-m", "baleen.launch_server", "--port", "0", *flags]
        with _load_sibling("bench_ttft").server_process(cmd, dict(os.environ, PYTHONUNBUFFERED="1")) as (host, port):
            result = run(f"http://{host}:{port}")
    else:
        result = run(args.base_url.rstrip("/"))
    text, problems = report(result)
    print(text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
