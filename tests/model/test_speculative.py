"""Speculative decoding on the runner (model/speculative.py): the MTP drafter's verify steps commit exactly the
tokens plain decoding draws (greedy and seeded sampling), and the acceptance rule keeps the target's distribution.

The scheduler's side (verify rows, stops inside an accepted run, page accounting) is tested in
tests/actors/test_policy_speculative.py; the engine end to end in tests/actors/test_engine_speculative.py.
"""

from __future__ import annotations

import random
from array import array
from typing import Any

import numpy as np
import pytest
import torch

from baleen.messages import PREFIX_ON_DEVICE, PageUpdate, SamplingParams, SeqRow, SlotInit, StepPlan
from baleen.model.build import WorkerConfig, build_runner
from baleen.model.make_model import tiny_model_path
from baleen.model.runner import ModelRunner
from baleen.model.sampler import Sampler, SamplingState
from baleen.model.speculative import accept, verify_layout

PAGE = 16
PAGES_PER_SLOT = 8  # 128 tokens a request


def _runner(num_steps: int) -> ModelRunner:
    return build_runner(WorkerConfig(model_path=str(tiny_model_path()), page_size=PAGE, max_running_requests=4,
                                     max_context_len=PAGES_PER_SLOT * PAGE, speculative_num_steps=num_steps))  # fmt: skip


def _decode(runner: ModelRunner, prompts: list[list[int]], params: list[SamplingParams], num_new: int,
            num_drafts: int, device_prefix: bool = False) -> tuple[list[list[int]], list[int]]:  # fmt: skip
    """Prefill every prompt, then decode until each has num_new tokens: verify rows of up to num_drafts drafts
    (0: plain decode rows; with `device_prefix` a verify row's prefix is PREFIX_ON_DEVICE, as the scheduler plans
    one behind another in flight). Returns the tokens and, per step, the tokens committed."""
    n = len(prompts)
    inits = [SlotInit(s, f"r{s}", params[s], array("i", p).tobytes()) for s, p in enumerate(prompts)]
    pages = [PageUpdate(s, 0, array("i", range(1 + s * PAGES_PER_SLOT, 1 + (s + 1) * PAGES_PER_SLOT)).tobytes())
             for s in range(n)]  # fmt: skip
    rows = [SeqRow(s, 0, len(p), array("i", p).tobytes(), True) for s, p in enumerate(prompts)]
    out: list[list[int]] = [[] for _ in range(n)]
    per_step: list[int] = []
    plan = StepPlan(step_id=0, rows=rows, new_slots=inits, page_updates=pages)
    step = 0
    while True:
        res = runner.finish(runner.launch(plan))
        ids = np.frombuffer(res.token_ids, dtype=np.int32).tolist()
        counts = np.frombuffer(res.num_tokens, dtype=np.int32).tolist() if res.num_tokens else [1] * len(plan.rows)
        at = 0
        for r, c in zip(plan.rows, counts):
            out[r.slot].extend(ids[at : at + c])
            at += c
            if step:
                per_step.append(c)
        step += 1
        live = [s for s in range(n) if len(out[s]) < num_new]
        if not live:
            return [o[:num_new] for o in out], per_step
        rows = []
        for s in live:
            kv = len(prompts[s]) + len(out[s]) - 1  # the last token is not cached yet
            k = min(num_drafts, num_new - len(out[s]) - 1)
            rows.append(SeqRow(s, PREFIX_ON_DEVICE if device_prefix and k else kv, 1 + k, b"", True))
        plan = StepPlan(step_id=step, rows=rows)


PROMPTS = [[5, 9, 33, 41, 7, 12, 99, 3], [17, 4, 250, 8, 8, 61], [300, 12, 77, 2, 19, 200, 31, 45, 90, 6, 13]]


@pytest.mark.parametrize("num_steps", [1, 3])
def test_greedy_verify_steps_commit_what_plain_decoding_does(num_steps: int) -> None:
    params = [SamplingParams(temperature=0.0, max_new_tokens=24)] * len(PROMPTS)
    want, _ = _decode(_runner(0), PROMPTS, params, 24, 0)
    got, per_step = _decode(_runner(num_steps), PROMPTS, params, 24, num_steps)
    assert got == want
    assert max(per_step) <= num_steps + 1 and min(per_step) >= 1
    assert len(per_step) >= 1


def test_seeded_sampling_under_speculation_draws_the_same_tokens() -> None:
    """Temperature, top-k/top-p/min-p, penalties and min_new_tokens, seeded: token for token the plain draws."""
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=20),
        SamplingParams(temperature=0.8, top_k=20, min_p=0.05, frequency_penalty=0.5, presence_penalty=0.3,
                       repetition_penalty=1.2, seed=11, max_new_tokens=20),
        SamplingParams(temperature=1.3, seed=3, min_new_tokens=10, max_new_tokens=20),
    ]
    want, _ = _decode(_runner(0), PROMPTS, params, 20, 0)
    got, _ = _decode(_runner(3), PROMPTS, params, 20, 3)
    assert got == want


def test_a_verify_row_reads_its_prefix_from_the_last_commit_on_the_device() -> None:
    """Rows with PREFIX_ON_DEVICE (overlap scheduling) start where the slot's last step committed to: greedy and
    seeded sampling draw the plain tokens, and the drafter's lengths are the committed ones."""
    from tokenizers import Tokenizer

    from baleen.model.make_model import default_model_path

    path = default_model_path()  # trained: its drafts are often accepted, so lengths move by several tokens
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    prompts = [tok.encode(t).ids for t in ("The capital of France is", "To be, or not to be", "What is 27 + 58?")]
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=5, top_k=30),
              SamplingParams(temperature=0.7, seed=9, frequency_penalty=0.4)]  # fmt: skip

    def runner(num_steps: int) -> ModelRunner:
        return build_runner(WorkerConfig(model_path=str(path), page_size=PAGE, max_running_requests=4,
                                         max_context_len=PAGES_PER_SLOT * PAGE, speculative_num_steps=num_steps))

    want, _ = _decode(runner(0), prompts, params, 20, 0)
    spec = runner(3)
    got, per_step = _decode(spec, prompts, params, 20, 3, device_prefix=True)
    assert got == want and max(per_step) > 1  # drafts were accepted: the lengths moved by more than one
    assert spec.drafter is not None
    # the last step commits each row's 20th token; its latent is not cached yet
    assert spec.drafter.lens[:3].tolist() == [len(p) + 20 - 1 for p in prompts]


def test_verify_rows_mix_with_prefill_and_plain_rows() -> None:
    """One step holds a prefill chunk, a verify row and a draft-free decode row: each gets its plain tokens."""
    params = [SamplingParams(temperature=0.0, max_new_tokens=16)] * 3
    want, _ = _decode(_runner(0), PROMPTS, params, 16, 0)
    runner = _runner(2)
    first, _ = _decode(runner, PROMPTS[:2], params[:2], 4, 2)  # slots 0, 1 decoding
    assert first == [w[:4] for w in want[:2]]
    p = PROMPTS[2]
    init = SlotInit(2, "r2", params[2], array("i", p).tobytes())
    pages = PageUpdate(2, 0, array("i", range(1 + 2 * PAGES_PER_SLOT, 1 + 3 * PAGES_PER_SLOT)).tobytes())
    rows = [SeqRow(2, 0, len(p), array("i", p).tobytes(), True),
            SeqRow(0, len(PROMPTS[0]) + 3, 3, b"", True), SeqRow(1, len(PROMPTS[1]) + 3, 1, b"", True)]  # fmt: skip
    res = runner.finish(runner.launch(StepPlan(step_id=99, rows=rows, new_slots=[init], page_updates=[pages])))
    counts = np.frombuffer(res.num_tokens, dtype=np.int32).tolist()
    ids = np.frombuffer(res.token_ids, dtype=np.int32).tolist()
    assert counts[0] == 1 and counts[2] == 1 and 1 <= counts[1] <= 3
    assert ids[0] == want[2][0]
    assert ids[1 : 1 + counts[1]] == want[0][4 : 4 + counts[1]]
    assert ids[-1] == want[1][4]


def test_accept_keeps_rows_up_to_the_first_mismatch() -> None:
    """Three sampled rows: a verify row of 3 drafts (two accepted), a plain row, a verify row of 1 (rejected)."""
    drafts = torch.tensor([[10, 11, 12], [0, 0, 0], [20, 0, 0], [0, 0, 0]])  # slot -> d1 .. d3
    plan = StepPlan(step_id=0, rows=[SeqRow(0, 5, 4, b"", True), SeqRow(1, 3, 1, b"", True),
                                     SeqRow(2, 7, 2, b"", True)])  # fmt: skip
    layout = verify_layout(plan, drafts, torch.device("cpu"))
    assert layout.starts.tolist() == [0, 4, 5] and layout.counts.tolist() == [4, 1, 2]
    assert layout.next_draft.tolist() == [10, 11, 12, -1, -1, 20, -1]
    assert layout.ahead.count.tolist() == [0, 1, 2, 3, 0, 0, 1]
    samples = torch.tensor([10, 11, 5, 6, 42, 21, 9])  # row 2 misses d3 = 12; slot 2's row 0 misses d1 = 20
    keep, num_tokens, last = accept(samples, layout)
    assert keep.tolist() == [True, True, True, False, True, True, False]
    assert num_tokens.tolist() == [3, 1, 1] and last.tolist() == [2, 4, 5]


def test_acceptance_keeps_the_target_distribution() -> None:
    """Chi-square over many seeds on an 8-token vocabulary: the first committed token follows the target's p1,
    and the second (drawn only after the draft d1 was accepted) follows p2; each as plain sampling would."""
    vocab, n = 8, 4000
    gen = torch.Generator().manual_seed(0)
    l1, l2 = torch.randn(vocab, generator=gen), torch.randn(vocab, generator=gen)
    d1 = int(l1.argmax())  # a good draft: accepted often
    state = SamplingState(n, vocab, "cpu")
    for s in range(n):
        state.set_slot(s, SamplingParams(temperature=1.0, seed=s), [1, 2], [])
    sampler = Sampler(state)
    drafts = torch.full((n + 1, 1), d1, dtype=torch.int64)
    plan = StepPlan(step_id=0, rows=[SeqRow(s, 2, 2, b"", True) for s in range(n)])
    layout = verify_layout(plan, drafts, torch.device("cpu"))
    logits = torch.stack([l1, l2]).repeat(n, 1)  # row 0: p1, row 1: p2 (the context after d1)
    slots = torch.arange(n).repeat_interleave(2)
    tokens = sampler.sample(logits, slots, ahead=layout.ahead).token_ids
    _, num_tokens, _ = accept(tokens, layout)
    pairs = tokens.view(n, 2)
    first = torch.bincount(pairs[:, 0], minlength=vocab).double()
    accepted = pairs[:, 0] == d1
    second = torch.bincount(pairs[accepted, 1], minlength=vocab).double()
    assert (num_tokens == 1 + accepted.long()).all()
    for counts, logits_row in ((first, l1), (second, l2)):
        expected = logits_row.double().softmax(0) * counts.sum()
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 24.3, (chi2, counts.tolist(), expected.tolist())  # 7 degrees of freedom, p = 0.001
    # the noise of row 1 is that of the token after d1: with d1 kept, plain sampling draws the same token
    plain = SamplingState(n, vocab, "cpu")
    for s in range(n):
        plain.set_slot(s, SamplingParams(temperature=1.0, seed=s), [1, 2], [d1])
    again = Sampler(plain).sample(l2.repeat(n, 1), torch.arange(n)).token_ids
    assert torch.equal(again[accepted], pairs[accepted, 1])


def test_record_counts_only_the_committed_tokens() -> None:
    state = SamplingState(2, 16, "cpu")
    state.set_slot(0, SamplingParams(temperature=1.0, frequency_penalty=1.0, seed=1), [3], [])
    sampler = Sampler(state)
    slots = torch.tensor([0, 0, 0])
    sampler.record(slots, torch.tensor([4, 5, 6]), True, torch.tensor([True, True, False]))
    assert int(state.num_generated[0]) == 2
    assert state.output_counts is not None
    assert state.output_counts[0, 4] == 1 and state.output_counts[0, 5] == 1 and state.output_counts[0, 6] == 0


def test_a_runner_without_drafter_refuses_verify_rows() -> None:
    runner = _runner(0)
    rng = random.Random(0)
    p = [rng.randrange(10, 200) for _ in range(5)]
    init = SlotInit(0, "r", SamplingParams(temperature=0.0), array("i", p).tobytes())
    pages = PageUpdate(0, 0, array("i", range(1, 1 + PAGES_PER_SLOT)).tobytes())
    runner.finish(runner.launch(StepPlan(step_id=0, rows=[SeqRow(0, 0, 5, array("i", p).tobytes(), True)],
                                         new_slots=[init], page_updates=[pages])))  # fmt: skip
    with pytest.raises(ValueError, match="verify row of 2 drafts"):
        runner.launch(StepPlan(step_id=1, rows=[SeqRow(0, 5, 3, b"", True)]))


def test_a_grammar_verify_step_fills_each_mask_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A speculative step of grammar requests with k drafts each: the draft loop fills the masks of d1 .. dk, the
    verify rows take them and xgrammar fills only the row after the last draft, k + 1 fills a request (2k + 1 when
    the verify rows walked the drafts again)."""
    import xgrammar as xgr

    from baleen.messages import GrammarSpec

    k, n = 3, 2
    runner = _runner(k)
    grammar = GrammarSpec("regex", r"[a-f0-9]{40}")  # no matcher ends within these steps: every fill is xgrammar's
    params = SamplingParams(temperature=1.0, seed=5, grammar=grammar)
    rows_filled = [0]
    one, batch = xgr.GrammarMatcher.fill_next_token_bitmask, xgr.BatchGrammarMatcher.batch_fill_next_token_bitmask

    def fill_one(self: xgr.GrammarMatcher, *args: Any, **kw: Any) -> Any:
        rows_filled[0] += 1
        return one(self, *args, **kw)

    def fill_batch(self: xgr.BatchGrammarMatcher, matchers: list[Any], *args: Any, **kw: Any) -> Any:
        rows_filled[0] += len(matchers)
        return batch(self, matchers, *args, **kw)

    monkeypatch.setattr(xgr.GrammarMatcher, "fill_next_token_bitmask", fill_one)
    monkeypatch.setattr(xgr.BatchGrammarMatcher, "batch_fill_next_token_bitmask", fill_batch)
    inits = [SlotInit(s, f"r{s}", params, array("i", PROMPTS[s]).tobytes()) for s in range(n)]
    pages = [PageUpdate(s, 0, array("i", range(1 + s * PAGES_PER_SLOT, 1 + (s + 1) * PAGES_PER_SLOT)).tobytes())
             for s in range(n)]  # fmt: skip
    rows = [SeqRow(s, 0, len(PROMPTS[s]), array("i", PROMPTS[s]).tobytes(), True) for s in range(n)]
    runner.finish(runner.launch(StepPlan(step_id=0, rows=rows, new_slots=inits, page_updates=pages)))
    assert rows_filled[0] == n  # the prefill: one row a request
    kv = [len(PROMPTS[s]) for s in range(n)]  # the first sample is not cached yet
    for step in (1, 2):
        rows_filled[0] = 0
        res = runner.finish(runner.launch(StepPlan(step_id=step, rows=[SeqRow(s, kv[s], 1 + k, b"", True)
                                                                       for s in range(n)])))  # fmt: skip
        assert rows_filled[0] == n * (k + 1), step
        kv = [c + m for c, m in zip(kv, np.frombuffer(res.num_tokens, dtype=np.int32).tolist())]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_greedy_verify_on_cuda_equals_plain_decoding(backend: str) -> None:
    """On the GPU (the trained default model, whose logits are peaked enough that kernel rounding never flips an
    argmax here): verify rows through the backend's extend path commit the plain greedy tokens."""
    from tokenizers import Tokenizer

    from baleen.model.make_model import default_model_path

    path = default_model_path()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    prompts = [tok.encode(t).ids for t in ("The capital of France is", "To be, or not to be, that is")]

    def runner(k: int) -> ModelRunner:
        return build_runner(WorkerConfig(model_path=str(path), device="cuda", dtype="bfloat16", page_size=PAGE,
                                         attention_backend=backend, max_running_requests=4, disable_cuda_graph=True,
                                         max_context_len=PAGES_PER_SLOT * PAGE, speculative_num_steps=k))  # fmt: skip

    params = [SamplingParams(temperature=0.0, max_new_tokens=32)] * 2
    want, _ = _decode(runner(0), prompts, params, 32, 0)
    got, per_step = _decode(runner(3), prompts, params, 32, 3)
    assert got == want
    assert sum(per_step) / len(per_step) > 1.2  # the trained MTP layer's drafts are accepted often


def test_a_draft_checkpoint_of_other_shapes_is_refused_naming_the_flag() -> None:
    from baleen.model.make_model import default_model_path

    with pytest.raises(ValueError, match=r"the draft model at .* does not fit the target: hidden_size 256 \(target "
                                         r"128\), vocab_size 4096 \(target 1024\)"):  # fmt: skip
        build_runner(WorkerConfig(model_path=str(tiny_model_path()), page_size=PAGE, max_running_requests=2,
                                  max_context_len=128, speculative_num_steps=2,
                                  speculative_draft_model_path=str(default_model_path())))  # fmt: skip


def test_rotary_caches_are_reserved_for_the_page_table_and_never_move_after() -> None:
    """Captured graphs read the rotary caches' storage (the draft loop the MTP layer's, verify the model's): the
    runner builds both for every position a slot can hold before capturing, and a cache then refuses to grow
    instead of freeing that storage under the graphs (on the H100 a draft graph captured before the draft-extend
    grew the MTP cache read freed memory: an illegal address)."""
    runner = _runner(2)
    assert runner.drafter is not None
    caches = (runner.model.rotary, runner.drafter.mtp.rotary)
    runner._reserve_rotary()
    capacity = PAGES_PER_SLOT * PAGE
    stored = [c._cos_sin for c in caches]
    for cache, before in zip(caches, stored):
        assert before is not None and before.shape[0] >= capacity + 1
        positions = torch.tensor([0, 5, capacity], dtype=torch.int64)
        got = cache.cos_sin(positions, capacity)
        fresh = type(cache)(cache.dim, cache.max_position_embeddings, runner.model.config.rope)
        assert torch.equal(got, fresh.cos_sin(positions, capacity))
        assert cache._cos_sin is before  # the same storage
        with pytest.raises(RuntimeError, match="may not grow once CUDA graphs read it"):
            cache.cos_sin(positions, before.shape[0] + 1)
    # Steps after it run as before: a speculative decode over the reserved caches
    tokens, _ = _decode(runner, [[5, 6, 7]], [SamplingParams(max_new_tokens=8, temperature=0.0)], 8, 2)
    assert len(tokens[0]) == 8 and all(c._cos_sin is s for c, s in zip(caches, stored))
