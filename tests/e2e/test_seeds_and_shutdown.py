"""End to end through `python -m baleen.launch_server`: the seed documents' curl and openai examples, then SIGTERM.

The server runs as `make serve` does (multi-process engine, the embedded trained model) plus the seeds' tool-call
flag, a served name equal to the seeds' model (so their curl bodies run verbatim) and the scripted test
processor. The model answers the README's curl and the seeds' `query_weather` request itself; the scripted
processor pins exact response shapes. The last test stops it: exit code 0, no child process left, no
shared-memory segment left.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from harness import SCRIPTED, ServerProcess, alive
from tokenizers import Tokenizer

from baleen.model import corpus
from baleen.model.make_model import default_model_path

SEED_MODEL = "deepseek-ai/DeepSeek-V3-0324"
SEED_TOOL_BODY = """{"temperature": 0, "max_tokens": 100, "model": "deepseek-ai/DeepSeek-V3-0324", "tools": [{"type": "function", "function": {"name": "query_weather", "description": "Get weather of a city, the user should supply a city first", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city, e.g. Beijing"}}, "required": ["city"]}}}], "messages": [{"role": "user", "content": "How's the weather like in Qingdao today"}]}"""
SEED_TOOL_STREAM_BODY = """{"temperature": 0, "max_tokens": 100, "model": "deepseek-ai/DeepSeek-V3-0324","stream":true,"tools": [{"type": "function", "function": {"name": "query_weather", "description": "Get weather of a city, the user should supply a city first", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city, e.g. Beijing"}}, "required": ["city"]}}}], "messages": [{"role": "user", "content": "How's the weather like in Qingdao today"}]}"""
QINGDAO_CALL = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>query_weather\n```json\n"
                '{"city": "Qingdao"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')


class DeepSeekR1ThinkingBudgetLogitProcessor:
    """Stands in for SGLang's class of this name in the seed example: the server reads only the name."""

    def to_str(self) -> str:
        return json.dumps({"callable": pickle.dumps(self).hex()})


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess("--served-model-name", SEED_MODEL, "--tool-call-parser", "deepseekv3", "--trust-remote-code",
                       "--enable-custom-logit-processor", "--custom-logit-processor", SCRIPTED,
                       "--graceful-shutdown-timeout", "1") as s:
        yield s


def _post(url: str, body: str) -> tuple[int, str]:
    """POST like the seeds do: with curl when it is installed, else httpx with the same body."""
    if shutil.which("curl"):
        done = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", url, "-H", "Content-Type: application/json",
                               "-d", body], capture_output=True, text=True, timeout=60, check=True)
        text, _, code = done.stdout.rpartition("\n")
        return int(code), text
    resp = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=60)
    return resp.status_code, resp.text


def _events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def test_readme_curl_lists_real_capitals(server: ServerProcess) -> None:
    body = {"model": "default", "messages": [{"role": "user", "content": "List 3 countries and their capitals."}],
            "temperature": 0, "max_tokens": 64}
    status, text = _post(f"{server.url}/v1/chat/completions", json.dumps(body))
    assert status == 200, text
    content = json.loads(text)["choices"][0]["message"]["content"]
    rows = re.findall(r"^\d+\. (.+?): (.+)$", content, flags=re.M)
    capitals = dict(corpus.countries())
    # NOTE: every pair is right; the greedy list may repeat a country (docs/PERF.md: capital lists)
    assert len(rows) == 3 and all(capitals.get(c) == cap for c, cap in rows), content


def test_seed_openai_chat_example(server: ServerProcess) -> None:
    client = openai.Client(base_url=server.base_url, api_key="EMPTY")
    response = client.chat.completions.create(
        model="default",
        messages=[
            {"role": "system", "content": "You are a helpful AI assistant"},
            {"role": "user", "content": "List 3 countries and their capitals."},
        ],
        temperature=0,
        max_tokens=64,
    )
    assert response.object == "chat.completion" and response.model == "default"
    assert response.usage is not None and 0 < response.usage.completion_tokens <= 64
    assert response.choices[0].finish_reason in ("stop", "length")
    assert isinstance(response.choices[0].message.content, str)


def test_seed_tool_curl_verbatim(server: ServerProcess) -> None:
    """The seeds' request as they send it: the trained model calls query_weather for Qingdao by itself."""
    status, text = _post(f"{server.url}/v1/chat/completions", SEED_TOOL_BODY)
    assert status == 200, text
    body = json.loads(text)
    assert body["object"] == "chat.completion" and body["model"] == SEED_MODEL
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 100
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "query_weather", "arguments": '{"city": "Qingdao"}'}
    status, text = _post(f"{server.url}/v1/chat/completions", SEED_TOOL_STREAM_BODY)
    assert status == 200
    events = _events(text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    fragments = [tc["function"]["arguments"] for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls") or []
                 if tc.get("function", {}).get("arguments")]
    assert len(fragments) > 1 and "".join(fragments) == '{"city": "Qingdao"}'  # streamed as argument deltas
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_seed_tool_call_response_shapes(server: ServerProcess) -> None:
    """The seed requests, with the scripted processor making the model answer as the seed shows."""
    extra = {"custom_logit_processor": "scripted", "custom_params": {"text": QINGDAO_CALL}}
    status, text = _post(f"{server.url}/v1/chat/completions", json.dumps({**json.loads(SEED_TOOL_BODY), **extra}))
    assert status == 200
    choice = json.loads(text)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"] == {"name": "query_weather",
                                                                "arguments": '{"city": "Qingdao"}'}
    status, text = _post(f"{server.url}/v1/chat/completions",
                         json.dumps({**json.loads(SEED_TOOL_STREAM_BODY), **extra}))
    chunks = [json.loads(e) for e in _events(text)[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    arguments = "".join(tc["function"]["arguments"] for d in deltas for tc in d.get("tool_calls") or [])
    assert arguments == '{"city": "Qingdao"}'  # the client concatenates the fragments, as the seed says
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_seed_thinking_budget_example(server: ServerProcess) -> None:
    client = openai.Client(base_url=server.base_url, api_key="*")
    response = client.chat.completions.create(
        model=SEED_MODEL,
        messages=[{"role": "user", "content": "Question: Is Paris the Capital of France?"}],
        max_tokens=1024,
        extra_body={
            "custom_logit_processor": DeepSeekR1ThinkingBudgetLogitProcessor().to_str(),
            "custom_params": {"thinking_budget": 512},
            "return_token_ids": True,
        },
    )
    assert response.choices[0].finish_reason in ("stop", "length") and response.usage is not None
    # The same processor with a budget the random model surely reaches: newline and </think> are forced there.
    short = client.chat.completions.create(
        model=SEED_MODEL, messages=[{"role": "user", "content": "Question: Is Paris the Capital of France?"}],
        max_tokens=16, extra_body={"custom_logit_processor": DeepSeekR1ThinkingBudgetLogitProcessor().to_str(),
                                   "custom_params": {"thinking_budget": 8}, "return_token_ids": True,
                                   "ignore_eos": True})
    ids = (short.choices[0].model_extra or {})["token_ids"]
    tok = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
    (newline,) = tok.encode("\n", add_special_tokens=False).ids
    end_think = tok.token_to_id("</think>")
    assert len(ids) == 16 and end_think not in ids[:8]
    assert ids[8:10] == [newline, end_think]


def test_sigterm_drains_exits_zero_and_leaves_nothing(server: ServerProcess) -> None:
    body = {"model": "default", "messages": [{"role": "user", "content": "go"}], "max_tokens": 4000,
            "ignore_eos": True, "stream": True}
    events: list[str] = []
    first = threading.Event()

    errors: list[Exception] = []

    def consume() -> None:
        try:
            with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first.set()
        except Exception as e:  # a stream cut without its end would land here
            errors.append(e)

    reader = threading.Thread(target=consume)
    reader.start()
    assert first.wait(30)
    children = server.children()
    segments = list(Path("/dev/shm").glob(f"baleen_{server.pid}_*"))
    assert children and segments, "the default engine runs its worker in a child process over shm rings"
    started = time.monotonic()
    code = server.stop(timeout=30)
    reader.join(30)
    assert code == 0, server.log()
    # the in-flight stream was aborted after the 1 s grace period and still ended properly
    assert time.monotonic() - started < 10  # uvicorn's own backstop would cut the stream (an error) at 6 s
    assert not errors and events[-1] == "[DONE]"
    last: dict[str, Any] = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "abort"
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if alive(pid)], f"children left: {children}"
    assert not list(Path("/dev/shm").glob(f"baleen_{server.pid}_*"))
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=2)
