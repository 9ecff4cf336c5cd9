"""Structured output on a worker: grammars compiled off the event loop and cached, one matcher per request slot,
and the token bitmask each step's sampler applies to the constrained rows (xgrammar does the grammar work).

Compiling. `GrammarCache.submit(spec)` compiles on a thread pool, once per `spec.key` (kind, text), and keeps
the latest `max_entries` compiled grammars. The scheduler sends every new grammar to every rank as soon as its
request arrives (CompileGrammars) and admits the request only when rank 0 has compiled it (GrammarCompiled), so
a request waiting on a compile never holds up the batch; the other ranks compiled at the same time, and a rank
that is still at it when the request's slot starts waits there (`GrammarSlots.set_slot`).

Matching. A slot's matcher must have accepted every earlier token before it can fill the mask of the next one,
and with overlap scheduling step N's tokens are still on the device when step N+1 is launched. Overlap stays on
for constrained requests; the mask is filled in its slack. `ModelRunner.launch` queues step N+1's forward and
returns with its sampling deferred; the worker waits for step N's sampled ids off its event loop (they reach
the host as the GPU finishes N and starts N+1's forward); `ModelRunner.complete` lets the matchers accept them,
fills and uploads N+1's bitmask and queues N+1's sampler. The host work runs while the GPU runs N+1's forward:
only the sampler waits for the mask. Steps without constrained rows, and constrained steps whose previous tokens
are already in (no overlap, the first step), sample at launch as before.

Speculative steps. A grammar request's verify rows are masked as plain decoding would mask each of their tokens
(`GrammarSlots.fill` with the drafts: row j by the matcher walked over d1 .. dj, then rolled back), and its drafts
are taken under the same masks (`DraftWalk`, in the MTP draft loop), so its grammar accepts every draft. The draft
loop's masks are the verify rows' but the last: the verify fill takes them (`known`) and fills only the row after the
last draft, one xgrammar fill a draft saved.

JSON layout. Whitespace between JSON tokens is free but at most JSON_MAX_WHITESPACE characters at a time (every
grammar kind, xgrammar's max_whitespace_cnt): a model cannot run away in blank lines, and DeepSeek's usual
`{"city": "Qingdao"}` stays natural; multi-line indented JSON is not possible.

Vocabularies. The bitmask covers the model's vocab_size (padding ids past the tokenizer are never allowed).
Special tokens (BOS, EOS, role markers, ...) are blank to xgrammar, so no grammar can put one in the text; EOS
is allowed once the grammar is complete (xgrammar's stop tokens). Grammars of kind "tool_calls" compile against
a second vocabulary in which DeepSeek's tool-call markers are ordinary tokens a grammar may require.

NOTE: every rank of a tensor-parallel group runs the same matchers on the same tokens, so they fill the same
masks and keep sampling the same tokens (see ParallelRunner in model/build.py).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from tokenizers import Tokenizer

from baleen.messages import JSON_MAX_WHITESPACE, GrammarSpec
from baleen.model.tokenizer_build import TOOL_CALL_TOKENS

log = logging.getLogger("baleen.grammar")

_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[20:57:31] /project/cpp/x.cc:94: " before xgrammar's message


class GrammarError(ValueError):
    """A grammar that does not compile; its message names the request field and the problem (HTTP 400)."""


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int],
                   keep: Sequence[str] = ()) -> Any:
    """xgrammar's TokenizerInfo for `tokenizer` and a model of `vocab_size` ids, special tokens blank but `keep`.

    xgrammar reads the vocabulary type (byte-level, byte-fallback, raw) from the tokenizer itself.
    """
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.to_str()))
    stops = list(stop_token_ids) or None
    metadata = json.loads(xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size,
                                                             stop_token_ids=stops).dump_metadata())
    vocab: list[bytes | str] = [""] * vocab_size
    for text, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if i < vocab_size:
            vocab[i] = text
    for i, added in tokenizer.get_added_tokens_decoder().items():
        if added.special and added.content not in keep and i < vocab_size:
            vocab[i] = ""  # never generated inside a grammar: a skip_special_tokens decode would drop it
    return xgr.TokenizerInfo.from_vocab_and_metadata(vocab, json.dumps(metadata))


def _message(spec: GrammarSpec, error: BaseException) -> str:
    text = " ".join(_CPP_PREFIX.sub("", line.strip()) for line in str(error).strip().splitlines() if line.strip())
    what = spec.what or {"json_schema": "the JSON schema", "ebnf": "the EBNF grammar",
                         "tool_calls": "a tool's parameters schema"}.get(spec.kind, f"the {spec.kind}")
    return f"{what} does not compile: {text[:1000] or type(error).__name__}"


class GrammarCache:
    """Compiles GrammarSpecs on a thread pool, once per key, keeping the latest `max_entries` (LRU)."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, stop_token_ids: Sequence[int], *,
                 max_entries: int = 256, max_threads: int = 2) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        self.max_entries = max_entries
        self.max_threads = max_threads
        self.num_words = -(-vocab_size // 32)  # bitmask words per row
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")
        self._futures: OrderedDict[tuple[str, str], Future[Any]] = OrderedDict()
        self._compilers: dict[bool, Any] = {}  # tool-call vocabulary? -> xgr.GrammarCompiler, built on first use
        self._lock = threading.Lock()

    def submit(self, spec: GrammarSpec) -> Future[Any]:
        """The compile of `spec` (started now unless cached); its result is an xgrammar CompiledGrammar, or it
        raises GrammarError. Call from one thread (the worker's event loop)."""
        fut = self._futures.get(spec.key)
        if fut is not None:
            self._futures.move_to_end(spec.key)
            return fut
        fut = self._pool.submit(self._compile, spec)
        self._futures[spec.key] = fut
        while len(self._futures) > self.max_entries:
            self._futures.popitem(last=False)  # a compile still running finishes for whoever holds its future
        return fut

    def compiled(self, spec: GrammarSpec) -> Any:
        """The compiled grammar, waiting for its compile when it has not finished; GrammarError if it failed."""
        fut = self.submit(spec)
        if not fut.done():
            started = time.perf_counter()
            fut.exception()
            log.info("a request's slot waited %.0f ms for its grammar to compile", (time.perf_counter() - started) * 1e3)
        return fut.result()

    def prepare(self) -> None:
        """Import xgrammar and build the plain vocabulary in the background, so the first request does not wait
        for them (a failure shows again, with its message, at the first compile)."""
        self._pool.submit(self._compiler, False)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compiler(self, tool_calls: bool) -> Any:
        with self._lock:
            if tool_calls not in self._compilers:
                import xgrammar as xgr

                if self.tokenizer is None:
                    raise GrammarError("structured output needs the model's tokenizer.json, which this worker lacks")
                started = time.perf_counter()
                info = tokenizer_info(self.tokenizer, self.vocab_size, self.stop_token_ids,
                                      TOOL_CALL_TOKENS if tool_calls else ())  # fmt: skip
                # NOTE: xgrammar's own cache is off: this class keeps the compiled grammars (one copy, LRU).
                self._compilers[tool_calls] = xgr.GrammarCompiler(info, max_threads=self.max_threads,
                                                                  cache_enabled=False)  # fmt: skip
                log.info("grammar vocabulary%s ready in %.2f s", " (tool calls)" if tool_calls else "",
                         time.perf_counter() - started)
            return self._compilers[tool_calls]

    def _compile(self, spec: GrammarSpec) -> Any:
        compiler = self._compiler(spec.kind == "tool_calls")
        started = time.perf_counter()
        try:
            match spec.kind:
                case "json_schema":
                    out = compiler.compile_json_schema(spec.text, max_whitespace_cnt=JSON_MAX_WHITESPACE)
                case "regex":
                    out = compiler.compile_regex(spec.text)
                case "ebnf":
                    out = compiler.compile_grammar(spec.text)
                case "structural_tag" | "tool_calls":
                    out = compiler.compile_structural_tag(spec.text)
                case _:
                    raise ValueError(f"unknown grammar kind {spec.kind!r}")
        except Exception as e:
            raise GrammarError(_message(spec, e)) from None
        log.debug("compiled a %s grammar in %.1f ms", spec.kind, (time.perf_counter() - started) * 1e3)
        return out


class SlotGrammar:
    """One request's matcher: what it has accepted decides the next token's bitmask row."""

    def __init__(self, compiled: Any | None, stop_token_ids: Sequence[int], error: str | None = None) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled) if compiled is not None else None
        self.stop_token_ids = list(stop_token_ids)
        self.error = error  # set: the request ends with this error at its next sampled token

    def accept(self, token: int) -> None:
        """Advance over a sampled token (a no-op once the grammar ended with a stop token, or failed)."""
        if self.error is not None or self.matcher is None or self.matcher.is_terminated():
            return
        if not self.matcher.accept_token(token):
            self.error = f"the grammar rejected token {token}: the output cannot follow its grammar any more"

    @property
    def plain(self) -> bool:
        """Whether `fill` is xgrammar's own (not a failed or finished matcher)."""
        return self.error is None and self.matcher is not None and not self.matcher.is_terminated()

    def fill_special(self, bitmask: torch.Tensor, i: int) -> None:
        """Row i of `bitmask` for a matcher that is not `plain`: all tokens after an error, else (the grammar
        ended, e.g. with ignore_eos) only the stop tokens."""
        if self.error is not None or self.matcher is None:
            bitmask[i] = -1
            return
        bitmask[i] = 0
        for t in self.stop_token_ids:
            bitmask[i, t // 32] |= _bit(t % 32)


def _bit(b: int) -> int:
    """Bit b of an int32 word, as the signed value torch stores."""
    return (1 << b) - (1 << 32 if b == 31 else 0)


class GrammarSlots:
    """The matchers of the requests in each slot, and the bitmask of a step's constrained rows."""

    def __init__(self, cache: GrammarCache, pinned: bool = False) -> None:
        self.cache = cache
        self.pinned = pinned
        self._slots: dict[int, SlotGrammar] = {}
        self._batch: Any = None  # xgr.BatchGrammarMatcher, made on first use

    def __bool__(self) -> bool:
        return bool(self._slots)

    def set_slot(self, slot: int, spec: GrammarSpec, output_ids: Sequence[int] = ()) -> None:
        """Start the matcher of a request entering `slot`; a resumed (preempted) one replays its output."""
        try:
            g = SlotGrammar(self.cache.compiled(spec), self.cache.stop_token_ids)
        except GrammarError as e:
            g = SlotGrammar(None, self.cache.stop_token_ids, str(e))
        for t in output_ids:
            g.accept(t)
        self._slots[slot] = g

    def clear_slot(self, slot: int) -> None:
        """Release the matcher of a finished, aborted or preempted request."""
        self._slots.pop(slot, None)

    def get(self, slot: int) -> SlotGrammar | None:
        return self._slots.get(slot)

    def rows(self, sampled_slots: Sequence[int]) -> list[tuple[int, SlotGrammar]]:
        """(sampled row, matcher) of every constrained row of a step."""
        if not self._slots:
            return []
        return [(j, g) for j, s in enumerate(sampled_slots) if (g := self._slots.get(s)) is not None]

    def fill(self, rows: Sequence[tuple[int, SlotGrammar]], drafts: Sequence[int] | None = None,
             known: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:  # fmt: skip
        """The bitmask [len(rows), num_words] int32 (host; pinned for a CUDA upload) of the rows' next tokens.

        `drafts` [len(rows)] (speculative steps): the draft each row's sample is checked against, -1 for none. A
        request's verify rows are adjacent, one matcher; row j's mask is its matcher's after the drafts d1 .. dj
        (what plain decoding would use had it sampled them), and the matcher is rolled back after. `known`
        [len(rows)], with `drafts`: a verify row's mask [num_words] where the caller has it already (`DraftWalk.filled`),
        copied instead of filled; None to fill.
        NOTE: a known row must be what this fill would give it: its matcher's mask after the drafts before it."""
        bitmask = torch.empty((len(rows), self.cache.num_words), dtype=torch.int32, pin_memory=self.pinned)
        plain: list[Any] = []  # xgr.GrammarMatcher of the rows xgrammar fills
        indices: list[int] = []
        chained: set[int] = set()  # rows filled walking their request's drafts
        if drafts is not None:
            for i in range(len(rows)):
                if drafts[i] >= 0 and i not in chained:
                    chained.update(self._fill_drafts(bitmask, rows, drafts, known, i))
        for i, (_, g) in enumerate(rows):
            if i in chained:
                continue
            if g.plain:
                plain.append(g.matcher)
                indices.append(i)
            else:
                g.fill_special(bitmask, i)
        if len(plain) == 1:
            plain[0].fill_next_token_bitmask(bitmask, indices[0])
        elif plain:
            if self._batch is None:
                import xgrammar as xgr

                self._batch = xgr.BatchGrammarMatcher(self.cache.max_threads)
            self._batch.batch_fill_next_token_bitmask(plain, bitmask, indices)
        return bitmask

    def walk(self, grammars: dict[int, SlotGrammar]) -> DraftWalk:
        """A speculative step's draft loop under these slots' grammars (slot -> its matcher); see DraftWalk."""
        return DraftWalk(self, grammars)

    @staticmethod
    def _fill_drafts(bitmask: torch.Tensor, rows: Sequence[tuple[int, SlotGrammar]], drafts: Sequence[int],
                     known: Sequence[torch.Tensor | None] | None, first: int) -> range:  # fmt: skip
        """Fill one request's verify rows from `first` (its rows run while the matcher is the same and the row
        before checked a draft), copying the `known` ones; returns them."""
        g = rows[first][1]
        end = first + 1
        while end < len(rows) and rows[end][1] is g and drafts[end - 1] >= 0:
            end += 1
        advanced = 0
        for i in range(first, end):
            if known is not None and (row := known[i]) is not None:
                bitmask[i] = row  # the draft loop filled it (the matcher still walks the draft, for the rows after)
            elif g.plain:
                assert g.matcher is not None
                g.matcher.fill_next_token_bitmask(bitmask, i)
            else:
                g.fill_special(bitmask, i)
            d = drafts[i]
            if d < 0 or not g.plain:
                continue  # the last row, or a matcher that no token moves (ended or failed): same mask on
            assert g.matcher is not None
            if not g.matcher.accept_token(d):
                # d breaks the grammar, so this row's sample (masked) is not d: no later row is committed. They
                # still get a mask that allows something, for the sampler.
                bitmask[i + 1 : end] = bitmask[i]
                break
            advanced += 1
        if advanced:
            assert g.matcher is not None
            g.matcher.rollback(advanced)
        return range(first, end)


class DraftWalk:
    """The grammar requests of a speculative step through the MTP draft loop (`MtpDrafter.draft`): each draft is the
    argmax over the tokens its request's grammar allows after the drafts before it, so the grammar accepts every
    draft (the MTP layer drafts what the model would write unconstrained, which inside JSON the grammar often
    forbids). Draft d_{j+1} is taken under the very mask the verify row after d_j gets (`GrammarSlots.fill`), so a
    draft can lose only to the request's own sample, never to its grammar; where the grammar allows one token only,
    that token is the draft.

    The matchers advance over each draft as the loop makes it and are rolled back when the walk closes (a context
    manager): after it they stand where they stood, after the request's committed tokens. The walk keeps the mask
    rows it filled (`filled`): they are the request's verify rows but the last, which `GrammarSlots.fill` copies.
    """

    def __init__(self, slots: GrammarSlots, grammars: dict[int, SlotGrammar]) -> None:
        self._slots = slots
        self.grammars = grammars  # slot -> its request's matcher, standing after every committed token
        self._advanced = dict.fromkeys(grammars, 0)  # slot -> drafts its matcher accepted in this walk
        self._lost: set[int] = set()  # slots whose matcher rejected a draft: their later drafts go unconstrained
        # slot -> the host mask row [num_words] int32 of each of its drafts, d1's first (a view of `mask`'s bitmask)
        self._filled: dict[int, list[torch.Tensor]] = {slot: [] for slot in grammars}

    def __contains__(self, slot: int) -> bool:
        return slot in self.grammars

    def __enter__(self) -> DraftWalk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def mask(self, slots: Sequence[int], drafts: Sequence[int] | None = None) -> torch.Tensor:
        """The bitmask [len(slots), num_words] int32 (host; pinned for a CUDA upload) of the slots' next drafts, each
        matcher first advanced over its entry of `drafts` [len(slots)] (the drafts just made; None before d1)."""
        rows = []
        for i, slot in enumerate(slots):
            g = self.grammars[slot]
            if drafts is not None and g.plain and slot not in self._lost:
                assert g.matcher is not None
                if g.matcher.accept_token(drafts[i]):
                    self._advanced[slot] += 1
                else:  # not a draft taken under this walk's last mask: nothing after it is committed
                    self._lost.add(slot)
            rows.append((i, g))
        bitmask = self._slots.fill(rows)
        for i, slot in enumerate(slots):
            if slot in self._lost:
                bitmask[i] = -1
            else:
                self._filled[slot].append(bitmask[i])
        return bitmask

    def filled(self) -> dict[int, list[torch.Tensor]]:
        """Each slot's masks of its drafts d1 .. dk, rows [num_words] int32 (host): its verify rows 0 .. k - 1's, by
        `GrammarSlots.fill`'s rule (`known`); none for a slot whose matcher rejected a draft (its verify rows are
        filled as before: they repeat the rejecting row's mask where this walk left the rest unconstrained)."""
        return {slot: rows for slot, rows in self._filled.items() if slot not in self._lost}

    def close(self) -> None:
        """Roll every matcher back over the drafts it accepted."""
        for slot, n in self._advanced.items():
            if n:
                matcher = self.grammars[slot].matcher
                assert matcher is not None
                matcher.rollback(n)
            self._advanced[slot] = 0
