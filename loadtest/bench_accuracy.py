"""Accuracy of a served model on held-out questions of the default model's task families (cf. SGLang's gsm8k bench).

    python loadtest/bench_accuracy.py --base-url http://127.0.0.1:30000/v1 [--num 50] [--json out.json]
    python loadtest/bench_accuracy.py --mtp-model-path PATH      # + the MTP head's agreement, in process

Asks any OpenAI-compatible server, greedy, N questions per family, drawn from a seed:
- capitals: "What is the capital of {country}?" (the answer must name the capital) and "List n countries and their
  capitals." (every pair right, n of them);
- add / sub / mul: held-out operand pairs (never in training); the last number of the answer must be the result;
- tools: weather requests for held-out cities, with the seeds' one-function tools block or 3-6 functions; a call is
  exactly right when the finish reason is "tool_calls" and the one call parses, names query_weather and passes
  {"city": <the city>}; the breakdown counts each of those checks. tools_none: a request no tool serves must
  get a plain answer;
- reasoning: "Is {city} the capital of {country}?": yes/no right, and the reasoning returned in
  `reasoning_content` apart from `content` (start the server with --reasoning-parser deepseek-r1). The arithmetic
  answers are checked for the same split.
With --mtp-model-path, the checkpoint is also loaded here (torch, baleen.model) and the MTP layer's top-1 is
compared with the main model's next-next token on held-out Shakespeare (a play kept out of training): on the
model's own greedy continuations (what speculative decoding accepts) and on the text itself; and on its greedy
answers to held-out questions (arithmetic, tool calls).
Only the standard library talks to the server.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from baleen.model import corpus

FAMILIES = ("capitals", "capital_lists", "add", "sub", "mul", "tools", "tools_none", "reasoning")
_NUMBER = re.compile(r"-?\d+")


@dataclass
class Result:
    """One family's tally; `checks` counts named sub-checks (tool-call validity, reasoning split)."""

    n: int = 0
    correct: int = 0
    checks: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, ok: bool, checks: dict[str, bool], shown: str) -> None:
        self.n += 1
        self.correct += ok
        for k, v in checks.items():
            self.checks[k] = self.checks.get(k, 0) + int(v)
        if not ok and len(self.failures) < 3:
            self.failures.append(shown[:300])

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, "accuracy": round(self.correct / max(1, self.n), 4)}
        out.update({k: round(v / max(1, self.n), 4) for k, v in sorted(self.checks.items())})
        if self.failures:
            out["failures"] = self.failures
        return out


@dataclass(frozen=True)
class Question:
    family: str
    body: dict[str, Any]
    check: Callable[[dict[str, Any]], tuple[bool, dict[str, bool]]]


def post(base_url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(f"{base_url}/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out


def _message(resp: dict[str, Any]) -> tuple[dict[str, Any], str]:
    choice = resp["choices"][0]
    return choice["message"], choice["finish_reason"]


def _text(msg: dict[str, Any]) -> str:
    return msg.get("content") or ""


def _chat(user: str, max_tokens: int, tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "default", "messages": [{"role": "user", "content": user}], "temperature": 0,
                            "max_tokens": max_tokens}
    if tools:
        body["tools"] = tools
    return body


def _reasoning_split(msg: dict[str, Any]) -> bool:
    """The reasoning came back apart: non-empty reasoning_content, and no think tags left in content."""
    return bool(msg.get("reasoning_content")) and "<think>" not in _text(msg) and "</think>" not in _text(msg)


# ---- question makers ------------------------------------------------------------------------------------------
def capital_question(rng: random.Random) -> Question:
    country, capital = rng.choice(corpus.countries())

    def check(resp: dict[str, Any]) -> tuple[bool, dict[str, bool]]:
        return capital in _text(_message(resp)[0]), {}

    return Question("capitals", _chat(f"What is the capital of {country}?", 32), check)


def capital_list_question(rng: random.Random) -> Question:
    n = rng.randint(2, 6)
    table = dict(corpus.countries())

    def check(resp: dict[str, Any]) -> tuple[bool, dict[str, bool]]:
        rows = re.findall(r"^\d+\. (.+?): (.+)$", _text(_message(resp)[0]), flags=re.M)
        right = [table.get(c.strip()) == cap.strip() for c, cap in rows]
        return len(rows) == n and all(right) and len({c for c, _ in rows}) == n, {}

    return Question("capital_lists", _chat(f"List {n} countries and their capitals.", 24 * n + 16), check)


def arithmetic_question(rng: random.Random, op: str) -> Question:
    while True:
        a, b = corpus.operands(rng, op)
        if corpus.is_heldout(corpus.arith_key(a, op, b)):
            break
    want = {"+": a + b, "-": a - b, "*": a * b}[op]

    def check(resp: dict[str, Any]) -> tuple[bool, dict[str, bool]]:
        msg = _message(resp)[0]
        numbers = _NUMBER.findall(_text(msg).split("</think>")[-1])
        return bool(numbers) and int(numbers[-1]) == want, {"reasoning_split": _reasoning_split(msg)}

    family = {"+": "add", "-": "sub", "*": "mul"}[op]
    return Question(family, _chat(f"What is {a} {op} {b}?", 700), check)


def tool_question(rng: random.Random, cities: list[str]) -> Question:
    city = rng.choice(cities)
    if rng.random() < 0.5:
        tools = [corpus.QUERY_WEATHER]  # the seeds' request
    else:
        others = [t for n, t in corpus.TOOLS.items() if not n.endswith("weather")]
        tools = [corpus.QUERY_WEATHER, *rng.sample(others, rng.randint(2, 5))]
        rng.shuffle(tools)
    user = rng.choice(corpus.WEATHER_ASKS).format(c=city)

    def check(resp: dict[str, Any]) -> tuple[bool, dict[str, bool]]:
        msg, finish = _message(resp)
        calls = msg.get("tool_calls") or []
        args: Any = None
        if len(calls) == 1:
            try:
                args = json.loads(calls[0]["function"]["arguments"])
            except ValueError:
                args = None
        checks = {
            "finish_tool_calls": finish == "tool_calls",
            "one_call": len(calls) == 1,
            "parses": isinstance(args, dict),
            "right_name": len(calls) == 1 and calls[0]["function"]["name"] == "query_weather",
            "right_arguments": args == {"city": city},
        }
        return all(checks.values()), checks

    return Question("tools", _chat(user, 64, tools), check)


def no_tool_question(rng: random.Random) -> Question:
    country, capital = rng.choice(corpus.countries())
    tools = [corpus.QUERY_WEATHER, *rng.sample([t for n, t in corpus.TOOLS.items() if not n.endswith("weather")], 2)]

    def check(resp: dict[str, Any]) -> tuple[bool, dict[str, bool]]:
        msg, finish = _message(resp)
        return not msg.get("tool_calls") and capital in _text(msg) and finish == "stop", {}

    return Question("tools_none", _chat(f"What is the capital of {country}?", 32, tools), check)


def reasoning_question(rng: random.Random) -> Question:
    country, capital = rng.choice(corpus.countries())
    city = capital if rng.random() < 0.5 else rng.choice(corpus.split_cities(heldout=True))
    yes = city == capital

    def check(resp: dict[str, Any]) -> tuple[bool, dict[str, bool]]:
        msg = _message(resp)[0]
        answer = _text(msg).split("</think>")[-1].strip()
        right = answer.startswith("Yes") if yes else answer.startswith("No")
        split = _reasoning_split(msg)
        return right and split, {"reasoning_split": split, "answer_right": right}

    return Question("reasoning", _chat(f"Is {city} the capital of {country}?", 128), check)


def questions(num: int, seed: int, families: tuple[str, ...]) -> list[Question]:
    """`num` questions of each family, the same ones for the same seed."""
    rng = random.Random(seed)
    cities = corpus.split_cities(heldout=True)
    makers: dict[str, Callable[[], Question]] = {
        "capitals": lambda: capital_question(rng),
        "capital_lists": lambda: capital_list_question(rng),
        "add": lambda: arithmetic_question(rng, "+"),
        "sub": lambda: arithmetic_question(rng, "-"),
        "mul": lambda: arithmetic_question(rng, "*"),
        "tools": lambda: tool_question(rng, cities),
        "tools_none": lambda: no_tool_question(rng),
        "reasoning": lambda: reasoning_question(rng),
    }
    return [makers[f]() for f in families for _ in range(num)]


def run(base_url: str, qs: list[Question], concurrency: int, timeout: float) -> dict[str, Result]:
    results = {q.family: Result() for q in qs}

    def ask(q: Question) -> tuple[Question, dict[str, Any] | None, str]:
        try:
            return q, post(base_url, q.body, timeout), ""
        except Exception as e:  # a failed request counts as wrong, and is shown
            return q, None, f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(concurrency) as pool:
        for q, resp, err in pool.map(ask, qs):
            if resp is None:
                results[q.family].add(False, {}, err)
                continue
            ok, checks = q.check(resp)
            msg = resp["choices"][0]["message"]
            results[q.family].add(ok, checks, json.dumps({"asked": q.body["messages"][-1]["content"],
                                                          "got": msg}, ensure_ascii=False))
    return results


# ---- MTP agreement, in process --------------------------------------------------------------------------------
def mtp_agreement(model_path: str, num_passages: int = 24, prompt_len: int = 48, new_tokens: int = 32,
                  seed: int = 0, device: str = "cpu") -> dict[str, float]:
    """Top-1 agreement of the MTP layer with the main model's next-next token on held-out text."""
    import torch
    from tokenizers import Tokenizer

    from baleen.model.attention import TorchAttentionBackend
    from baleen.model.batch import ForwardBatch
    from baleen.model.config import ModelConfig
    from baleen.model.kv_cache import KVCache
    from baleen.model.loader import load_model

    cfg = ModelConfig.from_hf(model_path)
    loaded = load_model(model_path, cfg, device=device, dtype=torch.float32, with_mtp=True, progress=False)
    if loaded.mtp is None:
        raise SystemExit(f"{model_path} has no MTP layer")
    tok = Tokenizer.from_file(f"{model_path}/tokenizer.json")
    text = corpus.shakespeare(heldout=True)
    rng = random.Random(seed)
    prompts = [tok.encode(corpus.text_doc(rng, text, 400, 600).pieces[1][0]).ids[:prompt_len]
               for _ in range(num_passages)]
    # held-out questions as the server's template renders them: what the model answers in practice
    chats = []
    for i in range(num_passages):
        q = arithmetic_question(rng, "+-*"[i % 3]) if i % 2 else tool_question(rng, corpus.split_cities(True))
        msg = q.body["messages"][-1]["content"]
        prompt = corpus.chat("", msg, "", q.body.get("tools"))[0][0]
        chats.append(tok.encode(prompt, add_special_tokens=False).ids)
    page = 64
    attn = TorchAttentionBackend()

    def forward(seqs: list[list[int]], with_mtp: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(the main model's top-1 [T], the MTP layer's [T] or None, the main model's top-1 probability [T])."""
        lens = [len(s) for s in seqs]
        pages_per = -(-max(lens) // page)
        tables = [[1 + i * pages_per + j for j in range(pages_per)] for i in range(len(seqs))]
        kv = KVCache.for_model(cfg, 2 + len(seqs) * pages_per, page, torch.float32, device, with_mtp=True)
        flat = [t for s in seqs for t in s]
        batch = ForwardBatch.build(flat, [0] * len(seqs), lens, tables, page, device=device)
        attn.plan(batch)
        with torch.no_grad():
            hidden = loaded.model(batch, kv, attn)
            p1, main = loaded.model.compute_logits(hidden).softmax(-1).max(-1)
            if not with_mtp:
                return main, None, p1
            nxt = [t for s in seqs for t in [*s[1:], 0]]
            mb = ForwardBatch.build(nxt, [0] * len(seqs), lens, tables, page, device=device)
            assert loaded.mtp is not None
            mtp = loaded.mtp.compute_logits(loaded.mtp(mb, hidden, kv, attn)).argmax(-1)
        return main, mtp, p1

    def agreement(starts: list[list[int]]) -> tuple[float, float, int, list[tuple[float, bool]]]:
        """(on the greedy continuations, on the prompts themselves, positions counted, each continuation
        position's (the main model's top-1 probability of the token the MTP layer drafts, whether it agreed))."""
        seqs = [list(p) for p in starts]
        for _ in range(new_tokens):  # greedy continuations (the whole sequence again each step: small and simple)
            main, _, _ = forward(seqs, with_mtp=False)
            ends = torch.tensor([len(s) for s in seqs]).cumsum(0) - 1
            for s, t in zip(seqs, main[ends.to(main.device)].tolist()):
                s.append(int(t))
        main, mtp, p1 = forward(seqs, with_mtp=True)
        main_p1 = p1.tolist()
        assert mtp is not None
        gen_hits = gen_n = text_hits = text_n = 0
        by_p1: list[tuple[float, bool]] = []
        start = 0
        for s, p in zip(seqs, starts):
            n = len(s)
            m, d = main[start : start + n].tolist(), mtp[start : start + n].tolist()
            for t in range(n - 2):
                if t + 1 >= len(p) - 1:  # continuation: the main model's token at t + 2 is its own greedy choice
                    gen_hits += d[t] == s[t + 2]
                    gen_n += 1
                    by_p1.append((main_p1[start + t + 1], d[t] == s[t + 2]))
                else:  # inside the prompt: the main model's prediction at t + 1
                    text_hits += d[t] == m[t + 1]
                    text_n += 1
            start += n
        return gen_hits / max(1, gen_n), text_hits / max(1, text_n), gen_n + text_n, by_p1

    greedy, on_text, n_text, by_p1 = agreement(prompts)
    chat_greedy, _, n_chat, _ = agreement(chats)
    # Where the MTP layer misses on text: agreement against how sure the main model was of the token it drafts (an
    # MTP layer whose top-1 were a sample of the main model's distribution would agree about p1 in each bin).
    bins = {}
    for lo, hi in ((0.0, 0.3), (0.3, 0.6), (0.6, 0.9), (0.9, 1.01)):
        hits = [hit for p1, hit in by_p1 if lo <= p1 < hi]
        bins[f"{lo:.1f}-{min(hi, 1.0):.1f}"] = [round(len(hits) / max(1, len(by_p1)), 3),
                                                  round(sum(hits) / max(1, len(hits)), 3)]
    return {"mtp_agreement_greedy": round(greedy, 4), "mtp_agreement_text": round(on_text, 4),
            "mtp_agreement_chat_answers": round(chat_greedy, 4), "mtp_positions": n_text + n_chat,
            "main_p1_mean_greedy": round(sum(p for p, _ in by_p1) / max(1, len(by_p1)), 4),
            "mtp_agreement_greedy_by_main_p1": bins}


def table(results: dict[str, Any]) -> str:
    lines = ["| family | n | accuracy | checks |", "|---|---|---|---|"]
    for fam, r in results.items():
        if not isinstance(r, dict) or "accuracy" not in r:
            continue
        checks = ", ".join(f"{k} {v:.0%}" for k, v in r.items() if k not in ("n", "accuracy", "failures"))
        lines.append(f"| {fam} | {r['n']} | {r['accuracy']:.1%} | {checks} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:30000/v1")
    p.add_argument("--num", type=int, default=50, help="questions per family")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--mtp-model-path", default=None, help="also measure MTP agreement on this checkpoint")
    p.add_argument("--mtp-device", default="cpu")
    p.add_argument("--mtp-passages", type=int, default=24, help="held-out passages for the MTP agreement")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--no-server", action="store_true", help="MTP agreement only")
    a = p.parse_args(argv)
    families = tuple(f for f in a.families.split(",") if f)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        p.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    out: dict[str, Any] = {}
    if not a.no_server:
        t0 = time.monotonic()
        results = run(a.base_url.rstrip("/"), questions(a.num, a.seed, families), a.concurrency, a.timeout)
        out = {fam: r.summary() for fam, r in results.items()}
        out["wall_s"] = round(time.monotonic() - t0, 1)
    print(table(out))
    _write(a.json, out)
    if a.mtp_model_path:
        out["mtp"] = mtp_agreement(a.mtp_model_path, num_passages=a.mtp_passages, device=a.mtp_device)
        _write(a.json, out)
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


def _write(path: str | None, out: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    sys.exit(main())
