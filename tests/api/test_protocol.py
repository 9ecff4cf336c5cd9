"""OpenAI protocol: the seeds' requests decode, bad fields name themselves, responses parse in the real client."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from typing import Any

import httpx2
import openai
import pytest

from baleen.api import bodies as b
from baleen.api import protocol as p
from baleen.api.errors import ApiError, error_body

# ---- the seed documents' requests, verbatim -----------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {"name": "query_weather", "description": "Get weather of a city, the user should supply a city first", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city, e.g. Beijing"}}, "required": ["city"]}}}
SEED_TOOL_CURL = """{"temperature": 0, "max_tokens": 100, "model": "deepseek-ai/DeepSeek-V3-0324", "tools": [{"type": "function", "function": {"name": "query_weather", "description": "Get weather of a city, the user should supply a city first", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city, e.g. Beijing"}}, "required": ["city"]}}}], "messages": [{"role": "user", "content": "How's the weather like in Qingdao today"}]}"""
SEED_TOOL_STREAM_CURL = """{"temperature": 0, "max_tokens": 100, "model": "deepseek-ai/DeepSeek-V3-0324","stream":true,"tools": [{"type": "function", "function": {"name": "query_weather", "description": "Get weather of a city, the user should supply a city first", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city, e.g. Beijing"}}, "required": ["city"]}}}], "messages": [{"role": "user", "content": "How's the weather like in Qingdao today"}]}"""


class DeepSeekR1ThinkingBudgetLogitProcessor:
    """Stands in for SGLang's class of that name: only its pickled name matters to the server."""

    def to_str(self) -> str:
        return json.dumps({"callable": pickle.dumps(self).hex()})


def _usage_body() -> dict[str, Any]:
    return b.usage(prompt_tokens=5, completion_tokens=3, cached_tokens=2)


def _client(handler: Callable[[httpx2.Request], httpx2.Response]) -> openai.OpenAI:
    """The real openai client talking to `handler` instead of a server."""
    return openai.OpenAI(base_url="http://test/v1", api_key="EMPTY",
                         http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))


def _capture(sent: list[bytes], reply: dict[str, Any]) -> Callable[[httpx2.Request], httpx2.Response]:
    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(request.content)
        return httpx2.Response(200, json=reply)
    return handler


def _simple_chat() -> dict[str, Any]:
    return b.chat_completion(id="chatcmpl-x", model="default", created=1,
                             choices=[b.chat_choice(0, content="ok", finish_reason="stop")], usage=_usage_body())


def test_seed_openai_chat_example_decodes() -> None:
    sent: list[bytes] = []
    client = _client(_capture(sent, _simple_chat()))
    client.chat.completions.create(
        model="default",
        messages=[{"role": "system", "content": "You are a helpful AI assistant"},
                  {"role": "user", "content": "List 3 countries and their capitals."}],
        temperature=0,
        max_tokens=64,
    )
    req = p.decode_chat_request(sent[0])
    assert [m.role for m in req.messages] == ["system", "user"]
    sp = p.chat_sampling_params(req)
    assert sp.temperature == 0.0 and sp.is_greedy and sp.max_new_tokens == 64
    assert sp.skip_special_tokens  # no tools: special tokens stay hidden


@pytest.mark.parametrize("body", [SEED_TOOL_CURL, SEED_TOOL_STREAM_CURL])
def test_seed_tool_curl_bodies_decode(body: str) -> None:
    req = p.decode_chat_request(body.encode())
    assert req.model == "deepseek-ai/DeepSeek-V3-0324"
    assert req.stream == ('"stream":true' in body)
    assert req.parses_tool_calls and req.tool_choice is None
    assert req.template_tools() == [WEATHER_TOOL]
    assert req.template_messages() == [{"role": "user", "content": "How's the weather like in Qingdao today"}]
    sp = p.chat_sampling_params(req)
    assert sp.max_new_tokens == 100 and sp.temperature == 0.0
    assert not sp.skip_special_tokens  # the tool-call markers are special tokens the parser must see


def test_seed_thinking_budget_example_selects_the_builtin_without_unpickling() -> None:
    sent: list[bytes] = []
    client = _client(_capture(sent, _simple_chat()))
    client.chat.completions.create(
        model="deepseek-ai/DeepSeek-R1",
        messages=[{"role": "user", "content": "Question: Is Paris the Capital of France?"}],
        max_tokens=1024,
        extra_body={"custom_logit_processor": DeepSeekR1ThinkingBudgetLogitProcessor().to_str(),
                    "custom_params": {"thinking_budget": 512}},
    )
    sp = p.chat_sampling_params(p.decode_chat_request(sent[0]))
    assert sp.custom_logit_processor == "deepseek_r1_thinking_budget"
    assert sp.custom_params == {"thinking_budget": 512} and sp.max_new_tokens == 1024


def test_custom_logit_processor_names_and_refused_code() -> None:
    assert p.resolve_logit_processor("my_proc") == "my_proc"
    assert p.resolve_logit_processor(None) is None
    assert p.resolve_logit_processor("DeepSeekR1ThinkingBudgetLogitProcessor") == "deepseek_r1_thinking_budget"
    evil = json.dumps({"callable": pickle.dumps(ValueError("x")).hex()})
    with pytest.raises(ApiError) as e:
        p.resolve_logit_processor(evil)
    assert e.value.status == 400 and e.value.param == "custom_logit_processor"
    assert "never runs" in e.value.message


def test_every_listed_field_converts() -> None:
    body = {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7, "top_p": 0.9,
        "top_k": 40, "min_p": 0.05, "max_tokens": 10, "max_completion_tokens": 20, "stop": "END", "seed": 7,
        "n": 2, "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1, "logprobs": True,
        "top_logprobs": 3, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
        "return_token_ids": True, "chat_template_kwargs": {"thinking": True}, "separate_reasoning": False,
        "custom_params": {"k": 1}, "skip_special_tokens": False, "min_tokens": 2, "user": "u1",
        "stop_token_ids": [5], "response_format": {"type": "text"}, "some_future_field": [1, 2],
    }
    req = p.decode_chat_request(json.dumps(body))
    sp = p.chat_sampling_params(req)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.seed) == (0.7, 0.9, 40, 0.05, 7)
    assert sp.max_new_tokens == 20  # max_completion_tokens wins over the older max_tokens
    assert sp.stop == ["END"] and sp.stop_token_ids == [5] and sp.min_new_tokens == 2
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (0.5, -0.5, 1.1)
    assert sp.logprobs and sp.top_logprobs == 3 and sp.ignore_eos and not sp.skip_special_tokens
    assert sp.custom_params == {"k": 1}
    assert req.n == 2 and req.include_usage and req.return_token_ids and req.thinking
    assert not req.separate_reasoning and req.user == "u1"


def test_defaults_and_lenient_values() -> None:
    req = p.decode_chat_request(b'{"messages": [{"role": "user", "content": "x"}], "top_k": -1, "stop": ["", "a"]}')
    sp = p.chat_sampling_params(req, default_max_tokens=None)
    assert sp.top_k is None and sp.stop == ["a"] and sp.max_new_tokens is None
    assert (sp.temperature, sp.top_p, sp.logprobs) == (1.0, 1.0, False)
    assert not req.include_usage and not req.thinking
    assert p.chat_sampling_params(req, default_max_tokens=77).max_new_tokens == 77
    top_only = p.decode_chat_request(b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}')
    assert p.chat_sampling_params(top_only).logprobs  # top_logprobs alone implies logprobs


def test_message_forms_become_template_messages() -> None:
    body = {"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": "é"}}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{\"y\": 2}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "user", "content": None},
    ]}
    msgs = p.decode_chat_request(json.dumps(body)).template_messages()
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert msgs[1] == {"role": "user", "content": "part one\npart two"}
    assert msgs[2]["content"] is None
    assert [c["function"]["arguments"] for c in msgs[2]["tool_calls"]] == ['{"x": "é"}', '{"y": 2}']
    assert msgs[3] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    assert msgs[4] == {"role": "user", "content": ""}


def _msgs(**extra: Any) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "x"}], **extra}).encode()


@pytest.mark.parametrize(("body", "param", "fragment"), [
    (b'{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role", "robot"),
    (b'{"messages": [{"content": "x"}]}', "messages[0].role", "missing required field"),
    (b'{"model": "m"}', "messages", "missing required field"),
    (b'{"messages": []}', "messages", "at least one"),
    (_msgs(temperature="hot"), "temperature", "Expected `float | null`"),
    (_msgs(temperature=101), "temperature", "temperature must be in [0, 100]"),
    (_msgs(top_p=0), "top_p", "top_p must be in (0, 1]"),
    (_msgs(top_k=-5), "top_k", "top_k must be >= 1"),
    (_msgs(min_p=1.5), "min_p", "min_p must be in [0, 1]"),
    (_msgs(max_tokens=-1), "max_tokens", "max_tokens must be >= 0"),
    (_msgs(max_completion_tokens=-2), "max_completion_tokens", "max_completion_tokens must be >= 0"),
    (_msgs(max_tokens=0), "max_tokens", "max_tokens must be at least 1"),
    (_msgs(min_tokens=-1), "min_tokens", "min_tokens must be >= 0"),
    (_msgs(repetition_penalty=0), "repetition_penalty", "repetition_penalty must be in (0, 2]"),
    (_msgs(frequency_penalty=3), "frequency_penalty", "frequency_penalty must be in [-2, 2]"),
    (_msgs(presence_penalty=-3), "presence_penalty", "presence_penalty must be in [-2, 2]"),
    (_msgs(top_logprobs=21), "top_logprobs", "top_logprobs must be in [0, 20]"),
    (_msgs(n=0), "n", "n must be in [1, 128]"),
    (_msgs(stop=5), "stop", "Expected `str | array | null`"),
    (_msgs(stream_options={"include_usage": "yes"}), "stream_options.include_usage", "Expected `bool`"),
    (_msgs(chat_template_kwargs={"messages": []}), "chat_template_kwargs", "may not set 'messages'"),
    (_msgs(stop_token_ids=[-1]), "stop_token_ids", "non-negative"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}',
     "messages[0].content[0].type", "'image_url' is not supported"),
    (b'{"messages": [{"role": "user", "content": "x", "tool_calls": []}], "n": 1}', None, None),
    (b'{"messages": [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}]}',
     "messages[0].tool_calls", "only assistant messages"),
    (b'{"messages": [{"role": "user", "content": "x"}', None, "not valid JSON"),
    (b'[1, 2]', None, "Expected `object`"),
])
def test_bad_fields_are_named(body: bytes, param: str | None, fragment: str | None) -> None:
    if fragment is None:  # a control: this one is valid
        p.chat_sampling_params(p.decode_chat_request(body))
        return
    with pytest.raises(ApiError) as e:
        p.chat_sampling_params(p.decode_chat_request(body))
    assert e.value.status == 400 and e.value.param == param
    assert fragment in e.value.message
    assert e.value.body()["error"]["param"] == param


def _tools(*names: str) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in names]


def test_tool_choice_checks() -> None:
    named = {"type": "function", "function": {"name": "nope"}}
    with pytest.raises(ApiError) as e:
        p.decode_chat_request(_msgs(tools=_tools("a", "b"), tool_choice=named))
    assert e.value.param == "tool_choice" and "'nope'" in e.value.message and "['a', 'b']" in e.value.message
    with pytest.raises(ApiError, match="required") as e:
        p.decode_chat_request(_msgs(tool_choice="required"))
    assert e.value.param == "tool_choice"
    with pytest.raises(ApiError) as e:
        p.decode_chat_request(_msgs(tool_choice="sometimes", tools=_tools("a")))
    assert e.value.param == "tool_choice"
    with pytest.raises(ApiError) as e:
        p.decode_chat_request(_msgs(tools=_tools("a", "a")))
    assert e.value.param == "tools" and "['a']" in e.value.message

    req = p.decode_chat_request(_msgs(tools=_tools("a", "b"), tool_choice={"type": "function",
                                                                          "function": {"name": "b"}}))
    assert [t["function"]["name"] for t in req.template_tools() or []] == ["b"]
    req = p.decode_chat_request(_msgs(tools=_tools("a", "b"), tool_choice="required"))
    assert len(req.template_tools() or []) == 2 and req.parses_tool_calls
    req = p.decode_chat_request(_msgs(tools=_tools("a"), tool_choice="none"))
    assert req.template_tools() is None and not req.parses_tool_calls
    assert p.chat_sampling_params(req).skip_special_tokens
    assert p.decode_chat_request(_msgs(tool_choice="auto")).template_tools() is None


# ---- text completions ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("prompt", "expected"), [
    ("hello", ["hello"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_completion_prompt_forms(prompt: Any, expected: list[Any]) -> None:
    req = p.decode_completion_request(json.dumps({"model": "m", "prompt": prompt}))
    assert req.prompts() == expected
    assert p.completion_sampling_params(req).max_new_tokens == 16  # OpenAI's default for completions


@pytest.mark.parametrize(("body", "param", "fragment"), [
    ({"prompt": ["a", 1]}, "prompt", "mixes"),
    ({"prompt": []}, "prompt", "non-empty"),
    ({"prompt": [[1], [-2]]}, "prompt[1]", "non-negative"),
    ({"prompt": [1.5]}, "prompt[0]", "Expected"),
    ({"prompt": "a", "suffix": "b"}, "suffix", "not supported"),
    ({"prompt": "a", "best_of": 3}, "best_of", "send n alone"),
    ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias", "token ids"),
    ({"prompt": "a", "logit_bias": {"5": -100.5}}, "logit_bias", "[-100, 100]"),
    ({"prompt": "a", "logprobs": 30}, "logprobs", "logprobs must be in [0, 20]"),
    ({"prompt": "a", "max_tokens": -4}, "max_tokens", "max_tokens must be >= 0"),
    ({}, "prompt", "missing required field"),
])
def test_completion_errors(body: dict[str, Any], param: str, fragment: str) -> None:
    with pytest.raises(ApiError) as e:
        p.completion_sampling_params(p.decode_completion_request(json.dumps(body)))
    assert e.value.status == 400 and e.value.param == param and fragment in e.value.message


@pytest.mark.parametrize(("extra", "param", "fragment"), [
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions", "send tools"),
    ({"function_call": "auto"}, "function_call", "tool_choice"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "text only"),
    ({"modalities": ["text", "audio"]}, "modalities", "text only"),
])
def test_chat_fields_this_server_cannot_honour_are_refused(extra: dict[str, Any], param: str, fragment: str) -> None:
    with pytest.raises(ApiError) as e:
        p.decode_chat_request(_msgs(**extra))
    assert e.value.status == 400 and e.value.param == param and fragment in e.value.message
    harmless = p.decode_chat_request(_msgs(functions=None, modalities=["text"], prediction={"type": "content"}))
    assert harmless.modalities == ["text"]
    assert p.completion_sampling_params(p.decode_completion_request(json.dumps(
        {"prompt": "a", "best_of": 1}))).max_new_tokens == 16  # best_of = n: what every choice is anyway
    biased = p.completion_sampling_params(p.decode_completion_request(json.dumps(
        {"prompt": "a", "logit_bias": {"17": -100, "3": 2.5}})))
    assert biased.logit_bias == {17: -100.0, 3: 2.5}


def test_completion_through_the_openai_client() -> None:
    sent: list[bytes] = []
    logprobs = b.completion_logprobs(["Par", "is"], [-0.5, float("-inf")], [[("Par", -0.5)], [("is", -1e9)]])
    reply = b.text_completion(id=b.new_id("cmpl"), model="m", created=3, usage=_usage_body(), choices=[
        b.completion_choice(0, text="Paris", finish_reason="length", logprobs=logprobs, token_ids=[11, 12])])
    client = _client(_capture(sent, reply))
    out = client.completions.create(model="m", prompt="The capital of France is", max_tokens=2, logprobs=1,
                                    temperature=0, stop=["\n"], echo=False)
    req = p.decode_completion_request(sent[0])
    sp = p.completion_sampling_params(req)
    assert (sp.max_new_tokens, sp.logprobs, sp.top_logprobs, sp.stop) == (2, True, 1, ["\n"])
    assert out.choices[0].text == "Paris" and out.choices[0].finish_reason == "length"
    assert out.choices[0].logprobs is not None
    assert out.choices[0].logprobs.text_offset == [0, 3]
    assert out.choices[0].logprobs.token_logprobs == [-0.5, -9999.0]  # -inf is not JSON
    assert out.usage is not None and out.usage.total_tokens == 8


# ---- responses through the real client ----------------------------------------------------------------

def test_chat_response_parses_in_the_openai_client() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "query_weather",
                                                                "arguments": "{\"city\": \"Qingdao\"}"}}]
    lp = [b.chat_logprob_entry("é", -0.25, [("é", -0.25), ("e", -2.0)])]
    reply = b.chat_completion(id=b.new_id(), model="m", usage=_usage_body(), prompt_token_ids=[1, 2], choices=[
        b.chat_choice(0, content=None, reasoning_content="think", tool_calls=calls, logprobs=lp,
                      finish_reason=b.finish_reason("stop", has_tool_calls=True), token_ids=[9])])
    assert reply["id"].startswith("chatcmpl-") and reply["object"] == "chat.completion"
    out = _client(_capture([], reply)).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id == "call_1"
    assert call.function.arguments == "{\"city\": \"Qingdao\"}"  # type: ignore[union-attr]
    assert choice.message.reasoning_content == "think"  # type: ignore[attr-defined]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert choice.logprobs.content[0].bytes == [0xC3, 0xA9]
    assert choice.logprobs.content[0].top_logprobs[1].token == "e"
    assert out.usage is not None and out.usage.prompt_tokens_details is not None
    assert out.usage.prompt_tokens_details.cached_tokens == 2


def _sse(chunks: list[dict[str, Any]]) -> Callable[[httpx2.Request], httpx2.Response]:
    text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=text.encode(), headers={"content-type": "text/event-stream"})
    return handler


def test_chat_stream_chunks_parse_in_the_openai_client() -> None:
    rid, created = b.new_id(), 5
    head = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "query_weather", "arguments": ""}}

    def chunk(delta: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return b.chat_chunk(id=rid, model="m", created=created, delta=delta, **kw)

    chunks = [
        chunk(b.chat_delta(role="assistant", content="")),
        chunk(b.chat_delta(reasoning_content="hmm")),
        chunk(b.chat_delta(content="Checking.")),
        chunk(b.chat_delta(tool_calls=[head])),
        chunk(b.chat_delta(tool_calls=[{"index": 0, "function": {"arguments": "{\"city\": "}}])),
        chunk(b.chat_delta(tool_calls=[{"index": 0, "function": {"arguments": "\"Qingdao\"}"}}])),
        chunk(b.chat_delta(), finish_reason="tool_calls"),
        b.usage_chunk(id=rid, model="m", created=created, usage=_usage_body()),
    ]
    assert chunks[-1]["choices"] == [] and chunks[0]["object"] == "chat.completion.chunk"
    stream = _client(_sse(chunks)).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], stream=True, stream_options={"include_usage": True})
    got = list(stream)
    assert got[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "Checking."
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in got if c.choices) == "hmm"
    args = "".join(tc.function.arguments or "" for c in got if c.choices for tc in c.choices[0].delta.tool_calls or []
                   if tc.function is not None)
    assert json.loads(args) == {"city": "Qingdao"}
    assert [c.choices[0].finish_reason for c in got if c.choices][-1] == "tool_calls"
    assert got[-1].choices == [] and got[-1].usage is not None and got[-1].usage.completion_tokens == 3


def test_error_body_reaches_the_client() -> None:
    err = ApiError(400, "temperature must be in [0, 100], got 300.0", param="temperature")
    assert err.body() == error_body(err.message, param="temperature")
    assert err.body()["error"] == {"message": err.message, "type": "invalid_request_error",
                                   "param": "temperature", "code": None}
    assert ApiError(503, "busy").type == "service_unavailable_error"
    assert ApiError(404, "no such model", code="model_not_found").body()["error"]["code"] == "model_not_found"

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(err.status, json=err.body())
    client = openai.OpenAI(base_url="http://test/v1", api_key="x", max_retries=0,
                           http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], temperature=300)
    assert e.value.param == "temperature" and "must be in [0, 100]" in e.value.message


def test_small_builders() -> None:
    assert b.finish_reason("stop") == "stop" and b.finish_reason("length", has_tool_calls=True) == "length"
    assert b.finish_reason(None, has_tool_calls=True) is None
    assert b.usage(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert b.chat_delta() == {} and b.chat_delta(content="") == {"content": ""}
    last = b.chat_chunk(id="i", model="m", created=1, delta={}, finish_reason="stop", matched_stop="###")
    assert last["choices"][0]["matched_stop"] == "###"
    models = b.model_list(["a"], created=9)
    assert models["data"][0] == {"id": "a", "object": "model", "created": 9, "owned_by": "baleen"}
    first, second = b.new_id(), b.new_id()
    assert first != second and len(first) == len("chatcmpl-") + 32
