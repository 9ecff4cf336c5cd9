"""A draft model given by path (--speculative-draft-model-path): SGLang's NextN export of an MTP layer, or a whole
checkpoint whose MTP layer alone is read; both draft exactly as the target's own MTP layer does."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from baleen.actors.engine import Engine
from baleen.actors.engine_config import EngineConfig, plan_startup
from baleen.messages import SamplingParams
from baleen.model import loader
from baleen.model.config import ModelConfig
from baleen.model.loader import LoadedModel, load_model, load_mtp
from baleen.model.make_model import default_model_path, tiny_model_path


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _copy_side_files(src: Path, dst: Path) -> dict[str, Any]:
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    config: dict[str, Any] = json.loads((src / "config.json").read_text())
    return config


def split_checkpoint(src: Path, out: Path) -> tuple[Path, Path]:
    """(the checkpoint without its MTP layer, that layer as SGLang's export script writes it: config.json with
    architectures [DeepseekV3ForCausalLMNextN] and num_hidden_layers 1, `model.layers.{L}.*` renamed to
    `model.layers.0.*` without the embedding and head, in nextn_layer_parameters.safetensors under an index)."""
    tensors = _tensors(src)
    config = _copy_side_files(src, out / "target")
    layer = f"model.layers.{config['num_hidden_layers']}."
    save_file({k: v for k, v in tensors.items() if not k.startswith(layer)}, out / "target" / "model.safetensors")
    (out / "target" / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))

    config = _copy_side_files(src, out / "nextn")
    layer_0 = {"model.layers.0." + k.removeprefix(layer): v for k, v in tensors.items()
               if k.startswith(layer) and not k.endswith(("embed_tokens.weight", "shared_head.head.weight"))}
    save_file(layer_0, out / "nextn" / "nextn_layer_parameters.safetensors")
    (out / "nextn" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(layer_0, "nextn_layer_parameters.safetensors")}))
    (out / "nextn" / "config.json").write_text(json.dumps(
        {**config, "num_hidden_layers": 1, "architectures": ["DeepseekV3ForCausalLMNextN"]}))
    return out / "target", out / "nextn"


@pytest.fixture(scope="module")
def trained() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def split(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return split_checkpoint(trained, tmp_path_factory.mktemp("split"))


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items()}


def test_the_export_loads_the_checkpoint_s_own_layer(trained: Path, split: tuple[Path, Path]) -> None:
    config = ModelConfig.from_hf(trained)
    own = load_model(trained, config, with_mtp=True, progress=False)
    assert isinstance(own, LoadedModel) and own.mtp is not None
    target, nextn = split
    model = load_model(target, ModelConfig.from_hf(target), progress=False)
    draft = load_mtp(nextn, model.config, model, progress=False)
    assert draft.layer_id == own.mtp.layer_id == config.num_hidden_layers  # caches in the target's layer L
    # The export has no embedding or head: the target's own, not copies
    assert draft.embed_tokens is model.model.embed_tokens and draft.shared_head.head is model.lm_head
    want, got = _state(own.mtp), _state(draft)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_dummy_draft_weights_leave_the_target_s_embedding_and_head(split: tuple[Path, Path]) -> None:
    target, nextn = split
    model = load_model(target, ModelConfig.from_hf(target), progress=False)
    embed, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    draft = load_mtp(nextn, model.config, model, load_format="dummy", seed=5, progress=False)
    assert draft.embed_tokens is model.model.embed_tokens and draft.shared_head.head is model.lm_head
    assert torch.equal(model.model.embed_tokens.weight, embed) and torch.equal(model.lm_head.weight, head)
    assert draft.eh_proj.weight.abs().sum() > 0  # its own weights are the random ones


def test_a_whole_checkpoint_as_draft_reads_its_mtp_layer_alone(trained: Path, split: tuple[Path, Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    config = ModelConfig.from_hf(trained)
    own = load_model(trained, config, with_mtp=True, progress=False)
    assert isinstance(own, LoadedModel) and own.mtp is not None
    read: list[str] = []
    source = loader.Checkpoint.source

    def recording(self: loader.Checkpoint, name: str) -> Any:
        read.append(name)
        return source(self, name)

    monkeypatch.setattr(loader.Checkpoint, "source", recording)
    model = load_model(split[0], ModelConfig.from_hf(split[0]), progress=False)
    read.clear()
    draft = load_mtp(trained, model.config, model, progress=False)
    layer = f"model.layers.{config.num_hidden_layers}."
    assert read and all(name.startswith(layer) for name in read)
    assert f"{layer}embed_tokens.weight" in read  # a whole checkpoint's MTP layer has its own copies: used
    want, got = _state(own.mtp), _state(draft)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def _generate(path: Path, prompts: list[list[int]], **kw: Any) -> list[tuple[list[int], int | None]]:
    async def run() -> list[tuple[list[int], int | None]]:
        config = EngineConfig(model_path=str(path), device="cpu", dtype="float32", context_length=256, **kw)
        async with await Engine.start(config) as engine:
            async def one(prompt: list[int]) -> tuple[list[int], int | None]:
                ids: list[int] = []
                verify = None
                async for out in engine.generate(prompt, SamplingParams(max_new_tokens=24, temperature=0.0)):
                    ids += out.token_ids
                    verify = out.spec_verify_ct
                return ids, verify

            return list(await asyncio.gather(*(one(p) for p in prompts)))

    return asyncio.run(run())


def test_the_engine_drafts_with_the_export_as_with_the_model_s_own_layer(trained: Path,
                                                                         split: tuple[Path, Path]) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(trained / "tokenizer.json"))
    texts = ["What is the capital of Peru?", "What is 27 + 58?", "Shall I compare thee to a summer's day?"]
    prompts = [tokenizer.encode(t).ids for t in texts]
    plain = _generate(trained, prompts)
    own = _generate(trained, prompts, speculative_algorithm="EAGLE")
    exported = _generate(split[0], prompts, speculative_algorithm="NEXTN", speculative_draft_model_path=str(split[1]))
    assert [ids for ids, _ in own] == [ids for ids, _ in exported] == [ids for ids, _ in plain]
    # The same drafts are accepted: the same verify steps per request (fewer than the tokens: drafts were kept)
    assert [n for _, n in exported] == [n for _, n in own]
    assert sum(n or 0 for _, n in own) < sum(len(ids) for ids, _ in own)


def test_a_draft_model_that_cannot_draft_is_refused_before_loading(trained: Path, split: tuple[Path, Path]) -> None:
    target, nextn = split
    cfg = ModelConfig.from_hf(target)

    def plan(model: Path, **kw: Any) -> Any:
        return plan_startup(EngineConfig(model_path=str(model), device="cpu", **kw), str(model), ModelConfig.from_hf(model))

    with pytest.raises(ValueError, match="holds an MTP \\(NextN\\) layer alone, not a model to serve"):
        plan(nextn)
    with pytest.raises(ValueError, match="holds an MTP \\(NextN\\) layer alone"):
        load_model(nextn, ModelConfig.from_hf(nextn), progress=False)
    with pytest.raises(ValueError, match=f"{target} has no MTP \\(NextN\\) layer"):
        plan(target, speculative_algorithm="EAGLE", speculative_draft_model_path=str(target))
    tiny = tiny_model_path()
    with pytest.raises(ValueError, match=f"{tiny} does not fit the model: hidden_size"):
        plan(target, speculative_algorithm="EAGLE", speculative_draft_model_path=str(tiny))
    model = load_model(target, cfg, progress=False)
    with pytest.raises(ValueError, match="does not fit the target: hidden_size"):
        load_mtp(tiny, model.config, model, progress=False)
