"""Speculative decoding in the scheduler: verify rows against a fake worker that drafts and commits like the real one.

The fake drafter's guesses are right with a set probability; the fake model is deterministic, so a request must
generate exactly the tokens it generates without speculation, whatever the accept rate, with stops, length limits,
aborts and preemption in the middle of an accepted run, and every page must come back.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest
from fake_worker import (
    FakeWorker,
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
from test_failed_step import FailingWorker

from baleen.actors.dp import DPRouter
from baleen.actors.policy import Scheduler
from baleen.actors.policy_state import SchedulerConfig
from baleen.messages import PREFIX_ON_DEVICE, GrammarSpec, NewRequest, SamplingParams, StepPlan, StepResult

K = 3  # drafts a verify row checks (DeepSeek's default --speculative-num-steps)


def make(**kw: Any) -> Scheduler:
    cfg: dict[str, Any] = dict(page_size=4, num_pages=96, max_running_requests=8, max_context_len=256,
                               chunked_prefill_size=32, speculative_num_steps=K)
    cfg.update(kw)
    return Scheduler(SchedulerConfig(**cfg))


def expected(prompt: Sequence[int], sp: SamplingParams, eos: Sequence[int] = (),
             max_len: int = 256) -> tuple[list[int], str, int | None]:
    """Tokens, finish reason and matched stop a request must end with (stop rules applied to the reference)."""
    max_new = sp.max_new_tokens if sp.max_new_tokens is not None else max_len - len(prompt)
    ref = reference_tokens(prompt, max_new)
    stops = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(eos))
    for i, t in enumerate(ref):
        if i + 1 > sp.min_new_tokens and t in stops:
            return ref[: i + 1], "stop", t
    return ref, "length", None


def run(sched: Scheduler, arrivals: dict[int, list[NewRequest]], overlap: bool, accuracy: float,
        aborts: dict[int, list[str]] | None = None, worker: Any = None,
        keep_cache: bool = False) -> tuple[Outcome, FakeWorker, list[StepPlan]]:
    """Drive to the end, checking the page invariants, the cache's contents and at most one row in flight per
    request (two with overlap) after every loop step; every plan, in order; at the end every page is free once the
    cache is emptied."""
    worker = worker or make_worker(sched, draft_accuracy=accuracy)
    inner = getattr(worker, "inner", worker)
    plans: list[StepPlan] = []

    def on_step(s: Scheduler, plan: StepPlan | None) -> None:
        check_invariants(s)
        check_cache_contents(s, inner)
        if s.config.speculative_num_steps:
            reqs = [*s.running, *s.waiting]
            assert all(r.num_inflight <= (2 if overlap else 1) for r in reqs), "too many rows of a request in flight"
            for r in reqs:  # a decoding request with nothing in flight: the host's lengths are exact again
                if not r.num_inflight:
                    assert (r.inflight_tokens, r.num_unsettled) == (0, 0)
                    assert r.slot is None or r.kv_len < len(r.fill) or r.kv_len == r.done_len, r
        if plan is not None:
            plans.append(plan)

    out = drive(sched, worker, arrivals, overlap, aborts=aborts, on_step=on_step)
    check_idle(sched)
    if not keep_cache:
        sched.allocator.free(sched.cache.evict(sched.cache.num_cached_pages))
        assert sched.allocator.num_used == 0, "pages leaked"
    return out, inner, plans


def verify_rows(plans: list[StepPlan]) -> list[int]:
    """Drafts of every verify row planned."""
    return [r.extend_len - 1 for p in plans for r in p.rows if not r.input_ids and r.extend_len > 1]


def random_requests(rng: random.Random, num: int, eos: int) -> list[NewRequest]:
    base = [rng.randrange(50) for _ in range(20)]
    reqs = []
    for i in range(num):
        prompt = base[: rng.randint(0, 20)] + [rng.randrange(50) for _ in range(rng.randint(1, 25))]
        ref = reference_tokens(prompt, 40)
        # A stop id the reference reaches, so stops land inside accepted runs as well as at their ends
        stop = [ref[rng.randrange(40)]] if rng.random() < 0.5 else []
        most = rng.choice([1, 2, 3, 4, 5, 7, 12, 25, 40])
        sp = SamplingParams(max_new_tokens=most, stop_token_ids=stop,
                            min_new_tokens=min(rng.choice([0, 0, 2, 6]), most), ignore_eos=rng.random() < 0.5,
                            logprobs=rng.random() < 0.3, top_logprobs=rng.choice([0, 2]))
        reqs.append(NewRequest(rid=f"r{i}", input_ids=i32(prompt), sampling=sp))
    return reqs


def _prompt(req: NewRequest) -> list[int]:
    return list(memoryview(req.input_ids).cast("i"))


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("radix", [True, False], ids=["radix", "noradix"])
@pytest.mark.parametrize("accuracy", [0.0, 0.6, 1.0])
def test_outputs_equal_those_without_speculation(overlap: bool, radix: bool, accuracy: float) -> None:
    rng = random.Random(int(accuracy * 10) + 2 * radix + overlap)
    eos = 11
    reqs = random_requests(rng, 24, eos)
    arrivals: dict[int, list[NewRequest]] = {}
    for r in reqs:
        arrivals.setdefault(rng.randint(0, 30), []).append(r)
    outs = {}
    for spec in (0, K):
        sched = make(enable_radix_cache=radix, eos_token_ids=(eos,), speculative_num_steps=spec)
        outs[spec], worker, plans = run(sched, arrivals, overlap, accuracy)
        for r in reqs:
            tokens, reason, matched = expected(_prompt(r), r.sampling, (eos,))
            final = outs[spec].final(r.rid)
            assert outs[spec].tokens(r.rid) == tokens, (spec, r.rid)
            assert (final.finish_reason, final.matched_stop, final.completion_tokens) == (reason, matched, len(tokens))
            assert (final.spec_verify_ct is None) == (spec == 0)
        if spec:
            assert verify_rows(plans) and worker.num_verify_rows == len(verify_rows(plans))
            assert max(verify_rows(plans)) == K
    for r in reqs:  # the same deltas' logprobs, token by token
        for spec in (0, K):
            lps = [lp for d in outs[spec].deltas[r.rid] for lp in (d.logprobs or [])]
            tops = [t for d in outs[spec].deltas[r.rid] for t in (d.top_logprobs or [])]
            tokens = outs[spec].tokens(r.rid)
            assert lps == ([fake_logprob(t) for t in tokens] if r.sampling.logprobs else [])
            want_tops = [[((t + j) % 997, fake_logprob((t + j) % 997)) for j in range(2)] for t in tokens]
            assert tops == (want_tops if r.sampling.top_logprobs else [])


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_stop_inside_an_accepted_run_drops_the_rest(overlap: bool) -> None:
    prompt = [3, 1, 4, 1, 5]
    ref = reference_tokens(prompt, 30)
    # All drafts right: the prefill commits ref[0], then each verify row ref[1:5], ref[5:9], ...
    for stop_at in (2, 5, 8, 11):  # inside a run, first of a run, last of a run, inside again
        stop = ref[stop_at]
        if stop in ref[:stop_at]:
            continue
        sched = make(enable_radix_cache=True)
        out, _, _ = run(sched, {0: [new_request("r", prompt, max_new_tokens=30, stop_token_ids=[stop])]},
                        overlap, 1.0, keep_cache=True)
        assert out.tokens("r") == ref[: stop_at + 1]
        final = out.final("r")
        assert (final.finish_reason, final.matched_stop, final.completion_tokens) == ("stop", stop, stop_at + 1)
        num_rows = -(-stop_at // (K + 1))
        assert final.spec_verify_ct == num_rows
        # The cache holds only tokens the request kept (check_cache_contents ran every step): latents the last
        # verify row committed (done_len), up to the last token the host kept.
        done_len, kept = len(prompt) + (K + 1) * num_rows, len(prompt) + stop_at + 1
        assert len(sched.cache.peek([*prompt, *ref])) == min(done_len, kept) // 4


@pytest.mark.parametrize("room", [0, 5, 64], ids=["tight", "page", "ample"])
@pytest.mark.parametrize("max_new", [1, 2, 3, 4, 5, 6, 9, 10])
def test_verify_rows_keep_their_drafts_up_to_the_page_table_s_end(max_new: int, room: int) -> None:
    """Near its length limit a verify row still carries k drafts (a step whose rows all do replays the captured
    graphs), and what it commits past the limit is dropped; only the page table's end shortens a row."""
    prompt = [2, 7, 1, 8]
    sched = make(max_context_len=len(prompt) + max_new + room)
    capacity = -(-sched.config.max_context_len // 4) * 4  # the page table's positions (pages of 4)
    out, _, plans = run(sched, {0: [new_request("r", prompt, max_new_tokens=max_new)]}, False, 1.0)
    assert out.tokens("r") == reference_tokens(prompt, max_new) and out.final("r").finish_reason == "length"
    rows = [r for p in plans for r in p.rows if not r.input_ids]
    for r in rows:
        assert r.prefix_len + r.extend_len <= capacity  # every latent it writes has a page-table entry
        assert r.extend_len - 1 == min(K, capacity - 1 - r.prefix_len)  # full drafts unless the table ends
    assert out.final("r").spec_verify_ct == sum(r.extend_len > 1 for r in rows)
    if room >= K:
        assert all(r.extend_len == K + 1 for r in rows)
    assert sched.allocator.num_free == sched.allocator.num_pages - 1 - sched.cache.num_cached_pages


def test_min_new_tokens_inside_a_run() -> None:
    prompt = [9, 9, 8]
    ref = reference_tokens(prompt, 40)
    stop = ref[1]
    again = ref.index(stop, 2) if stop in ref[2:] else None
    out, _, _ = run(make(), {0: [new_request("r", prompt, max_new_tokens=40, stop_token_ids=[stop], min_new_tokens=2)]},
                    True, 1.0)
    want = ref[: again + 1] if again is not None else ref
    assert out.tokens("r") == want


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("radix", [True, False], ids=["radix", "noradix"])
def test_aborts_mid_run_return_every_page(overlap: bool, radix: bool) -> None:
    rng = random.Random(3 + overlap + 2 * radix)
    reqs = [new_request(f"r{i}", [rng.randrange(50) for _ in range(rng.randint(1, 20))], max_new_tokens=40,
                        ignore_eos=True) for i in range(12)]
    arrivals: dict[int, list[NewRequest]] = {}
    aborts: dict[int, list[str]] = {}
    for r in reqs:
        at = rng.randint(0, 10)
        arrivals.setdefault(at, []).append(r)
        aborts.setdefault(at + rng.randint(0, 12), []).append(r.rid)
    out, _, _ = run(make(enable_radix_cache=radix), arrivals, overlap, 0.7, aborts=aborts)
    for r in reqs:
        got = out.tokens(r.rid)
        assert got == reference_tokens(_prompt(r), 40)[: len(got)]
    assert sum(out.final(r.rid).finish_reason == "abort" for r in reqs) >= 6


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("radix", [True, False], ids=["radix", "noradix"])
def test_preemption_mid_run_gives_identical_outputs(overlap: bool, radix: bool) -> None:
    # 24 usable pages of 4 tokens; six requests that each grow to 50 tokens (13 pages), drafts reserved ahead.
    sched = make(num_pages=25, max_running_requests=6, decode_reserve_tokens=0, enable_radix_cache=radix)
    prompts = [[i, *range(20, 29)] for i in range(6)]
    out, _, _ = run(sched, {0: [new_request(f"r{i}", p, max_new_tokens=40) for i, p in enumerate(prompts)]},
                    overlap, 0.7)
    assert sched.stats.num_preemptions > 0
    for i, p in enumerate(prompts):
        assert out.tokens(f"r{i}") == reference_tokens(p, 40)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_failed_step_with_verify_rows(overlap: bool) -> None:
    class FailFirstVerify(FailingWorker):
        """Fails the first step after step 4 that holds a verify row."""

        def execute(self, plan: StepPlan) -> StepResult:
            if not self.fail_steps and plan.step_id >= 4 and verify_rows([plan]):
                self.fail_steps.add(plan.step_id)
            return super().execute(plan)

    sched = make(max_running_requests=4)
    prompts = [[i + 1] * (3 + i) for i in range(6)]
    worker = FailFirstVerify(make_worker(sched, draft_accuracy=0.7), set())
    reqs = {2 * i: [new_request(f"r{i}", p, max_new_tokens=20, ignore_eos=True)] for i, p in enumerate(prompts)}
    out, _, _ = run(sched, reqs, overlap, 0.7, worker=worker)
    assert worker.fail_steps and worker.failed_rids
    for i, p in enumerate(prompts):
        final = out.final(f"r{i}")
        if f"r{i}" in worker.failed_rids:
            assert final.finish_reason == "error"
        else:
            assert out.tokens(f"r{i}") == reference_tokens(p, 20)


@pytest.mark.parametrize("accuracy", [0.0, 1.0])
def test_a_verify_row_behind_one_in_flight_reads_its_prefix_on_the_device(accuracy: float) -> None:
    # With overlap a speculating request's next verify row is planned before the last one's result is in: its
    # prefix is PREFIX_ON_DEVICE, its pages cover everything the row in flight may commit, and the results settle
    # kv_len back to the committed length, rejected drafts of both rows taken off.
    sched = make()
    worker = make_worker(sched, draft_accuracy=accuracy)
    sched.add_request(new_request("a", [1, 2, 3], max_new_tokens=30))
    p0, p1 = sched.schedule(), sched.schedule()
    assert p0 is not None and p1 is not None and sched.schedule() is None  # two plans in flight at most
    assert [(r.prefix_len, r.extend_len) for r in p1.rows] == [(3, 1 + K)]  # behind a prefill: the prefix is known
    (a,) = sched.running
    out = Outcome()
    out.add(sched.process_result(worker.execute(p0)))
    p2 = sched.schedule()
    assert p2 is not None and [(r.prefix_len, r.extend_len) for r in p2.rows] == [(PREFIX_ON_DEVICE, 1 + K)]
    assert a.kv_len == 3 + 2 * (1 + K) and len(a.pages) == 3  # pages for everything p1 may commit, then p2
    out.add(sched.process_result(worker.execute(p1)))
    n1 = 1 + (K if accuracy else 0)
    assert (a.kv_len, a.done_len) == (3 + n1 + 1 + K, 3 + n1)
    p3 = sched.schedule()
    assert p3 is not None and p3.rows[0].prefix_len == PREFIX_ON_DEVICE
    out.add(sched.process_result(worker.execute(p2)))
    assert a.done_len == 3 + 2 * n1 and a.kv_len == a.done_len + 1 + K  # p3's row still counted in full
    out.add(sched.process_result(worker.execute(p3)))
    assert a.kv_len == a.done_len == 3 + 3 * n1 and a.num_inflight == 0
    assert out.tokens("a") == reference_tokens([1, 2, 3], 1 + 3 * n1)
    assert worker.num_device_prefix_rows == 2


def test_near_its_length_limit_a_verify_row_goes_behind_the_one_in_flight() -> None:
    sched = make()
    worker = make_worker(sched, draft_accuracy=1.0)
    sched.add_request(new_request("a", [1, 2, 3], max_new_tokens=6))
    p0, p1 = sched.schedule(), sched.schedule()
    assert p0 is not None and p1 is not None
    sched.process_result(worker.execute(p0))
    # p1 may commit 4 tokens after the first, one short of the limit: the next row goes behind it with its full
    # drafts (its prefix on the device); whatever it commits past the limit is dropped
    p2 = sched.schedule()
    assert p2 is not None and [(r.prefix_len, r.extend_len) for r in p2.rows] == [(PREFIX_ON_DEVICE, 1 + K)]
    outs = sched.process_result(worker.execute(p1)) + sched.process_result(worker.execute(p2))
    assert [t for d in outs for t in d.token_ids] == reference_tokens([1, 2, 3], 6)[1:]
    assert outs[-1].finish_reason == "length" and sched.schedule() is None and not sched.running
    assert sched.allocator.num_free == sched.allocator.num_pages - 1 - sched.cache.num_cached_pages


def test_rejected_drafts_cost_only_a_length_change() -> None:
    sched = make()
    worker = make_worker(sched, draft_accuracy=0.0)
    sched.add_request(new_request("a", [1, 2, 3, 4, 5, 6, 7], max_new_tokens=30))
    sched.process_result(worker.execute(sched.schedule() or pytest.fail("no plan")))
    plan = sched.schedule()
    assert plan is not None and [(r.prefix_len, r.extend_len) for r in plan.rows] == [(7, 1 + K)]
    assert [u.start for u in plan.page_updates] == [2]  # one page more for positions 8 .. 10
    (a,) = sched.running
    assert a.kv_len == 7 + 1 + K
    deltas = sched.process_result(worker.execute(plan))
    assert [d.token_ids for d in deltas] == [reference_tokens([1, 2, 3, 4, 5, 6, 7], 2)[1:]]  # one token
    assert (a.kv_len, a.done_len, len(a.pages)) == (8, 8, 3)  # the reserved page stays, for the next rows
    plan = sched.schedule()
    assert plan is not None and plan.page_updates == [] and plan.rows[0].prefix_len == 8


def test_metrics_and_per_request_verify_count() -> None:
    sched = make()
    m = sched.metrics()
    assert (m["spec_accept_length"], m["spec_accept_rate"], m["num_verify_rows"]) == (0.0, 0.0, 0)
    out, worker, _ = run(sched, {0: [new_request("a", [1, 2], max_new_tokens=1 + 4 * 5, ignore_eos=True)]}, False, 1.0)
    m = sched.metrics()
    assert (m["num_verify_rows"], m["num_verify_tokens"], m["num_draft_tokens"], m["num_accepted_drafts"]) == \
        (5, 20, 15, 15)
    assert (m["spec_accept_length"], m["spec_accept_rate"]) == (4.0, 1.0)
    assert out.final("a").spec_verify_ct == 5
    sched = make()
    out, worker, _ = run(sched, {0: [new_request(f"r{i}", [i + 1], max_new_tokens=30, ignore_eos=True)
                                     for i in range(5)]}, True, 0.5)
    m = sched.metrics()
    assert m["num_verify_rows"] == worker.num_verify_rows == sum(out.final(f"r{i}").spec_verify_ct or 0 for i in range(5))
    assert m["num_accepted_drafts"] == worker.num_accepted and m["num_draft_tokens"] == worker.num_drafts
    assert m["spec_accept_length"] == pytest.approx(m["num_verify_tokens"] / m["num_verify_rows"])
    assert 0.2 < m["spec_accept_rate"] < 0.8 and m["spec_accept_rate"] == pytest.approx(worker.num_accepted /
                                                                                         worker.num_drafts)
    # Without speculation: no verify count on the outputs, zeros in the metrics.
    out, _, _ = run(make(speculative_num_steps=0), {0: [new_request("p", [1], max_new_tokens=5)]}, False, 1.0)
    assert all(d.spec_verify_ct is None for d in out.deltas["p"])
    assert make(speculative_num_steps=0).metrics()["spec_accept_length"] == 0.0


def test_dp_router_recomputes_the_ratios() -> None:
    router = DPRouter([make(), make()])
    for d, s in enumerate(router.schedulers):
        s.stats.num_verify_rows, s.stats.num_verify_tokens, s.stats.num_draft_tokens, s.stats.num_accepted_drafts = (
            (10, 30, 30, 20) if d == 0 else (30, 30, 90, 0))
    m = router.metrics()
    assert m["spec_accept_length"] == pytest.approx(60 / 40) and m["spec_accept_rate"] == pytest.approx(20 / 120)


def test_warm_up_is_in_no_statistic() -> None:
    sched = make()
    worker = make_worker(sched, draft_accuracy=1.0)
    req = NewRequest(rid="w", input_ids=i32([1, 2]), sampling=SamplingParams(max_new_tokens=9), warmup=True)
    drive(sched, worker, {0: [req]}, overlap=False)
    assert worker.num_verify_rows == 2 and sched.metrics()["num_verify_rows"] == 0


def test_bad_counts_are_refused() -> None:
    sched = make()
    worker = make_worker(sched, draft_accuracy=1.0)
    sched.add_request(new_request("a", [1, 2, 3], max_new_tokens=30))
    sched.process_result(worker.execute(sched.schedule() or pytest.fail("no plan")))
    plan = sched.schedule()
    assert plan is not None
    with pytest.raises(ValueError, match="committed 5 tokens with 3 drafts"):
        sched.process_result(StepResult(step_id=plan.step_id, token_ids=i32([1] * 5), num_tokens=i32([5])))
    with pytest.raises(ValueError, match="speculative_num_steps"):
        make(speculative_num_steps=-1)


@pytest.mark.parametrize("seed", range(16))
def test_random_mixes_keep_invariants(seed: int) -> None:
    rng = random.Random(seed)
    ps = rng.choice([1, 2, 4])
    eos = 11
    sched = make(page_size=ps, num_pages=1 + rng.choice([88, 160]) // ps, max_running_requests=rng.randint(2, 6),
                 max_context_len=128, chunked_prefill_size=rng.choice([8, 24, None]), eos_token_ids=(eos,),
                 decode_reserve_tokens=rng.choice([0, 8]), enable_radix_cache=rng.random() < 0.7,
                 enable_mixed_chunk=rng.random() < 0.3, speculative_num_steps=rng.randint(1, 4))
    reqs = random_requests(rng, 14, eos)
    arrivals: dict[int, list[NewRequest]] = {}
    aborts: dict[int, list[str]] = {}
    for r in reqs:
        at = rng.randint(0, 30)
        arrivals.setdefault(at, []).append(r)
        if rng.random() < 0.25:
            aborts.setdefault(at + rng.randint(0, 20), []).append(r.rid)
    out, _, _ = run(sched, arrivals, rng.random() < 0.5, rng.choice([0.0, 0.5, 0.9]), aborts=aborts)
    for r in reqs:
        tokens, reason, matched = expected(_prompt(r), r.sampling, (eos,), max_len=128)
        final = out.final(r.rid)
        got = out.tokens(r.rid)
        if final.finish_reason == "abort":
            assert got == tokens[: len(got)]
        else:
            assert got == tokens and (final.finish_reason, final.matched_stop) == (reason, matched)


def test_a_processor_request_gets_verify_rows_outside_the_accept_stats() -> None:
    # A request with a custom logit processor gets verify rows like the others (a step of verify rows only keeps the
    # worker's graphs; the worker commits one token of each, its processor seeing each token before the next), and
    # its rows stay out of the drafter's accept ratios.
    sched = make()
    reqs = [new_request("c", [1, 2, 3], max_new_tokens=12, ignore_eos=True, custom_logit_processor="thinking_budget"),
            new_request("s", [4, 5, 6], max_new_tokens=12, ignore_eos=True)]
    slots: dict[str, int] = {}
    verify_rows = {"c": 0}

    def on_step(s: Scheduler, plan: StepPlan | None) -> None:
        for r in s.running:
            slots[r.rid] = r.slot or 0
        if plan is not None:
            for row in plan.rows:
                if not row.input_ids and row.slot == slots.get("c"):
                    verify_rows["c"] += row.extend_len > 1

    worker = make_worker(sched, draft_accuracy=1.0)
    out = drive(sched, worker, {0: reqs}, overlap=True, on_step=on_step)
    check_idle(sched)
    assert out.tokens("c") == reference_tokens([1, 2, 3], 12) and out.tokens("s") == reference_tokens([4, 5, 6], 12)
    assert verify_rows["c"] > 0 and out.final("c").spec_verify_ct == verify_rows["c"]
    assert sched.metrics()["num_verify_rows"] == out.final("s").spec_verify_ct == 3  # 1 + 4 + 4 + 3


def test_a_grammar_request_speculates() -> None:
    # The worker masks a grammar request's verify rows draft by draft: its rows carry drafts like any other's.
    sched = make()
    reqs = [new_request("g", [1, 2, 3], max_new_tokens=12, ignore_eos=True, grammar=GrammarSpec("regex", "[a-z]+"))]
    worker = make_worker(sched, draft_accuracy=1.0)
    out = drive(sched, worker, {0: reqs}, overlap=True)
    check_idle(sched)
    assert out.tokens("g") == reference_tokens([1, 2, 3], 12) and out.final("g").spec_verify_ct == 3
