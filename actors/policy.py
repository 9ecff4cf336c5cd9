"""The scheduling policy: which requests run each step, which pages they use, and when they stop.

Pure Python (no torch): the SchedulerActor feeds it NewRequest/AbortRequest/StepResult and sends the StepPlans and
RequestOutputs (new token ids; the detokenizer adds the text) it returns. Its records (SchedulerConfig, Req, the
plans) are in policy_state.py, the reading of a StepResult in results.py, and what it counts for /metrics in
policy_stats.py. A request is checked by `admission.check_request` against the context length and the KV pool before
it is queued. A step runs prefill chunks of at most `chunked_prefill_size` tokens in total, or decode rows (one
token each, read from the slot on the device): as SGLang, prefill goes first and the running requests' decodes wait
for a step without one. With `enable_mixed_chunk` (--enable-mixed-chunk, only with chunked prefill) the decode rows
ride along with the prefill chunk instead, and the chunk is smaller by as many tokens as the decode rows hold, so no
stream stalls while a long prompt prefills; `mixed_chunk_size` (--mixed-chunk-size) caps the prompt tokens of such a
step further, so that no gap between a stream's tokens grows much past a decode step (a step without decode rows still
takes a whole chunk).

Speculative decoding (`speculative_num_steps` = k > 0): a decoding request's row is a verify row of 1 + k_row
tokens (the slot's last token and k_row drafts the worker's drafter left there; k_row = k, or fewer only at the end
of the page table: near the request's length limit the row keeps its k drafts, so the step keeps the captured
graphs' shape, and the stop checks drop what it commits past the limit), which commits 1 to k_row + 1 tokens
(`StepResult.num_tokens`). Its pages are reserved for
all 1 + k_row latents before the plan is sent; the result only sets the lengths (`kv_len`, `done_len`) to what was
committed, so rejected drafts cost no page traffic, and the radix cache never sees them.

NOTE: under overlap scheduling a speculating request may have two verify rows in flight: how many tokens the
first commits is known when its result arrives, after the second was planned. The second row's prefix is then
`PREFIX_ON_DEVICE` (the worker reads the committed length where the first row's step left it); its pages are
reserved for the most the first may commit, and `kv_len` stays that upper bound until the results settle it
(`results.settle_lengths`). A second row is planned while the first may still leave the request tokens to
generate; it waits for the first's result only at the end of the page table. A request with a custom logit processor
gets verify rows too (a step of verify rows only keeps the worker's captured graphs), of which the worker commits one
token each (a processor sees each token before the next; the worker syncs before its steps); a grammar's request
speculates (the worker masks each verify row by the matcher walked over the drafts before it).

NOTE: workers execute plans strictly in order. That is what makes two things safe while up to two plans
are in flight (overlap scheduling): (1) pages freed after plan N was sent may be handed out in plan N+1 —
plan N reads and writes them before plan N+1 overwrites them; (2) a slot freed after plan N may be
re-initialised in plan N+1. Result rows are mapped to requests through the stored plan, never by slot, so a
row of a request that finished (or was aborted) in the meantime is simply dropped.

NOTE: the radix cache only ever holds pages whose latents a *finished* step wrote (`Req.done_len`): pages enter
it when their step's result arrives or when their request ends, never when a plan is sent. So a step that fails
(the GPU ran out of memory) leaves nothing half-written for another request to match: its requests end with an
error, every other request goes on, and the cache stays consistent.
"""

from __future__ import annotations

import time
from array import array
from collections import deque
from collections.abc import Callable

from baleen.actors.admission import AdmissionError, Limits, check_request
from baleen.actors.page_allocator import PageAllocator
from baleen.actors.policy_state import InFlight, PlanBuilder, Req, SchedulerConfig, Write
from baleen.actors.policy_stats import SchedulerStats
from baleen.actors.radix_cache import make_prefix_cache
from baleen.actors.results import Committed, committed_counts, settle_lengths, take_prompt_logprobs
from baleen.messages import (
    PREFIX_ON_DEVICE,
    NewRequest,
    PageUpdate,
    RequestOutput,
    SeqRow,
    SlotInit,
    StepPlan,
    StepResult,
)

MAX_INFLIGHT_PLANS = 2  # overlap scheduling plans step N+1 while step N runs; never further ahead


class Scheduler:
    """Continuous batching with chunked prefill, a radix prefix cache and preemption by recompute."""

    def __init__(
        self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic, metrics_window_s: float = 10.0
    ) -> None:
        self.config = config
        self.allocator = PageAllocator(config.usable_pages + 1, config.page_size)
        self.limits = Limits(max_context_len=config.max_context_len,
                             max_kv_tokens=self.allocator.capacity * config.page_size)
        self.cache = make_prefix_cache(config.page_size, config.enable_radix_cache)
        # positions a slot's page table holds (the workers' table: whole pages of max_context_len)
        self._table_positions = self.allocator.pages_for(config.max_context_len) * config.page_size
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # admission order, oldest first
        self._requests: dict[str, Req] = {}  # every live request, waiting or running
        self._free_slots = list(range(config.max_running_requests - 1, -1, -1))
        self._freed_slots: list[int] = []  # slots to clear in the next plan
        self._inflight: deque[InFlight] = deque()
        self._next_step_id = 0
        self._next_admit_seq = 0
        self._eos = frozenset(config.eos_token_ids)
        self.stats = SchedulerStats(clock, metrics_window_s)  # what /metrics counts, warm-ups excluded

    # ---- requests in -------------------------------------------------------------------------------
    def add_request(self, req: NewRequest) -> None:
        """Queue a request; AdmissionError ("invalid" or "overloaded") when it cannot be taken."""
        if len(req.input_ids) % 4:
            raise AdmissionError(f"input_ids of {req.rid!r} is not int32 bytes")
        if req.rid in self._requests:
            raise AdmissionError(f"request id {req.rid!r} is already in use")
        prompt = array("i")
        prompt.frombytes(req.input_ids)
        max_len = check_request(prompt, req.sampling, self.limits)
        if len(self.waiting) >= self.config.max_queued_requests:
            raise AdmissionError(f"the server is overloaded: {len(self.waiting)} requests are already waiting "
                                 f"(max_queued_requests={self.config.max_queued_requests}); retry later",
                                 kind="overloaded")
        stop_ids = frozenset(req.sampling.stop_token_ids)
        if not req.sampling.ignore_eos:
            stop_ids |= self._eos
        # NOTE: a request with a custom processor gets verify rows like any other (so a step keeps the captured graphs'
        # shape), but the worker commits one token of each: its processor must see each token before the next.
        state = Req(rid=req.rid, sampling=req.sampling, prompt=prompt, max_len=max_len, stop_ids=stop_ids,
                    warmup=req.warmup, max_drafts=self.config.speculative_num_steps)
        self._requests[req.rid] = state
        self.waiting.append(state)

    def abort(self, rid: str, reason: str = "abort", matched_stop: int | str | None = None) -> RequestOutput | None:
        """Finish a request now (its in-flight rows are dropped); None when it is not live."""
        req = self._requests.get(rid)
        if req is None:
            return None
        self._finish(req)
        return self._delta(req, [], None, None, reason, matched_stop)

    # ---- planning ----------------------------------------------------------------------------------
    @property
    def num_inflight(self) -> int:
        """Plans sent whose results have not been processed."""
        return len(self._inflight)

    @property
    def has_work(self) -> bool:
        """Whether any request is waiting, running or awaiting a result."""
        return bool(self._requests) or bool(self._inflight)

    def schedule(self) -> StepPlan | None:
        """Plan the next step, or None when there is nothing to run (or two plans are in flight)."""
        if len(self._inflight) >= MAX_INFLIGHT_PLANS:
            return None
        b = PlanBuilder(self._next_step_id)
        if self.config.mixed_chunk:
            self._schedule_decodes(b)
            self._schedule_prefills(b)
        else:
            self._schedule_prefills(b)
            if not b.rows:  # decodes run in the steps without prefill work
                self._schedule_decodes(b)
        if not b.rows:
            return None
        self._next_step_id += 1
        plan = StepPlan(step_id=b.step_id, rows=b.rows, new_slots=b.new_slots, page_updates=b.page_updates,
                        freed_slots=self._freed_slots)
        self._freed_slots = []
        self._inflight.append(InFlight(b.step_id, b.sampled, b.drafts, b.writes, b.prompt_rows))
        return plan

    def verify_kind(self, plan: StepPlan) -> tuple[bool, bool]:
        """Of `plan`, the last this scheduler made: whether it is verify rows of the full k drafts only, and whether one
        of them is a grammar's. Under DP attention every rank replays
        the captured verify step when each rank's plan is the first (`StepPlan.dp_all_verify`), drafting eagerly
        when some rank's holds the second (`StepPlan.dp_grammar_drafts`)."""
        step = self._inflight[-1]
        assert step.step_id == plan.step_id, "only the plan just made"
        k = self.config.speculative_num_steps
        full = k > 0 and len(step.sampled) == len(plan.rows) and all(d == k for d in step.drafts)
        return full, full and any(req.sampling.grammar is not None for req in step.sampled)

    def _schedule_decodes(self, b: PlanBuilder) -> None:
        for req in list(self.running):  # oldest first: the newest are the preemption victims
            if req.slot is None or req.kv_len < len(req.fill):
                continue  # preempted in this loop, or still prefilling
            left = req.max_new_tokens - len(req.output) - req.inflight_tokens
            if left <= 0:
                continue  # its last token is already in flight (or may be)
            # NOTE: a verify row carries its full drafts wherever their latents fit the page table, near the
            # request's length limit too: the stop checks keep at most `left` of the tokens it commits, and a step
            # whose every row carries k drafts replays the captured graphs (one shorter row makes the step eager).
            # It writes positions kv_len .. kv_len + drafts, below the page table's capacity.
            drafts = min(req.max_drafts, self._table_positions - 1 - req.kv_len)
            if req.num_unsettled and drafts < req.max_drafts:
                continue  # at the page table's end behind a verify row in flight: wait for what that commits
            if not self._grow(req, req.kv_len + 1 + drafts, b):
                continue  # it was the victim itself
            prefix = PREFIX_ON_DEVICE if req.num_unsettled else req.kv_len
            b.rows.append(SeqRow(req.slot, prefix, 1 + drafts, b"", True))
            self._add_sampled(req, drafts, b)
            req.kv_len += 1 + drafts  # until the result says how many of these latents hold committed tokens
            req.planned_step = b.step_id
            b.writes.append(Write(req, req.admit_seq, req.kv_len, req.num_rejected))

    @staticmethod
    def _add_sampled(req: Req, drafts: int, b: PlanBuilder) -> None:
        b.sampled.append(req)
        b.drafts.append(drafts)
        req.num_inflight += 1
        req.inflight_tokens += 1 + drafts
        req.num_unsettled += drafts > 0

    def _schedule_prefills(self, b: PlanBuilder) -> None:
        cfg = self.config
        budget = cfg.chunked_prefill_size if cfg.chunked_prefill_size is not None else cfg.max_context_len
        decode_tokens = sum(r.extend_len for r in b.rows)  # the decode rows a mixed step holds
        budget -= decode_tokens  # (SGLang's mixed_with_decode_tokens)
        if decode_tokens and cfg.mixed_chunk_size is not None:
            budget = min(budget, cfg.mixed_chunk_size)
        for req in list(self.running):  # chunked prefills in progress go first
            if budget <= 0:
                return
            if req.slot is None or req.kv_len >= len(req.fill) or req.planned_step == b.step_id:
                continue
            num = min(len(req.fill) - req.kv_len, budget)
            if self._grow(req, req.kv_len + num, b):
                self._add_prefill_row(req, num, b)
                budget -= num
        if b.preempted:
            return  # pages are short: admitting now would only preempt again
        reserve = sum(self._future_pages(r) for r in self.running)
        while budget > 0 and self.waiting and self._free_slots:
            req = self.waiting[0]
            if req.num_inflight:
                break  # preempted with rows in flight: its last tokens are not known yet
            num = self._admit(req, budget, reserve, b)
            if num == 0:
                break
            self.waiting.popleft()
            reserve += self._future_pages(req)
            budget -= num

    def _admit(self, req: Req, budget: int, reserve: int, b: PlanBuilder) -> int:
        """Give `req` a slot and its first chunk; return the chunk length, 0 when pages are short."""
        fill = req.all_tokens()
        lp_from = req.lp_from
        # the prompt's logprobs: positions from lp_from on are computed here, not taken from the cache
        match = self.cache.match_prefix(fill if lp_from is None else fill[: lp_from + 1])
        self.cache.lock(match.node)
        target = min(req.max_len, len(fill) + self.config.reserve_tokens)
        need = self.allocator.pages_for(target) - len(match.pages)
        if need > self.allocator.num_free + self.cache.num_evictable_pages - reserve:
            self.cache.unlock(match.node)
            return 0
        num = min(len(fill) - match.matched_len, budget)
        new_pages = self._evict_and_alloc(self.allocator.pages_for(match.matched_len + num) - len(match.pages))
        assert new_pages is not None, "admission checked free + evictable pages"
        req.fill, req.kv_len, req.done_len, req.node = fill, match.matched_len, match.matched_len, match.node
        req.pages = match.pages + new_pages
        req.num_cached_pages = len(match.pages)
        req.slot = self._free_slots.pop()
        req.admit_seq = self._next_admit_seq
        self._next_admit_seq += 1
        if req.cached_tokens is None:  # count the first admission only, not re-prefills after preemption
            req.cached_tokens = match.matched_len
            if not req.warmup:
                self.stats.num_prompt_tokens += len(req.prompt)
                self.stats.num_cached_prompt_tokens += match.matched_len
        out = array("i", req.output).tobytes()
        b.new_slots.append(SlotInit(req.slot, req.rid, req.sampling, req.prompt.tobytes(), out))
        b.page_updates.append(PageUpdate(req.slot, 0, array("i", req.pages).tobytes()))
        self.running.append(req)
        self._add_prefill_row(req, num, b)
        return num

    def _add_prefill_row(self, req: Req, num: int, b: PlanBuilder) -> None:
        assert req.slot is not None
        start = req.kv_len
        last = start + num == len(req.fill)  # only the last chunk samples
        row = SeqRow(req.slot, start, num, req.fill[start : start + num].tobytes(), last)
        lp_from = req.lp_from
        if lp_from is not None:  # positions lo..hi-1 of this chunk score the prompt tokens after them
            lo, hi = max(start, lp_from), min(start + num, len(req.prompt) - 1)
            if lo < hi:
                row.lp_offset, row.lp_targets = lo - start, req.prompt[lo + 1 : hi + 1].tobytes()
                b.prompt_rows.append((req, req.admit_seq, hi - lo))
        b.rows.append(row)
        if last:
            self._add_sampled(req, 0, b)
        req.kv_len += num
        req.planned_step = b.step_id
        b.writes.append(Write(req, req.admit_seq, req.kv_len, req.num_rejected))
        self.stats.num_prefill_tokens += num

    def _future_pages(self, req: Req) -> int:
        """Pages `req` will likely still need: the rest of its prefill plus the decode reserve (and drafts)."""
        cur = max(len(req.fill), req.kv_len)
        target = min(req.max_len, cur + self.config.reserve_tokens)
        return max(0, self.allocator.pages_for(target) - len(req.pages))

    def _grow(self, req: Req, new_len: int, b: PlanBuilder) -> bool:
        """Give `req` pages for `new_len` tokens; False when it was preempted instead."""
        assert req.slot is not None
        num = self.allocator.pages_for(new_len) - len(req.pages)
        if num <= 0:
            return True
        pages = self._alloc(num, req, b)
        if pages is None:
            return False
        b.page_updates.append(PageUpdate(req.slot, len(req.pages), array("i", pages).tobytes()))
        req.pages += pages
        return True

    def _alloc(self, num: int, requester: Req, b: PlanBuilder) -> list[int] | None:
        """Free pages by LRU eviction, then by preempting the newest unplanned request; None if that is `requester`."""
        while True:
            pages = self._evict_and_alloc(num)
            if pages is not None:
                return pages
            # NOTE: requests with a row in this plan are never victims: their rows use their pages.
            # `requester` is running and unplanned, so there always is a candidate.
            victim = max((r for r in self.running if r.planned_step != b.step_id), key=lambda r: r.admit_seq)
            self._preempt(victim, b)
            if victim is requester:
                return None

    def flush_cache(self) -> tuple[int, int]:
        """Evict every cached prefix no request holds (SGLang's /flush_cache): (pages freed, cached pages left,
        which requests in flight still hold)."""
        pages = self.cache.evict(self.cache.num_cached_pages)
        self.allocator.free(pages)
        return len(pages), self.cache.num_cached_pages

    def _evict_and_alloc(self, num: int) -> list[int] | None:
        short = num - self.allocator.num_free
        if short > 0:
            self.allocator.free(self.cache.evict(short))
        return self.allocator.alloc(num)

    def _preempt(self, req: Req, b: PlanBuilder) -> None:
        """Recompute later: release pages and slot, back to the front of the queue."""
        self._release(req)
        self.running.remove(req)
        self.waiting.appendleft(req)
        req.fill, req.kv_len, req.done_len = array("i"), 0, 0  # re-prefilled from prompt + output when re-admitted
        req.prompt_lp, req.prompt_top = [], []  # owed prompt logprobs are recomputed with it
        self.stats.num_preemptions += 1
        b.preempted = True

    def _cache_prefilled(self, reqs: list[Req]) -> None:
        """Insert the full pages finished steps prefilled for each request into the radix cache; lock them for it."""
        if not self.cache.enabled:
            return
        ps = self.config.page_size
        for req in reqs:
            num = min(req.done_len, len(req.fill)) // ps
            if req.warmup or req.slot is None or num <= req.num_cached_pages:
                continue
            tokens = req.fill[: num * ps]
            if len(self.cache.peek(tokens)) != req.num_cached_pages:
                continue  # another request cached part of it in other pages: dedupe when this one ends
            res = self.cache.insert(tokens, req.pages[:num])
            assert not res.duplicates and req.node is not None
            self.cache.lock(res.node)
            self.cache.unlock(req.node)
            req.node, req.num_cached_pages = res.node, num

    # ---- releasing ---------------------------------------------------------------------------------
    def _release(self, req: Req) -> None:
        """Hand a running request's computed full pages to the cache, free the rest and its slot."""
        assert req.slot is not None and req.node is not None
        known = req.all_tokens()
        # Finished steps wrote the latents of positions < done_len (plans in flight may write more, or fail); the
        # host knows the token ids of positions < len(known).
        num = 0 if req.warmup else min(req.done_len, len(known)) // self.config.page_size
        res = self.cache.insert(known[: num * self.config.page_size], req.pages[:num])
        self.cache.unlock(req.node)
        self.allocator.free(res.duplicates + req.pages[num:])
        req.pages, req.node, req.num_cached_pages = [], None, 0
        self._free_slots.append(req.slot)
        self._freed_slots.append(req.slot)
        req.slot = None

    def _finish(self, req: Req) -> None:
        req.finished = True
        del self._requests[req.rid]
        if req.slot is not None:
            self._release(req)
            self.running.remove(req)
        else:
            self.waiting.remove(req)

    # ---- results -----------------------------------------------------------------------------------
    def process_result(self, result: StepResult) -> list[RequestOutput]:
        """Append a step's committed tokens, finish requests that stop; one RequestOutput per request that got some."""
        if not self._inflight:
            raise ValueError(f"result of step {result.step_id} arrived but no plan is in flight")
        step = self._inflight.popleft()
        step_id, reqs = step.step_id, step.sampled
        if result.step_id != step_id:
            raise ValueError(f"result of step {result.step_id} arrived while step {step_id} was expected")
        if result.failed is not None:
            return self._fail_step(step, result.failed)
        errors = dict(result.errors)
        counts = committed_counts(result, step, errors)
        live = settle_lengths(step, counts, errors)
        got = Committed.unpack(result)
        take_prompt_logprobs(step, result)
        deltas: list[RequestOutput] = []
        num_generated = 0  # tokens of served requests (not of warm-ups)
        end = 0
        for i, req in enumerate(reqs):
            first, end = end, end + counts[i]  # the row's committed tokens are got.tokens[first:end]
            self._settled(req, step.drafts[i])
            # the drafter's accept ratios: not over a processor's rows, whose drafts the worker never accepts
            if step.drafts[i] and not req.warmup and i not in errors and req.sampling.custom_logit_processor is None:
                self.stats.count_verify_row(step.drafts[i], counts[i])
            if req.finished:
                continue  # finished or aborted after this plan was sent: the row is dropped
            if i in errors:
                self._finish(req)
                delta = self._delta(req, [], None, None, "error", None)
                delta.error, delta.error_kind = errors[i], "invalid"
                deltas.append(delta)
                continue
            req.num_verify += step.drafts[i] > 0
            deltas.append(self._append(req, got, first, end))
            num_generated += 0 if req.warmup else len(deltas[-1].token_ids)
        if not (reqs and all(req.warmup for req in reqs)):
            self.stats.count_step(num_generated, result.forward_time, result.graphed)
        self._cache_prefilled([req for req in live if not req.finished])
        return deltas

    @staticmethod
    def _settled(req: Req, drafts: int) -> None:
        """A sampled row of `req` with `drafts` drafts is out of flight (`_add_sampled` undone)."""
        req.num_inflight -= 1
        req.inflight_tokens -= 1 + drafts
        req.num_unsettled -= drafts > 0

    def _append(self, req: Req, got: Committed, first: int, end: int) -> RequestOutput:
        """Append a row's committed tokens one at a time with the stop checks (a stop inside the run drops the
        tokens after it); finish `req` if it stops; its RequestOutput."""
        reason, matched = None, None
        for t in range(first, end):
            req.output.append(got.tokens[t])
            reason, matched = self._check_stop(req, got.tokens[t])
            if reason is not None:
                end = t + 1
                break
        if reason is not None:
            self._finish(req)
        lps, tops = got.logprobs_of(first, end, req.sampling)
        delta = self._delta(req, got.tokens[first:end].tolist(), lps, tops, reason, matched)
        if req.sampling.logprob_start_len >= 0 and len(req.output) == end - first:  # its first tokens
            start = req.sampling.logprob_start_len
            first_none: list[float | None] = [None] if start == 0 else []  # position 0: nothing predicts it
            delta.prompt_logprobs = first_none + req.prompt_lp
            if req.sampling.top_logprobs:
                delta.prompt_top_logprobs = ([[]] if start == 0 else []) + req.prompt_top
            req.prompt_lp, req.prompt_top = [], []
        return delta

    def _fail_step(self, step: InFlight, message: str) -> list[RequestOutput]:
        """A step the workers could not run (out of memory): its requests end with an error, nothing else does.

        Their pages go back with only what earlier steps finished cached (`done_len`); rows they have in the
        plan in flight after this one run on the workers but their results are dropped.
        """
        deltas: list[RequestOutput] = []
        for req, drafts in zip(step.sampled, step.drafts):
            self._settled(req, drafts)
        for req, seq, *_ in step.writes:
            if not req.runs_in(seq):
                continue  # already ended, or preempted since: its next admission recomputes everything
            self._finish(req)
            delta = self._delta(req, [], None, None, "error", None)
            delta.error, delta.error_kind = message, "overloaded"
            deltas.append(delta)
        self.stats.num_failed_steps += 1
        return deltas

    def _check_stop(self, req: Req, token: int) -> tuple[str | None, int | None]:
        num_out = len(req.output)
        # NOTE: the sampler holds stop tokens back until min_new_tokens, unless the request's grammar allows nothing
        # else (it is complete): then the grammar ends the output.
        early_ok = req.sampling.grammar is not None
        if (num_out > req.sampling.min_new_tokens or early_ok) and token in req.stop_ids:
            return "stop", token
        if num_out >= req.max_new_tokens:  # max_new_tokens, or the context length when it was None
            return "length", None
        return None, None

    def _delta(self, req: Req, tokens: list[int], logprobs: list[float] | None,
               top: list[list[tuple[int, float]]] | None, reason: str | None,
               matched: int | str | None) -> RequestOutput:
        return RequestOutput(rid=req.rid, token_ids=tokens, logprobs=logprobs, top_logprobs=top, finish_reason=reason,
                             matched_stop=matched, prompt_tokens=len(req.prompt), completion_tokens=len(req.output),
                             cached_tokens=req.cached_tokens or 0,
                             spec_verify_ct=req.num_verify if self.config.speculative_num_steps else None)

    # ---- metrics -----------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float | int]:
        """Gauges and counters for /metrics."""
        return {
            "num_running_requests": len(self.running),
            "num_waiting_requests": len(self.waiting),
            "num_used_pages": self.allocator.num_used,
            "num_free_pages": self.allocator.num_free,
            "num_cached_pages": self.cache.num_cached_pages,
            "num_evictable_pages": self.cache.num_evictable_pages,
            "token_usage": self.allocator.num_used / self.allocator.capacity,
            "num_inflight_plans": len(self._inflight),
            **self.stats.metrics(),
        }
