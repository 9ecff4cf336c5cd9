"""The start-up memory plan: SGLang's static fraction, cut so the measured largest step always fits."""

from __future__ import annotations

import logging

import pytest

from baleen.model.memory_plan import MEASURE_MAX_PREFIX, MIN_MARGIN, GiB, StepShape, dummy_batch, plan_memory


def test_the_fraction_decides_when_the_rest_holds_the_step() -> None:
    plan = plan_memory(total=80 * GiB, free=60 * GiB, mem_fraction_static=0.85, activations=3 * GiB, graphs=GiB)
    assert plan.kv_pool == plan.fraction_pool == int(80 * GiB * 0.85) - 20 * GiB
    assert plan.margin == max(MIN_MARGIN, 4 * GiB // 10)
    assert "KV pool" in plan.describe() and "activation reserve" in plan.describe()


def test_the_pool_shrinks_when_the_fraction_would_starve_the_step(caplog: pytest.LogCaptureFixture) -> None:
    # The 16k-prompt crash: a 0.95 fraction left 7 GiB for a step that needs 10.
    with caplog.at_level(logging.WARNING, logger="baleen.memory"):
        plan = plan_memory(total=140 * GiB, free=100 * GiB, mem_fraction_static=0.95, activations=9 * GiB, graphs=GiB)
    assert plan.kv_pool < plan.fraction_pool
    assert plan.in_use + plan.kv_pool + plan.reserve == 140 * GiB  # exactly what is free after the reserve
    assert "--mem-fraction-static 0.95" in caplog.text and "--chunked-prefill-size" in caplog.text


@pytest.mark.parametrize("fraction,free", [(0.85, 30 * GiB), (0.2, 60 * GiB)])
def test_no_room_names_what_to_change(fraction: float, free: int) -> None:
    with pytest.raises(ValueError, match=r"no room for a KV cache.*--chunked-prefill-size"):
        plan_memory(total=80 * GiB, free=free, mem_fraction_static=fraction, activations=40 * GiB, graphs=0)


def test_a_fraction_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="mem-fraction-static"):
        plan_memory(total=GiB, free=GiB, mem_fraction_static=1.5, activations=0, graphs=0)


def test_largest_step_shape() -> None:
    # A full chunk over the longest prefix (capped: memory does not grow with it), beside every other slot decoding.
    assert StepShape.largest(8192, 163840, 256) == StepShape(8192, MEASURE_MAX_PREFIX, 255)
    assert StepShape.largest(8192, 4096, 1) == StepShape(4096, 0, 0)
    assert StepShape.largest(None, 3000, 4) == StepShape(3000, 0, 3)


def test_dummy_batch_reads_and_writes_one_page() -> None:
    batch = dummy_batch(StepShape(chunk=5, prefix=70, decode_rows=2), page_size=16, device="cpu", dp_size=2)
    assert batch.extend_lens_cpu == [5, 1, 1] and batch.seq_lens_cpu == [75, 71, 71]
    assert set(batch.page_table.flatten().tolist()) == {1} or set(batch.page_table.flatten().tolist()) == {0, 1}
    assert int(batch.out_loc.max()) < 2 * 16 and batch.dp_num_tokens == [7, 7]


def test_a_step_that_cannot_fit_at_start_up_names_the_flags() -> None:
    # The measurement runs the real model (here on CPU, with the CUDA memory counters stubbed); an OOM in it is a
    # start-up error that says what to lower, not a traceback.
    from unittest import mock

    import torch

    from baleen.model.attention import TorchAttentionBackend
    from baleen.model.config import ModelConfig
    from baleen.model.loader import load_model
    from baleen.model.make_model import tiny_model_path
    from baleen.model.memory_plan import measure_step_peak

    path = str(tiny_model_path())
    cfg = ModelConfig.from_hf(path)
    model = load_model(path, cfg, device=torch.device("cpu"), dtype=torch.float32, progress=False)
    batch = dummy_batch(StepShape(chunk=40, prefix=100, decode_rows=3), page_size=16, device="cpu")
    counters = dict(synchronize=lambda *a: None, memory_allocated=lambda *a: 1000, reset_peak_memory_stats=lambda *a: None,
                    max_memory_allocated=lambda *a: 5000, empty_cache=lambda: None)
    with mock.patch.multiple(torch.cuda, **counters):
        assert measure_step_peak(model, TorchAttentionBackend(), cfg, batch, torch.float32, torch.device("cpu")) == 4000

        def out_of_memory(*args: object, **kwargs: object) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

        with mock.patch.object(type(model), "forward", out_of_memory), \
                pytest.raises(ValueError, match=r"does not fit in GPU memory.*--chunked-prefill-size.*9.00 GiB"):
            measure_step_peak(model, TorchAttentionBackend(), cfg, batch, torch.float32, torch.device("cpu"))
