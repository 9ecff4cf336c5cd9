"""GPU attention backends: Triton MLA decode (CUDA-graph capable), and the ragged paths they share.

Decode (one new token per sequence) runs the Triton split-KV kernel over the paged latent cache. A batch with a
cached prefix that is not plain decode (a later chunk of a long prompt, a prompt after a prefix-cache hit, decode
rows beside a prefill chunk) runs the same kernels in the absorbed form with every new token as a query row of its
own causal length (`kernels/mla_extend.py`): one launch a layer for any number of sequences, memory independent
of the prefix. Prefill without a prefix runs expanded per sequence through `scaled_dot_product_attention`
(FlashAttention, never cuDNN: see `EXPANDED_SDPA_BACKENDS`). Planning reads only host lists, never the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from baleen.kernels.mla_extend import extend_rows
from baleen.model.attention import GraphAttentionBackend, GraphShape, TorchAttentionBackend
from baleen.model.batch import ForwardBatch

# The SDPA kernels the expanded prefill may run, best first. NOTE: not cuDNN, which torch prefers on Hopper with
# cuDNN > 9.15: it builds an execution plan for every new (sequence length, strides) and keeps it in a per-thread
# cache, so every new prompt length (and every length first seen on the thread that launches the steps) paid a
# plan build on the request path (issue 20). FlashAttention's kernels are chosen by head size alone.
EXPANDED_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


@dataclass
class _Ragged:
    """Per-sequence slices of a prefill/extend batch, on the host."""

    qo: list[int]  # [S + 1] token offsets
    prefix: list[int]  # [S]
    seq_lens: list[int]  # [S]


def _ragged(batch: ForwardBatch) -> _Ragged:
    qo = [0]
    for n in batch.extend_lens_cpu:
        qo.append(qo[-1] + n)
    prefix = [s - e for s, e in zip(batch.seq_lens_cpu, batch.extend_lens_cpu)]
    return _Ragged(qo, prefix, list(batch.seq_lens_cpu))


def expanded_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, r: _Ragged) -> torch.Tensor:
    """Causal MHA over each sequence's new tokens: [T, H, D], [T, H, D], [T, H, Dv] -> [T, H, Dv]."""
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    d, dv = q.shape[2], v.shape[2]
    if dv < d:
        v = F.pad(v, (0, d - dv))  # one head dim for q, k, v lets torch pick its FlashAttention kernel
    with sdpa_kernel(list(EXPANDED_SDPA_BACKENDS)):
        for i in range(len(r.qo) - 1):
            a, b = r.qo[i], r.qo[i + 1]
            if a == b:
                continue
            # [1, H, n, D]
            o = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                is_causal=True, scale=scale,
            )  # fmt: skip
            out[a:b] = o[0, :, :, :dv].transpose(0, 1)
    return out


class TritonAttentionBackend(GraphAttentionBackend):
    """Triton split-KV MLA decode and absorbed extend; torch fused attention for prefill without a prefix.

    On Hopper, decode shapes the warp-specialised Gluon kernel handles (bf16 q, a bf16 or FP8 cache, 64-multiple
    heads, 512 + 64, pages of 64k rows) run it instead (`kernels/mla_decode_gluon.py`, 2-3x the Triton kernel at
    128 heads); over an FP8 cache its FP8-MMA variant (`kernels/mla_decode_gluon_fp8.py`: q and P in e4m3) unless
    `fp8_mma` is off (--kv-cache-fp8-math bf16). All kernels read an FP8 cache as e4m3 and fold `kv_scale` into the
    softmax scale and the output; elsewhere (page 1, other head counts) the Triton kernels serve it.
    Under CUDA graphs the kernels read the graphs' static page table and seq_lens: nothing to plan before a
    replay; the split count of each captured size is frozen at its capture. Several graph shapes may share one
    backend (speculative decoding: one-token draft steps and verify steps of k + 1 rows a sequence); a verify
    shape's extend rows (`extend_rows`) live in fixed buffers of max_num_seqs * query_len rows: the sequence of
    each row is fixed, the keys each row sees are derived from the static seq_lens in the graph, at every layer.
    """

    def __init__(self, fp8_mma: bool = False) -> None:
        # an FP8 cache under the Gluon kernel: FP8 MMAs (kernels/mla_decode_gluon_fp8.py) or converted to bf16
        self.fp8_mma = fp8_mma
        # (device, heads, d_latent, d_rope, page_size, dtype) -> whether the Gluon decode kernel takes it
        self._gluon: dict[tuple[torch.device, int, int, int, int, torch.dtype], bool] = {}
        self._batch: ForwardBatch | None = None
        self._ragged: _Ragged | None = None
        self._decode = False
        self._extend_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (seq_idx [T], kv_lens [T]) int32
        self._fallback = TorchAttentionBackend()
        self._fallback_planned = False
        self._num_kv_splits: int | None = None
        self._graph_shapes: dict[int, GraphShape] = {}  # query_len -> its shape (init_graphs)
        # query_len > 1 -> (seq_idx [max_num_seqs * q], kv_lens [max_num_seqs * q], offsets [q]) int32
        self._graph_rows: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # a captured verify batch's (seq_lens [bs, 1], offsets [1, q], kv_lens [bs, q]): kv_lens = seq_lens + offsets
        self._graph_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._num_sms = 0
        # captured size -> its KV split count; eager decode of n rows uses the count of the size n pads to,
        # so a step gives the same numbers whether or not it replays a graph
        self._decode_splits: dict[int, int] = {}

    def plan(self, batch: ForwardBatch) -> None:
        self._batch = batch
        self._decode = batch.is_decode and batch.has_prefix
        self._ragged = None if self._decode else _ragged(batch)
        self._extend_rows = None
        self._graph_kv = None
        self._fallback_planned = False
        if not self._decode and batch.has_prefix:
            # [T] sequence of each new token, [T] keys it sees: computed once for every layer's launch
            self._extend_rows = extend_rows(batch.qo_indptr, batch.seq_lens, batch.num_tokens)
        self._num_kv_splits = None
        if self._decode and self._decode_splits:
            fits = [bs for bs in self._decode_splits if bs >= batch.num_seqs]
            if fits:
                self._num_kv_splits = self._decode_splits[min(fits)]

    def run_absorbed(
        self, q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache_layer: torch.Tensor, scale: float,
        kv_scale: float = 1.0,
    ) -> torch.Tensor:
        b = self._batch
        assert b is not None, "plan(batch) must run before the layers"
        if self._decode:
            from baleen.kernels.mla_decode import mla_decode

            if self._use_gluon(q_latent, q_pe, kv_cache_layer):
                return self._gluon_kernel(kv_cache_layer)(
                    q_latent, q_pe.to(q_latent.dtype), kv_cache_layer, b.page_table, b.seq_lens, scale,
                    num_kv_splits=self._num_kv_splits, max_seq_len=b.max_seq_len, kv_scale=kv_scale,
                )  # fmt: skip
            return mla_decode(
                q_latent, q_pe.to(q_latent.dtype), kv_cache_layer, b.page_table, b.seq_lens, scale,
                num_kv_splits=self._num_kv_splits, max_seq_len=b.max_seq_len, kv_scale=kv_scale,
            )  # fmt: skip
        if self._extend_rows is None or not self._kernel_takes(q_latent, kv_cache_layer):
            return self._reference_absorbed(q_latent, q_pe, kv_cache_layer, scale, kv_scale)
        if self._graph_kv is not None:  # a captured verify step: each row's keys from this replay's seq_lens
            lens, offsets, rows_kv = self._graph_kv
            torch.add(lens, offsets, out=rows_kv)
        seq_idx, kv_lens = self._extend_rows
        q_pe = q_pe.to(q_latent.dtype)
        if self._use_gluon(q_latent, q_pe, kv_cache_layer):
            return self._gluon_kernel(kv_cache_layer)(
                q_latent, q_pe, kv_cache_layer, b.page_table, kv_lens, scale, max_seq_len=b.max_seq_len,
                seq_idx=seq_idx, kv_scale=kv_scale, num_kv_splits=self._num_kv_splits,
            )  # fmt: skip
        from baleen.kernels.mla_decode import mla_decode

        return mla_decode(q_latent, q_pe, kv_cache_layer, b.page_table, kv_lens, scale, max_seq_len=b.max_seq_len,
                          seq_idx=seq_idx, kv_scale=kv_scale, num_kv_splits=self._num_kv_splits)  # fmt: skip

    @staticmethod
    def _kernel_takes(q_latent: torch.Tensor, cache: torch.Tensor) -> bool:
        """The decode kernels read a cache of the activation dtype or FP8, at widths `mla_decode_unsupported`
        accepts."""
        from baleen.kernels.mla_decode import mla_decode_unsupported

        d_latent = q_latent.shape[2]
        dtype_ok = cache.dtype in (q_latent.dtype, torch.float8_e4m3fn)
        return dtype_ok and mla_decode_unsupported(d_latent, cache.shape[2] - d_latent) is None

    def _reference_absorbed(
        self, q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, scale: float, kv_scale: float
    ) -> torch.Tensor:
        """The torch backend's blocked absorbed attention (bounded memory): shapes or dtypes no kernel takes."""
        assert self._batch is not None
        if not self._fallback_planned:
            self._fallback.plan(self._batch)
            self._fallback_planned = True
        return self._fallback.run_absorbed(q_latent, q_pe, cache, scale, kv_scale)

    def _gluon_kernel(self, cache: torch.Tensor) -> Callable[..., torch.Tensor]:
        """The Gluon decode kernel for this cache: FP8 MMAs over an FP8 cache unless --kv-cache-fp8-math bf16."""
        if self.fp8_mma and cache.dtype == torch.float8_e4m3fn:
            from baleen.kernels.mla_decode_gluon_fp8 import mla_decode_gluon_fp8

            return mla_decode_gluon_fp8
        from baleen.kernels.mla_decode_gluon import mla_decode_gluon

        return mla_decode_gluon

    def _use_gluon(self, q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor) -> bool:
        key = (q_latent.device, q_latent.shape[1], q_latent.shape[2], q_pe.shape[2], cache.shape[1], cache.dtype)
        use = self._gluon.get(key)
        if use is None:
            from baleen.kernels.mla_decode_gluon import gluon_mla_decode_supported

            # bf16 q over a bf16 or e4m3 cache (key[5] is the cache's dtype)
            use = q_latent.dtype == torch.bfloat16 and gluon_mla_decode_supported(*key)
            self._gluon[key] = use
        return use

    def run_expanded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        assert self._ragged is not None, "the expanded form runs only on prefill batches"
        return expanded_prefill(q, k, v, scale, self._ragged)

    # ---- CUDA graphs ---------------------------------------------------------------------------------
    def init_graphs(self, shape: GraphShape) -> None:
        """Allocate a shape's fixed buffers; one backend takes several query lengths (each its own call)."""
        q = shape.query_len
        if q < 1:
            raise ValueError(f"a captured step needs query_len >= 1, got {q}")
        self._graph_shapes[q] = shape
        self._num_sms = torch.cuda.get_device_properties(shape.device).multi_processor_count
        if q > 1:
            rows = torch.arange(shape.max_num_seqs * q, dtype=torch.int32, device=shape.device)
            # row r belongs to sequence r // q and is its token r % q: it sees seq_len - q + r % q + 1 keys
            offsets = torch.arange(q, dtype=torch.int32, device=shape.device) - (q - 1)
            self._graph_rows[q] = (rows // q, torch.ones_like(rows), offsets)

    def plan_capture(self, batch: ForwardBatch) -> None:
        """Plan the static batch and freeze its KV split count (decode: as eager decode of that size picks it)."""
        from baleen.kernels.mla_decode import pick_mla_decode_tiles, pick_num_kv_splits

        q = batch.extend_lens_cpu[0] if batch.extend_lens_cpu else 1
        shape = self._graph_shapes.get(q)
        if shape is None or any(n != q for n in batch.extend_lens_cpu):
            raise ValueError(f"plan_capture of a batch of {batch.extend_lens_cpu} query rows a sequence: "
                             f"init_graphs took query lengths {sorted(self._graph_shapes)}")  # fmt: skip
        heads, bs = shape.num_heads, batch.num_seqs
        block_h = pick_mla_decode_tiles(heads).block_h  # as eager decode picks it (Gluon too: 64)
        capacity = shape.max_pages * shape.page_size
        splits = pick_num_kv_splits(bs * q, -(-heads // block_h), capacity, self._num_sms, block_h)
        self.plan(batch)
        self._num_kv_splits = splits
        if q == 1:
            self._decode_splits[bs] = splits
            return
        seq_idx, kv_lens, offsets = self._graph_rows[q]
        self._extend_rows = (seq_idx[: bs * q], kv_lens[: bs * q])
        self._graph_kv = (batch.seq_lens.view(bs, 1), offsets.view(1, q), kv_lens[: bs * q].view(bs, q))

    def plan_replay(self, num_seqs: int, seq_lens: np.ndarray, page_table: torch.Tensor, table_rows: np.ndarray) -> None:
        """Nothing: the captured kernels read the graphs' page table and seq_lens, which the graph fills itself."""
