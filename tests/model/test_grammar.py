"""Structured output on the worker side: the grammar vocabulary, the compile cache, slot matchers and their
bitmask, and the sampler's mask; random walks through held-out grammars always end in valid output."""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Sequence
from typing import Any

import jsonschema
import pytest
import torch
import xgrammar as xgr
from tokenizers import Tokenizer

from baleen.kernels.token_bitmask import unpack_bitmask
from baleen.messages import GrammarSpec, SamplingParams
from baleen.model.grammar import GrammarCache, GrammarError, GrammarSlots, tokenizer_info
from baleen.model.make_model import tiny_model_path
from baleen.model.sampler import Sampler, SamplingState, TokenMask
from baleen.model.tokenizer_build import TOOL_CALL_TOKENS

VOCAB = 1024  # the tiny model's (its tokenizer has 1000 ids)
EOS = 1

# Held out: written for these tests, bounded so a random walk ends in a few dozen tokens.
SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                      "member": {"type": "boolean"}},
     "required": ["name", "age", "member"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                               "minItems": 1, "maxItems": 3},
                                      "score": {"type": "number", "minimum": -1, "maximum": 1}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer"},
                                                                                 "y": {"type": "integer"}},
                                                "required": ["x", "y"]},
                                      "kind": {"const": "point"}},
     "required": ["point", "kind"]},
    {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,4}$"}, "minItems": 2, "maxItems": 2},
]
REGEXES = [r"(cat|dog|bird)-[0-9]{2,3}", r"[A-Z][a-z]{1,5}( [A-Z][a-z]{1,5}){0,2}\.", r"\d{4}-\d{2}-\d{2}",
           r"(yes|no|maybe)!?"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model_path() / "tokenizer.json"))


@pytest.fixture(scope="module")
def cache(tokenizer: Tokenizer) -> GrammarCache:
    return GrammarCache(tokenizer, VOCAB, [EOS])


def walk(slots: GrammarSlots, spec: GrammarSpec, seed: int, limit: int = 300) -> list[int]:
    """Tokens drawn uniformly among those the grammar allows, until EOS (not included) or `limit`."""
    slots.set_slot(0, spec)
    g = slots.get(0)
    assert g is not None and g.error is None, g and g.error
    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < limit:
        allowed = unpack_bitmask(slots.fill([(0, g)]), VOCAB)[0].nonzero().flatten().tolist()
        token = rng.choice(allowed)
        if token == EOS:
            return out
        g.accept(token)
        assert g.error is None
        out.append(token)
    raise AssertionError(f"the walk did not end within {limit} tokens")


def test_vocabulary_blanks_special_tokens_but_the_kept_ones(tokenizer: Tokenizer) -> None:
    plain = tokenizer_info(tokenizer, VOCAB, [EOS])
    tools = tokenizer_info(tokenizer, VOCAB, [EOS], TOOL_CALL_TOKENS)
    assert plain.vocab_size == VOCAB and plain.stop_token_ids == [EOS]
    markers = {tokenizer.token_to_id(m) for m in TOOL_CALL_TOKENS}
    special = set(plain.special_token_ids)
    assert markers <= special and 0 in special  # BOS and the markers: never text (EOS is the stop token)
    assert set(range(1000, VOCAB)) <= special  # the model's padding ids
    assert not markers & set(tools.special_token_ids)
    assert tokenizer.token_to_id("</think>") not in special  # an ordinary added token stays text


def test_compiles_once_per_key_and_names_bad_grammars(cache: GrammarCache) -> None:
    spec = GrammarSpec("json_schema", json.dumps(SCHEMAS[0]), "response_format.json_schema.schema")
    fut = cache.submit(spec)
    assert cache.submit(GrammarSpec(spec.kind, spec.text, "another field")) is fut  # `what` is not the key
    assert cache.compiled(spec) is fut.result()
    bad = [(GrammarSpec("regex", "[a-", "regex"), r"^regex does not compile: Regex parsing error .*Unclosed"),
           (GrammarSpec("json_schema", '{"type": "foo"}', "response_format.json_schema.schema"),
            r"^response_format.json_schema.schema does not compile: Unsupported type \"foo\""),
           (GrammarSpec("ebnf", 'root ::= "a" |', "ebnf"), r"^ebnf does not compile: EBNF parser error")]
    for spec, message in bad:
        with pytest.raises(GrammarError, match=message):
            cache.compiled(spec)


def test_cache_keeps_the_latest_entries(tokenizer: Tokenizer) -> None:
    small = GrammarCache(tokenizer, VOCAB, [EOS], max_entries=2)
    specs = [GrammarSpec("regex", r, "regex") for r in REGEXES[:3]]
    first = small.submit(specs[0])
    small.submit(specs[1])
    assert small.submit(specs[0]) is first  # a hit moves it to the back
    small.submit(specs[2])  # evicts specs[1]
    assert small.submit(specs[0]) is first
    assert len(small._futures) == 2 and specs[1].key not in small._futures
    small.close()


def test_random_walks_give_valid_output(cache: GrammarCache, tokenizer: Tokenizer) -> None:
    slots = GrammarSlots(cache)
    for i, schema in enumerate(SCHEMAS):
        for seed in range(4):
            text = tokenizer.decode(walk(slots, GrammarSpec("json_schema", json.dumps(schema)), seed + 10 * i))
            jsonschema.validate(json.loads(text), schema)
    for i, pattern in enumerate(REGEXES):
        for seed in range(4):
            text = tokenizer.decode(walk(slots, GrammarSpec("regex", pattern), seed + 10 * i))
            assert re.fullmatch(pattern, text), (pattern, text)
    ebnf = 'root ::= "(" item (", " item)* ")"\nitem ::= [0-9] | "x"'
    for seed in range(4):
        assert re.fullmatch(r"\((\d|x)(, (\d|x))*\)", tokenizer.decode(walk(slots, GrammarSpec("ebnf", ebnf), seed)))


def test_slot_matchers_replay_finish_and_fail(cache: GrammarCache, tokenizer: Tokenizer) -> None:
    slots = GrammarSlots(cache)
    spec = GrammarSpec("regex", "(yes|no)")
    yes = tokenizer.encode("yes", add_special_tokens=False).ids
    slots.set_slot(3, spec, yes)  # a preempted request resumes after "yes"
    g = slots.get(3)
    assert g is not None
    allowed = unpack_bitmask(slots.fill([(0, g)]), VOCAB)[0].nonzero().flatten().tolist()
    assert allowed == [EOS]  # complete: only the stop token
    g.accept(EOS)
    assert g.error is None and not g.plain
    assert unpack_bitmask(slots.fill([(0, g)]), VOCAB)[0].nonzero().flatten().tolist() == [EOS]  # e.g. ignore_eos
    slots.set_slot(4, spec)
    h = slots.get(4)
    assert h is not None
    h.accept(tokenizer.encode("x", add_special_tokens=False).ids[0])  # not allowed: the request will fail
    assert h.error is not None and "rejected token" in h.error
    assert bool(unpack_bitmask(slots.fill([(0, h)]), VOCAB).all())  # its row masks nothing meanwhile
    slots.set_slot(5, GrammarSpec("regex", "[z-a]"))  # compile error: kept on the slot, reported at sampling
    failed = slots.get(5)
    assert failed is not None and failed.error is not None and "does not compile" in failed.error
    slots.clear_slot(3)
    assert slots.get(3) is None and [j for j, _ in slots.rows([9, 4, 3, 5])] == [1, 3]


def test_batch_fill_matches_one_by_one(cache: GrammarCache) -> None:
    slots = GrammarSlots(cache)
    specs = [GrammarSpec("json_schema", json.dumps(s)) for s in SCHEMAS] + [GrammarSpec("regex", r) for r in REGEXES]
    for slot, spec in enumerate(specs):
        slots.set_slot(slot, spec)
    rows = slots.rows(list(range(len(specs))))
    batch = slots.fill(rows)
    for i, row in enumerate(rows):
        assert torch.equal(slots.fill([row])[0], batch[i])



def test_verify_rows_are_masked_as_plain_decoding_would_mask_them(cache: GrammarCache) -> None:
    """A speculative step's rows of one request: row j's mask is the matcher's after the drafts d1 .. dj, i.e. the
    plain walk's j-th mask while the drafts follow the walk; after a draft the grammar rejects, the rows repeat that
    row's mask; past the stop token, only stop tokens; the matchers stand where they stood."""
    slots = GrammarSlots(cache)
    specs = [GrammarSpec("json_schema", json.dumps(SCHEMAS[0])), GrammarSpec("regex", REGEXES[0]),
             GrammarSpec("regex", REGEXES[3])]
    walks = [[*walk(slots, spec, seed), EOS] for seed, spec in enumerate(specs)]
    for slot, spec in enumerate(specs):
        slots.set_slot(slot, spec)
    plain = []  # every walk's masks, one plain fill a token
    for slot, tokens in enumerate(walks):
        g = slots.get(slot)
        assert g is not None
        masks = []
        for t in tokens:
            masks.append(slots.fill([(0, g)])[0])
            g.accept(t)
        masks.append(slots.fill([(0, g)])[0])  # after the stop token: only stop tokens
        plain.append(masks)
        slots.set_slot(slot, spec)  # back to the start
    k = 3
    for start in (0, 2):  # a step in the middle of each walk: advance the matchers to it
        for slot, tokens in enumerate(walks):
            slots.set_slot(slot, specs[slot], tokens[:start])
        rows, drafts, want = [], [], []
        # slot 0: drafts that follow its walk; slot 1: its second draft breaks the grammar; slot 2: a plain row
        for slot in (0, 1):
            g = slots.get(slot)
            assert g is not None
            ds = walks[slot][start : start + k]
            if slot == 1:  # d2: a token the grammar rejects after d1
                allowed = unpack_bitmask(plain[1][start + 1][None], VOCAB)[0]
                ds = [ds[0], int((allowed == 0).nonzero()[0]), ds[2]]
            rows += [(len(rows) + j, g) for j in range(k + 1)]
            drafts += [*ds, -1]
            if slot == 0:
                want += plain[0][start : start + k + 1]
            else:
                want += [plain[1][start], plain[1][start + 1], plain[1][start + 1], plain[1][start + 1]]
        g2 = slots.get(2)
        assert g2 is not None
        rows.append((len(rows), g2))
        drafts.append(-1)
        want.append(plain[2][start])
        got = slots.fill(rows, drafts)
        for i, w in enumerate(want):
            assert torch.equal(got[i], w), (start, i)
        for slot in range(3):  # rolled back: a plain fill sees the step's first mask again
            g = slots.get(slot)
            assert g is not None and torch.equal(slots.fill([(0, g)])[0], plain[slot][start])
    # a walk's last drafts run past its stop token: the row after it allows only stop tokens
    tokens = walks[1]
    slots.set_slot(1, specs[1], tokens[: len(tokens) - 2])
    g = slots.get(1)
    assert g is not None
    got = slots.fill([(0, g), (1, g), (2, g)], [tokens[-2], EOS, -1])
    assert torch.equal(got[0], plain[1][-3]) and torch.equal(got[1], plain[1][-2]) and torch.equal(got[2], plain[1][-1])
    assert unpack_bitmask(got[2:], VOCAB)[0].nonzero().flatten().tolist() == [EOS]
    assert g.plain and torch.equal(slots.fill([(0, g)])[0], plain[1][-3])

def test_draft_walk_masks_each_draft_as_its_verify_row_is_masked(cache: GrammarCache) -> None:
    """The MTP draft loop's masks (DraftWalk): draft d_{j+1}'s is the matcher's after d1 .. dj, the same as the verify
    row that checks it; past the stop token only stop tokens; after a draft the grammar rejects (one not taken under
    the walk), no constraint; the matchers stand where they stood once the walk closes."""
    slots = GrammarSlots(cache)
    specs = [GrammarSpec("json_schema", json.dumps(SCHEMAS[0])), GrammarSpec("regex", REGEXES[0]),
             GrammarSpec("regex", REGEXES[1])]
    walks = [[*walk(slots, spec, seed), EOS] for seed, spec in enumerate(specs)]
    plain = []  # every walk's masks, one plain fill a token
    for slot, (spec, tokens) in enumerate(zip(specs, walks)):
        slots.set_slot(slot, spec)
        g = slots.get(slot)
        assert g is not None
        plain.append([])
        for t in [*tokens, EOS]:
            plain[-1].append(slots.fill([(0, g)])[0])
            g.accept(t)
    k = 3
    for start in (0, 2):
        # slot 0: drafts that follow its walk; slot 1: drafts past its stop token; slot 2: d2 breaks the grammar
        starts = [start, len(walks[1]) - 2, start]
        drafts = [walks[0][start : start + k], [walks[1][-2], EOS, 5], walks[2][start : start + k]]
        allowed = unpack_bitmask(plain[2][start + 1][None], VOCAB)[0]
        drafts[2][1] = int((allowed == 0).nonzero()[0])
        for slot in range(3):
            slots.set_slot(slot, specs[slot], walks[slot][: starts[slot]])
        grammars = {slot: g for slot in range(3) if (g := slots.get(slot)) is not None}
        rows = [(3 * slot + j, grammars[slot]) for slot in range(2) for j in range(k + 1)]
        verify = slots.fill(rows, [d for slot in range(2) for d in [*drafts[slot], -1]])  # slots 0, 1 verified
        with slots.walk(grammars) as draft_walk:
            masks = [draft_walk.mask([0, 1, 2])]  # d1's
            masks += [draft_walk.mask([0, 1, 2], [drafts[s][j] for s in range(3)]) for j in range(k)]
        for j in range(k + 1):
            assert torch.equal(masks[j][0], plain[0][start + j]) and torch.equal(masks[j][0], verify[j]), (start, j)
            assert torch.equal(masks[j][1], plain[1][min(starts[1] + j, len(walks[1]))]), (start, j)
            assert torch.equal(masks[j][1], verify[k + 1 + j]), (start, j)
        assert unpack_bitmask(masks[2][1:2], VOCAB)[0].nonzero().flatten().tolist() == [EOS]
        assert torch.equal(masks[0][2], plain[2][start]) and torch.equal(masks[1][2], plain[2][start + 1])
        assert (masks[2][2] == -1).all() and (masks[3][2] == -1).all()  # lost: its later drafts go unconstrained
        for slot in range(3):  # rolled back
            assert torch.equal(slots.fill([(0, grammars[slot])])[0], plain[slot][starts[slot]]), (start, slot)


def test_verify_rows_take_the_draft_walks_masks(cache: GrammarCache, monkeypatch: pytest.MonkeyPatch) -> None:
    """The verify fill given the draft loop's masks (`DraftWalk.filled`, `known`) gives bit for bit the masks of a
    fresh fill, and fills with xgrammar only each request's row after its last draft; a request whose matcher
    rejected a draft (lost in the walk) gets none of the walk's masks and is filled as before."""
    slots = GrammarSlots(cache)
    specs = [GrammarSpec("json_schema", json.dumps(SCHEMAS[0])), GrammarSpec("regex", REGEXES[0]),
             GrammarSpec("regex", REGEXES[1])]
    walks = [[*walk(slots, spec, seed), EOS] for seed, spec in enumerate(specs)]
    calls: list[Any] = []  # the matcher of each xgrammar fill
    fill = xgr.GrammarMatcher.fill_next_token_bitmask

    def counted(self: Any, *args: Any) -> Any:
        calls.append(self)
        return fill(self, *args)

    k = 3
    for start in (0, 2):
        # slot 0: drafts that follow its walk; slot 1: drafts past its stop token; slot 2: d2 breaks the grammar
        starts = [start, len(walks[1]) - 2, start]
        drafts = [walks[0][start : start + k], [walks[1][-2], EOS, 5], walks[2][start : start + k]]
        for slot in range(3):
            slots.set_slot(slot, specs[slot], walks[slot][: starts[slot]])
        g2 = slots.get(2)
        assert g2 is not None and g2.matcher is not None and g2.matcher.accept_token(drafts[2][0])
        allowed = unpack_bitmask(slots.fill([(0, g2)]), VOCAB)[0]  # after d1
        g2.matcher.rollback(1)
        drafts[2][1] = int((allowed == 0).nonzero()[0])
        grammars = {slot: g for slot in range(3) if (g := slots.get(slot)) is not None}
        with slots.walk(grammars) as draft_walk:
            draft_walk.mask([0, 1, 2])
            for j in range(k - 1):  # d_{j+2}'s mask, the matchers first over d_{j+1}
                draft_walk.mask([0, 1, 2], [drafts[s][j] for s in range(3)])
        filled = draft_walk.filled()
        assert sorted(filled) == [0, 1] and all(len(filled[s]) == k for s in (0, 1))  # lost: slot 2 has none
        rows = [(4 * slot + j, grammars[slot]) for slot in range(3) for j in range(k + 1)]
        flat = [d for slot in range(3) for d in [*drafts[slot], -1]]
        known = [filled[slot][j] if slot in filled and j < k else None for slot in range(3) for j in range(k + 1)]
        want = slots.fill(rows, flat)
        calls.clear()
        with monkeypatch.context() as m:
            m.setattr(xgr.GrammarMatcher, "fill_next_token_bitmask", counted)
            got = slots.fill(rows, flat, known)
        assert torch.equal(got, want), start
        # slot 0: its last row; slot 1: none (its matcher ends within the drafts, stop tokens only); slot 2: all
        assert calls.count(grammars[0].matcher) == 1 and grammars[1].matcher not in calls, start
        assert calls.count(grammars[2].matcher) == 2, start  # rows 0, 1; rows 2, 3 repeat row 1's (d2 rejected)
        for slot in range(3):  # rolled back
            assert torch.equal(slots.fill([(0, grammars[slot])]), want[4 * slot : 4 * slot + 1]), (start, slot)


def sample_masked(sampler: Sampler, logits: torch.Tensor, allowed: torch.Tensor, rows: Sequence[int]) -> Any:
    bits = torch.zeros(len(rows), -(-VOCAB // 32) * 32, dtype=torch.int64)
    bits[:, :VOCAB] = allowed.to(torch.int64)
    words = (bits.view(len(rows), -1, 32) << torch.arange(32)).sum(-1)  # [k, words] int64 holding 32 bits
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    mask = TokenMask(words, torch.tensor(list(rows)))
    return sampler.sample(logits, torch.arange(logits.shape[0]), flags=None, mask=mask)


def test_sampler_applies_the_mask_before_every_filter() -> None:
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_p=0.9, seed=1),
              SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.3, presence_penalty=1.0, seed=2,
                             logprobs=True, top_logprobs=3),
              SamplingParams(temperature=1.0, min_p=0.2, seed=3)]
    state = SamplingState(len(params), VOCAB, "cpu")
    for slot, p in enumerate(params):
        state.set_slot(slot, p, [5, 6, 7])
    sampler = Sampler(state)
    gen = torch.Generator().manual_seed(0)
    for step in range(20):
        logits = torch.randn(len(params), VOCAB, generator=gen) * 4
        allowed = torch.rand(3, VOCAB, generator=gen) < 0.02
        allowed[:, 7] |= step % 2 == 0  # sometimes a penalised token is the best allowed one
        before = logits.clone()
        out = sample_masked(sampler, logits, allowed, [0, 1, 2])
        assert torch.equal(logits, before)  # the caller's logits are left alone
        tokens = out.token_ids.tolist()
        for i in range(3):
            assert allowed[i, tokens[i]], (step, i)
        if out.logprobs is not None:  # raw model logprobs, unmasked
            lp = torch.log_softmax(before.float(), -1)
            assert torch.allclose(out.logprobs, lp.gather(1, out.token_ids.long()[:, None])[:, 0], atol=1e-5)


def test_compile_runs_off_the_caller(tokenizer: Tokenizer) -> None:
    cache = GrammarCache(tokenizer, VOCAB, [EOS])
    started = time.perf_counter()
    fut = cache.submit(GrammarSpec("json_schema", json.dumps(SCHEMAS[1])))
    submitted = time.perf_counter() - started
    fut.result()
    assert submitted < 0.05  # the vocabulary and the grammar are built on the pool's thread
    cache.close()
