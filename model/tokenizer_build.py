"""A small byte-level BPE tokenizer in DeepSeek-V3's file layout, trained deterministically on model/data/.

The added tokens sit at fixed low ids (bos 0, eos 1, pad 2, then the chat / thinking / tool markers), so the
embedded default model and its tests can name them without reading the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
USER_TOKEN, ASSISTANT_TOKEN = "<｜User｜>", "<｜Assistant｜>"
# DeepSeek-V3's tool-call markers: the chat template writes them, api/tool_parser.py reads them, grammars emit them.
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
# The markers a "tool_calls" grammar may generate (model/grammar.py makes them ordinary tokens for it).
TOOL_CALL_TOKENS = (TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP)

# (content, special): id = position. `<think>` and `</think>` are ordinary added tokens, as in DeepSeek-R1,
# so they survive skip_special_tokens when the reasoning text is decoded.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (BOS_TOKEN, True),
    (EOS_TOKEN, True),
    (PAD_TOKEN, True),
    (USER_TOKEN, True),
    (ASSISTANT_TOKEN, True),
    ("<think>", False),
    ("</think>", False),
    (TOOL_CALLS_BEGIN, True),
    (TOOL_CALLS_END, True),
    (TOOL_CALL_BEGIN, True),
    (TOOL_CALL_END, True),
    (TOOL_OUTPUTS_BEGIN, True),
    (TOOL_OUTPUTS_END, True),
    (TOOL_OUTPUT_BEGIN, True),
    (TOOL_OUTPUT_END, True),
    (TOOL_SEP, True),
)

DEFAULT_VOCAB_SIZE = 1000
CORPUS_FILES = ("corpus.txt",)


def data_dir() -> Path:
    """The folder holding the training corpus."""
    return Path(__file__).parent / "data"


def templates_dir() -> Path:
    """DeepSeek's chat templates: written into the checkpoints make-model creates, the built-ins of
    --chat-template (api/chat_template.py)."""
    return Path(__file__).parent / "templates"


def build_tokenizer(
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    corpus: list[Path] | None = None,
    *,
    texts: list[str] | None = None,
    single_digits: bool = False,
) -> Tokenizer:
    """Train the byte-level BPE tokenizer; the same corpus and vocab_size always give the same tokenizer.

    `texts` replaces the corpus files (the trained default model's tokenizer reads its training documents);
    `single_digits` makes every digit its own token (so column arithmetic sees one digit per token) instead of
    DeepSeek's runs of up to three.
    """
    num_added = len(ADDED_TOKENS)
    if vocab_size < num_added + 256:
        raise ValueError(
            f"vocab_size={vocab_size} must be at least {num_added + 256} (added tokens + 256 bytes)"
        )
    if texts is None:
        files = corpus if corpus is not None else [data_dir() / name for name in CORPUS_FILES]
        texts = [f.read_text(encoding="utf-8") for f in files]
    tok = Tokenizer(models.BPE())
    # Like DeepSeek's: digits in runs of at most 3, CJK runs apart, then GPT-2's byte-level split.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}" if single_digits else r"\p{N}{1,3}"), behavior="isolated"),
            pre_tokenizers.Split(Regex("[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # add_bos_token=true, spelled where every reader sees it: encode(text) starts with bos, and
    # encode(text, add_special_tokens=False) (for rendered chat prompts, which carry their own) does not.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, 0)],
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[content for content, _ in ADDED_TOKENS],  # reserves ids 0..len-1 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # One text per line keeps the pair counts independent of how the corpus is chunked.
    tok.train_from_iterator(
        (line for text in texts for line in text.splitlines(keepends=True)), trainer=trainer
    )
    return _set_added_token_flags(tok)


def _set_added_token_flags(tok: Tokenizer) -> Tokenizer:
    # The trainer registers every reserved token as special; DeepSeek-R1 keeps <think>/</think> normal.
    spec = json.loads(tok.to_str())
    special = dict(ADDED_TOKENS)
    for entry in spec["added_tokens"]:
        entry["special"] = special[entry["content"]]
        entry["normalized"] = False
    for token_id, (content, _) in enumerate(ADDED_TOKENS):
        got = tok.token_to_id(content)
        if got != token_id:
            raise RuntimeError(f"added token {content!r} got id {got}, expected {token_id}")
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))


def _added_token(content: str) -> dict[str, Any]:
    # The spelling of released DeepSeek-V3 tokenizer_config.json files.
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def tokenizer_config(model_max_length: int, chat_template: str | None) -> dict[str, Any]:
    """tokenizer_config.json as DeepSeek-V3 releases it (LlamaTokenizerFast, bos added, eos not)."""
    cfg: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added_token(BOS_TOKEN),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added_token(EOS_TOKEN),
        "legacy": True,
        "model_max_length": model_max_length,
        "pad_token": _added_token(PAD_TOKEN),
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "LlamaTokenizerFast",
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return cfg


def default_chat_template() -> str | None:
    """The built-in DeepSeek-V3 template, or None while baleen ships none."""
    path = templates_dir() / "deepseek_v3.jinja"
    return path.read_text(encoding="utf-8") if path.exists() else None


def write_tokenizer(
    out_dir: str | Path, *, model_max_length: int, tokenizer: Tokenizer | None = None
) -> Tokenizer:
    """Write tokenizer.json and tokenizer_config.json into out_dir (training one unless given); returns it."""
    out = Path(out_dir)
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    cfg = tokenizer_config(model_max_length, default_chat_template())
    (out / "tokenizer_config.json").write_text(
        json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return tok
