"""Attention backends in plan/run form, the CUDA-graph hooks some of them add, and the pure-torch backend the CPU
path and the tests run.

A backend is planned once per step (`plan(batch)`: index tensors and sizes from the batch), then run once
per layer in one of MLA's two forms:
- absorbed: MQA of q_latent [T, H, kv_lora_rank] (q_nope already multiplied by W_UK) and q_pe over the
  paged latent cache, causal by absolute position (a token at position p sees cache entries 0..p of its
  sequence), returning [T, H, kv_lora_rank] (still to be multiplied by W_UV); the cache layer has the
  activation dtype, or is FP8 holding latent / kv_scale (model/kv_cache.py);
- expanded: ragged causal MHA over the new tokens only, with K/V decompressed by kv_b_proj; valid only
  when no sequence of the batch has a cached prefix.

Backends whose steps can be captured in CUDA graphs (Triton, FlashInfer) are `GraphAttentionBackend`s: three
more hooks, which model/cuda_graph.py calls (see there).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from baleen.model.batch import ForwardBatch


class AttentionBackend(ABC):
    """Per-step planning, per-layer attention."""

    @abstractmethod
    def plan(self, batch: ForwardBatch) -> None:
        """Build the step's metadata; called once before the layers run."""

    @abstractmethod
    def run_absorbed(
        self, q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache_layer: torch.Tensor, scale: float,
        kv_scale: float = 1.0,
    ) -> torch.Tensor:
        """MQA over the paged latent: [T, H, C], [T, H, R], [pages, page_size, C+R] -> [T, H, C]; the cache's
        values are its entries times `kv_scale` (an FP8 cache's per-tensor scale)."""

    @abstractmethod
    def run_expanded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal ragged MHA over the new tokens: [T, H, D], [T, H, D], [T, H, Dv] -> [T, H, Dv]."""


@dataclass(frozen=True)
class GraphShape:
    """What every captured step of a set of CUDA graphs shares, known before the first capture.

    A captured step has `num_seqs` sequences (one graph per size, up to `max_num_seqs`) of `query_len` new
    tokens (query rows) each: 1 for decode; k + 1 for the verify step of speculative decoding, where the target
    model checks k draft tokens of every sequence at once (causal within the sequence's rows).
    """

    query_len: int
    max_num_seqs: int
    max_pages: int  # page-table width of every captured batch (the runner's max_pages_per_seq)
    page_size: int
    num_heads: int  # attention heads on this rank
    softmax_scale: float
    dtype: torch.dtype  # of the queries
    device: torch.device
    kv_dtype: torch.dtype | None = None  # of the latent cache (e4m3 with --kv-cache-dtype fp8_e4m3); None: `dtype`


class GraphAttentionBackend(AttentionBackend):
    """A backend whose steps can be captured in CUDA graphs and replayed (model/cuda_graph.py).

    model/cuda_graph.py owns every static input of a captured step: token ids, positions, cache slots, and the
    page table [max_num_seqs, max_pages] and seq_lens [max_num_seqs] int32 the attention kernels read; its
    captured batches are built on them, so `plan_capture` sees them in its batch. A backend owns only the
    metadata its kernels read besides them, through three hooks, called in this order:
    1. `init_graphs(shape)` once: allocate that metadata (buffers);
    2. `plan_capture(batch)` per captured size, before its graph is captured: plan the static batch, and decide
       whatever the graph freezes (the Triton kernel's split count);
    3. `plan_replay(...)` before every replay, with the real step's lengths on the host: refill the metadata a
       kernel reads that the graph cannot derive on the device (FlashInfer's host-built plan); a no-op where the
       captured kernels derive everything from the static inputs (Triton).
    Every captured batch has `shape.query_len` query rows per sequence, so a verify step (k + 1 rows a sequence)
    goes through the same three hooks as decode (1 row); a backend raises in `init_graphs` for a `query_len`
    it cannot capture yet.
    """

    @abstractmethod
    def init_graphs(self, shape: GraphShape) -> None:
        """Allocate the fixed-address metadata every captured size reads."""

    @abstractmethod
    def plan_capture(self, batch: ForwardBatch) -> None:
        """Plan the static batch of `batch.num_seqs` sequences (on model/cuda_graph.py's buffers) before its
        graph is captured."""

    @abstractmethod
    def plan_replay(self, num_seqs: int, seq_lens: np.ndarray, page_table: torch.Tensor, table_rows: np.ndarray) -> None:
        """Before replaying the graph of `num_seqs` sequences: its first len(seq_lens) rows are real (the rest
        pad), sequence i ends at seq_lens[i] keys (after this step's query_len new ones) and reads its pages from
        row table_rows[i] of `page_table` [rows, max_pages] int32 (the runner's per-slot table)."""


# Score elements (float32) one block of the absorbed path may hold: keys per block are chosen to stay within it,
# so memory never grows with the cached prefix.
ABSORBED_SCORE_BUDGET = 1 << 26


@dataclass
class TorchPlan:
    """Index tensors of one step. S sequences, E = longest extend, L = longest sequence."""

    num_seqs: int
    max_extend_len: int
    max_seq_len: int
    page_size: int
    token_rows: torch.Tensor  # [T] int64, row of each token in the padded [S * E] query layout
    q_pos: torch.Tensor  # [S, E] int64, absolute position of each query row (padding rows: 0)
    page_table: torch.Tensor  # [S, max_pages] int32
    expanded_mask: torch.Tensor  # [S, E, E] bool, causal within the new tokens, real keys only
    tokens: torch.Tensor | None = None  # [T'] int64, the batch's tokens when the plan covers part of it; None: all


class TorchAttentionBackend(AttentionBackend):
    """Reference attention in plain torch: pad the ragged batch per sequence and mask; no per-request loop.

    The absorbed form walks the keys in blocks with an online softmax, so its memory is bounded by the step's
    queries and `score_budget`, not by the cached prefix (a long prompt's later chunks, a 128k context).
    """

    def __init__(self, score_budget: int = ABSORBED_SCORE_BUDGET) -> None:
        self._plan: TorchPlan | None = None
        self._absorbed_plans: list[TorchPlan] = []  # the absorbed form's layouts: the whole batch, or two groups
        self.score_budget = score_budget

    def plan(self, batch: ForwardBatch) -> None:
        ext = batch.extend_lens_cpu
        self._plan = self._plan_rows(batch, None)
        self._absorbed_plans = [self._plan]
        decode = [i for i, n in enumerate(ext) if n == 1]
        if decode and len(decode) < len(ext):
            # NOTE: one padded [S, E] layout gives every decode row the chunk's E query rows over the longest
            # sequence's keys: beside a prefill chunk (a mixed step) that multiplies the decodes' cost by E. The
            # absorbed form runs the decode rows and the other rows as two layouts instead.
            others = [i for i, n in enumerate(ext) if n != 1]
            self._absorbed_plans = [self._plan_rows(batch, decode), self._plan_rows(batch, others)]

    def _plan_rows(self, batch: ForwardBatch, seqs: list[int] | None) -> TorchPlan:
        """The padded layout of the batch's sequences `seqs` (None: all of them)."""
        device = batch.input_ids.device
        if seqs is None:
            qo = batch.qo_indptr.to(torch.int64)
            positions, table, tokens = batch.positions, batch.page_table, None
            ext_host, seq_lens = batch.extend_lens_cpu, batch.seq_lens_cpu
        else:
            ext_host = [batch.extend_lens_cpu[i] for i in seqs]
            seq_lens = [batch.seq_lens_cpu[i] for i in seqs]
            starts = np.cumsum([0, *batch.extend_lens_cpu])
            rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in seqs])  # the group's batch tokens
            tokens = torch.from_numpy(rows).to(device)
            qo = torch.from_numpy(np.cumsum([0, *ext_host])).to(device)
            positions, table = batch.positions[tokens], batch.page_table[torch.tensor(seqs, device=device)]
        num_seqs, num_tokens = len(ext_host), sum(ext_host)
        max_ext, max_len = max(max(ext_host, default=0), 1), max(max(seq_lens, default=0), 1)
        ext = qo[1:] - qo[:-1]  # [S]
        seq = torch.arange(num_seqs, device=device)
        tok_seq = torch.repeat_interleave(seq, ext, output_size=num_tokens)  # [T]
        tok_off = (
            torch.arange(num_tokens, device=device) - qo[tok_seq]
        )  # [T] index within its sequence's chunk
        token_rows = tok_seq * max_ext + tok_off
        # Padded query rows get position 0 so every softmax row has at least one key (no NaN); they are dropped.
        q_pos = torch.zeros(num_seqs * max_ext, dtype=torch.int64, device=device)
        q_pos[token_rows] = positions
        e = torch.arange(max_ext, device=device)
        causal = e.view(1, -1) <= e.view(-1, 1)  # [E, E] key index <= query index
        expanded_mask = causal.unsqueeze(0) & (e.view(1, 1, -1) < ext.view(-1, 1, 1))
        return TorchPlan(num_seqs, max_ext, max_len, batch.page_size, token_rows, q_pos.view(num_seqs, max_ext), table,
                         expanded_mask, tokens)

    def _current(self) -> TorchPlan:
        if self._plan is None:
            raise ValueError("TorchAttentionBackend.plan(batch) must run before the layers")
        return self._plan

    def _pad(self, x: torch.Tensor, p: TorchPlan) -> torch.Tensor:
        # [T, ...] -> [S, E, ...], zeros in the padding rows
        out = x.new_zeros((p.num_seqs * p.max_extend_len, *x.shape[1:]))
        out[p.token_rows] = x
        return out.view(p.num_seqs, p.max_extend_len, *x.shape[1:])

    @staticmethod
    def _softmax(scores: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # scores [S, H, E, K], mask [S, E, K]
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)

    def key_block(self, num_rows: int) -> int:
        """Keys per block of the absorbed path for `num_rows` = S * H * E query rows (at least 16)."""
        return max(16, self.score_budget // max(num_rows, 1))

    def run_absorbed(
        self, q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache_layer: torch.Tensor, scale: float,
        kv_scale: float = 1.0,
    ) -> torch.Tensor:
        self._current()
        if len(self._absorbed_plans) == 1:
            return self._absorbed(q_latent, q_pe, kv_cache_layer, scale, kv_scale, self._absorbed_plans[0])
        out = torch.empty_like(q_latent)
        for p in self._absorbed_plans:
            assert p.tokens is not None
            out[p.tokens] = self._absorbed(q_latent[p.tokens], q_pe[p.tokens], kv_cache_layer, scale, kv_scale, p)
        return out

    def _absorbed(
        self, q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache_layer: torch.Tensor, scale: float,
        kv_scale: float, p: TorchPlan,
    ) -> torch.Tensor:
        # NOTE: the reference computes in float32 whatever the model dtype, as the fused kernels do.
        rank = q_latent.shape[-1]
        q_c, q_r = self._pad(q_latent.float(), p), self._pad(q_pe.float(), p)  # [S, E, H, C], [S, E, H, R]
        flat = kv_cache_layer.view(-1, kv_cache_layer.shape[-1])
        block = self.key_block(p.num_seqs * q_latent.shape[1] * p.max_extend_len)
        m: torch.Tensor | None = None  # [S, H, E] running max of the scores
        l = acc = None  # running softmax sums [S, H, E], unnormalised output [S, H, E, C]
        for k0 in range(0, p.max_seq_len, block):
            k_pos = torch.arange(k0, min(k0 + block, p.max_seq_len), device=q_c.device)  # [K]
            slots = p.page_table[:, k_pos // p.page_size].to(torch.int64) * p.page_size + k_pos % p.page_size
            kv = flat[slots].float()  # [S, K, C+R]; an FP8 cache dequantized: its entries times kv_scale
            if kv_scale != 1.0:
                kv = kv * kv_scale
            c_kv, k_pe = kv[..., :rank], kv[..., rank:]
            scores = torch.einsum("sqhc,skc->shqk", q_c, c_kv) + torch.einsum("sqhr,skr->shqk", q_r, k_pe)
            mask = k_pos.view(1, 1, -1) <= p.q_pos.unsqueeze(-1)  # [S, E, K] key position <= query position
            scores = (scores * scale).masked_fill(~mask.unsqueeze(1), float("-inf"))
            if m is None:  # the first block holds key 0, which every query row sees: finite maxima
                m = scores.amax(-1)
                probs = torch.exp(scores - m.unsqueeze(-1))
                l, acc = probs.sum(-1), torch.einsum("shqk,skc->shqc", probs, c_kv)
                continue
            assert l is not None and acc is not None
            m_new = torch.maximum(m, scores.amax(-1))
            alpha, probs = torch.exp(m - m_new), torch.exp(scores - m_new.unsqueeze(-1))
            l = l * alpha + probs.sum(-1)
            acc = acc * alpha.unsqueeze(-1) + torch.einsum("shqk,skc->shqc", probs, c_kv)
            m = m_new
        assert l is not None and acc is not None
        out = (acc / l.unsqueeze(-1)).transpose(1, 2)  # [S, E, H, C]
        return out.reshape(-1, *out.shape[2:])[p.token_rows].to(q_latent.dtype)

    def run_expanded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        p = self._current()
        qp, kp, vp = self._pad(q.float(), p), self._pad(k.float(), p), self._pad(v.float(), p)  # [S, E, H, *]
        scores = torch.einsum("sqhd,skhd->shqk", qp, kp)
        probs = self._softmax(scores * scale, p.expanded_mask, torch.float32)  # [S, H, E, E]
        out = torch.einsum("shqk,skhv->sqhv", probs, vp)  # [S, E, H, Dv]
        return out.reshape(-1, *out.shape[2:])[p.token_rows].to(q.dtype)
