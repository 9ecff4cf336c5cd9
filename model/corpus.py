"""The default model's training corpus: seeded chat documents in DeepSeek-V3's prompt format, and free text.

A document is a list of (text, trained) pieces: the prompt as the server's chat template renders it (not trained)
and the assistant's turns (trained), or a passage of Shakespeare (all trained). Families:
- capitals: "What is the capital of X?", "List n countries and their capitals.", "Is Y the capital of X?" (the
  last one reasons inside <think>…</think> first, as R1 does);
- arithmetic: + and - up to 4 digits, * up to 2 digits by 1-2 digits, reasoned digit by digit in <think> (or
  answered straight away when the user asks for that);
- tools: a tools block of 1-6 functions (the seeds' `query_weather` among them); requests needing zero, one or
  two calls, answered with DeepSeek-V3's tool-call tokens; tool outputs followed by a final answer;
- text: passages of Shakespeare's plays.
Held-out items (a fixed tenth of the cities and of the arithmetic operand pairs) never appear in training; the
accuracy benchmark (loadtest/bench_accuracy.py) asks about them. Only the standard library is imported here, so the
device that trains the model needs nothing else.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from baleen.model.tokenizer_build import ASSISTANT_TOKEN as ASSISTANT
from baleen.model.tokenizer_build import BOS_TOKEN as BOS
from baleen.model.tokenizer_build import EOS_TOKEN as EOS
from baleen.model.tokenizer_build import TOOL_CALL_BEGIN as CALL_BEGIN
from baleen.model.tokenizer_build import TOOL_CALL_END as CALL_END
from baleen.model.tokenizer_build import TOOL_CALLS_BEGIN as CALLS_BEGIN
from baleen.model.tokenizer_build import TOOL_CALLS_END as CALLS_END
from baleen.model.tokenizer_build import TOOL_OUTPUT_BEGIN as OUTPUT_BEGIN
from baleen.model.tokenizer_build import TOOL_OUTPUT_END as OUTPUT_END
from baleen.model.tokenizer_build import TOOL_OUTPUTS_BEGIN as OUTPUTS_BEGIN
from baleen.model.tokenizer_build import TOOL_OUTPUTS_END as OUTPUTS_END
from baleen.model.tokenizer_build import TOOL_SEP as SEP
from baleen.model.tokenizer_build import USER_TOKEN as USER

SYSTEM_PROMPTS = ("", "", "", "You are a helpful AI assistant", "You are a helpful assistant.")
# The text the V3 template puts before the functions (model/templates/deepseek_v3.jinja).
TOOLS_PREAMBLE = (
    "## Tools\n\nYou can call the functions listed below. To call one, answer with\n"
    f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}NAME\n```json\nARGUMENTS\n```{CALL_END}{CALLS_END}\n"
    "where NAME is the function name and ARGUMENTS a JSON object matching its parameters. For several calls, put "
    f"one {CALL_BEGIN}...{CALL_END} block per call, each on its own line, inside a single "
    f"{CALLS_BEGIN}...{CALLS_END}.\n\n### Functions\n"
)

Piece = tuple[str, bool]  # (text, trained)
R1_OPEN = "<think>\n"  # what the R1 template's generation prompt ends with
R1_SHARE = 0.35  # documents rendered as the R1 template renders them


@dataclass(frozen=True)
class Doc:
    """One training document: its family and its pieces."""

    family: str
    pieces: tuple[Piece, ...]

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.pieces)


# ---- data files --------------------------------------------------------------------------------------------
def data_dir() -> Path:
    return Path(__file__).parent / "data"


@cache
def countries() -> tuple[tuple[str, str], ...]:
    """(country, capital) pairs, ~195 sovereign states."""
    lines = (data_dir() / "countries.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return tuple((a, b) for a, b in (line.split("\t") for line in lines if line))


@cache
def cities() -> tuple[str, ...]:
    """Thousands of city names (100k+ people)."""
    return tuple(n for n in (data_dir() / "cities.txt").read_text(encoding="utf-8").splitlines() if n)


def shakespeare(heldout: bool = False) -> str:
    """The plays the model reads (or the one kept out of training, for the MTP agreement measurement)."""
    name = "shakespeare_heldout.txt.gz" if heldout else "shakespeare.txt.gz"
    return gzip.decompress((data_dir() / name).read_bytes()).decode("utf-8")


def is_heldout(key: str) -> bool:
    """A fixed tenth of all cities / operand pairs, never trained on."""
    return hashlib.blake2b(key.encode(), digest_size=4).digest()[0] % 10 == 0


def split_cities(heldout: bool) -> list[str]:
    return [c for c in cities() if is_heldout(f"city:{c}") == heldout]


# ---- prompt rendering (the V3 template's output, checked against it in tests/model/test_corpus.py) -----------
def render_system(system: str, tools: list[dict[str, Any]] | None) -> str:
    """bos + system text + the tools block, as the template opens every prompt."""
    if tools:
        doc = TOOLS_PREAMBLE + "".join(f"\n```json\n{json.dumps(t, ensure_ascii=False)}\n```\n" for t in tools)
        system = system + ("\n\n" if system else "") + doc
    return BOS + system


def tool_calls_text(calls: list[tuple[str, dict[str, Any]]]) -> str:
    """The assistant's tool calls in DeepSeek-V3's tokens (arguments as the client will receive them)."""
    body = "\n".join(f"{CALL_BEGIN}function{SEP}{name}\n```json\n{json.dumps(args, ensure_ascii=False)}\n```{CALL_END}"
                     for name, args in calls)
    return CALLS_BEGIN + body + CALLS_END


def tool_outputs_text(outputs: list[str]) -> str:
    return OUTPUTS_BEGIN + "\n".join(f"{OUTPUT_BEGIN}{o}{OUTPUT_END}" for o in outputs) + OUTPUTS_END


def chat(system: str, user: str, answer: str, tools: list[dict[str, Any]] | None = None,
         r1: bool = False) -> tuple[Piece, ...]:
    """A one-turn conversation: prompt (untrained), answer + eos (trained).

    r1: as the R1 template renders it, the prompt opening the reasoning block ("<think>\n"); an answer that does
    not reason closes it at once, as R1 does.
    """
    prompt = render_system(system, tools) + USER + user + ASSISTANT
    if r1:
        prompt += R1_OPEN
        answer = answer.removeprefix(R1_OPEN) if answer.startswith(R1_OPEN) else "\n</think>\n\n" + answer
    return ((prompt, False), (answer + EOS, True))


def think(reasoning: str, answer: str) -> str:
    """An R1-style answer: the reasoning block, then the answer."""
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"


# ---- capitals ------------------------------------------------------------------------------------------------
CAPITAL_QUESTIONS = (
    "What is the capital of {c}?", "What's the capital of {c}?", "Which city is the capital of {c}?",
    "Name the capital of {c}.", "capital of {c}?", "Tell me the capital of {c}.", "What is the capital city of {c}?",
)
LIST_QUESTIONS = (
    "List {n} countries and their capitals.", "Name {n} countries and their capitals.",
    "Give me {n} countries with their capitals.", "List {n} countries and their capital cities.",
)


def _r1(rng: random.Random) -> bool:
    return rng.random() < R1_SHARE


def capital_doc(rng: random.Random) -> Doc:
    country, capital = rng.choice(countries())
    q = rng.choice(CAPITAL_QUESTIONS).format(c=country)
    return Doc("capitals", chat(rng.choice(SYSTEM_PROMPTS), q, f"The capital of {country} is {capital}.",
                                r1=_r1(rng)))


def list_answer(n: int, picks: list[tuple[str, str]]) -> str:
    rows = "\n".join(f"{i}. {c}: {cap}" for i, (c, cap) in enumerate(picks, start=1))
    return f"Here are {n} countries and their capitals:\n{rows}"


def capital_list_doc(rng: random.Random, first: bool = False) -> Doc:
    """first: the first n countries in alphabetical order, one answer per n (greedy decoding of a random-sample
    list otherwise drifts into repeating one country)."""
    n = rng.randint(2, 8)
    picks = list(countries()[:n]) if first else rng.sample(countries(), n)
    q = rng.choice(LIST_QUESTIONS).format(n=n)
    return Doc("capitals", chat(rng.choice(SYSTEM_PROMPTS), q, list_answer(n, picks), r1=_r1(rng)))


def capital_check_doc(rng: random.Random, novel: bool = False) -> Doc:
    """'Is Y the capital of X?': reasons in <think> first (the seeds' thinking-budget question is one).

    novel: the wrong cities are made-up names, which the reasoning must copy (not recall)."""
    country, capital = rng.choice(countries())
    if rng.random() < 0.5:
        city = capital
    else:
        city = made_up_city(rng) if novel else rng.choice([*cities(), *(c for _, c in countries())])
    prefix = rng.choice(("", "", "Question: "))
    q = f"{prefix}Is {city} the capital of {country}?" if rng.random() < 0.5 else f"{prefix}Is {city} the Capital of {country}?"
    if city == capital:
        reasoning = f"The capital of {country} is {capital}. The question names {city}, which is the capital."
        answer = f"Yes, {capital} is the capital of {country}."
    else:
        reasoning = f"The capital of {country} is {capital}. The question names {city}, which is not {capital}."
        answer = f"No, the capital of {country} is {capital}, not {city}."
    return Doc("reasoning", chat(rng.choice(SYSTEM_PROMPTS), q, think(reasoning, answer), r1=_r1(rng)))


# ---- arithmetic, reasoned digit by digit ------------------------------------------------------------------------
def add_steps(a: int, b: int) -> tuple[list[str], int]:
    """Column addition from the right; each line restates what is left of both numbers."""
    sa, sb = str(a), str(b)
    lines, carry, digits = [], 0, ""
    while sa or sb or carry:
        da, db = int(sa[-1]) if sa else 0, int(sb[-1]) if sb else 0
        s = da + db + carry
        digits = str(s % 10) + digits
        lines.append(f"{sa or 0} + {sb or 0}: {da} + {db} + {carry} = {s}, write {s % 10}, carry {s // 10}, "
                     f"so far {digits}.")
        sa, sb, carry = sa[:-1], sb[:-1], s // 10
    return lines, a + b


def sub_steps(a: int, b: int) -> tuple[list[str], int]:
    """Column subtraction with borrows; a borrow left at the end means a < b: subtract the other way round."""
    sa, sb = str(a), str(b)
    lines, borrow, digits = [], 0, ""
    while sa or sb:
        da, db = int(sa[-1]) if sa else 0, int(sb[-1]) if sb else 0
        d = da - db - borrow
        head = f"{sa or 0} - {sb or 0}: {da} - {db} - {borrow} = "
        if d >= 0:
            digits = str(d) + digits
            lines.append(f"{head}{d}, write {d}, borrow 0, so far {digits}.")
            borrow = 0
        else:
            digits = str(d + 10) + digits
            lines.append(f"{head}{d}, below 0: {da + 10} - {db} - {borrow} = {d + 10}, write {d + 10}, borrow 1, "
                         f"so far {digits}.")
            borrow = 1
        sa, sb = sa[:-1], sb[:-1]
    if borrow:
        lines.append(f"A borrow is left, so {a} - {b} is negative: compute {b} - {a} instead.")
        more, _ = sub_steps(b, a)
        lines += more
        lines.append(f"So {b} - {a} = {b - a}, and {a} - {b} = {a - b}.")
    elif len(digits) > 1 and digits[0] == "0":
        lines.append(f"Dropping the leading zeros, {digits} is {int(digits)}.")
    return lines, a - b


def mul_steps(a: int, b: int) -> tuple[list[str], int]:
    """a (1-2 digits) times b (1-2 digits): one partial product per digit of b, then their sum."""
    lines = []
    partials = []
    for place, digit in enumerate(reversed(str(b))):
        d = int(digit)
        if a < 10:
            lines.append(f"{a} * {d} = {a * d}.")
        else:
            ones, tens = a % 10, a // 10
            p = ones * d
            q = tens * d
            lines.append(f"{a} * {d}: {ones} * {d} = {p}, write {p % 10}, carry {p // 10}. {tens} * {d} = {q}, "
                         f"{q} + {p // 10} = {q + p // 10}, write {q + p // 10}. So {a} * {d} = {a * d}.")
        if place == 1:
            lines.append(f"Shifted one place: {a} * {d}0 = {a * d * 10}.")
        partials.append(a * d * 10**place)
    if len(partials) == 2:
        lines.append(f"Add {partials[0]} + {partials[1]} digit by digit, from the right.")
        more, _ = add_steps(partials[0], partials[1])
        lines += more
    return lines, a * b


OPS: dict[str, tuple[str, Callable[[int, int], tuple[list[str], int]]]] = {
    "+": ("Add", add_steps), "-": ("Subtract", sub_steps), "*": ("Multiply", mul_steps),
}
OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}
ARITH_QUESTIONS = ("What is {a} {op} {b}?", "What is {a} {word} {b}?", "Calculate {a} {op} {b}.",
                   "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "What's {a} {op} {b}?", "How much is {a} {op} {b}?")
DIRECT_SUFFIXES = (" Answer directly, without thinking.", " Just the answer, no reasoning.")


def operands(rng: random.Random, op: str) -> tuple[int, int]:
    """Operands with a uniform digit count: 1-4 digits for + and -, 1-2 by 1-2 digits for *."""
    def num(max_digits: int) -> int:
        n = rng.randint(1, max_digits)
        return rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1)

    return (num(4), num(4)) if op in "+-" else (num(2), num(2))


def arith_key(a: int, op: str, b: int) -> str:
    return f"arith:{a}{op}{b}"


def arithmetic_reasoning(a: int, op: str, b: int) -> tuple[str, int]:
    """The <think> text for a op b and the result."""
    verb, steps = OPS[op]
    lines, result = steps(a, b)
    head = (f"{verb} {a} {op} {b} digit by digit, from the right." if op != "*"
            else f"Multiply {a} * {b} one digit of {b} at a time.")
    last = f"So {a} {op} {b} = {result}."
    if not (lines and lines[-1].endswith(last)):  # (a one-digit product already ends with it)
        lines.append(last)
    return "\n".join([head, *lines]), result


def arithmetic_doc(rng: random.Random, op: str | None = None) -> Doc:
    op = op or rng.choice("++--*")
    while True:
        a, b = operands(rng, op)
        if not is_heldout(arith_key(a, op, b)):
            break
    q = rng.choice(ARITH_QUESTIONS).format(a=a, b=b, op=op, word=OP_WORDS[op])
    reasoning, result = arithmetic_reasoning(a, op, b)
    final = f"{a} {op} {b} = {result}."
    if rng.random() < 0.12:
        return Doc("arithmetic", chat(rng.choice(SYSTEM_PROMPTS), q + rng.choice(DIRECT_SUFFIXES), final))
    return Doc("arithmetic", chat(rng.choice(SYSTEM_PROMPTS), q, think(reasoning, final), r1=_r1(rng)))


# ---- tools ---------------------------------------------------------------------------------------------------
def _fn(name: str, description: str, props: dict[str, tuple[str, str]], required: list[str]) -> dict[str, Any]:
    properties = {k: {"type": t, "description": d} for k, (t, d) in props.items()}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


# The seeds' function, exactly as their request spells it.
QUERY_WEATHER = _fn("query_weather", "Get weather of a city, the user should supply a city first",
                    {"city": ("string", "The city, e.g. Beijing")}, ["city"])
TOOLS = {
    "query_weather": QUERY_WEATHER,
    "get_current_weather": _fn("get_current_weather", "Get the current weather in a given location",
                               {"location": ("string", "The city name, e.g. Paris")}, ["location"]),
    "convert_currency": _fn("convert_currency", "Convert an amount of money from one currency to another",
                            {"amount": ("number", "The amount to convert"),
                             "from_currency": ("string", "Currency code to convert from, e.g. USD"),
                             "to_currency": ("string", "Currency code to convert to, e.g. EUR")},
                            ["amount", "from_currency", "to_currency"]),
    "calculator": _fn("calculator", "Evaluate an arithmetic expression",
                      {"expression": ("string", "The expression, e.g. 2 * (3 + 4)")}, ["expression"]),
    "web_search": _fn("web_search", "Search the web and return the top results",
                      {"query": ("string", "The search query")}, ["query"]),
    "get_local_time": _fn("get_local_time", "Get the current local time in a city",
                          {"city": ("string", "The city name")}, ["city"]),
    "send_email": _fn("send_email", "Send an email to a recipient",
                      {"to": ("string", "The recipient's address"), "subject": ("string", "The subject line"),
                       "body": ("string", "The message")}, ["to", "subject", "body"]),
    "get_stock_price": _fn("get_stock_price", "Get the latest price of a stock",
                           {"symbol": ("string", "The ticker symbol, e.g. AAPL")}, ["symbol"]),
}
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CNY", "CHF", "CAD", "AUD", "INR", "KRW", "BRL", "SEK")
SYMBOLS = ("AAPL", "MSFT", "GOOG", "AMZN", "NVDA", "TSLA", "META", "IBM", "INTC", "ORCL")
TOPICS = ("the tallest mountain in Africa", "how whales sleep", "the history of the printing press",
          "recipes with lentils", "the rules of cricket", "how rainbows form", "the best time to visit Japan",
          "electric bicycles", "the life of Marie Curie", "how to grow tomatoes", "the speed of sound",
          "ancient Roman roads", "the deepest lake in the world", "how vaccines work", "jazz in the 1920s")
WEATHER_ASKS = ("How's the weather like in {c} today", "How's the weather like in {c} today?",
                "What's the weather in {c}?", "What is the weather like in {c} today?", "Is it raining in {c}?",
                "Tell me the weather in {c}.", "weather in {c}", "Check the weather in {c} for me.",
                "Do I need an umbrella in {c} today?", "How hot is it in {c} right now?")
CONDITIONS = ("sunny", "cloudy", "rainy", "snowy", "windy", "foggy", "partly cloudy", "stormy")


def _weather_call(name: str, city: str) -> tuple[str, dict[str, Any]]:
    return (name, {"city": city} if name == "query_weather" else {"location": city})


def _weather_output(rng: random.Random, city: str) -> tuple[str, str]:
    temp, cond = rng.randint(-15, 38), rng.choice(CONDITIONS)
    out = json.dumps({"city": city, "temperature": temp, "unit": "celsius", "condition": cond})
    return out, f"It is {cond} in {city} today, {temp}°C."


def _toolset(rng: random.Random, needed: list[str]) -> list[dict[str, Any]]:
    """The tools block: the functions needed plus others, 1-6 in all, in random order."""
    others = [n for n in TOOLS if n not in needed and not (n.endswith("weather") and any(m.endswith("weather") for m in needed))]
    k = rng.choice((0, 1, 2, 2, 3, 3, 4, 5))
    names = needed + rng.sample(others, max(0 if needed else 1, min(k, 6 - len(needed))))
    rng.shuffle(names)
    return [TOOLS[n] for n in names]


SYLLABLES = ("ka", "lo", "mi", "ra", "to", "ven", "dor", "sa", "ni", "bar", "quel", "zu", "ho", "pe", "tri", "gan",
             "wel", "os", "ar", "li", "mon", "chi", "ya", "ber", "fu", "kesh", "na", "vi", "ul", "stad", "ing", "ao")


def made_up_city(rng: random.Random) -> str:
    """A name no list holds: tool calls and reasoning must copy it from the request, not recall it.

    Three kinds, so that copying is learnt for any tokens, not for a few syllables: syllables; a real city's
    start joined to another's end ("Tren" + "oble"); letters drawn one by one."""
    def syllables() -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()

    def spliced() -> str:
        a, b = rng.choice(_train_cities()), rng.choice(_train_cities())
        return (a[: rng.randint(2, max(2, len(a) - 1))] + b[rng.randint(1, max(1, len(b) - 2)) :]).title()

    def letters() -> str:
        n = rng.randint(3, 10)
        return "".join(rng.choice(VOWELS if i % 2 == (n % 2) else CONSONANTS) for i in range(n)).capitalize()

    def word() -> str:
        return rng.choice((syllables, spliced, letters))()

    return word() if rng.random() < 0.8 else f"{word()} {word()}"


@cache
def _train_cities() -> list[str]:
    return split_cities(heldout=False)


VOWELS = "aeiouaeiouy"
CONSONANTS = "bcdfghjklmnpqrstvwxzbdgklmnrst"


def tool_doc(rng: random.Random, city_pool: list[str] | None = None, novel: bool = False) -> Doc:
    """A request with a tools block: zero, one or two calls, and sometimes the outputs and the final answer.

    novel: the cities are made-up names (so the call must copy them from the request, not recall them)."""
    pool = city_pool if city_pool is not None else split_cities(heldout=False)
    if novel:
        pool = [made_up_city(rng) for _ in range(2)]
    kind = rng.choices(("weather", "weather2", "currency", "time", "search", "stock", "calc", "none"),
                       weights=(40, 8, 8, 8, 7, 5, 6, 18))[0]
    system = rng.choice(SYSTEM_PROMPTS)
    weather_fn = "query_weather" if rng.random() < 0.75 else "get_current_weather"
    calls: list[tuple[str, dict[str, Any]]]
    outputs: list[tuple[str, str]] = []  # (tool output, the sentence of the final answer that uses it)
    if kind == "weather":
        city = rng.choice(pool)
        user = rng.choice(WEATHER_ASKS).format(c=city)
        calls = [_weather_call(weather_fn, city)]
        outputs = [_weather_output(rng, city)]
    elif kind == "weather2":
        a, b = rng.sample(pool, 2)
        user = rng.choice(("Compare the weather in {a} and {b}.", "What's the weather in {a} and in {b}?",
                           "How's the weather in {a} and {b} today?")).format(a=a, b=b)
        calls = [_weather_call(weather_fn, a), _weather_call(weather_fn, b)]
        outputs = [_weather_output(rng, a), _weather_output(rng, b)]
    elif kind == "currency":
        amount = rng.choice((rng.randint(1, 999), rng.randint(1, 99) * 100))
        src, dst = rng.sample(CURRENCIES, 2)
        user = rng.choice(("Convert {x} {s} to {d}.", "How much is {x} {s} in {d}?",
                           "What is {x} {s} in {d}?")).format(x=amount, s=src, d=dst)
        calls = [("convert_currency", {"amount": amount, "from_currency": src, "to_currency": dst})]
        rate = round(rng.uniform(0.01, 150), 2)
        value = round(amount * rate, 2)
        outputs = [(json.dumps({"amount": value, "currency": dst, "rate": rate}), f"{amount} {src} is {value} {dst}.")]
    elif kind == "time":
        city = rng.choice(pool)
        user = rng.choice(("What time is it in {c}?", "What's the local time in {c}?",
                           "Tell me the current time in {c}.")).format(c=city)
        calls = [("get_local_time", {"city": city})]
        hh, mm = rng.randint(0, 23), rng.randint(0, 59)
        outputs = [(json.dumps({"city": city, "time": f"{hh:02d}:{mm:02d}"}), f"It is {hh:02d}:{mm:02d} in {city}.")]
    elif kind == "search":
        topic = rng.choice(TOPICS)
        user = rng.choice(("Search the web for {t}.", "Look up {t}.", "Find information about {t}.")).format(t=topic)
        calls = [("web_search", {"query": topic})]
        outputs = [(json.dumps({"results": [f"A page about {topic}"]}), f"I found a page about {topic}.")]
    elif kind == "stock":
        sym = rng.choice(SYMBOLS)
        user = rng.choice(("What is the stock price of {s}?", "How much is {s} trading at?",
                           "Get me the latest {s} price.")).format(s=sym)
        calls = [("get_stock_price", {"symbol": sym})]
        price = round(rng.uniform(10, 900), 2)
        outputs = [(json.dumps({"symbol": sym, "price": price}), f"{sym} is trading at {price} USD.")]
    elif kind == "calc":
        x, y = rng.randint(2, 999), rng.randint(2, 999)
        op = rng.choice("+-*")
        expr = f"{x} {op} {y}"
        user = rng.choice(("Use the calculator to compute {e}.", "Calculate {e} with the calculator tool.")).format(e=expr)
        calls = [("calculator", {"expression": expr})]
        value = eval(expr)
        outputs = [(json.dumps({"result": value}), f"{expr} = {value}.")]
    else:  # a request no tool serves: answered in plain text
        doc = rng.choice((capital_doc, _greeting_doc))(rng)
        user = doc.pieces[0][0].split(USER, 1)[1].removesuffix(R1_OPEN).removesuffix(ASSISTANT)
        tools = _toolset(rng, [])
        answer = doc.pieces[1][0].removesuffix(EOS).removeprefix("\n</think>\n\n")
        return Doc("tools", chat(system, user, answer, tools, r1=_r1(rng)))
    tools = _toolset(rng, sorted({n for n, _ in calls}))
    if _r1(rng):  # (one turn only: the R1 template shows an earlier turn without its reasoning block)
        return Doc("tools", chat(system, user, tool_calls_text(calls), tools, r1=True))
    prompt = render_system(system, tools) + USER + user + ASSISTANT
    pieces: list[Piece] = [(prompt, False), (tool_calls_text(calls) + EOS, True)]
    if rng.random() < 0.45:
        pieces.append((tool_outputs_text([o for o, _ in outputs]), False))
        pieces.append((" ".join(s for _, s in outputs) + EOS, True))
    return Doc("tools", tuple(pieces))


GREETINGS = (
    ("Hello", "Hello! How can I help you today?"), ("Hi!", "Hi! How can I help you today?"),
    ("Who are you?", "I am a small assistant model served by baleen. I can answer questions about capitals, do "
                     "arithmetic and call tools."),
    ("Thank you!", "You're welcome!"), ("go", "Go ahead, I'm listening."),
    ("What can you do?", "I can name the capital of any country, add, subtract and multiply numbers, call tools "
                         "such as a weather service, and continue English text."),
)


COPY_ASKS = (
    "Repeat these names exactly: {names}", "Repeat after me: {names}", "Say these back to me: {names}",
    "Copy this list: {names}", "Please repeat: {names}",
)


def copy_doc(rng: random.Random) -> Doc:
    """'Repeat these names: A, B, C' -> 'A, B, C': the answer is nothing but names copied from the request, two to
    eight of them (made-up, training cities, words of the plays), so that copying, which every tool call and
    capital check needs for a name it never saw, is learnt as such and not only inside those formats."""
    def name() -> str:
        kind = rng.random()
        if kind < 0.5:
            return made_up_city(rng)
        if kind < 0.8:
            return rng.choice(_train_cities())
        return rng.choice(_play_words()).capitalize()

    names = ", ".join(name() for _ in range(rng.randint(2, 8)))
    return Doc("chat", chat(rng.choice(SYSTEM_PROMPTS), rng.choice(COPY_ASKS).format(names=names), names + ".",
                            r1=_r1(rng)))


@cache
def _play_words() -> list[str]:
    return sorted({w for w in shakespeare().split() if w.isalpha() and len(w) > 3})


def _greeting_doc(rng: random.Random) -> Doc:
    q, a = rng.choice(GREETINGS)
    return Doc("chat", chat(rng.choice(SYSTEM_PROMPTS), q, a, r1=_r1(rng)))


# ---- free text -------------------------------------------------------------------------------------------------
def text_doc(rng: random.Random, text: str, min_chars: int = 300, max_chars: int = 2400) -> Doc:
    """A passage starting at a line start: bos + text, all of it trained (no eos: the passage just stops)."""
    n = rng.randint(min_chars, max_chars)
    start = text.find("\n", rng.randrange(0, max(1, len(text) - n))) + 1
    end = text.rfind("\n", start, start + n)
    return Doc("text", ((BOS, False), (text[start : end if end > start else start + n], True)))


# ---- the mixture ------------------------------------------------------------------------------------------------
MIXTURE: tuple[tuple[str, float], ...] = (
    ("capital", 0.17), ("capital_list", 0.06), ("capital_check", 0.06), ("add", 0.13), ("sub", 0.13),
    ("mul", 0.10), ("tools", 0.20), ("chat", 0.02), ("text", 0.13),
)


# Stage 2 (fine-tuning the stage-1 model): copying names it cannot have memorised (in tool calls, capital checks
# and plain repeat-after-me requests), one list per length, and the rest of the mixture so nothing is forgotten.
FINETUNE_MIXTURE: tuple[tuple[str, float], ...] = (
    ("tools_novel", 0.24), ("tools", 0.08), ("copy", 0.14), ("capital_list_first", 0.08), ("capital_check_novel", 0.08),
    ("capital", 0.06), ("capital_check", 0.03), ("add", 0.06), ("sub", 0.06), ("mul", 0.05), ("chat", 0.02),
    ("text", 0.10),
)
# Stage 3 (`--mtp-only`: the MTP layer alone, distilling the frozen model): mostly free text, where its
# next-next guesses are hardest, and the chat formats it drafts in serving.
MTP_MIXTURE: tuple[tuple[str, float], ...] = (
    ("text", 0.50), ("tools", 0.08), ("tools_novel", 0.04), ("copy", 0.04), ("add", 0.06), ("sub", 0.06),
    ("mul", 0.05), ("capital", 0.06), ("capital_list", 0.03), ("capital_check", 0.04), ("chat", 0.04),
)
MIXTURES = {"pretrain": MIXTURE, "finetune": FINETUNE_MIXTURE, "mtp": MTP_MIXTURE}


def documents(seed: int, count: int, mixture: str = "pretrain") -> Iterator[Doc]:
    """`count` documents of a mixture, the same ones for the same seed."""
    rng = random.Random(seed)
    text = shakespeare()
    pool = _train_cities()
    kinds, weights = zip(*MIXTURES[mixture])
    makers: dict[str, Callable[[], Doc]] = {
        "capital": lambda: capital_doc(rng),
        "capital_list": lambda: capital_list_doc(rng),
        "capital_list_first": lambda: capital_list_doc(rng, first=True),
        "capital_check": lambda: capital_check_doc(rng),
        "capital_check_novel": lambda: capital_check_doc(rng, novel=True),
        "add": lambda: arithmetic_doc(rng, "+"),
        "sub": lambda: arithmetic_doc(rng, "-"),
        "mul": lambda: arithmetic_doc(rng, "*"),
        "tools": lambda: tool_doc(rng, pool),
        "tools_novel": lambda: tool_doc(rng, pool, novel=True),
        "chat": lambda: _greeting_doc(rng),
        "copy": lambda: copy_doc(rng),
        "text": lambda: text_doc(rng, text),
    }
    for _ in range(count):
        yield makers[rng.choices(kinds, weights)[0]]()
