"""Locust users for any OpenAI-compatible server: streamed chat, chat, streamed completions, tool calls.

    locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 30s --host http://127.0.0.1:30000

Options this file adds to locust's (`python loadtest/locustfile.py --help` lists them with their LOCUST_*
environment variables; locust's own --help does not show them): --prompt-len, --output-len, --model
(default: the first /v1/models entry), --mix, --ignore-eos, --tool-choice, --think-time, --api-key.
Besides one row per request kind ("chat-stream", "chat", "completion-stream", "tool-call-stream"), every
streamed response fires custom events of request type "SSE": "TTFT" (time to first token), "ITL" (one per
gap between token chunks) and "TPOT" (per request), so their percentiles appear in the stats and --csv.
A request fails on a non-200 status, a connection error, or a malformed stream (bad JSON, an error chunk,
no finish_reason, no [DONE], tool-call arguments that are not JSON).
"""

from __future__ import annotations

import argparse
import codecs
import os
import random
import sys
import time
from collections.abc import Callable
from http.client import HTTPException
from typing import Any

# NOTE: bench_serving sits beside this file. locust puts this folder on sys.path, plain `python` does too, unless
# PYTHONSAFEPATH is set (the Makefile sets it): say it explicitly. This folder holds only our scripts.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serving import StreamError, StreamParser, random_prompt
from locust import FastHttpUser, events, task
from locust.exception import StopUser

KINDS = ("stream", "chat", "completion", "tools")
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "query_weather",
        "description": "Get the weather of a city; the user must name the city first",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city, e.g. Beijing"}},
            "required": ["city"],
        },
    },
}
CITIES = ("Qingdao", "Beijing", "Paris", "Lagos", "Lima", "Osaka", "Oslo", "Perth")


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    """This file's options: in the web UI and `python loadtest/locustfile.py --help` (not locust --help)."""
    options: list[tuple[str, dict[str, Any], str]] = [
        ("--prompt-len", {"type": int, "default": 128}, "prompt length in common words (~1 token each)"),
        ("--output-len", {"type": int, "default": 64}, "max_tokens of every request"),
        ("--model", {"default": ""}, "model name to send (default: the first one GET /v1/models lists)"),
        ("--mix", {"default": "stream=4,chat=1,completion=1,tools=1"},
         f"relative weights of the request kinds {', '.join(KINDS)}; e.g. 'stream=1' streams chat only"),
        ("--ignore-eos", {"choices": ["true", "false"], "default": "true"},
         "send ignore_eos so outputs are --output-len long ('false' for strict OpenAI servers)"),
        ("--tool-choice", {"choices": ["auto", "required"], "default": "auto"},
         "tool_choice of tool requests; with 'required' a reply without a tool call fails"),
        ("--think-time", {"type": float, "default": 0.0}, "seconds each user waits between requests"),
        ("--api-key", {"default": "", "is_secret": True}, "sent as 'Authorization: Bearer <key>'"),
    ]
    for flag, kwargs, text in options:
        env_var = "LOCUST_" + flag[2:].replace("-", "_").upper()
        default = kwargs["default"]
        parser.add_argument(flag, env_var=env_var, help=f"{text} (default {default!r})", **kwargs)


def parse_mix(text: str) -> dict[str, float]:
    """'stream=4,chat=1' -> {'stream': 4.0, 'chat': 1.0}; kinds left out get weight 0."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, value = item.partition("=")
        if kind not in KINDS:
            raise ValueError(f"--mix: unknown request kind {kind!r}; use {', '.join(KINDS)}")
        weights[kind] = float(value or 1)
    if not weights or sum(weights.values()) <= 0 or min(weights.values()) < 0:
        raise ValueError(f"--mix {text!r}: give weights >= 0 with a positive sum, e.g. 'stream=4,chat=1'")
    return weights


@events.init.add_listener
def check_options(environment: Any, **_: Any) -> None:
    """Fail at start-up, not in every user, when an option is unusable."""
    opts = environment.parsed_options
    if opts is None:
        return
    try:
        parse_mix(opts.mix)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if opts.prompt_len < 1 or opts.output_len < 1:
        raise SystemExit("error: --prompt-len and --output-len must be at least 1")


class OpenAIUser(FastHttpUser):
    """One simulated client: picks a request kind by --mix, sends it, waits --think-time, repeats."""

    network_timeout = 600.0  # long generations outlast geventhttpclient's 60 s default
    connection_timeout = 60.0

    def wait_time(self) -> float:
        """Seconds between requests (--think-time)."""
        return float(self.environment.parsed_options.think_time)

    def on_start(self) -> None:
        """Read the options once per user and find the model name."""
        opts = self.environment.parsed_options
        self.rng = random.Random()
        mix = parse_mix(opts.mix)
        self.kinds, self.weights = list(mix), list(mix.values())
        self.prompt_len, self.output_len = opts.prompt_len, opts.output_len
        self.ignore_eos, self.tool_choice = opts.ignore_eos == "true", opts.tool_choice
        self.headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
        self.model = opts.model or self.detect_model()

    def detect_model(self) -> str:
        """The first model GET /v1/models lists; the user stops when there is none."""
        with self.client.get("/v1/models", name="models", headers=self.headers, catch_response=True) as resp:
            try:
                return str(resp.json()["data"][0]["id"])
            except (ValueError, KeyError, IndexError, TypeError):
                resp.failure(f"cannot read a model from /v1/models (HTTP {resp.status_code}); pass --model")
                raise StopUser() from None

    @task
    def one_request(self) -> None:
        """Send one request of a kind drawn by the --mix weights."""
        kind = self.rng.choices(self.kinds, self.weights)[0]
        messages = [{"role": "user", "content": random_prompt(self.rng, self.prompt_len)}]
        if kind == "stream":
            self.stream("/v1/chat/completions", "chat-stream", self.body(messages=messages))
        elif kind == "chat":
            self.chat(self.body(messages=messages, stream=False))
        elif kind == "completion":
            prompt = random_prompt(self.rng, self.prompt_len)
            self.stream("/v1/completions", "completion-stream", self.body(prompt=prompt))
        else:
            question = f"How is the weather in {self.rng.choice(CITIES)} today? Context: "
            messages[0]["content"] = question + messages[0]["content"]
            body = self.body(messages=messages, tools=[WEATHER_TOOL], tool_choice=self.tool_choice)
            self.stream("/v1/chat/completions", "tool-call-stream", body, check=self.check_tool_call)

    def body(self, stream: bool = True, **fields: Any) -> dict[str, Any]:
        """A request body with this user's model, lengths and sampling settings."""
        body: dict[str, Any] = {"model": self.model, "max_tokens": self.output_len, "temperature": 0.0}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body | fields

    def check_tool_call(self, parser: StreamParser) -> str | None:
        """With tool_choice 'required', a reply must call a tool."""
        if self.tool_choice == "required" and not parser.tool_names:
            return f"tool_choice 'required' but no tool call (finish_reason {parser.finish_reason!r})"
        return None

    def stream(
        self,
        path: str,
        name: str,
        body: dict[str, Any],
        check: Callable[[StreamParser], str | None] | None = None,
    ) -> None:
        """POST a streamed request, read its SSE lines as they arrive, then fire TTFT / ITL / TPOT events."""
        start = time.perf_counter()
        parser = StreamParser(start)
        with self.client.post(path, json=body, name=name, headers=self.headers, stream=True,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            try:
                # NOTE: readline returns each line as soon as it arrives; FastResponse.iter_content(n)
                # waits for n bytes, which would delay the token timestamps.
                while raw := resp._response.readline(b"\n"):
                    parser.feed(decoder.decode(raw), time.perf_counter())
                parser.check_complete()
                problem = check(parser) if check else None
            except StreamError as exc:
                problem = str(exc)
            except (OSError, HTTPException) as exc:  # the connection dropped mid-stream
                problem = f"{type(exc).__name__}: {exc}"
            if problem:
                resp.failure(problem)
                return
            end = time.perf_counter()
            resp.request_meta["response_time"] = (end - start) * 1e3  # the whole stream, not just headers
            resp.request_meta["response_length"] = parser.completion_tokens
            resp.success()
        self.fire_token_metrics(parser, end - start)

    def fire_token_metrics(self, parser: StreamParser, e2e: float) -> None:
        """Report one streamed response's TTFT, each inter-token gap and its TPOT as custom events."""
        fire = self.environment.events.request.fire
        ttft = parser.ttft
        if ttft is None:
            return
        fire(request_type="SSE", name="TTFT", response_time=ttft * 1e3, response_length=0, exception=None,
             context={})
        for gap in parser.itl:
            fire(request_type="SSE", name="ITL", response_time=gap * 1e3, response_length=0, exception=None,
                 context={})
        tokens = parser.completion_tokens
        if tokens > 1:
            tpot = (e2e - ttft) / (tokens - 1)
            fire(request_type="SSE", name="TPOT", response_time=tpot * 1e3, response_length=tokens,
                 exception=None, context={})

    def chat(self, body: dict[str, Any]) -> None:
        """A non-streamed chat request; fails unless the reply has a message and usage."""
        with self.client.post("/v1/chat/completions", json=body, name="chat", headers=self.headers,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                reply = resp.json()
                message = reply["choices"][0]["message"]
                tokens = int(reply["usage"]["completion_tokens"])
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                resp.failure(f"malformed chat completion ({problem}): {(resp.text or '')[:200]}")
                return
            if not isinstance(message, dict):
                resp.failure(f"malformed chat completion: message is {message!r}")
                return
            resp.request_meta["response_length"] = tokens
            resp.success()


if __name__ == "__main__":
    from locust.argument_parser import LocustArgumentParser

    help_parser = LocustArgumentParser(
        prog="locust -f loadtest/locustfile.py [locust options]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(help_parser)
    help_parser.print_help()
