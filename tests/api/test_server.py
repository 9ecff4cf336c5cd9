"""The HTTP server end to end on the embedded model: the real openai client and raw HTTP against subprocess servers.

Tool calls and reasoning are driven by the `scripted` test logit processor, which forces a given text, so a
random-weight model writes exactly what the parsers must take apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import httpx
import openai
import pytest
from harness import ServerProcess, gauge
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from baleen.api import cli
from baleen.api.chat_template import ChatTemplate
from baleen.model.make_model import default_model_path

GREEDY: dict[str, Any] = {"temperature": 0}
WEATHER = {"type": "function", "function": {"name": "query_weather", "description": "Get the weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
USER = [{"role": "user", "content": "How's the weather in Qingdao and Paris?"}]


def v3_call(name: str, args: str) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}"


def scripted(text: str, **extra: Any) -> dict[str, Any]:
    return {"custom_logit_processor": "scripted", "custom_params": {"text": text}, **extra}


def client_for(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=60)


def stream_chat(client: openai.OpenAI, **kwargs: Any) -> dict[str, Any]:
    """Run a streamed chat request and fold its chunks into one choice-0 message, like a client would."""
    out: dict[str, Any] = {"content": "", "reasoning": "", "calls": {}, "token_ids": [], "finish": None, "chunks": 0}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        out["chunks"] += 1
        if chunk.usage is not None:
            out["usage"] = chunk.usage
        for choice in chunk.choices:
            assert choice.index == 0
            delta = choice.delta
            out["content"] += delta.content or ""
            out["reasoning"] += getattr(delta, "reasoning_content", None) or ""
            out["token_ids"] += (choice.model_extra or {}).get("token_ids") or []
            for call in delta.tool_calls or []:
                slot = out["calls"].setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                if call.id:
                    assert slot["id"] is None, "a call's id must come once"
                    slot["id"] = call.id
                if call.function and call.function.name:
                    slot["name"] = call.function.name
                out["calls"][call.index]["arguments"] += (call.function.arguments if call.function else "") or ""
            if choice.finish_reason is not None:
                out["finish"] = choice.finish_reason
    return out


# ---- plain routes ---------------------------------------------------------------------------------------


def test_models_health_info(main_server: ServerProcess) -> None:
    with main_server.client() as http:
        assert http.get("/health").status_code == 200
        models = http.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["default"]
        assert http.get("/v1/models/default").json()["id"] == "default"
        info = http.get("/server_info").json()
        assert info["max_context_len"] == 8192 and info["healthy"] is True
        assert info["served_model_name"] == "default" and "api_key" not in info["server_config"]
        assert "scripted" in info["custom_logit_processors"]
    assert [m.id for m in client_for(main_server).models.list()] == ["default"]


# ---- streaming and whole answers agree ----------------------------------------------------------------------


def test_chat_stream_equals_whole_token_for_token(main_server: ServerProcess) -> None:
    client = client_for(main_server)
    kwargs: dict[str, Any] = dict(model="default", messages=USER, max_tokens=24, logprobs=True, top_logprobs=3,
                                  extra_body={"return_token_ids": True, "ignore_eos": True}, **GREEDY)
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    ids = (choice.model_extra or {})["token_ids"]
    assert len(ids) == 24 and whole.usage is not None and whole.usage.completion_tokens == 24
    assert choice.finish_reason == "length"
    prompt_ids = (whole.model_extra or {})["prompt_token_ids"]
    assert whole.usage.prompt_tokens == len(prompt_ids) and prompt_ids[0] == 0  # the template starts with BOS
    streamed = stream_chat(client, stream_options={"include_usage": True}, **kwargs)
    assert streamed["token_ids"] == ids
    assert streamed["content"] == choice.message.content
    assert streamed["finish"] == "length" and streamed["usage"].completion_tokens == 24
    # greedy: the sampled token is the most likely one, and the token strings are the tokenizer's
    assert choice.logprobs is not None and choice.logprobs.content is not None
    for entry in choice.logprobs.content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert entry.token == entry.top_logprobs[0].token


def test_logit_bias_bans_and_forces_tokens(main_server: ServerProcess, tokenizer: Tokenizer) -> None:
    """OpenAI's logit_bias on /v1/completions, /v1/chat/completions and /generate: -100 all but bans a token, +100
    all but forces it; the logprobs stay the model's own; a key that is no token id, a value out of range or an id
    past the vocabulary is a 400 naming the field."""
    client = client_for(main_server)
    base: dict[str, Any] = dict(model="default", max_tokens=6, extra_body={"return_token_ids": True,
                                                                            "ignore_eos": True}, **GREEDY)
    prompt = "The capital of France is"
    plain = (client.completions.create(prompt=prompt, **base).choices[0].model_extra or {})["token_ids"]
    banned = client.completions.create(prompt=prompt, logit_bias={str(plain[0]): -100}, **base).choices[0]
    assert (banned.model_extra or {})["token_ids"][0] != plain[0]
    whale = tokenizer.encode("whale").ids[0]
    forced = client.chat.completions.create(messages=USER, logit_bias={str(whale): 100}, logprobs=True, **base)
    choice = forced.choices[0]
    assert (choice.model_extra or {})["token_ids"] == [whale] * 6
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert all(entry.logprob < -0.01 for entry in choice.logprobs.content)  # raw: the model did not pick it
    native = httpx.post(main_server.base_url.removesuffix("/v1") + "/generate", timeout=60, json={
        "text": prompt, "sampling_params": {"max_new_tokens": 4, "temperature": 0, "logit_bias": {str(whale): 100}}})
    assert native.json()["output_ids"] == [whale] * 4
    for bias, words in (({"whale": 1}, "token ids"), ({"5": -101}, "[-100, 100]"), ({"99999999": 1}, "vocabulary")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(prompt=prompt, logit_bias=bias, **base)  # type: ignore[arg-type]
        assert words in str(err.value) and "logit_bias" in str(err.value)


def test_completion_forms_stream_and_echo(main_server: ServerProcess, tokenizer: Tokenizer) -> None:
    client = client_for(main_server)
    text = "The whale sings"
    base: dict[str, Any] = dict(model="default", max_tokens=10, extra_body={"return_token_ids": True,
                                                                             "ignore_eos": True}, **GREEDY)
    whole = client.completions.create(prompt=text, **base)
    expected_prompt = tokenizer.encode(text, add_special_tokens=True).ids
    assert (whole.model_extra or {})["prompt_token_ids"] == expected_prompt and expected_prompt[0] == 0
    ids = (whole.choices[0].model_extra or {})["token_ids"]
    assert len(ids) == 10
    by_ids = client.completions.create(prompt=expected_prompt, **base)  # the same prompt as token ids
    assert (by_ids.choices[0].model_extra or {})["token_ids"] == ids and by_ids.choices[0].text == whole.choices[0].text
    streamed_ids, streamed_text = [], ""
    for chunk in client.completions.create(prompt=text, stream=True, **base):
        streamed_ids += (chunk.choices[0].model_extra or {}).get("token_ids") or []
        streamed_text += chunk.choices[0].text
    assert streamed_ids == ids and streamed_text == whole.choices[0].text
    echoed = client.completions.create(prompt=text, echo=True, **base)
    assert echoed.choices[0].text == text + whole.choices[0].text
    many = client.completions.create(prompt=[text, "Another prompt"], **base)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == whole.choices[0].text
    assert many.usage is not None and many.usage.completion_tokens == 20
    assert many.usage.prompt_tokens == len(expected_prompt) + len(tokenizer.encode("Another prompt").ids)
    lists = client.completions.create(prompt=[expected_prompt, [0, 5, 6]], logprobs=2, **base)
    assert lists.choices[0].text == whole.choices[0].text and len(lists.choices) == 2
    lp = lists.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.top_logprobs is not None
    assert "".join(lp.tokens) == whole.choices[0].text and all(len(row) == 2 for row in lp.top_logprobs)


def test_n_choices(main_server: ServerProcess) -> None:
    client = client_for(main_server)
    # An open request: the trained model's answer to it is uncertain enough that seeded choices differ.
    messages = [{"role": "user", "content": "Speak, friend."}]
    kwargs: dict[str, Any] = dict(model="default", messages=messages, max_tokens=6, n=3, temperature=1.0, seed=11,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    whole = client.chat.completions.create(**kwargs)
    assert [c.index for c in whole.choices] == [0, 1, 2] and whole.usage is not None
    assert whole.usage.completion_tokens == 18
    assert len({tuple((c.model_extra or {})["token_ids"]) for c in whole.choices}) > 1  # seed + i per choice
    seen: dict[int, list[int]] = {}
    finished = set()
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            seen.setdefault(c.index, []).extend((c.model_extra or {}).get("token_ids") or [])
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2}
    assert [seen[i] for i in range(3)] == [(c.model_extra or {})["token_ids"] for c in whole.choices]


# ---- tool calls and reasoning, scripted ---------------------------------------------------------------------

TOOL_CASES = {
    "single": ("", [("query_weather", '{"city": "Qingdao"}')]),
    "several": ("", [("query_weather", '{"city": "Qingdao"}'), ("query_weather", '{"city": "Paris"}'),
                     ("get_time", "{}")]),
    "leading_text": ("Let me check that for you.", [("query_weather", '{"city": "Paris", "unit": "°C"}')]),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("case", sorted(TOOL_CASES))
def test_tool_calls_v3(main_server: ServerProcess, case: str, stream: bool) -> None:
    lead, calls = TOOL_CASES[case]
    script = lead + CALLS_BEGIN + "\n".join(v3_call(n, a) for n, a in calls) + CALLS_END
    kwargs: dict[str, Any] = dict(model="default", messages=USER, tools=[WEATHER, TIME], extra_body=scripted(script),
                                  **GREEDY)
    got = _run(client_for(main_server), kwargs, stream)
    assert got["finish"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in got["calls"]] == calls
    assert all(c["id"] and c["id"].startswith("call_") for c in got["calls"])
    assert (got["content"] or "") == lead
    assert json.loads(got["calls"][0]["arguments"])  # valid JSON, passed on as generated


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_call_cut_off_by_a_stop_string_finishes_stop_not_tool_calls(main_server: ServerProcess,
                                                                      stream: bool) -> None:  # fmt: skip
    # The client's stop string ends the output inside the second call's arguments: the calls so far come back (they
    # were streamed as generated), but the turn did not end in calls to make (found by loadtest/chaos.py, where a
    # stop token id did the same and "tool_calls" came with arguments '{"city').
    script = CALLS_BEGIN + v3_call("get_time", "{}") + "\n" + v3_call("query_weather", '{"city": "Qingdao"}') + CALLS_END
    kwargs: dict[str, Any] = dict(model="default", messages=USER, tools=[WEATHER, TIME], stop=["dao"],
                                  extra_body=scripted(script), **GREEDY)
    got = _run(client_for(main_server), kwargs, stream)
    assert got["finish"] == "stop"
    assert [(c["name"], c["arguments"]) for c in got["calls"]] == [("get_time", "{}"), ("query_weather", '{"city": "Qing')]


def _run(client: openai.OpenAI, kwargs: dict[str, Any], stream: bool) -> dict[str, Any]:
    """(content, reasoning, calls, finish) of choice 0, streamed or whole."""
    if stream:
        s = stream_chat(client, **kwargs)
        calls = [s["calls"][i] for i in sorted(s["calls"])]
        return {"content": s["content"], "reasoning": s["reasoning"] or None, "calls": calls, "finish": s["finish"]}
    r = client.chat.completions.create(**kwargs)
    msg = r.choices[0].message
    calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}  # type: ignore[union-attr]
             for c in msg.tool_calls or []]
    return {"content": msg.content, "reasoning": getattr(msg, "reasoning_content", None), "calls": calls,
            "finish": r.choices[0].finish_reason}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_reasoning_v3_thinking_and_model_opened_think(main_server: ServerProcess, stream: bool) -> None:
    client = client_for(main_server)
    thinking = dict(model="default", messages=USER, extra_body=scripted(
        "The user wants a sum. 2 + 2 = 4.</think>The answer is 4.", chat_template_kwargs={"thinking": True}))
    got = _run(client, thinking, stream)
    assert (got["reasoning"], got["content"], got["finish"]) == ("The user wants a sum. 2 + 2 = 4.", "The answer is 4.",
                                                                  "stop")
    opened = dict(model="default", messages=USER, extra_body=scripted("<think>hmm, fine</think>\n\nOK then."))
    got = _run(client, opened, stream)
    assert (got["reasoning"], got["content"]) == ("hmm, fine", "OK then.")
    plain = dict(model="default", messages=USER, extra_body=scripted("No thinking here."))
    got = _run(client, plain, stream)
    assert (got["reasoning"], got["content"]) == (None, "No thinking here.")
    joined = dict(model="default", messages=USER, extra_body=scripted("<think>a</think>b", separate_reasoning=False))
    assert _run(client, joined, stream)["content"] == "<think>a</think>b"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_reasoning_r1_then_v31_tool_call(r1_server: ServerProcess, stream: bool) -> None:
    script = (f"Need the time.</think>Checking.{CALLS_BEGIN}{CALL_BEGIN}get_time{SEP}{{\"tz\": \"UTC\"}}{CALL_END}"
              f"{CALL_BEGIN}query_weather{SEP}{{\"city\": \"Oslo\"}}{CALL_END}{CALLS_END}")
    kwargs = dict(model="default", messages=USER, tools=[WEATHER, TIME], extra_body=scripted(script), **GREEDY)
    got = _run(client_for(r1_server), kwargs, stream)
    assert got["reasoning"] == "Need the time." and got["content"] == "Checking."
    assert [(c["name"], c["arguments"]) for c in got["calls"]] == [("get_time", '{"tz": "UTC"}'),
                                                                   ("query_weather", '{"city": "Oslo"}')]
    assert got["finish"] == "tool_calls"
    no_tools = dict(model="default", messages=USER, extra_body=scripted("Short.</think>Done."))
    assert _run(client_for(r1_server), no_tools, stream)["reasoning"] == "Short."


def test_stop_string_and_default_chat_max_tokens(main_server: ServerProcess) -> None:
    client = client_for(main_server)
    long_text = " ".join(f"word{i}" for i in range(40))  # far more than 16 tokens: the chat default is the context
    r = client.chat.completions.create(model="default", messages=USER, extra_body=scripted(long_text))
    assert r.choices[0].message.content == long_text and r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens > 40
    r = client.chat.completions.create(model="default", messages=USER, stop=["word3 "], extra_body=scripted(long_text))
    assert r.choices[0].message.content == "word0 word1 word2 " and r.choices[0].finish_reason == "stop"
    assert (r.choices[0].model_extra or {})["matched_stop"] == "word3 "


def test_conversation_roles_render_with_the_checkpoint_template(main_server: ServerProcess,
                                                                 tokenizer: Tokenizer) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}, {"type": "text", "text": "Now."}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "query_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"},
        {"role": "assistant", "content": "It is -3 C and snowing."},
        {"role": "user", "content": "Thanks"},
    ]
    r = client_for(main_server).chat.completions.create(
        model="default", messages=messages, tools=[WEATHER], max_tokens=3, top_p=0.9,  # type: ignore[arg-type]
        presence_penalty=0.5, frequency_penalty=0.2, seed=1,
        extra_body={"return_token_ids": True, "repetition_penalty": 1.1, "top_k": 5, "min_p": 0.1})
    template = ChatTemplate.from_checkpoint(default_model_path())
    assert template is not None
    prompt = template.render([dict(m, content="Weather in Oslo?\nNow.") if isinstance(m["content"], list) else m
                              for m in messages], tools=[WEATHER])
    assert "-3 C, snow" in prompt and prompt.startswith("<｜begin▁of▁sentence｜>")
    assert (r.model_extra or {})["prompt_token_ids"] == tokenizer.encode(prompt, add_special_tokens=False).ids


def test_tool_choice_none_hides_special_tokens(main_server: ServerProcess) -> None:
    r = client_for(main_server).chat.completions.create(
        model="default", messages=USER, tools=[WEATHER], tool_choice="none",
        extra_body=scripted(CALLS_BEGIN + v3_call("query_weather", '{"city": "Qingdao"}') + CALLS_END))
    msg = r.choices[0].message
    assert not msg.tool_calls and r.choices[0].finish_reason == "stop"
    assert msg.content == 'functionquery_weather\n```json\n{"city": "Qingdao"}\n```'  # markers are special tokens


def test_completion_stream_usage(main_server: ServerProcess) -> None:
    chunks = list(client_for(main_server).completions.create(
        model="default", prompt="abc", max_tokens=5, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5 and not chunks[-1].choices
    assert chunks[-2].choices[0].finish_reason == "length"


# ---- disconnects free pages, metrics ------------------------------------------------------------------------


def _metrics(http: httpx.Client) -> str:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def _wait_idle(http: httpx.Client, within: float) -> float:
    """Seconds until baleen_pages_used and the running requests are back to 0 (fails after `within`)."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        text = _metrics(http)
        if gauge(text, "baleen_pages_used") == 0 and gauge(text, "baleen_num_running_requests") == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"pages still held after {within} s:\n{text}")


def test_client_disconnect_frees_pages(main_server: ServerProcess) -> None:
    body = {"model": "default", "messages": USER, "max_tokens": 4000, "ignore_eos": True, "stream": True, **GREEDY}
    streams = [body, {**body, "n": 2}]  # one request, then two choices merged into one stream
    with main_server.client() as http:
        _wait_idle(http, 10)
        for stream in streams:
            with http.stream("POST", "/v1/chat/completions", json=stream) as resp:
                assert resp.status_code == 200
                lines = resp.iter_lines()
                for _ in range(10):
                    next(lines)
                deadline = time.monotonic() + 5  # the scheduler reports every 0.25 s while busy
                while not (gauge(_metrics(http), "baleen_pages_used") or 0) > 0:
                    assert time.monotonic() < deadline, "a running stream must hold pages"
                    time.sleep(0.02)
            # 4000 tokens would take far longer than this: the pages come back because the request was aborted
            assert _wait_idle(http, 5) < 5
        whole = {**body, "stream": False, "n": 2}  # both choices are aborted when the client leaves
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/chat/completions", json=whole, timeout=1.0)
        assert _wait_idle(http, 5) < 5
        text = _metrics(http)
    assert 'baleen_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    buckets = [s.labels for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "baleen_http_request_duration_seconds_bucket"]
    assert {"route": "/v1/chat/completions", "le": "+Inf"} in buckets  # in any label order
    assert 'baleen_time_to_first_token_seconds_count{route="/v1/chat/completions"}' in text
    assert gauge(text, "baleen_healthy") == 1 and (gauge(text, "baleen_generation_tokens_total") or 0) > 0
    assert 'baleen_requests_finished_total{finish_reason="abort"}' in text


# ---- the serve command line -------------------------------------------------------------------------------


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_serve_flags(parser)
    return parser.parse_args(argv)


# flag -> (argv, the EngineConfig field it sets): refused while EngineConfig lacks the field, passed on after
PENDING = [
    (["--tp", "8"], "tp_size", 8), (["--tp-size", "2"], "tp_size", 2), (["--dp", "2"], "dp_size", 2),
    (["--enable-dp-attention"], "enable_dp_attention", True), (["--ep", "4"], "ep_size", 4),
    (["--nnodes", "2"], "nnodes", 2), (["--node-rank", "1"], "node_rank", 1),
    (["--dist-init-addr", "10.0.0.1:5000"], "dist_init_addr", "10.0.0.1:5000"),
    (["--dist-timeout", "3600"], "dist_timeout", 3600), (["--speculative-algorithm", "EAGLE"], "speculative_algorithm", "EAGLE"),
    (["--speculative-num-draft-tokens", "4"], "speculative_num_draft_tokens", 4),
    (["--enable-torch-compile"], "enable_torch_compile", True), (["--torch-compile-max-bs", "8"], "torch_compile_max_bs", 8),
]


@pytest.mark.parametrize("argv, field, value", PENDING, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_pending_flags_are_refused_until_engine_config_has_them(argv: list[str], field: str, value: Any) -> None:
    from baleen.actors.engine import EngineConfig

    args = _args(argv)
    if field in {f.name for f in dataclasses.fields(EngineConfig)}:
        assert getattr(cli.engine_config_from_args(args), field) == value
    else:
        with pytest.raises(cli.UnsupportedFlag, match=f"{argv[0]}.*does not support"):
            cli.engine_config_from_args(args)


@pytest.mark.parametrize("argv, named", [
    (["--cuda-graph-max-bs", "8", "--device", "cpu"], "CUDA graphs"), (["--quantization", "w8a8_int8"], "w8a8_int8"),
    (["--quantization", "fp8"], "not FP8"), (["--custom-logit-processor", "no-equals-sign"], "NAME=module:attr"),
    (["--reasoning-parser", "qwen3"], "invalid choice"), (["--kv-cache-dtype", "fp8_e5m2"], "invalid choice"),
    (["--enable-flashinfer-mla", "--attention-backend", "torch"], "contradicts --attention-backend torch"),
    (["--disable-mla"], "--disable-mla: baleen serves DeepSeek models only with MLA"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_refused_flags_exit_2(argv: list[str], named: str, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    async def must_not_serve(*args: Any) -> int:
        raise AssertionError(f"{argv} was accepted: a server would start")

    monkeypatch.setattr("baleen.launch_server.serve", must_not_serve)
    try:
        code = cli.serve_main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = int(e.code or 0)
    assert code == 2
    err = capsys.readouterr().err
    assert named in err and "error" in err


def test_flags_map_onto_engine_and_server_config() -> None:
    args = _args(["--model", "/m", "--tokenizer-path", "/t", "--dtype", "half", "--load-format", "dummy", "--device",
                  "cpu", "--mem-fraction-static", "0.9", "--max-running-requests", "7", "--max-total-token", "65536",
                  "--chunked-prefill-size", "-1", "--page-size", "32", "--kv-cache-dtype", "fp8_e4m3",
                  "--kv-cache-fp8-math", "bf16", "--disable-overlap-schedule", "--disable-radix-cache", "--context-length", "2048",
                  "--attention-backend", "torch", "--random-seed", "3", "--custom-logit-processor", "a=m:f",
                  "--disable-cuda-graph", "--trust-remote-code", "--tp", "1", "--max-queued-requests", "9",
                  "--host", "0.0.0.0", "--port", "40000", "--api-key", "k", "--tool-call-parser", "deepseekv31",
                  "--reasoning-parser", "deepseek-r1", "--chat-template", "deepseek-v31", "--max-request-size", "1MiB",
                  "--fp8-tiled-weights", "off", "--enable-mixed-chunk", "--sse-ping-interval", "30",
                  "--schedule-conservativeness", "0.3", "--mixed-chunk-size", "256"])
    ec = cli.engine_config_from_args(args)
    assert ec.schedule_conservativeness == 0.3
    assert ec.enable_mixed_chunk and ec.mixed_chunk_size == 256
    assert (ec.model_path, ec.tokenizer_path, ec.dtype, ec.load_format, ec.device) == ("/m", "/t", "float16", "dummy", "cpu")
    assert (ec.mem_fraction_static, ec.max_running_requests, ec.max_total_tokens, ec.chunked_prefill_size) == \
        (0.9, 7, 65536, -1)
    assert (ec.page_size, ec.kv_cache_dtype, ec.context_length, ec.attention_backend, ec.random_seed) == \
        (32, "fp8_e4m3", 2048, "torch", 3)
    assert ec.kv_cache_fp8_math == "bf16"
    assert ec.disable_overlap_schedule and ec.disable_radix_cache and ec.max_queued_requests == 9
    assert ec.enable_custom_logit_processor and ec.custom_logit_processors == ("a=m:f",)  # a spec implies the flag
    assert ec.multiprocess  # serving uses the multi-process engine by default
    assert ec.fp8_tiled_weights == "off" and ec.enable_mixed_chunk
    sc = cli.server_config_from_args(args)
    assert (sc.host, sc.port, sc.api_key, sc.served_model_name) == ("0.0.0.0", 40000, "k", "/m")
    assert (sc.tool_call_parser, sc.reasoning_parser, sc.chat_template) == ("deepseekv31", "deepseek-r1", "deepseek-v31")
    assert sc.max_request_bytes == 1 << 20 and sc.sse_ping_interval_s == 30.0
    defaults = cli.engine_config_from_args(_args([]))
    assert defaults.model_path is None and not defaults.enable_custom_logit_processor
    assert defaults.fp8_tiled_weights == "auto" and not defaults.enable_mixed_chunk  # off, as SGLang
    assert cli.server_config_from_args(_args([])).port == 30000


def test_debug_eager_graphs_flag_runs_the_graph_paths_on_cpu() -> None:
    ec = cli.engine_config_from_args(_args(["--debug-eager-graphs", "--cuda-graph-bs", "1", "4", "--device", "cpu"]))
    assert ec.debug_eager_graphs and ec.cuda_graph_bs == (1, 4)  # sizes on CPU: only with the flag
    assert not cli.engine_config_from_args(_args([])).debug_eager_graphs


def test_enable_flashinfer_mla_flag_is_attention_backend_flashinfer() -> None:
    alias = cli.engine_config_from_args(_args(["--enable-flashinfer-mla"]))
    assert alias.attention_backend == "flashinfer"
    assert alias == cli.engine_config_from_args(_args(["--attention-backend", "flashinfer"]))
    both = _args(["--enable-flashinfer-mla", "--attention-backend", "flashinfer"])
    assert cli.engine_config_from_args(both).attention_backend == "flashinfer"
    with pytest.raises(cli.UnsupportedFlag, match=r"--enable-flashinfer-mla.*--attention-backend triton"):
        cli.engine_config_from_args(_args(["--enable-flashinfer-mla", "--attention-backend", "triton"]))


def test_disable_mla_flag_is_refused_not_pending() -> None:
    assert "disable_mla" not in cli.PENDING_FLAGS
    with pytest.raises(cli.UnsupportedFlag, match=r"^--disable-mla: .*--attention-backend torch"):
        cli.engine_config_from_args(_args(["--disable-mla"]))


def test_a_flag_is_used_once_engine_config_has_its_field(monkeypatch: pytest.MonkeyPatch) -> None:
    from baleen.actors import engine_config

    missing = [d for d in cli.PENDING_FLAGS if d not in {f.name for f in dataclasses.fields(engine_config.EngineConfig)}]
    if "enable_torch_compile" not in missing:
        pytest.skip("EngineConfig already has every field this test grows")

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class GrownConfig(engine_config.EngineConfig):
        enable_torch_compile: bool = False

    monkeypatch.setattr(engine_config, "EngineConfig", GrownConfig)
    ec = cli.engine_config_from_args(_args(["--enable-torch-compile"]))
    assert isinstance(ec, GrownConfig) and ec.enable_torch_compile
