"""Structured output with tensor parallelism (two gloo ranks on CPU): every rank runs the same matchers and applies
the same mask, so the ranks keep sampling the same tokens (`check_rank_sampling` fails a request otherwise); under
speculation, and under DP attention, also the same drafts (the MTP layer's logits are masked by the grammar too)."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from baleen.actors.engine import Engine, EngineConfig
from baleen.messages import GrammarSpec, SamplingParams
from baleen.model.make_model import tiny_model_path

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "s": {"enum": ["up", "down"]}}, "required": ["n", "s"]}  # fmt: skip
PATTERN = r"[a-z]{3,6}(-[0-9]{1,2})?"


@pytest.mark.parametrize("kw", [{}, {"speculative_algorithm": "EAGLE", "speculative_num_steps": 2},
                                {"dp_size": 2, "enable_dp_attention": True, "speculative_algorithm": "EAGLE",
                                 "speculative_num_steps": 3},
                                # every rank drafts eagerly when one holds a grammar's rows, then replays the verify
                                # graphs (their bodies here): a plain request beside the grammars'
                                {"dp_size": 2, "enable_dp_attention": True, "speculative_algorithm": "EAGLE",
                                 "speculative_num_steps": 3, "debug_eager_graphs": True}],
                         ids=["tp2", "tp2-speculative", "dp2-speculative", "dp2-speculative-graphs"])
def test_tp2_ranks_agree_under_grammars(kw: dict[str, object]) -> None:
    async def main() -> None:
        config = EngineConfig(model_path=str(tiny_model_path()), tp_size=2, check_rank_sampling=True,
                              **kw)  # type: ignore[arg-type]
        verify_rows: list[int] = []
        async with await Engine.start(config) as engine:

            async def one(spec: GrammarSpec, seed: int) -> str:
                text = ""
                async for out in engine.generate("Go", SamplingParams(max_new_tokens=80, temperature=1.0, seed=seed,
                                                                      grammar=spec)):
                    assert out.error is None, out.error
                    text += out.text
                    if out.finished:
                        assert out.finish_reason == "stop", text
                        verify_rows.append(out.spec_verify_ct or 0)
                return text

            async def plain() -> int:
                n = 0
                async for out in engine.generate("Go on", SamplingParams(max_new_tokens=40, temperature=0.0,
                                                                         ignore_eos=True)):  # fmt: skip
                    assert out.error is None, out.error
                    n += len(out.token_ids)
                return n

            schema = GrammarSpec("json_schema", json.dumps(SCHEMA))
            graphs = bool(kw.get("debug_eager_graphs"))
            texts = await asyncio.gather(one(schema, 0), one(schema, 1), one(GrammarSpec("regex", PATTERN), 2),
                                         *([plain()] if graphs else []))  # fmt: skip
            for text in texts[:2]:
                jsonschema.validate(json.loads(text), SCHEMA)
            assert re.fullmatch(PATTERN, texts[2]), texts[2]
            assert all(verify_rows) == bool(kw), verify_rows  # speculating: every request's verify rows carried drafts
            if graphs:
                await asyncio.sleep(0.3)  # the next metrics report
                assert engine.metrics["num_graphed_steps"] > engine.metrics["num_steps"] / 2

    asyncio.run(main())
