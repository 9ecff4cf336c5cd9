"""Structured output with tensor parallelism (two gloo ranks on CPU): every rank runs the same matchers and applies
the same mask, so the ranks keep sampling the same tokens (`check_rank_sampling` fails a request otherwise)."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema

from baleen.actors.engine import Engine, EngineConfig
from baleen.messages import GrammarSpec, SamplingParams
from baleen.model.make_model import tiny_model_path

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "s": {"enum": ["up", "down"]}}, "required": ["n", "s"]}  # fmt: skip
PATTERN = r"[a-z]{3,6}(-[0-9]{1,2})?"


def test_tp2_ranks_agree_under_grammars() -> None:
    async def main() -> None:
        config = EngineConfig(model_path=str(tiny_model_path()), tp_size=2, check_rank_sampling=True)
        async with await Engine.start(config) as engine:

            async def one(spec: GrammarSpec, seed: int) -> str:
                text = ""
                async for out in engine.generate("Go", SamplingParams(max_new_tokens=80, temperature=1.0, seed=seed,
                                                                      grammar=spec)):
                    assert out.error is None, out.error
                    text += out.text
                    if out.finished:
                        assert out.finish_reason == "stop", text
                return text

            schema = GrammarSpec("json_schema", json.dumps(SCHEMA))
            texts = await asyncio.gather(one(schema, 0), one(schema, 1), one(GrammarSpec("regex", PATTERN), 2))
            for text in texts[:2]:
                jsonschema.validate(json.loads(text), SCHEMA)
            assert re.fullmatch(PATTERN, texts[2]), texts[2]

    asyncio.run(main())
