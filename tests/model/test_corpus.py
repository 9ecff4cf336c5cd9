"""The default model's corpus: prompts exactly as the server's templates render them, right answers, held-out items
kept out, the same documents for the same seed."""

from __future__ import annotations

import json
import random
import re

import pytest

from baleen.api.chat_template import ChatTemplate
from baleen.model import corpus


def test_same_seed_same_documents() -> None:
    a = [d.pieces for d in corpus.documents(3, 200)]
    assert a == [d.pieces for d in corpus.documents(3, 200)]
    assert a != [d.pieces for d in corpus.documents(4, 200)]
    families = {d.family for d in corpus.documents(3, 2000)}
    assert families == {"capitals", "reasoning", "arithmetic", "tools", "chat", "text"}


@pytest.mark.parametrize("r1", [False, True])
@pytest.mark.parametrize("with_tools", [False, True])
def test_prompts_render_as_the_templates_do(r1: bool, with_tools: bool) -> None:
    template = ChatTemplate.builtin("deepseek-r1" if r1 else "deepseek-v3")
    tools = [corpus.QUERY_WEATHER, corpus.TOOLS["convert_currency"]] if with_tools else None
    for system in ("", "You are a helpful AI assistant"):
        msgs = [{"role": "system", "content": system}] if system else []
        msgs.append({"role": "user", "content": "How's the weather like in Qingdao today"})
        prompt, answer = corpus.chat(system, msgs[-1]["content"], "ok", tools, r1=r1)
        assert prompt == (template.render(msgs, tools=tools, add_generation_prompt=True), False)
        assert answer == (("\n</think>\n\nok" if r1 else "ok") + corpus.EOS, True)
    # a tool call, its output, then the final answer (V3 template)
    v3 = ChatTemplate.builtin("deepseek-v3")
    call = {"type": "function", "function": {"name": "query_weather", "arguments": '{"city": "Qingdao"}'}}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": '{"t": 1}'}]
    want = v3.render(msgs, tools=[corpus.QUERY_WEATHER], add_generation_prompt=True)
    got = (corpus.render_system("", [corpus.QUERY_WEATHER]) + corpus.USER + "hi" + corpus.ASSISTANT
           + corpus.tool_calls_text([("query_weather", {"city": "Qingdao"})]) + corpus.EOS
           + corpus.tool_outputs_text(['{"t": 1}']))
    assert got == want


@pytest.mark.parametrize("op", ["+", "-", "*"])
def test_arithmetic_reasoning_reaches_the_result(op: str) -> None:
    rng = random.Random(op)
    for _ in range(300):
        a, b = corpus.operands(rng, op)
        text, result = corpus.arithmetic_reasoning(a, op, b)
        assert result == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert text.endswith(f"So {a} {op} {b} = {result}.")
        # every column step's sum is right
        for x, y, z, s in re.findall(r"(\d+) [+] (\d+) [+] (\d+) = (\d+)", text):
            assert int(x) + int(y) + int(z) == int(s)


def test_heldout_items_are_never_trained() -> None:
    heldout = set(corpus.split_cities(heldout=True))
    assert 300 < len(heldout) < 700 and len(corpus.split_cities(heldout=False)) > 4000
    for doc in corpus.documents(11, 3000):
        if doc.family == "tools":
            for m in re.finditer(r'\{"(?:city|location)": "([^"]+)"\}', doc.text):
                assert m.group(1) not in heldout
        if doc.family == "arithmetic":
            m = re.search(r"<｜User｜>\D*(\d+) (?:[-+*]|plus|minus|times) (\d+)", doc.text)
            assert m is not None
            op = re.search(r"\d+ ([-+*]) \d+ = ", doc.text)
            assert op is not None and not corpus.is_heldout(corpus.arith_key(int(m[1]), op[1], int(m[2])))


def test_tool_calls_carry_the_requested_arguments() -> None:
    rng = random.Random(0)
    for _ in range(200):
        doc = corpus.tool_doc(rng)
        answers = "".join(t for t, trained in doc.pieces if trained)
        calls = re.findall(r"function<｜tool▁sep｜>(\w+)\n```json\n(.+?)\n```", answers)
        prompt = doc.pieces[0][0]
        names = {t["function"]["name"] for t in map(json.loads, re.findall(r"```json\n(\{.+?\})\n```\n", prompt))}
        assert 1 <= len(names) <= 6
        for name, args in calls:
            assert name in names  # only functions the tools block offers
            for v in json.loads(args).values():
                assert str(v) in prompt.split(corpus.USER)[-1]  # copied from the request
