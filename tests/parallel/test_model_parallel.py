"""Sharded models (TP, EP, DP attention) give the single-rank logits, ranks simulated by threads in one process.

`ThreadComm` stands in for a process group: the ranks are threads that meet at a barrier, so four-rank layouts
(DP groups of two ranks, one idle DP rank) run in a second without spawning processes. The real collectives
over gloo are covered by test_engine_parallel.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import pytest
import torch

from baleen.model.attention import TorchAttentionBackend
from baleen.model.batch import ForwardBatch
from baleen.model.config import ModelConfig, ParallelConfig
from baleen.model.deepseek import DeepseekV3ForCausalLM
from baleen.model.kv_cache import KVCache
from baleen.model.loader import load_model
from baleen.model.make_model import tiny_model_path
from baleen.model.parallel import Comm, DataParallelExchange, ParallelGroups

PAGE = 8
SEQS = [[5, 6, 7, 8, 9, 10, 11, 250], [100, 200, 3], list(range(40, 77)), [900, 901], list(range(300, 313))]


class Hub:
    """What the threads of one group share: a slot per rank and a barrier."""

    def __init__(self, size: int) -> None:
        self.slots: list[Any] = [None] * size
        self.barrier = threading.Barrier(size, timeout=60)


class ThreadComm(Comm):
    """A process group whose ranks are threads; results are bit-identical on every rank, like NCCL/gloo."""

    def __init__(self, size: int, rank: int, hub: Hub) -> None:
        super().__init__(size, rank)
        self.hub = hub

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.hub.slots[self.rank] = x.clone()
        self.hub.barrier.wait()
        parts = list(self.hub.slots)
        self.hub.barrier.wait()
        return parts

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        parts = self._exchange(x)
        out = parts[0]
        for p in parts[1:]:  # in rank order, the same on every rank
            out = out + p if op == "sum" else (torch.maximum(out, p) if op == "max" else torch.minimum(out, p))
        return x.copy_(out)

    def all_gather_stack(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(x))

    def reduce_scatter_stack(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(x)
        out = parts[0][self.rank]
        for p in parts[1:]:
            out = out + p[self.rank]
        return out


def thread_groups(tp: int, dp: int = 1, ep: int = 1) -> list[ParallelGroups]:
    """Every rank's groups: all ranks in one TP hub, the ranks of each DP group in an attention hub."""
    a = tp // dp
    tp_hub, attn_hubs = Hub(tp), [Hub(a) for _ in range(dp)]
    out = []
    for r in range(tp):
        parallel = ParallelConfig(tp_rank=r, tp_size=tp, ep_size=ep, dp_size=dp)
        tp_comm = ThreadComm(tp, r, tp_hub)
        attn: Comm = tp_comm if dp == 1 else (ThreadComm(a, r % a, attn_hubs[r // a]) if a > 1 else Comm())
        out.append(ParallelGroups(parallel, tp_comm, attn))
    return out


@pytest.fixture(scope="module")
def checkpoint() -> tuple[str, ModelConfig]:
    path = str(tiny_model_path())
    return path, ModelConfig.from_hf(path)


def run_seqs(
    model: DeepseekV3ForCausalLM, seqs: list[list[int]], dp_counts: tuple[list[int], list[int]] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill `seqs` from scratch, then one greedy decode step; logits of both steps (maybe 0 rows)."""
    config = model.config
    per_seq = [-(-(len(s) + 1) // PAGE) for s in seqs]
    starts = [1 + sum(per_seq[:i]) for i in range(len(seqs))]
    tables = [list(range(st, st + n)) for st, n in zip(starts, per_seq)]
    cache = KVCache.for_model(config, 2 + sum(per_seq), PAGE, torch.float32)
    lens = [len(s) for s in seqs]
    prefill = ForwardBatch.build([t for s in seqs for t in s], [0] * len(seqs), lens, tables, PAGE)
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for step in range(2):
            batch = prefill
            if step == 1:
                nxt = out[0].argmax(-1).tolist()
                batch = ForwardBatch.build(nxt, lens, [1] * len(seqs), tables, PAGE)
            if dp_counts is not None:
                batch.dp_num_tokens = dp_counts[step]
            attn = TorchAttentionBackend()
            if seqs:
                attn.plan(batch)
            hidden = model(batch, cache, attn)
            out.append(model.compute_logits(hidden[batch.logits_indices]))
    return out[0], out[1]


def on_threads(fns: list[Callable[[], Any]]) -> list[Any]:
    with ThreadPoolExecutor(len(fns)) as pool:
        return [f.result() for f in [pool.submit(fn) for fn in fns]]


@pytest.mark.parametrize(
    ("tp", "dp", "ep"),
    [(4, 1, 1), (4, 1, 4), (4, 2, 2), (4, 4, 1), (3, 1, 1), (3, 3, 1)],
    ids=["tp4", "tp4-ep4", "dp2-of-2-ranks-ep2", "dp4-one-idle", "tp3-padded", "dp3-widths-padded"],
)
def test_sharded_ranks_match_one_rank(checkpoint: tuple[str, ModelConfig], tp: int, dp: int, ep: int) -> None:
    """tp3: the tiny model's 4 heads, 320 and 64 intermediate widths split over 3 ranks zero-padded (6 heads, 336,
    72: `ModelConfig.padded_for_tp`), the outputs the unpadded model's."""
    path, config = checkpoint
    single = load_model(path, config, progress=False)
    groups = thread_groups(tp, dp, ep)
    padded = config.padded_for_tp(groups[0].parallel)
    assert (padded is config) == (tp == 4)
    models = [load_model(path, padded, parallel=g.parallel, groups=g, progress=False) for g in groups]
    # DP group d serves seqs_of[d]; with dp=4 the last DP rank has nothing (it still joins every MLP).
    seqs_of = [SEQS[d::dp] for d in range(dp)]
    if dp == 4:
        seqs_of[3] = []
    counts = None
    if dp > 1:
        counts = ([sum(map(len, s)) for s in seqs_of], [len(s) for s in seqs_of])
    outs = on_threads([partial(run_seqs, m, seqs_of[g.dp_rank], counts) for m, g in zip(models, groups)])
    for g, (prefill, decode) in zip(groups, outs):
        want_prefill, want_decode = run_seqs(single, seqs_of[g.dp_rank], None)
        assert prefill.shape == want_prefill.shape
        torch.testing.assert_close(prefill, want_prefill, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(decode, want_decode, rtol=1e-4, atol=1e-4)
    if dp == 4:
        assert outs[3][0].shape[0] == 0 and outs[3][1].shape[0] == 0  # the idle rank ran 0 tokens


def test_padded_ranks_of_an_fp8_checkpoint_match_one_rank(tmp_path: Any) -> None:
    """An FP8 checkpoint over 3 ranks on CPU: each rank's shard of a padded tensor is read dequantized, zeros past the
    checkpoint's extent (model/loader.py `ZeroPadded` over `DequantSource`)."""
    from baleen.model.make_model import make_model

    path = str(make_model(tmp_path / "fp8", "tiny", fp8=True, progress=False))
    config = ModelConfig.from_hf(path)
    assert config.quant is not None
    single = load_model(path, config, progress=False)
    groups = thread_groups(3)
    padded = config.padded_for_tp(groups[0].parallel)
    models = [load_model(path, padded, parallel=g.parallel, groups=g, progress=False) for g in groups]
    assert models[2].model.layers[0].self_attn.num_heads == 2  # heads 4 and 5 of 6: one real, one zero
    outs = on_threads([partial(run_seqs, m, SEQS, None) for m in models])
    want_prefill, want_decode = run_seqs(single, SEQS, None)
    for prefill, decode in outs:
        torch.testing.assert_close(prefill, want_prefill, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(decode, want_decode, rtol=1e-4, atol=1e-4)


def test_dp_exchange_pads_gathers_and_scatters_by_plan_shapes() -> None:
    """4 ranks in 2 DP groups of 2: gather takes each group once; combine returns each group its summed rows."""
    groups = thread_groups(4, 2)
    counts = [3, 1]
    rows = {0: torch.arange(3.0).view(3, 1) + 10, 1: torch.tensor([[20.0]])}

    def rank(g: ParallelGroups) -> tuple[torch.Tensor, torch.Tensor]:
        ex = DataParallelExchange(g)
        gathered = ex.gather(rows[g.dp_rank], counts)
        partial = gathered * (g.parallel.tp_rank + 1)  # each rank's "shard" of the MLP output
        return gathered, ex.combine(partial, counts)

    outs = on_threads([partial(rank, g) for g in groups])
    for g, (gathered, combined) in zip(groups, outs):
        assert gathered.flatten().tolist() == [10.0, 11.0, 12.0, 20.0]
        torch.testing.assert_close(combined, rows[g.dp_rank] * (1 + 2 + 3 + 4))
    with pytest.raises(ValueError, match="plan says"):
        DataParallelExchange(thread_groups(2, 2)[0]).gather(torch.zeros(2, 1), [3, 1])
    with pytest.raises(ValueError, match="each of the 2 DP ranks"):
        DataParallelExchange(thread_groups(2, 2)[0]).gather(torch.zeros(2, 1), None)


def test_dp_groups_of_several_ranks_need_created_groups() -> None:
    with pytest.raises(ValueError, match=r"ParallelGroups\.create"):
        ParallelGroups.default(ParallelConfig(tp_rank=0, tp_size=4, dp_size=2))
    g = ParallelGroups.default(ParallelConfig(tp_rank=3, tp_size=4, dp_size=4))
    assert (g.attn.size, g.dp_rank, g.attn_parallel.tp_size) == (1, 3, 1)
    g = ParallelGroups.default(ParallelConfig(tp_rank=1, tp_size=2))
    assert g.attn is g.tp and not g.dp_attention


def test_dp_attention_decode_graphs_replay_one_size_on_every_rank() -> None:
    """DP attention over two ranks (threads) with the decode graphs in eager mode (model/cuda_graph.py's one replay
    path, `eager=True`): a decode step replays, on every rank, the captured size of the largest rank's batch (an
    idle rank its padding rows only), steps with a prefill run eagerly on every rank, and the tokens are the eager
    DP steps' tokens."""
    from array import array

    from baleen.messages import PageUpdate, SamplingParams, SeqRow, SlotInit, StepPlan
    from baleen.model.build import WorkerConfig, build_runner
    from baleen.model.cuda_graph import DecodeGraphs

    prompts = [[[5, 17, 99, 3, 250], [44, 81, 7]], [[12, 13, 14, 15, 16, 17, 18]]]  # rank 0: two, rank 1: one
    steps = 6  # rank 1's request stops after 3 tokens: its last steps are idle

    def rank_plans(rank: int, graphs: bool, groups: ParallelGroups) -> tuple[list[list[int]], list[int]]:
        runner = build_runner(WorkerConfig(model_path=str(tiny_model_path()), page_size=PAGE, max_running_requests=4,
                                           max_context_len=64, random_seed=5, parallel=groups.parallel), groups)  # fmt: skip
        replayed: list[int] = []
        if graphs:
            g = DecodeGraphs(runner.model, runner.kv_cache, runner.attn, runner.sampler, [1, 2, 4],
                             runner.model.config.num_attention_heads, runner.slot_tokens, runner.page_table,
                             runner.scratch_slot, dp_size=2, eager=True)  # fmt: skip
            g.make_eager()
            inner = g.replay
            g.replay = lambda rows, n, greedy: replayed.append(rows.shape[0]) or inner(rows, n, greedy)  # type: ignore[method-assign]
            runner.graphs = g
        mine = prompts[rank]
        lens = [len(p) for p in mine]
        out: list[list[int]] = [[] for _ in mine]
        for step in range(steps):
            done = [rank == 1 and step >= 3 for _ in mine]
            if step == 0:
                params = SamplingParams(temperature=0.0)
                inits = [SlotInit(s, f"r{rank}.{s}", params, array("i", p).tobytes()) for s, p in enumerate(mine)]
                pages = [PageUpdate(s, 0, array("i", range(1 + 8 * s, 9 + 8 * s)).tobytes()) for s in range(len(mine))]
                rows = [SeqRow(s, 0, len(p), array("i", p).tobytes(), True) for s, p in enumerate(mine)]
                counts = [sum(len(p) for p in ps) for ps in prompts]
                plan = StepPlan(step_id=step, rows=rows, new_slots=inits, page_updates=pages, dp_num_tokens=counts)
            else:
                rows = [SeqRow(s, lens[s] + step - 1, 1, b"", True) for s in range(len(mine)) if not done[s]]
                counts = [len(prompts[0]), 0 if step >= 3 else len(prompts[1])]
                plan = StepPlan(step_id=step, rows=rows, dp_num_tokens=counts, dp_all_decode=True)
            result = runner.finish(runner.launch(plan))
            for s, tok in zip([s for s in range(len(mine)) if not done[s]], array("i", result.token_ids)):
                out[s].append(tok)
        return out, replayed

    got = {}
    for graphs in (False, True):
        groups = thread_groups(2, dp=2)
        got[graphs] = on_threads([partial(rank_plans, r, graphs, groups[r]) for r in range(2)])
    (eager0, none0), (eager1, none1) = got[False]
    (graph0, sizes0), (graph1, sizes1) = got[True]
    assert not none0 and not none1
    assert (graph0, graph1) == (eager0, eager1)
    assert [len(t) for t in graph0 + graph1] == [6, 6, 3]
    # decode steps 1-5 on both ranks: 2 rows and 1 -> size 2 each; rank 1 idle from step 3 still replays size 2
    assert sizes0 == sizes1 == [2] * 5
