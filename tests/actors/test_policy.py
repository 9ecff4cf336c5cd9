"""Scheduler: continuous batching against a fake worker whose output depends on every page it reads."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest
from fake_worker import (
    Outcome,
    check_cache_contents,
    check_idle,
    check_invariants,
    drive,
    fake_logprob,
    i32,
    make_worker,
    new_request,
    reference_tokens,
)

from baleen.actors.admission import AdmissionError
from baleen.actors.policy import Scheduler
from baleen.actors.policy_state import SchedulerConfig
from baleen.messages import NewRequest, SamplingParams, StepPlan

BOTH = pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])


def make(**kw: Any) -> Scheduler:
    cfg: dict[str, Any] = dict(
        page_size=4, num_pages=64, max_running_requests=8, max_context_len=256, chunked_prefill_size=32
    )
    cfg.update(kw)
    return Scheduler(SchedulerConfig(**cfg))


def expected(
    prompt: Sequence[int], sp: SamplingParams, eos: Sequence[int] = (), max_len: int = 256
) -> tuple[list[int], str, int | None]:
    """Tokens, finish reason and matched stop a request must end with (stop rules applied to the reference)."""
    max_new = sp.max_new_tokens if sp.max_new_tokens is not None else max_len - len(prompt)
    ref = reference_tokens(prompt, max_new)
    stops = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(eos))
    for i, t in enumerate(ref):
        if i + 1 > sp.min_new_tokens and t in stops:
            return ref[: i + 1], "stop", t
    return ref, "length", None


def checked(sched: Scheduler, plan: StepPlan | None) -> None:
    check_invariants(sched)


def run(sched: Scheduler, reqs: dict[int, list[Any]], overlap: bool, **kw: Any) -> Outcome:
    worker = make_worker(sched)

    def on_step(s: Scheduler, plan: StepPlan | None) -> None:
        check_invariants(s)
        check_cache_contents(s, worker)

    out = drive(sched, worker, reqs, overlap, on_step=kw.pop("on_step", on_step), **kw)
    check_idle(sched)
    return out


def random_prompts(rng: random.Random, num: int, bases: int = 3) -> list[list[int]]:
    base = [[rng.randrange(50) for _ in range(rng.randint(4, 30))] for _ in range(bases)]
    return [rng.choice(base)[: rng.randint(0, 30)] + [rng.randrange(50) for _ in range(rng.randint(1, 30))] for _ in range(num)]


@BOTH
@pytest.mark.parametrize("radix", [True, False], ids=["radix", "noradix"])
def test_concurrent_outputs_equal_each_request_alone(overlap: bool, radix: bool) -> None:
    rng = random.Random(7)
    prompts = random_prompts(rng, 14)
    reqs = [new_request(f"r{i}", p, max_new_tokens=rng.randint(1, 20)) for i, p in enumerate(prompts)]
    arrivals: dict[int, list[Any]] = {}
    for r in reqs:
        arrivals.setdefault(rng.randint(0, 12), []).append(r)
    out = run(make(enable_radix_cache=radix), arrivals, overlap)
    for r, prompt in zip(reqs, prompts):
        assert r.sampling.max_new_tokens is not None
        assert out.tokens(r.rid) == reference_tokens(prompt, r.sampling.max_new_tokens), r.rid
        final = out.final(r.rid)
        assert (final.finish_reason, final.prompt_tokens, final.completion_tokens) == (
            "length", len(prompt), r.sampling.max_new_tokens)
    for r in reqs[:3]:  # and literally alone, through a fresh scheduler
        alone = run(make(enable_radix_cache=radix), {0: [r]}, overlap)
        assert alone.tokens(r.rid) == out.tokens(r.rid)
    if overlap:
        assert out.num_steps < sum(r.sampling.max_new_tokens or 0 for r in reqs)  # batched, not serial


def _run_beside_decode(mixed: bool, overlap: bool, chunk: int = 16,
                       mixed_chunk_size: int | None = None) -> tuple[Outcome, list[StepPlan]]:  # fmt: skip
    """Request a decodes while request b's 50-token prompt prefills in chunks; every plan, in order."""
    sched = make(chunked_prefill_size=chunk, enable_mixed_chunk=mixed, mixed_chunk_size=mixed_chunk_size)
    plans: list[StepPlan] = []

    def on_step(s: Scheduler, plan: StepPlan | None) -> None:
        check_invariants(s)
        if plan is not None:
            plans.append(plan)

    reqs = {0: [new_request("a", [1, 2, 3], max_new_tokens=12)],
            3: [new_request("b", list(range(100, 150)), max_new_tokens=5)]}  # fmt: skip
    out = run(sched, reqs, overlap, on_step=on_step)
    assert out.tokens("a") == reference_tokens([1, 2, 3], 12)
    assert out.tokens("b") == reference_tokens(list(range(100, 150)), 5)
    return out, plans


def _kinds(plan: StepPlan) -> tuple[int, int]:
    """(prefill tokens, decode rows) of a plan."""
    return sum(r.extend_len for r in plan.rows if r.input_ids), sum(1 for r in plan.rows if not r.input_ids)


@BOTH
def test_chunked_prefill_mixed_with_decode(overlap: bool) -> None:
    # --enable-mixed-chunk: a's decode rides along with every chunk of b, which shrinks by the decode row.
    _, plans = _run_beside_decode(True, overlap)
    kinds = [_kinds(p) for p in plans]
    assert all(n + d <= 16 for n, d in kinds), kinds  # SGLang's budget: chunk tokens + decode rows
    b_steps = [i for i, (n, _) in enumerate(kinds) if n > 3]  # a's prompt is 3 tokens
    assert [kinds[i] for i in b_steps] == [(15, 1), (15, 1), (15, 1), (5, 1)], kinds
    assert b_steps == list(range(b_steps[0], b_steps[0] + 4)), "a's decode stalled while b prefilled"



@BOTH
def test_mixed_chunk_size_caps_the_prompt_tokens_beside_decodes(overlap: bool) -> None:
    # --mixed-chunk-size 2: while a decodes, b's prompt goes 2 tokens a step beside it; once a has finished, b's
    # steps carry no decode row and take whole chunks again. The outputs are the same (checked by the helper).
    _, plans = _run_beside_decode(True, overlap, mixed_chunk_size=2)
    kinds = [_kinds(p) for p in plans]
    assert all(n <= 2 for n, d in kinds if d), kinds
    assert (2, 1) in kinds and (16, 0) in kinds, kinds  # beside a's decodes, then alone (b decodes after)
    assert sum(n for n, _ in kinds) == 3 + 50, kinds
    with pytest.raises(ValueError, match="mixed_chunk_size must be >= 1"):
        make(enable_mixed_chunk=True, mixed_chunk_size=0)

@BOTH
def test_without_mixed_chunk_prefill_steps_run_alone(overlap: bool) -> None:
    # SGLang's default: a step with prefill work has no decode rows; a waits while b's chunks run, then both decode.
    _, plans = _run_beside_decode(False, overlap)
    kinds = [_kinds(p) for p in plans]
    assert not any(n and d for n, d in kinds), kinds
    assert [n for n, _ in kinds if n > 3] == [16, 16, 16], kinds  # b's full chunks (the 2-token tail follows)
    first = next(i for i, (n, _) in enumerate(kinds) if n == 16)
    assert kinds[first : first + 4] == [(16, 0), (16, 0), (16, 0), (2, 0)], kinds
    assert any(d == 2 for _, d in kinds), "a and b never decoded together"


def test_mixed_chunk_needs_chunked_prefill() -> None:
    assert make(enable_mixed_chunk=True).config.mixed_chunk
    assert not make(enable_mixed_chunk=True, chunked_prefill_size=None).config.mixed_chunk
    assert not make().config.mixed_chunk  # off by default, as SGLang


@pytest.mark.parametrize("mixed", [False, True], ids=["separate", "mixed"])
def test_mixed_chunk_budget_leaves_room_for_every_decode_row(mixed: bool) -> None:
    # Six decoding requests and a chunk budget of 8: a mixed step holds the six rows and a 2-token chunk.
    sched = make(chunked_prefill_size=8, enable_mixed_chunk=mixed)
    plans: list[StepPlan | None] = []  # one per loop step
    reqs = {0: [new_request(f"d{i}", [i + 1], max_new_tokens=30) for i in range(6)],
            8: [new_request("long", list(range(60, 90)), max_new_tokens=2)]}  # fmt: skip
    run(sched, reqs, False, on_step=lambda s, p: plans.append(p))
    kinds = [_kinds(p) for p in plans if p is not None]
    assert kinds[0] == (6, 0) and kinds[1:8] == [(0, 6)] * 7, kinds  # the short prompts, then their decodes
    after = [_kinds(p) for p in plans[8:11] if p is not None]  # the long prompt arrived at loop step 8
    assert after == ([(2, 6)] * 3 if mixed else [(8, 0)] * 3), kinds


@BOTH
def test_shared_prefix_is_computed_once(overlap: bool) -> None:
    prefix = list(range(1, 41))  # 10 pages of 4
    a, b = [*prefix, 7, 7, 7], [*prefix, 9, 9, 9, 9, 9]
    # One after the other; concurrently, once a's prefill step has finished (with overlap its result is read one
    # loop step later); and while a's prefill step is still in flight: the cache holds only pages that finished
    # steps wrote, so with overlap b then computes the prefix itself.
    for at in (12, 2, 1):
        arrivals = {0: [new_request("a", a, max_new_tokens=4)], at: [new_request("b", b, max_new_tokens=4)]}
        sched = make(chunked_prefill_size=64)
        worker = make_worker(sched)
        out = drive(sched, worker, arrivals, overlap, on_step=checked)
        check_idle(sched)
        assert out.tokens("a") == reference_tokens(a, 4) and out.tokens("b") == reference_tokens(b, 4)
        hit = 0 if overlap and at == 1 else 40
        assert out.final("a").cached_tokens == 0 and out.final("b").cached_tokens == hit
        assert worker.num_prefill_tokens == len(a) + len(b) - hit
        assert sched.metrics()["cache_hit_rate"] == pytest.approx(hit / (len(a) + len(b)))
    # Without the radix cache the prefix is computed twice.
    sched = make(enable_radix_cache=False, chunked_prefill_size=64)
    worker = make_worker(sched)
    out = drive(sched, worker, {0: [new_request("a", a, max_new_tokens=4)], 12: [new_request("b", b, max_new_tokens=4)]},
                overlap, on_step=checked)
    check_idle(sched)
    assert worker.num_prefill_tokens == len(a) + len(b) and out.final("b").cached_tokens == 0


def test_identical_concurrent_prompts_dedupe_their_pages() -> None:
    prompt = list(range(30))
    reqs = {0: [new_request(f"r{i}", prompt, max_new_tokens=6) for i in range(3)]}
    sched = make()
    out = run(sched, reqs, overlap=True)
    for i in range(3):
        assert out.tokens(f"r{i}") == reference_tokens(prompt, 6)
    # One copy of the prompt + outputs stays cached: (30 + 6 - 1) // 4 full pages.
    assert sched.cache.num_cached_pages == 8


@BOTH
@pytest.mark.parametrize("radix", [True, False], ids=["radix", "noradix"])
def test_preemption_gives_identical_outputs(overlap: bool, radix: bool) -> None:
    # 24 usable pages of 4 tokens; six requests that each grow to 50 tokens (13 pages).
    sched = make(num_pages=25, max_running_requests=6, decode_reserve_tokens=0, enable_radix_cache=radix)
    prompts = [[i, *range(20, 29)] for i in range(6)]
    out = run(sched, {0: [new_request(f"r{i}", p, max_new_tokens=40) for i, p in enumerate(prompts)]}, overlap)
    assert sched.stats.num_preemptions > 0
    assert sched.metrics()["num_preemptions"] == sched.stats.num_preemptions
    for i, p in enumerate(prompts):
        assert out.tokens(f"r{i}") == reference_tokens(p, 40)
        assert out.final(f"r{i}").completion_tokens == 40


@BOTH
def test_preemption_takes_the_newest_and_requeues_it_first(overlap: bool) -> None:
    sched = make(num_pages=15, max_running_requests=2, decode_reserve_tokens=0)  # 14 pages of 4 tokens
    events: list[str] = []  # "-rid" preempted, "+rid" admitted, in order
    was_running: set[str] = set()

    def on_step(s: Scheduler, plan: StepPlan | None) -> None:
        check_invariants(s)
        events.extend("-" + r.rid for r in s.waiting if r.rid in was_running)
        if plan is not None:
            events.extend("+" + init.rid for init in plan.new_slots)
        was_running.clear()
        was_running.update(r.rid for r in s.running)

    prompts = {"a": list(range(10)), "b": list(range(30, 40)), "c": [7, 7]}
    arrivals = {0: [new_request("a", prompts["a"], max_new_tokens=30)], 1: [new_request("b", prompts["b"], max_new_tokens=30)],
                3: [new_request("c", prompts["c"], max_new_tokens=30)]}
    out = run(sched, arrivals, overlap, on_step=on_step)
    # b, admitted after a, is the victim (a never is); back at the front of the queue, it goes before c.
    assert events[:5] == ["+a", "+b", "-b", "+b", "+c"] and "-a" not in events
    assert sched.stats.num_preemptions == events.count("-b") >= 1
    for rid, p in prompts.items():
        assert out.tokens(rid) == reference_tokens(p, 30)


@pytest.mark.parametrize("seed", range(20))
def test_random_mixes_keep_invariants(seed: int) -> None:
    rng = random.Random(seed)
    ps = rng.choice([1, 2, 4])
    eos = (rng.randrange(50),)
    sched = make(
        page_size=ps, num_pages=1 + 128 // ps, max_running_requests=rng.randint(2, 6), max_context_len=128,
        chunked_prefill_size=rng.choice([8, 24, None]), eos_token_ids=eos, decode_reserve_tokens=rng.choice([0, 8]),
        enable_radix_cache=rng.random() < 0.8,
    )
    prompts = random_prompts(rng, 16)
    arrivals: dict[int, list[Any]] = {}
    aborts: dict[int, list[str]] = {}
    sps = []
    for i, p in enumerate(prompts):
        most = rng.choice([1, 5, 30, 60, None])
        sp = SamplingParams(max_new_tokens=most, stop_token_ids=[rng.randrange(997)],
                            min_new_tokens=min(rng.choice([0, 3]), most or 3), ignore_eos=rng.random() < 0.3)
        sps.append(sp)
        at = rng.randint(0, 40)
        arrivals.setdefault(at, []).append(NewRequest(rid=f"r{i}", input_ids=i32(p), sampling=sp))
        if rng.random() < 0.25:
            aborts.setdefault(at + rng.randint(0, 30), []).append(f"r{i}")
    out = run(sched, arrivals, overlap=rng.random() < 0.5, aborts=aborts)
    for i, (p, sp) in enumerate(zip(prompts, sps)):
        tokens, reason, matched = expected(p, sp, eos, max_len=128)
        final = out.final(f"r{i}")
        if final.finish_reason == "abort":
            assert out.tokens(f"r{i}") == tokens[: len(out.tokens(f"r{i}"))]
        else:
            assert out.tokens(f"r{i}") == tokens
            assert (final.finish_reason, final.matched_stop) == (reason, matched)


@BOTH
def test_stop_conditions(overlap: bool) -> None:
    prompt = [5, 6, 7]
    ref = reference_tokens(prompt, 40 - len(prompt))
    eos = ref[5]
    first = ref.index(eos)  # the eos id may already occur earlier in the reference
    later = ref.index(ref[9])
    cases: list[tuple[dict[str, Any], int, str, int | None]] = [
        ({"max_new_tokens": 30}, first + 1, "stop", eos),
        ({"max_new_tokens": 30, "ignore_eos": True}, 30, "length", None),
        ({"max_new_tokens": 3, "ignore_eos": True}, 3, "length", None),
        ({"max_new_tokens": 30, "ignore_eos": True, "stop_token_ids": [ref[9]]}, later + 1, "stop", ref[9]),
        ({"max_new_tokens": None, "ignore_eos": True}, 40 - len(prompt), "length", None),  # context length
    ]
    if eos in ref[first + 1 :]:  # min_new_tokens skips the first occurrence
        cases.append(({"max_new_tokens": 30, "min_new_tokens": first + 1}, ref.index(eos, first + 1) + 1, "stop", eos))
    for kw, num, reason, matched in cases:
        sched = make(max_context_len=40, eos_token_ids=(eos,))
        out = run(sched, {0: [new_request("r", prompt, **kw)]}, overlap)
        final = out.final("r")
        assert out.tokens("r") == ref[:num], kw
        assert (final.finish_reason, final.matched_stop, final.completion_tokens) == (reason, matched, num), kw


@BOTH
def test_limits_are_respected(overlap: bool) -> None:
    sched = make(num_pages=100, max_total_tokens=64, max_running_requests=3, chunked_prefill_size=8)
    peak = {"running": 0, "tokens": 0}

    def on_step(s: Scheduler, plan: StepPlan | None) -> None:
        check_invariants(s)
        peak["running"] = max(peak["running"], len(s.running))
        peak["tokens"] = max(peak["tokens"], s.allocator.num_used * 4)
        if plan is not None:
            assert len(plan.rows) <= 3
            assert sum(r.extend_len for r in plan.rows if r.input_ids) <= 8
            assert all(p < 17 for u in plan.page_updates for p in memoryview(u.pages).cast("i"))

    prompts = [[i] * (3 + 2 * i) for i in range(8)]
    out = run(sched, {0: [new_request(f"r{i}", p, max_new_tokens=10) for i, p in enumerate(prompts)]}, overlap,
              on_step=on_step)
    assert peak == {"running": 3, "tokens": 64}
    for i, p in enumerate(prompts):
        assert out.tokens(f"r{i}") == reference_tokens(p, 10)


def test_rejections() -> None:
    sched = make(max_queued_requests=2, max_context_len=64)
    sched.add_request(new_request("a", [1, 2], max_new_tokens=8))
    sched.add_request(new_request("b", [1, 2], max_new_tokens=8))
    with pytest.raises(AdmissionError, match="overloaded") as e:
        sched.add_request(new_request("c", [1, 2], max_new_tokens=8))
    assert e.value.kind == "overloaded" and isinstance(e.value, ValueError)
    sched = make(max_context_len=64)
    with pytest.raises(AdmissionError, match=r"60 tokens and max_new_tokens is 10: 70 exceeds .* 64") as e:
        sched.add_request(new_request("x", [1] * 60, max_new_tokens=10))
    assert e.value.kind == "invalid"
    bad: list[tuple[Any, str]] = [
        (new_request("y", [1] * 64, max_new_tokens=None), "no room"),
        (new_request("y", []), "empty"),
        (new_request("y", [1], max_new_tokens=0), "at least 1"),
        (new_request("y", [1], top_p=0.0), "top_p"),
        (new_request("y", [1] * 100, max_new_tokens=150), "KV cache"),
    ]
    small = make(num_pages=33, max_context_len=1024)  # 128 tokens of KV
    for req, msg in bad:
        with pytest.raises(AdmissionError, match=msg) as e:
            (small if msg == "KV cache" else sched).add_request(req)
        assert e.value.kind == "invalid"
    sched.add_request(new_request("y", [1], max_new_tokens=8))
    with pytest.raises(AdmissionError, match="already in use"):
        sched.add_request(new_request("y", [1], max_new_tokens=8))


def test_abort_waiting_running_and_in_flight() -> None:
    sched = make(max_running_requests=1)
    worker = make_worker(sched)
    sched.add_request(new_request("run", [1, 2, 3], max_new_tokens=50))
    sched.add_request(new_request("wait", [4, 5, 6]))
    out = Outcome()
    r0 = worker.execute(sched.schedule() or pytest.fail("no plan"))
    r1 = worker.execute(sched.schedule() or pytest.fail("no plan"))  # overlap: two plans in flight
    assert sched.num_inflight == 2 and sched.schedule() is None
    # Its decode row in plan 1 writes a latent for a token the host does not know yet: not cacheable.
    delta = sched.abort("run", reason="stop", matched_stop="###")
    assert delta is not None and (delta.finish_reason, delta.matched_stop, delta.completion_tokens) == ("stop", "###", 0)
    out.add([delta])
    assert sched.process_result(r0) == sched.process_result(r1) == []  # rows of an aborted request are dropped
    waiting = sched.abort("wait")
    assert waiting is not None and waiting.finish_reason == "abort" and waiting.token_ids == []
    assert sched.abort("wait") is None and sched.abort("nobody") is None
    check_idle(sched)
    assert sched.schedule() is None


def test_logprobs_are_passed_through() -> None:
    sched = make()
    reqs = [new_request("lp", [1, 2, 3], max_new_tokens=5, logprobs=True, top_logprobs=2),
            new_request("plain", [4, 5], max_new_tokens=5)]
    out = run(sched, {0: reqs}, overlap=True)
    for d in out.deltas["lp"]:
        (t,) = d.token_ids
        assert d.logprobs == [fake_logprob(t)]
        assert d.top_logprobs == [[(t, fake_logprob(t)), ((t + 1) % 997, fake_logprob((t + 1) % 997))]]
    assert all(d.logprobs is None and d.top_logprobs is None for d in out.deltas["plain"])


def test_lru_eviction_through_the_scheduler() -> None:
    sched = make(num_pages=17, chunked_prefill_size=64)  # 16 pages of 4
    worker = make_worker(sched)
    pa, pb, pc = [[k] * 16 + [k + 1] for k in (1, 10, 20)]
    for rid, p in (("a", pa), ("b", pb), ("c", pc), ("a2", pa)):  # a2 refreshes a's prefix
        drive(sched, worker, {0: [new_request(rid, p, max_new_tokens=1)]}, overlap=False)
    assert all(len(sched.cache.peek(p[:16])) == 4 for p in (pa, pb, pc))
    drive(sched, worker, {0: [new_request("big", list(range(100, 124)), max_new_tokens=4)]}, overlap=False)
    check_idle(sched)
    assert len(sched.cache.peek(pb[:16])) == 0  # least recently used: evicted first
    assert len(sched.cache.peek(pa[:16])) == 4


def test_metrics() -> None:
    now = [100.0]
    sched = Scheduler(SchedulerConfig(page_size=4, num_pages=64, max_running_requests=4, max_context_len=128),
                      clock=lambda: now[0])
    worker = make_worker(sched)
    sched.add_request(new_request("a", [1, 2, 3], max_new_tokens=8))
    sched.add_request(new_request("b", [1, 2, 3, 4, 5], max_new_tokens=8))
    m = sched.metrics()
    assert (m["num_waiting_requests"], m["num_running_requests"], m["num_used_pages"]) == (2, 0, 0)
    while sched.has_work:
        now[0] += 0.5
        plan = sched.schedule()
        assert plan is not None
        sched.process_result(worker.execute(plan))
    m = sched.metrics()
    assert m["gen_throughput"] == pytest.approx(16 / (now[0] - 100.0))
    assert m["last_step_time"] == 0.001 and m["num_free_pages"] + m["num_cached_pages"] == 63
    assert (m["num_running_requests"], m["num_waiting_requests"], m["num_preemptions"]) == (0, 0, 0)
