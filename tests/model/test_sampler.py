"""Sampler and SamplingState: every filter against a float64 reference, distributions, penalties, seeds."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from baleen.messages import SamplingParams
from baleen.model.sampler import Sampler, SamplingState, gumbel_noise, vocab_keys

CPU = torch.device("cpu")


def make(num_slots: int, vocab: int, params: list[SamplingParams], random_seed: int = 0,
         prompt: list[int] | None = None) -> tuple[SamplingState, Sampler, torch.Tensor]:
    state = SamplingState(num_slots, vocab, CPU, random_seed=random_seed)
    for slot, p in enumerate(params):
        state.set_slot(slot, p, prompt or [])
    return state, Sampler(state), torch.arange(len(params))


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def chi_square_limit(dof: int) -> float:
    """Roughly the 99.9% quantile of chi-square(dof) (Wilson-Hilferty)."""
    z = 3.09
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def filtered_probs(logits: np.ndarray, temp: float, top_k: int | None, top_p: float, min_p: float) -> np.ndarray:
    """Float64 reference of the distribution a row samples from: temperature, top-k, top-p, min-p."""
    z = logits.astype(np.float64) / temp
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(len(p), dtype=bool)
    keep[order[: top_k or len(p)]] = True
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    if top_p < 1.0:
        cum_before = np.cumsum(q[order]) - q[order]
        keep[order[cum_before >= top_p]] = False
    keep &= p >= min_p * p.max()
    out = np.where(keep, p, 0.0)
    return out / out.sum()


def test_greedy_equals_argmax_fast_path_and_mixed() -> None:
    vocab = 300
    g = torch.Generator().manual_seed(0)
    greedy = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=1)] * 4
    state, sampler, slots = make(16, vocab, greedy)
    logits = torch.randn(8, vocab, generator=g)
    before = logits.clone()
    out = sampler.sample(logits, slots)
    assert out.token_ids.dtype == torch.int32 and out.logprobs is None and out.top_ids is None
    assert torch.equal(out.token_ids.long(), logits.argmax(-1))
    assert torch.equal(logits, before), "the sampler must not modify its input"
    assert state.num_generated[:8].tolist() == [1] * 8
    # greedy rows keep argmax inside a batch that also samples
    state.set_slot(8, SamplingParams(temperature=1.5, top_p=0.9, seed=5), [])
    logits = torch.randn(9, vocab, generator=g)
    out = sampler.sample(logits, torch.arange(9))
    assert torch.equal(out.token_ids[:8].long(), logits[:8].argmax(-1))
    assert sampler.state.flags([0, 1]).all_greedy and not sampler.state.flags().all_greedy


@pytest.mark.parametrize(
    "temp, top_k, top_p, min_p",
    [(1.0, 5, 1.0, 0.0), (0.8, None, 0.6, 0.0), (1.3, None, 1.0, 0.15), (1.0, 7, 0.7, 0.05)],
)
def test_filters_sample_the_filtered_distribution(temp: float, top_k: int | None, top_p: float,
                                                  min_p: float) -> None:
    vocab, num_draws = 24, 2500
    g = torch.Generator().manual_seed(1)
    row = torch.randn(vocab, generator=g) * 1.5
    if top_p < 1.0:
        # place top_p halfway between two cumulative sums of the reference, far from any rounding edge
        q = filtered_probs(row.numpy(), temp, top_k, 1.0, 0.0)
        cum = np.cumsum(np.sort(q)[::-1])
        i = int(np.searchsorted(cum, top_p))
        top_p = float((cum[i] + cum[i + 1]) / 2)
    ref = filtered_probs(row.numpy(), temp, top_k, top_p, min_p)
    assert 2 <= (ref > 0).sum() < vocab, "the case must exclude some tokens and keep several"
    params = [SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=s)
              for s in range(num_draws)]
    _, sampler, slots = make(num_draws, vocab, params)
    out = sampler.sample(row.expand(num_draws, vocab).contiguous(), slots).token_ids
    counts = np.bincount(out.numpy(), minlength=vocab)
    assert counts[ref == 0].sum() == 0, f"excluded tokens drawn: {np.nonzero(counts * (ref == 0))[0]}"
    dof = int((ref > 0).sum()) - 1
    assert chi_square(counts, ref) < chi_square_limit(dof)


def test_temperature_distribution_across_seeds_and_steps() -> None:
    vocab = 6
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 0.3])
    for temp in (0.5, 2.0):
        ref = torch.softmax(logits.double() / temp, -1).numpy()
        # across requests: 3000 rows of one batch, seeds from the state's own rng
        n = 3000
        _, sampler, slots = make(n, vocab, [SamplingParams(temperature=temp)] * n, random_seed=11)
        across = np.bincount(sampler.sample(logits.expand(n, vocab), slots).token_ids.numpy(), minlength=vocab)
        assert chi_square(across, ref) < chi_square_limit(vocab - 1)
        # across steps: one seeded request drawing 1500 tokens (the noise counter advances)
        _, sampler, slots = make(1, vocab, [SamplingParams(temperature=temp, seed=123)])
        draws = [sampler.sample(logits[None], slots).token_ids for _ in range(1500)]
        along = np.bincount(torch.cat(draws).numpy(), minlength=vocab)
        assert chi_square(along, ref) < chi_square_limit(vocab - 1)
    # a wrong temperature must be told apart: the T=2 counts do not fit T=0.5
    assert chi_square(along, torch.softmax(logits.double() / 0.5, -1).numpy()) > 10 * chi_square_limit(5)


def test_gumbel_noise_is_uniform_and_pure() -> None:
    keys = vocab_keys(4096, CPU)
    noise = gumbel_noise(torch.tensor([7, -3, 2**62]), torch.tensor([0, 5, 1]), keys)
    assert torch.isfinite(noise).all()
    u = torch.exp(-torch.exp(-noise.double()))  # back to uniforms
    hist = torch.histc(u.flatten().float(), bins=16, min=0, max=1).numpy()
    assert chi_square(hist, np.full(16, 1 / 16)) < chi_square_limit(15)
    again = gumbel_noise(torch.tensor([2**62, 7]), torch.tensor([1, 0]), keys)
    assert torch.equal(again, noise[[2, 0]])
    assert not torch.equal(noise[0], gumbel_noise(torch.tensor([7]), torch.tensor([1]), keys)[0])


def test_penalties_match_hand_computed_reference() -> None:
    vocab = 8
    rep, freq, pres = 1.5, 0.4, 0.3
    p = SamplingParams(temperature=0.0, repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
    state = SamplingState(4, vocab, CPU)
    assert state.output_counts is None and state.prompt_mask is None
    state.set_slot(1, SamplingParams(temperature=0.0), [0, 1])
    assert state.output_counts is None, "penalty state must be allocated only when a request uses it"
    state.set_slot(2, p, [1, 2, 2], output_ids=[3, 3, 5])
    assert state.output_counts is not None and state.penalty_bytes == 4 * vocab * 5
    sampler = Sampler(state)
    logits = torch.tensor([[1.0, 2.0, -1.0, 3.0, 0.5, 2.5, -0.5, 0.0]] * 2)
    got = sampler.apply_penalties(logits, torch.tensor([1, 2]))
    want = [1.0, 2.0 / rep, -1.0 * rep, 3.0 / rep - 2 * freq - pres, 0.5, 2.5 / rep - freq - pres, -0.5, 0.0]
    torch.testing.assert_close(got[0], logits[0])  # a slot without penalties is untouched
    torch.testing.assert_close(got[1], torch.tensor(want))
    # sampling updates the output counts on the device, and the next step sees them
    out = sampler.sample(logits, torch.tensor([1, 2]))
    first = int(out.token_ids[1])
    assert first == int(torch.tensor(want).argmax())
    assert state.output_counts[2, first] == (2 if first == 3 else 1 if first == 5 else 0) + 1
    penalised_again = sampler.apply_penalties(logits, torch.tensor([2]))[0]
    assert penalised_again[first] < got[1, first]


def test_seeded_rows_same_alone_in_any_batch_and_after_recompute() -> None:
    vocab, steps = 64, 8

    def logits_for(req: int, step: int) -> torch.Tensor:
        return torch.randn(vocab, generator=torch.Generator().manual_seed(1000 * req + step))

    reqs = {
        0: SamplingParams(temperature=1.0, seed=42),
        1: SamplingParams(temperature=0.7, top_p=0.8, top_k=20, seed=-5),
        2: SamplingParams(temperature=1.2, min_p=0.05, repetition_penalty=1.3, seed=2**70),
    }

    def run(order: list[int], slot_of: dict[int, int], extra: int, num_steps: int, start: int = 0,
            resume: dict[int, list[int]] | None = None, random_seed: int = 0) -> dict[int, list[int]]:
        state = SamplingState(16, vocab, CPU, random_seed=random_seed)
        for r in order:
            state.set_slot(slot_of[r], reqs[r], [1, 2, 3], (resume or {}).get(r, []))
        for e in range(extra):  # unseeded neighbours
            state.set_slot(10 + e, SamplingParams(temperature=1.0, top_k=5), [])
        sampler = Sampler(state)
        got: dict[int, list[int]] = {r: [] for r in order}
        for step in range(start, start + num_steps):
            rows = [logits_for(r, step) for r in order] + [logits_for(99, step)] * extra
            slots = [slot_of[r] for r in order] + [10 + e for e in range(extra)]
            out = sampler.sample(torch.stack(rows), torch.tensor(slots), host_slots=slots)
            for i, r in enumerate(order):
                got[r].append(int(out.token_ids[i]))
        return got

    alone = {r: run([r], {r: 0}, 0, steps)[r] for r in reqs}
    mixed = run([2, 0, 1], {0: 5, 1: 3, 2: 9}, extra=3, num_steps=steps)
    assert mixed == alone
    resumed = run([1, 2, 0], {0: 1, 1: 2, 2: 0}, extra=1, num_steps=steps - 3, start=3,
                  resume={r: alone[r][:3] for r in reqs})
    assert {r: alone[r][:3] + resumed[r] for r in reqs} == alone
    # the test can fail: another seed gives another sequence
    reqs[0] = SamplingParams(temperature=1.0, seed=43)
    assert run([0], {0: 0}, 0, steps)[0] != alone[0]
    # unseeded requests draw their seed from the state's rng (the engine's --random-seed)
    reqs[0] = SamplingParams(temperature=1.0)
    assert run([0], {0: 0}, 0, steps, random_seed=3) == run([0], {0: 4}, 0, steps, random_seed=3)


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    vocab = 50
    params = [
        SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3),
        SamplingParams(temperature=0.5, top_k=10, repetition_penalty=1.5, logprobs=True, seed=1),
        SamplingParams(temperature=1.0, top_logprobs=5, seed=2),
        SamplingParams(temperature=2.0, seed=3),
    ]
    _, sampler, slots = make(4, vocab, params, prompt=list(range(20)))
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(3)) * 3

    def force_token_7(_: list[int], row: torch.Tensor) -> torch.Tensor:
        return row.fill_(float("-inf")).index_fill_(0, torch.tensor([7]), 0.0)

    before = logits.clone()
    out = sampler.sample(logits, slots, processors=[(3, force_token_7, [])])
    assert torch.equal(logits, before), "processors run on a copy: the raw logits stay for the logprobs"
    ref = torch.log_softmax(before.double(), -1)
    assert out.logprobs is not None and out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids.shape == (4, 5) and out.top_ids.dtype == torch.int32
    assert int(out.token_ids[3]) == 7, "the processor decides the token"
    tok = out.token_ids.long()
    torch.testing.assert_close(out.logprobs.double(), ref.gather(1, tok[:, None])[:, 0], atol=1e-5, rtol=0)
    top = ref.topk(5, -1)
    assert torch.equal(out.top_ids.long(), top.indices)
    torch.testing.assert_close(out.top_logprobs.double(), top.values, atol=1e-5, rtol=0)
    # no row asks: nothing computed
    _, sampler, slots = make(2, vocab, [SamplingParams(temperature=1.0, seed=1)] * 2)
    quiet = sampler.sample(logits[:2], slots)
    assert quiet.logprobs is None and quiet.top_ids is None


@contextmanager
def forbid_host_sync(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    calls: list[str] = []

    def trap(name: str) -> Callable[..., object]:
        def f(*args: object, **kwargs: object) -> object:
            calls.append(name)
            raise AssertionError(f"host sync: Tensor.{name}")
        return f

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
            m.setattr(torch.Tensor, name, trap(name))
        yield calls


def test_sampling_makes_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = 40
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, top_k=4, seed=1, logprobs=True, top_logprobs=2),
        SamplingParams(temperature=1.1, top_p=0.5, min_p=0.1, seed=2),
        SamplingParams(temperature=0.6, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5),
    ]
    _, sampler, slots = make(4, vocab, params, prompt=[1, 2, 3])
    logits = torch.randn(4, vocab)
    with forbid_host_sync(monkeypatch) as calls:
        for host in (None, [0, 1, 2, 3]):
            sampler.sample(logits, slots, host_slots=host)
        sampler.sample(logits[:1], slots[:1], host_slots=[0])  # the all-greedy fast path
    assert calls == []
    with forbid_host_sync(monkeypatch), pytest.raises(AssertionError, match="host sync"):
        bool(logits.sum() > 0)  # the trap itself works


@pytest.mark.gpu
def test_no_sync_on_cuda() -> None:
    device = torch.device("cuda")
    state = SamplingState(8, 1000, device)
    state.set_slot(0, SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.02, logprobs=True,
                                     top_logprobs=4, repetition_penalty=1.1, frequency_penalty=0.2), [1, 2])
    state.set_slot(1, SamplingParams(temperature=0.0), [3])
    sampler = Sampler(state)
    logits, slots = torch.randn(2, 1000, device=device), torch.tensor([0, 1], device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler.sample(logits, slots)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bad_input_raises_value_error() -> None:
    state = SamplingState(2, 10, CPU)
    with pytest.raises(ValueError, match="slot 2"):
        state.set_slot(2, SamplingParams(), [])
    with pytest.raises(ValueError, match="prompt_ids"):
        state.set_slot(0, SamplingParams(repetition_penalty=1.1), [3, 10])
    with pytest.raises(ValueError, match="top_p"):
        state.set_slot(0, SamplingParams(top_p=0.0), [])
    state.set_slot(0, SamplingParams(), np.array([1, 2], dtype=np.int32).tobytes())
    sampler = Sampler(state)
    with pytest.raises(ValueError, match="logits"):
        sampler.sample(torch.zeros(1, 11), torch.tensor([0]))
    with pytest.raises(ValueError, match="slot 1"):
        sampler.sample(torch.zeros(1, 10), torch.tensor([1]), host_slots=[1])
    state.clear_slot(0)
    state.clear_slot(0)  # idempotent
    assert state.flags().all_greedy and state.flags().top_logprobs == 0


def test_min_new_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    vocab, eos, stop = 12, 1, 7
    state = SamplingState(2, vocab, "cpu", random_seed=0, eos_token_ids=(eos,))
    sampler = Sampler(state)
    state.set_slot(0, SamplingParams(temperature=0.0, min_new_tokens=3, stop_token_ids=[stop]), [2, 3])
    state.set_slot(1, SamplingParams(temperature=0.0), [2, 3])  # no minimum: EOS allowed at once
    logits = torch.zeros(2, vocab)
    logits[:, eos] = 5.0
    logits[:, stop] = 4.0
    logits[:, 4] = 1.0
    slots = torch.tensor([0, 1])
    picks = [sampler.sample(logits, slots).token_ids.tolist() for _ in range(4)]
    assert [p[0] for p in picks] == [4, 4, 4, eos]  # masked for the first 3 tokens, then EOS wins again
    assert [p[1] for p in picks] == [eos] * 4
    assert logits[0, eos] == 5.0  # the caller's logits are untouched


def test_logit_bias_shifts_only_its_rows_tokens_and_keeps_raw_logprobs() -> None:
    """+100 forces a token, -100 bans the best one, a small bias tips a near tie; unbiased rows and the logprobs (the
    model's raw ones) are untouched; a sampled row draws from the biased distribution; a slot's next request starts
    without its bias; the batch flag is set only when a row of the batch has one."""
    vocab = 16
    logits = torch.zeros(4, vocab)
    logits[:, 3] = 6.0
    logits[:, 9] = 5.9
    params = [SamplingParams(temperature=0.0, logit_bias={12: 100.0}), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, logit_bias={3: -100.0}, logprobs=True),
              SamplingParams(temperature=0.0, logit_bias={9: 0.5, 0: -1.0})]  # fmt: skip
    state, sampler, slots = make(4, vocab, params)
    out = sampler.sample(logits, slots)
    assert out.token_ids.tolist() == [12, 3, 9, 9]
    assert out.logprobs is not None and out.logprobs[2] == pytest.approx(torch.log_softmax(logits[2], -1)[9].item())
    assert state.flags([1]).plain_greedy and not state.flags([0, 1]).plain_greedy
    state.set_slot(0, SamplingParams(temperature=0.0), [])  # the slot's next request
    assert sampler.sample(logits[:1], slots[:1]).token_ids.tolist() == [3]
    draws = [SamplingParams(temperature=1.0, seed=s, logit_bias={3: -100.0, 9: -100.0}) for s in range(200)]
    state, sampler, slots = make(200, vocab, draws)
    picks = sampler.sample(torch.zeros(200, vocab) + logits[0], slots).token_ids
    assert not ((picks == 3) | (picks == 9)).any() and len(set(picks.tolist())) > 8  # the rest, near uniform
    with pytest.raises(ValueError, match="logit_bias values"):
        SamplingParams(logit_bias={1: 200.0}).check()
    with pytest.raises(ValueError, match="outside"):
        make(1, vocab, [SamplingParams(logit_bias={vocab: 1.0})])


def test_a_slots_next_request_does_not_inherit_min_new_tokens() -> None:
    """Slot 0's earlier request had min_new_tokens; its next one has none, and shares a batch with a request that
    does (so the batch runs the min_tokens mask): it may stop at once."""
    vocab, eos = 12, 1
    state = SamplingState(2, vocab, "cpu", random_seed=0, eos_token_ids=(eos,))
    sampler = Sampler(state)
    state.set_slot(0, SamplingParams(temperature=0.0, min_new_tokens=8), [2, 3])
    state.clear_slot(0)
    state.set_slot(0, SamplingParams(temperature=0.0), [2, 3])
    state.set_slot(1, SamplingParams(temperature=0.0, min_new_tokens=8), [2, 3])
    logits = torch.zeros(2, vocab)
    logits[:, eos] = 5.0
    logits[:, 4] = 1.0
    assert sampler.sample(logits, torch.tensor([0, 1])).token_ids.tolist() == [eos, 4]


def test_min_new_tokens_yields_to_a_grammar_that_allows_only_a_stop_token() -> None:
    """A complete grammar (only EOS allowed) under min_new_tokens: EOS, not the -inf row's argmax (token 0)."""
    from baleen.model.sampler import TokenMask

    vocab, eos = 40, 33
    state = SamplingState(2, vocab, "cpu", random_seed=0, eos_token_ids=(eos,))
    sampler = Sampler(state)
    for slot in (0, 1):
        state.set_slot(slot, SamplingParams(temperature=0.0 if slot == 0 else 0.7, min_new_tokens=5), [2, 3])
    bitmask = torch.zeros(2, 2, dtype=torch.int32)
    bitmask[:, 1] = 1 << (eos - 32)  # only EOS in both rows
    mask = TokenMask(bitmask, torch.tensor([0, 1]))
    logits = torch.randn(2, vocab)
    assert sampler.sample(logits, torch.tensor([0, 1]), mask=mask).token_ids.tolist() == [eos, eos]
    bitmask[:, 0] = 1 << 4  # token 4 allowed too: min_new_tokens holds EOS back again
    assert sampler.sample(logits, torch.tensor([0, 1]), mask=mask).token_ids.tolist() == [4, 4]


def test_a_processor_forcing_what_the_grammar_forbids_yields_to_the_grammar() -> None:
    """Row 0's processor forces token 7, which its grammar forbids: the grammar's mask alone picks (not token 0 of an
    all -inf row, which the grammar then rejects). Row 1's processor forces an allowed token: it keeps it."""
    from baleen.model.sampler import TokenMask

    vocab = 40
    state = SamplingState(2, vocab, "cpu", random_seed=0)
    sampler = Sampler(state)
    for slot in (0, 1):
        state.set_slot(slot, SamplingParams(temperature=0.0), [2, 3])
    logits = torch.zeros(2, vocab)
    logits[:, 9], logits[:, 5] = 2.0, 1.0

    def force(token: int) -> Any:
        return lambda _, row: row.fill_(float("-inf")).index_fill_(0, torch.tensor([token]), 0.0)

    bitmask = torch.zeros(2, 2, dtype=torch.int32)
    bitmask[:, 0] = (1 << 5) | (1 << 9)  # the grammar allows 5 and 9
    mask = TokenMask(bitmask, torch.tensor([0, 1]))
    out = sampler.sample(logits, torch.tensor([0, 1]), processors=[(0, force(7), []), (1, force(5), [])], mask=mask)
    assert out.token_ids.tolist() == [9, 5]


def test_row_argmax_two_stage_equals_argmax_with_ties() -> None:
    from baleen.model.sampler import row_argmax

    torch.manual_seed(0)
    x = torch.randn(4, 129280)
    x[1, 5000] = x[1, 90000] = 50.0  # a tie across chunks: the lower index wins, as in torch.argmax
    x[2, 700] = x[2, 701] = 60.0  # a tie inside one chunk
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    assert row_argmax(x)[1] == 5000 and row_argmax(x)[2] == 700
    small = torch.randn(3, 1000)  # narrow rows take torch's one-pass argmax
    assert torch.equal(row_argmax(small), small.argmax(dim=-1))


def test_greedy_tail_matches_sample_and_skips_scratch_rows() -> None:
    """The graph-capturable greedy pick: same tokens and counters as `sample`, scratch rows keep nothing."""
    state, sampler, _ = make(4, 300, [SamplingParams(temperature=0.0)] * 4)
    twin_state, twin, _ = make(4, 300, [SamplingParams(temperature=0.0)] * 4)
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(3))
    slot_tokens = torch.full((5,), -7, dtype=torch.int64)  # 4 slots + the scratch slot 4
    write = torch.tensor([2, 4, 0])  # row 1 keeps nothing (a padding row)
    tokens = sampler.greedy_tail(logits, write, slot_tokens)
    want = twin.sample(logits[[0, 2]], torch.tensor([2, 0])).token_ids
    assert tokens.dtype == torch.int32 and torch.equal(tokens, logits.argmax(-1).to(torch.int32))
    assert torch.equal(tokens[[0, 2]], want)
    assert slot_tokens.tolist() == [int(tokens[2]), -7, int(tokens[0]), -7, int(tokens[1])]
    assert torch.equal(state.num_generated, twin_state.num_generated)
    assert state.num_generated.tolist() == [1, 0, 1, 0]


def test_batch_flags_o1_while_all_greedy_exact_for_the_rows() -> None:
    # The runner asks the flags once a step: O(1) from the running tally while no occupied slot asks for anything
    # (no per-slot lookups), else exact for the batch's rows (a sampling slot outside the batch changes nothing).
    from types import SimpleNamespace

    from baleen.model.runner import ModelRunner

    class CountingList(list):  # type: ignore[type-arg]
        reads = 0

        def __getitem__(self, i: Any) -> Any:
            CountingList.reads += 1
            return super().__getitem__(i)

    state, sampler, _ = make(8, 50, [SamplingParams(temperature=0.0)] * 3)
    state._info = CountingList(state._info)
    flags = state.flags([0, 2])
    assert CountingList.reads == 0 and flags == state.flags() and flags.plain_greedy
    state.set_slot(5, SamplingParams(temperature=0.9, top_k=7, logprobs=True), [])
    before = CountingList.reads
    flags = state.flags([0, 2])
    assert CountingList.reads - before == 2 and flags.plain_greedy and not state.flags().all_greedy
    flags = state.flags([0, 5])
    assert not flags.all_greedy and flags.max_top_k == 7 and flags.logprobs and not flags.plain_greedy
    runner = SimpleNamespace(slot_procs={2: object()})  # a logit processor keeps slot 2 off the greedy tail
    assert ModelRunner._plain_greedy(runner, [0], state.flags([0]))  # type: ignore[arg-type]
    assert not ModelRunner._plain_greedy(runner, [0, 2], state.flags([0, 2]))  # type: ignore[arg-type]
    # The sampler takes the caller's flags as they are: all-greedy flags make even the sampling row an argmax.
    logits = torch.randn(2, 50)
    out = sampler.sample(logits, torch.tensor([0, 5]), host_slots=[0, 5], flags=state.flags([0, 2]))
    assert torch.equal(out.token_ids.long(), logits.argmax(-1)) and out.logprobs is None
