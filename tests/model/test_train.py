"""Training through the serving modules (model/train.py), on CPU at a tiny size: the packed attention equals the
torch backend's, the loss falls, and the written weights load back into the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from baleen.model import corpus, train
from baleen.model.attention import TorchAttentionBackend
from baleen.model.batch import ForwardBatch
from baleen.model.config import ModelConfig
from baleen.model.kv_cache import KVCache
from baleen.model.loader import load_model
from baleen.model.presets import preset

SMALL = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
         "first_k_dense_replace": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 32,
         "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 32, "vocab_size": 512}
ROW = 64


def small_config() -> tuple[dict[str, object], ModelConfig]:
    raw = {**preset("trained"), **SMALL}
    return raw, ModelConfig.from_dict(raw)


def random_batch(seed: int, rows: int = 3) -> train.Batch:
    g = torch.Generator().manual_seed(seed)
    lens: list[int] = []
    for _ in range(rows):
        left = ROW
        while left:
            n = min(left, int(torch.randint(5, 40, (1,), generator=g)))
            lens.append(n)
            left -= n
    n = rows * ROW
    # a learnable stream: each document counts up from a random start (mod 200)
    ids = torch.cat([(torch.randint(0, 200, (1,), generator=g) + torch.arange(k)) % 200 + 16 for k in lens])
    pos = torch.cat([torch.arange(k) for k in lens])
    ends = torch.tensor(lens).cumsum(0) - 1
    last = torch.zeros(n, dtype=torch.bool)
    last[ends] = True
    nxt = torch.where(last, torch.full_like(ids, train.PAD_ID), ids.roll(-1))
    w1 = (~last).float()
    before_last = torch.zeros(n, dtype=torch.bool)
    before_last[ends - 1] = True
    w2 = (~last & ~before_last).float()
    return train.Batch(ids, nxt, pos, nxt, w1, ids.roll(-2), w2, ~last, torch.zeros(n, dtype=torch.int64),
                       torch.ones(n, dtype=torch.bool), lens)


def test_packed_attention_equals_the_torch_backend() -> None:
    batch = random_batch(0)
    main, _ = train.forward_batch(batch, torch.device("cpu"))
    ref_batch = ForwardBatch.build(main.input_ids.tolist(), [0] * len(batch.seg_lens), batch.seg_lens,
                                   [[1]] * len(batch.seg_lens), ROW)
    q, k, v = (torch.randn(main.num_tokens, 2, d) for d in (32, 32, 32))
    packed, ref = train.PackedAttentionBackend(ROW), TorchAttentionBackend()
    packed.plan(main)
    ref.plan(ref_batch)
    torch.testing.assert_close(packed.run_expanded(q, k, v, 0.2), ref.run_expanded(q, k, v, 0.2))


def test_loss_falls_and_the_weights_load_back(tmp_path: Path) -> None:
    raw, cfg = small_config()
    torch.manual_seed(0)
    model, mtp = train.build_model(cfg, torch.device("cpu"))
    params = [p for p in train._params([model, mtp]).values() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    attn = train.PackedAttentionBackend(ROW)
    loads = train.ExpertLoads([model, mtp])
    history = []
    for step in range(30):
        batch = random_batch(step % 4)
        step_losses = train.losses(model, mtp, batch, attn, torch.device("cpu"))
        l1, l2 = step_losses.main, step_losses.mtp
        opt.zero_grad()
        (l1 + train.MTP_WEIGHT * l2).backward()
        opt.step()
        loads.update(train.BIAS_UPDATE)
        history.append((l1.item(), l2.item(), step_losses.mtp_agree.item()))
    assert history[-1][0] < 0.6 * history[0][0] and history[-1][1] < 0.7 * history[0][1], history
    assert sum(h[2] for h in history[-5:]) > sum(h[2] for h in history[:5]) + 0.5, history  # the drafter agrees more
    assert all(g.e_score_correction_bias.abs().sum() > 0 for g in loads.gates)  # type: ignore[union-attr]

    # The released layout (the MTP layer's embedding and head copied in) loads into the serving model.
    tensors = train.trained_tensors(model, mtp, cfg)
    prefix = f"model.layers.{cfg.num_hidden_layers}."
    assert not any(k.startswith(prefix + "embed_tokens") for k in tensors)
    full = {**tensors, prefix + "embed_tokens.weight": tensors["model.embed_tokens.weight"],
            prefix + "shared_head.head.weight": tensors["lm_head.weight"]}
    save_file({k: v.clone() for k, v in full.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = load_model(tmp_path, cfg, dtype=torch.float32, with_mtp=True, progress=False)
    assert loaded.mtp is not None
    batch = random_batch(9, rows=1)
    with torch.no_grad():
        want = train.losses(model, mtp, batch, attn, torch.device("cpu"))
        got = train.losses(loaded.model, loaded.mtp, batch, attn, torch.device("cpu"))
    torch.testing.assert_close((got.main, got.mtp), (want.main, want.mtp), rtol=1e-4, atol=1e-4)


def test_the_argmax_mtp_target_is_the_main_models_next_top1() -> None:
    # --mtp-target argmax: the MTP loss is the cross-entropy of the MTP layer's distribution at each position with a
    # next token on the main model's top-1 one position later, and nothing else (no data target, no KL).
    _, cfg = small_config()
    torch.manual_seed(1)
    model, mtp = train.build_model(cfg, torch.device("cpu"))
    attn = train.PackedAttentionBackend(ROW)
    batch = random_batch(5)
    with torch.no_grad():
        got = train.losses(model, mtp, batch, attn, torch.device("cpu"), mtp_target="argmax")
        data = train.losses(model, mtp, batch, attn, torch.device("cpu"))
        main_batch, mtp_batch = train.forward_batch(batch, torch.device("cpu"))
        kv = KVCache.for_model(cfg, num_pages=2, page_size=1, dtype=torch.bfloat16, device="cpu", with_mtp=True)
        attn.plan(main_batch)
        hidden = model(main_batch, kv, attn)
        rows = batch.has_next.nonzero().squeeze(1)
        target = model.compute_logits(hidden[rows + 1]).argmax(-1)
        want = F.cross_entropy(mtp.compute_logits(mtp(mtp_batch, hidden, kv, attn)[rows]).float(), target)
    torch.testing.assert_close(got.mtp, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got.mtp, data.mtp) and torch.equal(got.main, data.main)
    with pytest.raises(ValueError, match="mtp_target 'argmin': 'data' or 'argmax'"):
        train.losses(model, mtp, batch, attn, torch.device("cpu"), mtp_target="argmin")


def test_batches_fill_rows_with_whole_documents() -> None:
    tok = pytest.importorskip("tokenizers").Tokenizer
    from baleen.model.tokenizer_build import build_tokenizer

    t = build_tokenizer(1000, texts=[d.text for d in corpus.documents(0, 300)], single_digits=True)
    assert isinstance(t, tok)
    b = train.BatchMaker(t.to_str(), seed=0, rows=2, row_len=512)(0)
    assert b.input_ids.shape == (1024,) and sum(b.seg_lens) == 1024
    starts = torch.tensor([0, *b.seg_lens]).cumsum(0)[:-1]
    assert (b.positions[starts] == 0).all()
    real = b.real.nonzero().squeeze(1)
    assert b.input_ids[real].ne(train.PAD_ID).all()
    assert b.weight1.sum() > 0 and (b.weight1 <= b.real.float()).all()


def test_an_mtp_only_stage_changes_the_mtp_layer_alone(tmp_path: Path) -> None:
    # --mtp-only from the shipped default model: the written main model (embedding and head included) is the
    # loaded one bit for bit; the MTP layer moved.
    from safetensors.torch import load_file

    from baleen.model.make_model import trained_weight_files

    assert train.main([str(tmp_path), "--init", str(corpus.data_dir()), "--mtp-only", "--mixture", "mtp",
                       "--steps", "2", "--rows", "1", "--row-len", "256", "--workers", "0", "--device", "cpu"]) == 0
    before: dict[str, torch.Tensor] = {}
    after: dict[str, torch.Tensor] = {}
    for f in trained_weight_files():
        before.update(load_file(f))
    for f in sorted(tmp_path.glob("trained-weights-*.safetensors")):
        after.update(load_file(f))
    assert before.keys() == after.keys()
    mtp = f"model.layers.{json.loads((tmp_path / 'config.json').read_text())['num_hidden_layers']}."
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(mtp))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith(mtp))


def test_greedy_continuations_over_the_cache_equal_recomputing_the_whole_sequence() -> None:
    # The self-distillation documents' generator (prefill, then decode steps over the paged cache) against the
    # plain way: the whole sequence through the expanded model again for every token.
    _, cfg = small_config()
    torch.manual_seed(0)
    model, _ = train.build_model(cfg, torch.device("cpu"), mla_mode="auto")
    model.post_load()
    prompts = [[5, 9, 17, 33, 2], [40, 41], [7] * 19]
    got = train.greedy_continuations(model, prompts, 6, torch.device("cpu"), page=4)
    attn = TorchAttentionBackend()
    for prompt, seq in zip(prompts, got):
        want = list(prompt)
        for _ in range(6):
            batch = ForwardBatch.build(want, [0], [len(want)], [list(range(1, 1 + -(-len(want) // 4)))], 4)
            kv = KVCache.for_model(cfg, 1 + -(-len(want) // 4), 4, torch.float32, torch.device("cpu"))
            attn.plan(batch)
            with torch.no_grad():
                want.append(int(model.compute_logits(model(batch, kv, attn)[batch.logits_indices]).argmax(-1)))
        assert seq == want


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--mtp-only"], "--mtp-only trains the MTP layer of --init's model: give --init"),
     (["--init", "model/data", "--self-distill", "8"], "--self-distill needs --mtp-only and --init")],
)
def test_stage_flags_without_what_they_need_are_refused(tmp_path: Path, flags: list[str], message: str) -> None:
    args = [str(tmp_path), *flags, "--steps", "1", "--rows", "1", "--row-len", "256", "--workers", "0", "--device", "cpu"]
    if "--init" in flags:
        args[args.index("model/data")] = str(corpus.data_dir())
    with pytest.raises(ValueError, match=message):
        train.main(args)
