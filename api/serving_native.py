"""SGLang's native API, so SGLang's clients and benchmarks (bench_serving --backend sglang, bench_one_batch_server,
the frontend language's RuntimeEndpoint) run against baleen: POST /generate, GET /get_model_info,
GET /get_server_info (/server_info's body, which gains `internal_states` for those tools), GET|POST /flush_cache
(200 only when nothing is cached: baleen cannot drop cached pages) and GET /health_generate.

/generate takes text (tokenized with BOS first, as /v1/completions does) or token ids, one prompt or a batch; each
prompt's `n` choices are engine requests, numbered prompt-major as /v1/completions numbers them. An answer is
`{"text", "output_ids", "meta_info"}` per choice: one object for a single prompt with n = 1, else a list. Streamed,
every chunk carries the choice's text, ids and logprobs so far (cumulative, SGLang's default), with `index` in a
batch, then `data: [DONE]`; no keep-alive pings (SGLang's clients parse every line as JSON). The sampling fields go
through the same conversion, admission check and grammar as /v1/completions (native_protocol.py maps them).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from baleen.actors.admission import EngineDead, tokenize
from baleen.api import bodies as b
from baleen.api.errors import ApiError
from baleen.api.generation import Collected, Generation, per_choice
from baleen.api.native_protocol import NativePrompt, choice_ids, decode_generate_request, prompts
from baleen.api.protocol import completion_sampling_params
from baleen.api.responses import JSONResponse, read_body, sse, sse_response
from baleen.api.state import ServerState
from baleen.api.structured import completion_grammar
from baleen.messages import RequestOutput, SamplingParams

ROUTE = "/generate"
HEALTH_TIMEOUT_S = 20.0  # SGLang's default health-check timeout
HEALTH_POLL_S = 0.05  # how often /health_generate looks for the engine's other outputs
FLUSH_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class _Choice:
    """One engine request of a /generate body: its prompt's settings, its ids and parameters, its meta_info.id."""

    prompt: NativePrompt
    prompt_ids: list[int]
    params: SamplingParams
    rid: str | None  # None: the engine request's id


@dataclass(frozen=True)
class _Prepared:
    choices: list[_Choice]
    single: bool  # answered with one object rather than a list
    text_in_logprobs: bool


def _params(p: NativePrompt) -> SamplingParams:
    """The prompt's SamplingParams, by the conversion /v1/completions uses; its grammar names the native field."""
    req = p.completion_request()
    params = completion_sampling_params(req, default_max_tokens=None, names=p.field_names())
    if p.no_stop_trim:
        params = msgspec.structs.replace(params, no_stop_trim=True)
    if p.return_logprob and p.logprob_start_len >= 0:  # the prompt's logprobs from that position on
        params = msgspec.structs.replace(params, logprob_start_len=p.logprob_start_len)
    grammar = completion_grammar(req)
    if grammar is not None:
        grammar = msgspec.structs.replace(grammar, what=f"{p.sampling_field}.{grammar.kind}")
        params = msgspec.structs.replace(params, grammar=grammar)
    return params


def _prepare(state: ServerState, body: bytes) -> tuple[_Prepared, bool]:
    req = decode_generate_request(body)
    items, n, single = prompts(req)
    ids = choice_ids(req, len(items), n, single)
    choices: list[_Choice] = []
    for p in items:
        prompt_ids = tokenize(state.tokenizer, p.prompt, add_special_tokens=True)
        params = _params(p)
        state.admit(prompt_ids, params, p.field_names())
        for seeded in per_choice(params, n):
            choices.append(_Choice(p, prompt_ids, seeded, ids[len(choices)]))
    return _Prepared(choices, single, req.return_text_in_logprobs), req.stream


async def generate(state: ServerState, request: Request) -> Response:
    """POST /generate: SGLang's native generation, answered whole or (with `stream`) as SSE chunks.

    Body (native_protocol.GenerateRequest): `text` or `input_ids` (one prompt or a batch), `sampling_params` (one
    object or one per prompt: max_new_tokens (default 128; 0 only prefills), temperature, top_p, top_k, min_p, the
    penalties, stop, stop_token_ids, ignore_eos, skip_special_tokens, no_stop_trim, min_new_tokens, n, json_schema,
    regex, ebnf, sampling_seed, custom_params), `stream`, `rid`, `return_logprob` / `top_logprobs_num` /
    `return_text_in_logprobs` (output tokens; with `logprob_start_len` L >= 0 the prompt's from L on too),
    `custom_logit_processor`. Answer per choice:
    `{"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens", "completion_tokens",
    "cached_tokens", "e2e_latency", ...}}`. Errors are OpenAI error bodies, as on the other routes.
    """
    started = time.perf_counter()
    prep, stream = _prepare(state, await read_body(request, state.config.max_request_bytes))
    generation = Generation(state, ROUTE, [(c.prompt_ids, c.params) for c in prep.choices], b.new_id("generate"),
                            started)
    ids = [c.rid or rid for c, rid in zip(prep.choices, generation.rids)]

    def streamed(firsts: list[RequestOutput]) -> Response:  # never pings: SGLang's clients of /generate
        return sse_response(_stream(state, prep, generation, firsts, ids, started))

    def whole(results: list[Collected]) -> Response:
        answers = [_answer(state, prep, i, r, ids[i], started) for i, r in enumerate(results)]
        return JSONResponse(answers[0] if prep.single else answers)

    return await generation.respond(request, streamed if stream else None, whole)


def _stream(state: ServerState, prep: _Prepared, generation: Generation, firsts: list[RequestOutput],
            ids: list[str], started: float) -> AsyncIterator[bytes]:
    got = [Collected() for _ in prep.choices]

    def frame(i: int, out: RequestOutput) -> bytes | None:
        got[i].add(out)
        if not (out.token_ids or out.finished):
            return None
        answer = _answer(state, prep, i, got[i], ids[i], started)
        if not prep.single:
            answer["index"] = i
        return sse(answer)

    return generation.frames(firsts, frame)


# ---- the answer ----------------------------------------------------------------------------------------------


def _answer(state: ServerState, prep: _Prepared, i: int, got: Collected, rid: str, started: float) -> dict[str, Any]:
    """One choice's `{"text", "output_ids", "meta_info"}` from its outputs so far."""
    c, last = prep.choices[i], got.last
    prefill_only = c.prompt.max_new_tokens == 0  # the engine's one token is not part of the answer
    ids = [] if prefill_only else got.token_ids
    meta: dict[str, Any] = {"id": rid, "finish_reason": _finish_reason(c, last, len(ids)),
                            "prompt_tokens": len(c.prompt_ids), "completion_tokens": len(ids),
                            "cached_tokens": last.cached_tokens if last is not None else 0}
    if c.prompt.return_logprob:
        meta |= _logprobs(state, c, [] if prefill_only else got.logprobs, ids,
                          [] if prefill_only else got.top_logprobs, prep.text_in_logprobs, got)
    if last is not None and last.spec_verify_ct is not None:  # speculative decoding: SGLang's per-request counts
        meta["spec_verify_ct"] = last.spec_verify_ct
        if last.spec_verify_ct:
            meta["spec_accept_length"] = len(ids) / last.spec_verify_ct
    if last is not None and last.finished:
        meta["e2e_latency"] = time.perf_counter() - started
    return {"text": "" if prefill_only else _text(state, c, got), "output_ids": ids, "meta_info": meta}


def _finish_reason(c: _Choice, last: RequestOutput | None, num_ids: int) -> dict[str, Any] | None:
    """SGLang's finish_reason object: length (with the limit), stop (with the matched token id or string), abort."""
    if last is None or last.finish_reason is None:
        return None
    reason, max_new = last.finish_reason, c.prompt.max_new_tokens
    if reason == "length" or (max_new == 0 and reason == "stop"):
        return {"type": "length", "length": num_ids if max_new is None else max_new}
    if reason == "stop":
        return {"type": "stop", "matched": last.matched_stop}
    return {"type": reason, "message": last.error or "the request was aborted before it finished"}


def _text(state: ServerState, c: _Choice, got: Collected) -> str:
    """The text as SGLang gives it: a matched stop string is cut (the engine already did) unless no_stop_trim, which
    keeps the whole of the tokens; a matched stop token's own text is cut (by the engine) unless no_stop_trim."""
    last = got.last
    if last is None or last.finish_reason != "stop":
        return got.text
    if isinstance(last.matched_stop, str) and c.prompt.no_stop_trim:
        return state.tokenizer.decode(got.token_ids, skip_special_tokens=c.params.skip_special_tokens)
    return got.text


def _logprobs(state: ServerState, c: _Choice, logprobs: list[float], ids: list[int],
              top: list[list[tuple[int, float]]], with_text: bool, got: Collected) -> dict[str, Any]:
    """meta_info's logprob fields in SGLang's layout: `[logprob, token_id, text or None]` per token; the prompt's
    (`input_*`) from logprob_start_len on (position 0's logprob and table None), empty for -1."""

    def entry(logprob: float | None, token_id: int) -> list[Any]:
        return [logprob, token_id, state.token_text(token_id) if with_text else None]

    start = c.params.logprob_start_len
    prompt = c.prompt_ids[start:] if start >= 0 and got.prompt_logprobs is not None else []
    out: dict[str, Any] = {"input_token_logprobs": [entry(lp, t) for lp, t in zip(got.prompt_logprobs or [], prompt)],
                           "output_token_logprobs": [entry(lp, t) for lp, t in zip(logprobs, ids)]}
    if c.prompt.top_logprobs_num > 0:
        tables = got.prompt_top_logprobs or []
        out["input_top_logprobs"] = [None if start + j == 0 else [entry(lp, t) for t, lp in row]
                                     for j, row in zip(range(len(prompt)), tables)]
        out["output_top_logprobs"] = [[entry(lp, t) for t, lp in row] for row in top]
    return out


# ---- the other native routes -----------------------------------------------------------------------------------


def model_info(state: ServerState) -> dict[str, Any]:
    """GET /get_model_info: SGLang's fields that baleen has."""
    engine_config = state.engine.info().get("engine_config") or {}
    return {"model_path": state.engine.model_path,
            "tokenizer_path": engine_config.get("tokenizer_path") or state.engine.model_path,
            "is_generation": True, "preferred_sampling_params": None}


def server_info(state: ServerState) -> dict[str, Any]:
    """What GET /server_info and /get_server_info add for SGLang's tools: `tokenizer_path` at the top level and
    `internal_states`, one entry (the scheduler's metrics, every DP rank summed) with SGLang's names for what its
    benchmarks read: `last_gen_throughput` (baleen's tokens/s over the last 10 s), `avg_spec_accept_length` (once
    speculative decoding verified drafts), `effective_max_running_requests_per_dp`, `dp_size` and
    `memory_usage.token_capacity` (the KV pools' tokens)."""
    info = state.engine.info()
    worker = info.get("worker_config") or {}
    metrics = dict(state.engine.metrics)
    entry: dict[str, Any] = {**metrics, "last_gen_throughput": metrics.get("gen_throughput", 0.0)}
    if metrics.get("num_verify_rows"):
        entry["avg_spec_accept_length"] = metrics.get("spec_accept_length")
    if worker:
        entry["effective_max_running_requests_per_dp"] = worker["max_running_requests"]
        entry["dp_size"] = worker["parallel"]["dp_size"]
    if worker and "num_free_pages" in metrics:
        pages = metrics["num_free_pages"] + metrics.get("num_used_pages", 0.0)
        entry["memory_usage"] = {"token_capacity": int(pages) * worker["page_size"]}
    return {"tokenizer_path": model_info(state)["tokenizer_path"], "internal_states": [entry]}


async def flush_cache(state: ServerState) -> Response:
    """GET|POST /flush_cache: evict every cached prefix no request holds (`Engine.flush_cache`); 200 with what was
    freed. Prefixes that running or queued requests hold stay until those requests end (SGLang instead refuses
    the whole flush while any request is in flight)."""
    state.check_can_serve()
    try:
        flushed = await state.engine.flush_cache(FLUSH_TIMEOUT_S)
    except (EngineDead, TimeoutError) as e:
        raise ApiError(503, f"the cache was not flushed: {e}") from None
    held = f"; {flushed.num_held_pages} pages stay cached for requests in flight" if flushed.num_held_pages else ""
    return Response(f"Cache flushed: {flushed.num_pages} pages freed{held}.\n", media_type="text/plain")


async def health_generate(state: ServerState) -> Response:
    """GET /health_generate: 200 once the engine generated one token for a one-token prompt, or (as SGLang) sent any
    output after the check began: a busy engine queues the check's own request behind the others, and its other
    requests' tokens prove it alive as well. 503 when neither happened within 20 s."""
    state.check_can_serve()
    started = time.monotonic()
    outputs = state.engine.generate([0], SamplingParams(max_new_tokens=1, temperature=0.0),
                                    rid=f"health-{uuid.uuid4().hex}")
    first: asyncio.Future[RequestOutput] = asyncio.ensure_future(anext(outputs))
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_S):
            while not first.done():
                if state.engine.last_output_at > started:
                    return Response(status_code=200)
                await asyncio.wait([first], timeout=HEALTH_POLL_S)
        out = first.result()
    except TimeoutError:
        raise ApiError(503, f"the engine sent no output within {HEALTH_TIMEOUT_S:.0f} s") from None
    except (EngineDead, ValueError) as e:
        raise ApiError(503, f"the engine cannot serve requests: {e}") from None
    finally:
        if not first.done():
            first.cancel()  # the stream's own cleanup aborts the check's request
            with contextlib.suppress(BaseException):
                await first
        close = getattr(outputs, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()
    if out.finish_reason == "error" or not out.token_ids:
        raise ApiError(503, f"the health-check generation failed: {out.error or out.finish_reason}")
    return Response(status_code=200)
