"""Admission: a prompt becomes token ids, and one pure check decides whether the request can ever be served.

`check_request` checks a request's own content against the engine's limits: the sampling parameters, the prompt
(not empty, ids inside the vocabulary), the context length and the KV cache. Every way in calls it with the
limits it knows: `Engine.generate` (context, vocabulary), the HTTP routes (the same, with the field names the
client sent, so a 400 names them), and the scheduler (context, KV pool). What depends on the scheduler's state
(a request id in use, a full queue) is checked by the scheduler alone.

No torch (numpy only): the HTTP layer imports it.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from baleen.messages import SamplingParams

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class EngineDead(RuntimeError):
    """The engine cannot serve: a worker died or failed."""


class AdmissionError(ValueError):
    """A request refused before it runs.

    kind: "invalid" (HTTP 400) or "overloaded" (HTTP 503). param: the field at fault, spelled as the caller
    spells it (None: the request as a whole). code: a machine-readable reason ("context_length_exceeded").
    """

    def __init__(self, message: str, *, kind: str = "invalid", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.param, self.code = kind, param, code


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What a request is checked against; None: a limit this checker does not know."""

    max_context_len: int  # prompt + new tokens
    vocab_size: int | None = None  # prompt ids must be below it (the frontend knows it, the scheduler does not)
    max_kv_tokens: int | None = None  # the KV pool in tokens (the scheduler knows it, the frontend does not)


def tokenize(tokenizer: Tokenizer, prompt: str | Sequence[int], *, add_special_tokens: bool = False) -> list[int]:
    """A prompt's token ids: text is encoded, ids are taken as they are.

    add_special_tokens: False for rendered chat prompts and `Engine.generate` text (a chat template writes BOS
    itself), True for text completions (BOS first, as Hugging Face does).
    """
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids
    return list(prompt)


def check_sampling(sampling: SamplingParams, names: Mapping[str, str] | None = None) -> None:
    """The sampling half of `check_request`, for callers that have no prompt yet (decoding an HTTP body)."""
    try:
        sampling.check()
    except ValueError as e:
        field, _, rest = str(e).partition(" ")  # SamplingParams.check names the field first
        raise AdmissionError(f"{_name(names, field)} {rest}", param=_name(names, field)) from None
    if sampling.max_new_tokens == 0:  # the scheduler needs room for at least one token
        field = _name(names, "max_new_tokens")
        raise AdmissionError(f"{field} must be at least 1", param=field)
    if sampling.max_new_tokens is not None and sampling.min_new_tokens > sampling.max_new_tokens:
        field = _name(names, "min_new_tokens")
        raise AdmissionError(f"{field} must be in [0, {_name(names, 'max_new_tokens')} ({sampling.max_new_tokens})], "
                             f"got {sampling.min_new_tokens}", param=field)


def _outside(prompt_ids: Sequence[int], vocab: int) -> list[int]:
    """The prompt's ids outside [0, vocab), in order (empty: none). Over an int32 array in C: a 16k-token prompt's
    Python min() and max() cost ~0.5 ms of its time to the first token (2-core VM), this ~0.01 ms after the one
    conversion to an array the request needs anyway."""
    try:
        ids = prompt_ids if isinstance(prompt_ids, array) and prompt_ids.typecode == "i" else array("i", prompt_ids)
    except OverflowError:  # past int32: outside any vocabulary
        return [t for t in prompt_ids if not 0 <= t < vocab]
    view = np.frombuffer(ids, dtype=np.int32)
    if not view.size or (int(view.min()) >= 0 and int(view.max()) < vocab):
        return []
    return view[(view < 0) | (view >= vocab)].tolist()


def check_request(prompt_ids: Sequence[int], sampling: SamplingParams, limits: Limits, *,
                  names: Mapping[str, str] | None = None) -> int:
    """AdmissionError ("invalid") naming what is wrong, or the most tokens the request may hold, prompt included.

    names: the caller's spelling of the fields ("max_new_tokens" -> "max_tokens" over HTTP, "prompt" ->
    "messages"), used in the messages and in `param`.
    """
    check_sampling(sampling, names)
    prompt = _name(names, "prompt")
    num_prompt = len(prompt_ids)
    if num_prompt == 0:
        raise AdmissionError("the prompt is empty: at least one input token is needed", param=prompt)
    vocab = limits.vocab_size
    bad = _outside(prompt_ids, vocab) if vocab is not None else []
    if bad:
        raise AdmissionError(f"prompt token ids {bad[:5]} are outside the model's vocabulary [0, {vocab})",
                             param=prompt)
    if vocab is not None and sampling.logit_bias and max(sampling.logit_bias) >= vocab:
        bad = sorted(t for t in sampling.logit_bias if t >= vocab)
        field = _name(names, "logit_bias")
        raise AdmissionError(f"{field} names token ids {bad[:5]} outside the model's vocabulary [0, {vocab})",
                             param=field)
    context, kv = limits.max_context_len, limits.max_kv_tokens
    max_new = sampling.max_new_tokens
    if max_new is None:  # up to what the context (and the KV cache) leaves
        most = context if kv is None else min(context, kv)
        if num_prompt >= most:
            pool = f" (KV cache: {kv} tokens)" if kv is not None and kv < context else ""
            raise AdmissionError(f"the prompt has {num_prompt} tokens, which leaves no room to generate within this "
                                 f"model's maximum context length of {context} tokens{pool}; shorten the prompt",
                                 param=prompt, code="context_length_exceeded")
        return most
    field = _name(names, "max_new_tokens")
    total = num_prompt + max_new
    if total > context:
        raise AdmissionError(f"the prompt has {num_prompt} tokens and {field} is {max_new}: {total} exceeds this "
                             f"model's maximum context length of {context} tokens; shorten the prompt or lower "
                             f"{field}", param=field, code="context_length_exceeded")
    if kv is not None and total > kv:
        raise AdmissionError(f"the prompt ({num_prompt} tokens) plus {field} ({max_new}) exceeds the KV cache "
                             f"capacity of {kv} tokens; shorten the prompt or lower {field}", param=field)
    return total


def _name(names: Mapping[str, str] | None, field: str) -> str:
    return names.get(field, field) if names else field
