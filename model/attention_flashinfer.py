"""FlashInfer's MLA paged attention as a backend, with CUDA graphs: the fastest absorbed MLA at 64+ heads.

The absorbed form (decode and extend over a cached prefix) runs `BatchMLAPagedAttentionWrapper` on our
single [pages, page_size, 576] cache (FlashInfer's "packed" layout, no copy). Its plan is built from host
lists only: indptr and lengths as pinned CPU tensors, page ids gathered on the device through an index
computed on the host, so planning never waits for the GPU (overlap scheduling depends on that). Prefill
without a prefix runs the expanded form through torch's fused attention, as the Triton backend does.

CUDA graphs: FlashInfer pins a wrapper's metadata buffers at plan time, so each captured batch size gets
its own wrapper; before a replay that wrapper is re-planned with the real step's lengths, its page ids
gathered from the runner's per-slot page table (padded rows read one key of the padding page).

FP8 caches (`--kv-cache-dtype fp8_e4m3`): the wrapper is planned with an e4m3 kv_data_type, which makes its plan
take per-tensor KV scales at run time (FlashInfer's "kv-per-tensor" scale mode; on Hopper its FA3 MLA kernel keeps
the tiles in e4m3 through shared memory and converts them to the query dtype before its bf16 MMAs). The cache holds
latent / kv_scale with one scale a layer, so each layer's run passes that scale as both the latent's (ckv) and the
rope part's (kpe). A first try (git fd2abe5, reverted in 59438d4) passed no scales: a plan for an e4m3 cache
requires them, and every run raised.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from baleen.model.attention import GraphAttentionBackend, GraphShape, TorchAttentionBackend
from baleen.model.attention_triton import _ragged, expanded_prefill
from baleen.model.batch import ForwardBatch

WORKSPACE_BYTES = 128 << 20


def _pinned(values: list[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values, dtype=np.int32))
    return t.pin_memory() if device.type == "cuda" else t


class _Csr:
    """Host-built CSR metadata of one batch, optionally padded to `pad_to` sequences: padding rows have `pad_len`
    new tokens over as many keys of the padding page. Sequence i reads its pages from row `table_rows[i]` of the
    page table (default: row i)."""

    def __init__(self, extend: list[int], seq_lens: list[int], page_size: int, max_pages: int, pad_to: int = 0,
                 table_rows: list[int] | None = None, pad_len: int = 1):  # fmt: skip
        pad = max(0, pad_to - len(seq_lens))
        extend = [*extend, *[pad_len] * pad]
        lens = [*seq_lens, *[pad_len] * pad]
        pages = [-(-n // page_size) for n in lens]
        self.qo = np.concatenate([[0], np.cumsum(extend)]).astype(np.int32)
        self.kv = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        self.kv_len = np.asarray(lens, dtype=np.int32)
        # flat positions into the [rows, max_pages] page table; padding rows' entries are not read: they are
        # overwritten with page 0 below (pages[...] of a padded row are the padding page)
        real = len(seq_lens)
        table = np.arange(len(lens)) if table_rows is None else np.asarray([*table_rows, *[0] * pad])
        rows = np.repeat(table, pages)
        cols = np.arange(int(self.kv[-1])) - np.repeat(self.kv[:-1], pages)
        self.index = (rows * max_pages + cols).astype(np.int64)
        self.pad_from = int(self.kv[real])  # kv_indices entries from here on belong to padding rows

    def kv_indices(self, page_table: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        device = page_table.device
        real = self.index[: self.pad_from]
        idx = torch.as_tensor(real)
        idx = idx.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else idx
        n = int(self.kv[-1])
        dst = out[:n] if out is not None else torch.empty(n, dtype=torch.int32, device=device)
        dst[: self.pad_from] = page_table.reshape(-1)[idx]
        dst[self.pad_from :] = 0  # the padding page
        return dst


class FlashInferAttentionBackend(GraphAttentionBackend):
    """FlashInfer MLA for the absorbed form; torch fused attention for the expanded prefill."""

    def __init__(self, device: torch.device, backend: str = "auto") -> None:
        import flashinfer  # the optional GPU extra; fails here, at start-up, not mid-request

        self._flashinfer: Any = flashinfer
        self.device = device
        self._backend = backend
        self._workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._wrapper: Any = flashinfer.mla.BatchMLAPagedAttentionWrapper(self._workspace, backend=backend)
        self._batch: ForwardBatch | None = None
        self._planned: Any = None  # the wrapper planned for the current batch, or None until first use
        self._active: Any = None  # the graph wrapper a capture or replay uses
        self._fallback = TorchAttentionBackend()  # shapes FlashInfer's MLA is not built for
        self._fallback_planned = False
        # CUDA graphs
        self._graph_shape: GraphShape | None = None  # set by init_graphs
        self._graph_wrappers: dict[int, tuple[Any, dict[str, torch.Tensor]]] = {}

    # ---- per step ------------------------------------------------------------------------------------
    def plan(self, batch: ForwardBatch) -> None:
        self._batch = batch
        self._planned = None
        self._active = None
        self._fallback_planned = False

    def _plan_wrapper(self, wrapper: Any, csr: _Csr, kv_indices: torch.Tensor, num_heads: int, scale: float,
                      dtype: torch.dtype, kv_dtype: torch.dtype, page_size: int, causal: bool) -> None:
        fi = self._flashinfer
        meta = fi.mla.MLAPlanMetadata.csr(
            _pinned(csr.qo, self.device), _pinned(csr.kv, self.device), kv_indices, _pinned(csr.kv_len, self.device)
        )
        wrapper.plan(
            metadata=meta, num_heads=num_heads, head_dim_ckv=512, head_dim_kpe=64, page_size=page_size,
            causal=causal, sm_scale=scale, q_data_type=dtype, kv_data_type=kv_dtype,
            query_layout="split", kv_cache_layout="packed",
        )  # fmt: skip

    def run_absorbed(
        self, q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache_layer: torch.Tensor, scale: float,
        kv_scale: float = 1.0,
    ) -> torch.Tensor:
        b = self._batch
        assert b is not None, "plan(batch) must run before the layers"
        if q_latent.shape[-1] != 512 or q_pe.shape[-1] != 64:
            # FlashInfer's MLA kernels are built for DeepSeek's 512 + 64; other shapes (tiny test models)
            # take the torch path.
            if not self._fallback_planned:
                self._fallback.plan(b)
                self._fallback_planned = True
            return self._fallback.run_absorbed(q_latent, q_pe, kv_cache_layer, scale, kv_scale)
        fp8 = kv_cache_layer.dtype == torch.float8_e4m3fn
        if kv_cache_layer.dtype != q_latent.dtype and not fp8:
            raise ValueError(f"the FlashInfer backend reads a cache of the activation dtype or e4m3, not "
                             f"{kv_cache_layer.dtype}")  # fmt: skip
        wrapper = self._active
        if wrapper is None:
            if self._planned is None:
                csr = _Csr(b.extend_lens_cpu, b.seq_lens_cpu, b.page_size, b.page_table.shape[1])
                self._plan_wrapper(self._wrapper, csr, csr.kv_indices(b.page_table), q_latent.shape[1], scale,
                                   q_latent.dtype, kv_cache_layer.dtype, b.page_size, causal=True)  # fmt: skip
                self._planned = self._wrapper
            wrapper = self._planned
        query = (q_latent, q_pe.to(q_latent.dtype))
        if fp8:  # the plan's scale mode for an e4m3 cache: real = stored x scale, latent and rope parts alike
            s = float(kv_scale)
            return wrapper.run(query=query, kv_cache=kv_cache_layer, ckv_scale=s, kpe_scale=s)
        return wrapper.run(query=query, kv_cache=kv_cache_layer)

    def run_expanded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        assert self._batch is not None
        return expanded_prefill(q, k, v, scale, _ragged(self._batch))

    # ---- CUDA graphs ---------------------------------------------------------------------------------
    def init_graphs(self, shape: GraphShape) -> None:
        """Each captured size gets its wrapper and buffers at its capture (`plan_capture`)."""
        self._graph_shape = shape

    def plan_capture(self, batch: ForwardBatch) -> None:
        shape = self._graph_shape
        assert shape is not None, "init_graphs(shape) must come before plan_capture"
        bs, q = batch.num_seqs, shape.query_len
        bufs = {
            "qo_indptr": torch.arange(0, bs * q + 1, q, dtype=torch.int32, device=self.device),
            "kv_indptr": torch.zeros(bs + 1, dtype=torch.int32, device=self.device),
            "kv_indices": torch.zeros(bs * shape.max_pages, dtype=torch.int32, device=self.device),
            "kv_len_arr": torch.ones(bs, dtype=torch.int32, device=self.device),
        }
        wrapper = self._flashinfer.mla.BatchMLAPagedAttentionWrapper(
            self._workspace, use_cuda_graph=True, backend=self._backend, **bufs
        )
        self._graph_wrappers[bs] = (wrapper, bufs)
        self.plan(batch)
        self._replan(bs, batch.extend_lens_cpu, batch.seq_lens_cpu, batch.page_table, batch.page_size)

    def plan_replay(self, num_seqs: int, seq_lens: np.ndarray, page_table: torch.Tensor, table_rows: np.ndarray) -> None:
        shape = self._graph_shape
        assert shape is not None
        lens = seq_lens.tolist()
        self._replan(num_seqs, [shape.query_len] * len(lens), lens, page_table, shape.page_size, table_rows.tolist())

    def _replan(self, bs: int, extend: list[int], seq_lens: list[int], page_table: torch.Tensor, page_size: int,
                table_rows: list[int] | None = None) -> None:  # fmt: skip
        wrapper, bufs = self._graph_wrappers[bs]
        shape = self._graph_shape
        assert shape is not None
        csr = _Csr(extend, seq_lens, page_size, page_table.shape[1], pad_to=bs, table_rows=table_rows,
                   pad_len=shape.query_len)  # fmt: skip
        kv_indices = csr.kv_indices(page_table, out=bufs["kv_indices"])
        self._plan_wrapper(wrapper, csr, kv_indices, shape.num_heads, shape.softmax_scale, shape.dtype,
                           shape.kv_dtype or shape.dtype, page_size, causal=True)  # fmt: skip
        self._active = wrapper
