"""`make-model`: determinism, the shard index, FP8 scales, the tokenizer, the CLI and the default model."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from baleen.api.cli import main as cli_main
from baleen.kernels.quant import FP8_DTYPE, block_dequant
from baleen.model.config import ModelConfig
from baleen.model.make_model import (
    DEFAULT_MODEL_SHARD_BYTES,
    checkpoint_tensors,
    default_cache_dir,
    default_model_path,
    load_trained_weights,
    make_model,
    parse_size,
    tiny_model_path,
)
from baleen.model.presets import preset
from baleen.model.tokenizer_build import ADDED_TOKENS, templates_dir

SHARD = 1_500_000  # bytes: splits the ~5.6 MB tiny model into 4 shards


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "single": make_model(root / "single", "tiny", seed=0),
        "sharded": make_model(root / "sharded", "tiny", seed=0, max_shard_bytes=SHARD),
        "fp8": make_model(root / "fp8", "tiny", fp8=True, seed=0, max_shard_bytes=SHARD),
    }


# ---- determinism ----------------------------------------------------------------------------------------------
def test_same_seed_same_bytes(models: dict[str, Path], tmp_path: Path) -> None:
    again = make_model(tmp_path / "again", "tiny", seed=0, max_shard_bytes=SHARD)
    assert _files(again) == _files(models["sharded"])
    other = make_model(tmp_path / "other", "tiny", seed=1, max_shard_bytes=SHARD)
    a, b = _files(other), _files(models["sharded"])
    assert a.keys() == b.keys()
    assert a["tokenizer.json"] == b["tokenizer.json"] and a["config.json"] == b["config.json"]
    assert all(a[k] != b[k] for k in a if k.endswith(".safetensors"))


def test_cli_in_a_fresh_process_gives_the_same_bytes(models: dict[str, Path], tmp_path: Path) -> None:
    # A second interpreter: no state shared with this one (hash seeds, tokenizer training, torch RNG).
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "baleen.api.cli", "make-model", str(out), "--preset", "tiny"]
    run = subprocess.run(
        [*cmd, "--seed", "0", "--max-shard-size", str(SHARD)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert _files(out) == _files(models["sharded"])


# ---- layout ---------------------------------------------------------------------------------------------------
def test_files_and_names(models: dict[str, Path]) -> None:
    d = models["single"]
    assert sorted(p.name for p in d.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    cfg = ModelConfig.from_hf(d)
    t = _tensors(d)
    L = cfg.num_hidden_layers
    assert L == 4 and cfg.q_lora_rank is not None and cfg.n_routed_experts is not None
    want = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(L + 1):
        p = f"model.layers.{i}"
        want |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
        for n in (
            "q_a_proj",
            "q_a_layernorm",
            "q_b_proj",
            "kv_a_proj_with_mqa",
            "kv_a_layernorm",
            "kv_b_proj",
        ):
            want.add(f"{p}.self_attn.{n}.weight")
        want.add(f"{p}.self_attn.o_proj.weight")
        if i == 0:
            want |= {f"{p}.mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
            continue
        want |= {f"{p}.mlp.gate.weight", f"{p}.mlp.gate.e_score_correction_bias"}
        want |= {f"{p}.mlp.shared_experts.{n}_proj.weight" for n in ("gate", "up", "down")}
        for j in range(cfg.n_routed_experts):
            want |= {f"{p}.mlp.experts.{j}.{n}_proj.weight" for n in ("gate", "up", "down")}
    mtp = f"model.layers.{L}"
    want |= {f"{mtp}.{n}.weight" for n in ("enorm", "hnorm", "eh_proj", "embed_tokens", "shared_head.norm")}
    want.add(f"{mtp}.shared_head.head.weight")
    assert set(t) == want

    h, v = cfg.hidden_size, cfg.vocab_size
    assert t["model.embed_tokens.weight"].shape == (v, h) and t["lm_head.weight"].shape == (v, h)
    assert t["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].shape == (cfg.kv_cache_dim, h)
    assert t["model.layers.1.self_attn.q_b_proj.weight"].shape == (
        cfg.num_attention_heads * cfg.qk_head_dim,
        96,
    )
    assert t[f"{mtp}.eh_proj.weight"].shape == (h, 2 * h)
    assert all(x.dtype == torch.bfloat16 for k, x in t.items() if not k.endswith("e_score_correction_bias"))
    bias = t["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and bias.abs().min() > 0 and bias.std() > 0.01
    # The MTP layer's embedding and head are copies of the main ones, as in the released checkpoint.
    assert torch.equal(t[f"{mtp}.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(t[f"{mtp}.shared_head.head.weight"], t["lm_head.weight"])
    assert all(x.isfinite().all() for x in t.values())


def test_v3_full_layout_matches_the_release() -> None:
    # DeepSeek-V3: 671B parameters in the main model, 11.5B of its own in the MTP module (besides the
    # embedding and head it copies); FP8 weights + float32 block scales come to ~689 GB.
    cfg = ModelConfig.from_dict(preset("v3-full"))
    specs = checkpoint_tensors(cfg, fp8=True)
    mtp = "model.layers.61."
    params = [(s.name, math.prod(s.shape)) for s in specs if not s.name.endswith("_scale_inv")]
    main = sum(n for name, n in params if not name.startswith(mtp))
    own = sum(
        n
        for name, n in params
        if name.startswith(mtp) and "embed_tokens" not in name and ".head." not in name
    )
    assert 670.5e9 < main < 671.5e9 and 11.4e9 < own < 11.7e9
    assert 688e9 < sum(s.nbytes for s in specs) < 689e9
    kv_a = next(s for s in specs if s.name == "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv")
    assert kv_a.shape == (5, 56)  # 576 rows: a partial edge block


def test_no_q_lora_writes_q_proj(tmp_path: Path) -> None:
    d = make_model(tmp_path / "m", "tiny", config_overrides={"q_lora_rank": None})
    with safe_open(d / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not any("q_a_proj" in n or "q_b_proj" in n for n in names)
    assert json.loads((d / "config.json").read_text())["q_lora_rank"] is None


def test_shard_index(models: dict[str, Path]) -> None:
    d = models["sharded"]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(d.glob("*.safetensors"))
    assert len(shards) >= 3 and not (d / "model.safetensors").exists()
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s.name) for s in shards)
    seen: dict[str, str] = {}
    total = 0
    for s in shards:
        with safe_open(s, "pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                seen[k] = s.name
                x = f.get_tensor(k)
                total += x.numel() * x.element_size()
        assert s.stat().st_size <= SHARD + 64 * 1024  # + header
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == total
    # Sharded and single-file checkpoints of one seed hold the same tensors.
    one, many = _tensors(models["single"]), _tensors(d)
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


def test_writer_matches_safetensors(models: dict[str, Path], tmp_path: Path) -> None:
    # Our streaming writer lays files out byte for byte as safetensors' own save_file does.
    for src in [*models["fp8"].glob("*.safetensors"), models["single"] / "model.safetensors"]:
        save_file(load_file(src), tmp_path / "ref.safetensors", metadata={"format": "pt"})
        assert (tmp_path / "ref.safetensors").read_bytes() == src.read_bytes(), src.name


# ---- FP8 ------------------------------------------------------------------------------------------------------
def _is_quantized(name: str) -> bool:
    # every attention / MLP / expert projection, kv_a_proj_with_mqa included (V3 ships it in FP8 too)
    proj = name.endswith("_proj.weight") or name.endswith("kv_a_proj_with_mqa.weight")
    return proj and (".self_attn." in name or ".mlp." in name)


def test_fp8_scales_round_trip(models: dict[str, Path]) -> None:
    cfg = ModelConfig.from_hf(models["fp8"])
    assert cfg.quant is not None and cfg.quant.weight_block_size == (128, 128)
    q, ref = _tensors(models["fp8"]), _tensors(models["single"])
    weights = [k for k in ref if _is_quantized(k)]
    assert (
        len(weights) > 100 and any("eh_proj" in k for k in ref) and not any("eh_proj" in k for k in weights)
    )
    for k in ref:
        if not _is_quantized(k):  # embeddings, norms, router, eh_proj, heads: stored as in the BF16 model
            assert torch.equal(q[k], ref[k]), k
            assert f"{k}_scale_inv" not in q
    assert set(q) == set(ref) | {f"{k}_scale_inv" for k in weights}
    multi_block = 0
    for k in weights:
        w, s, r = q[k], q[f"{k}_scale_inv"], ref[k].float()
        n, kk = w.shape
        assert w.dtype == FP8_DTYPE and s.dtype == torch.float32
        assert s.shape == (math.ceil(n / 128), math.ceil(kk / 128)) and (s > 0).all()
        multi_block += s.numel() > 1
        deq = block_dequant(w, s, (128, 128))
        scale = s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :kk]
        # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal spacing 2^-9 of the block scale
        assert ((deq - r).abs() <= r.abs() * 2**-4 + scale * 2**-9).all(), k
        # the largest magnitude in each block maps onto the top of the e4m3 range
        for bi in range(s.shape[0]):
            for bj in range(s.shape[1]):
                tile = w[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128]
                assert tile.float().abs().amax() == 448.0, (k, bi, bj)
    assert multi_block > 10  # edge blocks and several blocks per weight were exercised


# ---- tokenizer ------------------------------------------------------------------------------------------------
TEXTS = [
    "Hello, world! The whale swims in the ocean.",
    "def f(x: int) -> int:\n    return x * 2  # double\n",
    "你好，世界！東京の春は桜がきれいです。서울은 한국의 수도입니다.",
    "Emoji 🐋🌊 family 👨‍👩‍👧‍👦 flags 🇫🇷 keycap 1️⃣ café naïve Ω≈∞ ‰ \u0301 \t\r\n end",
    "Numbers 1234567890 and 3.14159, bytes \x00\x7f.",
]


def test_tokenizer_round_trip(models: dict[str, Path]) -> None:
    tok = Tokenizer.from_file(str(models["single"] / "tokenizer.json"))
    cfg = ModelConfig.from_hf(models["single"])
    assert 256 + len(ADDED_TOKENS) < tok.get_vocab_size() <= cfg.vocab_size
    for text in TEXTS:
        enc = tok.encode(text)
        assert enc.ids[0] == 0 and 0 not in enc.ids[1:]  # add_bos_token, spelled in the post-processor
        assert tok.decode(enc.ids) == text
        plain = tok.encode(text, add_special_tokens=False).ids
        assert plain == enc.ids[1:]
        assert len(plain) < len(text.encode()), "BPE merges should compress the text"


def test_special_token_ids(models: dict[str, Path]) -> None:
    tok = Tokenizer.from_file(str(models["single"] / "tokenizer.json"))
    for i, (content, _) in enumerate(ADDED_TOKENS):
        assert tok.token_to_id(content) == i
    assert ADDED_TOKENS[0][0] == "<｜begin▁of▁sentence｜>" and ADDED_TOKENS[1][0] == "<｜end▁of▁sentence｜>"
    assert ADDED_TOKENS[2][0] == "<｜▁pad▁｜>" and ADDED_TOKENS[15][0] == "<｜tool▁sep｜>"
    added = {
        t["content"]: t for t in json.loads((models["single"] / "tokenizer.json").read_text())["added_tokens"]
    }
    assert {c for c, t in added.items() if not t["special"]} == {"<think>", "</think>"}
    text = "<｜User｜>hi<｜Assistant｜><think>\nhmm</think>ok<｜end▁of▁sentence｜>"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids[0] == 3 and ids[-1] == 1 and 5 in ids and 6 in ids  # each marker is one token
    assert tok.decode(ids, skip_special_tokens=True) == "hi<think>\nhmm</think>ok"
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_config(models: dict[str, Path]) -> None:
    tc = json.loads((models["single"] / "tokenizer_config.json").read_text())
    assert tc["bos_token"]["content"] == "<｜begin▁of▁sentence｜>"
    assert tc["eos_token"]["content"] == "<｜end▁of▁sentence｜>"
    assert tc["pad_token"]["content"] == "<｜▁pad▁｜>"
    assert (tc["add_bos_token"], tc["add_eos_token"], tc["tokenizer_class"]) == (
        True,
        False,
        "LlamaTokenizerFast",
    )
    assert tc["model_max_length"] == 8192
    template = templates_dir() / "deepseek_v3.jinja"
    if template.exists():
        assert tc["chat_template"] == template.read_text(encoding="utf-8")
    else:
        assert "chat_template" not in tc
    gen = json.loads((models["single"] / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (0, 1)


# ---- CLI ------------------------------------------------------------------------------------------------------
def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    assert cli_main(["make-model", str(out), "--preset", "tiny", "--fp8", "--max-shard-size", "1MB"]) == 0
    assert ModelConfig.from_hf(out).quant is not None
    shards = list(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and all(s.stat().st_size < 10**6 + 64 * 1024 for s in shards)
    assert cli_main(["make-model", str(out), "--preset", "tiny"]) == 2  # not empty: refuses
    assert "not an empty directory" in capsys.readouterr().err
    for bad in (
        ["--preset", "tiny-v9"],
        ["--preset", "tiny", "--max-shard-size", "lots"],
        ["--preset", "tiny", "-x"],
    ):
        with pytest.raises(SystemExit) as e:
            cli_main(["make-model", str(tmp_path / "n"), *bad])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'tiny-v9'" in err and "v3-shape" in err and "lots" in err and "-x" in err
    assert not (tmp_path / "n").exists()


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size("1500") == 1500
    assert parse_size("1.5 kb") == 1500
    for bad in ("", "GB", "-1MB", "5 parsecs", "0"):
        with pytest.raises(ValueError, match="not understood"):
            parse_size(bad)


# ---- the cached models ---------------------------------------------------------------------------------------
def test_tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "baleen" / "models"
    cache = tmp_path / "cache"
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(tiny_model_path(cache))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 2 and paths[0] == paths[1]
    path = paths[0]
    assert [p.name for p in cache.iterdir()] == [path.name]  # the loser's temp dir is gone
    assert re.fullmatch(r"tiny-v\d+-[0-9a-f]{10}", path.name)
    assert _files(path) == _files(
        make_model(tmp_path / "ref", "tiny", seed=0, max_shard_bytes=DEFAULT_MODEL_SHARD_BYTES)
    )
    assert (path / "model.safetensors.index.json").exists()  # engine tests load through the shard index
    stamp = (path / "config.json").stat().st_mtime_ns
    assert tiny_model_path(cache) == path and (path / "config.json").stat().st_mtime_ns == stamp


def test_default_model_is_the_trained_one(tmp_path: Path) -> None:
    bf16, fp8 = default_model_path(tmp_path), default_model_path(tmp_path, fp8=True)
    assert re.fullmatch(r"trained-v\d+-[0-9a-f]{10}", bf16.name) and fp8.name.startswith("trained-fp8-")
    assert _files(bf16) == _files(make_model(tmp_path / "again", "trained", max_shard_bytes=DEFAULT_MODEL_SHARD_BYTES))
    cfg = ModelConfig.from_hf(bf16)
    assert cfg.quant is None and ModelConfig.from_hf(fp8).quant is not None and cfg.has_mtp
    stored, t, q = load_trained_weights(), _tensors(bf16), _tensors(fp8)
    assert {k: v.dtype for k, v in t.items() if k in stored} == {k: v.dtype for k, v in stored.items()}
    assert all(torch.equal(t[k], stored[k]) for k in stored)
    mtp = f"model.layers.{cfg.num_hidden_layers}"
    assert torch.equal(t[f"{mtp}.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(t[f"{mtp}.shared_head.head.weight"], t["lm_head.weight"])
    # the FP8 variant: our block quantizer over the same weights, within e4m3's error
    for k in (f"model.layers.{cfg.num_hidden_layers - 1}.mlp.experts.3.down_proj.weight",
              "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"):
        w = block_dequant(q[k], q[f"{k}_scale_inv"], (128, 128))
        assert ((w - t[k].float()).abs() <= t[k].float().abs() * 2**-4 + 1e-3).all()
    tok = Tokenizer.from_file(str(bf16 / "tokenizer.json"))
    assert tok.encode("1234", add_special_tokens=False).tokens == ["1", "2", "3", "4"]  # one token per digit


# ---- loading with the model's own loader -----------------------------------------------------------------------
def _forward(path: Path, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    # (main logits at every position, MTP logits at every position), through baleen's own model
    loader = pytest.importorskip("baleen.model.loader")
    from baleen.model.attention import TorchAttentionBackend
    from baleen.model.batch import ForwardBatch
    from baleen.model.kv_cache import KVCache

    cfg = ModelConfig.from_hf(path)
    loaded = loader.load_model(path, cfg, device="cpu", dtype=torch.float32, with_mtp=True, progress=False)
    assert loaded.mtp is not None
    page = 16
    kv = KVCache.for_model(cfg, num_pages=8, page_size=page, dtype=torch.float32, with_mtp=True)
    attn = TorchAttentionBackend()
    batch = ForwardBatch.build(ids, [0], [len(ids)], [[1, 2, 3]], page, device="cpu")
    batch.logits_indices = torch.arange(len(ids))
    with torch.no_grad():
        attn.plan(batch)
        hidden = loaded.model(batch, kv, attn)
        logits = loaded.model.compute_logits(hidden)
        # MTP: row t sees the main model's hidden state at t and the token at t + 1
        nxt = ForwardBatch.build([*ids[1:], 0], [0], [len(ids)], [[4, 5, 6]], page, device="cpu")
        attn.plan(nxt)
        mtp_logits = loaded.mtp.compute_logits(loaded.mtp(nxt, hidden, kv, attn))
    return logits, mtp_logits


def test_load_and_forward(models: dict[str, Path]) -> None:
    tok = Tokenizer.from_file(str(models["single"] / "tokenizer.json"))
    ids = tok.encode(" ".join(TEXTS)).ids[:40]
    logits, mtp = _forward(models["sharded"], ids)
    assert logits.shape == (len(ids), ModelConfig.from_hf(models["sharded"]).vocab_size)
    assert logits.isfinite().all() and mtp.isfinite().all()
    assert logits.std() > 0.5 and mtp.std() > 0.5
    # not degenerate: the greedy next token changes from position to position
    assert len(set(logits.argmax(-1).tolist())) > len(ids) // 2
    # the FP8 checkpoint of the same seed is the same model within e4m3 error
    logits8, _ = _forward(models["fp8"], ids)
    assert logits8.isfinite().all()
    corr = torch.corrcoef(torch.stack([logits.flatten(), logits8.flatten()]))[0, 1]
    assert corr > 0.95, corr
