"""Structured output: a request's `response_format`, `regex`, `ebnf`, `tool_choice` and `strict` tools become the
one grammar (GrammarSpec) its output must follow; the workers compile and enforce it (model/grammar.py).

- `response_format` json_object / json_schema, SGLang's `regex` and `ebnf`: the content (at most one of them).
- tool_choice "required" or a named function: only DeepSeek tool calls, in the format of --tool-call-parser, the
  markers as their special tokens, each call's arguments valid for its function's `parameters`.
- tool_choice "auto" (or unset) stays free text, except that a call to a `strict` tool, once it starts, follows
  the format and the schema (the other tools' arguments are then any JSON object); with a content format too,
  the answer is either that content or tool calls.
- With a reasoning parser on and the prompt opening `<think>`, the reasoning is free up to `</think>`; the
  grammar starts after it.

A plain content format is sent as its own kind; anything more is an xgrammar structural tag (as JSON) built
here, with the tool-call markers referenced by token id (kind "tool_calls" when they may appear).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from baleen.api.errors import ApiError
from baleen.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FunctionDef,
    NamedToolChoice,
    _RequestParams,
)
from baleen.api.reasoning import THINK_END
from baleen.api.tool_parser import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP
from baleen.messages import JSON_MAX_WHITESPACE, GrammarSpec
from baleen.model.tokenizer_build import TOOL_CALL_TOKENS

Format = dict[str, Any]  # one xgrammar structural-tag format, as JSON
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def completion_grammar(req: CompletionRequest) -> GrammarSpec | None:
    """The grammar of a text completion's output, or None."""
    content = _content(req)
    return None if content is None else content[0]


def chat_grammar(req: ChatCompletionRequest, *, tool_parser: str | None, reasoning: bool,
                 token_id: Callable[[str], int | None]) -> GrammarSpec | None:
    """The grammar of a chat answer, or None when it is free.

    `tool_parser` is the server's --tool-call-parser when this request's tools are parsed; `reasoning` says the
    answer starts inside a reasoning block the parser separates; `token_id` maps a special token to its id.
    """
    content = _content(req)
    forced = req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)
    if forced and content is not None:
        raise ApiError(400, f"tool_choice {_choice_name(req)} forces tool calls, so the answer cannot also follow "
                       f"{content[0].what}; drop one of them", param="tool_choice")
    if forced and tool_parser is None:
        raise ApiError(400, f"tool_choice {_choice_name(req)} needs a server started with --tool-call-parser "
                       "(deepseekv3 or deepseekv31) to write and parse the calls", param="tool_choice")
    tools = [t.function for t in req.tools or []] if tool_parser is not None else []
    if isinstance(req.tool_choice, NamedToolChoice):
        tools = [f for f in tools if f.name == req.tool_choice.function.name]
    strict = any(f.strict for f in tools)
    calls: Format | None = None
    if forced or (tools and (strict or content is not None)):
        assert tool_parser is not None
        calls = _calls_block(tools, tool_parser, token_id, all_strict=forced,
                             parallel=req.parallel_tool_calls and not isinstance(req.tool_choice, NamedToolChoice))
    if calls is None and not reasoning:
        return None if content is None else content[0]
    if calls is None and content is None:
        return None  # free reasoning, free answer
    body: Format
    if forced:
        assert calls is not None
        body, what = calls, "a tool's parameters schema"
    elif calls is not None and content is not None:
        body, what = {"type": "or", "elements": [content[1], calls]}, f"{content[0].what} or a tool's parameters schema"
    elif calls is not None:  # strict tools under "auto": free text, constrained once a call starts
        ids = _marker_ids(token_id)
        body = {"type": "token_triggered_tags", "trigger_tokens": [ids[CALLS_BEGIN]],
                "tags": [calls], "stop_after_first": True,
                "exclude_tokens": [ids[m] for m in TOOL_CALL_TOKENS if m != CALLS_BEGIN]}
        what = "a strict tool's parameters schema"
    else:
        assert content is not None
        body, what = content[1], content[0].what
    if reasoning:
        body = {"type": "sequence", "elements": [_free_reasoning(), body]}
    kind = "tool_calls" if calls is not None else "structural_tag"
    return GrammarSpec(kind, json.dumps({"type": "structural_tag", "format": body}, ensure_ascii=False), what)


def _choice_name(req: ChatCompletionRequest) -> str:
    choice = req.tool_choice
    return f"naming {choice.function.name!r}" if isinstance(choice, NamedToolChoice) else f'"{choice}"'


def _content(req: _RequestParams) -> tuple[GrammarSpec, Format] | None:
    """The content constraint (as its own grammar and as a structural-tag format), or None; ApiError(400)."""
    found: list[tuple[GrammarSpec, Format]] = []
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_schema" and rf.json_schema is None:
            raise ApiError(400, 'response_format of type "json_schema" needs a json_schema object holding the schema',
                           param="response_format.json_schema")
        schema = rf.json_schema.schema if rf.json_schema is not None else None
        if schema is None:
            schema, what = ANY_OBJECT, "response_format json_object"
        else:
            what = "response_format.json_schema.schema"
        text = json.dumps(schema, ensure_ascii=False)
        found.append((GrammarSpec("json_schema", text, what),
                      {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": JSON_MAX_WHITESPACE}))
    if req.regex is not None:
        found.append((GrammarSpec("regex", req.regex, "regex"), {"type": "regex", "pattern": req.regex}))
    if req.ebnf is not None:
        found.append((GrammarSpec("ebnf", req.ebnf, "ebnf"), {"type": "grammar", "grammar": req.ebnf}))
    if len(found) > 1:
        names = [spec.what.split(".")[0].split(" ")[0] for spec, _ in found]
        raise ApiError(400, f"a request can follow one output format, but it sets {' and '.join(names)}",
                       param=names[1])
    return found[0] if found else None


def _free_reasoning() -> Format:
    """Any reasoning up to `</think>`, then at most two newlines or spaces before the answer."""
    return {"type": "sequence", "elements": [
        {"type": "tag", "begin": "", "content": {"type": "any_text", "excludes": list(TOOL_CALL_TOKENS)},
         "end": THINK_END},
        {"type": "regex", "pattern": "[ \\n]{0,2}"},
    ]}  # fmt: skip


def _marker_ids(token_id: Callable[[str], int | None]) -> dict[str, int]:
    ids = {m: token_id(m) for m in TOOL_CALL_TOKENS}
    missing = [m for m, i in ids.items() if i is None]
    if missing:
        raise ApiError(400, f"this model's tokenizer has no token for {missing}: it cannot write DeepSeek tool calls",
                       param="tools")
    return {m: i for m, i in ids.items() if i is not None}


def _calls_block(tools: list[FunctionDef], parser: str, token_id: Callable[[str], int | None], *,
                 all_strict: bool, parallel: bool) -> Format:
    """The tag `<｜tool▁calls▁begin｜>` call (sep call)* `<｜tool▁calls▁end｜>` in the format of `parser`.

    A call's arguments follow its function's parameters when `all_strict` or the function is strict, else they
    are any JSON object. Their strings may not hold a marker token (the tool-call parser would cut them there),
    except in a schema with minLength/maxLength: xgrammar drops string lengths it is asked to combine with that
    exclusion, and the schema wins.
    """
    ids = _marker_ids(token_id)

    def token(marker: str) -> Format:
        return {"type": "token", "token": ids[marker]}

    def args(f: FunctionDef) -> Format:
        schema = (f.parameters or ANY_OBJECT) if all_strict or f.strict else ANY_OBJECT
        out: Format = {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": JSON_MAX_WHITESPACE}
        if not _has_string_lengths(schema):
            out["excludes"] = list(TOOL_CALL_TOKENS)
        return out

    if parser == "deepseekv31":  # <call_begin>NAME<sep>ARGS<call_end>, calls back to back
        named: list[Format] = [
            {"type": "sequence", "elements": [{"type": "const_string", "value": f.name}, token(SEP), args(f)]}
            for f in tools
        ]
        call: Format = {"type": "sequence", "elements": [token(CALL_BEGIN), _one_of(named), token(CALL_END)]}
        separator = ""
    else:  # deepseekv3: <call_begin>function<sep>NAME\n```json\nARGS\n```<call_end>, one call a line
        named = [
            {"type": "sequence", "elements": [{"type": "const_string", "value": f"{f.name}\n```json\n"}, args(f)]}
            for f in tools
        ]
        call = {"type": "sequence", "elements": [
            token(CALL_BEGIN), {"type": "const_string", "value": "function"}, token(SEP), _one_of(named),
            {"type": "const_string", "value": "\n```"}, token(CALL_END)]}  # fmt: skip
        separator = "\n"
    calls: list[Format] = [call]
    if parallel:
        more: Format = {"type": "sequence", "elements": [{"type": "const_string", "value": separator}, call]} if separator \
            else call
        calls.append({"type": "star", "content": more})
    content = calls[0] if len(calls) == 1 else {"type": "sequence", "elements": calls}
    return {"type": "tag", "begin": token(CALLS_BEGIN), "content": content, "end": token(CALLS_END)}


def _has_string_lengths(schema: Any) -> bool:
    if isinstance(schema, dict):
        return "minLength" in schema or "maxLength" in schema or any(map(_has_string_lengths, schema.values()))
    return isinstance(schema, list) and any(map(_has_string_lengths, schema))


def _one_of(formats: list[Format]) -> Format:
    return formats[0] if len(formats) == 1 else {"type": "or", "elements": formats}
