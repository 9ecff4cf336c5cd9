"""Structured-output requests -> grammars (api/structured.py): which fields make which grammar, the 400s, and
random walks through the tool-call grammars that the tool-call parsers take apart into valid calls."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import jsonschema
import pytest
from tokenizers import Tokenizer

from baleen.api.errors import ApiError
from baleen.api.protocol import decode_chat_request, decode_completion_request
from baleen.api.reasoning import make_reasoning_parser
from baleen.api.structured import chat_grammar, completion_grammar
from baleen.api.tool_parser import CALLS_BEGIN, make_tool_parser
from baleen.kernels.token_bitmask import unpack_bitmask
from baleen.messages import GrammarSpec
from baleen.model.grammar import GrammarCache, GrammarSlots
from baleen.model.make_model import tiny_model_path

VOCAB, EOS = 1024, 1
CITY = {"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"}
WEATHER = {"type": "function", "function": {
    "name": "query_weather", "strict": True,
    "parameters": {"type": "object", "properties": {"city": CITY, "days": {"type": "integer", "minimum": 1,
                                                                          "maximum": 7}},
                   "required": ["city"], "additionalProperties": False}}}  # fmt: skip
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"enum": ["utc", "cet", "jst"]}},
                                       "required": ["tz"]}}}  # fmt: skip
USER = [{"role": "user", "content": "How's the weather in Qingdao?"}]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model_path() / "tokenizer.json"))


@pytest.fixture(scope="module")
def slots(tokenizer: Tokenizer) -> GrammarSlots:
    return GrammarSlots(GrammarCache(tokenizer, VOCAB, [EOS]))


def grammar(tokenizer: Tokenizer, *, parser: str | None = "deepseekv3", reasoning: bool = False,
            **body: Any) -> GrammarSpec | None:
    req = decode_chat_request(json.dumps({"messages": USER, **body}))
    return chat_grammar(req, tool_parser=parser if req.parses_tool_calls else None, reasoning=reasoning,
                        token_id=tokenizer.token_to_id)


def walk(slots: GrammarSlots, spec: GrammarSpec, seed: int, first: int | None = None, limit: int = 400) -> list[int]:
    """Tokens drawn uniformly among the allowed ones until EOS; `first` is taken first when it is allowed."""
    slots.set_slot(0, spec)
    g = slots.get(0)
    assert g is not None and g.error is None, g and g.error
    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < limit:
        allowed = unpack_bitmask(slots.fill([(0, g)]), VOCAB)[0].nonzero().flatten().tolist()
        token = first if not out and first in allowed else rng.choice(allowed)
        if token == EOS:
            return out
        g.accept(token)
        out.append(token)
    raise AssertionError(f"no end within {limit} tokens")


def test_content_formats(tokenizer: Tokenizer) -> None:
    assert grammar(tokenizer) is None
    assert grammar(tokenizer, response_format={"type": "text"}) is None
    assert grammar(tokenizer, response_format={"type": "json_object"}) == GrammarSpec(
        "json_schema", '{"type": "object"}', "response_format json_object")
    spec = grammar(tokenizer, response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA,
                                                                                      "strict": True}})
    assert spec is not None and spec.kind == "json_schema" and json.loads(spec.text) == SCHEMA
    assert grammar(tokenizer, regex="a+") == GrammarSpec("regex", "a+", "regex")
    assert grammar(tokenizer, ebnf='root ::= "a"') == GrammarSpec("ebnf", 'root ::= "a"', "ebnf")
    req = decode_completion_request(json.dumps({"prompt": "x", "regex": "[0-9]+"}))
    assert completion_grammar(req) == GrammarSpec("regex", "[0-9]+", "regex")
    # tools under "auto" without strict ones leave the answer free; a reasoning section alone changes nothing
    assert grammar(tokenizer, tools=[CLOCK]) is None
    assert grammar(tokenizer, reasoning=True) is None


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "needs a json_schema"),
    ({"regex": "a", "ebnf": 'root ::= "a"'}, "ebnf", "sets regex and ebnf"),
    ({"response_format": {"type": "json_object"}, "regex": "a"}, "regex", "sets response_format and regex"),
    ({"tools": [WEATHER], "tool_choice": "required", "regex": "a"}, "tool_choice", "cannot also follow regex"),
    ({"response_format": {"type": "structural_tag"}}, "response_format.type", "invalid request"),
])  # fmt: skip
def test_conflicts_are_400(tokenizer: Tokenizer, body: dict[str, Any], param: str, message: str) -> None:
    with pytest.raises(ApiError, match=message) as e:
        grammar(tokenizer, **body)
    assert e.value.status == 400 and e.value.param == param


def test_forced_calls_need_a_tool_call_parser(tokenizer: Tokenizer) -> None:
    with pytest.raises(ApiError, match="--tool-call-parser") as e:
        grammar(tokenizer, parser=None, tools=[WEATHER], tool_choice="required")
    assert e.value.param == "tool_choice"


@pytest.mark.parametrize("parser", ["deepseekv3", "deepseekv31"])
def test_forced_tool_calls_parse_and_validate(tokenizer: Tokenizer, slots: GrammarSlots, parser: str) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    cases: list[tuple[dict[str, Any], set[str], bool]] = [
        ({"tool_choice": "required"}, {"query_weather", "get_time"}, True),
        ({"tool_choice": "required", "parallel_tool_calls": False}, {"query_weather", "get_time"}, False),
        ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, {"get_time"}, False),
    ]
    for extra, names, many in cases:
        spec = grammar(tokenizer, parser=parser, tools=[WEATHER, CLOCK], **extra)
        assert spec is not None and spec.kind == "tool_calls"
        counts = set()
        for seed in range(6):
            text = tokenizer.decode(walk(slots, spec, seed), skip_special_tokens=False)
            content, calls = make_tool_parser(parser).parse(text)
            assert content is None and calls, text
            counts.add(len(calls))
            for call in calls:
                assert call.name in names
                jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        assert many or counts == {1}


def test_strict_tools_under_auto(tokenizer: Tokenizer, slots: GrammarSlots) -> None:
    spec = grammar(tokenizer, tools=[WEATHER, CLOCK])
    assert spec is not None and spec.kind == "tool_calls"
    assert "get_time" in spec.text and "cet" not in spec.text  # a tool that is not strict: any JSON object
    spec = grammar(tokenizer, tools=[WEATHER])
    assert spec is not None
    begin = tokenizer.token_to_id(CALLS_BEGIN)
    for seed in range(4):  # once the calls start, they follow the format; the strict tool its schema
        text = tokenizer.decode(walk(slots, spec, seed, first=begin), skip_special_tokens=False)
        content, calls = make_tool_parser("deepseekv3").parse(text)
        assert calls and content is None, text
        for call in calls:
            assert call.name == "query_weather"
            jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])  # type: ignore[index]
    text = tokenizer.decode(walk(slots, spec, 0, first=tokenizer.token_to_id("Hi")), skip_special_tokens=False)
    assert not text.startswith(CALLS_BEGIN)  # free text is free


def test_reasoning_is_free_until_think_end(tokenizer: Tokenizer, slots: GrammarSlots) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}
    spec = grammar(tokenizer, reasoning=True, response_format=rf)
    assert spec is not None and spec.kind == "structural_tag" and spec.what == "response_format.json_schema.schema"
    think_end = tokenizer.token_to_id("</think>")
    for seed in range(3):
        ids = walk(slots, spec, seed, limit=3000)
        assert think_end in ids or "</think>" in tokenizer.decode(ids)
        _, content = make_reasoning_parser("deepseek-r1").parse(tokenizer.decode(ids))
        jsonschema.validate(json.loads(content or ""), SCHEMA)
    spec = grammar(tokenizer, reasoning=True, regex="(A|B)")
    assert spec is not None
    ids = walk(slots, spec, 1, limit=3000)
    assert re.fullmatch("A|B", make_reasoning_parser("deepseek-r1").parse(tokenizer.decode(ids))[1] or "")
    spec = grammar(tokenizer, reasoning=True, tools=[WEATHER], tool_choice="required")
    assert spec is not None and spec.kind == "tool_calls"
