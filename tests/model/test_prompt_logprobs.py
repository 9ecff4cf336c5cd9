"""The prompt's own logprobs (SamplingParams.logprob_start_len) equal transformers' log-softmax over the whole
prompt: across prefill chunks, beside other requests, and when the prompt's prefix is in the radix cache (those
positions are recomputed), with the top tables asked for."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import torch

from baleen.actors.engine import Engine, EngineConfig
from baleen.messages import RequestOutput, SamplingParams
from baleen.model.make_model import tiny_model_path


def _first_outputs(path: str, asks: list[tuple[list[int], int, int]], warm: list[int]) -> list[RequestOutput]:
    """Each (prompt, logprob_start_len, top_logprobs)'s first output, all at once after `warm` (a plain request
    that leaves its prompt in the cache) ran alone."""

    async def run() -> list[RequestOutput]:
        config = EngineConfig(model_path=path, tokenizer_path=str(tiny_model_path()), device="cpu", dtype="float32",
                              context_length=256, page_size=4, chunked_prefill_size=8)  # fmt: skip
        async with await Engine.start(config) as engine:
            async def first(prompt: list[int], start: int, top: int) -> RequestOutput:
                params = SamplingParams(max_new_tokens=2, temperature=0.0, logprob_start_len=start, top_logprobs=top)
                outs = [out async for out in engine.generate(prompt, params)]
                return outs[0]

            await first(warm, -1, 0)
            return list(await asyncio.gather(*(first(*a) for a in asks)))

    return asyncio.run(run())


def test_prompt_logprobs_equal_transformers(tiny: Any) -> None:
    path, hf = tiny.checkpoint(seed=31)
    rng = random.Random(0)
    vocab = hf.config.vocab_size
    long = [rng.randrange(3, vocab) for _ in range(37)]
    short = [rng.randrange(3, vocab) for _ in range(5)]
    asks = [(long, 0, 3), (long, 11, 0), (short, 1, 2), (short, 5, 0), (short, -1, 0)]
    outs = _first_outputs(str(path), asks, warm=long)
    for (prompt, start, top), out in zip(asks, outs):
        assert out.token_ids, "the first output carries the first token"
        if start < 0:
            assert out.prompt_logprobs is None and out.prompt_top_logprobs is None
            continue
        ref = torch.log_softmax(tiny.hf_logits(hf, prompt), dim=-1)  # [len, vocab]: row p scores token p + 1
        want = [ref[p - 1, prompt[p]].item() for p in range(max(start, 1), len(prompt))]
        got = out.prompt_logprobs
        assert got is not None and len(got) == len(prompt) - min(start, len(prompt)), (start, got)
        if start == 0:
            assert got[0] is None
            got = got[1:]
        assert torch.allclose(torch.tensor(got, dtype=torch.float32), torch.tensor(want), atol=1e-4), (start, got, want)
        if top:
            tables = out.prompt_top_logprobs
            assert tables is not None and len(tables) == len(out.prompt_logprobs)
            for p, table in zip(range(max(start, 1), len(prompt)), tables[1:] if start == 0 else tables):
                vals, ids = ref[p - 1].topk(top)
                assert [t for t, _ in table] == ids.tolist()
                assert torch.allclose(torch.tensor([v for _, v in table]), vals, atol=1e-4)
        else:
            assert out.prompt_top_logprobs is None
