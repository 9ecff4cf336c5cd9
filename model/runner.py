"""The model runner: one rank's StepPlans become forward passes and sampled tokens.

Per-request state lives in *slots* on the device: the last sampled token (`slot_tokens`), the page table
(`page_table`), and the sampling parameters (in `SamplingState`). A decode row carries no token id: its input
is gathered from `slot_tokens` on the device, which is what lets the scheduler plan step N+1 before step N's
tokens reached the host. The only host sync of a step is `finish()` reading the sampled ids; a step with
grammar-constrained rows (structured output) also needs the previous step's ids before it can sample: `launch`
queues its forward and defers its sampling, `complete` samples once the caller has waited for them (see
model/grammar.py).

A plain decode step on captured CUDA graphs costs the host one copy in and one copy out: the graph derives
its inputs from the slots (`DecodeGraphs.replay`, the one replay path) and, when every row is greedy with
nothing else asked, a captured tail samples too. One extra slot (`scratch_slot`, index num_slots) belongs to
no request: padding rows and rows whose token is not kept point at it. A speculating runner captures the verify
step's graphs instead (`SpecGraphs`, model/spec_graphs.py), for steps whose every row is a verify row of k drafts.
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import torch

from baleen.messages import PageUpdate, SlotInit, StepPlan, StepResult
from baleen.model.attention import AttentionBackend, GraphAttentionBackend
from baleen.model.batch import ForwardBatch
from baleen.model.grammar import GrammarSlots, SlotGrammar
from baleen.model.logit_processors import FailedProcessor, GuardedProcessor
from baleen.model.sampler import Ahead, BatchFlags, Sampler, TokenMask
from baleen.model.step import DeferredSample, PendingStep, RunnerConfig, to_host

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from baleen.model.build import WorkerConfig
    from baleen.model.cuda_graph import DecodeGraphs
    from baleen.model.deepseek import DeepseekV3ForCausalLM
    from baleen.model.kv_cache import KVCache
    from baleen.model.logit_processors import LogitProcessor, LogitProcessorRegistry
    from baleen.model.parallel import ParallelGroups
    from baleen.model.spec_graphs import SpecGraphs
    from baleen.model.speculative import MtpDrafter, VerifyLayout


log = logging.getLogger("baleen.runner")


def _i32(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.int32)


class ModelRunner:
    """Runs StepPlans on one rank: model, KV cache, attention backend, sampler (and its per-slot state).

    Built by `model/build.py: build_runner`, in start-up order; `capture_graphs` adds the decode CUDA graphs.
    """

    def __init__(
        self,
        model: DeepseekV3ForCausalLM,
        kv_cache: KVCache,
        attn: AttentionBackend,
        sampler: Sampler,
        config: RunnerConfig,
        device: torch.device,
        *,
        processors: LogitProcessorRegistry | None = None,
        tokenizer: Tokenizer | None = None,
        random_seed: int = 0,
        grammars: GrammarSlots | None = None,
        drafter: MtpDrafter | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.attn = attn
        self.sampler = sampler
        self.config = config
        self.device = device
        self.processors = processors  # None: custom logit processors are disabled
        self.tokenizer = tokenizer
        self.random_seed = random_seed
        self.graphs: DecodeGraphs | None = None  # captured decode forwards (`capture_graphs`)
        self.spec_graphs: SpecGraphs | None = None  # captured verify steps (`capture_spec_graphs`)
        self.scratch_slot = config.num_slots
        self.slot_tokens = torch.zeros(config.num_slots + 1, dtype=torch.int64, device=device)
        # NOTE: entry 0 of the pool is the padding page; unused table entries point at it.
        self.page_table = torch.zeros(config.num_slots + 1, config.max_pages_per_seq, dtype=torch.int32, device=device)
        # slot -> (processor, output ids so far) for requests that asked for a custom logit processor
        self.slot_procs: dict[int, tuple[Any, list[int]]] = {}
        self.grammars = grammars  # None: structured output is not served
        self.drafter = drafter  # None: no speculative decoding
        self._unaccepted: PendingStep | None = None  # the last step with constrained rows its matchers have not seen
        self._deferred: PendingStep | None = None  # a launched step whose sampling waits for `_unaccepted`'s tokens
        self._pinned = device.type == "cuda"

    @staticmethod
    def build(config: WorkerConfig, groups: ParallelGroups | None = None) -> ModelRunner:
        """A rank's runner built in start-up order (model/build.py: `build_runner`): weights, attention backend, KV
        cache sized from measured memory, the drafter, CUDA graphs; a ParallelRunner for a rank of several."""
        from baleen.model.build import build_runner

        return build_runner(config, groups)

    def capture_graphs(self, batch_sizes: list[int], num_heads: int, dp_size: int = 1,
                       eager: bool = False) -> DecodeGraphs:  # fmt: skip
        """Capture decode graphs of `batch_sizes` rows (`num_heads` attention heads on this rank), reading their
        inputs from this runner's slots; later plain decode steps replay them. Under DP attention (`dp_size` DP
        ranks) every rank captures, and later replays, each size together (model/cuda_graph.py). `eager`: the
        'graphs' run their bodies eagerly instead (any device and backend: debugging, CPU tests)."""
        from baleen.model.cuda_graph import DecodeGraphs

        if not eager and not isinstance(self.attn, GraphAttentionBackend):
            raise ValueError(f"{type(self.attn).__name__} has no CUDA-graph support; add --disable-cuda-graph")
        self._reserve_rotary()
        graphs = DecodeGraphs(self.model, self.kv_cache, self.attn, self.sampler, batch_sizes, num_heads,
                              self.slot_tokens, self.page_table, self.scratch_slot, dp_size, eager)  # fmt: skip
        if eager:
            graphs.make_eager()
        else:
            graphs.capture()
        self.graphs = graphs
        return graphs

    def capture_spec_graphs(self, batch_sizes: list[int], num_heads: int, attn: AttentionBackend | None = None,
                            dp_size: int = 1, eager: bool = False) -> SpecGraphs:  # fmt: skip
        """Capture the speculative verify step's graphs (draft loop, verify, greedy tail, draft-extend) of
        `batch_sizes` rows, attending with `attn` (default: the runner's backend; one that can re-plan nothing
        before a replay, model/spec_graphs.py); later steps whose every row is a verify row of k drafts replay them.
        `dp_size` and `eager` as `capture_graphs`."""
        from baleen.model.spec_graphs import SpecGraphs

        if self.drafter is None:
            raise ValueError("speculative graphs need the runner's drafter (speculative_num_steps)")
        self._reserve_rotary()
        graphs = SpecGraphs(self.model, self.drafter, self.kv_cache, attn or self.attn, self.sampler, batch_sizes,
                            num_heads, self.slot_tokens, self.page_table, self.scratch_slot, eager=eager,
                            dp_size=dp_size)  # fmt: skip
        if eager:
            graphs.make_eager()
        else:
            graphs.capture()
        self.spec_graphs = graphs
        return graphs

    def _reserve_rotary(self) -> None:
        """Build the model's and the drafter's rotary caches for every position a slot's page table can hold, once,
        before a capture (`RotaryEmbedding.reserve`: the graphs read their storage, which may not move after)."""
        positions = self.page_table.shape[1] * self.config.page_size + 1
        self.model.rotary.reserve(positions, self.device)
        if self.drafter is not None:
            self.drafter.mtp.rotary.reserve(positions, self.device)

    # ---- slot state ------------------------------------------------------------------------------
    def _apply_slot_changes(self, plan: StepPlan) -> None:
        for slot in plan.freed_slots:
            self.sampler.state.clear_slot(slot)
            self.slot_procs.pop(slot, None)
            if self.grammars is not None:
                self.grammars.clear_slot(slot)  # a step in flight keeps its own reference to the matcher
        for init in plan.new_slots:
            self._init_slot(init)
        if plan.page_updates:
            self._write_pages(plan.page_updates)

    def _init_slot(self, init: SlotInit) -> None:
        prompt = _i32(init.prompt_ids).tolist()
        output = _i32(init.output_ids).tolist()
        params = init.sampling
        if params.seed is None:
            # A stable per-request seed: a recomputed (preempted) request draws the same noise again.
            params = msgspec.structs.replace(params, seed=zlib.crc32(init.rid.encode()) ^ self.random_seed)
        self.sampler.state.set_slot(init.slot, params, prompt, output)
        self.slot_procs.pop(init.slot, None)
        if self.grammars is not None:
            self.grammars.clear_slot(init.slot)
            if params.grammar is not None:
                self.grammars.set_slot(init.slot, params.grammar, output)
        elif params.grammar is not None:
            raise ValueError("this runner serves no structured output (it was built without grammars)")
        name = init.sampling.custom_logit_processor
        if name is not None:
            # NOTE: a processor that cannot be built fails its request at its first sampled token, never
            # the worker: the other requests of the batch go on.
            proc: Any
            if self.processors is None:
                proc = FailedProcessor("custom logit processors are disabled (--enable-custom-logit-processor)")
            else:
                try:
                    # NOTE: without a tokenizer.json a processor gets None; one that needs a tokenizer fails here.
                    custom = init.sampling.custom_params or {}
                    proc = self.processors.create(name, custom, self.tokenizer)  # type: ignore[arg-type]
                except Exception as e:
                    proc = FailedProcessor(str(e))
            self.slot_procs[init.slot] = (proc, output)

    def _write_pages(self, updates: list[PageUpdate]) -> None:
        rows, cols, vals = [], [], []
        for u in updates:
            pages = _i32(u.pages)
            rows.append(np.full(len(pages), u.slot, dtype=np.int64))
            cols.append(np.arange(u.start, u.start + len(pages), dtype=np.int64))
            vals.append(pages.astype(np.int64))
        idx = self._to_device(np.concatenate([np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)]))
        n = idx.shape[0] // 3
        self.page_table[idx[:n], idx[n : 2 * n]] = idx[2 * n :].to(torch.int32)

    # ---- the step --------------------------------------------------------------------------------
    def build_batch(self, plan: StepPlan) -> tuple[ForwardBatch, torch.Tensor, list[int]]:
        """Host lists -> one host->device copy -> the ForwardBatch, the sampled rows' slots (device and host).

        A speculative verify row (no input ids, extend_len 1 + k) reads its slot's token and k drafts, and each of
        its tokens is a logits row (its slot repeated in the sampled slots)."""
        rows = plan.rows
        num_seqs = len(rows)
        ext = np.fromiter((r.extend_len for r in rows), dtype=np.int64, count=num_seqs)
        prefix = np.fromiter((r.prefix_len for r in rows), dtype=np.int64, count=num_seqs)
        slots = np.fromiter((r.slot for r in rows), dtype=np.int64, count=num_seqs)
        qo = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(ext, out=qo[1:])
        num_tokens = int(qo[-1])
        tok_seq = np.repeat(np.arange(num_seqs, dtype=np.int64), ext)  # [T] row of each token
        positions = prefix[tok_seq] + (np.arange(num_tokens, dtype=np.int64) - qo[:-1][tok_seq])
        explicit = np.zeros(num_tokens, dtype=np.int64)
        from_slot = np.full(num_tokens, -1, dtype=np.int64)  # slot to read the input token from, or -1
        # A verify row's token j >= 1 is its slot's draft j (speculative decoding): flat index into the drafts, or -1
        from_draft = np.full(num_tokens, -1, dtype=np.int64)
        for i, r in enumerate(rows):
            if r.input_ids:
                explicit[qo[i] : qo[i + 1]] = _i32(r.input_ids)
            else:
                from_slot[qo[i]] = r.slot
                if r.extend_len > 1:
                    k = self.drafter.num_steps if self.drafter is not None else 0
                    if r.extend_len - 1 > k:
                        raise ValueError(f"a verify row of {r.extend_len - 1} drafts, but this runner drafts {k}")
                    from_draft[qo[i] + 1 : qo[i + 1]] = r.slot * k + np.arange(r.extend_len - 1)
        # logits rows: a verify row's every token (the sample after each), any other sampled row's last
        sample_rows = np.fromiter((i for i, r in enumerate(rows) if r.sample), dtype=np.int64)
        verify = np.fromiter((not r.input_ids for r in rows), dtype=bool, count=num_seqs)[sample_rows]
        first = np.where(verify, qo[:-1][sample_rows], qo[1:][sample_rows] - 1)
        count = qo[1:][sample_rows] - first
        logits_idx = np.arange(int(count.sum()), dtype=np.int64) + np.repeat(first - (np.cumsum(count) - count), count)
        sampled_slots = slots[tok_seq[logits_idx]]
        seq_lens = prefix + ext
        host = np.concatenate([explicit, from_slot, from_draft, positions, tok_seq, slots, qo, seq_lens, prefix,
                               logits_idx, sampled_slots])  # fmt: skip
        dev = self._to_device(host)
        t, s, n = num_tokens, num_seqs, len(logits_idx)
        views = torch.split(dev, [t, t, t, t, t, s, s + 1, s, s, n, n])
        explicit_d, from_slot_d, from_draft_d, positions_d, tok_seq_d, slots_d, qo_d, seq_lens_d, prefix_d, logits_d, sslots_d = views
        input_ids = torch.where(from_slot_d >= 0, self.slot_tokens[from_slot_d.clamp(min=0)], explicit_d)
        if self.drafter is not None and (from_draft >= 0).any():
            drafts = self.drafter.tokens.view(-1)[from_draft_d.clamp(min=0)]
            input_ids = torch.where(from_draft_d >= 0, drafts, input_ids)
        ps = self.config.page_size
        # NOTE: the width rounded up to 16 pages: a kernel that specialises its row stride on % 16 (the Gluon MLA
        # decode) then compiles once, not once more when the longest sequence crosses into a new class.
        need = max(1, -(-int(seq_lens.max(initial=0)) // ps))
        max_pages = min(self.page_table.shape[1], -(-need // 16) * 16)
        table = self.page_table[slots_d, :max_pages]  # [num_seqs, max_pages]
        out_loc = table[tok_seq_d, positions_d // ps].to(torch.int64) * ps + positions_d % ps
        batch = ForwardBatch(
            input_ids=input_ids,
            positions=positions_d,
            out_loc=out_loc,
            qo_indptr=qo_d.to(torch.int32),
            seq_lens=seq_lens_d.to(torch.int32),
            prefix_lens=prefix_d.to(torch.int32),
            page_table=table,
            logits_indices=logits_d,
            seq_lens_cpu=seq_lens.tolist(),
            extend_lens_cpu=ext.tolist(),
            page_size=ps,
        )
        return batch, sslots_d, sampled_slots.tolist()

    def dp_graph_size(self, plan: StepPlan) -> int | None:
        """Under DP attention, the captured size every DP rank replays for this step (the largest rank's batch,
        padded), or None when the step runs eagerly on every rank. Decided from what the plans of all ranks share
        (`dp_num_tokens`, `dp_all_decode`), never from this rank's rows alone: the ranks' collectives must match."""
        g = self.graphs
        counts = plan.dp_num_tokens
        if g is None or g.dp_size == 1 or not counts or not plan.dp_all_decode or not 0 < max(counts) <= g.max_bs:
            return None
        return g.padded_size(max(counts))

    def staged_rows(self, plan: StepPlan) -> torch.Tensor | None:
        """The step rows of a plain decode step (see `DecodeGraphs.replay`), or None when the step is not one:
        some row extends by more than one token or has no prefix, or the batch outgrows the graphs. Under DP
        attention, rows padded to `dp_graph_size` (no rows at all on an idle rank), or None on every rank."""
        g = self.graphs
        rows = plan.rows
        n = len(rows)
        if g is None:
            return None
        if plan.dp_num_tokens:
            size = self.dp_graph_size(plan)
            if size is None:
                return None
            # NOTE: dp_all_decode (actors/dp.py) already says every row of every rank is a decode row
        else:
            if not 0 < n <= g.max_bs or any(r.extend_len != 1 or r.prefix_len < 1 for r in rows):
                return None
            if max(r.prefix_len for r in rows) >= g.max_pages * self.config.page_size:
                return None
            size = g.padded_size(n)
        host = torch.empty((size, 4), dtype=torch.int64, pin_memory=self._pinned)
        h = host.numpy()
        h[n:] = g.padding_row(self.scratch_slot)
        for i, r in enumerate(rows):
            h[i] = (r.slot, r.prefix_len + 1, _i32(r.input_ids)[0] if r.input_ids else -1,
                    r.slot if r.sample else self.scratch_slot)  # fmt: skip
        return host

    # A single-rank runner survives a step that runs out of memory: that step's requests fail, the rest go on.
    # NOTE: ranks of a multi-rank model cannot: the others would wait in a collective the failed rank never
    # joins, so there the error propagates and the rank dies (the engine reports it and exits).
    recovers_from_oom = True

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> PendingStep:
        """Apply slot changes, run the forward and the sampler; the results stay on the device.

        Running out of device memory fails the step (`PendingStep.failed`), not the runner, where it can
        recover (`recovers_from_oom`): the slot changes stay applied, the memory the step took is released.
        """
        started = time.perf_counter()
        if self._deferred is not None:
            self.complete(self._deferred)  # a caller that never completed it: its tokens are this step's inputs
        self._apply_slot_changes(plan)
        try:
            return self._launch(plan, started)
        except torch.OutOfMemoryError as e:
            if not self.recovers_from_oom:
                raise
            message = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
            failed = (f"step {plan.step_id} ran out of device memory ({sum(r.extend_len for r in plan.rows)} tokens "
                      f"in {len(plan.rows)} rows): {message}")
        log.error("%s; its requests fail, the engine goes on", failed)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the step's activations are garbage now; give their blocks back
        return PendingStep(plan.step_id, 0, {}, None, 0, started, failed=failed)

    def _launch(self, plan: StepPlan, started: float) -> PendingStep:
        if self.drafter is not None:
            return self._launch_speculative(plan, started, self.drafter)
        host: dict[str, torch.Tensor] = {}
        errors: list[tuple[int, str]] = []
        logits: torch.Tensor | None = None
        flags: BatchFlags | None = None  # the sampler's, computed once a step (staged: before the graph runs)
        grammar_rows: list[tuple[int, SlotGrammar]] = []
        prompt_top_k = 0  # the prompt logprobs' table width (never in a graphed step: prefill rows are not)
        staged = self.staged_rows(plan)
        if staged is not None:
            assert self.graphs is not None
            sample_rows = [i for i, r in enumerate(plan.rows) if r.sample]
            sampled_slots = [plan.rows[i].slot for i in sample_rows]
            flags = self.sampler.state.flags(sampled_slots)
            grammar_rows = self.grammars.rows(sampled_slots) if self.grammars else []
            greedy = len(sample_rows) == len(plan.rows) and not grammar_rows and self._plain_greedy(sampled_slots, flags)
            logits, tokens = self.graphs.replay(staged, len(plan.rows), greedy)
            if tokens is not None:
                host["token_ids"] = to_host(tokens)
                logits = None  # sampled already
            elif not sample_rows:
                logits = None  # every row is a prompt chunk that samples nothing
            elif len(sample_rows) < len(plan.rows):
                logits = logits[self._to_device(np.asarray(sample_rows))]
            sample_slots = self.graphs.step_rows[: len(plan.rows), 0]
            if len(sample_rows) < len(plan.rows):
                sample_slots = self._to_device(np.asarray(sampled_slots))
        else:
            batch, sample_slots, sampled_slots = self.build_batch(plan)
            if batch.num_tokens:
                self.attn.plan(batch)
                hidden = self.model(batch, self.kv_cache, self.attn)
                if sampled_slots:
                    logits = self.model.compute_logits(hidden[batch.logits_indices])
                prompt_top_k = self._prompt_logprobs(plan, hidden, host)
            grammar_rows = self.grammars.rows(sampled_slots) if self.grammars else []
        step = PendingStep(plan.step_id, len(sampled_slots), host, None, 0, started, sampled_slots, errors,
                           grammar_rows=grammar_rows if logits is not None else [], prompt_top_k=prompt_top_k,
                           graphed=staged is not None)
        if logits is None:
            self._record(step)
            return step
        step.deferred = DeferredSample(logits, sample_slots, flags or self.sampler.state.flags(sampled_slots))
        if step.grammar_rows and self._unaccepted is not None:
            # NOTE: the overlap's slack. The forward is queued; the mask needs the previous step's tokens, which
            # are still on the device. The caller waits for them (`tokens_awaited`) off its event loop, then
            # `complete` fills the mask and queues the sampler, while the GPU runs this forward.
            self._deferred = step
        else:
            self._complete(step)
        return step

    def _launch_speculative(self, plan: StepPlan, started: float, drafter: MtpDrafter) -> PendingStep:
        """A step with the MTP drafter (model/speculative.py): drafts for the verify rows, the target forward over
        every row, every verify token sampled, the accepted ones committed, then the draft-extend.

        A step whose every row is a verify row of k drafts replays the captured graphs (`_launch_spec_graphed`); any
        other runs eagerly here. NOTE: sampled at once (no deferred sampling yet). A row with a custom logit
        processor commits one token (`_sample_verify`); a grammar row's drafts are taken under its grammar (`_draft`),
        and its masks wait for the previous step's tokens here, and for its drafts (each verify row is masked as its
        matcher stands after the drafts before it; the draft loop filled all but each request's last, `_draft`)."""
        from baleen.model.speculative import verify_layout

        if self.spec_graphs is not None:
            rows = self.spec_graphs.step_rows_of(plan, self._pinned)
            if rows is not None:
                return self._launch_spec_graphed(plan, started, rows, self.spec_graphs, drafter)
        plan = drafter.resolve(plan)  # NOTE: a row behind a verify row in flight waits for it here (eager only)
        grammar_drafts, walked = self._draft(plan, drafter)
        batch, sample_slots, sampled_slots = self.build_batch(plan)
        host: dict[str, torch.Tensor] = {}
        errors: list[tuple[int, str]] = []
        step = PendingStep(plan.step_id, len(sampled_slots), host, None, 0, started, sampled_slots, errors)
        if not batch.num_tokens and not plan.dp_num_tokens:
            self._record(step)
            return step
        if batch.num_tokens:
            self.attn.plan(batch)
        # an idle DP rank too: it joins every layer's MoE exchange, the target's and the MTP layer's
        hidden = self.model(batch, self.kv_cache, self.attn)
        step.prompt_top_k = self._prompt_logprobs(plan, hidden, host)
        empty = torch.zeros(0, dtype=torch.int64, device=self.device)
        if not sampled_slots:
            drafter.extend(batch, hidden, empty, empty, empty, self.kv_cache, self.attn)
            self._record(step)
            return step
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        layout = verify_layout(plan, drafter.tokens, self.device, self.slot_procs.keys())
        # each sampled row's latents before its first logits row's token: its end less its logits rows
        base = np.fromiter((r.prefix_len + r.extend_len for r in plan.rows if r.sample), dtype=np.int64) - layout.counts
        tokens, last = self._sample_verify(step, layout, logits, sample_slots, self.sampler.state.flags(sampled_slots),
                                           grammar_drafts, walked, self._to_device(base))  # fmt: skip
        drafter.extend(batch, hidden, tokens, last, sample_slots[last], self.kv_cache, self.attn)
        self._record(step)
        if step.grammar_rows:
            self._unaccepted = step
        return step

    def _sample_verify(self, step: PendingStep, layout: VerifyLayout, logits: torch.Tensor, sample_slots: torch.Tensor,
                       flags: BatchFlags, grammar_drafts: dict[int, list[int]], walked: dict[int, list[torch.Tensor]],
                       base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Sample a speculative step's every logits row (grammar rows under their masks, walked over the drafts before
        each: `_draft`'s drafts and masks; a custom processor on its rows' first logits rows), accept, commit (`_commit_accepted`; `base` each sampled row's latents
        before its first logits row). Returns (the samples [num_logits_rows], each row's last committed logits row);
        the step's grammar rows, top-k width, host copies and errors are set on `step`."""
        sampled_slots = step.sampled_slots
        step.grammar_rows = self.grammars.rows(sampled_slots) if self.grammars else []
        drafts: list[int] | None = None  # the draft each grammar row checks, for its mask (host)
        known: list[torch.Tensor | None] | None = None  # each grammar row's mask where the draft loop filled it
        if layout.has_drafts and step.grammar_rows:  # the draft each row checks, from the host copy of the drafts
            drafts, known = [], []
            for j, _ in step.grammar_rows:
                r = int(np.searchsorted(layout.starts, j, side="right")) - 1
                at, ds = j - int(layout.starts[r]), grammar_drafts.get(sampled_slots[j])
                drafts.append(ds[at] if ds is not None and at < layout.counts[r] - 1 else -1)
                masks = walked.get(sampled_slots[j], [])
                known.append(masks[at] if at < len(masks) else None)
        mask = self._token_mask(step.grammar_rows, step.errors, drafts, known) if step.grammar_rows else None
        # A custom processor sees each token before the next: it runs on its verify row's first logits row only (the
        # layout checks none of that row's drafts: `verify_layout`'s never_accept)
        first_rows = {int(j) for j in layout.starts if sampled_slots[j] in self.slot_procs} if self.slot_procs else None
        step.top_k, tokens = self._sample(logits, sample_slots, sampled_slots, flags, step.host, step.errors, mask,
                                          layout.ahead, first_rows)  # fmt: skip
        last = self._commit_accepted(tokens, sample_slots, flags, layout, step.host, base)
        return tokens, last

    def _launch_spec_graphed(self, plan: StepPlan, started: float, rows: torch.Tensor, g: SpecGraphs,
                             drafter: MtpDrafter) -> PendingStep:  # fmt: skip
        """`_launch_speculative` on the captured graphs (every row a verify row of k drafts, `rows` its host rows).

        A step with a grammar's rows (under DP attention: on any rank, `dp_grammar_drafts`) drafts eagerly under the
        grammars' masks (`_draft`), replays the verify graph over those drafts, samples under the masks walked over
        them, and replays the draft-extend: only the MTP draft steps run eagerly, not the target's verify forward."""
        from baleen.model.speculative import verify_layout

        slots = [r.slot for r in plan.rows]
        procs = bool(self.slot_procs) and not self.slot_procs.keys().isdisjoint(slots)
        grammar = self.grammars is not None and bool(self.grammars.rows(slots))
        draft_eagerly = plan.dp_grammar_drafts if plan.dp_num_tokens else grammar
        if grammar and not draft_eagerly:
            raise RuntimeError(f"step {plan.step_id}: the DP router planned the graphed draft loop over a grammar's row")
        n, q, bs = len(slots), g.query_len, rows.shape[0]
        sampled_slots = [s for s in slots for _ in range(q)]  # every token of a verify row is a logits row
        flags = self.sampler.state.flags(sampled_slots)
        step = PendingStep(plan.step_id, len(sampled_slots), {}, None, 0, started, sampled_slots, [], graphed=True)
        grammar_drafts: dict[int, list[int]] = {}
        walked: dict[int, list[torch.Tensor]] = {}
        if draft_eagerly:
            plan = drafter.resolve(plan)  # the draft loop's positions: a prefix only the device knew is read here
            grammar_drafts, walked = self._draft(plan, drafter)
            rows[:n, 1] = torch.tensor([r.prefix_len for r in plan.rows], dtype=torch.int64)
            logits = g.verify(rows, n)
        else:
            logits = g.draft_and_verify(rows, n)
        if flags.plain_greedy and not grammar and not procs:
            tokens, keep, num_tokens = g.greedy_tail(bs, n)  # counted and kept in the slots already
            step.host["token_ids"] = to_host(tokens)
            step.host["keep"] = to_host(keep)
            step.host["num_tokens"] = to_host(num_tokens.to(torch.int32))
            g.extend(bs)
            self._record(step)
            return step
        sample_slots = g.step_rows[:n, :1].expand(n, q).reshape(-1)
        layout = verify_layout(plan, drafter.tokens, self.device, self.slot_procs.keys())
        tokens, last = self._sample_verify(step, layout, logits, sample_slots, flags, grammar_drafts, walked,
                                           g.step_rows[:n, 1])  # fmt: skip
        g.extend(bs, tokens.to(torch.int64), last)
        self._record(step)
        if step.grammar_rows:
            self._unaccepted = step
        return step

    PROMPT_LOGPROB_ROWS = 1024  # positions a logits block of the prompt logprobs holds ([rows, vocab] float32)

    def _prompt_logprobs(self, plan: StepPlan, hidden: torch.Tensor, host: dict[str, torch.Tensor]) -> int:
        """The logprob of each prompt token the plan's rows score (`SeqRow.lp_targets`) and its top tables, on their
        way to the host (row order); returns the tables' width (0: none asked). The logits are made a block of
        PROMPT_LOGPROB_ROWS positions at a time, never for a whole long chunk at once."""
        rows = [(i, r) for i, r in enumerate(plan.rows) if r.lp_targets]
        if not rows:
            return 0
        starts = np.concatenate([[0], np.cumsum([r.extend_len for r in plan.rows])])
        where = np.concatenate([starts[i] + r.lp_offset + np.arange(len(r.lp_targets) // 4) for i, r in rows])
        targets = np.concatenate([_i32(r.lp_targets) for _, r in rows]).astype(np.int64)
        k = max(self.sampler.state.top_logprobs_of(r.slot) for _, r in rows)
        idx, tgt = self._to_device(where), self._to_device(targets)
        lps, top_ids, top_lps = [], [], []
        for a in range(0, len(where), self.PROMPT_LOGPROB_ROWS):
            logits = self.model.compute_logits(hidden[idx[a : a + self.PROMPT_LOGPROB_ROWS]])  # [b, vocab] float32
            lse = logits.logsumexp(dim=-1)
            lps.append(logits.gather(1, tgt[a : a + self.PROMPT_LOGPROB_ROWS, None])[:, 0] - lse)
            if k:
                vals, ids = logits.topk(k, dim=-1)
                top_ids.append(ids.to(torch.int32))
                top_lps.append(vals - lse[:, None])
        host["prompt_logprobs"] = to_host(torch.cat(lps).float())
        if k:
            host["prompt_top_ids"] = to_host(torch.cat(top_ids))
            host["prompt_top_logprobs"] = to_host(torch.cat(top_lps).float())
        return k

    def _commit_accepted(self, tokens: torch.Tensor, sample_slots: torch.Tensor, flags: BatchFlags,
                         layout: VerifyLayout, host: dict[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """A sampled verify step's accepted tokens: counted for the penalties, each row's last kept in its slot, its
        committed length (`base` [num_sampled] + its count) in the drafter's, the keep mask and counts on their way
        to the host. Returns each row's last committed logits row (`accept`'s last)."""
        from baleen.model.speculative import accept

        assert self.drafter is not None
        keep, num_tokens, last = accept(tokens, layout)
        self.sampler.record(sample_slots, tokens, flags.penalties, keep)
        row_slots = sample_slots[last]
        self.slot_tokens[row_slots] = tokens[last].to(torch.int64)
        self.drafter.lens[row_slots] = base + num_tokens
        host["keep"] = to_host(keep)
        host["num_tokens"] = to_host(num_tokens.to(torch.int32))
        return last

    def tokens_awaited(self, step: PendingStep) -> Any:
        """What a deferred step's sampling waits for: the previous step's event (None: nothing to wait for).

        Wait for it off the event loop, then call `complete(step)`."""
        if step.deferred is None or self._unaccepted is None:
            return None
        return self._unaccepted.event

    @torch.inference_mode()
    def complete(self, step: PendingStep) -> None:
        """Sample a step whose sampling was deferred at launch (a no-op for any other)."""
        self._complete(step)

    def _complete(self, step: PendingStep) -> None:
        d = step.deferred
        if d is None:
            return
        step.deferred = None
        if self._deferred is step:
            self._deferred = None
        mask = self._token_mask(step.grammar_rows, step.errors) if step.grammar_rows else None
        step.top_k, _ = self._sample(d.logits, d.sample_slots, step.sampled_slots, d.flags, step.host, step.errors, mask)
        self._record(step)
        if step.grammar_rows:
            self._unaccepted = step

    def _record(self, step: PendingStep) -> None:
        if self.device.type == "cuda":
            step.event = torch.cuda.Event()
            step.event.record()

    def _draft(self, plan: StepPlan, drafter: MtpDrafter) -> tuple[dict[int, list[int]], dict[int, list[torch.Tensor]]]:
        """The step's draft loop. A grammar request's drafts are taken under its grammar's masks (`DraftWalk`: the MTP
        layer knows nothing of the grammar, and a draft the grammar forbids is lost with every draft after it), its
        matcher standing after its committed tokens first. Returns each such request's drafts by slot: the one host
        read of them a step after the loop (its verify masks walk them too), and the masks the loop took them under
        (`DraftWalk.filled`: its verify rows' but the last); {} and {} for a step without grammar rows."""
        verify = [(r.slot, r.extend_len - 1) for r in plan.rows if r.sample and not r.input_ids and r.extend_len > 1]
        found = self.grammars.rows([s for s, _ in verify]) if self.grammars is not None and verify else []
        if not found:
            drafter.draft(plan, self.page_table, self.kv_cache, self.attn)
            return {}, {}
        assert self.grammars is not None
        if self._unaccepted is not None:
            self._accept_grammar_tokens(self._unaccepted)  # the matchers stand after every committed token
        slots = [verify[j][0] for j, _ in found]
        with self.grammars.walk({slot: g for slot, (_, g) in zip(slots, found)}) as walk:
            drafter.draft(plan, self.page_table, self.kv_cache, self.attn, walk)
        host = drafter.tokens[slots].tolist()
        return {slot: row[: verify[j][1]] for slot, (j, _), row in zip(slots, found, host)}, walk.filled()

    def _token_mask(self, rows: list[tuple[int, SlotGrammar]], errors: list[tuple[int, str]],
                    drafts: list[int] | None = None, known: list[torch.Tensor | None] | None = None) -> TokenMask:  # fmt: skip
        """The step's grammar bitmask, on its way to the device: the previous step's tokens advance the matchers
        (waiting for them unless the caller did), the rows' next-token masks are filled on the host, uploaded.
        `drafts` [len(rows)]: the draft each row checks (-1: none), for a speculative step's verify rows; `known`
        [len(rows)]: the rows' masks the draft loop filled already (None: fill), see `GrammarSlots.fill`."""
        assert self.grammars is not None
        if self._unaccepted is not None:
            self._accept_grammar_tokens(self._unaccepted)
        # a failed matcher's error goes on its request's first row (a verify row's first token is always committed)
        errors.extend((j, g.error) for i, (j, g) in enumerate(rows)
                      if g.error is not None and (i == 0 or rows[i - 1][1] is not g))  # fmt: skip
        bitmask = self.grammars.fill(rows, drafts, known)
        device_mask = bitmask if self.device.type == "cpu" else bitmask.to(self.device, non_blocking=True)
        return TokenMask(device_mask, self._to_device(np.fromiter((j for j, _ in rows), dtype=np.int64)))

    def _accept_grammar_tokens(self, step: PendingStep) -> None:
        """Feed a step's sampled tokens to the matchers of its constrained rows (once; waits for the tokens)."""
        if step is self._unaccepted:
            self._unaccepted = None
        if step.grammar_accepted or not step.grammar_rows:
            return
        step.grammar_accepted = True
        if step.event is not None:
            step.event.synchronize()
        ids = step.host["token_ids"].numpy()
        keep = step.host["keep"].numpy() if "keep" in step.host else None  # speculative: the committed rows
        for j, g in step.grammar_rows:
            if keep is None or keep[j]:
                g.accept(int(ids[j]))

    def _plain_greedy(self, sampled_slots: list[int], flags: BatchFlags) -> bool:
        """Every row greedy, and nothing asked that the captured greedy tail does not do."""
        return flags.plain_greedy and not any(s in self.slot_procs for s in sampled_slots)

    def _sample(
        self, logits: torch.Tensor, sample_slots: torch.Tensor, sampled_slots: list[int], flags: BatchFlags,
        host: dict[str, torch.Tensor], errors: list[tuple[int, str]], mask: TokenMask | None = None,
        ahead: Ahead | None = None, proc_rows: set[int] | None = None,
    ) -> tuple[int, torch.Tensor]:  # fmt: skip
        """Sample `logits` [n, vocab] eagerly, keep the tokens in their slots, start the copies to the host.

        Returns the k of the top-logprob tables (0 when none was asked) and the tokens [n] (device). With `ahead`
        (verify rows) the tokens are neither kept in the slots nor counted: the caller commits the accepted.
        `proc_rows`: the only rows custom processors run on (default: every row of their slots)."""
        procs: list[tuple[int, LogitProcessor, list[int]]] = (
            [
                (j, GuardedProcessor(j, self.slot_procs[s][0], errors), self.slot_procs[s][1])
                for j, s in enumerate(sampled_slots)
                if s in self.slot_procs and (proc_rows is None or j in proc_rows)
            ]
            if self.slot_procs
            else []
        )
        out = self.sampler.sample(
            logits, sample_slots, host_slots=sampled_slots, processors=procs or None, flags=flags, mask=mask,
            ahead=ahead,
        )  # fmt: skip
        if ahead is None:
            self.slot_tokens[sample_slots] = out.token_ids.to(torch.int64)
        host["token_ids"] = to_host(out.token_ids.to(torch.int32))
        if out.logprobs is not None:
            host["logprobs"] = to_host(out.logprobs.float())
        if out.top_ids is None or out.top_logprobs is None:
            return 0, out.token_ids
        host["top_ids"] = to_host(out.top_ids.to(torch.int32))
        host["top_logprobs"] = to_host(out.top_logprobs.float())
        return int(out.top_ids.shape[1]), out.token_ids

    def finish(self, pending: PendingStep) -> StepResult:
        """Wait for the step's copies (the step's one host sync) and package the result."""
        self.complete(pending)
        if pending.event is not None:
            pending.event.synchronize()
        if pending.failed is not None:
            return StepResult(step_id=pending.step_id, token_ids=b"", failed=pending.failed,
                              forward_time=time.perf_counter() - pending.started)
        self._accept_grammar_tokens(pending)  # unless the next step's launch did already
        h = {name: t.numpy() for name, t in pending.host.items()}
        slots = pending.sampled_slots
        errors = pending.errors
        if "keep" in h:  # speculative: the committed rows only
            from baleen.model.speculative import committed_rows

            slots, errors = committed_rows(h, slots, errors)
        ids = h["token_ids"] if "token_ids" in h else np.zeros(0, dtype=np.int32)
        if self.slot_procs:  # processors see every earlier token: keep their histories on the host
            for slot, tok in zip(slots, ids.tolist()):
                entry = self.slot_procs.get(slot)
                if entry is not None:
                    entry[1].append(tok)
        return StepResult(
            step_id=pending.step_id,
            token_ids=ids.tobytes(),
            logprobs=h["logprobs"].tobytes() if "logprobs" in h else None,
            top_k=pending.top_k,
            top_ids=h["top_ids"].tobytes() if "top_ids" in h else None,
            top_logprobs=h["top_logprobs"].tobytes() if "top_logprobs" in h else None,
            num_tokens=h["num_tokens"].tobytes() if "num_tokens" in h else None,
            prompt_logprobs=h["prompt_logprobs"].tobytes() if "prompt_logprobs" in h else None,
            prompt_top_k=pending.prompt_top_k,
            prompt_top_ids=h["prompt_top_ids"].tobytes() if "prompt_top_ids" in h else None,
            prompt_top_logprobs=h["prompt_top_logprobs"].tobytes() if "prompt_top_logprobs" in h else None,
            forward_time=time.perf_counter() - pending.started,
            errors=errors,
            graphed=pending.graphed,
        )

    def needs_sync_before(self, plan: StepPlan) -> bool:
        """A custom logit processor must see every earlier token, so its steps cannot overlap."""
        if not self.slot_procs and not plan.new_slots:
            return False
        return any(r.slot in self.slot_procs and r.sample for r in plan.rows) or any(
            i.sampling.custom_logit_processor is not None for i in plan.new_slots
        )

    # ---- copies ----------------------------------------------------------------------------------
    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

