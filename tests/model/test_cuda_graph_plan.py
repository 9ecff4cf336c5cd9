"""The decode graphs' one replay path on CPU, with the graphs stood in by eager calls (real CUDA graphs:
tests/model/test_gpu_engine.py): what a graph backend's hooks receive, and FlashInfer's page ids planned from the
runner's per-slot table."""

from __future__ import annotations

from array import array

import numpy as np
import pytest
import torch

from baleen.messages import PageUpdate, SamplingParams, SeqRow, SlotInit, StepPlan
from baleen.model.attention import GraphAttentionBackend, GraphShape, TorchAttentionBackend
from baleen.model.attention_flashinfer import _Csr
from baleen.model.batch import ForwardBatch
from baleen.model.build import WorkerConfig, build_runner
from baleen.model.cuda_graph import DecodeGraphs
from baleen.model.make_model import tiny_model_path
from baleen.model.runner import ModelRunner

PAGE = 4


class RecordingBackend(GraphAttentionBackend):
    """Torch attention behind the graph hooks, recording what they are given."""

    def __init__(self) -> None:
        self.torch = TorchAttentionBackend()
        self.shape: GraphShape | None = None
        self.captured: list[int] = []
        self.replays: list[tuple[int, list[int], list[int]]] = []

    def plan(self, batch: ForwardBatch) -> None:
        self.torch.plan(batch)

    def run_absorbed(self, q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache_layer: torch.Tensor,
                     scale: float, kv_scale: float = 1.0) -> torch.Tensor:  # fmt: skip
        return self.torch.run_absorbed(q_latent, q_pe, kv_cache_layer, scale, kv_scale)

    def run_expanded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return self.torch.run_expanded(q, k, v, scale)

    def init_graphs(self, shape: GraphShape) -> None:
        self.shape = shape

    def plan_capture(self, batch: ForwardBatch) -> None:
        self.captured.append(batch.num_seqs)
        self.plan(batch)

    def plan_replay(self, num_seqs: int, seq_lens: np.ndarray, page_table: torch.Tensor, table_rows: np.ndarray) -> None:
        self.replays.append((num_seqs, seq_lens.tolist(), table_rows.tolist()))


def _eager_graphs(runner: ModelRunner, attn: RecordingBackend, sizes: list[int], dp_size: int = 1) -> DecodeGraphs:
    """DecodeGraphs over the runner's slots whose 'graphs' run eagerly (`eager=True`): the prep, the forward (the
    backend planned with the real lengths, which a captured kernel reads from the device), the greedy tail."""
    heads = runner.model.config.num_attention_heads
    g = DecodeGraphs(runner.model, runner.kv_cache, attn, runner.sampler, sizes, heads, runner.slot_tokens,
                     runner.page_table, runner.scratch_slot, dp_size, eager=True)  # fmt: skip
    g.make_eager()
    return g


def _run(runner: ModelRunner, prompts: list[list[int]], params: list[SamplingParams], steps: int) -> list[list[int]]:
    pages = {s: list(range(1 + 8 * s, 9 + 8 * s)) for s in range(len(prompts))}  # 32 tokens a slot
    inits = [SlotInit(s, f"r{s}", params[s], array("i", p).tobytes()) for s, p in enumerate(prompts)]
    updates = [PageUpdate(s, 0, array("i", pages[s]).tobytes()) for s in pages]
    rows = [SeqRow(s, 0, len(p), array("i", p).tobytes(), True) for s, p in enumerate(prompts)]
    plan = StepPlan(step_id=0, rows=rows, new_slots=inits, page_updates=updates)
    lens = [len(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(steps):
        result = runner.finish(runner.launch(plan))
        for s, tok in enumerate(array("i", result.token_ids)):
            out[s].append(tok)
        plan = StepPlan(step_id=step + 1, rows=[SeqRow(s, lens[s] + step, 1, b"", True) for s in range(len(prompts))])
    return out


@pytest.mark.parametrize("sampling", ["greedy", "mixed"])
def test_one_replay_path_gives_the_eager_tokens(sampling: str) -> None:
    runner = build_runner(WorkerConfig(model_path=str(tiny_model_path()), page_size=PAGE, max_running_requests=4,
                                       max_context_len=32, random_seed=5))  # fmt: skip
    attn = RecordingBackend()
    runner.attn = attn
    graphs = _eager_graphs(runner, attn, [1, 2, 4])
    assert attn.shape is not None and (attn.shape.query_len, attn.shape.max_num_seqs, attn.shape.max_pages) == (1, 4, 8)
    assert attn.captured == [1, 2, 4]
    prompts = [[5, 17, 99, 3, 250], [44, 81, 7], [12, 13, 14, 15, 16, 17, 18]]  # 3 rows: padded to 4
    params = [SamplingParams(temperature=0.0)] * 3
    if sampling == "mixed":
        params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=3),
                  SamplingParams(temperature=0.0, logprobs=True)]  # fmt: skip
    runner.graphs = graphs
    replayed = _run(runner, prompts, params, 6)
    # the prefill runs eagerly; every decode step replays, its hooks told the real rows' lengths and slots
    assert attn.replays == [(4, [5 + i, 3 + i, 7 + i], [0, 1, 2]) for i in range(1, 6)]
    runner.graphs = None
    eager = _run(runner, prompts, params, 6)
    assert replayed == eager


def test_flashinfer_pages_from_the_slot_table_equal_the_gathered_ones() -> None:
    """FlashInfer's replay plan reads each row's pages from the runner's per-slot table by slot: the same CSR and
    page ids as planning from the batch's gathered table, padding rows on the padding page."""
    max_pages, page_size = 6, 4
    slot_table = torch.randint(1, 100, (9, max_pages), dtype=torch.int32)  # 8 slots + the scratch slot
    slots, lens = [6, 2, 4], [9, 1, 24]
    gathered = slot_table[slots][:, : -(-max(lens) // page_size)]
    by_slot = _Csr([1] * 3, lens, page_size, max_pages, pad_to=5, table_rows=slots)
    by_row = _Csr([1] * 3, lens, page_size, gathered.shape[1], pad_to=5)
    for name in ("qo", "kv", "kv_len"):
        np.testing.assert_array_equal(getattr(by_slot, name), getattr(by_row, name))
    got = by_slot.kv_indices(slot_table)
    torch.testing.assert_close(got, by_row.kv_indices(gathered))
    want = [*slot_table[6, :3].tolist(), slot_table[2, 0].item(), *slot_table[4, :6].tolist(), 0, 0]
    assert got.tolist() == want


def test_only_eager_graphs_take_a_backend_without_graph_hooks() -> None:
    runner = build_runner(WorkerConfig(model_path=str(tiny_model_path()), page_size=PAGE, max_running_requests=4,
                                       max_context_len=32))  # fmt: skip
    args = (runner.model, runner.kv_cache, TorchAttentionBackend(), runner.sampler, [1, 2], 4, runner.slot_tokens,
            runner.page_table, runner.scratch_slot)  # fmt: skip
    with pytest.raises(ValueError, match="TorchAttentionBackend has no CUDA-graph support"):
        DecodeGraphs(*args)
    DecodeGraphs(*args, eager=True).make_eager()  # CPU tests: any backend, planned with each step's real lengths
