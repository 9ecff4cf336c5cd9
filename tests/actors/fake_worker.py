"""Test helpers for the scheduler: a deterministic fake worker, a driver loop, and invariant checks.

The fake worker runs StepPlans in order the way a real rank does: per-slot page tables, a simulated KV
store holding the token id written to each cache slot, and a per-slot "last sampled token" that decode rows
read. It "samples" a hash of every token id it reads back through the page table, so a wrong page, a stale
page or a wrong prefix reuse changes the output.

With `draft_accuracy` set it is also a speculating worker: a verify row (a decode row of 1 + k tokens) reads the
slot's last token and k drafts (each the true next token with probability `draft_accuracy`, a deterministic
function of the sequence), writes all k + 1 latents, and commits the accepted drafts plus the token after them,
exactly as k + 1 plain decode steps would have generated them. A verify row planned behind another in flight
(prefix PREFIX_ON_DEVICE) starts at the slot's committed length, as the real drafter's `lens` say.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from baleen.actors.policy import Scheduler
from baleen.messages import (
    PREFIX_ON_DEVICE,
    NewRequest,
    RequestOutput,
    SamplingParams,
    StepPlan,
    StepResult,
    decode,
    encode,
)

VOCAB = 997
UNWRITTEN = -1


def next_token(tokens: Sequence[int], vocab: int = VOCAB) -> int:
    """The fake model: FNV-1a over the whole sequence, reduced to the vocabulary."""
    h = 0x811C9DC5
    for t in tokens:
        h = ((h ^ (t & 0xFFFFFFFF)) * 0x01000193) & 0xFFFFFFFF
    return h % vocab


def draft_token(tokens: Sequence[int], accuracy: float, vocab: int = VOCAB) -> int:
    """The fake drafter's guess of the token after `tokens`: right with probability `accuracy` (deterministic)."""
    right = next_token(tokens, vocab)
    return right if next_token([*tokens, 0x5EED], 1000) < accuracy * 1000 else (right + 1) % vocab


def fake_logprob(token: int) -> float:
    return -(token % 17) / 4.0


def reference_tokens(prompt: Sequence[int], num: int, vocab: int = VOCAB) -> list[int]:
    """What a request generates when run alone (no stops): the fake model applied step by step."""
    seq = list(prompt)
    out: list[int] = []
    for _ in range(num):
        out.append(next_token(seq, vocab))
        seq.append(out[-1])
    return out


def i32(tokens: Sequence[int]) -> bytes:
    return array("i", tokens).tobytes()


def new_request(rid: str, prompt: Sequence[int], **sampling: object) -> NewRequest:
    return NewRequest(rid=rid, input_ids=i32(prompt), sampling=SamplingParams(**sampling))  # type: ignore[arg-type]


class FakeWorker:
    """Executes StepPlans in order against a simulated paged KV store."""

    def __init__(self, num_pages: int, page_size: int, num_slots: int, max_pages_per_slot: int, vocab: int = VOCAB,
                 draft_accuracy: float | None = None):
        self.page_size = page_size
        self.vocab = vocab
        self.draft_accuracy = draft_accuracy  # None: not a speculating worker (a verify row is an error)
        self.kv = [UNWRITTEN] * (num_pages * page_size)  # token id whose latent sits in each cache slot
        self.page_tables = [[0] * max_pages_per_slot for _ in range(num_slots)]  # 0: the padding page
        self.slot_tokens: list[int | None] = [None] * num_slots
        self.slot_sampling: list[SamplingParams | None] = [None] * num_slots
        self.slot_rid: list[str | None] = [None] * num_slots
        self.slot_len: list[int | None] = [None] * num_slots  # valid latents of the slot's sequence
        self.generated: dict[str, list[int]] = {}  # rid -> every token sampled for it, dropped rows included
        self.next_step_id = 0
        self.num_prefill_tokens = 0  # tokens of rows with explicit input ids
        self.num_decode_rows = 0
        self.num_verify_rows = 0
        self.num_drafts = 0
        self.num_device_prefix_rows = 0  # verify rows planned behind one in flight (PREFIX_ON_DEVICE)
        self.num_accepted = 0
        self.plans: list[StepPlan] = []

    def execute(self, plan: StepPlan) -> StepResult:
        msg = decode(encode(plan))  # every plan must survive the wire
        assert isinstance(msg, StepPlan)
        plan = msg
        assert plan.step_id == self.next_step_id, f"plan {plan.step_id} out of order"
        self.next_step_id += 1
        self.plans.append(plan)
        for slot in plan.freed_slots:
            self.slot_sampling[slot] = None
            self.slot_tokens[slot] = None
            self.slot_rid[slot] = None
            self.slot_len[slot] = None
        for init in plan.new_slots:
            assert self.slot_sampling[init.slot] is None, f"slot {init.slot} initialised while in use"
            self.slot_sampling[init.slot] = init.sampling
            self.slot_tokens[init.slot] = None
            self.slot_rid[init.slot] = init.rid
            self.slot_len[init.slot] = None
            # A request re-prefilled after a preemption resumes with exactly the tokens it generated.
            assert _ints(init.output_ids) == self.generated.setdefault(init.rid, []), f"{init.rid} output_ids"
        for upd in plan.page_updates:
            pages = _ints(upd.pages)
            self.page_tables[upd.slot][upd.start : upd.start + len(pages)] = pages
        ps = self.page_size
        assert len({r.slot for r in plan.rows}) == len(plan.rows), "a slot appears twice in one step"
        # A verify row planned behind one in flight starts where the device says that one committed to.
        for i, r in enumerate(plan.rows):
            if r.prefix_len == PREFIX_ON_DEVICE:
                assert not r.input_ids and r.extend_len > 1, "PREFIX_ON_DEVICE on a row that is no verify row"
                assert self.slot_len[r.slot] is not None, f"slot {r.slot}: PREFIX_ON_DEVICE before any row ran"
                plan.rows[i] = msgspec.structs.replace(r, prefix_len=self.slot_len[r.slot])
                self.num_device_prefix_rows += 1
        # Like a real forward: every row's new latents are written before any attention reads.
        for row in plan.rows:
            assert self.slot_sampling[row.slot] is not None, f"row for uninitialised slot {row.slot}"
            if row.input_ids:
                tokens = _ints(row.input_ids)
                self.num_prefill_tokens += len(tokens)
            else:
                token = self.slot_tokens[row.slot]
                assert token is not None, f"decode row for slot {row.slot} before anything was sampled"
                # The planned prefix is the slot's committed length: one more than any row in flight would know.
                assert row.prefix_len == self.slot_len[row.slot], f"slot {row.slot}: decode row at {row.prefix_len}, " \
                    f"{self.slot_len[row.slot]} latents valid"
                tokens = [token, *self._drafts(row.slot, row.prefix_len, token, row.extend_len - 1)]
                self.num_decode_rows += 1
            assert len(tokens) == row.extend_len
            table = self.page_tables[row.slot]
            for j, t in enumerate(tokens):
                pos = row.prefix_len + j
                page = table[pos // ps]
                assert page != 0, f"slot {row.slot} writes position {pos} into the padding page"
                self.kv[page * ps + pos % ps] = t
            self.slot_len[row.slot] = row.prefix_len + row.extend_len
        sampled: list[tuple[int, list[int]]] = []
        for row in plan.rows:
            if not row.sample:
                continue
            table = self.page_tables[row.slot]
            seq = [self.kv[table[p // ps] * ps + p % ps] for p in range(row.prefix_len + row.extend_len)]
            assert UNWRITTEN not in seq, f"slot {row.slot} reads a latent that was never written"
            # A verify row commits each draft the model agrees with, then the model's own token after them.
            end = row.prefix_len + 1 if not row.input_ids else len(seq)
            committed = [next_token(seq[:end], self.vocab)]
            while end < len(seq) and seq[end] == committed[-1]:
                end += 1
                committed.append(next_token(seq[:end], self.vocab))
            if row.extend_len > 1 and not row.input_ids:
                self.num_accepted += len(committed) - 1
                self.slot_len[row.slot] = row.prefix_len + len(committed)
            sampled.append((row.slot, committed))
        for slot, committed in sampled:
            self.slot_tokens[slot] = committed[-1]
            self.generated[self.slot_rid[slot] or ""].extend(committed)
        return self._result(plan.step_id, sampled)

    def _drafts(self, slot: int, prefix_len: int, token: int, num: int) -> list[int]:
        """The drafts the drafter left for the slot: `num` guesses continuing its valid sequence and `token`."""
        if num == 0:
            return []
        assert self.draft_accuracy is not None, "a verify row reached a worker that does not speculate"
        ps, table = self.page_size, self.page_tables[slot]
        seq = [self.kv[table[p // ps] * ps + p % ps] for p in range(prefix_len)] + [token]
        drafts: list[int] = []
        for _ in range(num):
            drafts.append(draft_token(seq, self.draft_accuracy, self.vocab))
            seq.append(drafts[-1])
        self.num_verify_rows += 1
        self.num_drafts += num
        return drafts

    def _result(self, step_id: int, sampled: list[tuple[int, list[int]]]) -> StepResult:
        params = [self.slot_sampling[s] for s, _ in sampled]
        want_lp = any(p is not None and p.logprobs for p in params)
        k = max((p.top_logprobs for p in params if p is not None), default=0)
        tokens = [t for _, committed in sampled for t in committed]
        top_ids = [(t + j) % self.vocab for t in tokens for j in range(k)]
        counts = [len(committed) for _, committed in sampled]
        return StepResult(
            step_id=step_id,
            token_ids=i32(tokens),
            num_tokens=i32(counts) if any(n > 1 for n in counts) else None,
            logprobs=array("f", [fake_logprob(t) for t in tokens]).tobytes() if want_lp else None,
            top_k=k,
            top_ids=i32(top_ids) if k else None,
            top_logprobs=array("f", [fake_logprob(t) for t in top_ids]).tobytes() if k else None,
            forward_time=0.001,
        )


def _ints(b: bytes) -> list[int]:
    a = array("i")
    a.frombytes(b)
    return a.tolist()


@dataclass
class Outcome:
    """Everything a driven run produced."""

    deltas: dict[str, list[RequestOutput]] = field(default_factory=dict)
    num_steps: int = 0

    def tokens(self, rid: str) -> list[int]:
        return [t for d in self.deltas[rid] for t in d.token_ids]

    def final(self, rid: str) -> RequestOutput:
        return self.deltas[rid][-1]

    def add(self, deltas: list[RequestOutput]) -> None:
        for d in deltas:
            got = self.deltas.setdefault(d.rid, [])
            assert not got or got[-1].finish_reason is None, f"{d.rid} got a delta after it finished"
            got.append(d)


def make_worker(sched: Scheduler, draft_accuracy: float | None = None) -> FakeWorker:
    cfg = sched.config
    max_pages = -(-cfg.max_context_len // cfg.page_size)
    return FakeWorker(cfg.num_pages, cfg.page_size, cfg.max_running_requests, max_pages, draft_accuracy=draft_accuracy)


def drive(
    sched: Scheduler,
    worker: FakeWorker,
    arrivals: dict[int, list[NewRequest]],
    overlap: bool,
    aborts: dict[int, list[str]] | None = None,
    on_step: Callable[[Scheduler, StepPlan | None], None] | None = None,
    max_steps: int = 20_000,
) -> Outcome:
    """Run the actor loop shape until every request finished: arrivals and aborts are keyed by loop step."""
    arrivals = {k: list(v) for k, v in arrivals.items()}
    aborts = {k: list(v) for k, v in (aborts or {}).items()}
    out = Outcome()
    pending: deque[StepResult] = deque()
    step = 0
    while arrivals or aborts or sched.has_work or pending:
        assert step < max_steps, "the scheduler made no progress"
        for req in arrivals.pop(step, []):
            sched.add_request(req)
        plan = sched.schedule()
        if plan is not None:
            pending.append(worker.execute(plan))
        for rid in aborts.pop(step, []):  # with overlap, two plans are in flight here
            delta = sched.abort(rid)
            if delta is not None:
                out.add([delta])
        if on_step is not None:
            on_step(sched, plan)
        # With overlap, step N's result is read only after step N+1 was launched.
        while pending and (not overlap or len(pending) >= 2 or plan is None):
            out.add(sched.process_result(pending.popleft()))
        step += 1
    out.num_steps = step
    return out


def check_invariants(sched: Scheduler) -> None:
    """Every page is free, cached or private to exactly one request; refcounts match the requests."""
    cache, alloc = sched.cache, sched.allocator
    ps = sched.config.page_size
    owners: dict[int, str] = {}

    def own(page: int, who: str) -> None:
        assert 0 < page < alloc.num_pages, f"{who} holds page {page} outside the pool"
        assert page not in owners, f"page {page} held by {owners[page]} and {who}"
        owners[page] = who

    expected_refs: dict[int, int] = {}
    for node in cache.iter_nodes():
        assert len(node.key) == len(node.pages) * ps and node.pages, "node key is not whole pages"
        for p in node.pages:
            own(p, "cache")
        expected_refs[id(node)] = 0
    slots = set()
    for req in sched.running:
        assert req.slot is not None and req.node is not None and not req.finished
        assert req.slot not in slots, f"slot {req.slot} used twice"
        slots.add(req.slot)
        assert len(req.pages) >= alloc.pages_for(req.kv_len), f"{req.rid} has too few pages"
        path: list[int] = []
        node = req.node
        while node is not cache.root:
            path = node.pages + path
            expected_refs[id(node)] += 1
            assert node.parent is not None
            node = node.parent
        assert req.pages[: req.num_cached_pages] == path, f"{req.rid}'s cached pages differ from its path"
        for p in req.pages[req.num_cached_pages :]:
            own(p, req.rid)
    for req in sched.waiting:
        assert req.slot is None and not req.pages and not req.finished
    assert not slots & set(sched._free_slots), "a running request's slot is also free"
    assert len(slots) + len(sched._free_slots) == sched.config.max_running_requests
    for page in range(1, alloc.num_pages):
        if alloc.is_free(page):
            own(page, "free")
    assert len(owners) == alloc.capacity, f"{alloc.capacity - len(owners)} pages leaked"
    for node in cache.iter_nodes():
        assert node.lock_ref == expected_refs[id(node)], "radix refcount differs from the requests locking it"
    assert cache.num_cached_pages == sum(len(n.pages) for n in cache.iter_nodes())
    assert cache.num_evictable_pages == sum(len(n.pages) for n in cache.iter_nodes() if n.lock_ref == 0)


def check_cache_contents(sched: Scheduler, worker: FakeWorker) -> None:
    """The fake KV store holds, in every cached page, exactly the tokens the radix tree says it does."""
    ps = sched.config.page_size
    for node in sched.cache.iter_nodes():
        for i, page in enumerate(node.pages):
            assert worker.kv[page * ps : (page + 1) * ps] == node.key[i * ps : (i + 1) * ps].tolist()


def check_idle(sched: Scheduler) -> None:
    """Nothing running: every page free or cached with refcount zero, every slot free."""
    assert not sched.running and not sched.waiting and sched.num_inflight == 0
    check_invariants(sched)
    assert all(n.lock_ref == 0 for n in sched.cache.iter_nodes())
    assert sched.allocator.num_free + sched.cache.num_cached_pages == sched.allocator.capacity
    assert sched.cache.num_evictable_pages == sched.cache.num_cached_pages
