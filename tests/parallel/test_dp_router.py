"""DPRouter: one Scheduler per DP rank planned in lock-step, balanced routing, results mapped back (pure Python)."""

from __future__ import annotations

from array import array
from typing import Any

import pytest

from baleen.actors.dp import DPRouter, draft_rows_per_step
from baleen.actors.policy import Scheduler
from baleen.actors.policy_state import SchedulerConfig
from baleen.messages import NewRequest, SamplingParams, SeqRow, StepPlan, StepResult


def router(num_dp: int, **kw: Any) -> DPRouter:
    cfg: dict[str, Any] = dict(page_size=4, num_pages=64, max_running_requests=8, max_context_len=256)
    cfg.update(kw)
    return DPRouter([Scheduler(SchedulerConfig(**cfg)) for _ in range(num_dp)])


def request(rid: str, prompt_len: int, max_new: int) -> NewRequest:
    ids = array("i", range(10, 10 + prompt_len)).tobytes()
    return NewRequest(rid=rid, input_ids=ids, sampling=SamplingParams(max_new_tokens=max_new, ignore_eos=True))


def result(plan: StepPlan, token: int = 7) -> StepResult:
    n = sum(r.sample for r in plan.rows)
    return StepResult(step_id=plan.step_id, token_ids=array("i", [token] * n).tobytes())


def owners(r: DPRouter) -> dict[str, int]:
    return {req.rid: d for d, s in enumerate(r.schedulers) for req in [*s.running, *s.waiting]}


def test_requests_go_to_the_least_loaded_rank() -> None:
    r = router(3)
    for i in range(7):
        r.add_request(request(f"r{i}", 5, 4))
    assert sorted(owners(r).values()) == [0, 0, 0, 1, 1, 2, 2]
    r.abort("r1")  # rank 1 now has the fewest
    r.add_request(request("late", 5, 4))
    assert owners(r)["late"] == 1


def test_every_dp_rank_gets_a_plan_each_step_and_results_map_back() -> None:
    r = router(2)
    r.add_request(request("a", 6, 3))  # -> DP rank 0; rank 1 has nothing to do
    plans = r.schedule()
    assert plans is not None and len(plans) == 2
    busy, idle = plans
    assert [busy.step_id, idle.step_id] == [0, 1]  # step g of DP rank d: g * num_dp + d
    assert busy.dp_num_tokens == idle.dp_num_tokens == [6, 0]
    assert idle.rows == [] and not busy.dp_all_decode  # a prefill is in this step
    assert r.num_inflight == 1
    assert r.process_result(result(idle)) == []  # the idle rank's (empty) result
    assert r.num_inflight == 1  # still waiting for DP rank 0
    deltas = r.process_result(result(busy, 42))
    assert [(d.rid, d.token_ids) for d in deltas] == [("a", [42])]
    assert r.num_inflight == 0
    plans = r.schedule()
    assert plans is not None and [p.step_id for p in plans] == [2, 3]
    assert plans[0].dp_num_tokens == [1, 0] and all(p.dp_all_decode for p in plans)
    with pytest.raises(ValueError, match="none is expected"):
        r.process_result(StepResult(step_id=9, token_ids=b""))
    # a one-token prompt's prefill extends by one token too, but over no cached prefix: not a decode step (the
    # ranks would replay a decode graph for it)
    one = router(2)
    one.add_request(request("b", 1, 3))
    plans = one.schedule()
    assert plans is not None and plans[0].dp_num_tokens == [1, 0] and not any(p.dp_all_decode for p in plans)


def test_lock_step_keeps_at_most_two_steps_in_flight_and_finishes_everything() -> None:
    r = router(2)
    for i, (n, m) in enumerate([(9, 5), (3, 2), (17, 4), (1, 6)]):
        r.add_request(request(f"r{i}", n, m))
    got: dict[str, list[int]] = {}
    inflight: list[list[StepPlan]] = []
    step = 0
    while r.has_work:
        plans = r.schedule()
        if plans is not None:
            assert len({tuple(p.dp_num_tokens) for p in plans}) == 1  # every rank has the same shapes
            for d, p in enumerate(plans):
                assert p.dp_num_tokens[d] == sum(row.extend_len for row in p.rows)
            inflight.append(plans)
        assert r.num_inflight <= 2
        if plans is None or len(inflight) == 2:
            # results arrive rank 1 first, then rank 0: any order across DP ranks is fine
            for p in reversed(inflight.pop(0)):
                for delta in r.process_result(result(p, step)):
                    got.setdefault(delta.rid, []).extend(delta.token_ids)
            step += 1
    assert {rid: len(t) for rid, t in got.items()} == {"r0": 5, "r1": 2, "r2": 4, "r3": 6}
    assert all(not s.running and not s.waiting and not s.has_work for s in r.schedulers)
    assert r.metrics()["num_running_requests"] == 0


def test_abort_reaches_the_owner_and_metrics_are_summed() -> None:
    r = router(2)
    r.add_request(request("x", 4, 8))
    r.add_request(request("y", 4, 8))
    assert set(owners(r).values()) == {0, 1}
    delta = r.abort("y")
    assert delta is not None and delta.finish_reason == "abort"
    assert r.abort("y") is None  # already gone
    m = r.metrics()
    assert m["num_waiting_requests"] == 1
    r.schedule()
    m = r.metrics()
    assert m["num_running_requests"] == 1 and m["num_used_pages"] == r.schedulers[0].allocator.num_used
    assert 0 < m["token_usage"] < 1


def test_one_dp_rank_is_the_plain_scheduler() -> None:
    r = router(1)
    r.add_request(request("a", 6, 2))
    plans = r.schedule()
    assert plans is not None and len(plans) == 1
    assert plans[0].step_id == 0 and plans[0].dp_num_tokens == [] and not plans[0].dp_all_decode
    r.process_result(result(plans[0]))
    mine, plain = r.metrics(), r.schedulers[0].metrics()
    assert mine.keys() == plain.keys() and mine["num_used_pages"] == plain["num_used_pages"] > 0


def test_every_dp_rank_learns_the_draft_steps_of_all() -> None:
    """Verify rows of 3 and 2 drafts on rank 0, one of 4 on rank 2, none on rank 1: steps 1..3 (d2..d4)."""
    def verify(k: int) -> SeqRow:
        return SeqRow(0, 10, 1 + k, b"", True)

    prefill = SeqRow(1, 0, 5, b"\0" * 20, True)
    ranks = [[verify(3), verify(2), prefill], [prefill], [verify(4), SeqRow(2, 7, 1, b"", True)]]
    assert draft_rows_per_step(ranks) == [[2, 0, 1], [1, 0, 1], [0, 0, 1]]
    assert draft_rows_per_step([[prefill], []]) == []


def test_every_dp_rank_learns_whether_all_plans_are_verify_steps() -> None:
    """`dp_all_verify` (every rank replays the captured verify step, model/spec_graphs.py): only when each rank's plan
    is verify rows of the full k drafts, or empty; `dp_grammar_drafts` when one of those rows is a grammar's (every
    rank drafts eagerly then). The same flags on every rank."""
    from baleen.messages import GrammarSpec

    def new(rid: str, max_new: int, **kw: Any) -> NewRequest:
        params = SamplingParams(max_new_tokens=max_new, ignore_eos=True, **kw)
        return NewRequest(rid=rid, input_ids=array("i", range(10, 16)).tobytes(), sampling=params)

    def step(r: DPRouter) -> tuple[bool, bool]:
        plans = r.schedule()
        assert plans is not None
        flags = {(p.dp_all_verify, p.dp_grammar_drafts) for p in plans}
        assert len(flags) == 1  # every rank reads the same
        for p in plans:  # each verify row commits its token and no draft
            rows = [x for x in p.rows if x.sample]
            num = array("i", [1] * len(rows)).tobytes() if any(x.extend_len > 1 and not x.input_ids for x in rows) else None
            r.process_result(StepResult(step_id=p.step_id, token_ids=array("i", [7] * len(rows)).tobytes(),
                                        num_tokens=num))  # fmt: skip
        return flags.pop()

    r = router(2, speculative_num_steps=2, page_size=4)
    r.add_request(new("a", 4))  # rank 0
    r.add_request(new("b", 2))  # rank 1
    prefill, plain = (False, False), (True, False)
    assert [step(r) for _ in range(4)] == [prefill, plain, plain, plain]  # rank 1 idle at the end
    r.add_request(new("g", 4, grammar=GrammarSpec("regex", "[a-z]+")))  # -> rank 1
    assert [step(r) for _ in range(3)] == [prefill, (True, True), (True, True)]  # a grammar's verify row on rank 1
    r = router(2, speculative_num_steps=2, page_size=4)
    r.add_request(new("a", 4))
    r.add_request(new("p", 4, custom_logit_processor="x"))  # verify rows too (the worker commits one token each)
    assert [step(r) for _ in range(3)] == [prefill, plain, plain]
