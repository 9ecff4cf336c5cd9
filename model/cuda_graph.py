"""CUDA graphs for decode steps: one graph per captured batch size, real batches padded up to the next one.

Every captured graph reads the same fixed-address buffers, owned here: input ids, positions, cache slots, the page
table and seq_lens the attention kernels read; and writes logits into its own output. The host copies each row's
(slot, length, explicit token or -1, slot to write the sampled token to) in one transfer; the graph derives
everything else from the runner's per-slot state (`kernels/decode_prep.py`), and all-greedy steps also replay a
small captured tail (argmax, slot-token update). The attention backend adds what its kernels read besides,
through its graph hooks (`GraphAttentionBackend` in model/attention.py): before a replay, FlashInfer re-plans on
the host; Triton has nothing to do. Padding rows read and write only the padding page (page 0), so they never
touch a request's cache.

Under DP attention (`dp_size` > 1) every DP rank's MLP blocks gather all ranks' tokens, so the ranks' graphs must
hold the same collectives: each size is captured as a step of `bs` rows on every rank (`dp_num_tokens` [bs] x
dp_size), and a step replays on every rank, an idle one too, the size of the largest rank's batch (the runner's
`dp_graph_size`), its own rows padded up to it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

import torch

from baleen.model.attention import AttentionBackend, GraphAttentionBackend, GraphShape
from baleen.model.batch import ForwardBatch
from baleen.model.deepseek import DeepseekV3ForCausalLM
from baleen.model.kv_cache import KVCache
from baleen.model.sampler import Sampler


class Replayable(Protocol):
    def replay(self) -> None: ...


class EagerGraph:
    """A graph stand-in whose replay runs its body eagerly (the graphs' `eager=True` mode: CPU tests, debugging)."""

    def __init__(self, body: Callable[..., object]) -> None:
        self.body = body

    def replay(self) -> None:
        self.body()


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
    """Captured decode forwards (model, logits, greedy tail) for a set of batch sizes, reading their inputs from a
    runner's per-slot state.

    slot_tokens [num_slots + 1] int64 and page_table [num_slots + 1, max_pages] int32 are the runner's, whose last
    entry (`scratch_slot`) belongs to no request: padding rows use it.
    """

    def __init__(
        self,
        model: DeepseekV3ForCausalLM,
        kv_cache: KVCache,
        attn: AttentionBackend,
        sampler: Sampler,
        batch_sizes: list[int],
        num_heads: int,
        slot_tokens: torch.Tensor,
        page_table: torch.Tensor,
        scratch_slot: int,
        dp_size: int = 1,
        eager: bool = False,
    ) -> None:
        if not eager and not isinstance(attn, GraphAttentionBackend):
            raise ValueError(f"{type(attn).__name__} has no CUDA-graph support")
        self.model = model
        self.dp_size = dp_size
        self.eager = eager  # `make_eager` instead of `capture`: each replay runs its body, planned with real lengths
        self.kv_cache = kv_cache
        self.attn = attn
        self.sampler = sampler
        self.batch_sizes = sorted(batch_sizes)
        self.max_bs = self.batch_sizes[-1]
        self.slot_tokens = slot_tokens
        self.slot_page_table = page_table
        self.scratch_slot = scratch_slot
        self.max_pages = page_table.shape[1]
        self.page_size = kv_cache.page_size
        device = slot_tokens.device
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.ones(n, dtype=torch.int64, device=device)
        self.out_loc = torch.zeros(n, dtype=torch.int64, device=device)  # slot 0 of the padding page
        self.prefix_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.qo_indptr = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.rows = torch.arange(n, dtype=torch.int64, device=device)
        # What the attention kernels read: each captured size reads the first bs rows.
        self.page_table = torch.zeros(n, self.max_pages, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        if isinstance(attn, GraphAttentionBackend):  # (eager mode may run any backend)
            attn.init_graphs(GraphShape(query_len=1, max_num_seqs=n, max_pages=self.max_pages, page_size=self.page_size,
                                        num_heads=num_heads, softmax_scale=model.config.softmax_scale,
                                        dtype=model.dtype, device=device, kv_dtype=kv_cache.dtype))  # fmt: skip
        self.graphs: dict[int, tuple[Replayable, torch.Tensor]] = {}
        # [max_bs, 4] int64 rows: slot, new length, explicit token id or -1, the slot the sampled token goes to
        # (the scratch slot for rows that sample nothing, and for padding).
        self.step_rows = torch.zeros(n, 4, dtype=torch.int64, device=device)
        self.step_rows.copy_(torch.tensor(self.padding_row(scratch_slot)).expand_as(self.step_rows))
        self.tokens = torch.zeros(n, dtype=torch.int32, device=device)  # the greedy tail's output
        self.tails: dict[int, Replayable] = {}

    @staticmethod
    def padding_row(scratch_slot: int) -> tuple[int, int, int, int]:
        """A step row that reads one key of the padding page and writes nothing a request owns."""
        return (scratch_slot, 1, -1, scratch_slot)

    def padded_size(self, n: int) -> int:
        """The captured batch size a step of n rows replays (n <= max_bs)."""
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]

    def _prep(self, bs: int) -> None:
        """In the graph: the step's inputs from the step rows and the per-slot state."""
        from baleen.kernels.decode_prep import decode_prep, decode_prep_ref

        ids = self.input_ids[:bs]
        outs = (ids, self.positions[:bs], self.seq_lens[:bs], self.out_loc[:bs], self.page_table[:bs])
        if self.input_ids.is_cuda:
            decode_prep(self.step_rows[:bs], self.slot_tokens, self.slot_page_table, self.page_size, *outs)
        else:  # eager mode off CUDA (tests): the kernel's torch twin, into the same buffers
            refs = decode_prep_ref(self.step_rows[:bs], self.slot_tokens, self.slot_page_table, self.page_size)
            for out, value in zip(outs, refs):
                out.copy_(value)
        explicit = self.step_rows[:bs, 2]
        torch.where(explicit >= 0, explicit, ids, out=ids)

    def _static_batch(self, bs: int) -> ForwardBatch:
        batch = ForwardBatch(
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_loc=self.out_loc[:bs],
            qo_indptr=self.qo_indptr[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            prefix_lens=self.prefix_lens[:bs],
            page_table=self.page_table[:bs],
            logits_indices=self.rows[:bs],
            seq_lens_cpu=[2] * bs,  # a cached prefix: decode runs the absorbed form
            extend_lens_cpu=[1] * bs,
            page_size=self.page_size,
        )
        if self.dp_size > 1:
            batch.dp_num_tokens = [bs] * self.dp_size  # every DP rank replays this size (padded) at once
        return batch

    @torch.inference_mode()
    def _forward(self, bs: int) -> torch.Tensor:
        """The captured work of size bs: the prep, the model, the logits (eager mode: the backend planned first with
        the step's real lengths, which captured kernels read from the device)."""
        self._prep(bs)
        batch = self._static_batch(bs)
        if self.eager:
            batch = replace(batch, seq_lens_cpu=self.seq_lens[:bs].tolist())
            self.attn.plan(batch)
        return self.model.compute_logits(self.model(batch, self.kv_cache, self.attn))

    def make_eager(self) -> None:
        """Every size's 'graphs' run their bodies eagerly (no capture), through the one replay path."""
        assert self.eager
        for bs in self.batch_sizes:
            if isinstance(self.attn, GraphAttentionBackend):
                self.attn.plan_capture(self._static_batch(bs))
            logits = torch.zeros(bs, self.model.config.vocab_size, device=self.input_ids.device)

            def forward(bs: int = bs, logits: torch.Tensor = logits) -> None:
                logits.copy_(self._forward(bs))

            def tail(bs: int = bs, logits: torch.Tensor = logits) -> None:
                self.tokens[:bs].copy_(self.sampler.greedy_tail(logits, self.step_rows[:bs, 3], self.slot_tokens))

            self.graphs[bs] = (EagerGraph(forward), logits)
            self.tails[bs] = EagerGraph(tail)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first so smaller graphs reuse its memory pool."""
        assert not self.eager and isinstance(self.attn, GraphAttentionBackend)
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.batch_sizes):
            batch = self._static_batch(bs)
            self.attn.plan_capture(batch)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: Triton compiles and allocator growth happen outside the graph
                    # the static rows are padding rows: nothing a request owns is written
                    self.sampler.greedy_tail(self._forward(bs), self.step_rows[:bs, 3], self.slot_tokens)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(bs)
            self.graphs[bs] = (graph, logits)
            tail = torch.cuda.CUDAGraph()
            with torch.cuda.graph(tail, pool=pool):
                self.tokens[:bs].copy_(self.sampler.greedy_tail(logits, self.step_rows[:bs, 3], self.slot_tokens))
            self.tails[bs] = tail
        torch.cuda.synchronize()

    def replay(self, rows: torch.Tensor, n: int, greedy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replay for rows [padded_size(n), 4] int64 (pinned host; rows past n are `padding_row`s)
        -> (logits [n, vocab], tokens [n] or None).

        With `greedy` the captured tail also picks every row's argmax, writes it to the row's write slot and
        counts it, returning the tokens (int32, on the device); otherwise the caller samples the logits.
        """
        bs = rows.shape[0]
        self.step_rows[:bs].copy_(rows, non_blocking=True)  # the step's one host->device transfer
        h = rows.numpy()
        if isinstance(self.attn, GraphAttentionBackend):
            self.attn.plan_replay(bs, h[:n, 1], self.slot_page_table, h[:n, 0])
        graph, logits = self.graphs[bs]
        graph.replay()
        if not greedy:
            return logits[:n], None
        self.tails[bs].replay()
        return logits[:n], self.tokens[:n]
