"""Structured output through the Engine on the random-weight tiny model (CPU): every output sampled at temperature
1 validates, with and without overlap and through preemption; bad grammars and unfinished ones end as they should.
The multi-process engine is covered over HTTP (tests/api/test_structured_http.py)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import jsonschema
import numpy as np
import pytest

from baleen.actors.engine import Engine, EngineConfig
from baleen.actors.worker import WorkerActor
from baleen.messages import (
    GrammarSpec,
    PageUpdate,
    RequestOutput,
    SamplingParams,
    SeqRow,
    SlotInit,
    StepPlan,
)
from baleen.model.build import WorkerConfig, build_runner
from baleen.model.make_model import tiny_model_path
from baleen.model.runner import ModelRunner

# Held out (not used to write the code), each bounded so the random model ends it in a few dozen tokens.
SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                      "label": {"type": "string", "pattern": "^[a-z]{2,5}$"},
                                      "done": {"type": "boolean"}},
     "required": ["id", "label", "done"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "sizes": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                           "maximum": 9}, "maxItems": 3}},
     "required": ["color", "sizes"]},
]
REGEXES = [r"(north|south|east|west) [1-9][0-9]?", r"[a-f0-9]{8}", r"<(b|i)>[A-Z]{2,4}</(b|i)>"]
PROMPT = "Answer in the requested format."


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(tiny_model_path())


async def _run(engine: Engine, spec: GrammarSpec | None, seed: int, **kw: Any) -> tuple[str, RequestOutput]:
    params = SamplingParams(max_new_tokens=kw.pop("max_new_tokens", 120), temperature=kw.pop("temperature", 1.0),
                            seed=seed, grammar=spec, **kw)
    text, last = "", None
    async for out in engine.generate(PROMPT, params):
        text, last = text + out.text, out
    assert last is not None
    return text, last


def _check(outs: list[tuple[str, RequestOutput]], validate: Any) -> None:
    for text, last in outs:
        assert last.finish_reason == "stop", (last.finish_reason, last.error, text)
        validate(text)


async def _all_valid(engine: Engine, seeds: range) -> None:
    """Every held-out schema and regex, several seeds, all at once (one batch)."""
    jobs: list[tuple[Any, Any]] = []
    for schema in SCHEMAS:
        spec = GrammarSpec("json_schema", json.dumps(schema))
        jobs += [(_run(engine, spec, s), lambda text, schema=schema: jsonschema.validate(json.loads(text), schema))
                 for s in seeds]
    for pattern in REGEXES:
        jobs += [(_run(engine, GrammarSpec("regex", pattern), s),
                  lambda text, pattern=pattern: _fullmatch(pattern, text)) for s in seeds]  # fmt: skip
    outs = await asyncio.gather(*(job for job, _ in jobs))
    for out, (_, validate) in zip(outs, jobs):
        _check([out], validate)


def _runner(engine: Engine) -> ModelRunner:
    """The in-process engine's model runner."""
    return next(a.runner for a in engine._actors if isinstance(a, WorkerActor))


def _fullmatch(pattern: str, text: str) -> None:
    assert re.fullmatch(pattern, text), (pattern, text)


@pytest.mark.parametrize("overlap", [True, False])
def test_outputs_at_temperature_1_are_valid(model_path: str, overlap: bool) -> None:
    async def main() -> None:
        engine = await Engine.start(EngineConfig(model_path=model_path, device="cpu",
                                                 disable_overlap_schedule=not overlap))
        try:
            await _all_valid(engine, range(3) if overlap else range(1))
            # unconstrained requests in the same batch stay unconstrained
            free = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
            mixed = await asyncio.gather(_run(engine, GrammarSpec("regex", "(ab)+c"), 7),
                                         _collect_ids(engine, free), _collect_ids(engine, free))
            assert re.fullmatch("(ab)+c", mixed[0][0]) and mixed[1] == mixed[2] and len(mixed[1]) == 8
        finally:
            await engine.close()

    asyncio.run(main())


async def _collect_ids(engine: Engine, params: SamplingParams) -> list[int]:
    ids: list[int] = []
    async for out in engine.generate(PROMPT, params):
        ids += out.token_ids
    return ids


def test_deferred_sampling_equals_serial_steps(model_path: str) -> None:
    """Runner level, as the worker runs it: step N+1 launched before step N is finished returns with its sampling
    deferred (the mask needs N's tokens); completing it gives the tokens serial steps give."""
    runner = build_runner(WorkerConfig(model_path=model_path, max_running_requests=4, max_context_len=256))
    prompt = np.arange(20, 32, dtype=np.int32).tobytes()
    pages = np.arange(1, 9, dtype=np.int32)
    specs = [GrammarSpec("regex", "[a-z]{12,40}"), GrammarSpec("json_schema", json.dumps(SCHEMAS[1]))]

    def plans(num: int) -> list[StepPlan]:
        inits = [SlotInit(s, f"r{s}", SamplingParams(temperature=1.0, seed=s, grammar=spec, max_new_tokens=None),
                          prompt) for s, spec in enumerate(specs)]  # fmt: skip
        out = [StepPlan(step_id=0, rows=[SeqRow(s, 0, 12, prompt, True) for s in (0, 1)], new_slots=inits,
                        page_updates=[PageUpdate(s, 0, pages[4 * s : 4 * s + 4].tobytes()) for s in (0, 1)])]
        out += [StepPlan(step_id=i, rows=[SeqRow(s, 11 + i, 1, b"", True) for s in (0, 1)]) for i in range(1, num)]
        return out

    serial = [np.frombuffer(runner.finish(runner.launch(p)).token_ids, np.int32).tolist() for p in plans(8)]
    overlapped, pending, deferred = [], None, []
    for plan in plans(8):
        step = runner.launch(plan)
        deferred.append(step.deferred is not None)
        runner.complete(step)
        if pending is not None:
            overlapped.append(np.frombuffer(runner.finish(pending).token_ids, np.int32).tolist())
        pending = step
    assert pending is not None
    overlapped.append(np.frombuffer(runner.finish(pending).token_ids, np.int32).tolist())
    assert deferred == [False] + [True] * 7
    assert overlapped == serial


def test_bad_and_unfinished_grammars(model_path: str) -> None:
    async def main() -> None:
        engine = await Engine.start(EngineConfig(model_path=model_path, device="cpu"))
        try:
            bad = GrammarSpec("json_schema", '{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}',
                              "response_format.json_schema.schema")
            outs = await asyncio.gather(*(_run(engine, bad, s) for s in range(2)))  # both wait on one compile
            for text, last in outs:
                assert text == "" and last.finish_reason == "error" and last.error_kind == "invalid"
                assert last.error is not None and last.error.startswith(
                    "response_format.json_schema.schema does not compile:")
            # max_new_tokens reached before the grammar could end: "length", with what was produced
            text, last = await _run(engine, GrammarSpec("regex", "[a-z]{20}"), 0, max_new_tokens=3)
            assert last.finish_reason == "length" and last.completion_tokens == 3
            assert re.fullmatch("[a-z]+", text) and len(text) < 20
            # stop strings end a constrained request like any other
            text, last = await _run(engine, GrammarSpec("regex", "x{30}"), 0, stop=["xx"])
            assert (text, last.finish_reason, last.matched_stop) == ("", "stop", "xx")
            # an abort while the grammar compiles
            slow = GrammarSpec("regex", "[0-9]{3}(x|y)")

            async def leave_early() -> None:
                async for _ in engine.generate(PROMPT, SamplingParams(max_new_tokens=50, grammar=slow)):
                    break

            await asyncio.wait_for(leave_early(), 30)
            _check([await _run(engine, slow, 1)], lambda text: _fullmatch("[0-9]{3}(x|y)", text))
            # finished, stopped and aborted requests released their matchers (freed with the next step's plan)
            await _collect_ids(engine, SamplingParams(max_new_tokens=2))
            assert not _runner(engine).grammars
        finally:
            await engine.close()

    asyncio.run(main())


def test_preempted_requests_resume_their_grammar(model_path: str) -> None:
    # Admission keeps almost no decode reserve, and 12 pages cannot hold 8 requests that each grow past 4: the
    # scheduler must preempt, and a recomputed request's matcher replays what it generated before.
    async def main() -> None:
        engine = await Engine.start(EngineConfig(model_path=model_path, device="cpu", page_size=16,
                                                 max_total_tokens=12 * 16, max_running_requests=8,
                                                 schedule_conservativeness=4 / 256))  # fmt: skip
        try:
            pattern = "[a-z]{40,60}"
            outs = await asyncio.gather(*(_run(engine, GrammarSpec("regex", pattern), s, max_new_tokens=70)
                                          for s in range(8)))  # fmt: skip
            _check(list(outs), lambda text: _fullmatch(pattern, text))
            assert engine.metrics.get("num_preemptions", 0) > 0
            await _collect_ids(engine, SamplingParams(max_new_tokens=2))
            assert not _runner(engine).grammars
        finally:
            await engine.close()

    asyncio.run(main())


@pytest.mark.gpu
def test_cuda_graphs_and_overlap(model_path: str) -> None:
    """On CUDA: decode steps replay graphs, the mask is filled while the next forward runs (real events); plain
    greedy rows beside constrained ones keep the captured greedy tail's answers."""

    async def main() -> None:
        engine = await Engine.start(EngineConfig(model_path=model_path, device="cuda", attention_backend="triton",
                                                 cuda_graph_max_bs=16, max_total_tokens=65536))
        try:
            free = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
            alone = await _collect_ids(engine, free)
            await _all_valid(engine, range(2))
            greedy_json = GrammarSpec("json_schema", json.dumps(SCHEMAS[1]))
            mixed = await asyncio.gather(_collect_ids(engine, free), _run(engine, greedy_json, 0),
                                         _run(engine, GrammarSpec("regex", REGEXES[0]), 1, temperature=0.0))
            assert mixed[0] == alone
            jsonschema.validate(json.loads(mixed[1][0]), SCHEMAS[1])
            _fullmatch(REGEXES[0], mixed[2][0])
        finally:
            await engine.close()

    asyncio.run(main())
