"""POST /v1/chat/completions: messages -> chat template -> token ids -> engine, answered whole or as SSE chunks.

The prompt is rendered and tokenized here (the template starts with BOS, so no special tokens are added),
which gives prompt_token_ids and lets the engine's admission check (context length, sampling fields) run
before anything is submitted. Each of the `n` choices is its own engine request. Output text goes through the
reasoning parser (`reasoning_content`), then, when the request has tools, the tool-call parser; streamed and whole
answers give the same result. Structured output (response_format, regex, ebnf, forced or strict tool calls)
becomes the requests' grammar (structured.py).
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
from baleen.api.reasoning import ReasoningParser, make_reasoning_parser, prompt_opens_reasoning
from baleen.api.responses import JSONResponse, read_body, sse, sse_response
from baleen.api.state import ServerState
from baleen.api.structured import chat_grammar
from baleen.api.tool_parser import ToolCall, ToolCallDelta, ToolCallParser, make_tool_parser
from baleen.messages import RequestOutput, SamplingParams

ROUTE = "/v1/chat/completions"


@dataclass(frozen=True)
class _Prepared:
    """A decoded request made ready for the engine."""

    req: p.ChatCompletionRequest
    prompt_ids: list[int]
    params: list[SamplingParams]  # one per choice
    reasoning_parser: str | None
    in_reasoning: bool
    tool_parser: str | None


def _prepare(state: ServerState, req: p.ChatCompletionRequest) -> _Prepared:
    prompt = state.template.render(req.template_messages(), tools=req.template_tools(),
                                   **(req.chat_template_kwargs or {}))
    prompt_ids = tokenize(state.tokenizer, prompt)
    params = p.chat_sampling_params(req)
    tool_parser = state.config.tool_call_parser if req.parses_tool_calls else None
    if tool_parser is None and params.skip_special_tokens != req.skip_special_tokens:
        # Special tokens are kept for the tool-call parser; without one the client gets what it asked for.
        params = msgspec.structs.replace(params, skip_special_tokens=req.skip_special_tokens)
    state.admit(prompt_ids, params, p.chat_fields(req))
    reasoning = state.config.reasoning_parser if req.separate_reasoning else None
    in_reasoning = req.thinking or prompt_opens_reasoning(prompt)
    # The grammar leaves the reasoning free when the parser will separate it, i.e. output starts inside it.
    opens = reasoning is not None and make_reasoning_parser(reasoning, thinking=in_reasoning).in_reasoning
    grammar = chat_grammar(req, tool_parser=tool_parser, reasoning=opens, token_id=state.tokenizer.token_to_id)
    if grammar is not None:
        params = msgspec.structs.replace(params, grammar=grammar)
    return _Prepared(req, prompt_ids, per_choice(params, req.n), reasoning, in_reasoning, tool_parser)


async def create_chat_completion(state: ServerState, request: Request) -> Response:
    """POST /v1/chat/completions: answer one chat completion, whole or (with `stream`) as SSE chunks.

    Body (protocol.ChatCompletionRequest): `messages` (system/developer/user/assistant/tool; content a string or
    text parts), `model`, sampling (`temperature`, `top_p`, `top_k`, `min_p`, penalties, `seed`), stopping
    (`max_tokens`/`max_completion_tokens`, default: the rest of the context; `stop`, `stop_token_ids`,
    `ignore_eos`), `n`, `logprobs`/`top_logprobs`, `tools`/`tool_choice`, `chat_template_kwargs` (V3.1
    `thinking`), `separate_reasoning`, `stream_options.include_usage`, `return_token_ids`,
    `custom_logit_processor` + `custom_params`, structured output (`response_format` json_object/json_schema,
    `regex`, `ebnf`, tool_choice "required" or named, `strict` tools). Answer: `chat.completion` (or `chat.completion.chunk`s, then
    `data: [DONE]`) with `reasoning_content`, `tool_calls`, `matched_stop`, `usage` (with `spec_verify_ct`, the
    verify steps, under speculative decoding). Errors: OpenAI bodies
    with 400 (bad field, context overflow, tool_choice, unknown processor, a schema, regex or grammar that does not
    compile), 404 (model), 413, 500, 503.
    """
    started = time.perf_counter()
    req = p.decode_chat_request(await read_body(request, state.config.max_request_bytes))
    state.check_model(req.model)
    prep = _prepare(state, req)
    response_id = b.new_id("chatcmpl")
    generation = Generation(state, ROUTE, [(prep.prompt_ids, sp) for sp in prep.params], response_id, started)

    def stream(firsts: list[RequestOutput]) -> Response:
        return sse_response(_stream(state, prep, generation, firsts, response_id),
                            ping_s=state.config.sse_ping_interval_s)

    return await generation.respond(request, stream if req.stream else None,
                                    lambda results: JSONResponse(_whole(state, prep, results, response_id)))


def _tool_names(prep: _Prepared) -> list[str]:
    """The request's tool names: the parser drops a call to any other (the model's, not the client's, mistake)."""
    return [t.function.name for t in prep.req.tools or []]


# ---- whole answers ---------------------------------------------------------------------------------------


def _whole(state: ServerState, prep: _Prepared, results: list[Collected], response_id: str) -> dict[str, Any]:
    req = prep.req
    choices = []
    for i, r in enumerate(results):
        reasoning, content = None, r.text
        if prep.reasoning_parser is not None:
            reasoning, parsed = _reasoning(prep).parse(r.text)
            content = parsed or ""
        calls: list[ToolCall] = []
        made_calls = False
        if prep.tool_parser is not None:
            parser = make_tool_parser(prep.tool_parser, tools=_tool_names(prep))
            parsed_content, calls = parser.parse(content)
            content, made_calls = parsed_content or "", parser.made_calls
        last = r.last
        assert last is not None
        logprobs = _logprob_entries(state, r.token_ids, r.logprobs, r.top_logprobs) if req.logprobs or req.top_logprobs \
            else None
        choices.append(b.chat_choice(
            i, content=None if (calls or reasoning) and not content else content, reasoning_content=reasoning,
            tool_calls=[c.to_openai() for c in calls] or None, logprobs=logprobs,
            finish_reason=b.finish_reason(last.finish_reason, has_tool_calls=made_calls),
            matched_stop=last.matched_stop, token_ids=r.token_ids if req.return_token_ids else None))
    return b.chat_completion(id=response_id, model=req.model, choices=choices,
                             usage=_usage([r.last for r in results], len(prep.prompt_ids)),
                             prompt_token_ids=prep.prompt_ids if req.return_token_ids else None)


def _usage(lasts: list[RequestOutput | None], prompt_tokens: int) -> dict[str, Any]:
    """`usage` over all choices: the prompt once, every choice's completion tokens."""
    done = [r for r in lasts if r is not None]
    verify = [r.spec_verify_ct for r in done if r.spec_verify_ct is not None]  # only under speculative decoding
    return b.usage(prompt_tokens, sum(r.completion_tokens for r in done), done[0].cached_tokens if done else 0,
                   sum(verify) if verify else None)


def _reasoning(prep: _Prepared) -> ReasoningParser:
    assert prep.reasoning_parser is not None
    return make_reasoning_parser(prep.reasoning_parser, thinking=prep.in_reasoning)


def _logprob_entries(state: ServerState, token_ids: list[int], logprobs: list[float] | None,
                     top: list[list[tuple[int, float]]] | None) -> list[dict[str, Any]]:
    """`logprobs.content` entries: each token's text, logprob and alternatives."""
    text = state.token_text
    lps = logprobs or [0.0] * len(token_ids)
    tops = top or [[] for _ in token_ids]
    return [b.chat_logprob_entry(text(t), lp, [(text(a), alp) for a, alp in alts])
            for t, lp, alts in zip(token_ids, lps, tops)]


# ---- streamed answers ------------------------------------------------------------------------------------


class _ChoiceStream:
    """One choice's parsers and progress while it streams."""

    def __init__(self, prep: _Prepared) -> None:
        self.reasoning = _reasoning(prep) if prep.reasoning_parser is not None else None
        self.tools: ToolCallParser | None = (make_tool_parser(prep.tool_parser, tools=_tool_names(prep))
                                             if prep.tool_parser else None)
        self.started = False
        self.last: RequestOutput | None = None

    def split(self, text: str, final: bool) -> tuple[str, str, list[dict[str, Any]]]:
        """(reasoning, content, tool-call deltas) that `text` completes; `final` flushes what was held."""
        reasoning, content = "", text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(text)
            if final:
                r, c = self.reasoning.finish()
                reasoning, content = reasoning + r, content + c
        calls: list[dict[str, Any]] = []
        if self.tools is not None:
            pieces = self.tools.feed(content) + (self.tools.finish() if final else [])
            content = "".join(x for x in pieces if isinstance(x, str))
            calls = [x.to_openai() for x in pieces if isinstance(x, ToolCallDelta)]
        return reasoning, content, calls


def _stream(state: ServerState, prep: _Prepared, generation: Generation, firsts: list[RequestOutput],
            response_id: str) -> AsyncIterator[bytes]:
    req = prep.req
    created = int(time.time())
    choices = [_ChoiceStream(prep) for _ in prep.params]
    sent_prompt_ids = not req.return_token_ids

    def frame(i: int, out: RequestOutput) -> bytes | None:
        nonlocal sent_prompt_ids
        cs = choices[i]
        cs.last = out
        reasoning, content, calls = cs.split(out.text, out.finished)
        first = not cs.started
        delta = b.chat_delta(role="assistant" if first else None, content=content if content or first else None,
                             reasoning_content=reasoning or None, tool_calls=calls or None)
        logprobs = _logprob_entries(state, out.token_ids, out.logprobs, out.top_logprobs) \
            if (req.logprobs or req.top_logprobs) and out.token_ids else None
        token_ids = out.token_ids if req.return_token_ids else None
        if not (first or len(delta) or logprobs or token_ids or out.finished):
            return None
        cs.started = True
        made_calls = cs.tools is not None and cs.tools.made_calls  # read once finished (split ran finish())
        reason = b.finish_reason(out.finish_reason, has_tool_calls=made_calls) if out.finished else None
        chunk = b.chat_chunk(id=response_id, model=req.model, created=created, delta=delta, index=i,
                             finish_reason=reason, matched_stop=out.matched_stop, logprobs=logprobs,
                             token_ids=token_ids)
        if not sent_prompt_ids:
            chunk["prompt_token_ids"], sent_prompt_ids = prep.prompt_ids, True
        return sse(chunk)

    def usage() -> bytes | None:
        if not req.include_usage:
            return None
        return sse(b.usage_chunk(id=response_id, model=req.model, created=created,
                                 usage=_usage([c.last for c in choices], len(prep.prompt_ids))))

    return generation.frames(firsts, frame, usage)
