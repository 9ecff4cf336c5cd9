"""SGLang's native API over real HTTP: POST /generate (single and batch, text and input_ids, whole and streamed, stop
strings and finish reasons, logprobs, refused fields), the info routes, disconnects; then the exact requests and
parsing of SGLang's own clients (bench_serving --backend sglang, bench_one_batch_server, the gsm8k benchmark's
RuntimeEndpoint) and baleen's loadtest tools that speak it.

The main server runs the trained default model with the `scripted` test processor (it forces a given text, then
EOS), so stop strings and stop tokens land exactly where a test puts them. Failures only an engine can show on its
own schedule (dead, overloaded) come from the fake engine behind the real app.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import FakeEngine, ServerProcess, ThreadServer, gauge
from tokenizers import Tokenizer

LOADTEST = Path(__file__).resolve().parents[2] / "loadtest"
PROMPT = "The whale sings"
SCRIPT = "alpha beta gamma delta"  # tokens: al ph a Ġbet a Ġg am m a Ġdel ta
EOS = 1
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def http(main_server: ServerProcess) -> Iterator[httpx.Client]:
    with main_server.client() as client:
        yield client


def generate(http: httpx.Client, body: dict[str, Any]) -> Any:
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(http: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON chunks of a streamed /generate, checking the SSE framing and the final [DONE]."""
    chunks: list[dict[str, Any]] = []
    with http.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    for line in lines[:-1]:
        assert line.startswith("data: "), line  # no ': ping' comments or other fields
        chunks.append(json.loads(line[6:]))
    return chunks


def scripted(text: str, **sampling: Any) -> dict[str, Any]:
    return {"text": "Say it.", "custom_logit_processor": "scripted",
            "sampling_params": {"custom_params": {"text": text}, "temperature": 0, **sampling}}


def error(resp: httpx.Response, status: int, param: str | None = None) -> str:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return str(err["message"])


# ---- /generate: the answer and its agreement with /v1/completions ----------------------------------------------


def test_single_text_matches_completions(http: httpx.Client, tokenizer: Tokenizer) -> None:
    out = generate(http, {"text": PROMPT, "sampling_params": {"max_new_tokens": 12, **GREEDY}})
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=True).ids  # BOS first, as /v1/completions and SGLang
    assert meta["prompt_tokens"] == len(prompt_ids) and meta["completion_tokens"] == 12 == len(out["output_ids"])
    assert meta["finish_reason"] == {"type": "length", "length": 12}
    assert isinstance(meta["id"], str) and meta["e2e_latency"] > 0 and isinstance(meta["cached_tokens"], int)
    completion = http.post("/v1/completions", json={"model": "default", "prompt": PROMPT, "max_tokens": 12,
                                                   "return_token_ids": True, **GREEDY}).json()
    assert out["output_ids"] == completion["choices"][0]["token_ids"]
    assert out["text"] == completion["choices"][0]["text"] == tokenizer.decode(out["output_ids"])
    default = generate(http, {"text": PROMPT, "sampling_params": {"temperature": 0, "ignore_eos": True}})
    assert default["meta_info"]["completion_tokens"] == 128  # SGLang's default max_new_tokens
    by_ids = generate(http, {"input_ids": prompt_ids, "sampling_params": {"max_new_tokens": 12, **GREEDY},
                             "rid": "mine"})
    assert by_ids["output_ids"] == out["output_ids"] and by_ids["meta_info"]["id"] == "mine"


def test_batches_come_back_in_order(http: httpx.Client, tokenizer: Tokenizer) -> None:
    texts = [PROMPT, "Another prompt", "What is the capital of France?"]
    params = {"max_new_tokens": 6, **GREEDY}
    singles = [generate(http, {"text": t, "sampling_params": params}) for t in texts]
    batch = generate(http, {"text": texts, "sampling_params": params, "rid": ["a", "b", "c"]})
    assert [r["output_ids"] for r in batch] == [s["output_ids"] for s in singles]
    assert [r["meta_info"]["id"] for r in batch] == ["a", "b", "c"]
    ids = [tokenizer.encode(t, add_special_tokens=True).ids for t in texts]
    per_prompt = [{"max_new_tokens": 6 + j, **GREEDY} for j in range(3)]  # one sampling_params per prompt
    by_ids = generate(http, {"input_ids": ids, "sampling_params": per_prompt})
    assert [len(r["output_ids"]) for r in by_ids] == [6, 7, 8]
    assert [r["output_ids"][:6] for r in by_ids] == [s["output_ids"] for s in singles]
    one = generate(http, {"text": [PROMPT], "sampling_params": params})
    assert isinstance(one, list) and one[0]["output_ids"] == singles[0]["output_ids"]  # a list in, a list out
    # n choices per prompt, prompt-major; a seed makes the choices differ (seed + k) and the answer repeatable
    sampled = {"max_new_tokens": 6, "n": 3, "temperature": 1.0, "sampling_seed": 7, "ignore_eos": True}
    many = generate(http, {"text": [PROMPT, "Another prompt"], "sampling_params": sampled, "rid": "r"})
    assert len(many) == 6 and [r["meta_info"]["id"] for r in many] == [f"r_{i}" for i in range(6)]
    assert [r["meta_info"]["prompt_tokens"] for r in many] == [len(ids[0])] * 3 + [len(ids[1])] * 3
    assert len({tuple(r["output_ids"]) for r in many[:3]}) > 1
    again = generate(http, {"text": PROMPT, "sampling_params": sampled})  # a single prompt with n > 1: a list
    assert [r["output_ids"] for r in again] == [r["output_ids"] for r in many[:3]]


def test_stream_chunks_are_cumulative(http: httpx.Client) -> None:
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 10, **GREEDY}, "return_logprob": True}
    whole = generate(http, body)
    chunks = stream(http, body)
    assert [c["meta_info"]["completion_tokens"] for c in chunks] == list(range(1, 11))  # one chunk per token
    for c in chunks:
        n = c["meta_info"]["completion_tokens"]
        assert "index" not in c and c["output_ids"] == whole["output_ids"][:n]
        assert whole["text"].startswith(c["text"]) and len(c["meta_info"]["output_token_logprobs"]) == n
    assert [c["meta_info"]["finish_reason"] for c in chunks[:-1]] == [None] * 9
    last = chunks[-1]
    assert (last["text"], last["output_ids"]) == (whole["text"], whole["output_ids"])
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 10} and last["meta_info"]["e2e_latency"]
    batch = stream(http, {"text": [PROMPT, "Another prompt"], "sampling_params": {"max_new_tokens": 4, **GREEDY}})
    final = {c["index"]: c for c in batch if c["meta_info"]["finish_reason"] is not None}
    assert sorted(final) == [0, 1] and final[0]["output_ids"] == whole["output_ids"][:4]
    assert len(batch) == 8


# ---- stop strings, stop tokens, finish reasons ----------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "stream"])
def test_stop_strings_tokens_and_finish_reasons(http: httpx.Client, tokenizer: Tokenizer, streamed: bool) -> None:
    def run(body: dict[str, Any]) -> tuple[str, dict[str, Any], list[int]]:
        out = stream(http, body)[-1] if streamed else generate(http, body)
        return out["text"], out["meta_info"]["finish_reason"], out["output_ids"]

    ids = tokenizer.encode(SCRIPT, add_special_tokens=False).ids
    assert run(scripted(SCRIPT)) == (SCRIPT, {"type": "stop", "matched": EOS}, [*ids, EOS])
    # SGLang cuts a matched stop token's text (EOS is special: it is only seen with skip_special_tokens false)
    assert run(scripted(SCRIPT, skip_special_tokens=False))[0] == SCRIPT
    eos_text = tokenizer.decode([EOS], skip_special_tokens=False)
    assert run(scripted(SCRIPT, skip_special_tokens=False, no_stop_trim=True))[0] == SCRIPT + eos_text
    text, reason, out_ids = run(scripted(SCRIPT, stop=["gamma", "zeta"]))
    assert (text, reason) == ("alpha beta ", {"type": "stop", "matched": "gamma"}) and out_ids == ids[:9]
    assert run(scripted(SCRIPT, stop="gamma", no_stop_trim=True))[0] == "alpha beta gamma"  # the whole last token
    g = ids[5]  # "Ġg"
    assert run(scripted(SCRIPT, stop_token_ids=[g])) == ("alpha beta", {"type": "stop", "matched": g}, ids[:6])
    assert run(scripted(SCRIPT, stop_token_ids=[g], no_stop_trim=True))[0] == "alpha beta g"
    assert run(scripted(SCRIPT, max_new_tokens=3)) == ("alpha", {"type": "length", "length": 3}, ids[:3])
    assert run(scripted(SCRIPT, ignore_eos=True, max_new_tokens=len(ids) + 2))[1] == {"type": "length",
                                                                                      "length": len(ids) + 2}
    assert run(scripted(SCRIPT, min_new_tokens=2, stop_token_ids=[ids[0]]))[1]["matched"] == EOS  # too early


def test_max_new_tokens_zero_only_prefills(http: httpx.Client) -> None:
    prompt = " ".join(f"word{i}" for i in range(60))  # several pages of the radix cache
    out = generate(http, {"text": prompt, "sampling_params": {"max_new_tokens": 0}})
    assert (out["text"], out["output_ids"]) == ("", [])
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert out["meta_info"]["completion_tokens"] == 0 and out["meta_info"]["prompt_tokens"] > 60
    chunks = stream(http, {"text": prompt, "sampling_params": {"max_new_tokens": 0}})
    assert len(chunks) == 1 and chunks[0]["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    later = generate(http, {"text": prompt + " more", "sampling_params": {"max_new_tokens": 2}})
    assert later["meta_info"]["cached_tokens"] >= 48  # what SGLang's frontend does it for: the prefix was cached


def test_logprobs_in_sglang_layout(http: httpx.Client, tokenizer: Tokenizer) -> None:
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 5, **GREEDY}, "return_logprob": True,
            "top_logprobs_num": 3, "return_text_in_logprobs": True, "logprob_start_len": -1}
    out = generate(http, body)
    meta = out["meta_info"]
    assert meta["input_token_logprobs"] == [] and meta["input_top_logprobs"] == []
    rows, tops = meta["output_token_logprobs"], meta["output_top_logprobs"]
    assert [r[1] for r in rows] == out["output_ids"] and len(tops) == 5
    for (lp, token_id, text), top in zip(rows, tops):
        assert text == tokenizer.decode([token_id], skip_special_tokens=False) and len(top) == 3
        assert lp == pytest.approx(top[0][0], abs=1e-5) and token_id == top[0][1]  # greedy: the most likely
    plain = generate(http, {**body, "top_logprobs_num": 0, "return_text_in_logprobs": False})
    assert "output_top_logprobs" not in plain["meta_info"]
    assert all(r[2] is None for r in plain["meta_info"]["output_token_logprobs"])



def test_prompt_logprobs_from_logprob_start_len_equal_completions_echo(http: httpx.Client,
                                                                      tokenizer: Tokenizer) -> None:  # fmt: skip
    """logprob_start_len L: the prompt's tokens from L on, each scored by the positions before it (position 0 has
    no logprob); the same numbers /v1/completions gives for echo with logprobs, over the cached prompt too."""
    ids = tokenizer.encode(PROMPT, add_special_tokens=True).ids
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 3, **GREEDY}, "return_logprob": True,
            "top_logprobs_num": 2, "return_text_in_logprobs": True}
    echo = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 3, "echo": True, "logprobs": 2,
                                              **GREEDY}).json()["choices"][0]["logprobs"]  # fmt: skip
    assert len(echo["tokens"]) == len(ids) + 3 and echo["token_logprobs"][0] is None and echo["top_logprobs"][0] is None
    assert all(lp <= 0 for lp in echo["token_logprobs"][1:]) and all(len(t) == 2 for t in echo["top_logprobs"][1:])
    for start in (0, 3):
        for streamed in (False, True):
            meta = (stream(http, {**body, "logprob_start_len": start})[-1] if streamed else
                    generate(http, {**body, "logprob_start_len": start}))["meta_info"]
            rows, tops = meta["input_token_logprobs"], meta["input_top_logprobs"]
            assert [r[1] for r in rows] == ids[start:] and len(tops) == len(rows)
            assert [r[0] for r in rows] == pytest.approx(echo["token_logprobs"][start:len(ids)], abs=1e-5)
            assert (rows[0][0] is None and tops[0] is None) == (start == 0)
            assert all(len(t) == 2 and t[0][0] >= t[1][0] for t in tops[start == 0:])
            assert [r[0] for r in meta["output_token_logprobs"]] == pytest.approx(echo["token_logprobs"][len(ids):],
                                                                                 abs=1e-5)


def test_structured_output(http: httpx.Client) -> None:
    out = generate(http, {"text": "Count:", "sampling_params": {"max_new_tokens": 8, "temperature": 0,
                                                                "regex": "[0-9]{3}"}})
    assert len(out["text"]) == 3 and out["text"].isdigit()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    out = generate(http, {"text": "JSON:", "sampling_params": {"max_new_tokens": 32, "temperature": 0,
                                                               "json_schema": json.dumps(schema)}})
    assert set(json.loads(out["text"])) == {"a"}


# ---- refused and malformed requests ---------------------------------------------------------------------------

OK = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}


@pytest.mark.parametrize("body, param, words", [
    ({"text": "hi", "sampling_params": {"temperature": 500}}, "sampling_params.temperature", "temperature"),
    ({"text": ["a", "b"], "sampling_params": [{}, {"top_p": 0}]}, "sampling_params[1].top_p", "top_p"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": 9000}}, "sampling_params.max_new_tokens", "8192"),
    ({"text": "hi", "sampling_params": {"temprature": 0}}, "sampling_params", "temprature"),
    ({"text": "hi", "input_ids": [1, 2]}, "text", "exactly one"),
    ({"sampling_params": {}}, "text", "exactly one"),
    ({"input_ids": []}, "input_ids", "empty"),
    ({"input_ids": [5, 99999]}, "input_ids", "99999"),
    ({"input_ids": [[5], [6, 99999]]}, "input_ids[1]", "99999"),
    ({"input_ids": [5, [6]]}, "input_ids", "mixes"),
    ({"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params", "1 entries for 2 prompts"),
    ({"text": ["a", "b"], "sampling_params": [{"n": 2}, {}]}, "sampling_params", "same for every prompt"),
    ({"text": "hi", "sampling_params": {"n": 0}}, "sampling_params.n", "n must be"),
    ({**OK, "image_data": "cat.png"}, "image_data", "text only"),
    ({**OK, "lora_path": "adapter"}, "lora_path", "LoRA"),
    ({**OK, "return_hidden_states": True}, "return_hidden_states", "hidden states"),
    ({**OK, "token_ids_logprob": [5]}, "token_ids_logprob", "top_logprobs_num"),
    ({**OK, "session_params": {"id": "s"}}, "session_params", "sessions"),
    ({"text": "hi", "sampling_params": {"stop_regex": "x+"}}, "sampling_params.stop_regex", "stop strings"),
    ({"text": "hi", "sampling_params": {"logit_bias": {"five": 1.0}}}, "sampling_params.logit_bias", "token ids"),
    ({"text": "hi", "sampling_params": {"logit_bias": {"5": 101}}}, "sampling_params.logit_bias", "[-100, 100]"),
    ({"text": "hi", "sampling_params": {"logit_bias": {"99999999": 1}}}, "sampling_params.logit_bias", "vocabulary"),
    ({"text": "hi", "sampling_params": {"json_schema": "{not json"}}, "sampling_params.json_schema", "JSON"),
    ({"text": "hi", "sampling_params": {"regex": "a", "ebnf": "root ::= \"a\""}}, "sampling_params", "only one"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": 0, "min_new_tokens": 2}},
     "sampling_params.min_new_tokens", "max_new_tokens"),
    ({"text": "hi", "sampling_params": {"regex": "("}}, None, "sampling_params.regex"),
    ({**OK, "custom_logit_processor": "nope"}, "custom_logit_processor", "scripted"),
    ({**OK, "top_logprobs_num": 50, "return_logprob": True}, "top_logprobs_num", "top_logprobs_num"),
    ({**OK, "rid": ["a", "b"]}, "rid", "2 entries for 1 prompts"),
], ids=lambda x: None if isinstance(x, dict | str) or x is None else str(x))
def test_bad_requests_are_400(http: httpx.Client, body: dict[str, Any], param: str | None, words: str) -> None:
    assert words in error(http.post("/generate", json=body), 400, param)


def test_null_fields_mean_defaults_and_harmless_extras_pass(http: httpx.Client) -> None:
    nulls = {k: None for k in ("min_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
                               "presence_penalty", "repetition_penalty", "stop", "stop_token_ids", "n", "json_schema",
                               "regex", "ebnf", "stop_regex", "logit_bias", "ignore_eos", "no_stop_trim")}
    out = generate(http, {"text": PROMPT, "sampling_params": {**nulls, "max_new_tokens": 3},
                          "lora_path": None, "image_data": None, "return_hidden_states": False,
                          "return_routed_experts": False, "log_metrics": False, "some_future_field": 1})
    assert out["meta_info"]["completion_tokens"] == 3
    out = generate(http, {"text": PROMPT, "sampling_params": {"max_new_tokens": None, "temperature": 0,
                                                              "stop_token_ids": [EOS]}})  # null: up to the context
    assert out["meta_info"]["finish_reason"]["type"] in ("stop", "length")


# ---- the other native routes ----------------------------------------------------------------------------------


def test_info_flush_and_health_routes(http: httpx.Client) -> None:
    info = http.get("/get_model_info").json()
    server_info = http.get("/server_info").json()
    assert info == {"model_path": server_info["model_path"], "tokenizer_path": server_info["model_path"],
                    "is_generation": True, "preferred_sampling_params": None}
    native = http.get("/get_server_info").json()  # SGLang's older name for /server_info
    assert native.keys() == server_info.keys() and native["max_context_len"] == 8192
    assert native["tokenizer_path"] == info["tokenizer_path"]  # where SGLang's tools look for it
    generate(http, {"text": " ".join(["many words"] * 40), "sampling_params": {"max_new_tokens": 1}})
    deadline = time.monotonic() + 5  # the scheduler reports its metrics when it goes idle
    while not (gauge(http.get("/metrics").text, "baleen_num_cached_pages") or 0):
        assert time.monotonic() < deadline, "a finished prompt must leave pages in the prefix cache"
        time.sleep(0.05)
    state = http.get("/server_info").json()["internal_states"][0]
    assert state["last_gen_throughput"] >= 0 and "avg_spec_accept_length" not in state  # no speculation here
    assert state["effective_max_running_requests_per_dp"] == 64 and state["dp_size"] == 1
    assert state["memory_usage"]["token_capacity"] == 16 * (state["num_free_pages"] + state["num_used_pages"]) > 0
    cached = gauge(http.get("/metrics").text, "baleen_num_cached_pages")
    flushed = http.post("/flush_cache")  # nothing runs: every cached page is freed
    assert flushed.status_code == 200 and flushed.text == f"Cache flushed: {cached:.0f} pages freed.\n"
    deadline = time.monotonic() + 5
    while gauge(http.get("/metrics").text, "baleen_num_cached_pages"):
        assert time.monotonic() < deadline, "the flushed cache must report no pages"
        time.sleep(0.05)
    again = http.get("/flush_cache")
    assert again.status_code == 200 and again.text == "Cache flushed: 0 pages freed.\n"
    assert http.get("/health_generate").status_code == 200
    assert error(http.get("/generate"), 405)
    metrics = http.get("/metrics").text
    assert 'route="/generate",status="200"' in metrics and 'route="/flush_cache",status="200"' in metrics


def test_disconnect_frees_pages(main_server: ServerProcess, http: httpx.Client) -> None:
    def wait_idle(within: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < within:
            text = http.get("/metrics").text
            if gauge(text, "baleen_pages_used") == 0 and gauge(text, "baleen_num_running_requests") == 0:
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"pages still held after {within} s")

    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 4000, **GREEDY}, "stream": True}
    wait_idle(10)
    for one in (body, {**body, "text": [PROMPT, "Another prompt"]}):
        with http.stream("POST", "/generate", json=one) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for _ in range(10):
                next(lines)
            assert (gauge(http.get("/metrics").text, "baleen_pages_used") or 0) > 0
        assert wait_idle(5) < 5  # 4000 tokens take far longer: the requests were aborted
    with pytest.raises(httpx.ReadTimeout):
        http.post("/generate", json={**body, "stream": False}, timeout=1.0)
    assert wait_idle(5) < 5
    assert 'baleen_requests_finished_total{finish_reason="abort"}' in http.get("/metrics").text


# ---- the fake engine: API key, size limit, dead and overloaded engine ----------------------------------------


def test_auth_limits_and_engine_failures(fake_server: ThreadServer, fake_engine: FakeEngine) -> None:
    auth = {"authorization": "Bearer sekret"}
    with httpx.Client(base_url=fake_server.url, timeout=10) as h:
        error(h.post("/generate", json=OK), 401)
        error(h.get("/get_model_info"), 401)
        error(h.get("/get_server_info"), 401)
        assert h.get("/health_generate").status_code == 200  # open, as /health (SGLang's key check skips both)
        out = h.post("/generate", json=OK, headers=auth).json()
        assert out["text"] == "aa" and out["meta_info"]["finish_reason"] == {"type": "length", "length": 2}
        assert h.get("/get_model_info", headers=auth).json()["model_path"] == "fake-model"
        flushed = h.post("/flush_cache", headers=auth)
        assert flushed.status_code == 200 and flushed.text == "Cache flushed: 1 pages freed.\n"
        error(h.post("/flush_cache"), 401)
        error(h.post("/generate", json={"text": "x" * 5000}, headers=auth), 413)
        fake_engine.error = "the worker process died"
        try:
            for body in (OK, {**OK, "stream": True}):
                resp = h.post("/generate", json=body, headers=auth)
                assert "the worker process died" in error(resp, 503) and resp.headers["retry-after"] == "1"
            error(h.get("/health_generate"), 503)
            assert "the worker process died" in error(h.post("/flush_cache", headers=auth), 503)
        finally:
            fake_engine.error = None
        fake_engine.error_kind = "overloaded"
        try:
            for body in (OK, {**OK, "stream": True}):
                assert "fake overloaded error" in error(h.post("/generate", json=body, headers=auth), 503)
            assert "overloaded" in error(h.get("/health_generate"), 503)
        finally:
            fake_engine.error_kind = None
        assert h.post("/generate", json=OK, headers=auth).status_code == 200


# ---- SGLang's own clients, request for request ------------------------------------------------------------------


def sglang_bench_serving_request(base_url: str, prompt: str | list[int], output_len: int) -> dict[str, Any]:
    """What sglang.bench_serving's async_request_sglang_generate sends and how it reads the answer (one request)."""
    payload = {
        ("text" if isinstance(prompt, str) else "input_ids"): prompt,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": output_len, "ignore_eos": True},
        "stream": True, "lora_path": None, "return_logprob": False, "return_routed_experts": False,
        "logprob_start_len": -1,
    }
    out: dict[str, Any] = {"success": False, "generated_text": "", "output_len": output_len, "ttft": 0.0, "itl": []}
    st = time.perf_counter()
    most_recent, last_output_len = st, 0
    with httpx.stream("POST", base_url + "/generate", json=payload, timeout=60) as response:
        if response.status_code != 200:
            out["error"] = response.read().decode()
            return out
        for chunk_bytes in response.iter_lines():  # aiohttp's response.content yields these lines
            chunk_bytes = chunk_bytes.strip()
            if not chunk_bytes:
                continue
            chunk = chunk_bytes.removeprefix("data: ")
            if chunk == "[DONE]":
                continue
            data = json.loads(chunk)  # any other line (": ping ...") would fail the request here
            if data.get("text"):
                timestamp = time.perf_counter()
                out["generated_text"] = data["text"]  # cumulative
                out["output_len"] = data["meta_info"]["completion_tokens"]
                if out["ttft"] == 0.0:
                    out["ttft"] = timestamp - st
                else:
                    new = out["output_len"] - last_output_len
                    if new == 0:
                        continue
                    out["itl"] += [(timestamp - most_recent) / new] * new
                most_recent, last_output_len = timestamp, out["output_len"]
    out["success"] = True
    return out


def test_sglang_bench_serving_backend_sglang(main_server: ServerProcess, http: httpx.Client,
                                             tokenizer: Tokenizer) -> None:
    model = http.get("/v1/models").json()["data"][0]["id"]  # how it picks --model
    assert model == "default"
    whole = generate(http, {"text": PROMPT, "sampling_params": {"max_new_tokens": 16, **GREEDY}})
    got = sglang_bench_serving_request(main_server.url, PROMPT, 16)
    assert got["success"] and got["output_len"] == 16 and got["generated_text"] == whole["text"]
    assert got["ttft"] > 0 and len(got["itl"]) >= 10
    ids = tokenizer.encode("Another prompt").ids  # --tokenize-prompt sends ids
    got = sglang_bench_serving_request(main_server.url, ids, 8)
    assert got["success"] and got["output_len"] == 8
    server_info = http.get("/get_server_info")  # read at the end for the accept length
    assert server_info.status_code == 200
    assert server_info.json()["internal_states"][0].get("avg_spec_accept_length", None) is None


def test_sglang_bench_one_batch_server(main_server: ServerProcess, http: httpx.Client) -> None:
    """sglang.bench_one_batch_server's run_one_case: flush (status unread), one streamed batch of random ids."""
    http.post("/flush_cache")
    batch_size, input_len, output_len = 3, 32, 6
    input_ids = [[(17 + 31 * i + 7 * j) % 3900 + 50 for j in range(input_len)] for i in range(batch_size)]
    tic = time.perf_counter()
    ttft = 0.0
    with httpx.stream("POST", main_server.url + "/generate", timeout=60, json={
        "input_ids": input_ids,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": output_len, "ignore_eos": True, "json_schema": None},
        "return_logprob": False, "stream": True,
    }) as response:
        for chunk in response.iter_lines():
            if chunk and chunk.startswith("data:"):
                if chunk == "data: [DONE]":
                    break
                data = json.loads(chunk[5:].strip("\n"))
                assert "error" not in data
                reason = data["meta_info"]["finish_reason"]
                assert reason is None or reason["type"] == "length"
                if data["meta_info"]["completion_tokens"] == 1:
                    ttft = time.perf_counter() - tic
    latency = time.perf_counter() - tic
    assert 0 < ttft < latency
    state = http.get("/get_server_info").json()["internal_states"][0]
    assert state.get("avg_spec_accept_length", None) is None and state["last_gen_throughput"] >= 0


def test_sglang_runtime_endpoint_as_gsm8k_uses_it(main_server: ServerProcess, http: httpx.Client) -> None:
    """sglang.lang's RuntimeEndpoint, as benchmark/gsm8k/bench_sglang.py drives it: model info, the few-shot prefix
    cached with max_new_tokens 0, then one gen per question with SglSamplingParams.to_srt_kwargs()."""
    assert isinstance(http.get("/get_model_info").json()["model_path"], str)
    few_shot = "Question: What is 2 + 3?\nAnswer: 5\n\n" * 4
    assert http.post("/generate", json={"text": few_shot, "sampling_params": {"max_new_tokens": 0}}).status_code == 200
    srt_kwargs = {"max_new_tokens": 64, "min_new_tokens": 0, "n": 1, "stop": ["Question", "Assistant:", "<|separator|>"],
                  "stop_token_ids": [], "stop_regex": [], "temperature": 0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
                  "frequency_penalty": 0.0, "presence_penalty": 0.0, "ignore_eos": False, "regex": None,
                  "json_schema": None}
    obj = generate(http, {"text": few_shot + "Question: What is 4 + 4?\nAnswer:", "sampling_params": {
        "skip_special_tokens": True, "spaces_between_special_tokens": True, **srt_kwargs}})
    assert "Question" not in obj["text"] and obj["meta_info"]["completion_tokens"] > 0
    assert obj["meta_info"]["cached_tokens"] > 0  # the cached few-shot prefix
    stop = obj["meta_info"]["finish_reason"]
    assert stop["type"] == "length" or stop["matched"] in ("Question", "Assistant:", "<|separator|>", EOS)


# ---- baleen's loadtest tools on /generate ---------------------------------------------------------------------


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"loadtest_{name}", LOADTEST / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_loadtest_bench_serving_backend_sglang(main_server: ServerProcess, tmp_path: Path) -> None:
    bench = _load("bench_serving")
    out = tmp_path / "run.json"
    code = bench.main(["--backend", "sglang", "--base-url", main_server.url, "--num-prompts", "4",
                       "--random-input-len", "12", "--random-output-len", "6", "--random-range-ratio", "1",
                       "--output-file", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert summary["completed"] == 4 and summary["failed"] == 0 and summary["total_output_tokens"] == 24
    assert summary["usage_reported"] and summary["ttft_ms"]["mean"] > 0
    assert all(r["finish_reason"] == "length" and len(r["itl"]) == 5 for r in result["requests"])


def test_loadtest_bench_one_batch_server(main_server: ServerProcess, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    tool = _load("bench_one_batch_server")
    out = tmp_path / "result.jsonl"
    code = tool.main(["--base-url", main_server.url, "--batch-size", "1", "3", "--input-len", "16",
                      "--output-len", "4", "--result-filename", str(out), "--skip-warmup"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["batch_size"], r["input_len"], r["output_len"]) for r in rows] == [(1, 16, 4), (3, 16, 4)]
    for r in rows:
        assert r["output_tokens"] == 4 * r["batch_size"] and 0 < r["ttft"] < r["latency"]
        assert r["input_throughput"] > 0 and r["output_throughput"] > 0
    assert "ttft" in capsys.readouterr().out


def test_health_generate_counts_other_requests_outputs(fake_server: ThreadServer, fake_engine: FakeEngine) -> None:
    """A busy engine may queue the health check's own one-token request behind others: any output the engine sends
    after the check began proves it alive (as SGLang's /health_generate counts it)."""
    import threading

    fake_engine.delay_s = 5.0  # the check's own token would take 5 s

    def other_request_progresses() -> None:
        time.sleep(0.3)
        fake_engine.last_output_at = time.monotonic()

    try:
        threading.Thread(target=other_request_progresses, daemon=True).start()
        started = time.monotonic()
        with httpx.Client(base_url=fake_server.url, timeout=10) as h:
            assert h.get("/health_generate").status_code == 200
        assert time.monotonic() - started < 2.0
        assert fake_engine.num_requests == 0  # the check's own request was aborted
    finally:
        fake_engine.delay_s = 0.0


def test_completions_echo_with_logprobs_streamed_equals_whole(http: httpx.Client, tokenizer: Tokenizer) -> None:
    body = {"prompt": PROMPT, "max_tokens": 4, "echo": True, "logprobs": 1, **GREEDY}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]
    assert whole["text"].startswith(PROMPT)
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    got: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    for e in events:
        for k in got:
            got[k] += e["choices"][0]["logprobs"][k]
    assert "".join(e["choices"][0]["text"] for e in events) == whole["text"]
    assert got["tokens"] == whole["logprobs"]["tokens"]
    assert got["token_logprobs"][1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:], abs=1e-5)
    assert got["top_logprobs"][0] is None and len(got["top_logprobs"]) == len(whole["logprobs"]["top_logprobs"])
