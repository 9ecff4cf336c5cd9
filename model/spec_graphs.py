"""CUDA graphs for speculative decoding's steady state: a step whose every row is a verify row of k drafts.

A qualifying step (`SpecGraphs.step_rows_of`: every row `SeqRow(slot, L, 1 + k, no input ids, sample)`, at most the
largest captured size) replays, for the captured size bs it pads to, in the shape of
model/cuda_graph.py's DecodeGraphs (fixed-address buffers; the host copies each row's (slot, L) once a step; the
graphs derive token ids, positions, cache slots, the page table and seq_lens from the runner's per-slot state and
the drafter's):
1. draft: the k - 1 one-token MTP steps of `MtpDrafter.draft`, step s at position L + s - 1 -> drafts d2 .. dk;
2. verify: the target over the bs * (k + 1) tokens [t, d1 .. dk] at positions L .. L + k (token j sees L + j + 1
   keys) -> hidden [bs * (k + 1), H] and logits [bs * (k + 1), vocab];
3. tail (all-greedy steps only): each token's argmax, the accept rule of `speculative.accept` on the regular
   [bs, k + 1] layout, the committed tokens counted and the slot's last token set; a step with any other
   sampling samples the verify logits eagerly instead (`Sampler.sample` with `Ahead`, `accept`), as the eager
   path does;
4. extend: the draft-extend of `MtpDrafter.extend` over the same tokens, fed the samples; each row's last
   committed token's MTP hidden state drafts its next d1.
A step with a grammar's verify rows runs the draft loop eagerly instead (`MtpDrafter.draft` under the grammars'
masks, which only the host's matchers can walk), then replays the verify graph (`verify`), samples under the
grammars' masks eagerly, and replays the draft-extend.
Padding rows are `padding_row`s: the scratch slot (its page table is all padding page 0, its drafter row and
token entry belong to no request), so they write nothing a request owns. Every other step runs eagerly.

Under DP attention (`dp_size` > 1) the target's and the MTP layer's MoE exchange tokens between the DP ranks inside
the graphs, so every rank must replay the same size at once: each size is captured as a step of bs rows on every
rank, and a step replays when the DP router says every rank's plan is verify rows of k drafts, or empty
(`StepPlan.dp_all_verify`), at the size of the largest rank's rows (`dp_size_of`); an idle rank replays padding rows
only. When some rank holds a grammar's rows (`StepPlan.dp_grammar_drafts`) every rank runs the draft loop eagerly (its
MTP steps exchange `dp_draft_rows` tokens) before the verify graph. Otherwise every rank runs the step eagerly.

Each graph's body is a plain method over the static buffers (`_draft_body`, `_verify_body`, `_tail_body`,
`_extend_body`). `eager=True` runs them without capturing, planning the attention backend with each step's real
lengths before every forward (the CPU tests, where the torch backend plans from host lengths); captured, the
attention backend planned the static batches once (`GraphAttentionBackend.plan_capture`): the draft steps as
decode (query_len 1), verify and extend as query_len k + 1, every plan of a captured size frozen in its graph.
NOTE: so the backend must derive everything its kernels read from the static buffers, with nothing to plan
before a replay (Triton). FlashInfer re-plans on the host before each replay, which the k - 1 draft steps of one
graph (k - 1 lengths) cannot take: model/build.py keeps its speculative steps eager.
"""

from __future__ import annotations

import bisect
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from baleen.messages import PREFIX_ON_DEVICE, StepPlan
from baleen.model.attention import GraphAttentionBackend, GraphShape
from baleen.model.batch import ForwardBatch
from baleen.model.cuda_graph import EagerGraph, Replayable
from baleen.model.sampler import row_argmax

if TYPE_CHECKING:
    from baleen.model.attention import AttentionBackend
    from baleen.model.deepseek import DeepseekV3ForCausalLM
    from baleen.model.kv_cache import KVCache
    from baleen.model.sampler import Sampler
    from baleen.model.speculative import MtpDrafter


class SpecGraphs:
    """The four graphs of a verify step (draft, verify, greedy tail, draft-extend) for a set of batch sizes.

    slot_tokens [num_slots + 1] int64 and page_table [num_slots + 1, max_pages] int32 are the runner's, the
    drafter's tokens [num_slots + 1, k] and hidden [num_slots + 1, H] its own; their last row (`scratch_slot`)
    belongs to no request.
    """

    def __init__(
        self,
        model: DeepseekV3ForCausalLM,
        drafter: MtpDrafter,
        kv_cache: KVCache,
        attn: AttentionBackend,
        sampler: Sampler,
        batch_sizes: list[int],
        num_heads: int,
        slot_tokens: torch.Tensor,
        page_table: torch.Tensor,
        scratch_slot: int,
        eager: bool = False,
        dp_size: int = 1,
    ) -> None:
        if not eager and not isinstance(attn, GraphAttentionBackend):
            raise ValueError(f"{type(attn).__name__} has no CUDA-graph support")
        self.model = model
        self.dp_size = dp_size
        self.drafter = drafter
        self.mtp = drafter.mtp
        self.kv_cache = kv_cache
        self.attn = attn
        self.sampler = sampler
        self.eager = eager
        self.batch_sizes = sorted(batch_sizes)
        self.max_bs = self.batch_sizes[-1]
        self.num_steps = k = drafter.num_steps
        self.query_len = q = k + 1
        self.slot_tokens = slot_tokens
        self.slot_page_table = page_table
        self.scratch_slot = scratch_slot
        self.max_pages = page_table.shape[1]
        self.page_size = kv_cache.page_size
        device = slot_tokens.device
        n, t = self.max_bs, self.max_bs * q
        i64, i32 = torch.int64, torch.int32
        self.step_rows = torch.zeros(n, 2, dtype=i64, device=device)  # (slot, cached length L) a row
        self.step_rows.copy_(torch.tensor(self.padding_row(scratch_slot)).expand_as(self.step_rows))
        self.offsets = torch.arange(q, dtype=i64, device=device)  # [q] token j of a row is at L + j
        # the draft steps' static batch: one token a row (reused by each of the k - 1 steps)
        self.d_ids = torch.zeros(n, dtype=i64, device=device)
        self.d_pos = torch.ones(n, dtype=i64, device=device)
        self.d_out_loc = torch.zeros(n, dtype=i64, device=device)
        self.d_seq_lens = torch.full((n,), 2, dtype=i32, device=device)
        self.d_table = torch.zeros(n, self.max_pages, dtype=i32, device=device)
        self.d_hidden = torch.zeros(n, drafter.hidden.shape[1], dtype=drafter.hidden.dtype, device=device)
        self.d_qo = torch.arange(n + 1, dtype=i32, device=device)
        self.d_rows = torch.arange(n, dtype=i64, device=device)
        self.ones = torch.ones(n, dtype=i32, device=device)  # prefix_lens of the static batches (not read)
        # the verify step's static batch: q tokens a row, row-major
        self.v_ids = torch.zeros(t, dtype=i64, device=device)
        self.v_pos = torch.ones(t, dtype=i64, device=device)
        self.v_out_loc = torch.zeros(t, dtype=i64, device=device)
        self.v_seq_lens = torch.full((n,), 1 + q, dtype=i32, device=device)
        self.v_table = torch.zeros(n, self.max_pages, dtype=i32, device=device)
        self.v_qo = torch.arange(0, t + 1, q, dtype=i32, device=device)
        self.v_rows = torch.arange(t, dtype=i64, device=device)
        # the tail's outputs and the extend's inputs
        self.tokens = torch.zeros(t, dtype=i32, device=device)  # every token's sample (greedy: its argmax)
        self.keep = torch.zeros(t, dtype=torch.bool, device=device)
        self.num_tokens = torch.zeros(n, dtype=i32, device=device)
        self.samples = torch.zeros(t, dtype=i64, device=device)  # the draft-extend's input ids
        self.last = torch.arange(n, dtype=i64, device=device) * q  # row i's last committed token (flat index)
        self.draft_graphs: dict[int, Replayable] = {}
        self.verify_graphs: dict[int, tuple[Replayable, torch.Tensor, torch.Tensor]] = {}  # (graph, hidden, logits)
        self.tail_graphs: dict[int, Replayable] = {}
        self.extend_graphs: dict[int, Replayable] = {}
        self._host_rows: np.ndarray | None = None  # eager mode: the step's rows, for planning with real lengths
        if isinstance(attn, GraphAttentionBackend):
            dtype = model.dtype
            for query_len in (1, q):
                attn.init_graphs(GraphShape(query_len=query_len, max_num_seqs=n, max_pages=self.max_pages,
                                            page_size=self.page_size, num_heads=num_heads,
                                            softmax_scale=model.config.softmax_scale, dtype=dtype, device=device,
                                            kv_dtype=kv_cache.dtype))  # fmt: skip

    @staticmethod
    def padding_row(scratch_slot: int) -> tuple[int, int]:
        """A step row over the scratch slot: its latents go to, and its keys come from, the padding page."""
        return (scratch_slot, 1)

    def padded_size(self, n: int) -> int:
        """The captured batch size a step of n rows replays (n <= max_bs)."""
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]

    def dp_size_of(self, plan: StepPlan) -> int | None:
        """Under DP attention, the captured size every DP rank replays for this step (the largest rank's verify rows,
        padded), or None when every rank runs it eagerly: decided from what all ranks' plans share (`dp_all_verify`,
        `dp_num_tokens`), never from this rank's rows, so the ranks' collectives match."""
        counts = plan.dp_num_tokens
        if not plan.dp_all_verify or self.dp_size == 1 or not 0 < max(counts) <= self.max_bs * self.query_len:
            return None
        return self.padded_size(-(-max(counts) // self.query_len))

    def step_rows_of(self, plan: StepPlan, pinned: bool) -> torch.Tensor | None:
        """The host rows [padded_size(n), 2] int64 of a step whose every row is a sampled verify row of k drafts
        within the page table, or None: that step runs eagerly. Under DP attention: rows padded to `dp_size_of`
        (an idle rank's are all padding), or None on every rank."""
        rows = plan.rows
        n = len(rows)
        q, limit = self.query_len, self.max_pages * self.page_size
        if plan.dp_num_tokens:
            size = self.dp_size_of(plan)
            if size is None:
                return None
        elif not 0 < n <= self.max_bs:
            return None
        else:
            size = self.padded_size(n)
        # NOTE: a PREFIX_ON_DEVICE row's prefix is read in the graph (`_resolve_lens`); the scheduler planned it
        # within the request's length limit, which the page table holds
        if any(r.input_ids or r.extend_len != q or not r.sample or r.prefix_len + q > limit
               or (r.prefix_len < 1 and r.prefix_len != PREFIX_ON_DEVICE) for r in rows):  # fmt: skip
            if plan.dp_num_tokens:  # every other rank replays now: running this one eagerly would hang them
                raise RuntimeError(f"step {plan.step_id}: the DP router said every rank's rows are verify rows of "
                                   f"{self.num_steps} drafts, and this rank's are not: {rows}")
            return None
        host = torch.empty((size, 2), dtype=torch.int64, pin_memory=pinned)
        h = host.numpy()
        h[n:] = self.padding_row(self.scratch_slot)
        h[:n, 0] = [r.slot for r in rows]
        h[:n, 1] = [r.prefix_len for r in rows]
        return host

    # ---- the static batches and the in-graph prep ---------------------------------------------------
    def _draft_batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.d_ids[:bs], positions=self.d_pos[:bs], out_loc=self.d_out_loc[:bs],
            qo_indptr=self.d_qo[: bs + 1], seq_lens=self.d_seq_lens[:bs], prefix_lens=self.ones[:bs],
            page_table=self.d_table[:bs], logits_indices=self.d_rows[:bs],
            seq_lens_cpu=[2] * bs,  # a cached prefix: the absorbed form (the kernels read the device lengths)
            extend_lens_cpu=[1] * bs, page_size=self.page_size, dp_num_tokens=self._dp_counts(bs),
        )  # fmt: skip

    def _dp_counts(self, num_tokens: int) -> list[int] | None:
        """Under DP attention every rank runs this size at once (padded): the MoE exchange's shapes."""
        return [num_tokens] * self.dp_size if self.dp_size > 1 else None

    def _verify_batch(self, bs: int) -> ForwardBatch:
        q, t = self.query_len, bs * self.query_len
        return ForwardBatch(
            input_ids=self.v_ids[:t], positions=self.v_pos[:t], out_loc=self.v_out_loc[:t],
            qo_indptr=self.v_qo[: bs + 1], seq_lens=self.v_seq_lens[:bs], prefix_lens=self.ones[:bs],
            page_table=self.v_table[:bs], logits_indices=self.v_rows[:t],
            # NOTE: the page table's capacity, not a real length: a kernel that picks its KV split count from
            # max_seq_len at capture picks it for the longest sequence a replay may bring.
            seq_lens_cpu=[self.max_pages * self.page_size] * bs, extend_lens_cpu=[q] * bs, page_size=self.page_size,
            dp_num_tokens=self._dp_counts(t),
        )  # fmt: skip

    def _out_loc(self, table: torch.Tensor, pos: torch.Tensor, out: torch.Tensor) -> None:
        """out = the cache row of each position: table [bs, max_pages] int32, pos [bs, m] int64 -> [bs, m]."""
        ps = self.page_size
        page = torch.gather(table, 1, torch.div(pos, ps, rounding_mode="floor")).to(torch.int64)
        torch.add(page * ps, torch.remainder(pos, ps), out=out)

    def _resolve_lens(self, bs: int) -> None:
        """In the graph: a PREFIX_ON_DEVICE row's cached length, from the drafter's (its last step's commit)."""
        slots, lens = self.step_rows[:bs, 0], self.step_rows[:bs, 1]
        torch.where(lens >= 0, lens, self.drafter.lens[slots], out=lens)

    def _prep_draft(self, bs: int, s: int) -> None:
        """In the graph: draft step s's inputs (position L + s - 1; the token d_s, the hidden state that drafted
        it)."""
        slots, lens = self.step_rows[:bs, 0], self.step_rows[:bs, 1]
        pos = self.d_pos[:bs]
        torch.add(lens, s - 1, out=pos)
        self.d_seq_lens[:bs].copy_(pos + 1)
        if s == 1:
            torch.index_select(self.slot_page_table, 0, slots, out=self.d_table[:bs])
        self._out_loc(self.d_table[:bs], pos[:, None], self.d_out_loc[:bs, None])
        torch.index_select(self.drafter.tokens[:, s - 1], 0, slots, out=self.d_ids[:bs])
        torch.index_select(self.drafter.hidden, 0, slots, out=self.d_hidden[:bs])

    def _prep_verify(self, bs: int) -> None:
        """In the graph: the verify step's inputs, tokens [t, d1 .. dk] at positions L .. L + k of each row."""
        q = self.query_len
        slots, lens = self.step_rows[:bs, 0], self.step_rows[:bs, 1]
        torch.index_select(self.slot_page_table, 0, slots, out=self.v_table[:bs])
        pos = self.v_pos[: bs * q].view(bs, q)
        torch.add(lens[:, None], self.offsets[None, :], out=pos)
        self.v_seq_lens[:bs].copy_(lens + q)
        self._out_loc(self.v_table[:bs], pos, self.v_out_loc[: bs * q].view(bs, q))
        ids = self.v_ids[: bs * q].view(bs, q)
        ids[:, 0] = self.slot_tokens[slots]
        ids[:, 1:] = self.drafter.tokens[slots]

    def _plan_eager(self, batch: ForwardBatch, new_tokens: int) -> ForwardBatch:
        """Eager mode only: plan the backend with the step's real lengths (L + new_tokens a row, from the host)."""
        if not self.eager:
            return batch
        assert self._host_rows is not None
        lens = (self._host_rows[: batch.num_seqs, 1] + new_tokens).tolist()
        batch = replace(batch, seq_lens_cpu=lens)
        self.attn.plan(batch)
        return batch

    # ---- the graphs' bodies -------------------------------------------------------------------------
    @torch.inference_mode()
    def _draft_body(self, bs: int) -> None:
        slots = self.step_rows[:bs, 0]
        self._resolve_lens(bs)
        for s in range(1, self.num_steps):
            self._prep_draft(bs, s)
            batch = self._plan_eager(self._draft_batch(bs), s)
            g = self.mtp(batch, self.d_hidden[:bs], self.kv_cache, self.attn)
            self.drafter.tokens[slots, s] = row_argmax(self.mtp.compute_logits(g))
            self.drafter.hidden[slots] = g

    @torch.inference_mode()
    def _verify_body(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_steps == 1:  # no draft loop before it to resolve the lengths
            self._resolve_lens(bs)
        self._prep_verify(bs)
        batch = self._plan_eager(self._verify_batch(bs), self.query_len)
        hidden = self.model(batch, self.kv_cache, self.attn)  # [bs * q, H]
        return hidden, self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _tail_body(self, bs: int, logits: torch.Tensor) -> None:
        """Greedy: `speculative.accept` on [bs, q], the committed tokens counted and kept in their slots."""
        q, k = self.query_len, self.num_steps
        slots = self.step_rows[:bs, 0]
        tokens = row_argmax(logits).view(bs, q)  # [bs, q] int64
        miss = torch.zeros(bs, q, dtype=torch.int64, device=tokens.device)
        miss[:, :k] = (tokens[:, :k] != self.v_ids[: bs * q].view(bs, q)[:, 1:]).to(torch.int64)  # row j checks d_{j+1}
        keep = (miss.cumsum(1) - miss) == 0  # no miss strictly before
        num_tokens = keep.sum(1)
        last = self.d_rows[:bs] * q + num_tokens - 1  # [bs] flat index of each row's last committed token
        real = slots < self.sampler.state.num_slots  # padding rows count nothing
        flat_slots = torch.where(real, slots, 0)[:, None].expand(bs, q).reshape(-1)
        self.sampler.record(flat_slots, tokens.view(-1), False, (keep & real[:, None]).view(-1))
        self.slot_tokens[slots] = tokens.view(-1)[last]
        self.drafter.lens[slots] = self.step_rows[:bs, 1] + num_tokens
        self.tokens[: bs * q].copy_(tokens.view(-1))
        self.keep[: bs * q].copy_(keep.view(-1))
        self.num_tokens[:bs].copy_(num_tokens)
        self.samples[: bs * q].copy_(tokens.view(-1))
        self.last[:bs].copy_(last)

    @torch.inference_mode()
    def _extend_body(self, bs: int, hidden: torch.Tensor) -> None:
        """`MtpDrafter.extend` of a step whose every token is sampled: token j is fed its sample."""
        slots = self.step_rows[:bs, 0]
        batch = self._plan_eager(self._verify_batch(bs), self.query_len)
        g = self.mtp(replace(batch, input_ids=self.samples[: bs * self.query_len]), hidden, self.kv_cache, self.attn)
        picked = g[self.last[:bs]]
        self.drafter.tokens[slots, 0] = row_argmax(self.mtp.compute_logits(picked))
        self.drafter.hidden[slots] = picked

    # ---- capture and replay -------------------------------------------------------------------------
    def make_eager(self) -> None:
        """Every size's 'graphs' run their bodies eagerly (no capture): tests, and a debugging aid."""
        assert self.eager
        for bs in self.batch_sizes:
            self.draft_graphs[bs] = EagerGraph(lambda bs=bs: self._draft_body(bs))
            t = bs * self.query_len
            hidden = torch.zeros(t, self.d_hidden.shape[1], dtype=self.d_hidden.dtype, device=self.d_hidden.device)
            logits = torch.zeros(t, self.model.config.vocab_size, dtype=torch.float32, device=hidden.device)

            def verify(bs: int = bs, hidden: torch.Tensor = hidden, logits: torch.Tensor = logits) -> None:
                h, lg = self._verify_body(bs)
                hidden.copy_(h)
                logits.copy_(lg)

            self.verify_graphs[bs] = (EagerGraph(verify), hidden, logits)
            self.tail_graphs[bs] = EagerGraph(lambda bs=bs, lg=logits: self._tail_body(bs, lg))
            self.extend_graphs[bs] = EagerGraph(lambda bs=bs, h=hidden: self._extend_body(bs, h))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first so smaller graphs reuse its memory pool; the static rows are padding
        rows throughout, so the warm-up runs write nothing a request owns."""
        assert not self.eager and isinstance(self.attn, GraphAttentionBackend)
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.batch_sizes):
            self.attn.plan_capture(self._draft_batch(bs))  # the draft steps: decode shapes
            if self.num_steps > 1:
                self._warm(self._draft_body, bs)
                draft = torch.cuda.CUDAGraph()
                with torch.cuda.graph(draft, pool=pool):
                    self._draft_body(bs)
                self.draft_graphs[bs] = draft
            else:
                self.draft_graphs[bs] = EagerGraph(lambda: None)  # k = 1: no draft step
            self.attn.plan_capture(self._verify_batch(bs))  # verify and extend: query_len k + 1, one plan
            hidden, logits = self._warm(self._verify_body, bs)
            self._warm(self._tail_body, bs, logits)
            self._warm(self._extend_body, bs, hidden)
            verify = torch.cuda.CUDAGraph()
            with torch.cuda.graph(verify, pool=pool):
                hidden, logits = self._verify_body(bs)
            tail = torch.cuda.CUDAGraph()
            with torch.cuda.graph(tail, pool=pool):
                self._tail_body(bs, logits)
            extend = torch.cuda.CUDAGraph()
            with torch.cuda.graph(extend, pool=pool):
                self._extend_body(bs, hidden)
            self.verify_graphs[bs] = (verify, hidden, logits)
            self.tail_graphs[bs] = tail
            self.extend_graphs[bs] = extend
        torch.cuda.synchronize()

    @staticmethod
    def _warm(body: Any, *args: Any) -> Any:
        """Run a body twice on a side stream before its capture: Triton compiles and allocator growth happen
        outside the graph."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                out = body(*args)
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def draft_and_verify(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """Copy the step rows [padded_size(n), 2] int64 (pinned host, `step_rows_of`) in, replay the draft loop
        and the verify forward -> logits [n * (k + 1), vocab] (float32, on the device)."""
        bs = self._load_rows(rows)
        self.draft_graphs[bs].replay()
        return self._replay_verify(bs, n)

    def verify(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """`draft_and_verify` after a draft loop run eagerly (`MtpDrafter.draft`: a step whose drafts some grammar
        masks, which only the host can walk): the verify forward alone over the drafts it left."""
        return self._replay_verify(self._load_rows(rows), n)

    def _load_rows(self, rows: torch.Tensor) -> int:
        bs = rows.shape[0]
        self.step_rows[:bs].copy_(rows, non_blocking=True)  # the step's one host->device transfer
        if self.eager:  # plan with real lengths: read the unknown ones now
            lens = self.drafter.lens.cpu()[rows[:, 0]]
            self._host_rows = torch.stack([rows[:, 0], torch.where(rows[:, 1] >= 0, rows[:, 1], lens)], 1).numpy()
        return bs

    def _replay_verify(self, bs: int, n: int) -> torch.Tensor:
        graph, _, logits = self.verify_graphs[bs]
        graph.replay()
        return logits[: n * self.query_len]

    def greedy_tail(self, bs: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """After `draft_and_verify` of an all-greedy step: replay the tail -> (tokens [n * q] int32, keep [n * q]
        bool, num_tokens [n] int32) on the device; the tokens are counted and each slot holds its last."""
        self.tail_graphs[bs].replay()
        t = n * self.query_len
        return self.tokens[:t], self.keep[:t], self.num_tokens[:n]

    def extend(self, bs: int, samples: torch.Tensor | None = None, last: torch.Tensor | None = None) -> None:
        """Replay the draft-extend; after eager sampling pass the samples [n * q] and each row's last committed
        token's flat index [n] (`speculative.accept`), after `greedy_tail` nothing."""
        if samples is not None and last is not None:
            self.samples[: samples.shape[0]].copy_(samples)
            self.last[: last.shape[0]].copy_(last)
        self.extend_graphs[bs].replay()
