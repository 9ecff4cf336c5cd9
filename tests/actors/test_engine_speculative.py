"""Speculative decoding through the Engine: the start-up checks of the --speculative-* settings and their defaults,
and greedy generations on the tiny model (its MTP layer drafts) equal to those without speculation."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import re
from typing import Any

import pytest

from baleen.actors.engine import Engine
from baleen.actors.engine_config import EngineConfig, plan_startup
from baleen.messages import GrammarSpec, RequestOutput, SamplingParams
from baleen.model.config import ModelConfig
from baleen.model.make_model import tiny_model_path


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(tiny_model_path())


@pytest.fixture(scope="module")
def model_config(model_path: str) -> ModelConfig:
    config = ModelConfig.from_hf(model_path)
    assert config.has_mtp
    return config


def plan(model_path: str, model_config: ModelConfig, **kw: Any) -> Any:
    return plan_startup(EngineConfig(model_path=model_path, device="cpu", **kw), model_path, model_config)


def test_defaults_under_speculation(model_path: str, model_config: ModelConfig) -> None:
    off = plan(model_path, model_config)
    assert (off.worker.speculative_num_steps, off.scheduler.speculative_num_steps) == (0, 0)
    assert off.worker.max_running_requests == 64 and off.worker.cuda_graph_max_bs is None
    for algorithm in ("EAGLE", "NEXTN"):  # NEXTN is an alias
        on = plan(model_path, model_config, speculative_algorithm=algorithm)
        assert (on.worker.speculative_num_steps, on.scheduler.speculative_num_steps) == (3, 3)  # DeepSeek's 3/1/4
        assert on.worker.speculative_draft_model_path is None
        # The seeds: 48 running requests and CUDA graphs up to 48 by default under MTP
        assert (on.worker.max_running_requests, on.worker.cuda_graph_max_bs) == (48, 48)
    mine = plan(model_path, model_config, speculative_algorithm="EAGLE", speculative_num_steps=1,
                speculative_eagle_topk=1, speculative_num_draft_tokens=2, max_running_requests=96, cuda_graph_bs=(1, 96))
    assert (mine.worker.speculative_num_steps, mine.worker.max_running_requests) == (1, 96)
    assert (mine.worker.cuda_graph_bs, mine.worker.cuda_graph_max_bs) == ((1, 96), None)
    # Only the draft token count given: the steps follow from it
    assert plan(model_path, model_config, speculative_algorithm="EAGLE",
                speculative_num_draft_tokens=3).worker.speculative_num_steps == 2


def test_num_draft_tokens_is_adjusted_with_a_warning(model_path: str, model_config: ModelConfig,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="baleen.engine"):
        p = plan(model_path, model_config, speculative_algorithm="EAGLE", speculative_num_steps=2,
                 speculative_num_draft_tokens=8)
    assert p.worker.speculative_num_steps == 2
    assert "--speculative-num-draft-tokens 8 is adjusted to 3" in caplog.text


@pytest.mark.parametrize("kw, message", [
    (dict(speculative_algorithm="EAGLE", speculative_eagle_topk=4), "topk > 1 (tree drafts) is not supported yet"),
    (dict(speculative_algorithm="EAGLE", speculative_eagle_topk=0), "--speculative-eagle-topk must be >= 1"),
    (dict(speculative_algorithm="EAGLE", speculative_num_steps=0), "--speculative-num-steps must be >= 1"),
    (dict(speculative_algorithm="MEDUSA"), "--speculative-algorithm MEDUSA is not one of EAGLE, NEXTN"),
    (dict(speculative_num_steps=2), "--speculative-num-steps needs --speculative-algorithm"),
    (dict(speculative_algorithm="EAGLE", speculative_draft_model_path="/no/such/dir"),
     "--speculative-draft-model-path /no/such/dir: no such directory"),
    (dict(decode_log_interval=0), "--decode-log-interval must be >= 1"),
], ids=lambda x: str(x)[:40] if isinstance(x, dict) else None)
def test_bad_settings_name_the_flag(model_path: str, model_config: ModelConfig, kw: dict[str, Any],
                                    message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        plan(model_path, model_config, **kw)


def test_a_model_without_mtp_needs_a_draft_model(model_path: str, model_config: ModelConfig) -> None:
    no_mtp = dataclasses.replace(model_config, num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match=r"has none .*--speculative-draft-model-path"):
        plan(model_path, no_mtp, speculative_algorithm="NEXTN")
    # A NextN checkpoint serves instead (the worker checks its shapes when it loads it)
    assert plan(model_path, no_mtp, speculative_algorithm="NEXTN",
                speculative_draft_model_path=model_path).worker.speculative_draft_model_path == model_path


@pytest.fixture
def draft_checks(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts, over every speculative step of an in-process engine, the drafts a grammar request's verify rows
    check and those its grammar rejects (each request's drafts walked on its own matcher up to the first rejected,
    then rolled back, before the verify masks are filled)."""
    from baleen.model.grammar import GrammarSlots, SlotGrammar

    counts = {"checked": 0, "rejected": 0}
    fill = GrammarSlots.fill

    def spy(self: GrammarSlots, rows: list[tuple[int, SlotGrammar]], drafts: list[int] | None = None,
            known: list[Any] | None = None) -> Any:
        walked: dict[int, tuple[SlotGrammar, int, bool]] = {}  # id(matcher) -> (matcher, accepted, rejected one)
        for (_, g), d in zip(rows, drafts or []):
            mine = walked.get(id(g), (g, 0, False))
            if d < 0 or not g.plain or mine[2]:
                continue
            assert g.matcher is not None
            counts["checked"] += 1
            ok = g.matcher.accept_token(d)
            counts["rejected"] += not ok
            walked[id(g)] = (g, mine[1] + ok, not ok)
        for g, accepted, _ in walked.values():
            if accepted:
                assert g.matcher is not None
                g.matcher.rollback(accepted)
        return fill(self, rows, drafts, known)

    monkeypatch.setattr(GrammarSlots, "fill", spy)
    return counts


async def _generate(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], RequestOutput]:
    ids: list[int] = []
    last: RequestOutput | None = None
    async for out in engine.generate(prompt, params):
        ids += out.token_ids
        last = out
    assert last is not None
    return ids, last


def test_greedy_outputs_equal_those_without_speculation(model_path: str, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(16, 1000) for _ in range(rng.randint(3, 40))] for _ in range(6)]
    lengths = [rng.randint(1, 14) for _ in prompts]

    async def run(**kw: Any) -> tuple[list[tuple[list[int], RequestOutput]], dict[str, float]]:
        config = EngineConfig(model_path=model_path, device="cpu", dtype="float32", context_length=256, **kw)
        async with await Engine.start(config) as engine:
            outs = await asyncio.gather(*(
                _generate(engine, p, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))
                for p, n in zip(prompts, lengths)))
            await asyncio.sleep(0.3)  # the scheduler's last metrics report
            return list(outs), engine.metrics

    plain, _ = asyncio.run(run())
    with caplog.at_level(logging.INFO, logger="baleen.scheduler"):
        spec, metrics = asyncio.run(run(speculative_algorithm="EAGLE", speculative_num_steps=3, decode_log_interval=2))
    for (ids, last), (want, plain_last), n in zip(spec, plain, lengths):
        assert ids == want and len(ids) == n and last.finish_reason == "length"
        assert plain_last.spec_verify_ct is None and last.spec_verify_ct is not None
        assert (last.spec_verify_ct > 0) == (n >= 3) and last.spec_verify_ct <= n - 1  # one row per 1 to 4 tokens
    assert metrics["num_verify_rows"] == sum(last.spec_verify_ct or 0 for _, last in spec)
    assert 1.0 <= metrics["spec_accept_length"] <= 4.0 and 0.0 <= metrics["spec_accept_rate"] <= 1.0
    assert "decode batch: #running-req" in caplog.text and "accept len" in caplog.text
    assert "cuda graph: False" in caplog.text and metrics["num_graphed_steps"] == 0  # CPU: eager steps
    # The graphs' bodies (--debug-eager-graphs) commit the same tokens
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="baleen.scheduler"):
        graphed, metrics = asyncio.run(run(speculative_algorithm="EAGLE", speculative_num_steps=3,
                                           debug_eager_graphs=True, decode_log_interval=2))  # fmt: skip
    assert [ids for ids, _ in graphed] == [ids for ids, _ in plain]
    assert 0 < metrics["num_graphed_steps"] < metrics["num_steps"]  # the prefills ran eagerly
    assert re.search(r"cuda graph: (True|\d+/\d+ steps)", caplog.text)
    # The rank processes get the settings too
    spec_mp, _ = asyncio.run(run(speculative_algorithm="NEXTN", speculative_num_steps=2, multiprocess=True))
    assert [ids for ids, _ in spec_mp] == [ids for ids, _ in plain]
    assert all(last.spec_verify_ct is not None for _, last in spec_mp)


def test_a_grammar_request_speculates_beside_a_plain_one(model_path: str, draft_checks: dict[str, int]) -> None:
    # The worker masks each verify row of a grammar's request by its matcher walked over the drafts before it:
    # the output follows the grammar, and the request speculates (its verify rows carry drafts), each draft taken
    # under the grammar's mask (the tiny model's MTP layer, random weights, alone drafts ids the regex forbids)
    grammar = GrammarSpec("regex", r"[a-f0-9]{8}")

    async def main() -> None:
        config = EngineConfig(model_path=model_path, device="cpu", dtype="float32", context_length=256,
                              speculative_algorithm="EAGLE", speculative_num_steps=2)
        async with await Engine.start(config) as engine:
            greedy = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
            (ids, last), (_, plain) = await asyncio.gather(
                _generate(engine, [20, 21, 22], SamplingParams(max_new_tokens=30, seed=1, grammar=grammar)),
                _generate(engine, [30, 31, 32, 33], greedy))
            text = engine.tokenizer.decode(ids)
            assert re.fullmatch(r"[a-f0-9]{8}", text) and last.finish_reason == "stop", (text, last)
            assert (last.spec_verify_ct or 0) > 0 and (plain.spec_verify_ct or 0) > 0

    asyncio.run(main())
    assert draft_checks["checked"] > 0 and draft_checks["rejected"] == 0, draft_checks


def test_the_trained_model_under_a_grammar_gives_the_tokens_it_gives_without_speculation(
        draft_checks: dict[str, int]) -> None:  # fmt: skip
    """Structured output under speculation, on the trained default model (its drafts are often accepted, also
    inside the grammar): greedy and seeded sampling through JSON schemas and a regex give, token for token, what
    they give without speculation; every draft is one the grammar accepts, the drafts are accepted, and every
    page comes back."""
    import json

    from baleen.model.make_model import default_model_path

    path = str(default_model_path())
    person = GrammarSpec("json_schema", json.dumps({
        "type": "object", "properties": {"country": {"type": "string", "maxLength": 24},
                                         "capital": {"type": "string", "maxLength": 24}},
        "required": ["country", "capital"], "additionalProperties": False}))  # fmt: skip
    total = GrammarSpec("json_schema", json.dumps({
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"},
                                         "sum": {"type": "integer"}}, "required": ["a", "b", "sum"]}))  # fmt: skip
    cases = [
        ("The capital of France is", SamplingParams(max_new_tokens=48, temperature=0.0, grammar=person)),
        ("What is 12 + 35?", SamplingParams(max_new_tokens=48, temperature=0.0, grammar=total)),
        ("Name the capital of Japan.", SamplingParams(max_new_tokens=48, temperature=1.0, seed=3, grammar=person)),
        ("To be, or not to be, that is", SamplingParams(max_new_tokens=24, temperature=0.0,
                                                       grammar=GrammarSpec("regex", r"[a-z ]{4,40}\."))),
        ("Once more unto the breach, dear friends,", SamplingParams(max_new_tokens=24, temperature=0.0)),
    ]

    plain, _ = asyncio.run(_run_cases(path, cases))
    spec, metrics = asyncio.run(_run_cases(path, cases, speculative_algorithm="EAGLE", speculative_num_steps=3))
    for (ids, text, last, _), (want_ids, want_text, want_last, _) in zip(spec, plain):
        assert (ids, text, last.finish_reason) == (want_ids, want_text, want_last.finish_reason), text
    for _, text, last, _ in plain[:3]:
        assert last.finish_reason == "stop", (text, last.finish_reason)
        json.loads(text)  # the schemas' JSON, ended by the grammar
    # NOTE: the MTP layer drafts what the model would write unconstrained, which the grammar often forbids; its
    # drafts are taken under the grammar's mask instead: 111 tokens in 57 verify rows when written, against 81 with
    # only the tokens the grammar forces drafted (61 of 147 drafts checked were the grammar's to reject) and 95
    # with the MTP layer's drafts alone (1.95 against 1.37 and 1.17 tokens a row)
    assert draft_checks["checked"] > 0 and draft_checks["rejected"] == 0, draft_checks
    grammar_rows = [last.spec_verify_ct or 0 for _, _, last, _ in spec[:4]]
    grammar_tokens = [last.completion_tokens for _, _, last, _ in spec[:4]]
    assert all(grammar_rows) and sum(grammar_tokens) >= 1.7 * sum(grammar_rows), (grammar_tokens, grammar_rows)
    assert metrics["num_used_pages"] == metrics["num_cached_pages"]  # nothing but the radix cache holds pages
    # The graphs' bodies (--debug-eager-graphs): a step with a grammar's rows drafts eagerly under the masks, then
    # replays the verify and draft-extend graphs; the same tokens
    graphed, metrics = asyncio.run(_run_cases(path, cases, speculative_algorithm="EAGLE", speculative_num_steps=3,
                                              debug_eager_graphs=True))  # fmt: skip
    assert [x[:2] for x in graphed] == [x[:2] for x in plain]
    assert metrics["num_graphed_steps"] >= 0.8 * metrics["num_steps"]  # all but the prefills (25 of 27 when written)
    assert draft_checks["rejected"] == 0


async def _collect(engine: Engine, prompt: str, params: SamplingParams) -> tuple[list[int], str, RequestOutput, list]:
    ids: list[int] = []
    text = ""
    lps: list = []
    last: RequestOutput | None = None
    async for out in engine.generate(prompt, params):
        ids += out.token_ids
        text += out.text
        lps += list(zip(out.logprobs or [], out.top_logprobs or []))
        last = out
    assert last is not None
    return ids, text, last, lps


async def _run_cases(path: str, cases: list[tuple[str, SamplingParams]],
                     **kw: Any) -> tuple[list[tuple[list[int], str, RequestOutput, list]], dict[str, float]]:
    """Every case at once through an Engine on the model at `path` (CPU, float32); the outputs and the metrics."""
    config = EngineConfig(model_path=path, device="cpu", dtype="float32", context_length=512, **kw)
    async with await Engine.start(config) as engine:
        outs = await asyncio.gather(*(_collect(engine, p, sp) for p, sp in cases))
        await asyncio.sleep(0.3)  # the scheduler's last metrics report
        return list(outs), engine.metrics


def test_the_trained_model_serves_every_sampling_feature_as_without_speculation() -> None:
    """The trained default model, whose MTP layer's drafts are often accepted, so stops and limits fall inside
    accepted runs: seeded sampling with penalties and logprobs, a stop string, stop token ids, min_new_tokens,
    max_tokens at a run's end give the tokens, text, finish reasons and logprobs they give without speculation."""
    from baleen.model.make_model import default_model_path

    path = str(default_model_path())
    cases = [
        ("To be, or not to be, that is", SamplingParams(max_new_tokens=40, temperature=0.8, top_p=0.9, seed=5,
                                                       frequency_penalty=0.3, logprobs=True, top_logprobs=2)),
        ("The capital of France is", SamplingParams(max_new_tokens=40, temperature=0.0, stop=["alalalal"])),
        ("What is 12 + 35?", SamplingParams(max_new_tokens=40, temperature=0.0, stop_token_ids=[13, 16])),
        ("Once more unto the breach, dear friends,", SamplingParams(max_new_tokens=7, temperature=0.0)),
        ("Name the capital of Japan.", SamplingParams(max_new_tokens=30, temperature=1.0, seed=9, min_new_tokens=12)),
    ]

    plain, _ = asyncio.run(_run_cases(path, cases))
    spec, metrics = asyncio.run(_run_cases(path, cases, speculative_algorithm="EAGLE", speculative_num_steps=3))
    for (ids, text, last, lps), (want_ids, want_text, want_last, want_lps) in zip(spec, plain):
        assert (ids, text, last.finish_reason, last.matched_stop) == (want_ids, want_text, want_last.finish_reason,
                                                                      want_last.matched_stop)  # fmt: skip
        assert last.completion_tokens == want_last.completion_tokens
        assert len(lps) == len(want_lps)
        for (lp, top), (want_lp, want_top) in zip(lps, want_lps):
            assert lp == pytest.approx(want_lp, abs=1e-3)
            assert [t for t, _ in top] == [t for t, _ in want_top]
    assert plain[1][2].finish_reason == "stop" and plain[3][2].finish_reason == "length"
    assert metrics["spec_accept_length"] > 1.2  # the drafts are accepted: the stops above fell inside runs


def test_preemption_with_two_verify_rows_in_flight_gives_the_plain_tokens() -> None:
    """A KV pool too small for every request at once: the newest are preempted (some with two verify rows in
    flight under the overlap scheduler, their prefix known only on the device) and recomputed later; each request
    still generates what it generates without speculation, and every page comes back."""
    from baleen.model.make_model import default_model_path

    path = str(default_model_path())
    prompts = ["To be, or not to be, that is", "The capital of France is", "Once more unto the breach, dear friends,"]
    # NOTE: admission reserves the decode reserve (256 tokens) beyond a prompt: requests outgrow it, then preempt
    sp = SamplingParams(max_new_tokens=320, temperature=0.0, ignore_eos=True)

    async def run(**kw: Any) -> tuple[list[list[int]], dict[str, float]]:
        config = EngineConfig(model_path=path, device="cpu", dtype="float32", context_length=512, **kw)
        async with await Engine.start(config) as engine:
            outs = await asyncio.gather(*(_collect(engine, p, sp) for p in prompts))
            await asyncio.sleep(0.3)  # the scheduler's last metrics report
            return [ids for ids, *_ in outs], engine.metrics

    plain, _ = asyncio.run(run())
    spec, metrics = asyncio.run(run(speculative_algorithm="EAGLE", speculative_num_steps=3, max_total_tokens=640))
    assert spec == plain and all(len(ids) == 320 for ids in spec)
    assert metrics["num_preemptions"] > 0 and metrics["spec_accept_length"] > 1.2
    assert metrics["num_used_pages"] == metrics["num_cached_pages"]  # nothing but the radix cache holds pages
    # the same through the graphs' bodies (--debug-eager-graphs): preempted and recomputed requests replay them too
    graphed, metrics = asyncio.run(run(speculative_algorithm="EAGLE", speculative_num_steps=3, max_total_tokens=640,
                                       debug_eager_graphs=True))  # fmt: skip
    assert graphed == plain and metrics["num_preemptions"] > 0 and metrics["num_graphed_steps"] > 0
    assert metrics["num_used_pages"] == metrics["num_cached_pages"]
