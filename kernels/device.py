"""Facts about the device a kernel launches on, asked once per device."""

from __future__ import annotations

from functools import cache

import torch

# What the tile heuristics assume off the GPU (the CPU interpreter tests): an H100's SM count.
DEFAULT_NUM_SMS = 132


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (DEFAULT_NUM_SMS elsewhere), for grid-size heuristics."""
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)


@cache
def _cuda_sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)
