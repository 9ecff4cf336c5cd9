"""Issue 20, a prompt length's first request: the start-up steps of every token-count regime (model/warm_up.py), the
expanded prefill's SDPA kernels (never cuDNN's per-shape plans), and page tables whose width keeps one stride class."""

from __future__ import annotations

from array import array

import pytest
import torch

from baleen.messages import PageUpdate, SamplingParams, SeqRow, SlotInit, StepPlan
from baleen.model.attention import TorchAttentionBackend
from baleen.model.attention_triton import EXPANDED_SDPA_BACKENDS, _Ragged, expanded_prefill
from baleen.model.build import WorkerConfig, build_runner
from baleen.model.config import ModelConfig
from baleen.model.kv_cache import KVCache
from baleen.model.loader import load_model
from baleen.model.make_model import tiny_model_path
from baleen.model.warm_up import EXTEND_MAX_TOKENS, warm_up_shapes, warm_up_token_counts


def test_token_counts_step_through_every_power_of_two() -> None:
    assert warm_up_token_counts(100) == [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65]
    counts = warm_up_token_counts(8192)
    assert counts[-1] == 8192 and 8193 not in counts
    # every octave (the regimes of the GEMM, MoE and split heuristics span at least one) holds a count
    assert all(any(p < n <= 2 * p for n in counts) for p in (2**k for k in range(13)))
    assert warm_up_token_counts(1) == [1]


def test_warm_up_runs_prefills_and_extends_in_the_padding_page_only() -> None:
    path = str(tiny_model_path())
    cfg = ModelConfig.from_hf(path)
    model = load_model(path, cfg, device=torch.device("cpu"), dtype=torch.float32, progress=False)
    cache = KVCache.for_model(cfg, 6, 16, torch.float32)
    for layer in cache.layers:
        layer[1:].fill_(7.0)  # other requests' latents
    steps = warm_up_shapes(model, cache, TorchAttentionBackend(), max_tokens=40, max_context_len=4096)
    # prefills of 1..33 tokens, and extends of as many (all under EXTEND_MAX_TOKENS) over a 2k-token prefix
    assert steps == 2 * len(warm_up_token_counts(40)) and EXTEND_MAX_TOKENS > 40
    for layer in cache.layers:
        assert bool((layer[1:] == 7.0).all()) and bool(layer[0].any())  # page 0 written, nothing else


def test_warm_up_extends_fit_a_short_context() -> None:
    path = str(tiny_model_path())
    cfg = ModelConfig.from_hf(path)
    model = load_model(path, cfg, device=torch.device("cpu"), dtype=torch.float32, progress=False)
    cache = KVCache.for_model(cfg, 2, 16, torch.float32)
    # a context of 100: prefills up to 99 tokens, no extend (no room for a prefix before 128 rows)
    assert warm_up_shapes(model, cache, TorchAttentionBackend(), 8192, 100) == len(warm_up_token_counts(99))


def test_expanded_prefill_never_asks_cudnn(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bool, bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()))
        return sdpa(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, 2, 24, generator=g) for _ in range(3))
    v = v[..., :16]  # the value head is narrower (padded to q's inside)
    out = expanded_prefill(q, k, v, 0.3, _Ragged(qo=[0, 3, 7], prefix=[0, 0], seq_lens=[3, 4]))
    assert seen == [(False, True), (False, True)] and torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.nn.attention.SDPBackend.CUDNN_ATTENTION not in EXPANDED_SDPA_BACKENDS
    for a, b in ((0, 3), (3, 7)):  # causal attention of each sequence on its own
        scores = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * 0.3
        mask = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        want = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v[a:b])
        torch.testing.assert_close(out[a:b], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("context,prompt,width", [(256, 5, 16), (256, 70, 32), (32, 5, 8)])
def test_a_step_page_table_is_16_pages_wide_or_the_whole_table(context: int, prompt: int, width: int) -> None:
    runner = build_runner(WorkerConfig(model_path=str(tiny_model_path()), page_size=4, max_running_requests=2,
                                       max_context_len=context))  # fmt: skip
    ids = array("i", range(3, 3 + prompt)).tobytes()
    pages = array("i", range(1, 1 + -(-prompt // 4))).tobytes()
    plan = StepPlan(step_id=0, rows=[SeqRow(0, 0, prompt, ids, True)],
                    new_slots=[SlotInit(0, "r0", SamplingParams(temperature=0.0), ids)],
                    page_updates=[PageUpdate(0, 0, pages)])  # fmt: skip
    runner._apply_slot_changes(plan)
    batch, _, _ = runner.build_batch(plan)
    assert batch.page_table.shape == (1, width)
    assert batch.page_table[0, : -(-prompt // 4)].tolist() == list(range(1, 1 + -(-prompt // 4)))
