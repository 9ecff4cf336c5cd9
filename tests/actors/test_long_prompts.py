"""Prompts longer than one prefill chunk, and a step that runs out of memory, through the in-process Engine (CPU).

A prompt of 2-4 chunks is prefilled chunk by chunk, each later chunk extending the cached prefix in the absorbed
form; its greedy ids equal the unchunked prefill's. An out-of-memory error injected into one step fails that
step's request with a clear error; the engine keeps serving, and the prefix cache holds nothing of the failed
step (the same prompt afterwards gives the reference ids).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import torch

from baleen.actors.engine import Engine, EngineConfig
from baleen.actors.worker import WorkerActor
from baleen.messages import RequestOutput, SamplingParams, StepPlan
from baleen.model.make_model import default_model_path

CHUNK = 48
GREEDY: dict[str, Any] = dict(temperature=0.0, ignore_eos=True)
RNG = random.Random(3)
PROMPTS = [[RNG.randrange(16, 1000) for _ in range(n)] for n in (2 * CHUNK, 3 * CHUNK - 5, 4 * CHUNK)]


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(default_model_path())


async def _run(engine: Engine, prompt: list[int], n: int) -> tuple[list[int], RequestOutput]:
    ids: list[int] = []
    last: RequestOutput | None = None
    async for out in engine.generate(prompt, SamplingParams(max_new_tokens=n, **GREEDY)):
        ids += out.token_ids
        last = out
    assert last is not None
    return ids, last


def _generate(config: EngineConfig, prompts: list[list[int]], n: int) -> list[list[int]]:
    async def main() -> list[list[int]]:
        async with await Engine.start(config) as engine:
            outs = await asyncio.gather(*(_run(engine, p, n) for p in prompts))
            for _, last in outs:
                assert last.error is None, last.error
            return [ids for ids, _ in outs]

    return asyncio.run(main())


@pytest.fixture(scope="module")
def unchunked(model_path: str) -> list[list[int]]:
    return _generate(EngineConfig(model_path=model_path, chunked_prefill_size=-1), PROMPTS, 6)


def test_prompts_of_several_chunks_equal_the_unchunked_prefill(model_path: str, unchunked: list[list[int]]) -> None:
    # A KV pool of a few prompts' pages: the long prompts run chunk by chunk, one at a time or side by side.
    config = EngineConfig(model_path=model_path, chunked_prefill_size=CHUNK, max_total_tokens=12 * CHUNK)
    assert _generate(config, PROMPTS, 6) == unchunked


def test_a_step_out_of_memory_fails_only_its_requests(model_path: str, unchunked: list[list[int]]) -> None:
    doomed = PROMPTS[2]  # its third chunk's step runs out of memory

    async def main() -> None:
        config = EngineConfig(model_path=model_path, chunked_prefill_size=CHUNK, max_running_requests=1)
        async with await Engine.start(config) as engine:
            worker = next(a for a in engine._actors if isinstance(a, WorkerActor))
            runner = worker.runner
            launch = runner._launch
            injected: list[int] = []

            def failing(plan: StepPlan, started: float) -> Any:
                if not injected and any(r.prefix_len == 2 * CHUNK and r.extend_len == CHUNK for r in plan.rows):
                    injected.append(plan.step_id)
                    launch(plan, started)  # the step's latents are half written, as a real OOM leaves them
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
                return launch(plan, started)

            runner._launch = failing
            # max_running_requests=1: the second request waits in the queue, outside the failing step.
            (_, last), (ids2, last2) = await asyncio.gather(_run(engine, doomed, 6), _run(engine, PROMPTS[0], 6))
            assert injected, "the injected failure never ran"
            assert last.finish_reason == "error" and last.error_kind == "overloaded"
            assert "out of device memory" in (last.error or "") and "Tried to allocate" in (last.error or "")
            assert last2.error is None and ids2 == unchunked[0]
            assert engine.healthy
            # The failed step's pages never reached the prefix cache: the same prompt now gives the reference.
            again, last3 = await _run(engine, doomed, 6)
            assert last3.error is None and again == unchunked[2]
            await asyncio.sleep(0.3)  # the scheduler's metrics report after the last step
            m = engine.metrics
            assert m["num_failed_steps"] == 1
            assert m["num_used_pages"] == m["num_evictable_pages"], "a page leaked"

    asyncio.run(main())
