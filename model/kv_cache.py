"""The paged latent KV cache: per layer one [num_pages, page_size, kv_lora_rank + qk_rope_head_dim] tensor.

MLA caches one latent per token per layer: the normalised compressed KV (kv_lora_rank wide) followed by
the rotated shared rope key (qk_rope_head_dim wide), 576 values for V3. A token's flat slot is
`page * page_size + offset`.

An FP8 cache (float8_e4m3fn, `--kv-cache-dtype fp8_e4m3`) holds latent / scale with one scale per layer's
tensor (1.0 unless the checkpoint has one, model/loader.py `read_kv_scales`): half the bytes of bf16, so twice
the tokens in the same memory. Writers divide by `scale(layer)`, readers multiply by it (the attention
backends' `kv_scale`).

NOTE: page 0 is the padding page (the page allocator never hands it out). Padded page-table entries point
at it, and padded rows of a captured batch may write there; nothing valid is ever read from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from baleen.model.config import ModelConfig


class KVCache:
    """One latent tensor per layer (main layers, then the MTP layer when there is one)."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        kv_cache_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        scales: Sequence[float] | None = None,
    ) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the padding page), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.kv_cache_dim = kv_cache_dim
        self.dtype = dtype
        self.scales = [1.0] * num_layers if scales is None else [float(s) for s in scales]
        if len(self.scales) != num_layers or not all(0.0 < s < float("inf") for s in self.scales):
            raise ValueError(f"a KV cache of {num_layers} layers needs as many finite positive scales, got {scales}")
        if dtype != torch.float8_e4m3fn and any(s != 1.0 for s in self.scales):
            raise ValueError(f"per-tensor KV scales apply to an FP8 cache only, not {dtype}")
        # [num_pages, page_size, kv_cache_dim] per layer
        self.layers = [
            torch.zeros(num_pages, page_size, kv_cache_dim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        with_mtp: bool = False,
        scales: Sequence[float] | None = None,
    ) -> KVCache:
        """A cache with a layer per decoder layer, plus one for the MTP layer when asked."""
        num_layers = config.num_hidden_layers + (config.num_nextn_predict_layers if with_mtp else 0)
        return cls(num_layers, num_pages, page_size, config.kv_cache_dim, dtype, device, scales)

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, kv_cache_dim: int, dtype: torch.dtype) -> int:
        """Bytes one page takes over all layers."""
        return num_layers * page_size * kv_cache_dim * torch.empty(0, dtype=dtype).element_size()

    @classmethod
    def num_pages_for_budget(
        cls, budget_bytes: int, num_layers: int, page_size: int, kv_cache_dim: int, dtype: torch.dtype
    ) -> int:
        """How many pages (the padding page included) fit in `budget_bytes`."""
        num_pages = budget_bytes // cls.bytes_per_page(num_layers, page_size, kv_cache_dim, dtype)
        if num_pages < 2:
            raise ValueError(
                f"a KV cache budget of {budget_bytes} bytes holds {num_pages} pages of {page_size} tokens x "
                f"{num_layers} layers; at least 2 are needed: lower the page size or give the cache more memory"
            )
        return int(num_pages)

    @property
    def num_bytes(self) -> int:
        return (
            self.bytes_per_page(self.num_layers, self.page_size, self.kv_cache_dim, self.dtype)
            * self.num_pages
        )

    def layer(self, layer_id: int) -> torch.Tensor:
        """[num_pages, page_size, kv_cache_dim] for one layer."""
        return self.layers[layer_id]

    def scale(self, layer_id: int) -> float:
        """The layer's per-tensor scale: its cache holds latent / scale (1.0 but for an FP8 cache with scales)."""
        return self.scales[layer_id]

    def write(self, layer_id: int, out_loc: torch.Tensor, latent: torch.Tensor) -> None:
        """Store latent [T, kv_cache_dim] at the flat slots out_loc [T] (divided by the layer's scale)."""
        flat = self.layers[layer_id].view(-1, self.kv_cache_dim)  # [num_pages * page_size, kv_cache_dim]
        if self.dtype == torch.float8_e4m3fn:
            # NOTE: CPU torch cannot index_put into e4m3; move the bytes instead.
            stored = (latent.to(torch.float32) * (1.0 / self.scales[layer_id])).to(self.dtype)
            flat.view(torch.uint8)[out_loc] = stored.view(torch.uint8)
        else:
            flat[out_loc] = latent.to(self.dtype)
