"""GET /metrics: prometheus_client's exposition with the baleen_* and SGLang's sglang:* names, engine gauges read
at scrape time, and the latency histograms counting what the frontend saw; one registry per server."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from harness import FakeEngine, ThreadServer
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from baleen.api.metrics import FrontendMetrics
from baleen.api.state import ServerConfig

CHAT, COMPLETION = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
MODEL = {"model_name": "fake"}  # the fake server's --served-model-name, the label of every sglang: series

BALEEN_NAMES = {  # family name -> type, as the parser names them (a counter's family drops _total)
    "baleen_healthy": "gauge", "baleen_pages_used": "gauge", "baleen_num_used_pages": "gauge",
    "baleen_num_evictable_pages": "gauge", "baleen_http_requests": "counter",
    "baleen_http_requests_in_flight": "gauge", "baleen_http_request_duration_seconds": "histogram",
    "baleen_time_to_first_token_seconds": "histogram", "baleen_prompt_tokens": "counter",
    "baleen_generation_tokens": "counter", "baleen_requests_finished": "counter",
}
SGLANG_NAMES = {
    "sglang:num_running_reqs": "gauge", "sglang:num_queue_reqs": "gauge", "sglang:gen_throughput": "gauge",
    "sglang:cache_hit_rate": "gauge", "sglang:token_usage": "gauge",
    "sglang:time_to_first_token_seconds": "histogram", "sglang:inter_token_latency_seconds": "histogram",
    "sglang:e2e_request_latency_seconds": "histogram", "sglang:prompt_tokens": "counter",
    "sglang:generation_tokens": "counter", "sglang:num_requests": "counter",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(http: httpx.Client) -> tuple[dict[str, str], Samples]:
    """/metrics parsed: family name -> type, and (sample name, labels) -> value."""
    resp = http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"] == CONTENT_TYPE_LATEST
    families = list(text_string_to_metric_families(resp.text))
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return {f.name: f.type for f in families}, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a labelled series not yet created."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(check: Callable[[], bool], within: float = 5.0) -> None:
    """Poll `check`: the HTTP counters are observed just after the response's last byte is sent."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "the metric never reached its value"
        time.sleep(0.01)


@pytest.fixture
def http(fake_server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_server.url, timeout=10, headers={"authorization": "Bearer sekret"}) as client:
        yield client


def test_exposition_parses_with_every_name(http: httpx.Client) -> None:
    types, samples = scrape(http)
    for name, kind in (BALEEN_NAMES | SGLANG_NAMES).items():
        assert types.get(name) == kind, name
    assert value(samples, "baleen_healthy") == 1
    assert value(samples, "baleen_pages_used") == 2  # used 3 - evictable 1
    for name in ("sglang:num_running_reqs", "sglang:token_usage"):  # before the engine reports: 0
        assert (name, frozenset(MODEL.items())) in samples
    assert value(samples, "sglang:time_to_first_token_seconds_bucket", le="+Inf", **MODEL) >= 0


def test_engine_gauges_are_read_at_scrape_time(http: httpx.Client, fake_engine: FakeEngine) -> None:
    before = fake_engine.metrics
    fake_engine.metrics = {"num_running_requests": 3, "num_waiting_requests": 2, "gen_throughput": 123.5,
                           "cache_hit_rate": 0.25, "token_usage": 0.5, "num_used_pages": 10,
                           "num_evictable_pages": 4, "num_preemptions": 7, "dp1_num_running_requests": 1}
    try:
        types, samples = scrape(http)
    finally:
        fake_engine.metrics = before
    assert value(samples, "baleen_num_running_requests") == 3 and value(samples, "baleen_pages_used") == 6
    assert types["baleen_num_preemptions"] == "counter" and value(samples, "baleen_num_preemptions_total") == 7
    assert value(samples, "baleen_dp1_num_running_requests") == 1  # a key without a table entry: a gauge
    expected = {"sglang:num_running_reqs": 3, "sglang:num_queue_reqs": 2, "sglang:gen_throughput": 123.5,
                "sglang:cache_hit_rate": 0.25, "sglang:token_usage": 0.5}
    assert {name: value(samples, name, **MODEL) for name in expected} == expected


def test_histograms_count_what_was_observed(http: httpx.Client) -> None:
    _, start = scrape(http)

    def grew(samples: Samples, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(start, name, **labels)

    # Non-streamed, 3 tokens: one first token, two inter-token gaps (the fake engine sends one token an output).
    assert http.post(CHAT, json={"model": "fake", "messages": USER, "max_tokens": 3}).status_code == 200
    _, after = scrape(http)
    assert grew(after, "sglang:time_to_first_token_seconds_count", **MODEL) == 1
    assert grew(after, "sglang:inter_token_latency_seconds_count", **MODEL) == 2
    assert grew(after, "sglang:e2e_request_latency_seconds_count", **MODEL) == 1
    assert grew(after, "baleen_time_to_first_token_seconds_count", route=CHAT) == 1

    # Streamed, 5 tokens: four gaps between successive outputs.
    with http.stream("POST", CHAT, json={"model": "fake", "messages": USER, "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200 and list(r.iter_lines())[-2:] == ["data: [DONE]", ""]
    _, streamed = scrape(http)
    assert grew(streamed, "sglang:inter_token_latency_seconds_count", **MODEL) == 2 + 4
    assert grew(streamed, "sglang:inter_token_latency_seconds_bucket", le="+Inf", **MODEL) == 6
    assert grew(streamed, "sglang:e2e_request_latency_seconds_count", **MODEL) == 2
    itl_sum = grew(streamed, "sglang:inter_token_latency_seconds_sum", **MODEL)
    assert 0 < itl_sum <= grew(streamed, "sglang:e2e_request_latency_seconds_sum", **MODEL)

    # n=2: one HTTP request (one baleen TTFT), two engine requests (two of SGLang's).
    resp = http.post(COMPLETION, json={"model": "fake", "prompt": "x", "max_tokens": 2, "n": 2})
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 2
    _, end = scrape(http)
    assert grew(end, "baleen_time_to_first_token_seconds_count", route=COMPLETION) == 1
    assert grew(end, "sglang:time_to_first_token_seconds_count", **MODEL) == 4
    assert grew(end, "sglang:e2e_request_latency_seconds_count", **MODEL) == 4
    assert grew(end, "sglang:num_requests_total", **MODEL) == 4
    assert grew(end, "sglang:generation_tokens_total", **MODEL) == grew(end, "baleen_generation_tokens_total") == 12
    assert grew(end, "baleen_requests_finished_total", finish_reason="length") == 4

    def http_counted() -> bool:
        _, now = scrape(http)
        return (grew(now, "baleen_http_requests_total", method="POST", route=CHAT, status="200") == 2
                and grew(now, "baleen_http_request_duration_seconds_count", route=CHAT) == 2
                and grew(now, "baleen_http_requests_total", method="POST", route=COMPLETION, status="200") == 1)

    wait_for(http_counted)


def test_each_server_has_its_own_registry(fake_server: ThreadServer, tokenizer: Tokenizer) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, log_level="warning", served_model_name="other")
    with ThreadServer(FakeEngine(tokenizer), config) as other, httpx.Client(base_url=other.url, timeout=10) as http:
        assert http.post(CHAT, json={"model": "other", "messages": USER, "max_tokens": 2}).status_code == 200
        _, samples = scrape(http)
    assert value(samples, "sglang:num_requests_total", model_name="other") == 1
    assert not any(dict(labels).get("model_name") == "fake" for _, labels in samples)


def test_inter_token_latency_spreads_a_multi_token_output() -> None:
    metrics = FrontendMetrics("m", dict, lambda: True)
    metrics.observe_inter_token(0.03, 3)  # three tokens in one output, 30 ms after the previous one
    get = metrics.registry.get_sample_value
    assert get("sglang:inter_token_latency_seconds_count", {"model_name": "m"}) == 3
    assert get("sglang:inter_token_latency_seconds_sum", {"model_name": "m"}) == pytest.approx(0.03)
    assert get("sglang:inter_token_latency_seconds_bucket", {"model_name": "m", "le": "0.01"}) == 3
    assert get("sglang:inter_token_latency_seconds_bucket", {"model_name": "m", "le": "0.008"}) == 0
