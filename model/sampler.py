"""Batched sampling on the device: one call picks the next token of every sampled row, whatever each asked for.

Per-request sampling parameters live in *slots* (device tensors indexed by slot), set once when a request
enters a worker. `Sampler.sample` reads them with one gather per tensor, so a batch can mix greedy, seeded,
top-k/top-p/min-p and penalised rows. It never reads a device value on the host (no `.item()`, `.tolist()`,
`.cpu()`, no Python branch on a tensor): its only branches are on host-side facts kept by `SamplingState`
("does any row of this batch use top-p?"), so the step's single host sync stays the runner's copy of the ids.

Order of operations on a row: [logit processors] -> [logit bias] -> [grammar token mask] -> repetition, frequency, presence
penalties -> greedy argmax or: / temperature -> top-k -> top-p (on the top-k-renormalised distribution) -> min-p
-> Gumbel-max draw. The grammar mask (structured output, model/grammar.py) sets every token its grammar does not
allow to -inf, so no later stage can bring one back.

Seeded noise: the Gumbel noise of (row, vocab id) is a counter-based hash of (request seed, index of the token
being generated, vocab id), so a seeded request draws the same tokens alone or in any batch, in any row order,
with or without overlap scheduling, and after a preemption (the index resumes at len(output_ids)).

Logprobs (`logprobs`, `top_logprobs`) are log_softmax of the RAW model logits: before processors (when they
are passed to `sample`), the grammar mask, penalties and temperature, i.e. what the model believes, as OpenAI's
API reports.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from baleen.kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_ref
from baleen.messages import MAX_LOGIT_BIAS, SamplingParams
from baleen.model.logit_processors import LogitProcessor, apply_logit_processors

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31 (a low-bias xorshift-multiply mixer): the product of a 32-bit value and one of
# them stays below 2**63, so the int64 arithmetic never overflows and every step is a bijection on 32 bits.
_MUL1 = 0x21F0AAAD
_MUL2 = 0x735A2D97
_SEED_SALT = 0x9E3779B9
_VOCAB_SALT = 0x85EBCA6B
_NEG_INF = float("-inf")
_K = TypeVar("_K", str, int)

# Columns of SamplingState.fparams and .iparams.
_TEMP, _TOP_P, _MIN_P, _REP, _FREQ, _PRES = range(6)
_TOP_K, _SEED, _NUM_GEN = range(3)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Hash each int64 element holding a value in [0, 2**32) to another such value (bijective, in place)."""
    x ^= x >> 16
    x *= _MUL1
    x &= _MASK32
    x ^= x >> 15
    x *= _MUL2
    x &= _MASK32
    x ^= x >> 15
    return x


def vocab_keys(vocab_size: int, device: torch.device) -> torch.Tensor:
    """The per-vocab-id half of the noise hash, computed once: [vocab_size] int64."""
    return mix32(torch.arange(vocab_size, dtype=torch.int64, device=device) ^ _VOCAB_SALT)


def gumbel_noise(seeds: torch.Tensor, counters: torch.Tensor, vkeys: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise [n, vocab], a pure function of (seeds[i], counters[i], vocab id) for each row i."""
    key = mix32((seeds & _MASK32) ^ _SEED_SALT)  # [n]
    key = mix32(key ^ ((seeds >> 32) & _MASK32))
    key = mix32(key ^ (counters & _MASK32))
    x = mix32(key[:, None] ^ vkeys[None, :])  # [n, vocab] uniform 32-bit integers
    # u in (0, 1); E = -log(1 - u) ~ Exp(1) keeps full precision where E is small (where winners come from);
    # the clamp keeps E finite so a row with a single allowed token can never lose it to -inf.
    u = (x.to(torch.float32) + 0.5).mul_(2.0**-32).clamp_(max=1.0 - 2.0**-24)
    return u.neg_().log1p_().neg_().log_().neg_()  # -log(E): Gumbel


MAX_BANNED_IDS = 16  # EOS + stop_token_ids a min_new_tokens request can hold back


@dataclass(frozen=True)
class Ahead:
    """Speculative verify rows: row i is sampled after `tokens[i]` ([n, k] int64, -1 padded; `count[i]` [n] of
    them), draft tokens its slot's state has not counted yet (`Sampler.sample`)."""

    count: torch.Tensor  # [n] int64
    tokens: torch.Tensor  # [n, k] int64


@dataclass(frozen=True)
class SampleOutput:
    """The sampled rows' tokens and (when some row asked) logprobs, all on the device."""

    token_ids: torch.Tensor  # [n] int32
    logprobs: torch.Tensor | None = None  # [n] float32, log-prob of each sampled token (raw logits)
    top_ids: torch.Tensor | None = None  # [n, k] int32
    top_logprobs: torch.Tensor | None = None  # [n, k] float32


@dataclass(frozen=True)
class TokenMask:
    """The grammar-constrained rows of a batch and the tokens each may take next, on the device."""

    bitmask: torch.Tensor  # [k, ceil(vocab / 32)] int32, bit t of a row allows token t (xgrammar's layout)
    rows: torch.Tensor  # [k] int64, the logits row each bitmask row masks


@dataclass(frozen=True)
class BatchFlags:
    """Host-known facts about a batch's rows; the sampler skips every stage no row needs."""

    all_greedy: bool
    max_top_k: int  # the largest top-k limit in use, 0 when no row limits top-k
    top_p: bool
    min_p: bool
    penalties: bool
    logprobs: bool
    top_logprobs: int  # k of the top-logprob tables: the largest top_logprobs asked
    min_tokens: bool = False  # some row must not stop yet (min_new_tokens): its stop tokens are masked
    logit_bias: bool = False  # some row adds a logit_bias

    @property
    def plain_greedy(self) -> bool:
        """All greedy, with nothing (penalties, min_tokens, logit bias, logprobs) beyond an argmax per row."""
        return self.all_greedy and not (self.penalties or self.min_tokens or self.logit_bias or self.logprobs
                                        or self.top_logprobs)  # fmt: skip


@dataclass(frozen=True)
class _SlotInfo:
    sampling: bool  # not greedy
    top_k: int | None  # the limit when it filters (1 < top_k < vocab) on a sampling row
    top_p: bool
    min_p: bool
    penalties: bool
    logprobs: bool
    top_logprobs: int
    min_tokens: bool = False
    logit_bias: bool = False


class _Tally:
    """Counts of slots by feature, so batch flags cost O(1) per step (or O(rows) for an exact batch)."""

    def __init__(self) -> None:
        self.num: Counter[str] = Counter()
        self.top_k: Counter[int] = Counter()
        self.top_logprobs: Counter[int] = Counter()

    def add(self, info: _SlotInfo, sign: int = 1) -> None:
        for name in ("sampling", "top_p", "min_p", "penalties", "logprobs", "min_tokens", "logit_bias"):
            if getattr(info, name):
                _bump(self.num, name, sign)
        if info.top_k is not None:
            _bump(self.top_k, info.top_k, sign)
        if info.top_logprobs:
            _bump(self.top_logprobs, info.top_logprobs, sign)

    def empty(self) -> bool:
        """No slot counted for any feature: plain greedy everywhere."""
        return not (self.num or self.top_k or self.top_logprobs)

    def flags(self) -> BatchFlags:
        return BatchFlags(
            all_greedy=self.num["sampling"] == 0,
            max_top_k=max(self.top_k, default=0),
            top_p=self.num["top_p"] > 0,
            min_p=self.num["min_p"] > 0,
            penalties=self.num["penalties"] > 0,
            logprobs=self.num["logprobs"] > 0,
            top_logprobs=max(self.top_logprobs, default=0),
            min_tokens=self.num["min_tokens"] > 0,
            logit_bias=self.num["logit_bias"] > 0,
        )


def _bump(counter: Counter[_K], key: _K, sign: int) -> None:
    counter[key] += sign
    if counter[key] == 0:
        del counter[key]


def _ids(ids: Sequence[int] | bytes, vocab_size: int, what: str) -> torch.Tensor:
    arr = np.frombuffer(ids, dtype=np.int32) if isinstance(ids, bytes) else np.asarray(ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"{what} holds a token id outside [0, {vocab_size}): the tokenizer and the model's "
                         "vocab_size disagree")
    return torch.from_numpy(arr.astype(np.int64))


class SamplingState:
    """Per-slot sampling parameters and penalty counts on the device, plus host-side tallies of them.

    Penalty state ([num_slots, vocab] output counts float32 + prompt-presence mask bool = 5 bytes per entry,
    e.g. 256 slots x 129,280 = 165 MB) is allocated only when a request with penalties first arrives.
    """

    def __init__(self, num_slots: int, vocab_size: int, device: torch.device | str,
                 random_seed: int | None = None, eos_token_ids: Sequence[int] = ()) -> None:
        if num_slots < 1 or vocab_size < 1:
            raise ValueError(f"num_slots and vocab_size must be >= 1, got {num_slots} and {vocab_size}")
        self.num_slots = num_slots
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.rng = random.Random(random_seed)  # seeds for requests that bring none (--random-seed)
        self.eos_token_ids = tuple(eos_token_ids)
        # NOTE: normal (not inference) tensors wherever this is built, so set_slot may write them from anywhere.
        with torch.inference_mode(False):
            # [num_slots, 6]: temperature (0 = greedy), top_p, min_p, repetition, frequency, presence penalty
            self.fparams = torch.zeros(num_slots, 6, dtype=torch.float32, device=self.device)
            # [num_slots, 3]: top_k (vocab_size = no limit), seed (64 bits), tokens generated so far
            self.iparams = torch.zeros(num_slots, 3, dtype=torch.int64, device=self.device)
            self.vocab_keys = vocab_keys(vocab_size, self.device)  # [vocab]
            # min_new_tokens: the count, and the ids masked until it is reached (EOS + stop ids, -1 padded)
            self.min_tokens = torch.zeros(num_slots, dtype=torch.int64, device=self.device)
            self.banned = torch.full((num_slots, MAX_BANNED_IDS), -1, dtype=torch.int64, device=self.device)
            # logit_bias: the ids and what is added to their logits (padding: id 0 plus 0.0)
            self.bias_ids = torch.zeros(num_slots, MAX_LOGIT_BIAS, dtype=torch.int64, device=self.device)
            self.bias_values = torch.zeros(num_slots, MAX_LOGIT_BIAS, dtype=torch.float32, device=self.device)
        self.output_counts: torch.Tensor | None = None  # [num_slots, vocab] float32, allocated lazily
        self.prompt_mask: torch.Tensor | None = None  # [num_slots, vocab] bool, allocated lazily
        self._info: list[_SlotInfo | None] = [None] * num_slots
        self._tally = _Tally()

    @property
    def num_generated(self) -> torch.Tensor:
        """[num_slots] int64: index of each slot's next token, the counter of its seeded noise."""
        return self.iparams[:, _NUM_GEN]

    @property
    def penalty_bytes(self) -> int:
        """Device bytes the penalty state takes once allocated."""
        return self.num_slots * self.vocab_size * 5

    def set_slot(self, slot: int, params: SamplingParams, prompt_ids: Sequence[int] | bytes,
                 output_ids: Sequence[int] | bytes = ()) -> None:
        """Start (or resume, after a preemption, with the tokens it already generated) a request in `slot`."""
        self._check_slot(slot)
        params.check()
        vocab = self.vocab_size
        prompt = _ids(prompt_ids, vocab, "prompt_ids") if params.uses_penalties else None
        output = _ids(output_ids, vocab, "output_ids")
        self.clear_slot(slot)
        greedy = params.is_greedy
        top_k = vocab if params.top_k is None or params.top_k == -1 else min(params.top_k, vocab)
        seed = params.seed if params.seed is not None else self.rng.getrandbits(64)
        seed &= (1 << 64) - 1
        seed -= (1 << 64) if seed >= (1 << 63) else 0  # the same 64 bits as a signed int64
        f = torch.tensor([0.0 if greedy else params.temperature, params.top_p, params.min_p,
                          params.repetition_penalty, params.frequency_penalty, params.presence_penalty])
        i = torch.tensor([top_k, seed, len(output)], dtype=torch.int64)
        self.fparams[slot] = self._to_device(f)
        self.iparams[slot] = self._to_device(i)
        if prompt is not None:
            self._init_penalties(slot, prompt, output)
        banned = [*([] if params.ignore_eos else self.eos_token_ids), *params.stop_token_ids]
        banned = sorted({b for b in banned if 0 <= b < vocab})
        min_tokens = params.min_new_tokens > 0 and bool(banned)
        if min_tokens:
            if len(banned) > MAX_BANNED_IDS:
                raise ValueError(f"min_new_tokens works with at most {MAX_BANNED_IDS} stop token ids, got {len(banned)}")
            row = torch.full((MAX_BANNED_IDS,), -1, dtype=torch.int64)
            row[: len(banned)] = torch.tensor(banned, dtype=torch.int64)
            self.banned[slot] = self._to_device(row)
        # NOTE: always written: a batch with any min_tokens row masks every row by its slot's count, and a count left
        # by the slot's previous request would hold this one's EOS back (found by loadtest/chaos.py).
        self.min_tokens[slot] = params.min_new_tokens if min_tokens else 0
        bias = params.logit_bias or {}
        # NOTE: always written, as min_tokens: a batch with any biased row adds every row's table, and the slot's
        # previous request may have left one
        if not bias:
            self.bias_values[slot].zero_()
        else:
            ids = torch.zeros(MAX_LOGIT_BIAS, dtype=torch.int64)
            ids[: len(bias)] = _ids(list(bias), vocab, "logit_bias")
            values = torch.zeros(MAX_LOGIT_BIAS, dtype=torch.float32)
            values[: len(bias)] = torch.tensor(list(bias.values()), dtype=torch.float32)
            self.bias_ids[slot] = self._to_device(ids)
            self.bias_values[slot] = self._to_device(values)
        info = _SlotInfo(
            sampling=not greedy,
            top_k=top_k if not greedy and top_k < vocab else None,
            top_p=not greedy and params.top_p < 1.0,
            min_p=not greedy and params.min_p > 0.0,
            penalties=params.uses_penalties,
            logprobs=params.logprobs or params.top_logprobs > 0,
            top_logprobs=params.top_logprobs,
            min_tokens=min_tokens,
            logit_bias=bool(bias),
        )
        self._info[slot] = info
        self._tally.add(info)

    def top_logprobs_of(self, slot: int) -> int:
        """The top_logprobs the request in `slot` asked for (0 for an empty slot)."""
        info = self._info[slot]
        return info.top_logprobs if info is not None else 0

    def clear_slot(self, slot: int) -> None:
        """Forget the request in `slot` (a no-op for an empty slot); its device rows are simply overwritten later."""
        self._check_slot(slot)
        info = self._info[slot]
        if info is not None:
            self._tally.add(info, -1)
            self._info[slot] = None

    def flags(self, host_slots: Sequence[int] | None = None) -> BatchFlags:
        """Facts about the batch `host_slots`, or (when None) about every occupied slot, a safe superset.

        O(1) while no occupied slot asks for anything (every count is zero: any batch's flags are the tally's),
        which is every decode step of an all-greedy server; else one pass over the batch's slots.
        """
        if host_slots is None or self._tally.empty():
            return self._tally.flags()
        tally = _Tally()
        for s in host_slots:
            info = self._info[s]
            if info is None:
                raise ValueError(f"slot {s} is sampled but holds no request (set_slot was not called)")
            tally.add(info)
        return tally.flags()

    def _init_penalties(self, slot: int, prompt: torch.Tensor, output: torch.Tensor) -> None:
        if self.output_counts is None or self.prompt_mask is None:
            shape = (self.num_slots, self.vocab_size)
            with torch.inference_mode(False):
                self.output_counts = torch.zeros(shape, dtype=torch.float32, device=self.device)
                self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self.prompt_mask[slot].zero_()
        self.prompt_mask[slot].index_fill_(0, self._to_device(prompt), True)
        self.output_counts[slot].zero_()
        out = self._to_device(output)
        self.output_counts[slot].index_add_(0, out, torch.ones(out.shape, dtype=torch.float32, device=self.device))

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        # NOTE: a blocking host->device copy would wait for the step in flight; pinned + non_blocking does not.
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is outside [0, {self.num_slots}); raise the worker's slot count")


def row_argmax(x: torch.Tensor, num_chunks: int = 128) -> torch.Tensor:
    """argmax over the last dim of x [n, vocab] -> [n] int64, ties to the lowest index.

    A wide row (V3's 129,280 ids) is reduced in two stages: torch reduces one row in one thread block, which
    took 29 us per decode step at batch 1 on the H100; `num_chunks` chunk maxima spread it over the GPU.
    """
    n, vocab = x.shape
    if vocab % num_chunks or vocab < 64 * num_chunks:
        return x.argmax(dim=-1)
    width = vocab // num_chunks
    vals, idx = x.view(n, num_chunks, width).max(dim=-1)  # [n, num_chunks], first max of each chunk
    best = vals.argmax(dim=-1, keepdim=True)  # [n, 1]: the first chunk that holds the row's max
    return (best * width + idx.gather(1, best)).squeeze(1)


class Sampler:
    """Samples the next token of every row of a batch in one pass over [n, vocab], without a host sync."""

    def __init__(self, state: SamplingState) -> None:
        self.state = state
        # the Triton kernel on CUDA, its torch twin elsewhere (chosen once)
        self.apply_mask = apply_token_bitmask if state.device.type == "cuda" else apply_token_bitmask_ref

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, slots: torch.Tensor, host_slots: Sequence[int] | None = None,
               processors: list[tuple[int, LogitProcessor, list[int]]] | None = None,
               flags: BatchFlags | None = None, mask: TokenMask | None = None,
               ahead: Ahead | None = None) -> SampleOutput:
        """Pick one token per row of `logits` [n, vocab] (float32) for the requests in `slots` [n] (device).

        `host_slots` (the same slots on the host) makes the skipped stages exact for this batch; without it
        they are decided over all occupied slots. `processors` are applied to a copy after the raw logprobs are
        taken. `flags` (the caller's `state.flags(host_slots)`, when it has them already) saves recomputing
        them. `mask` bans, in its rows, every token the row's grammar does not allow (after the processors).
        `logits` is not modified. NOTE: a slot appears at most once per call, unless `ahead` is given.

        `ahead` (speculative verify rows): row i comes after `ahead.tokens[i]` (draft tokens its slot's state has
        not counted), so it is sampled as that slot's token number num_generated + ahead.count[i] would be (its
        noise, min_new_tokens, penalties); nothing is recorded: the caller records the tokens it keeps (`record`).
        """
        st = self.state
        n = logits.shape[0]
        if logits.dim() != 2 or logits.shape[1] != st.vocab_size or tuple(slots.shape) != (n,):
            raise ValueError(f"expected logits [n, {st.vocab_size}] and slots [n], got {tuple(logits.shape)} "
                             f"and {tuple(slots.shape)}")
        flags = flags if flags is not None else st.flags(host_slots)
        slots = slots.to(torch.int64)
        raw = logits.float()
        x = raw
        if processors or mask is not None:
            x = raw.clone()
        if processors:
            apply_logit_processors(x, processors)
        if flags.logit_bias:  # rows without one add 0.0 to id 0
            x = x.scatter_add(1, st.bias_ids[slots], st.bias_values[slots])
        if mask is not None:
            self.apply_mask(x, mask.bitmask, mask.rows)
            if processors:
                # NOTE: a processor may force a token the grammar forbids (a thinking budget's "</think>" inside
                # JSON): a row left with no token takes the grammar's mask alone, the grammar wins
                alone = raw.clone()
                self.apply_mask(alone, mask.bitmask, mask.rows)
                x = torch.where(torch.isneginf(x).all(dim=1, keepdim=True), alone, x)
        if flags.penalties:
            x = self.apply_penalties(x, slots, ahead)
        if flags.min_tokens:
            x = self.mask_early_stops(x, slots, ahead)
        if flags.all_greedy:
            tokens = row_argmax(x)  # [n]; the fast path when nothing else is asked is just this
        else:
            tokens = self._draw(x, slots, flags, ahead)
        out = SampleOutput(token_ids=tokens.to(torch.int32))
        if flags.logprobs or flags.top_logprobs:
            out = self._logprobs(raw, tokens, flags.top_logprobs)
        if ahead is None:
            self.record(slots, tokens, flags.penalties)
        return out

    def greedy_tail(self, logits: torch.Tensor, write_slots: torch.Tensor, slot_tokens: torch.Tensor) -> torch.Tensor:
        """`sample` for an all-greedy batch with nothing else asked, without host work (CUDA-graph capturable).

        logits [n, vocab]; write_slots [n] int64: the row's request slot, or an index >= num_slots (a scratch
        entry of slot_tokens) for a row whose token is not kept. Each kept token is stored in
        slot_tokens[slot] and counted like `sample` counts it. Returns the tokens [n] int32.
        """
        st = self.state
        tokens = row_argmax(logits)  # [n] int64
        kept = write_slots < st.num_slots
        st.iparams.view(-1).index_add_(0, torch.where(kept, write_slots, 0) * 3 + _NUM_GEN, kept.to(torch.int64))
        slot_tokens.index_copy_(0, write_slots, tokens)
        return tokens.to(torch.int32)

    def mask_early_stops(self, logits: torch.Tensor, slots: torch.Tensor, ahead: Ahead | None = None) -> torch.Tensor:
        """Logits [n, vocab] with EOS and stop ids at -inf for rows still short of min_new_tokens.

        A row that nothing but those ids could continue (its grammar is complete: only a stop token is allowed)
        keeps them: the grammar ends the output, min_new_tokens cannot lengthen it."""
        st = self.state
        banned = st.banned[slots]  # [n, MAX_BANNED_IDS], -1 padded
        num_generated = st.num_generated[slots] if ahead is None else st.num_generated[slots] + ahead.count
        early = (num_generated < st.min_tokens[slots]).unsqueeze(1) & (banned >= 0)
        # amax: a padding entry (clamped to id 0, False) never un-bans a real id 0
        mask = torch.zeros(logits.shape, dtype=torch.int8, device=logits.device)
        mask.scatter_reduce_(1, banned.clamp(min=0), early.to(torch.int8), reduce="amax")
        out = logits.masked_fill(mask.bool(), float("-inf"))
        return torch.where(torch.isneginf(out).all(dim=1, keepdim=True), logits, out)

    def apply_penalties(self, logits: torch.Tensor, slots: torch.Tensor, ahead: Ahead | None = None) -> torch.Tensor:
        """Logits [n, vocab] after repetition (prompt + output), frequency and presence (output) penalties."""
        st = self.state
        assert st.output_counts is not None and st.prompt_mask is not None, "no slot has asked for penalties"
        counts = st.output_counts[slots]  # [n, vocab] times each token was generated
        if ahead is not None and ahead.tokens.shape[1]:
            drafts = ahead.tokens  # [n, k], -1 padded
            counts.scatter_add_(1, drafts.clamp(min=0), (drafts >= 0).to(counts.dtype))
        generated = counts > 0
        seen = st.prompt_mask[slots] | generated  # [n, vocab]
        fp = st.fparams[slots]  # [n, 6]
        rep = fp[:, _REP, None]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        x = torch.where(seen, penalised, logits)
        return x - fp[:, _FREQ, None] * counts - fp[:, _PRES, None] * generated

    def _draw(self, x: torch.Tensor, slots: torch.Tensor, flags: BatchFlags, ahead: Ahead | None = None) -> torch.Tensor:
        st = self.state
        fp = st.fparams[slots]  # [n, 6]
        ip = st.iparams[slots]  # [n, 3]
        if ahead is not None:
            ip[:, _NUM_GEN] += ahead.count
        temp = fp[:, _TEMP]
        greedy_tokens = row_argmax(x)  # [n]
        scaled = x / torch.where(temp > 0, temp, 1.0)[:, None]  # [n, vocab]
        if flags.max_top_k or flags.top_p:
            scaled = self._top_k_top_p(scaled, ip[:, _TOP_K], fp[:, _TOP_P], flags)
        if flags.min_p:
            # p < min_p * p_max  <=>  logit < max_logit + log(min_p); log(0) = -inf removes nothing
            floor = scaled.amax(dim=-1, keepdim=True) + fp[:, _MIN_P, None].log()
            scaled = scaled.masked_fill(scaled < floor, _NEG_INF)
        scores = gumbel_noise(ip[:, _SEED], ip[:, _NUM_GEN], st.vocab_keys).add_(scaled)  # [n, vocab]
        return torch.where(temp > 0, scores.argmax(dim=-1), greedy_tokens)

    def _top_k_top_p(self, scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     flags: BatchFlags) -> torch.Tensor:
        vocab = scaled.shape[1]
        unlimited = top_k[:, None] >= vocab  # [n, 1]
        if not flags.top_p:
            # top-k alone: one topk at the batch's largest k, then a threshold (ties with the k-th are kept)
            kk = flags.max_top_k
            kth = scaled.topk(kk, dim=-1).values.gather(1, top_k.clamp(max=kk)[:, None] - 1)  # [n, 1]
            return scaled.masked_fill((scaled < kth) & ~unlimited, _NEG_INF)
        vals, order = scaled.sort(dim=-1, descending=True)  # [n, vocab]
        kth = vals.gather(1, top_k.clamp(max=vocab)[:, None] - 1)
        vals = vals.masked_fill((vals < kth) & ~unlimited, _NEG_INF)
        probs = vals.softmax(dim=-1)  # renormalised over the top-k survivors
        mass_before = probs.cumsum(dim=-1) - probs
        # keep the shortest prefix whose mass reaches top_p; rows with top_p = 1 keep all (cumsum rounding)
        drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
        vals = vals.masked_fill(drop, _NEG_INF)
        return torch.empty_like(scaled).scatter_(1, order, vals)

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, k: int) -> SampleOutput:
        lse = raw.logsumexp(dim=-1)  # [n]
        lp = raw.gather(1, tokens[:, None])[:, 0] - lse
        top_ids = top_lp = None
        if k:
            vals, idx = raw.topk(k, dim=-1)  # [n, k]
            top_ids, top_lp = idx.to(torch.int32), vals - lse[:, None]
        return SampleOutput(tokens.to(torch.int32), lp, top_ids, top_lp)

    def record(self, slots: torch.Tensor, tokens: torch.Tensor, penalties: bool, keep: torch.Tensor | None = None) -> None:
        """Count the tokens [n] as generated by their slots [n] (the noise counter; penalties' counts); `keep`
        [n] bool: only those rows (a slot may appear several times)."""
        st = self.state
        ones = torch.ones(slots.shape, dtype=torch.int64, device=slots.device) if keep is None else keep.to(torch.int64)
        st.iparams.view(-1).index_add_(0, slots * 3 + _NUM_GEN, ones)
        if penalties and st.output_counts is not None:
            flat = slots * st.vocab_size + tokens.to(torch.int64)  # [n] into the flattened [num_slots * vocab] counts
            st.output_counts.view(-1).scatter_add_(0, flat, ones.to(torch.float32))
