"""OpenAI response bodies as plain dicts, ready for orjson: chat completions and their chunks, text completions
and theirs, logprobs, usage, the model list. Nothing here looks at an engine or a request."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

_MIN_LOGPROB = -9999.0  # what OpenAI reports for impossible tokens; JSON has no -inf


def new_id(prefix: str = "chatcmpl") -> str:
    """A response id such as "chatcmpl-3f2a...": random, 32 hex digits."""
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(engine_reason: str | None, *, has_tool_calls: bool = False) -> str | None:
    """The OpenAI finish_reason for the engine's: "tool_calls" when a turn that stopped made calls (complete ones:
    a stop token or string that cuts a call off leaves "stop")."""
    return "tool_calls" if engine_reason == "stop" and has_tool_calls else engine_reason


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
          spec_verify_ct: int | None = None) -> dict[str, Any]:
    """The `usage` object, with the prefix-cache hits as prompt_tokens_details.cached_tokens; under speculative
    decoding also `spec_verify_ct` (an extension field: the verify steps of every choice, SGLang's name), so
    completion_tokens / spec_verify_ct is about the request's accept length."""
    body = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    return _extra(body, spec_verify_ct=spec_verify_ct)


def _extra(body: dict[str, Any], **optional: Any) -> dict[str, Any]:
    """Add the optional fields that are set (token ids only when asked for, usage only where it belongs)."""
    body.update((k, v) for k, v in optional.items() if v is not None)
    return body


def _logprob(value: float | None) -> float | None:
    return None if value is None else max(float(value), _MIN_LOGPROB)


def chat_logprob_entry(token: str, logprob: float, top: Sequence[tuple[str, float]] = ()) -> dict[str, Any]:
    """One token of a chat choice's `logprobs.content`: the token, its logprob, bytes and alternatives."""
    return {"token": token, "logprob": _logprob(logprob), "bytes": list(token.encode("utf-8")),
            "top_logprobs": [{"token": t, "logprob": _logprob(lp), "bytes": list(t.encode("utf-8"))} for t, lp in top]}


def chat_choice(index: int, *, content: str | None, finish_reason: str | None,
                reasoning_content: str | None = None, tool_calls: list[dict[str, Any]] | None = None,
                logprobs: list[dict[str, Any]] | None = None, matched_stop: int | str | None = None,
                token_ids: list[int] | None = None) -> dict[str, Any]:
    """One choice of a non-streamed chat completion; `logprobs` is the list of chat_logprob_entry."""
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning_content,
               "tool_calls": tool_calls or None}
    return _extra({"index": index, "message": message, "logprobs": None if logprobs is None else {"content": logprobs},
                   "finish_reason": finish_reason, "matched_stop": matched_stop}, token_ids=token_ids)


def chat_completion(*, id: str, model: str, choices: list[dict[str, Any]], usage: dict[str, Any],
                    created: int | None = None, prompt_token_ids: list[int] | None = None) -> dict[str, Any]:
    """The body of a non-streamed chat completion."""
    body: dict[str, Any] = {"id": id, "object": "chat.completion",
                            "created": int(time.time()) if created is None else created, "model": model,
                            "choices": choices, "usage": usage}
    return _extra(body, prompt_token_ids=prompt_token_ids)


def chat_delta(*, role: str | None = None, content: str | None = None, reasoning_content: str | None = None,
               tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A streamed delta holding only what it carries (role goes on a choice's first chunk)."""
    delta = {"role": role, "content": content, "reasoning_content": reasoning_content, "tool_calls": tool_calls}
    return {k: v for k, v in delta.items() if v is not None and (k != "tool_calls" or v)}


def chat_chunk(*, id: str, model: str, created: int, delta: dict[str, Any], index: int = 0,
               finish_reason: str | None = None, matched_stop: int | str | None = None,
               logprobs: list[dict[str, Any]] | None = None, token_ids: list[int] | None = None,
               usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk` carrying one choice's delta (finish_reason set on its last chunk)."""
    choice: dict[str, Any] = {"index": index, "delta": delta,
                              "logprobs": None if logprobs is None else {"content": logprobs},
                              "finish_reason": finish_reason}
    if finish_reason is not None:
        choice["matched_stop"] = matched_stop
    choice = _extra(choice, token_ids=token_ids)
    chunk: dict[str, Any] = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [choice]}
    return _extra(chunk, usage=usage)


def usage_chunk(*, id: str, model: str, created: int, usage: dict[str, Any],
                object: str = "chat.completion.chunk") -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, only usage."""
    return {"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage}


def completion_logprobs(tokens: Sequence[str], logprobs: Sequence[float | None],
                        top: Sequence[Sequence[tuple[str, float]] | None] | None = None, *,
                        text_offset: int = 0) -> dict[str, Any]:
    """A text completion's `logprobs`: tokens, token_logprobs, top_logprobs and character offsets (None where a token
    has none: an echoed prompt's first)."""
    offsets = list(accumulate((len(t) for t in tokens[:-1]), initial=text_offset)) if tokens else []
    return {"tokens": list(tokens), "token_logprobs": [_logprob(lp) for lp in logprobs],
            "top_logprobs": None if top is None else [None if row is None else {t: _logprob(lp) for t, lp in row}
                                                      for row in top],
            "text_offset": offsets}


def completion_choice(index: int, *, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None,
                      matched_stop: int | str | None = None, token_ids: list[int] | None = None) -> dict[str, Any]:
    """One choice of a text completion (streamed or not)."""
    return _extra({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                   "matched_stop": matched_stop}, token_ids=token_ids)


def text_completion(*, id: str, model: str, choices: list[dict[str, Any]], usage: dict[str, Any] | None,
                    created: int | None = None,
                    prompt_token_ids: list[int] | list[list[int]] | None = None) -> dict[str, Any]:
    """A text completion body (object "text_completion"); see completion_chunk for the streamed form."""
    body: dict[str, Any] = {"id": id, "object": "text_completion",
                            "created": int(time.time()) if created is None else created, "model": model,
                            "choices": choices}
    return _extra(body, usage=usage, prompt_token_ids=prompt_token_ids)


def completion_chunk(*, id: str, model: str, created: int, choice: dict[str, Any],
                     usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed text completion chunk: the same object as the full body, with one completion_choice."""
    return text_completion(id=id, model=model, choices=[choice], usage=usage, created=created)


def model_list(names: Sequence[str], *, created: int | None = None, owned_by: str = "baleen") -> dict[str, Any]:
    """The body of GET /v1/models."""
    t = int(time.time()) if created is None else created
    return {"object": "list", "data": [{"id": n, "object": "model", "created": t, "owned_by": owned_by} for n in names]}
