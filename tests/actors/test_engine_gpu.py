"""GPU: the whole engine's greedy output on the tiny model is the same on the torch and Triton backends."""

from __future__ import annotations

import asyncio
import random

import pytest

from baleen.actors.engine import Engine, EngineConfig
from baleen.messages import SamplingParams
from baleen.model.make_model import tiny_model_path

pytestmark = pytest.mark.gpu


async def _outputs(cfg: EngineConfig, prompts: list[list[int]]) -> list[list[int]]:
    async def one(engine: Engine, p: list[int]) -> list[int]:
        ids: list[int] = []
        async for out in engine.generate(p, SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)):
            assert out.error is None, out.error
            ids += out.token_ids
        return ids

    async with await Engine.start(cfg) as engine:
        return await asyncio.gather(*[one(engine, p) for p in prompts])


def test_triton_with_graphs_equals_torch_backend_fp32() -> None:
    path = str(tiny_model_path())
    rng = random.Random(0)
    prompts = [[rng.randrange(16, 1000) for _ in range(rng.randint(3, 90))] for _ in range(12)]
    base = dict(model_path=path, device="cuda", dtype="float32", max_total_tokens=65536)
    ref = asyncio.run(_outputs(EngineConfig(**base, attention_backend="torch", disable_cuda_graph=True), prompts))
    for cfg in (
        EngineConfig(**base, attention_backend="triton", cuda_graph_max_bs=16),
        EngineConfig(**base, attention_backend="triton", cuda_graph_max_bs=16, multiprocess=True),
    ):
        assert asyncio.run(_outputs(cfg, prompts)) == ref, cfg
    assert len({tuple(o) for o in ref}) > 1


def test_prompts_of_four_chunks_complete_and_the_engine_lives() -> None:
    # Later chunks extend their cached prefix through the MLA kernels (one query row per new token), not torch.
    from baleen.model.make_model import tiny_model_path

    path = str(tiny_model_path())
    rng = random.Random(1)
    chunk = 64
    prompts = [[rng.randrange(16, 1000) for _ in range(4 * chunk + d)] for d in (0, 7, -9)]
    base = dict(model_path=path, device="cuda", dtype="float32", chunked_prefill_size=chunk, max_total_tokens=65536)
    ref = asyncio.run(_outputs(EngineConfig(**base, attention_backend="torch", disable_cuda_graph=True), prompts))

    async def main() -> list[list[int]]:
        async with await Engine.start(EngineConfig(**base, attention_backend="triton")) as engine:
            async def one(p: list[int], n: int) -> list[int]:
                ids: list[int] = []
                async for out in engine.generate(p, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)):
                    assert out.error is None, out.error
                    ids += out.token_ids
                return ids

            outs = await asyncio.gather(*[one(p, 24) for p in prompts])
            assert engine.healthy and len(await one([5, 6, 7], 4)) == 4  # and it serves the next request
            return outs

    assert asyncio.run(main()) == ref
