"""A test logit processor that makes the model say a script: `custom_params={"text": ...}` is forced token by token.

Registered on test servers with `--custom-logit-processor scripted=scripted_processor:ScriptedProcessor`
(PYTHONPATH holding tests/api). It encodes the text with the tokenizer it is given (special tokens such as
the tool-call markers become their single ids), forces each id in turn, then the end-of-sentence token, so
a random-weight model produces exactly the output a test needs to parse.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer

EOS = "<｜end▁of▁sentence｜>"


class ScriptedProcessor:
    """Forces `custom_params["text"]`, then EOS (then EOS again, if the request ignores it)."""

    def __init__(self, custom_params: dict[str, Any], tokenizer: Tokenizer) -> None:
        self.check_params(custom_params, tokenizer)
        self.ids = tokenizer.encode(custom_params["text"], add_special_tokens=False).ids
        self.eos = int(tokenizer.token_to_id(EOS))

    @staticmethod
    def check_params(custom_params: dict[str, Any], tokenizer: Tokenizer) -> None:
        """What the server checks before it submits a request (it never builds the processor)."""
        text = custom_params.get("text")
        if not isinstance(text, str) or not text:
            raise ValueError(f"scripted: custom_params 'text' must be a non-empty string, got {text!r}")
        if tokenizer.token_to_id(EOS) is None:
            raise ValueError("scripted: the tokenizer has no end-of-sentence token")

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        n = len(output_token_ids)
        target = self.ids[n] if n < len(self.ids) else self.eos
        logits.fill_(float("-inf"))
        logits[target] = 0.0
        return logits
