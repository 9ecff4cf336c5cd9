"""TP, EP, DP attention and two nodes through the Engine (gloo, CPU, fp32): the single-rank greedy outputs; failures.

Every layout runs one process per rank with real torch.distributed collectives; `check_rank_sampling` makes
ranks that share a batch compare their sampled ids every step, so a divergence fails the request loudly.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import time
from typing import Any

import pytest

from baleen.actors.engine import Engine, EngineConfig, EngineDead, run_node
from baleen.messages import RequestOutput, SamplingParams
from baleen.model.make_model import tiny_model_path

GREEDY: dict[str, Any] = dict(temperature=0.0, ignore_eos=True)
RNG = random.Random(7)
# Mixed lengths: prompts of 3..70 tokens (some prefilled in 64-token chunks), 3..18 new tokens.
PROMPTS = [([RNG.randrange(16, 1000) for _ in range(RNG.randint(3, 70))], RNG.randint(3, 18)) for _ in range(8)]


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(tiny_model_path())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def generate(engine: Engine, prompts: list[tuple[list[int], int]]) -> list[list[int]]:
    async def one(prompt: list[int], n: int) -> list[int]:
        ids: list[int] = []
        async for out in engine.generate(prompt, SamplingParams(max_new_tokens=n, **GREEDY)):
            assert out.error is None, out.error
            ids += out.token_ids
        return ids

    return await asyncio.gather(*[one(p, n) for p, n in prompts])


@pytest.fixture(scope="module")
def reference(model_path: str) -> list[list[int]]:
    async def main() -> list[list[int]]:
        async with await Engine.start(EngineConfig(model_path=model_path, chunked_prefill_size=64)) as engine:
            return await generate(engine, PROMPTS)

    return asyncio.run(main())


LAYOUTS: dict[str, dict[str, Any]] = {
    "tp2": dict(tp_size=2),
    "tp2-ep2": dict(tp_size=2, ep_size=2),
    # 4 heads and widths 320 / 64 over 3 ranks: zero-padded on CPU (SGLang's --tp 6 on a 6-node Xeon)
    "tp3-padded": dict(tp_size=3),
    "dp-attention2": dict(tp_size=2, dp_size=2, enable_dp_attention=True),
    # every rank drafts and verifies the same rows: the committed tokens agree (check_rank_sampling)
    "tp2-speculative": dict(tp_size=2, speculative_algorithm="EAGLE", speculative_num_steps=2),
    # DP ranks with different verify rows (and idle ones) run the same MTP steps: the plan says how many
    "dp-attention2-speculative": dict(tp_size=2, dp_size=2, enable_dp_attention=True, speculative_algorithm="EAGLE",
                                      speculative_num_steps=3),
    # the CUDA-graph paths (their bodies run eagerly on CPU): every DP rank replays one size at once, an idle one too
    "dp-attention2-graphs": dict(tp_size=2, dp_size=2, enable_dp_attention=True, debug_eager_graphs=True),
    "dp-attention2-speculative-graphs": dict(tp_size=2, dp_size=2, enable_dp_attention=True, debug_eager_graphs=True,
                                             speculative_algorithm="EAGLE", speculative_num_steps=3),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_gives_the_single_rank_outputs(model_path: str, reference: list[list[int]], layout: str) -> None:
    cfg = EngineConfig(model_path=model_path, chunked_prefill_size=64, check_rank_sampling=True, **LAYOUTS[layout])

    async def main() -> None:
        async with await Engine.start(cfg) as engine:
            assert await generate(engine, PROMPTS) == reference
            if cfg.enable_dp_attention:
                # Alone, the request keeps the other DP rank idle: it runs empty batches in lock-step.
                assert await generate(engine, PROMPTS[:1]) == reference[:1]
                await asyncio.sleep(0.3)  # the next metrics report
                per_rank = [engine.metrics[f"dp{d}_num_generated_tokens"] for d in range(2)]
                assert min(per_rank) > 0  # both DP ranks served requests
                assert sum(per_rank) == sum(n for _, n in PROMPTS) + PROMPTS[0][1]
            if cfg.debug_eager_graphs:  # most steps are decode or verify steps of every rank: they replay
                assert engine.metrics["num_graphed_steps"] > engine.metrics["num_steps"] / 2
            assert engine.healthy

    asyncio.run(main())


def test_two_nodes_give_the_single_rank_outputs(model_path: str, reference: list[list[int]]) -> None:
    common = dict(
        model_path=model_path, chunked_prefill_size=64, tp_size=2, ep_size=2, nnodes=2,
        dist_init_addr=f"127.0.0.1:{free_port()}", dist_timeout=60, check_rank_sampling=True,
    )  # fmt: skip

    async def main() -> None:
        node1 = asyncio.ensure_future(run_node(EngineConfig(node_rank=1, **common)))  # type: ignore[arg-type]
        try:
            async with await Engine.start(EngineConfig(node_rank=0, **common)) as engine:  # type: ignore[arg-type]
                assert await generate(engine, PROMPTS) == reference
            assert await asyncio.wait_for(node1, 20) == 0  # node 0 closed the engine: node 1 exits cleanly
        finally:
            node1.cancel()

    asyncio.run(main())


async def _long_requests(engine: Engine, outs: list[RequestOutput]) -> list[asyncio.Task[None]]:
    async def consume(i: int) -> None:
        async for out in engine.generate(f"request {i}", SamplingParams(max_new_tokens=8000, **GREEDY)):
            outs.append(out)

    tasks = [asyncio.create_task(consume(i)) for i in range(3)]
    while len(outs) < 3:
        await asyncio.sleep(0.01)
    return tasks


def test_killed_rank_fails_requests_fast_and_engine_is_unhealthy(model_path: str) -> None:
    async def main() -> None:
        async with await Engine.start(EngineConfig(model_path=model_path, tp_size=2)) as engine:
            outs: list[RequestOutput] = []
            tasks = await _long_requests(engine, outs)
            pid = engine._children[1].pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*tasks), 1.0)
            assert time.monotonic() - killed < 1.0
            errors = [o for o in outs if o.finish_reason == "error"]
            assert len(errors) == 3 and all("baleen-rank1" in (o.error or "") for o in errors)
            assert not engine.healthy
            with pytest.raises(EngineDead):
                async for _ in engine.generate("after death"):
                    pass
            await asyncio.sleep(0.2)
            assert not any(c.is_alive() for c in engine._children)  # rank 0 was not left waiting

    asyncio.run(main())


def test_hung_rank_is_reported_after_the_dist_timeout(model_path: str) -> None:
    async def main() -> None:
        async with await Engine.start(EngineConfig(model_path=model_path, tp_size=2, dist_timeout=2)) as engine:
            outs: list[RequestOutput] = []
            tasks = await _long_requests(engine, outs)
            pid = engine._children[1].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)  # alive but silent: rank 0 waits in a collective
            stopped = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*tasks), 15.0)
            assert time.monotonic() - stopped < 10.0
            errors = [o.error or "" for o in outs if o.finish_reason == "error"]
            assert len(errors) == 3 and all("imed out" in e for e in errors), errors
            assert not engine.healthy

    asyncio.run(main())


def test_missing_node_is_a_clear_timeout(model_path: str, caplog: pytest.LogCaptureFixture) -> None:
    def cfg(node_rank: int) -> EngineConfig:
        addr = f"127.0.0.1:{free_port()}"  # each side waits for a peer that never comes
        return EngineConfig(
            model_path=model_path, tp_size=2, nnodes=2, node_rank=node_rank, dist_init_addr=addr, dist_timeout=1
        )

    async def main() -> None:
        node1 = asyncio.ensure_future(run_node(cfg(1)))
        with pytest.raises(EngineDead, match="within --dist-timeout 1 s"):
            await Engine.start(cfg(0))
        assert await asyncio.wait_for(node1, 20) == 1

    asyncio.run(main())
    assert "rank 1 of 2 could not meet the other ranks" in caplog.text


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(tp_size=2, dp_size=2), "without --enable-dp-attention"),
        (dict(tp_size=3, nnodes=2), "multiple of --nnodes"),
        (dict(tp_size=3, ep_size=3), "16 routed experts cannot be split over --ep-size 3"),
        (dict(tp_size=2, nnodes=2), "needs --dist-init-addr"),
        (dict(tp_size=2, ep_size=4), "must divide --tp"),
        (dict(tp_size=2, nnodes=2, node_rank=1, dist_init_addr="h:1"), "start that node with run_node"),
        (dict(tp_size=2, dist_init_addr="nohost"), "HOST:PORT"),
    ],
)
def test_bad_layouts_are_refused_before_any_process_starts(model_path: str, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        asyncio.run(Engine.start(EngineConfig(model_path=model_path, **kw)))


async def _prompt_logprobs(engine: Engine, prompts: list[list[int]]) -> list[list[float | None]]:
    async def one(prompt: list[int]) -> list[float | None]:
        params = SamplingParams(max_new_tokens=1, logprob_start_len=0, top_logprobs=2, **GREEDY)
        outs = [out async for out in engine.generate(prompt, params)]
        assert outs[0].prompt_logprobs is not None and len(outs[0].prompt_logprobs) == len(prompt)
        return outs[0].prompt_logprobs

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def test_prompt_logprobs_under_tp_and_dp_attention_equal_one_rank(model_path: str) -> None:
    """Each DP group makes its own requests' prompt logits (its LM head gathers within the group): the values equal
    one rank's, chunks and idle DP ranks included."""
    prompts = [p for p, _ in PROMPTS[:5]]

    async def run(**kw: Any) -> list[list[float | None]]:
        async with await Engine.start(EngineConfig(model_path=model_path, chunked_prefill_size=16, **kw)) as engine:
            got = await _prompt_logprobs(engine, prompts)
            if kw.get("enable_dp_attention"):
                got[:1] = await _prompt_logprobs(engine, prompts[:1])  # alone: the other DP rank idles
            return got

    want = asyncio.run(run())
    for layout in ("tp2", "dp-attention2"):
        got = asyncio.run(run(**LAYOUTS[layout]))
        for g, w in zip(got, want):
            assert g[0] is None and w[0] is None
            assert g[1:] == pytest.approx(w[1:], abs=1e-4), layout
