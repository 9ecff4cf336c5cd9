"""A step the worker cannot run (out of memory) fails its own requests only, and the radix cache stays true.

The failing worker writes junk where the step's latents would go (a forward cut short) and reports the step
failed. Every other request must still get exactly its reference tokens, later requests must never match the
junk through the prefix cache, and every page must come back.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from fake_worker import (
    FakeWorker,
    check_cache_contents,
    check_idle,
    check_invariants,
    drive,
    make_worker,
    new_request,
    reference_tokens,
)

from baleen.actors.policy import Scheduler
from baleen.actors.policy_state import SchedulerConfig
from baleen.messages import StepPlan, StepResult

JUNK = -7  # what a failed step leaves in the slots it was writing


class FailingWorker:
    """A FakeWorker whose steps listed in `fail_steps` run halfway: junk latents, junk tokens, a failed result."""

    def __init__(self, inner: FakeWorker, fail_steps: set[int]) -> None:
        self.inner, self.fail_steps = inner, fail_steps
        self.failed_rids: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def execute(self, plan: StepPlan) -> StepResult:
        result = self.inner.execute(plan)
        if plan.step_id not in self.fail_steps:
            return result
        ps = self.inner.page_size
        for row in plan.rows:
            table = self.inner.page_tables[row.slot]
            for pos in range(row.prefix_len, row.prefix_len + row.extend_len):
                self.inner.kv[table[pos // ps] * ps + pos % ps] = JUNK
            self.failed_rids.add(self.inner.slot_rid[row.slot] or "")
        return StepResult(step_id=plan.step_id, token_ids=b"", failed=f"step {plan.step_id} ran out of device memory")


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("fail_steps", [{0}, {3}, {2, 9, 10}])
def test_failed_step_fails_its_requests_only(overlap: bool, fail_steps: set[int]) -> None:
    rng = random.Random(5)
    system = [rng.randrange(50) for _ in range(24)]  # a shared prefix: later requests try to reuse its pages
    prompts = [system + [rng.randrange(50) for _ in range(rng.randint(1, 20))] for _ in range(10)]
    reqs = [new_request(f"r{i}", p, max_new_tokens=rng.randint(2, 12), ignore_eos=True) for i, p in enumerate(prompts)]
    arrivals: dict[int, list[Any]] = {}
    for i, r in enumerate(reqs):
        arrivals.setdefault(2 * i, []).append(r)
    sched = Scheduler(SchedulerConfig(page_size=4, num_pages=64, max_running_requests=4, max_context_len=128,
                                      chunked_prefill_size=16))
    worker = FailingWorker(make_worker(sched), fail_steps)

    def on_step(s: Scheduler, plan: StepPlan | None) -> None:
        check_invariants(s)
        check_cache_contents(s, worker.inner)  # a junk page in the tree would differ from its key here

    out = drive(sched, worker, arrivals, overlap, on_step=on_step)  # type: ignore[arg-type]
    check_idle(sched)
    assert worker.failed_rids, "no step failed"
    for i, prompt in enumerate(prompts):
        rid, final = f"r{i}", out.final(f"r{i}")
        if rid in worker.failed_rids:
            assert final.finish_reason == "error" and final.error_kind == "overloaded"
            assert "out of device memory" in (final.error or "")
        else:
            assert final.finish_reason == "length", (rid, final)
            assert out.tokens(rid) == reference_tokens(prompt, reqs[i].sampling.max_new_tokens or 0), rid
    assert sched.metrics()["num_failed_steps"] == len(fail_steps)
