"""The scheduler actor: requests and step results in; plans to every worker rank, token deltas out.

It plans through a `DPRouter` (actors/dp.py): one Scheduler per DP rank, one plan per DP rank each step.
Every rank gets its DP group's plan (all ranks get the same plan without DP attention); the DP groups'
leaders send back StepResults, through as many result channels as there are leaders.

A request with a grammar (structured output) waits here, outside the batch, while the workers compile it: its
grammar goes to every rank at once (CompileGrammars) and the request enters the scheduler when rank 0 answers
(GrammarCompiled), or ends with an "invalid" error (HTTP 400) when the grammar does not compile.

Every `decode_log_interval` decode steps it logs one INFO line (SGLang's --decode-log-interval): running and queued
requests, KV usage, generation throughput, and under speculative decoding the accept length and rate since the
previous line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from baleen.actors.actor import Actor
from baleen.actors.admission import AdmissionError
from baleen.actors.channel import Channel
from baleen.actors.dp import DPRouter
from baleen.actors.policy import MAX_INFLIGHT_PLANS, Scheduler
from baleen.actors.policy_state import DECODE_RESERVE_TOKENS, SchedulerConfig
from baleen.messages import (
    AbortRequest,
    CacheFlushed,
    CompileGrammars,
    FlushCache,
    GrammarCompiled,
    GrammarSpec,
    Message,
    MetricsReport,
    NewRequest,
    RequestOutput,
    Shutdown,
    StepPlan,
    StepResult,
    TokenDeltas,
    WorkerError,
    WorkerReady,
)

METRICS_INTERVAL_S = 0.25
SPEC_COUNTERS = ("num_verify_rows", "num_verify_tokens", "num_draft_tokens", "num_accepted_drafts")

log = logging.getLogger("baleen.scheduler")


@dataclass(frozen=True, kw_only=True)
class SchedulerSettings:
    """How rank 0 builds its scheduler(s) once the workers have sized their KV pool."""

    chunked_prefill_size: int | None
    max_queued_requests: int
    enable_radix_cache: bool
    overlap: bool
    eos_token_ids: tuple[int, ...]
    max_total_tokens: int | None = None
    num_dp: int = 1  # DP attention groups, one Scheduler each
    enable_mixed_chunk: bool = False  # decode rows ride along with prefill chunks (--enable-mixed-chunk)
    mixed_chunk_size: int | None = None  # the prompt tokens of a step with decode rows (--mixed-chunk-size)
    speculative_num_steps: int = 0  # drafts a verify row checks (--speculative-num-steps); 0: no speculation
    decode_log_interval: int = 40  # decode steps between two decode log lines
    decode_reserve_tokens: int = DECODE_RESERVE_TOKENS  # per running request (--schedule-conservativeness scales it)

    def build(self, ready: WorkerReady) -> DPRouter:
        """One Scheduler per DP rank, each over the pool every rank has (the smallest, agreed at start-up)."""
        config = SchedulerConfig(
            page_size=ready.page_size,
            num_pages=ready.num_pages,
            max_running_requests=ready.max_num_slots,
            max_context_len=ready.max_context_len,
            max_total_tokens=self.max_total_tokens,
            chunked_prefill_size=self.chunked_prefill_size,
            enable_mixed_chunk=self.enable_mixed_chunk,
            mixed_chunk_size=self.mixed_chunk_size,
            max_queued_requests=self.max_queued_requests,
            enable_radix_cache=self.enable_radix_cache,
            eos_token_ids=self.eos_token_ids,
            speculative_num_steps=self.speculative_num_steps,
            decode_reserve_tokens=self.decode_reserve_tokens,
        )
        return DPRouter([Scheduler(config) for _ in range(self.num_dp)])


class WorkerFailed(RuntimeError):
    """A worker rank reported an error; the engine fails every request with it."""


class SchedulerActor(Actor[list[StepPlan], None]):
    """Plans steps and keeps up to two in flight when overlap scheduling is on.

    `plans[i]` leads to a rank of DP group `plan_dp_ranks[i]` (default: all of group 0, i.e. no DP attention).
    """

    def __init__(
        self,
        scheduler: Scheduler | DPRouter,
        requests: Channel,
        results: Channel | Sequence[Channel],
        plans: Sequence[Channel],
        deltas: Channel,
        *,
        overlap: bool = True,
        plan_dp_ranks: Sequence[int] | None = None,
        decode_log_interval: int = 40,
    ) -> None:
        results = [results] if isinstance(results, Channel) else list(results)
        super().__init__([requests, *results], name="scheduler")
        self.scheduler = scheduler if isinstance(scheduler, DPRouter) else DPRouter([scheduler])
        self.plans = list(plans)
        self.plan_dp_ranks = list(plan_dp_ranks) if plan_dp_ranks is not None else [0] * len(self.plans)
        if len(self.plan_dp_ranks) != len(self.plans) or not all(
            0 <= d < self.scheduler.num_dp for d in self.plan_dp_ranks
        ):
            raise ValueError(f"plan_dp_ranks {self.plan_dp_ranks} must give each plan channel a DP rank")
        self.deltas = deltas
        self.max_inflight = MAX_INFLIGHT_PLANS if overlap else 1
        self._out: list[RequestOutput] = []
        self._may_schedule = False  # something changed since schedule() last returned None
        self._last_report = 0.0
        self._dirty = True  # metrics changed since the last report
        self._held: dict[tuple[str, str], list[NewRequest]] = {}  # requests waiting for their grammar, by its key
        self._compiles: list[GrammarSpec] = []  # grammars to send to every rank
        self._flushed: list[CacheFlushed] = []  # answers to FlushCache, sent with the next deltas
        self.decode_log_interval = decode_log_interval
        self._num_decode_steps = 0
        self._logged_spec = (0.0,) * len(SPEC_COUNTERS)  # the speculative counters at the last decode log line
        self._logged_steps = (0, 0)  # steps run and steps graphed at the last decode log line

    def busy(self) -> bool:
        return self._may_schedule and self.scheduler.num_inflight < self.max_inflight

    def decide(self, messages: list[Message]) -> list[StepPlan] | None:
        s = self.scheduler
        for msg in messages:
            self._may_schedule = self._dirty = True
            match msg:
                case NewRequest() if msg.sampling.grammar is not None:
                    self._hold(msg, msg.sampling.grammar)
                case NewRequest():
                    self._add(msg)
                case GrammarCompiled():
                    for req in self._held.pop(msg.grammar.key, []):
                        if msg.error is None:
                            self._add(req)
                        else:
                            self._out.append(_error_output(req.rid, msg.error, "invalid"))
                case FlushCache():
                    self._flushed.append(CacheFlushed(*s.flush_cache()))
                case AbortRequest():
                    delta = self._abort_held(msg.rid) or s.abort(msg.rid, msg.reason, msg.matched_stop)
                    if delta is not None:
                        self._out.append(delta)
                case StepResult():
                    self._out.extend(s.process_result(msg))
                case WorkerError():
                    raise WorkerFailed(msg.message)
                case WorkerReady():
                    pass
                case _:
                    raise TypeError(f"scheduler got an unexpected {type(msg).__name__}")
        if not self._may_schedule or s.num_inflight >= self.max_inflight:
            return None
        plan = s.schedule()
        if plan is None:
            self._may_schedule = False
        elif all(not row.input_ids for p in plan for row in p.rows):
            self._num_decode_steps += 1
            if self._num_decode_steps % self.decode_log_interval == 0:
                self._log_decode()
        return plan

    def _log_decode(self) -> None:
        """The periodic decode line; the accept length and rate are those of the verify rows since the last one."""
        m = self.scheduler.metrics()
        spec = tuple(float(m[k]) for k in SPEC_COUNTERS)
        rows, tokens, drafts, accepted = (now - then for now, then in zip(spec, self._logged_spec))
        self._logged_spec = spec
        accept = f", accept len {tokens / rows:.2f}, accept rate {accepted / drafts:.2f}" if rows and drafts else ""
        steps = (int(m["num_steps"]), int(m["num_graphed_steps"]))
        ran, graphed = (now - then for now, then in zip(steps, self._logged_steps))
        self._logged_steps = steps
        # as SGLang's line: True when every step since the last line replayed CUDA graphs
        cuda_graph = str(graphed > 0) if graphed in (0, ran) else f"{graphed}/{ran} steps"
        queued = int(m["num_waiting_requests"]) + sum(map(len, self._held.values()))
        log.info("decode batch: #running-req %d, #queue-req %d, token usage %.2f%s, cuda graph: %s, "
                 "gen throughput %.1f tok/s", m["num_running_requests"], queued, m["token_usage"], accept, cuda_graph,
                 m["gen_throughput"])  # fmt: skip

    def _add(self, req: NewRequest) -> None:
        try:
            self.scheduler.add_request(req)
        except AdmissionError as e:
            self._out.append(_error_output(req.rid, str(e), e.kind))

    def _hold(self, req: NewRequest, grammar: GrammarSpec) -> None:
        """Keep `req` until its grammar is compiled; ask the workers for that grammar once."""
        waiting = self._held.setdefault(grammar.key, [])
        if not waiting:
            self._compiles.append(grammar)
        waiting.append(req)

    def _abort_held(self, rid: str) -> RequestOutput | None:
        for key, waiting in self._held.items():
            for req in waiting:
                if req.rid == rid:
                    waiting.remove(req)
                    if not waiting:
                        del self._held[key]  # its GrammarCompiled finds nothing to release
                    return RequestOutput(rid=rid, finish_reason="abort", prompt_tokens=len(req.input_ids) // 4)
        return None

    async def launch(self, plans: list[StepPlan]) -> None:
        for channel, d in zip(self.plans, self.plan_dp_ranks):
            await channel.send(plans[d])
        return None

    async def finish(self, step: None) -> None:
        return None

    async def receive(self, block: bool) -> list[Message]:
        # Deltas and metrics go out before the loop may sleep, so a client never waits on a full step.
        await self._flush(idle=block)
        return await super().receive(block)

    async def _flush(self, idle: bool) -> None:
        if self._compiles:
            grammars, self._compiles = self._compiles, []
            for channel in self.plans:
                await channel.send(CompileGrammars(grammars))
        if self._out:
            items, self._out = self._out, []
            await self.deltas.send(TokenDeltas(items))
        for answer in self._flushed:
            await self.deltas.send(answer)
        self._flushed.clear()
        now = time.monotonic()
        if self._dirty and (idle or now - self._last_report >= METRICS_INTERVAL_S):
            self._dirty, self._last_report = False, now
            values = {k: float(v) for k, v in self.scheduler.metrics().items()}
            values["num_waiting_requests"] = values.get("num_waiting_requests", 0.0) + sum(map(len, self._held.values()))
            await self.deltas.send(MetricsReport(values))

    async def on_stop(self) -> None:
        await self._flush(idle=True)
        for channel in self.plans:
            await channel.send(Shutdown("scheduler stopped"))


def _error_output(rid: str, message: str, kind: str) -> RequestOutput:
    return RequestOutput(rid=rid, finish_reason="error", error=message, error_kind=kind)
