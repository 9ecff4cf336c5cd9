"""POST /v1/completions: a prompt (text, texts, token ids or lists of them) -> engine, answered whole or streamed.

Text prompts are tokenized with the tokenizer's special tokens (BOS first, as Hugging Face does); token-id prompts
go to the engine as they are. Each prompt then passes the engine's admission check (its ids, the context length,
the sampling fields) before anything is submitted. Every prompt gets `n` choices, numbered
prompt-major (choice `j * n + k` is prompt j's k-th), each its own engine request.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from baleen.actors.admission import tokenize
from baleen.api import bodies as b
from baleen.api import protocol as p
from baleen.api.generation import Collected, Generation, per_choice
from baleen.api.responses import JSONResponse, read_body, sse, sse_response
from baleen.api.state import ServerState
from baleen.api.structured import completion_grammar
from baleen.messages import RequestOutput, SamplingParams

ROUTE = "/v1/completions"


@dataclass(frozen=True)
class _Prepared:
    """A decoded request made ready for the engine: one entry per choice."""

    req: p.CompletionRequest
    prompt_ids: list[list[int]]  # per prompt
    choices: list[tuple[list[int], SamplingParams]]
    echo: list[str]  # per choice: the prompt text to put before the completion ("" without echo)


def _prepare(state: ServerState, req: p.CompletionRequest) -> _Prepared:
    prompts = req.prompts()
    encoded = [tokenize(state.tokenizer, x, add_special_tokens=True) for x in prompts]
    params = p.completion_sampling_params(req)
    grammar = completion_grammar(req)
    if grammar is not None:
        params = msgspec.structs.replace(params, grammar=grammar)
    for j, ids in enumerate(encoded):
        state.admit(ids, params, {**p.COMPLETION_FIELDS, "prompt": "prompt" if len(encoded) == 1 else f"prompt[{j}]"})
    choices, echo = [], []
    for text, ids in zip(prompts, encoded):
        shown = (text if isinstance(text, str) else state.tokenizer.decode(ids)) if req.echo else ""
        choices += [(ids, seeded) for seeded in per_choice(params, req.n)]
        echo += [shown] * req.n
    return _Prepared(req, encoded, choices, echo)


async def create_completion(state: ServerState, request: Request) -> Response:
    """POST /v1/completions: answer one text completion, whole or (with `stream`) as SSE chunks.

    Body (protocol.CompletionRequest): `prompt` (a string, strings, token ids, or lists of ids: `n` choices
    each), `model`, `max_tokens` (default 16), `echo`, `logprobs` (alternatives per token), and the sampling,
    stopping, structured-output and extension fields of chat. Answer: `text_completion` with `usage` (as for chat; and `prompt_token_ids` /
    `token_ids` with `return_token_ids`); errors as for chat.
    """
    started = time.perf_counter()
    req = p.decode_completion_request(await read_body(request, state.config.max_request_bytes))
    state.check_model(req.model)
    prep = _prepare(state, req)
    response_id = b.new_id("cmpl")
    generation = Generation(state, ROUTE, prep.choices, response_id, started)

    def stream(firsts: list[RequestOutput]) -> Response:
        return sse_response(_stream(state, prep, generation, firsts, response_id),
                            ping_s=state.config.sse_ping_interval_s)

    return await generation.respond(request, stream if req.stream else None,
                                    lambda results: JSONResponse(_whole(state, prep, results, response_id)))


def _logprobs(state: ServerState, prep: _Prepared, token_ids: list[int], logprobs: list[float] | None,
              top: list[list[tuple[int, float]]] | None, offset: int,
              echoed: tuple[list[int], list[float | None], list[list[tuple[int, float]]] | None] | None = None,
              ) -> dict[str, Any] | None:  # fmt: skip
    """A choice's `logprobs` for these output tokens; `echoed` (prompt ids, their logprobs from position 0 (None
    there), their top tables) puts the echoed prompt's tokens first, at text offsets from 0."""
    if prep.req.logprobs is None:
        return None
    text = state.token_text
    rows = [[(text(a), lp) for a, lp in alts] for alts in top] if top else None
    out = b.completion_logprobs([text(t) for t in token_ids], logprobs or [0.0] * len(token_ids), rows,
                                text_offset=offset)
    if echoed is None:
        return out
    ids, lps, tops = echoed
    prompt_rows = None if not tops or rows is None else [None, *([(text(a), lp) for a, lp in alts] for alts in tops[1:])]
    head = b.completion_logprobs([text(t) for t in ids], lps, prompt_rows)
    return {k: head[k] + out[k] if isinstance(out[k], list) and isinstance(head[k], list) else out[k] for k in out}


def _echoed(prep: _Prepared, i: int, got: Collected | RequestOutput
            ) -> tuple[list[int], list[float | None], list[list[tuple[int, float]]] | None] | None:  # fmt: skip
    """Choice i's prompt ids with their logprobs and tables, when it echoes its prompt with logprobs."""
    if not prep.req.echo or got.prompt_logprobs is None:
        return None
    return prep.choices[i][0], got.prompt_logprobs, got.prompt_top_logprobs


def _usage(prep: _Prepared, lasts: list[RequestOutput | None]) -> dict[str, Any]:
    done = [x for x in lasts if x is not None]
    verify = [x.spec_verify_ct for x in done if x.spec_verify_ct is not None]  # only under speculative decoding
    return b.usage(sum(len(ids) for ids in prep.prompt_ids), sum(x.completion_tokens for x in done),
                   done[0].cached_tokens if done else 0, sum(verify) if verify else None)


def _prompt_ids(prep: _Prepared) -> list[int] | list[list[int]] | None:
    if not prep.req.return_token_ids:
        return None
    return prep.prompt_ids[0] if len(prep.prompt_ids) == 1 else prep.prompt_ids


def _whole(state: ServerState, prep: _Prepared, results: list[Collected], response_id: str) -> dict[str, Any]:
    req = prep.req
    choices = []
    for i, r in enumerate(results):
        last = r.last
        assert last is not None
        choices.append(b.completion_choice(
            i, text=prep.echo[i] + r.text, finish_reason=last.finish_reason, matched_stop=last.matched_stop,
            logprobs=_logprobs(state, prep, r.token_ids, r.logprobs, r.top_logprobs, len(prep.echo[i]),
                               _echoed(prep, i, r)),
            token_ids=r.token_ids if req.return_token_ids else None))
    return b.text_completion(id=response_id, model=req.model, choices=choices,
                             usage=_usage(prep, [r.last for r in results]), prompt_token_ids=_prompt_ids(prep))


def _stream(state: ServerState, prep: _Prepared, generation: Generation, firsts: list[RequestOutput],
            response_id: str) -> AsyncIterator[bytes]:
    req = prep.req
    created = int(time.time())
    offsets = [0] * len(prep.choices)  # characters sent so far per choice (logprobs' text_offset)
    lasts: list[RequestOutput | None] = [None] * len(prep.choices)
    started = [False] * len(prep.choices)
    sent_prompt_ids = not req.return_token_ids

    def frame(i: int, out: RequestOutput) -> bytes | None:
        nonlocal sent_prompt_ids
        lasts[i] = out
        text = out.text if started[i] else prep.echo[i] + out.text
        if not (text or out.token_ids or out.finished):
            return None
        logprobs = _logprobs(state, prep, out.token_ids, out.logprobs, out.top_logprobs,
                             offsets[i] + (len(text) - len(out.text)), None if started[i] else _echoed(prep, i, out))
        started[i] = True
        offsets[i] += len(text)
        choice = b.completion_choice(i, text=text, finish_reason=out.finish_reason, matched_stop=out.matched_stop,
                                     logprobs=logprobs, token_ids=out.token_ids if req.return_token_ids else None)
        chunk = b.completion_chunk(id=response_id, model=req.model, created=created, choice=choice)
        if not sent_prompt_ids:
            chunk["prompt_token_ids"], sent_prompt_ids = _prompt_ids(prep), True
        return sse(chunk)

    def usage() -> bytes | None:
        if not req.include_usage:
            return None
        return sse(b.usage_chunk(id=response_id, model=req.model, created=created, usage=_usage(prep, lasts),
                                 object="text_completion"))

    return generation.frames(firsts, frame, usage)
