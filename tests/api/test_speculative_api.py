"""Speculative decoding at the HTTP layer: the --speculative-* flags, the accept length in /metrics (baleen_* and
SGLang's sglang:spec_accept_length), and `usage.spec_verify_ct`, present only when the engine speculates."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import httpx
import openai
import pytest
from harness import FakeEngine, ThreadServer
from test_metrics import MODEL, scrape, value

from baleen.api import bodies as b
from baleen.api import cli

CHAT, COMPLETION = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_serve_flags(parser)
    return parser.parse_args(argv)


def test_flags_map_onto_engine_config() -> None:
    ec = cli.engine_config_from_args(_args([
        "--speculative-algorithm", "NEXTN", "--speculative-num-steps", "1", "--speculative-eagle-topk", "1",
        "--speculative-num-draft-tokens", "2", "--speculative-draft-model-path", "/nextn", "--decode-log-interval", "9"]))
    assert (ec.speculative_algorithm, ec.speculative_num_steps, ec.speculative_eagle_topk,
            ec.speculative_num_draft_tokens, ec.speculative_draft_model_path) == ("NEXTN", 1, 1, 2, "/nextn")
    assert ec.decode_log_interval == 9
    off = cli.engine_config_from_args(_args([]))
    assert off.speculative_algorithm is None and off.speculative_num_steps is None and off.decode_log_interval == 40
    with pytest.raises(SystemExit):  # argparse refuses other algorithms
        _args(["--speculative-algorithm", "MEDUSA"])


def test_usage_body() -> None:
    assert "spec_verify_ct" not in b.usage(3, 5, 1)
    assert b.usage(3, 5, 1, spec_verify_ct=2)["spec_verify_ct"] == 2


@pytest.fixture(scope="module")
def http(fake_server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_server.url, timeout=10, headers={"authorization": "Bearer sekret"}) as client:
        yield client


@pytest.mark.parametrize("speculative", [False, True])
def test_usage_has_the_verify_count_only_under_speculation(http: httpx.Client, fake_engine: FakeEngine,
                                                            fake_server: ThreadServer, speculative: bool) -> None:
    fake_engine.speculative = speculative
    try:
        # 5 tokens a choice: 2 verify steps each (the fake's count), summed over the choices
        chat = http.post(CHAT, json={"model": "fake", "messages": USER, "max_tokens": 5, "n": 2}).json()
        text = http.post(COMPLETION, json={"model": "fake", "prompt": "hi", "max_tokens": 5}).json()
        lines = [line for line in http.post(CHAT, json={"model": "fake", "messages": USER, "max_tokens": 5,
                                                        "stream": True, "stream_options": {"include_usage": True}})
                 .text.splitlines() if line.startswith("data: {")]
        client = openai.OpenAI(base_url=fake_server.url + "/v1", api_key="sekret", max_retries=0)
        typed = client.chat.completions.create(model="fake", messages=USER, max_tokens=5)  # type: ignore[arg-type]
    finally:
        fake_engine.speculative = False
    want = {"spec_verify_ct": 4} if speculative else {}
    assert {k: v for k, v in chat["usage"].items() if k == "spec_verify_ct"} == want
    assert text["usage"].get("spec_verify_ct") == (2 if speculative else None)
    assert ('"spec_verify_ct":2' in lines[-1]) == speculative and '"usage"' in lines[-1]
    # OpenAI's client reads the body either way (the field is an extra on its usage object)
    assert typed.usage is not None and typed.usage.completion_tokens == 5
    assert (typed.usage.model_extra or {}).get("spec_verify_ct") == (2 if speculative else None)


def test_accept_length_in_metrics(http: httpx.Client, fake_engine: FakeEngine) -> None:
    before = fake_engine.metrics
    fake_engine.metrics = {"spec_accept_length": 2.75, "spec_accept_rate": 0.58, "num_verify_rows": 40,
                           "num_verify_tokens": 110, "num_draft_tokens": 120, "num_accepted_drafts": 70}
    try:
        types, samples = scrape(http)
    finally:
        fake_engine.metrics = before
    assert value(samples, "sglang:spec_accept_length", **MODEL) == 2.75
    assert value(samples, "sglang:spec_accept_rate", **MODEL) == 0.58
    assert value(samples, "baleen_spec_accept_length") == 2.75 and value(samples, "baleen_spec_accept_rate") == 0.58
    assert types["baleen_spec_verify_steps"] == "counter" and value(samples, "baleen_spec_verify_steps_total") == 40
    assert value(samples, "baleen_spec_verify_tokens_total") == 110
    assert value(samples, "baleen_spec_draft_tokens_total") == 120
    assert value(samples, "baleen_spec_accepted_drafts_total") == 70
    _, idle = scrape(http)  # before any report: SGLang's gauges read 0
    assert value(idle, "sglang:spec_accept_length", **MODEL) == 0.0
