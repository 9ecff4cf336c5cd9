"""A thin plan/run wrapper over FlashInfer's MLA paged attention, fed from our cache layout.

Our latent cache is one tensor [num_pages, page_size, D_LATENT + D_ROPE] (latent first, rope last) and
each sequence has a row of a dense page table. FlashInfer wants CSR page lists; it takes the cache as one
packed tensor (0.7+) or as two views of its first D_LATENT and last D_ROPE columns (older releases), so no
copy or layout change is needed. FlashInfer is imported lazily: it is an optional GPU dependency.
"""

from __future__ import annotations

from typing import Any

import torch


def page_table_to_csr(
    page_table: torch.Tensor, seq_lens_cpu: list[int], page_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense page table [B, max_pages] + host lengths -> (kv_indptr [B+1] int32, kv_indices [total] int32)."""
    num_pages = [(n + page_size - 1) // page_size for n in seq_lens_cpu]
    if any(p > page_table.shape[1] for p in num_pages):
        raise ValueError(f"a sequence needs more than the page table's {page_table.shape[1]} pages")
    indptr = [0]
    for p in num_pages:
        indptr.append(indptr[-1] + p)
    kv_indptr = torch.tensor(indptr, dtype=torch.int32, device=page_table.device)
    counts = torch.tensor(num_pages, dtype=torch.int64, device=page_table.device)
    cols = torch.arange(page_table.shape[1], device=page_table.device)
    used = cols[None, :] < counts[:, None]  # [B, max_pages]
    kv_indices = page_table[used].to(torch.int32)  # row-major order keeps each sequence's pages in order
    return kv_indptr, kv_indices


class FlashInferMLA:
    """Plan once per batch, run once per layer: `BatchMLAPagedAttentionWrapper` in absorbed form."""

    def __init__(self, device: torch.device | str, workspace_bytes: int = 128 << 20, backend: str = "auto") -> None:
        try:
            import flashinfer
        except ImportError as e:  # pragma: no cover - depends on the optional GPU extra
            raise ValueError("FlashInfer is not installed: pip install 'baleen[gpu]' or pick the triton backend") from e
        self._flashinfer: Any = flashinfer
        self.device = torch.device(device)
        self._workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=self.device)
        self._wrapper: Any = flashinfer.mla.BatchMLAPagedAttentionWrapper(self._workspace, backend=backend)
        self._structural_api = hasattr(flashinfer.mla, "MLAPlanMetadata")
        self._d_latent = 0

    def plan(
        self,
        page_table: torch.Tensor,
        seq_lens_cpu: list[int],
        num_heads: int,
        page_size: int,
        sm_scale: float,
        dtype: torch.dtype,
        d_latent: int = 512,
        d_rope: int = 64,
        qo_lens_cpu: list[int] | None = None,
        causal: bool = True,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """Plan a batch: per-sequence query counts (default 1, decode) and cached lengths including them. The
        cache has `kv_dtype` (default: the queries' `dtype`); an e4m3 cache takes its scale at `run`."""
        batch = len(seq_lens_cpu)
        qo_lens = qo_lens_cpu if qo_lens_cpu is not None else [1] * batch
        qo = [0]
        for n in qo_lens:
            qo.append(qo[-1] + n)
        qo_indptr = torch.tensor(qo, dtype=torch.int32, device=self.device)
        kv_indptr, kv_indices = page_table_to_csr(page_table.to(self.device), seq_lens_cpu, page_size)
        kv_len = torch.tensor(seq_lens_cpu, dtype=torch.int32, device=self.device)
        self._d_latent = d_latent
        common = dict(
            num_heads=num_heads, head_dim_ckv=d_latent, head_dim_kpe=d_rope, page_size=page_size,
            causal=causal, sm_scale=sm_scale, q_data_type=dtype, kv_data_type=kv_dtype or dtype,
        )  # fmt: skip
        if self._structural_api:
            meta = self._flashinfer.mla.MLAPlanMetadata.csr(qo_indptr, kv_indptr, kv_indices, kv_len)
            self._wrapper.plan(metadata=meta, query_layout="split", kv_cache_layout="packed", **common)
        else:
            self._wrapper.plan(qo_indptr, kv_indptr, kv_indices, kv_len, **common)

    def run(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, out: torch.Tensor | None = None,
        kv_scale: float = 1.0,
    ) -> torch.Tensor:
        """q_nope [T, H, D_LATENT], q_pe [T, H, D_ROPE], cache [pages, page_size, D_LATENT + D_ROPE] -> [T, H, D_LATENT].
        An e4m3 cache holds latent / kv_scale (FlashInfer 0.7's per-tensor KV scales)."""
        if self._d_latent == 0:
            raise ValueError("FlashInferMLA.run called before plan")
        if self._structural_api:
            if cache.dtype == torch.float8_e4m3fn:
                s = float(kv_scale)
                return self._wrapper.run(query=(q_nope, q_pe), kv_cache=cache, out=out, ckv_scale=s, kpe_scale=s)
            return self._wrapper.run(query=(q_nope, q_pe), kv_cache=cache, out=out)
        ckv = cache[..., : self._d_latent]  # [pages, page_size, D_LATENT], row stride D_LATENT + D_ROPE
        kpe = cache[..., self._d_latent :]  # [pages, page_size, D_ROPE]
        return self._wrapper.run(q_nope, q_pe, ckv, kpe, out=out)
