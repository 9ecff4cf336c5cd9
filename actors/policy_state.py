"""The scheduling policy's records: its config, each live request's state, and a step's plan while it is built and
while it is in flight (what its result is matched against). Pure data; the decisions are in actors/policy.py."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import NamedTuple

from baleen.actors.radix_cache import RadixNode
from baleen.messages import PageUpdate, SamplingParams, SeqRow, SlotInit

DECODE_RESERVE_TOKENS = 256  # future decode tokens admission keeps per running request (--schedule-conservativeness 1)


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Limits and pool sizes the scheduler plans with."""

    page_size: int
    num_pages: int  # the workers' KV pool, page 0 included (the padding page)
    max_running_requests: int  # = number of device slots
    max_context_len: int
    max_total_tokens: int | None = None  # cap on KV tokens in use; None: the whole pool
    chunked_prefill_size: int | None = 8192  # prefill tokens per step; None: whole prompts
    enable_mixed_chunk: bool = False  # decode rows join prefill steps (whose chunk shrinks by one token per row)
    # With mixed chunks: the most prompt tokens a step that carries decode rows takes (None: the chunk's budget).
    # A mixed step costs its decode rows plus its prompt tokens; fewer of those keep the streams' gaps short.
    mixed_chunk_size: int | None = None
    max_queued_requests: int = 4096
    enable_radix_cache: bool = True
    eos_token_ids: tuple[int, ...] = ()
    # Admission keeps this many future decode tokens per running request (capped by its max_new_tokens)
    # in reserve; growth beyond it is served by preempting the newest request.
    decode_reserve_tokens: int = DECODE_RESERVE_TOKENS
    # Draft tokens a verify row checks (--speculative-num-steps); 0: no speculative decoding, one token a row
    speculative_num_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("page_size", "max_running_requests", "max_context_len", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {self.num_pages}")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ValueError(f"max_total_tokens ({self.max_total_tokens}) must hold one page ({self.page_size})")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size < 1:
            raise ValueError(f"chunked_prefill_size must be >= 1 or None, got {self.chunked_prefill_size}")
        if self.mixed_chunk_size is not None and self.mixed_chunk_size < 1:
            raise ValueError(f"mixed_chunk_size must be >= 1 or None, got {self.mixed_chunk_size}")
        if self.decode_reserve_tokens < 0:
            raise ValueError(f"decode_reserve_tokens must be >= 0, got {self.decode_reserve_tokens}")
        if self.speculative_num_steps < 0:
            raise ValueError(f"speculative_num_steps must be >= 0, got {self.speculative_num_steps}")

    @property
    def mixed_chunk(self) -> bool:
        """Whether decode rows ride along with prefill chunks (as SGLang: only with chunked prefill)."""
        return self.enable_mixed_chunk and self.chunked_prefill_size is not None

    @property
    def reserve_tokens(self) -> int:
        """Tokens kept in reserve beyond a request's current length: the decode reserve, plus the drafts a verify
        row writes ahead of what it commits."""
        return self.decode_reserve_tokens + self.speculative_num_steps

    @property
    def usable_pages(self) -> int:
        """Pages the scheduler may hand out: the pool minus page 0, capped by max_total_tokens."""
        if self.max_total_tokens is None:
            return self.num_pages - 1
        return min(self.num_pages - 1, self.max_total_tokens // self.page_size)


@dataclass(eq=False)
class Req:
    """The scheduler's state for one live request."""

    rid: str
    sampling: SamplingParams
    prompt: array  # int32
    max_len: int  # prompt + the most tokens it may generate
    stop_ids: frozenset[int]
    output: list[int] = field(default_factory=list)
    fill: array = field(default_factory=lambda: array("i"))  # tokens to prefill: prompt + output at admission
    slot: int | None = None  # None while waiting
    pages: list[int] = field(default_factory=list)  # page table: cache-owned pages first, then private ones
    num_cached_pages: int = 0  # leading pages owned by the radix cache, locked through `node`
    node: RadixNode | None = None
    kv_len: int = 0  # tokens whose latents are written, counting plans in flight (a verify row's drafts included)
    done_len: int = 0  # tokens whose latents finished steps wrote (what may enter the radix cache)
    num_inflight: int = 0  # sampled rows in plans whose results have not arrived
    inflight_tokens: int = 0  # the most tokens those rows may commit (1 a row, 1 + drafts a verify row)
    num_unsettled: int = 0  # verify rows in flight: until their results arrive the host's kv_len is an upper bound
    num_rejected: int = 0  # latents of rejected drafts taken off kv_len so far (`results.settle_lengths`)
    admit_seq: int = 0  # larger = admitted more recently (the preemption victim order)
    planned_step: int | None = None  # last step with a row for this request
    max_drafts: int = 0  # drafts its verify rows may carry (0: it decodes one token a row)
    num_verify: int = 0  # verify rows (speculative decoding) whose results it got: SGLang's spec_verify_ct
    cached_tokens: int | None = None  # prompt tokens served by the radix cache at first admission
    finished: bool = False
    warmup: bool = False  # start-up's own request: counted in no statistic, its pages never cached
    # logprob_start_len >= 0: the prompt's logprobs (and top tables) the finished steps computed so far, handed out
    # with the first token; recomputed from the start if it is preempted before then
    prompt_lp: list[float] = field(default_factory=list)
    prompt_top: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def max_new_tokens(self) -> int:
        """The most tokens it may generate (max_new_tokens, or what the context leaves when that was None)."""
        return self.max_len - len(self.prompt)

    @property
    def lp_from(self) -> int | None:
        """The first position whose logits score the next prompt token, while the prompt's logprobs are still owed
        (before the first output token); None when none are."""
        start = self.sampling.logprob_start_len
        if start < 0 or self.output or self.warmup:
            return None
        return max(start, 1) - 1

    def all_tokens(self) -> array:
        """Prompt and every generated token the host knows of."""
        return self.prompt + array("i", self.output)

    def runs_in(self, admit_seq: int) -> bool:
        """Whether it still runs in the admission a plan row was made for (not finished, not preempted since)."""
        return not self.finished and self.slot is not None and self.admit_seq == admit_seq


class Write(NamedTuple):
    """What a plan row leaves in its request's KV cache once its step ran."""

    req: Req
    admit_seq: int  # the admission the row was planned in
    end: int  # kv length after the row, as planned: every draft of its verify rows (and earlier ones) counted
    rejected: int  # `req.num_rejected` when planned: end less what was rejected since is the real length


@dataclass
class PlanBuilder:
    """A step's plan while the scheduler builds it."""

    step_id: int
    rows: list[SeqRow] = field(default_factory=list)
    new_slots: list[SlotInit] = field(default_factory=list)
    page_updates: list[PageUpdate] = field(default_factory=list)
    sampled: list[Req] = field(default_factory=list)  # requests of the sampled rows, in row order
    drafts: list[int] = field(default_factory=list)  # draft tokens of each sampled row (0: not a verify row)
    writes: list[Write] = field(default_factory=list)  # every row's
    prompt_rows: list[tuple[Req, int, int]] = field(default_factory=list)  # rows with lp_targets: req, admit_seq, m
    preempted: bool = False


@dataclass
class InFlight:
    """A plan sent, its result not yet processed."""

    step_id: int
    sampled: list[Req]  # requests of its sampled rows, in row order
    drafts: list[int]  # draft tokens of each sampled row (0: not a verify row)
    writes: list[Write]  # per row
    prompt_rows: list[tuple[Req, int, int]] = field(default_factory=list)  # see PlanBuilder
