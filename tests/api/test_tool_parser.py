"""Tool-call parsers: exact whole-text results, and the same calls and content for every chunking."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from baleen.api.tool_parser import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    EOS,
    SEP,
    ToolCallDelta,
    ToolCallParser,
    make_tool_parser,
)


def v3(name: str, args: str) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}"


def v31(name: str, args: str) -> str:
    return f"{CALL_BEGIN}{name}{SEP}{args}{CALL_END}"


Calls = list[tuple[str, str]]

# (parser, output text, expected content, expected [(name, arguments)])
CASES: list[tuple[str, str, str | None, Calls]] = [
    # The seed's example, as DeepSeek-V3-0324 writes it.
    ("deepseekv3", CALLS_BEGIN + v3("query_weather", '{"city": "Qingdao"}') + CALLS_END + EOS,
     None, [("query_weather", '{"city": "Qingdao"}')]),
    # Text before the calls, two calls separated by a newline, a backtick inside the arguments.
    ("deepseekv3", "Let me check both.\n\n" + CALLS_BEGIN + v3("get_weather", '{"city": "Qingdao"}') + "\n"
     + v3("get_time", '{"note": "`x`"}') + CALLS_END,
     "Let me check both.", [("get_weather", '{"city": "Qingdao"}'), ("get_time", '{"note": "`x`"}')]),
    # No calls: everything is content, including text that looks like the start of a marker.
    ("deepseekv3", "Plain `code` and <｜ and ``` fences.", "Plain `code` and <｜ and ``` fences.", []),
    # Malformed JSON is passed through as written.
    ("deepseekv3", CALLS_BEGIN + v3("f", '{"city": Qingdao}') + CALLS_END, None, [("f", '{"city": Qingdao}')]),
    # Truncated by max_tokens inside the arguments: what was generated is kept.
    ("deepseekv3", CALLS_BEGIN + f"{CALL_BEGIN}function{SEP}f\n```json\n" + '{"xs": [1, 2', None,
     [("f", '{"xs": [1, 2')]),
    # Truncated inside the closing fence, and inside the header (no name yet: no call).
    ("deepseekv3", CALLS_BEGIN + f"{CALL_BEGIN}function{SEP}f\n```json\n" + '{"a": 1}\n``', None, [("f", '{"a": 1}')]),
    ("deepseekv3", "Sure." + CALLS_BEGIN + f"{CALL_BEGIN}func", "Sure.", []),
    # A call without arguments, and text after the calls.
    ("deepseekv3", CALLS_BEGIN + f"{CALL_BEGIN}function{SEP}now{CALL_END}" + CALLS_END + "\nDone.",
     "Done.", [("now", "{}")]),
    # A fence without the language word.
    ("deepseekv3", CALLS_BEGIN + f"{CALL_BEGIN}function{SEP}f\n```\n" + '{"k": "v"}' + f"\n```{CALL_END}" + CALLS_END,
     None, [("f", '{"k": "v"}')]),
    # Arguments ending in a backtick right before the fence: only the fence's three are dropped.
    ("deepseekv3", CALLS_BEGIN + f"{CALL_BEGIN}function{SEP}f\n```json\n" + "raw`" + f"```{CALL_END}" + CALLS_END,
     None, [("f", "raw`")]),
    ("deepseekv3", CALLS_BEGIN + f"{CALL_BEGIN}function{SEP}f\n```json\n" + "raw````", None, [("f", "raw`")]),
    # V3.1: calls chained with nothing between them.
    ("deepseekv31", CALLS_BEGIN + v31("get_weather", '{"city": "Paris"}') + v31("get_time", '{"tz": "CET"}')
     + CALLS_END + EOS, None, [("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "CET"}')]),
    ("deepseekv31", "I will call it. " + CALLS_BEGIN + v31("f", "not json at all") + CALLS_END,
     "I will call it.", [("f", "not json at all")]),
    ("deepseekv31", CALLS_BEGIN + v31("f", '{"a": "b"'), None, [("f", '{"a": "b"')]),
    ("deepseekv31", "Answer without tools." + EOS, "Answer without tools.", []),
    ("deepseekv31", CALLS_BEGIN + f"{CALL_BEGIN}lookup{SEP}{{}}{CALL_END}" + CALLS_END, None, [("lookup", "{}")]),
]


def _ids(index: int) -> str:
    return f"id{index}"


def _replay(parser: ToolCallParser, pieces: list[str]) -> tuple[str | None, Calls, list[list[object]]]:
    """Feed the pieces; rebuild content and calls the way a client does. Also returns each feed's deltas."""
    per_feed: list[list[object]] = [list(parser.feed(piece)) for piece in pieces] + [list(parser.finish())]
    content, calls = "", dict[int, list[str]]()
    for deltas in per_feed:
        for d in deltas:
            if isinstance(d, str):
                content += d
                continue
            assert isinstance(d, ToolCallDelta)
            if d.name is not None:  # a call's first delta carries its id and name, exactly once
                assert d.index not in calls and d.id == _ids(d.index)
                assert d.index == len(calls)  # indices count up from 0
                calls[d.index] = [d.name, ""]
            else:
                assert d.index in calls and d.id is None
            calls[d.index][1] += d.arguments
    return content or None, [(n, a) for n, a in (calls[i] for i in sorted(calls))], per_feed


def _split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def _tokens(text: str) -> list[str]:
    """Token-like pieces: special tokens whole, words, single characters of punctuation."""
    return [t for t in re.split(r"(<｜[^｜]*｜>|\w+|\s+)", text) if t]


def _chunkings(text: str, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    out = [[text], list(text), _tokens(text)]
    out += [_split(text, [i]) for i in range(len(text) + 1)]
    out += [_split(text, rng.sample(range(len(text) + 1), rng.randint(2, 10))) for _ in range(60)]
    return out


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_parse_and_every_chunking_agree(name: str, text: str, content: str | None, calls: Calls) -> None:
    got_content, got_calls = make_tool_parser(name, make_id=_ids).parse(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert [c.id for c in got_calls] == [_ids(i) for i in range(len(calls))]
    for pieces in _chunkings(text, seed=len(text)):
        c, k, _ = _replay(make_tool_parser(name, make_id=_ids), pieces)
        assert (c, k) == (content, calls), pieces


# (parser, tool names of the request, output text, expected content, expected calls): a call to a name the request
# has no tool for is dropped with its text, as SGLang drops it (found by loadtest/chaos.py: deepseekv31 reading
# V3-format calls named every call "function", its arguments "query_weather\n```json...")
UNDECLARED: list[tuple[str, list[str], str, str | None, Calls]] = [
    ("deepseekv3", ["query_weather"], "Checking." + CALLS_BEGIN + v3("query_weather", '{"city": "Oslo"}')
     + v3("delete_files", '{"path": "/"}') + v3("query_weather", '{"city": "Lima"}') + CALLS_END + EOS,
     "Checking.", [("query_weather", '{"city": "Oslo"}'), ("query_weather", '{"city": "Lima"}')]),
    ("deepseekv31", ["query_weather"], CALLS_BEGIN + v3("query_weather", '{"city": "Oslo"}') + CALLS_END + EOS,
     None, []),
    ("deepseekv3", ["f"], CALLS_BEGIN + v3("g", '{"a": 1}') + CALLS_END + "\nNo tool for that.", "No tool for that.",
     []),
    ("deepseekv3", [], CALLS_BEGIN + v3("g", '{"a": "cut off'), None, []),
]


@pytest.mark.parametrize(("name", "tools", "text", "content", "calls"), UNDECLARED)
def test_calls_to_undeclared_tools_are_dropped(name: str, tools: list[str], text: str, content: str | None,
                                               calls: Calls) -> None:  # fmt: skip
    got_content, got_calls = make_tool_parser(name, make_id=_ids, tools=tools).parse(text)
    assert (got_content, [(c.name, c.arguments) for c in got_calls]) == (content, calls)
    for pieces in _chunkings(text, seed=len(text)):
        c, k, _ = _replay(make_tool_parser(name, make_id=_ids, tools=tools), pieces)
        assert (c, k) == (content, calls), pieces


def test_seed_stream_sends_argument_fragments_as_generated() -> None:
    # Token by token, as in the seed's "Expected Streamed Chunks".
    tokens = [CALLS_BEGIN, CALL_BEGIN, "function", SEP, "query", "_weather", "\n", "```", "json", "\n",
              '{"', "city", '":"', "Q", "ing", "dao", '"}', "\n", "```", CALL_END, CALLS_END, EOS]
    parser = make_tool_parser("deepseekv3", make_id=_ids)
    content, calls, per_feed = _replay(parser, tokens)
    assert content is None and calls == [("query_weather", '{"city":"Qingdao"}')]
    fragments = [d.arguments for deltas in per_feed for d in deltas if isinstance(d, ToolCallDelta) and d.arguments]
    assert fragments == ['{"', "city", '":"', "Q", "ing", "dao", '"}']  # each token goes out as it comes
    head = per_feed[6][0]
    assert isinstance(head, ToolCallDelta)
    assert head.to_openai() == {"index": 0, "id": "id0", "type": "function",
                                "function": {"name": "query_weather", "arguments": ""}}
    first_args = per_feed[10][0]
    assert isinstance(first_args, ToolCallDelta)
    assert first_args.to_openai() == {"index": 0, "function": {"arguments": '{"'}}


def test_calls_arriving_in_one_chunk_stay_apart() -> None:
    text = CALLS_BEGIN + v31("a", '{"x": 1}') + v31("b", '{"y": 2}') + v31("a", "{}") + CALLS_END
    parser = make_tool_parser("deepseekv31", make_id=_ids)
    deltas = parser.feed(text) + parser.finish()
    assert [d.to_openai() for d in deltas if isinstance(d, ToolCallDelta)] == [
        {"index": 0, "id": "id0", "type": "function", "function": {"name": "a", "arguments": '{"x": 1}'}},
        {"index": 1, "id": "id1", "type": "function", "function": {"name": "b", "arguments": '{"y": 2}'}},
        {"index": 2, "id": "id2", "type": "function", "function": {"name": "a", "arguments": "{}"}},
    ]
    assert [c.to_openai()["function"]["name"] for c in parser.tool_calls] == ["a", "b", "a"]


def test_only_a_possible_closing_is_held_back() -> None:
    parser = make_tool_parser("deepseekv3", make_id=_ids)
    parser.feed(CALLS_BEGIN + f"{CALL_BEGIN}function{SEP}f\n```json\n")
    out = parser.feed('{"a": "b"}\n`')
    assert [d.arguments for d in out if isinstance(d, ToolCallDelta)] == ['{"a": "b"}']  # "\n`" may be the fence
    out = parser.feed("x")
    assert [d.arguments for d in out if isinstance(d, ToolCallDelta)] == ["\n`x"]  # it was not
    out = parser.feed("\n```<｜tool▁call")
    assert out == []
    parser.feed(f"▁end｜>{CALLS_END}")
    assert parser.tool_calls[0].arguments == '{"a": "b"}\n`x'


def test_content_streams_before_the_calls() -> None:
    parser = make_tool_parser("deepseekv31", make_id=_ids)
    assert parser.feed("Checking the") == ["Checking the"]
    assert parser.feed(" weather <｜tool") == [" weather"]  # a special token may be starting
    out = parser.feed("▁calls▁begin｜>")
    assert out == []
    out = parser.feed(f"{CALL_BEGIN}get_weather{SEP}")
    assert [(d.index, d.name) for d in out if isinstance(d, ToolCallDelta)] == [(0, "get_weather")]


def test_random_ids_and_names() -> None:
    content, calls = make_tool_parser("deepseekv3").parse(CALLS_BEGIN + v3("f", "{}") + "\n" + v3("g", "{}"))
    assert content is None and len(calls) == 2
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls) and calls[0].id != calls[1].id
    assert json.loads(calls[0].arguments) == {}
    with pytest.raises(ValueError, match="deepseekv31"):
        make_tool_parser("hermes")


@pytest.mark.parametrize(("text", "cut_off"), [
    (CALLS_BEGIN + v3("f", '{"a": 1}') + CALLS_END, False),
    (CALLS_BEGIN + v3("f", '{"a": 1}'), False),  # between calls
    ("Sure. " + CALLS_BEGIN + v3("f", '{"a": 1}') + CALL_BEGIN + "function" + SEP + "g\n```json\n{\"b", True),
    (CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "f", True),  # in the header
    ("No calls.", False),
])
def test_cut_off_says_the_output_ended_inside_a_call(text: str, cut_off: bool) -> None:
    whole = make_tool_parser("deepseekv3", make_id=_ids)
    whole.parse(text)
    assert whole.cut_off == cut_off
    for pieces in _chunkings(text, seed=3):
        streamed = make_tool_parser("deepseekv3", make_id=_ids)
        for piece in pieces:
            streamed.feed(piece)
        streamed.finish()
        assert streamed.cut_off == cut_off, pieces
