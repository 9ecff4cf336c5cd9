"""The logit-processor registry and the built-in DeepSeek-R1 thinking budget."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from baleen.messages import SamplingParams
from baleen.model.logit_processors import (
    DeepSeekR1ThinkingBudget,
    LogitProcessor,
    LogitProcessorRegistry,
    apply_logit_processors,
)
from baleen.model.sampler import Sampler, SamplingState

BUDGET = "deepseek_r1_thinking_budget"


def byte_level_tokenizer(specials: list[str]) -> Tokenizer:
    """A small byte-level BPE like DeepSeek's: "\\n" is the byte token "Ċ", not a vocab entry named "\\n"."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)
    corpus = ["Okay, so the user asks about whales.\nLet me think.", "The answer is 42.\n\nDone thinking."]
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def r1_tokenizer() -> Tokenizer:
    return byte_level_tokenizer(["<｜end▁of▁sentence｜>", "<think>", "</think>"])


def test_thinking_budget_forces_newline_then_end_think(r1_tokenizer: Tokenizer) -> None:
    nl = r1_tokenizer.encode("\n", add_special_tokens=False).ids[0]
    end = r1_tokenizer.token_to_id("</think>")
    assert r1_tokenizer.token_to_id("\n") is None, "the lookup must go through encode for byte-level tokens"
    vocab = r1_tokenizer.get_vocab_size()
    proc = LogitProcessorRegistry().create(BUDGET, {"thinking_budget": 4}, r1_tokenizer)
    row = torch.randn(vocab)
    history: list[int] = []
    for step in range(8):
        out = proc(history, row.clone())
        if step == 4:
            assert out.argmax() == nl and torch.isinf(out).sum() == vocab - 1
        elif step == 5:
            assert out.argmax() == end and torch.isinf(out).sum() == vocab - 1
        else:
            assert torch.equal(out, row), f"step {step} must pass through"
        history.append(int(out.argmax()) if step in (4, 5) else 7)
    # </think> written by the model before the budget: never forced
    proc = DeepSeekR1ThinkingBudget({"thinking_budget": 2}, r1_tokenizer)
    assert torch.equal(proc([5, end], row.clone()), row)
    assert torch.equal(proc([5, end, 9, 9, 9], row.clone()), row)
    # budget 0: the very first token closes the reasoning; a shorter history (recompute) starts over
    proc = DeepSeekR1ThinkingBudget({"thinking_budget": 0}, r1_tokenizer)
    assert proc([], row.clone()).argmax() == nl
    assert proc([nl], row.clone()).argmax() == end
    assert torch.equal(proc([nl, end], row.clone()), row)
    assert proc([], row.clone()).argmax() == nl


def test_thinking_budget_through_the_sampler(r1_tokenizer: Tokenizer) -> None:
    nl = r1_tokenizer.encode("\n", add_special_tokens=False).ids[0]
    end = r1_tokenizer.token_to_id("</think>")
    vocab = r1_tokenizer.get_vocab_size()
    state = SamplingState(4, vocab, torch.device("cpu"))
    for slot in range(3):
        state.set_slot(slot, SamplingParams(temperature=1.0, seed=slot), [])
    sampler = Sampler(state)
    proc = LogitProcessorRegistry().create(BUDGET, {"thinking_budget": 3}, r1_tokenizer)
    history: list[int] = []
    others: list[list[int]] = [[], []]
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        logits = torch.randn(3, vocab, generator=g)
        logits[1, end] = -1e9  # the model itself would never close the reasoning
        apply_logit_processors(logits, [(1, proc, history)])
        ids = sampler.sample(logits, torch.arange(3)).token_ids.tolist()
        history.append(ids[1])
        others[0].append(ids[0])
        others[1].append(ids[2])
    assert history[3:5] == [nl, end] and end not in history[:3]
    assert any(t not in (nl, end) for t in history[5:] + others[0] + others[1])


@pytest.mark.parametrize("step", ["check", "create"])
def test_thinking_budget_params_and_tokenizer_checked(r1_tokenizer: Tokenizer, step: str) -> None:
    # check (the server, building nothing) refuses exactly what create (the worker) refuses
    reg = LogitProcessorRegistry()
    run = getattr(reg, step)
    bad: list[dict[str, Any]] = [{}, {"thinking_budget": -1}, {"thinking_budget": 2.5},
                                 {"thinking_budget": True}, {"thinking_budget": "10"}]
    for params in bad:
        with pytest.raises(ValueError, match="thinking_budget"):
            run(BUDGET, params, r1_tokenizer)
    with pytest.raises(ValueError, match="budget_tokens"):
        run(BUDGET, {"thinking_budget": 3, "budget_tokens": 3}, r1_tokenizer)
    with pytest.raises(ValueError, match="JSON object"):
        run(BUDGET, [3], r1_tokenizer)
    with pytest.raises(ValueError, match="</think>"):
        run(BUDGET, {"thinking_budget": 3}, byte_level_tokenizer(["<think>"]))
    with pytest.raises(ValueError, match="unknown custom_logit_processor 'nope'"):
        run("nope", {}, r1_tokenizer)
    run(BUDGET, {"thinking_budget": 3}, r1_tokenizer)


def test_check_builds_nothing(r1_tokenizer: Tokenizer) -> None:
    built: list[dict[str, Any]] = []

    class Checked:
        def __init__(self, custom_params: dict[str, Any], tokenizer: Tokenizer) -> None:
            built.append(custom_params)

        def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            return logits

        @staticmethod
        def check_params(custom_params: dict[str, Any], tokenizer: Tokenizer) -> None:
            if custom_params.get("k") != 1:
                raise ValueError("k must be 1")

    def unchecked(custom_params: dict[str, Any], tokenizer: Tokenizer) -> LogitProcessor:
        built.append(custom_params)
        return Checked(custom_params, tokenizer)

    reg = LogitProcessorRegistry()
    reg.register("checked", Checked)
    reg.register("unchecked", unchecked)
    reg.check("checked", {"k": 1}, r1_tokenizer)
    with pytest.raises(ValueError, match="k must be 1"):
        reg.check("checked", {"k": 2}, r1_tokenizer)
    reg.check("unchecked", {"anything": True}, r1_tokenizer)  # no check_params: the worker finds out
    assert built == []
    reg.create("checked", {"k": 1}, r1_tokenizer)
    assert built == [{"k": 1}]


def test_registry_names_create_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          r1_tokenizer: Tokenizer) -> None:
    (tmp_path / "my_procs.py").write_text(textwrap.dedent("""
        import torch

        class Ban:
            def __init__(self, custom_params, tokenizer):
                self.token = int(custom_params["token"])
            def __call__(self, output_token_ids, logits):
                logits[self.token] = float("-inf")
                return logits

        def make_nothing(custom_params, tokenizer):
            return 42

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = LogitProcessorRegistry(["ban=my_procs:Ban", "nothing = my_procs:make_nothing"])
    assert reg.names() == sorted([BUDGET, "ban", "nothing"])
    ban: LogitProcessor = reg.create("ban", {"token": 2}, r1_tokenizer)
    logits = torch.zeros(3, 5)
    apply_logit_processors(logits, [(1, ban, [])])
    assert torch.isinf(logits[1, 2]) and torch.isfinite(logits[[0, 2]]).all() and torch.isfinite(logits[1, :2]).all()
    with pytest.raises(ValueError, match="token"):
        reg.create("ban", {}, r1_tokenizer)  # the factory's KeyError becomes a 400
    with pytest.raises(ValueError, match="not callable"):
        reg.create("nothing", None, r1_tokenizer)
    with pytest.raises(ValueError, match="unknown custom_logit_processor 'nope'"):
        reg.create("nope", {}, r1_tokenizer)
    for spec, msg in [("ban", "NAME=module:attr"), ("=my_procs:Ban", "NAME=module:attr"),
                      ("x=my_procs", "NAME=module:attr"), ("x=:Ban", "NAME=module:attr"),
                      ("9x=my_procs:Ban", "name '9x'"), ("x=no_such_module_xyz:Ban", "cannot import"),
                      ("x=my_procs:Missing", "no attribute 'Missing'"), ("x=my_procs:NOT_CALLABLE", "int"),
                      (f"{BUDGET}=my_procs:Ban", "twice")]:
        with pytest.raises(ValueError, match=msg):
            LogitProcessorRegistry([spec])
    with pytest.raises(ValueError, match="twice"):
        LogitProcessorRegistry(["a=my_procs:Ban", "a=my_procs:Ban"])


def test_apply_copies_a_new_row_and_rejects_a_wrong_shape() -> None:
    def fresh(_: list[int], row: torch.Tensor) -> torch.Tensor:
        return torch.full_like(row, 5.0)

    def shrink(_: list[int], row: torch.Tensor) -> torch.Tensor:
        return row[:-1]

    logits = torch.zeros(3, 4)
    apply_logit_processors(logits, [(2, fresh, [])])
    assert logits.sum(1).tolist() == [0.0, 0.0, 20.0]
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        apply_logit_processors(torch.zeros(2, 4), [(0, shrink, [])])
