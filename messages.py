"""Every message the actors exchange: msgspec Structs forming one tagged union.

NOTE: this is a leaf module. It imports nothing else from baleen, so any process can decode any frame.
Token ids travel as int32 `bytes` (np.frombuffer / array('i') on the other side): encoding a list of
ints is 3-4x slower than copying their bytes.
"""

from __future__ import annotations

from typing import Any

import msgspec

# ---- parameters -------------------------------------------------------------------------------------

GRAMMAR_KINDS = ("json_schema", "regex", "ebnf", "structural_tag", "tool_calls")
# Whitespace characters in a row a JSON grammar allows: the frontend writes it into structural tags
# (api/structured.py), the workers compile json_schema grammars with it (model/grammar.py).
JSON_MAX_WHITESPACE = 1


class GrammarSpec(msgspec.Struct, frozen=True, array_like=True):
    """A grammar the output must follow (structured output), compiled by the workers (model/grammar.py).

    kind: "json_schema" (text: a JSON schema), "regex", "ebnf" (xgrammar's EBNF, rule `root`), "structural_tag"
    (text: an xgrammar structural tag as JSON), or "tool_calls" (a structural tag whose output may hold DeepSeek's
    tool-call special tokens). `what` names the request field it came from, for error messages; it is no part of
    the grammar's identity (`key`).
    """

    kind: str
    text: str
    what: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """What compiled grammars are cached and shared by."""
        return self.kind, self.text


MAX_LOGIT_BIAS = 300  # tokens one request's logit_bias may name (the sampler keeps a table this wide per slot)


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to pick and when to stop generating tokens for one request."""

    max_new_tokens: int | None = 128  # None: up to the context length
    min_new_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False  # keep the text of the stop token that ended the output (SGLang's /generate)
    logprobs: bool = False
    top_logprobs: int = 0
    # The prompt's own logprobs (SGLang's logprob_start_len): -1 none; L >= 0 each prompt token's from position L on
    # (position 0 has none), with top_logprobs alternatives; such a request recomputes those positions (no cache).
    logprob_start_len: int = -1
    custom_logit_processor: str | None = None  # a name in the server's registry, never code
    custom_params: dict[str, Any] | None = None
    grammar: GrammarSpec | None = None  # structured output: every token must keep the output inside it
    # OpenAI's logit_bias: added to those tokens' logits before sampling (after custom processors, before the grammar
    # mask and penalties); -100 all but bans a token, +100 all but forces it. Logprobs stay the model's raw ones.
    logit_bias: dict[int, float] | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def check(self) -> None:
        """Raise ValueError naming the parameter that is out of range."""
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or -1 for no limit), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if self.logprob_start_len < -1:
            raise ValueError(f"logprob_start_len must be >= -1, got {self.logprob_start_len}")
        if self.logit_bias is not None:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias holds at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}")
            for token, bias in self.logit_bias.items():
                if token < 0:
                    raise ValueError(f"logit_bias token ids must be >= 0, got {token}")
                if not -100.0 <= bias <= 100.0:
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")
        if self.grammar is not None and self.grammar.kind not in GRAMMAR_KINDS:
            raise ValueError(f"grammar kind must be one of {GRAMMAR_KINDS}, got {self.grammar.kind!r}")


# ---- frontend -> scheduler ------------------------------------------------------------------------


class NewRequest(msgspec.Struct, tag=True, kw_only=True):
    """A tokenized request entering the scheduler (`Engine.generate` checked it with admission.check_request)."""

    rid: str
    input_ids: bytes  # int32
    sampling: SamplingParams
    warmup: bool = False  # start-up's own request (Engine._warm_up): in no statistic, nothing left in the cache


class AbortRequest(msgspec.Struct, tag=True):
    """Stop a request and free its pages (client gone, stop string matched, or an explicit abort)."""

    rid: str
    reason: str = "abort"  # "abort" | "stop"  (a stop string the detokenizer matched)
    matched_stop: str | None = None


class FlushCache(msgspec.Struct, tag=True):
    """Evict every cached prefix no request holds (SGLang's /flush_cache); answered with CacheFlushed."""


# ---- scheduler -> worker ---------------------------------------------------------------------------


class CompileGrammars(msgspec.Struct, tag=True):
    """Start compiling these grammars in the background (every rank); a request waits for its grammar outside
    the batch, and is admitted once rank 0 answers with GrammarCompiled."""

    grammars: list[GrammarSpec]


class GrammarCompiled(msgspec.Struct, tag=True):
    """A worker compiled `grammar` (its requests may run), or could not (`error`: they end with HTTP 400)."""

    grammar: GrammarSpec
    error: str | None = None



class SlotInit(msgspec.Struct, array_like=True):
    """Per-request device state a worker sets up in `slot` before the step runs."""

    slot: int
    rid: str
    sampling: SamplingParams
    prompt_ids: bytes  # int32, for repetition penalties and logit processors
    # int32 tokens generated before a preemption: a recomputed request resumes its penalty counts, its
    # seeded-noise counter and its logit processor's history exactly where it stopped.
    output_ids: bytes = b""


class PageUpdate(msgspec.Struct, array_like=True):
    """Write `pages` (int32) into the slot's page table starting at entry `start`."""

    slot: int
    start: int
    pages: bytes


PREFIX_ON_DEVICE = -1  # SeqRow.prefix_len of a verify row whose prefix only the device knows


class SeqRow(msgspec.Struct, array_like=True):
    """One sequence of the step's flat batch.

    `input_ids` empty means a decode row: its single input token is the one the previous step sampled
    into the slot, still on the device (this is what lets overlap scheduling plan ahead). A decode row with
    `extend_len` = 1 + k (k >= 1) is a speculative verify row: its inputs are the slot's token and the first k
    draft tokens the drafter left in the slot; it commits 1 to k + 1 tokens (`StepResult.num_tokens`).

    A verify row planned while the request's previous verify row is still in flight has `prefix_len`
    PREFIX_ON_DEVICE: how many tokens that row commits is known on the device only, where the drafter keeps each
    slot's committed length (`MtpDrafter.lens`); the runner reads it there (overlap scheduling under speculation).
    """

    slot: int
    prefix_len: int  # latents already cached for this sequence, or PREFIX_ON_DEVICE
    extend_len: int  # new tokens this step (1 for a decode row, 1 + drafts for a verify row)
    input_ids: bytes  # int32 new tokens, or b"" for a decode row
    sample: bool  # sample a token after this row (False for a prefill chunk that is not the last)
    # Prompt logprobs (SamplingParams.logprob_start_len): the logits of the row's positions lp_offset, lp_offset + 1,
    # ... score the prompt tokens `lp_targets` (int32, one a position: the token after it); -1: none asked.
    lp_offset: int = -1
    lp_targets: bytes = b""


class StepPlan(msgspec.Struct, tag=True, kw_only=True):
    """What every worker rank runs for one step."""

    step_id: int
    rows: list[SeqRow]
    new_slots: list[SlotInit] = []
    page_updates: list[PageUpdate] = []
    freed_slots: list[int] = []
    # DP attention: the token count of every DP rank's plan for this step (in DP-rank order), so all ranks
    # agree on the shapes of the MLP gather/scatter without talking; and whether every one of those plans
    # is decode-only (one token over a cached prefix a row) or empty (then every rank replays a CUDA graph of the
    # same padded size: model/runner.py `dp_graph_size`).
    dp_num_tokens: list[int] = []
    dp_all_decode: bool = False
    # ... and under speculative decoding, whether every one of those plans is verify rows of the full k drafts, or
    # empty (then every rank replays the captured verify step of one padded size: model/spec_graphs.py `dp_size_of`),
    # and whether some of those rows take their drafts under a grammar (then every rank runs the draft loop eagerly,
    # the grammar's masks need the host, and replays the verify and draft-extend graphs).
    dp_all_verify: bool = False
    dp_grammar_drafts: bool = False
    # ... and under speculative decoding, for each draft step s = 1, 2, ... (d2, d3, ... of the verify rows), every
    # DP rank's number of verify rows that draft at that step: every rank runs as many MTP steps, idle ones too.
    dp_draft_rows: list[list[int]] = []


class StepResult(msgspec.Struct, tag=True, kw_only=True):
    """Rank 0's sampled tokens for one step, in the order of the plan's sampled rows.

    Each sampled row commits one token, or, for a speculative verify row, `num_tokens[i]` of them (its accepted
    drafts and the token sampled after them); the per-token arrays list them row after row.
    """

    step_id: int
    token_ids: bytes  # int32 [num_committed]
    logprobs: bytes | None = None  # float32 [num_committed], log-prob of each committed token
    top_k: int = 0  # width of the top-logprob tables below
    top_ids: bytes | None = None  # int32 [num_committed, top_k]
    top_logprobs: bytes | None = None  # float32 [num_committed, top_k]
    num_tokens: bytes | None = None  # int32 [num_sampled]: tokens each sampled row committed; None: one each
    # Prompt logprobs of the rows with lp_targets, in row order: float32 [m], and the top tables [m, prompt_top_k]
    prompt_logprobs: bytes | None = None
    prompt_top_k: int = 0
    prompt_top_ids: bytes | None = None
    prompt_top_logprobs: bytes | None = None
    forward_time: float = 0.0  # seconds the worker spent on the step
    # (sampled row, message) for requests whose custom logit processor failed: only they end, with an error
    errors: list[tuple[int, str]] = []
    # Why the step could not run (the GPU ran out of memory); its requests end with an error, the engine goes on
    failed: str | None = None
    graphed: bool = False  # the step replayed captured CUDA graphs (or, with --debug-eager-graphs, their bodies)


class WorkerReady(msgspec.Struct, tag=True, kw_only=True):
    """A worker finished start-up: the KV pool it sized and what it can run."""

    rank: int
    num_pages: int
    page_size: int
    max_context_len: int
    max_num_slots: int


class WorkerError(msgspec.Struct, tag=True, kw_only=True):
    """A worker failed; the engine fails every pending request with this message."""

    rank: int
    message: str


class MetricsReport(msgspec.Struct, tag=True):
    """The scheduler's counters (running/waiting requests, pages, hit rate, tokens/s, step time)."""

    values: dict[str, float]


class CacheFlushed(msgspec.Struct, tag=True):
    """The answer to one FlushCache: the pages the prefix cache gave back, and those it still holds for requests
    in flight (their prefixes stay until those requests end)."""

    num_pages: int
    num_held_pages: int


class Shutdown(msgspec.Struct, tag=True):
    """Stop the receiving actor after it drains what it is doing."""

    reason: str = ""


# ---- scheduler -> detokenizer -> frontend ---------------------------------------------------------


class RequestOutput(msgspec.Struct, array_like=True, kw_only=True):
    """One request's increment since its previous output: what the scheduler sends and `Engine.generate` yields.

    The scheduler fills in the tokens, the finish and the usage; the detokenizer adds `text` (and, when a stop
    string matched, sets finish_reason "stop" and matched_stop) before handing the same object on.
    """

    rid: str
    text: str = ""
    token_ids: list[int] = []
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None
    matched_stop: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None  # set with finish_reason "error"
    error_kind: str | None = None  # "invalid" (HTTP 400) | "overloaded" (503) | "internal" (500)
    # Speculative decoding: verify rows this request ran so far (SGLang's spec_verify_ct); None when it is off
    spec_verify_ct: int | None = None
    # With logprob_start_len L >= 0, on the output that carries the first token: the logprob of each prompt token
    # from position L on (None for position 0, which nothing predicts), and its top_logprobs alternatives ([] there)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class TokenDeltas(msgspec.Struct, tag=True):
    """All requests' outputs from one step, sent as one frame."""

    items: list[RequestOutput]


Message = (
    NewRequest
    | AbortRequest
    | FlushCache
    | CacheFlushed
    | StepPlan
    | StepResult
    | CompileGrammars
    | GrammarCompiled
    | WorkerReady
    | WorkerError
    | MetricsReport
    | Shutdown
    | TokenDeltas
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(frame: bytes | memoryview) -> Message:
    return _decoder.decode(frame)
