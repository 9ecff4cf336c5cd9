"""Each rank reads only its shard of the checkpoint (safetensors get_slice), FP8 slices dequantized by block."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from baleen.kernels.quant import block_dequant, block_quant
from baleen.model.config import ModelConfig, ParallelConfig
from baleen.model.deepseek import DeepseekV3ForCausalLM, check_complete
from baleen.model.layers import materialize
from baleen.model.loader import Checkpoint, DequantSource
from baleen.model.make_model import tiny_model_path


def _load_rank(parallel: ParallelConfig) -> tuple[DeepseekV3ForCausalLM, Checkpoint, int]:
    path = tiny_model_path()
    config = ModelConfig.from_hf(path)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config, parallel, torch.float32)
    materialize(model, "cpu")
    ckpt = Checkpoint(path)
    main = [n for n in ckpt.names if not n.startswith(f"model.layers.{config.num_hidden_layers}.")]
    check_complete(model, model.load_weights(ckpt.weights(main, False, (128, 128), torch.float32)))
    whole = sum(ckpt.get(n).numel() * ckpt.get(n).element_size() for n in main)
    return model, ckpt, whole


def test_a_rank_reads_exactly_its_shard() -> None:
    for parallel in (ParallelConfig(), ParallelConfig(tp_rank=1, tp_size=2, ep_size=2)):
        model, ckpt, whole = _load_rank(parallel)
        # Every parameter element was read once, nothing else was: bf16 weights, float32 correction biases.
        shard = sum(p.numel() * (4 if n.endswith("bias") else 2) for n, p in model.named_parameters())
        assert ckpt.num_bytes_read == shard
        if parallel.tp_size == 1:
            assert shard == whole
        else:
            assert shard < 0.6 * whole  # attention heads, MLPs, experts and vocabulary halved


def test_fp8_slices_dequantize_only_their_blocks(tmp_path: Path) -> None:
    weight = torch.randn(45, 70)  # blocks of 16 x 32: partial edge blocks in both dims
    q, scale = block_quant(weight, (16, 32))
    save_file({"w": q, "w_scale_inv": scale}, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    source = DequantSource("w", ckpt.source("w"), ckpt.source("w_scale_inv"), (16, 32), torch.float32)
    full = block_dequant(q, scale, (16, 32), torch.float32)
    assert tuple(source.shape) == (45, 70) and source.dtype == torch.float32
    indices: list[Any] = [(slice(5, 40), slice(33, 70)), (slice(16, 32), slice(None)), slice(44, 45), ...]
    for index in indices:
        before = ckpt.num_bytes_read
        got = source[index]
        torch.testing.assert_close(got, full[index], rtol=0, atol=0)
        if index == (slice(16, 32), slice(None)):
            # one block row: 16 x 70 e4m3 bytes + its 3 float32 scales
            assert ckpt.num_bytes_read - before == 16 * 70 + 3 * 4
