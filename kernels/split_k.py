"""Split-K partial sums for the few-token GEMMs (W8A8 `fp8_gemm`, W8A16 `fp8_skinny` and `fp8_gemv`).

A launch whose K is split over several programs writes one fp32 partial [M, N] per split; either each tile's
last program sums them in the kernel (`store_splits`, with per-device arrival counters), or `reduce_splits`
does in a second launch. Both sum in split order, so the result does not depend on which program finishes last.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per program of the split-K reduction.
_REDUCE_BLOCK = 1024


@triton.jit
def store_splits(acc, out_ptr, part_ptr, counter_ptr, offs, mask, split, num_splits, stride_ps,
                 FUSED_REDUCE: tl.constexpr):
    """Store one split-K program's tile: straight to out when K is not split; else its fp32 partial, and with
    FUSED_REDUCE the tile's last program to finish sums every split's partial (in split order, so the result
    does not depend on which program that is), stores out and re-arms the tile's counter for the next launch.
    offs [R, C] are the tile's element offsets in the row-major [M, N] plane of out and of each partial."""
    if num_splits == 1:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + split * stride_ps + offs, acc, mask=mask)
        if FUSED_REDUCE:
            # Every thread's partial is stored before one thread's release increments the tile's counter;
            # the program that takes it to num_splits acquires, so all partials are visible to it (the
            # partials are read past L1, which is not coherent between SMs).
            tl.debug_barrier()
            arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
            if arrived == num_splits - 1:
                total = tl.zeros(acc.shape, dtype=tl.float32)
                for sp in range(num_splits):
                    total += tl.load(part_ptr + sp * stride_ps + offs, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(counter_ptr, 0)


# NOTE: the split count is not specialised (kernels/act_quant.py); numel and the stride (M * N) keep N's % 16 class.
@triton.jit(do_not_specialize=["num_splits"])
def splitk_reduce_kernel(c_ptr, out_ptr, num_splits, numel, stride_cs, BLOCK: tl.constexpr):
    # out [M*N] = sum over splits of c [split, M*N] (fp32, fixed order: deterministic), cast on the store.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for sp in range(num_splits):
        acc += tl.load(c_ptr + sp * stride_cs + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def reduce_splits(partials: torch.Tensor, out: torch.Tensor) -> None:
    """out [M, N] = partials [splits, M, N] (fp32, contiguous per split) summed in split order, cast on the store."""
    numel = out.numel()
    splitk_reduce_kernel[(triton.cdiv(numel, _REDUCE_BLOCK),)](
        partials, out, partials.shape[0], numel, partials.stride(0), BLOCK=_REDUCE_BLOCK, num_warps=4
    )


class SplitK:
    """Where a split-K launch puts its partial sums and how they are reduced.

    `fused` (the default where it can be): the kernel's last program per tile sums the partials
    (`store_splits`), counting arrivals in a per-device counter array that every such launch shares, so
    such launches must not run concurrently on two streams (the engine runs one compute stream). The array
    is made (zeroed) on first use, outside CUDA-graph capture; a launch that would need it first during a
    capture, or more tiles than it has, falls back to `reduce_splits` after the kernel: one more launch.
    """

    def __init__(self, splits: int, tiles: int, m: int, n: int, out: torch.Tensor, fused: bool) -> None:
        self.splits = splits
        self.partials = out[None] if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=out.device)
        counters = _split_counters(out.device) if fused and splits > 1 else None
        self.fused = counters is not None and tiles <= counters.numel()
        self.counters = counters if self.fused else self.partials  # any pointer where no counter is read

    def finish(self, out: torch.Tensor) -> None:
        """Sum the partials into out unless the kernel did."""
        if self.splits > 1 and not self.fused:
            reduce_splits(self.partials, out)


_SPLIT_COUNTERS = 1 << 16  # tiles one fused split-K launch may have (a [16, 64] tile each: N up to 4M)
_counters: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device) -> torch.Tensor | None:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    counters = _counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _counters[device] = torch.zeros(_SPLIT_COUNTERS, dtype=torch.int32, device=device)
    return counters
