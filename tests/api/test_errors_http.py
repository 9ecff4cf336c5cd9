"""Every error class the server answers, with its status and OpenAI error body; the server keeps serving after.

Input errors go to the real server (subprocess); failures only an engine can produce on its own schedule
(overloaded, internal, dead) come from a fake engine behind the real app, in process.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
from harness import FakeEngine, ServerProcess, ThreadServer

from baleen.actors.engine import EngineDead

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
OK_BODY = {"model": "default", "messages": USER, "max_tokens": 2}


def _error(resp: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """The error object of an OpenAI error body, after checking status and shape."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.fixture(scope="module")
def http(main_server: ServerProcess) -> Iterator[httpx.Client]:
    with main_server.client() as client:
        yield client


# ---- 400 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, param", [
    (b'{"model": "default", "messages": [', None),
    (b'[1, 2]', None),
    (json.dumps({"model": "default", "messages": USER, "n": "two"}).encode(), "n"),
    (json.dumps({"model": "default", "messages": [{"role": "robot", "content": "x"}]}).encode(), "messages[0].role"),
    (json.dumps({"model": "default"}).encode(), "messages"),
    (json.dumps({**OK_BODY, "temperature": 500}).encode(), "temperature"),
    (json.dumps({**OK_BODY, "top_p": 0}).encode(), "top_p"),
    (json.dumps({**OK_BODY, "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({**OK_BODY, "n": 1000}).encode(), "n"),
    (json.dumps({**OK_BODY, "top_logprobs": 50}).encode(), "top_logprobs"),
], ids=["bad-json", "not-an-object", "wrong-type", "bad-role", "missing-field", "temperature", "top_p",
        "max_tokens", "n", "top_logprobs"])
def test_bad_bodies_are_400(http: httpx.Client, body: bytes, param: str | None) -> None:
    err = _error(http.post(CHAT, content=body, headers={"content-type": "application/json"}), 400, param)
    assert err["type"] == "invalid_request_error"


def test_context_overflow_names_both_numbers(http: httpx.Client) -> None:
    err = _error(http.post(CHAT, json={**OK_BODY, "max_tokens": 9000}), 400, "max_tokens")
    assert "8192" in err["message"] and "9000" in err["message"]
    prompt = list(range(20, 100)) * 100  # 8000 token ids
    err = _error(http.post("/v1/completions", json={"model": "default", "prompt": prompt, "max_tokens": 500}), 400,
                 "max_tokens")
    assert "8192" in err["message"] and "8000" in err["message"] and "8500" in err["message"]
    err = _error(http.post("/v1/completions", json={"model": "default", "prompt": [5, 99999]}), 400, "prompt")
    assert "99999" in err["message"]
    err = _error(http.post("/v1/completions", json={"model": "default", "prompt": [5, -3]}), 400, "prompt")
    assert "non-negative" in err["message"]


def test_tool_choice_and_logit_processor_errors(http: httpx.Client) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    named = {"type": "function", "function": {"name": "g"}}
    _error(http.post(CHAT, json={**OK_BODY, "tools": [tool], "tool_choice": named}), 400, "tool_choice")
    _error(http.post(CHAT, json={**OK_BODY, "tool_choice": "required"}), 400, "tool_choice")
    err = _error(http.post(CHAT, json={**OK_BODY, "custom_logit_processor": "nope"}), 400, "custom_logit_processor")
    assert "scripted" in err["message"]
    code = json.dumps({"callable": "80049505"})  # serialized code is never loaded
    _error(http.post(CHAT, json={**OK_BODY, "custom_logit_processor": code}), 400, "custom_logit_processor")
    # bad params are refused by the server: inside the worker they would fail the whole engine
    _error(http.post(CHAT, json={**OK_BODY, "custom_logit_processor": "scripted", "custom_params": {"txt": 1}}), 400,
           "custom_params")
    _error(http.post(CHAT, json={**OK_BODY, "custom_logit_processor": "deepseek_r1_thinking_budget",
                                 "custom_params": {"thinking_budget": -1}}), 400, "custom_params")
    assert http.get("/health").status_code == 200


def test_openai_client_sees_typed_errors(main_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=main_server.base_url, api_key="EMPTY", max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="default", messages=USER, temperature=-1)  # type: ignore[arg-type]
    assert bad.value.status_code == 400 and "temperature" in str(bad.value)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=USER)  # type: ignore[arg-type]
    assert "gpt-4" in str(missing.value)


# ---- 404, 405, then the server still answers ---------------------------------------------------------


def test_unknown_model_route_and_method(http: httpx.Client) -> None:
    err = _error(http.post(CHAT, json={**OK_BODY, "model": "gpt-4"}), 404, "model")
    assert err["code"] == "model_not_found"
    _error(http.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model")
    _error(http.get("/v1/models/nope"), 404)
    _error(http.get("/v1/embeddings"), 404)
    resp = http.get(CHAT)
    _error(resp, 405)
    assert "POST" in resp.headers["allow"]
    _error(http.post("/health"), 405)


def test_server_still_answers_after_errors(main_server: ServerProcess, http: httpx.Client) -> None:
    r = http.post(CHAT, json=OK_BODY)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    for alias in (main_server.url and "default", json.loads(http.get("/server_info").text)["model_path"]):
        assert http.post(CHAT, json={**OK_BODY, "model": alias}).status_code == 200
    metrics = http.get("/metrics").text
    assert 'route="/v1/chat/completions",status="400"' in metrics and 'status="404"' in metrics
    assert http.get("/health").status_code == 200


# ---- the fake engine: 401, 413, 503, 500 --------------------------------------------------------------


def _fake(server: ThreadServer, **kwargs: Any) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=10, **kwargs)


FAKE_BODY = {"model": "fake", "messages": USER, "max_tokens": 3}
AUTH = {"authorization": "Bearer sekret"}


def test_api_key(fake_server: ThreadServer) -> None:
    with _fake(fake_server) as http:
        err = _error(http.post(CHAT, json=FAKE_BODY), 401)
        assert err["type"] == "authentication_error" and http.post(CHAT, json=FAKE_BODY).headers["www-authenticate"]
        _error(http.post(CHAT, json=FAKE_BODY, headers={"authorization": "Bearer wrong"}), 401)
        _error(http.get("/v1/models", headers={"authorization": "Basic sekret"}), 401)
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
        r = http.post(CHAT, json=FAKE_BODY, headers=AUTH)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "aaa"
        err = _error(http.post(CHAT, json={**FAKE_BODY, "custom_logit_processor": "deepseek_r1_thinking_budget"},
                               headers=AUTH), 400, "custom_logit_processor")
        assert "--enable-custom-logit-processor" in err["message"]  # this server has the registry off
    client = openai.OpenAI(base_url=fake_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert openai.OpenAI(base_url=fake_server.url + "/v1", api_key="sekret").models.list().data[0].id == "fake"


def test_body_over_the_limit_is_413(fake_server: ThreadServer) -> None:
    big = {**FAKE_BODY, "messages": [{"role": "user", "content": "x" * 5000}]}
    with _fake(fake_server, headers=AUTH) as http:
        _error(http.post(CHAT, json=big), 413)  # refused from its Content-Length

        def chunks() -> Iterator[bytes]:  # no Content-Length: refused while reading
            data = json.dumps(big).encode()
            for i in range(0, len(data), 1000):
                yield data[i:i + 1000]

        _error(http.post(CHAT, content=chunks(), headers={"content-type": "application/json"}), 413)
        assert http.post(CHAT, json=FAKE_BODY).status_code == 200


@pytest.mark.parametrize("kind, status", [("overloaded", 503), ("internal", 500), ("invalid", 400)])
def test_engine_error_kinds(fake_server: ThreadServer, fake_engine: FakeEngine, kind: str, status: int) -> None:
    fake_engine.error_kind = kind
    try:
        with _fake(fake_server, headers=AUTH) as http:
            for path, body in ((CHAT, FAKE_BODY), (CHAT, {**FAKE_BODY, "stream": True}),
                               ("/v1/completions", {"model": "fake", "prompt": "x"})):
                resp = http.post(path, json=body)
                err = _error(resp, status)
                assert f"fake {kind} error" in err["message"]
                if status == 503:
                    assert resp.headers["retry-after"] == "1"
    finally:
        fake_engine.error_kind = None


def test_dead_engine_is_503_and_crash_is_500(fake_server: ThreadServer, fake_engine: FakeEngine) -> None:
    with _fake(fake_server, headers=AUTH) as http:
        fake_engine.error = "the worker process died"
        try:
            assert _error(http.get("/health"), 503)["message"].endswith("the worker process died")
            resp = http.post(CHAT, json=FAKE_BODY)
            _error(resp, 503)
            assert resp.headers["retry-after"] == "1"
            assert "baleen_healthy 0" in http.get("/metrics").text
        finally:
            fake_engine.error = None
        for crash, status in ((EngineDead("died just now"), 503), (RuntimeError("a bug"), 500)):
            fake_engine.crash = crash
            try:
                assert str(crash) in _error(http.post(CHAT, json=FAKE_BODY), status)["message"]
            finally:
                fake_engine.crash = None
        assert http.get("/health").status_code == 200 and http.post(CHAT, json=FAKE_BODY).status_code == 200
        text = http.get("/metrics").text
        assert "baleen_pages_used 2" in text  # used 3 - evictable 1


@pytest.mark.parametrize("ping_s", [0.0, 0.2], ids=["default", "--sse-ping-interval 0.2"])
def test_streams_send_ping_comments_only_when_asked(fake_engine: FakeEngine, ping_s: float) -> None:
    """SGLang's and vLLM's benchmark clients json-parse every non-empty line of a stream: by default a request that
    waits long for its tokens gets no `: ping` comment (which would fail it there); operators behind proxies that
    close idle connections turn them on."""
    from baleen.api.responses import sse_response
    from baleen.api.state import ServerConfig

    async def nothing() -> AsyncIterator[bytes]:
        yield b""

    assert ServerConfig().sse_ping_interval_s == 0 and sse_response(nothing()).ping_interval == 0
    config = ServerConfig(host="127.0.0.1", port=0, log_level="warning", sse_ping_interval_s=ping_s)
    fake_engine.delay_s = 0.5
    try:
        with ThreadServer(fake_engine, config) as server, httpx.Client(base_url=server.url, timeout=10) as h:
            for route, body in (("/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": True}),
                                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                          "max_tokens": 2, "stream": True}),
                                ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 2},
                                               "stream": True})):
                with h.stream("POST", route, json=body) as resp:
                    lines = [line for line in resp.iter_lines() if line]
                pings = [line for line in lines if line.startswith(":")]
                assert lines[-1] == "data: [DONE]"
                # /generate never pings (SGLang's own route); the OpenAI routes ping when configured
                assert bool(pings) == (ping_s > 0 and route != "/generate"), (route, lines)
    finally:
        fake_engine.delay_s = 0.0
