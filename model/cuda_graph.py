"""CUDA graphs for decode steps: one graph per captured batch size, real batches padded up to the next one.

Every captured graph reads the same fixed-address buffers (input ids, positions, cache slots, page table,
lengths) and writes logits into its own output. Padding rows read and write only the padding page (page 0),
so they never touch a request's cache.

Two ways to fill the buffers. Staged (`bind_slots`, the runner's default): the host copies each row's
(slot, length, explicit token or -1, slot to write the sampled token to) in one transfer, and the graph
derives everything else from the runner's per-slot state (`kernels/decode_prep.py`); all-greedy steps
also replay a small captured tail (argmax, slot-token update). Otherwise (backends that plan on the host
before each replay, FlashInfer) a replay copies a built ForwardBatch into the buffers.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from baleen.model.batch import ForwardBatch

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def graph_batch_sizes(cuda_graph_bs: list[int] | None, max_bs: int | None, num_slots: int) -> list[int]:
    """The sizes to capture: --cuda-graph-bs if given, else the defaults up to --cuda-graph-max-bs."""
    limit = min(max_bs or num_slots, num_slots)
    sizes = sorted(set(cuda_graph_bs)) if cuda_graph_bs else [b for b in DEFAULT_BATCH_SIZES if b <= limit]
    if not sizes or sizes[0] < 1:
        raise ValueError(f"CUDA graph batch sizes must be >= 1, got {cuda_graph_bs}")
    if sizes[-1] > num_slots:
        raise ValueError(f"--cuda-graph-bs {sizes[-1]} exceeds --max-running-requests {num_slots}")
    return sizes


class DecodeGraphs:
    """Captured decode forwards (model + logits) for a set of batch sizes."""

    def __init__(
        self,
        model: Any,
        kv_cache: Any,
        attn: Any,
        batch_sizes: list[int],
        max_pages: int,
        num_heads: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.attn = attn
        self.batch_sizes = sorted(batch_sizes)
        self.max_bs = self.batch_sizes[-1]
        self.max_pages = max_pages
        self.num_heads = num_heads  # attention heads on this rank (sets the KV split count)
        self.page_size = kv_cache.page_size
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.ones(n, dtype=torch.int64, device=device)
        self.out_loc = torch.zeros(n, dtype=torch.int64, device=device)  # slot 0 of the padding page
        self.prefix_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.qo_indptr = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.rows = torch.arange(n, dtype=torch.int64, device=device)
        attn.init_graph_state(n, max_pages, device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Staged mode (bind_slots): [max_bs, 4] int64 rows: slot, new length, explicit token id or -1, the
        # slot the sampled token goes to (the scratch slot for rows that sample nothing, and for padding).
        self.step_rows = torch.zeros(n, 4, dtype=torch.int64, device=device)
        self.tokens = torch.zeros(n, dtype=torch.int32, device=device)  # the greedy tail's output
        self.tails: dict[int, torch.cuda.CUDAGraph] = {}
        self._slots: tuple[torch.Tensor, torch.Tensor, Any, int] | None = None

    def bind_slots(self, slot_tokens: torch.Tensor, page_table: torch.Tensor, sampler: Any, scratch_slot: int) -> None:
        """Capture graphs that read their inputs from the runner's per-slot state (staged mode).

        slot_tokens [num_slots + 1] int64 and page_table [num_slots + 1, max_pages] int32 are the runner's,
        whose last entry (`scratch_slot`) belongs to no request: padding rows use it. Call before capture().
        """
        if self.graphs:
            raise RuntimeError("bind_slots() must come before capture()")
        if hasattr(self.attn, "plan_for_replay"):
            return  # the backend plans each replay on the host from a built batch: no staging
        self.step_rows.copy_(torch.tensor(self.padding_row(scratch_slot)).expand_as(self.step_rows))
        self._slots = (slot_tokens, page_table, sampler, scratch_slot)

    @staticmethod
    def padding_row(scratch_slot: int) -> tuple[int, int, int, int]:
        """A staged row that reads one key of the padding page and writes nothing a request owns."""
        return (scratch_slot, 1, -1, scratch_slot)

    def padded_size(self, n: int) -> int:
        """The captured batch size a step of n rows replays (n <= max_bs)."""
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]

    @property
    def staged(self) -> bool:
        return self._slots is not None

    def _prep(self, bs: int) -> None:
        """In the graph: the step's inputs from the staged rows and the per-slot state."""
        from baleen.kernels.decode_prep import decode_prep

        assert self._slots is not None
        slot_tokens, page_table, _, _ = self._slots
        table, seq_lens = self.attn.graph_buffers(bs)
        ids = self.input_ids[:bs]
        decode_prep(self.step_rows[:bs], slot_tokens, page_table, self.page_size, ids, self.positions[:bs],
                    seq_lens, self.out_loc[:bs], table)  # fmt: skip
        explicit = self.step_rows[:bs, 2]
        torch.where(explicit >= 0, explicit, ids, out=ids)

    def _static_batch(self, bs: int) -> ForwardBatch:
        page_table, seq_lens = self.attn.graph_buffers(bs)
        return ForwardBatch(
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_loc=self.out_loc[:bs],
            qo_indptr=self.qo_indptr[: bs + 1],
            seq_lens=seq_lens,
            prefix_lens=self.prefix_lens[:bs],
            page_table=page_table,
            logits_indices=self.rows[:bs],
            seq_lens_cpu=[2] * bs,  # a cached prefix: decode runs the absorbed form
            extend_lens_cpu=[1] * bs,
            page_size=self.page_size,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first so smaller graphs reuse its memory pool."""
        from baleen.kernels.mla_decode import pick_mla_decode_tiles, pick_num_kv_splits

        pool = torch.cuda.graph_pool_handle()
        num_sms = torch.cuda.get_device_properties(self.input_ids.device).multi_processor_count
        capacity = self.max_pages * self.page_size
        for bs in reversed(self.batch_sizes):
            batch = self._static_batch(bs)
            block_h = pick_mla_decode_tiles(self.num_heads).block_h  # as eager decode picks it (Gluon too: 64)
            splits = pick_num_kv_splits(bs, -(-self.num_heads // block_h), capacity, num_sms, block_h)
            self.attn.plan_for_capture(batch, splits)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: Triton compiles and allocator growth happen outside the graph
                    if self._slots is not None:
                        self._prep(bs)  # the static rows are padding rows: nothing a request owns is written
                    logits = self.model.compute_logits(self.model(batch, self.kv_cache, self.attn))
                    if self._slots is not None:
                        self._slots[2].greedy_tail(logits, self.step_rows[:bs, 3], self._slots[0])
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                if self._slots is not None:
                    self._prep(bs)
                logits = self.model.compute_logits(self.model(batch, self.kv_cache, self.attn))
            self.graphs[bs] = (graph, logits)
            if self._slots is not None:
                slot_tokens, _, sampler, _ = self._slots
                tail = torch.cuda.CUDAGraph()
                with torch.cuda.graph(tail, pool=pool):
                    self.tokens[:bs].copy_(sampler.greedy_tail(logits, self.step_rows[:bs, 3], slot_tokens))
                self.tails[bs] = tail
        torch.cuda.synchronize()

    def can_run(self, batch: ForwardBatch) -> bool:
        return (
            batch.is_decode
            and batch.has_prefix
            and batch.num_seqs <= self.max_bs
            and batch.page_table.shape[1] <= self.max_pages
            and batch.logits_indices.shape[0] == batch.num_seqs
        )

    def run_staged(self, rows: torch.Tensor, n: int, greedy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replay for rows [padded_size(n), 4] int64 (pinned host; rows past n are `padding_row`s)
        -> (logits [n, vocab], tokens [n] or None).

        With `greedy` the captured tail also picks every row's argmax, writes it to the row's write slot and
        counts it, returning the tokens (int32, on the device); otherwise the caller samples the logits.
        """
        bs = rows.shape[0]
        self.step_rows[:bs].copy_(rows, non_blocking=True)  # the step's one host->device transfer
        graph, logits = self.graphs[bs]
        graph.replay()
        if not greedy:
            return logits[:n], None
        self.tails[bs].replay()
        return logits[:n], self.tokens[:n]

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Replay the smallest graph that fits; returns logits [num_seqs, vocab] (a view, valid until next run)."""
        n = batch.num_seqs
        bs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]
        replan = getattr(self.attn, "plan_for_replay", None)
        if replan is not None:
            replan(batch, bs)  # backends whose kernels read host-planned metadata (FlashInfer)
        page_table, seq_lens = self.attn.graph_buffers(bs)
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.out_loc[:n].copy_(batch.out_loc)
        seq_lens[:n].copy_(batch.seq_lens)
        page_table[:n, : batch.page_table.shape[1]].copy_(batch.page_table)
        if bs > n:  # padding rows: one key in the padding page, their latent written there too
            self.input_ids[n:bs].zero_()
            self.positions[n:bs].zero_()
            self.out_loc[n:bs].zero_()
            seq_lens[n:bs].fill_(1)
            page_table[n:bs, 0].zero_()
        graph, logits = self.graphs[bs]
        graph.replay()
        return logits[:n]
