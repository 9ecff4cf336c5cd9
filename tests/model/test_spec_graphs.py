"""The speculative verify step's graphs (model/spec_graphs.py): on CPU their bodies run eagerly (`eager=True`) over
the same static buffers the CUDA graphs capture, and must commit exactly what the eager speculative path and plain
decoding do (greedy, seeded sampling with penalties), padding rows and mixed steps included, leaving the drafter's
state and every request's cache bit-equal. GPU: captured graphs on the Triton backend against plain decoding.
"""

from __future__ import annotations

import gc
from array import array
from dataclasses import replace
from itertools import pairwise
from typing import Any

import pytest
import torch
from test_speculative import PAGE, PAGES_PER_SLOT
from test_speculative import _decode as decode_steps

from baleen.messages import SamplingParams, SeqRow, StepPlan
from baleen.model.build import WorkerConfig, build_runner
from baleen.model.make_model import tiny_model_path
from baleen.model.runner import ModelRunner
from baleen.model.spec_graphs import SpecGraphs

PROMPTS = [[5, 9, 33, 41, 7, 12, 99, 3], [17, 4, 250, 8, 8, 61], [300, 12, 77, 2, 19, 200, 31, 45, 90, 6, 13],
           [44, 81, 7, 19, 19, 2, 140]]  # fmt: skip


def _runner(num_steps: int, sizes: list[int] | None = None, **kw: Any) -> ModelRunner:
    kw.setdefault("model_path", str(tiny_model_path()))
    runner = build_runner(WorkerConfig(page_size=PAGE, max_running_requests=4, max_context_len=PAGES_PER_SLOT * PAGE,
                                       speculative_num_steps=num_steps, **kw))  # fmt: skip
    if sizes is not None:
        assert runner.drafter is not None
        g = SpecGraphs(runner.model, runner.drafter, runner.kv_cache, runner.attn, runner.sampler, sizes,
                       runner.model.config.num_attention_heads, runner.slot_tokens, runner.page_table,
                       runner.scratch_slot, eager=True)  # fmt: skip
        g.make_eager()
        runner.spec_graphs = g
        calls = g.replayed = []  # type: ignore[attr-defined]
        inner = g.draft_and_verify

        def counted(rows: torch.Tensor, n: int) -> torch.Tensor:
            calls.append((rows.shape[0], n))
            return inner(rows, n)

        g.draft_and_verify = counted  # type: ignore[method-assign]
    return runner


def _decode(runner: ModelRunner, prompts: list[list[int]], params: list[SamplingParams], num_new: int,
            num_drafts: int) -> list[list[int]]:  # fmt: skip
    """Prefill every prompt, then verify rows of up to num_drafts drafts (fewer near num_new) until each has num_new
    tokens: tests/model/test_speculative.py's loop."""
    return decode_steps(runner, prompts, params, num_new, num_drafts)[0]


@pytest.mark.parametrize("sizes", [[1, 2, 4], [4]])
def test_graphed_greedy_steps_equal_the_eager_path_bit_for_bit(sizes: list[int]) -> None:
    """Three requests (padded to 4), then four (none padded with [4]); the last steps carry fewer drafts and run
    eagerly. Tokens equal plain decoding; the drafter's state and the cache equal the eager speculative path's."""
    for prompts in (PROMPTS[:3], PROMPTS):
        params = [SamplingParams(temperature=0.0, max_new_tokens=24)] * len(prompts)
        want = _decode(_runner(0), prompts, params, 24, 0)
        eager = _runner(3)
        graphed = _runner(3, sizes)
        assert _decode(eager, prompts, params, 24, 3) == want
        assert _decode(graphed, prompts, params, 24, 3) == want
        calls = graphed.spec_graphs.replayed  # type: ignore[union-attr]
        assert len(calls) >= 3 and all(bs == 4 and n == len(prompts) for bs, n in calls)
        n = len(prompts)
        assert eager.drafter is not None and graphed.drafter is not None
        assert torch.equal(eager.drafter.tokens[:n], graphed.drafter.tokens[:n])
        assert torch.equal(eager.slot_tokens[:n], graphed.slot_tokens[:n])
        # unpadded, the graphs' bodies compute what the eager path does, bit for bit; padded, the matrix products
        # run over more rows (CPU GEMMs may round a row differently with another row count)
        same = torch.equal if n in sizes else lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        assert same(eager.drafter.hidden[:n], graphed.drafter.hidden[:n])
        for a, b in zip(eager.kv_cache.layers, graphed.kv_cache.layers):
            assert same(a[1:], b[1:])  # every page but the padding page 0
        assert torch.equal(eager.sampler.state.iparams, graphed.sampler.state.iparams)  # tokens counted alike


def test_graphed_sampled_steps_draw_the_plain_tokens() -> None:
    """Seeded sampling with top-p/top-k/min-p, penalties and min_new_tokens, and a greedy row with a logit_bias: the
    eager sampler over the graphs' verify logits, then the graphed draft-extend; token for token the plain draws."""
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=20),
        SamplingParams(temperature=0.8, top_k=20, min_p=0.05, frequency_penalty=0.5, presence_penalty=0.3,
                       repetition_penalty=1.2, seed=11, max_new_tokens=20),
        SamplingParams(temperature=1.3, seed=3, min_new_tokens=10, max_new_tokens=20),
        SamplingParams(temperature=0.0, logit_bias={7: 3.0, 250: -100.0}, max_new_tokens=20),
    ]  # fmt: skip
    want = _decode(_runner(0), PROMPTS[:4], params, 20, 0)
    graphed = _runner(3, [1, 2, 4])
    assert _decode(graphed, PROMPTS[:4], params, 20, 3) == want
    assert len(graphed.spec_graphs.replayed) >= 3  # type: ignore[union-attr]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_graphed_steps_read_a_prefix_only_the_device_knows(temperature: float) -> None:
    """Rows with PREFIX_ON_DEVICE (planned behind a verify row in flight) replay the graphs, which read the
    prefix from the drafter's lengths: the plain tokens, greedy and sampled."""
    path, prompts = _default_prompts()  # trained: drafts accepted, so the lengths move by several tokens
    params = [SamplingParams(temperature=temperature, seed=i, max_new_tokens=24) for i in range(3)]
    want = _decode(_runner(0, model_path=str(path)), prompts, params, 24, 0)
    graphed = _runner(3, [4], model_path=str(path))
    got, per_step = decode_steps(graphed, prompts, params, 24, 3, device_prefix=True)
    assert got == want and max(per_step) > 1
    assert len(graphed.spec_graphs.replayed) >= 3  # type: ignore[union-attr]


def _grammar_params(temperature: float) -> list[SamplingParams]:
    from baleen.messages import GrammarSpec

    words = GrammarSpec("regex", r"[a-z ,.]{30,300}")
    return [SamplingParams(temperature=temperature, seed=i, max_new_tokens=24, grammar=words if i != 1 else None)
            for i in range(3)]  # fmt: skip


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_grammar_steps_draft_eagerly_and_replay_the_verify(temperature: float) -> None:
    """Two grammars' requests beside a plain one: every step drafts eagerly under the masks, then replays the
    verify and draft-extend graphs (not the draft loop's); the tokens are plain decoding's, greedy and sampled."""
    path, prompts = _default_prompts()
    params = _grammar_params(temperature)
    want = _decode(_runner(0, model_path=str(path)), prompts, params, 24, 0)
    graphed = _runner(3, [4], model_path=str(path))
    g = graphed.spec_graphs
    assert g is not None
    verified = []
    inner = g.verify
    g.verify = lambda rows, n: verified.append(n) or inner(rows, n)  # type: ignore[method-assign]
    got, per_step = decode_steps(graphed, prompts, params, 24, 3, device_prefix=True)
    assert got == want and max(per_step) > 1
    assert len(verified) >= 3 and not g.replayed  # type: ignore[attr-defined]


class NoRepeat:
    """A custom logit processor that reads the history: never the previous token again."""

    def __init__(self, params: Any, tokenizer: Any) -> None:
        pass

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if output_ids:
            logits[output_ids[-1]] = float("-inf")
        return logits


@pytest.mark.parametrize("sizes", [None, [4]], ids=["eager", "graphed"])
def test_a_custom_processor_request_keeps_the_verify_shape_and_commits_one_token_a_step(
        sizes: list[int] | None) -> None:  # fmt: skip
    """A request with a custom processor carries drafts like the others (the step keeps the graphs' shape), but commits
    one token a row, its processor run on that row's first logits row with every earlier token: the tokens are plain
    decoding's with the same processor, beside greedy and sampled requests that speculate."""
    path, prompts = _default_prompts()
    procs = ("no_repeat=test_spec_graphs:NoRepeat",)
    params = [SamplingParams(temperature=0.0, max_new_tokens=24, custom_logit_processor="no_repeat"),
              SamplingParams(temperature=0.0, max_new_tokens=24),
              SamplingParams(temperature=0.8, seed=4, max_new_tokens=24, custom_logit_processor="no_repeat")]
    want = _decode(_runner(0, model_path=str(path), custom_logit_processors=procs), prompts, params, 24, 0)
    assert all(a != b for out in (want[0], want[2]) for a, b in pairwise(out))  # the processor did its work
    runner = _runner(3, sizes, model_path=str(path), custom_logit_processors=procs)
    got, per_step = decode_steps(runner, prompts, params, 24, 3)
    assert got == want
    assert max(per_step) > 1  # the plain request's drafts were accepted
    if sizes is not None:
        assert len(runner.spec_graphs.replayed) >= 3  # type: ignore[union-attr]


def test_one_draft_step_and_mixed_greedy_sampled_rows() -> None:
    """k = 1 (no draft loop: the graph only verifies and extends); a greedy row beside a sampled one."""
    params = [SamplingParams(temperature=0.0, max_new_tokens=16), SamplingParams(temperature=0.7, seed=5,
                                                                                 max_new_tokens=16)]  # fmt: skip
    want = _decode(_runner(0), PROMPTS[:2], params, 16, 0)
    graphed = _runner(1, [2])
    assert _decode(graphed, PROMPTS[:2], params, 16, 1) == want
    assert graphed.spec_graphs.replayed  # type: ignore[union-attr]


def test_which_steps_replay() -> None:
    """Only steps whose every row is a sampled verify row of k drafts within the page table, at most the largest
    captured size; padding rows are the scratch slot's."""
    runner = _runner(2, [1, 2])
    g = runner.spec_graphs
    assert g is not None
    verify = [SeqRow(0, 10, 3, b"", True), SeqRow(2, 5, 3, b"", True)]
    rows = g.step_rows_of(StepPlan(step_id=1, rows=verify[:1]), pinned=False)
    assert rows is not None and rows.tolist() == [[0, 10]]
    rows = g.step_rows_of(StepPlan(step_id=1, rows=verify), pinned=False)
    assert rows is not None and rows.tolist() == [[0, 10], [2, 5]]
    g.batch_sizes, g.max_bs = [1, 4], 4  # a padded size
    rows = g.step_rows_of(StepPlan(step_id=1, rows=verify), pinned=False)
    assert rows is not None and rows.tolist() == [[0, 10], [2, 5], [4, 1], [4, 1]]
    limit = PAGES_PER_SLOT * PAGE
    for other in (
        [SeqRow(0, 10, 2, b"", True)],  # fewer drafts
        [SeqRow(0, 10, 1, b"", True)],  # a plain decode row
        [SeqRow(0, 0, 3, array("i", [1, 2, 3]).tobytes(), True)],  # a prompt chunk
        [SeqRow(0, 10, 3, b"", False)],  # not sampled
        [SeqRow(0, limit - 2, 3, b"", True)],  # past the page table
        [SeqRow(s, 10, 3, b"", True) for s in range(4)] + [SeqRow(0, 1, 3, b"", True)],  # above the largest size
    ):
        assert g.step_rows_of(StepPlan(step_id=1, rows=other), pinned=False) is None


def test_which_steps_replay_under_dp_attention() -> None:
    """Under DP attention the plans' shared facts decide, never this rank's rows: a step replays on every rank, at the
    size of the largest rank's verify rows, only when the router says every plan is plain verify rows
    (`dp_all_verify`); an idle rank replays padding rows only; rows that contradict the router fail loudly (running
    them eagerly would leave the other ranks waiting in the graphs' collectives)."""
    runner = _runner(2, [1, 2, 4])
    g = runner.spec_graphs
    assert g is not None
    g.dp_size = 2
    pad = list(g.padding_row(g.scratch_slot))
    verify = [SeqRow(0, 10, 3, b"", True)]

    def rows_of(rows: list[SeqRow], counts: list[int], all_verify: bool = True) -> list[list[int]] | None:
        plan = StepPlan(step_id=1, rows=rows, dp_num_tokens=counts, dp_all_verify=all_verify)
        got = g.step_rows_of(plan, pinned=False)
        return None if got is None else got.tolist()

    assert rows_of(verify, [3, 9]) == [[0, 10], pad, pad, pad]  # the other rank has 3 rows: size 4 on both
    assert rows_of([], [3, 6]) == [pad, pad]  # idle: padding only, at the busy rank's size
    assert rows_of(verify, [3, 3]) == [[0, 10]]
    assert rows_of(verify, [3, 9], all_verify=False) is None  # eager on every rank
    assert rows_of(verify, [3, 15]) is None  # 5 rows on the other rank: above the largest size, eager on both
    with pytest.raises(RuntimeError, match="the DP router said"):
        rows_of([SeqRow(0, 10, 1, b"", True)], [1, 3])


def test_padding_rows_write_only_the_padding_page() -> None:
    """A step of one request padded to 4: the cache pages nobody owns stay untouched (zeros), page 0 takes the
    padding rows' latents, and the request's pages equal the eager path's."""
    params = [SamplingParams(temperature=0.0, max_new_tokens=12)]
    eager, graphed = _runner(3), _runner(3, [4])
    want = _decode(eager, PROMPTS[:1], params, 12, 3)
    assert _decode(graphed, PROMPTS[:1], params, 12, 3) == want
    assert graphed.spec_graphs.replayed  # type: ignore[union-attr]
    owned = 1 + PAGES_PER_SLOT
    for a, b in zip(eager.kv_cache.layers, graphed.kv_cache.layers):
        assert torch.allclose(a[1:owned], b[1:owned], rtol=1e-4, atol=1e-5)  # padded: see above
        assert not b[owned:].any()
    assert any(layer[0].any() for layer in graphed.kv_cache.layers)


def test_triton_verify_shape_derives_each_rows_keys_at_every_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton backend's verify shape (query_len 3) beside a decode shape on one backend: planned once on static
    buffers, it reads whatever lengths the static seq_lens hold when it runs (as a replayed graph does), on fixed
    seq_idx / kv_lens rows with its split count frozen; equal to the extend reference (Triton interpreter on CPU)."""
    from types import SimpleNamespace

    from baleen.kernels.mla_extend import mla_extend_ref
    from baleen.model.attention import GraphShape
    from baleen.model.attention_triton import TritonAttentionBackend
    from baleen.model.batch import ForwardBatch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(multi_processor_count=4))
    torch.manual_seed(0)
    heads, d_latent, d_rope, ps, max_pages, bs, q = 2, 64, 32, 16, 4, 2, 3
    attn = TritonAttentionBackend()
    for query_len in (1, q):
        attn.init_graphs(GraphShape(query_len, 4, max_pages, ps, heads, 0.2, torch.float32, dev))
    cache = torch.randn(12, ps, d_latent + d_rope, device=dev)
    table = torch.tensor([[3, 7, 1, 9], [5, 2, 0, 0]], dtype=torch.int32, device=dev)
    seq_lens = torch.ones(4, dtype=torch.int32, device=dev)  # the graphs' static lengths
    decode = ForwardBatch(input_ids=torch.zeros(bs, dtype=torch.int64, device=dev),
                          positions=torch.zeros(bs, dtype=torch.int64, device=dev),
                          out_loc=torch.zeros(bs, dtype=torch.int64, device=dev),
                          qo_indptr=torch.arange(bs + 1, dtype=torch.int32, device=dev), seq_lens=seq_lens[:bs],
                          prefix_lens=seq_lens[:bs], page_table=table, logits_indices=torch.arange(bs, device=dev),
                          seq_lens_cpu=[2] * bs, extend_lens_cpu=[1] * bs, page_size=ps)  # fmt: skip
    attn.plan_capture(decode)
    assert list(attn._decode_splits) == [bs]
    t = bs * q
    verify = ForwardBatch(input_ids=torch.zeros(t, dtype=torch.int64, device=dev),
                          positions=torch.zeros(t, dtype=torch.int64, device=dev),
                          out_loc=torch.zeros(t, dtype=torch.int64, device=dev),
                          qo_indptr=torch.arange(0, t + 1, q, dtype=torch.int32, device=dev), seq_lens=seq_lens[:bs],
                          prefix_lens=seq_lens[:bs], page_table=table, logits_indices=torch.arange(t, device=dev),
                          seq_lens_cpu=[max_pages * ps] * bs, extend_lens_cpu=[q] * bs, page_size=ps)  # fmt: skip
    attn.plan_capture(verify)
    q_nope = torch.randn(t, heads, d_latent, device=dev)
    q_pe = torch.randn(t, heads, d_rope, device=dev)
    for lens in ([24, 8], [40, 3], [64, 17]):  # what three replays' preps would write
        seq_lens[:bs] = torch.tensor(lens, dtype=torch.int32)
        got = attn.run_absorbed(q_nope, q_pe, cache, 0.2)
        want = mla_extend_ref(q_nope, q_pe, cache, table, verify.qo_indptr, seq_lens[:bs], 0.2)
        torch.testing.assert_close(got, want, rtol=2e-3 if dev.type == "cuda" else 1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="query rows a sequence"):
        attn.plan_capture(replace(verify, extend_lens_cpu=[2, 2]))


# ---- GPU: captured graphs -------------------------------------------------------------------------------


def _gpu_runner(num_steps: int, graphs: bool, path: Any, backend: str = "triton", **kw: Any) -> ModelRunner:
    # NOTE: a small KV cache (--max-total-tokens): a test builds several runners, and without it each one sizes its
    # cache from the memory left (on the H100 the second test found 67.5 GiB still held by the first one's).
    gc.collect()
    torch.cuda.empty_cache()
    return build_runner(WorkerConfig(model_path=str(path), device="cuda", dtype="bfloat16", page_size=PAGE,
                                     attention_backend=backend, max_running_requests=4, cuda_graph_bs=(1, 2, 4),
                                     disable_cuda_graph=not graphs, max_context_len=PAGES_PER_SLOT * PAGE,
                                     max_total_tokens=8 * PAGES_PER_SLOT * PAGE, speculative_num_steps=num_steps,
                                     **kw))  # fmt: skip


def _default_prompts() -> tuple[Any, list[list[int]]]:
    from tokenizers import Tokenizer

    from baleen.model.make_model import default_model_path

    path = default_model_path()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    texts = ("The capital of France is", "To be, or not to be, that is", "What is 27 + 58?")
    return path, [tok.encode(t).ids for t in texts]


@pytest.mark.gpu
def test_cuda_graphed_speculation_under_a_grammar_equals_plain_decoding() -> None:
    """Grammars' rows beside a plain one on the captured graphs: the eager draft loop under the masks, then the
    verify graph; greedy tokens equal plain graphed decoding's."""
    path, prompts = _default_prompts()
    params = _grammar_params(0.0)
    want = _decode(_gpu_runner(0, True, path), prompts, params, 24, 0)
    runner = _gpu_runner(3, True, path)
    g = runner.spec_graphs
    assert g is not None
    verified = []
    inner = g.verify
    g.verify = lambda rows, n: verified.append(n) or inner(rows, n)  # type: ignore[method-assign]
    assert decode_steps(runner, prompts, params, 24, 3, device_prefix=True)[0] == want
    assert len(verified) >= 3


@pytest.mark.gpu
@pytest.mark.parametrize("num_steps", [1, 3])
def test_cuda_graphed_speculation_equals_plain_decoding(num_steps: int) -> None:
    """The trained default model (peaked logits: kernel rounding flips no argmax here): greedy tokens through the
    captured draft loop, verify, tail and extend equal plain graphed decoding and the eager speculative path."""
    path, prompts = _default_prompts()
    params = [SamplingParams(temperature=0.0, max_new_tokens=40)] * len(prompts)
    want = _decode(_gpu_runner(0, True, path), prompts, params, 40, 0)
    runner = _gpu_runner(num_steps, True, path)
    g = runner.spec_graphs
    assert g is not None and g.batch_sizes == [1, 2, 4]
    replays = []
    inner = g.draft_and_verify
    g.draft_and_verify = lambda rows, n: replays.append(n) or inner(rows, n)  # type: ignore[method-assign]
    assert _decode(runner, prompts, params, 40, num_steps) == want
    assert len(replays) >= 5
    replays.clear()  # rows planned behind one in flight: the graphs read their prefixes on the device
    assert decode_steps(runner, prompts, params, 40, num_steps, device_prefix=True)[0] == want
    assert len(replays) >= 5
    runner.spec_graphs = None  # the same runner eagerly
    assert _decode(runner, prompts, params, 40, num_steps) == want
    assert decode_steps(runner, prompts, params, 40, num_steps, device_prefix=True)[0] == want


@pytest.mark.gpu
def test_cuda_graphed_speculation_with_sampling_and_single_rows() -> None:
    """Seeded sampling (the eager sampler between the graphs) and a batch of one (size 1): the plain draws."""
    path, prompts = _default_prompts()
    params = [SamplingParams(temperature=0.7, seed=3, max_new_tokens=32),
              SamplingParams(temperature=0.0, max_new_tokens=32)]  # fmt: skip
    for batch in ([prompts[0]], prompts[:2]):
        want = _decode(_gpu_runner(0, True, path), batch, params[: len(batch)], 32, 0)
        assert _decode(_gpu_runner(3, True, path), batch, params[: len(batch)], 32, 3) == want


@pytest.mark.gpu
def test_flashinfer_runner_captures_its_speculative_steps_on_the_triton_kernels(tmp_path: Any) -> None:
    """--attention-backend flashinfer with MTP (the seeds' --enable-flashinfer-mla with EAGLE), at DeepSeek's MLA
    shape: the speculative steps are captured over the Triton kernels and replayed, and commit what a Triton runner
    of the same dummy weights commits (prefill takes the same expanded torch path on both; the steady state replays
    the same graphs)."""
    import json
    import random

    from test_gpu_engine import MLA_SHAPE

    pytest.importorskip("flashinfer")
    (tmp_path / "config.json").write_text(json.dumps({**MLA_SHAPE, "num_nextn_predict_layers": 1}))
    rng = random.Random(2)
    prompts = [[rng.randrange(16, 2048) for _ in range(n)] for n in (5, 23, 40)]
    params = [SamplingParams(temperature=0.0, max_new_tokens=24)] * len(prompts)
    got = {}
    for backend in ("triton", "flashinfer"):
        runner = _gpu_runner(3, True, tmp_path, backend, load_format="dummy", random_seed=5)
        g = runner.spec_graphs
        assert g is not None and type(g.attn).__name__ == "TritonAttentionBackend"
        replays: list[int] = []
        inner = g.draft_and_verify
        g.draft_and_verify = lambda rows, n, r=replays, f=inner: r.append(n) or f(rows, n)  # type: ignore[method-assign]
        got[backend] = _decode(runner, prompts, params, 24, 3)
        assert len(replays) >= 4, (backend, replays)
    assert got["flashinfer"] == got["triton"]
