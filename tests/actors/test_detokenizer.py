"""Incremental detokenization: whole characters only, stop strings across token boundaries, specials; the
detokenizer actor as the one owner of the frontend's request state (register, deliver, close, end)."""

from __future__ import annotations

import asyncio
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from baleen.actors.channel import LocalChannel
from baleen.actors.detokenizer import DetokenizerActor, RequestDecoder
from baleen.messages import AbortRequest, RequestOutput, SamplingParams, TokenDeltas

TEXT = "The whale 🐳 sings: héllo 世界! Baleen plates filter krill. 日本語のテキスト and emoji 🎉🎉 end."


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<bos>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    t.train_from_iterator([TEXT] * 4, trainer)
    return t


def _chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        out.append(ids[i : i + n])
        i += n
    return out


def test_deltas_rebuild_text_and_never_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT).ids
    # Multi-byte characters must really span tokens here, or the test proves nothing.
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))
    for seed in range(5):
        dec = RequestDecoder(tok)
        parts = [dec.feed(c).text for c in _chunks(ids, random.Random(seed))]
        parts.append(dec.finish())
        assert all("\ufffd" not in p for p in parts)
        assert "".join(parts) == TEXT


@pytest.mark.parametrize("stop", ["krill", "世界", "🎉", "e 🐳 s"])
def test_stop_string_across_tokens_is_cut(tok: Tokenizer, stop: str) -> None:
    ids = tok.encode(TEXT).ids
    dec = RequestDecoder(tok, stop=["never-there", stop])
    text, matched = "", None
    for i in ids:
        d = dec.feed([i])
        text += d.text
        if d.matched_stop:
            matched = d.matched_stop
            break
    assert matched == stop
    assert text == TEXT[: TEXT.index(stop)]
    assert dec.feed([ids[-1]]).text == "" and dec.finish() == ""


def test_earliest_stop_wins_and_tail_is_released(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT).ids
    dec = RequestDecoder(tok, stop=["krill", "Baleen"])
    out = "".join(dec.feed([i]).text for i in ids)
    assert out == TEXT[: TEXT.index("Baleen")]
    # Without a match, the held-back tail comes out at finish.
    dec = RequestDecoder(tok, stop=["absent-stop-string"])
    out = "".join(dec.feed([i]).text for i in ids) + dec.finish()
    assert out == TEXT


def test_special_tokens_skipped_or_kept(tok: Tokenizer) -> None:
    eos = tok.token_to_id("<eos>")
    ids = [*tok.encode("hello").ids, eos]
    skip = RequestDecoder(tok, skip_special_tokens=True)
    keep = RequestDecoder(tok, skip_special_tokens=False)
    assert skip.feed(ids).text + skip.finish() == "hello"
    assert keep.feed(ids).text + keep.finish() == "hello<eos>"


# ---- the actor: it owns the frontend's request state ----------------------------------------------------


def _actor(tok: Tokenizer) -> tuple[DetokenizerActor, LocalChannel]:
    to_scheduler = LocalChannel()
    return DetokenizerActor(tok, LocalChannel(), to_scheduler, lambda values: None), to_scheduler


def _step(actor: DetokenizerActor, *outputs: RequestOutput) -> None:
    """One decide + launch, as the actor's loop runs them."""
    sends = actor.decide([TokenDeltas(list(outputs))])
    if sends is not None:
        asyncio.run(actor.launch(sends))


def _drain(queue: asyncio.Queue[RequestOutput]) -> list[RequestOutput]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


def test_register_deliver_close(tok: Tokenizer) -> None:
    actor, to_scheduler = _actor(tok)
    ids = tok.encode("hello").ids
    queue = actor.register("a", SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        actor.register("a", SamplingParams())
    assert "a" in actor and len(actor) == 1
    _step(actor, RequestOutput(rid="a", token_ids=ids[:1]), RequestOutput(rid="nobody", token_ids=ids))
    _step(actor, RequestOutput(rid="a", token_ids=ids[1:], finish_reason="length", completion_tokens=len(ids)))
    outs = _drain(queue)
    assert "".join(o.text for o in outs) == "hello" and outs[-1].finish_reason == "length"
    _step(actor, RequestOutput(rid="a", token_ids=ids))  # a row in flight after the finish: dropped
    assert _drain(queue) == [] and to_scheduler.recv_nowait() == []
    assert actor.close("a") is False  # it had finished: nothing to abort
    assert "a" not in actor and actor.close("a") is False


def test_the_stop_token_that_ended_a_request_has_no_text_unless_no_stop_trim(tok: Tokenizer) -> None:
    """As SGLang: the matched stop token (EOS, or a stop_token_ids entry that is a plain token) is cut from the text
    even with skip_special_tokens False; no_stop_trim (/generate) keeps it. Found by loadtest/chaos.py: a JSON
    answer with skip_special_tokens False ended in "<eos>"."""
    eos, dot = tok.token_to_id("<eos>"), tok.encode(".").ids[0]
    actor, _ = _actor(tok)
    cases = {"eos": (SamplingParams(skip_special_tokens=False), eos, "hello"),
             "dot": (SamplingParams(stop_token_ids=[dot]), dot, "hello"),
             "kept": (SamplingParams(skip_special_tokens=False, no_stop_trim=True), eos, "hello<eos>")}
    for rid, (params, stop, want) in cases.items():
        queue = actor.register(rid, params)
        ids = tok.encode("hello").ids
        _step(actor, RequestOutput(rid=rid, token_ids=ids[:1]))
        _step(actor, RequestOutput(rid=rid, token_ids=[*ids[1:], stop], finish_reason="stop", matched_stop=stop))
        assert "".join(o.text for o in _drain(queue)) == want, rid


def test_closing_an_unfinished_request_asks_for_an_abort(tok: Tokenizer) -> None:
    actor, _ = _actor(tok)
    queue = actor.register("b", SamplingParams())
    _step(actor, RequestOutput(rid="b", token_ids=tok.encode("hi").ids))
    assert actor.close("b") is True  # the caller sends the scheduler an AbortRequest
    _step(actor, RequestOutput(rid="b", token_ids=[1], finish_reason="length"))
    assert [o.finish_reason for o in _drain(queue)] == [None]


def test_a_stop_string_ends_the_request_and_aborts_it_in_launch(tok: Tokenizer) -> None:
    actor, to_scheduler = _actor(tok)
    queue = actor.register("c", SamplingParams(stop=["krill"]))
    sends = actor.decide([TokenDeltas([RequestOutput(rid="c", token_ids=tok.encode(TEXT).ids)])])
    assert sends is not None and to_scheduler.recv_nowait() == [] and queue.empty()  # decide sends nothing
    asyncio.run(actor.launch(sends))
    (out,) = _drain(queue)
    assert (out.text, out.finish_reason, out.matched_stop) == (TEXT[: TEXT.index("krill")], "stop", "krill")
    assert to_scheduler.recv_nowait() == [AbortRequest("c", "stop", "krill")]
    assert actor.close("c") is False


def test_end_all_finishes_only_the_unfinished(tok: Tokenizer) -> None:
    actor, _ = _actor(tok)
    done, live = actor.register("done", SamplingParams()), actor.register("live", SamplingParams())
    _step(actor, RequestOutput(rid="done", token_ids=[5], finish_reason="length"))
    _drain(done)
    actor.end_all("error", "the worker died", "internal")
    assert _drain(done) == []
    (out,) = _drain(live)
    assert (out.finish_reason, out.error, out.error_kind) == ("error", "the worker died", "internal")
    actor.end_all("abort")  # again: nothing more for either
    assert _drain(live) == [] and sorted(actor.rids) == ["done", "live"]
