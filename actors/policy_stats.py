"""What the scheduler counts for /metrics: prompt and cached tokens, generated tokens (and their throughput over a
sliding window), preemptions, failed steps, and speculative decoding's verify rows with their accept ratios.

NOTE: the warm-up's requests are counted in none of them (the scheduler never reports them here).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class SchedulerStats:
    """Counters since start-up, and the tokens generated in the last `window_s` seconds."""

    clock: Callable[[], float] = time.monotonic
    window_s: float = 10.0
    num_preemptions: int = 0
    num_failed_steps: int = 0
    num_prefill_tokens: int = 0  # prefill tokens planned since start (cache hits excluded)
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    last_step_time: float = 0.0
    num_steps: int = 0  # results of steps that ran
    num_graphed_steps: int = 0  # ... that replayed CUDA graphs
    # Speculative decoding, over every verify row whose result arrived
    num_verify_rows: int = 0
    num_verify_tokens: int = 0  # tokens they committed: accepted drafts + the token sampled after them
    num_draft_tokens: int = 0  # drafts they checked
    num_accepted_drafts: int = 0
    start_time: float = field(init=False)
    _gen_window: deque[tuple[float, int]] = field(init=False, default_factory=deque)  # (time, tokens) per step

    def __post_init__(self) -> None:
        self.start_time = self.clock()

    def count_verify_row(self, num_drafts: int, num_committed: int) -> None:
        """A verify row's result: it checked `num_drafts` drafts and committed `num_committed` tokens."""
        self.num_verify_rows += 1
        self.num_verify_tokens += num_committed
        self.num_draft_tokens += num_drafts
        self.num_accepted_drafts += num_committed - 1

    def count_step(self, num_generated: int, forward_time: float, graphed: bool = False) -> None:
        """A step's result: the tokens it generated, how long the workers' forward took, whether it replayed graphs."""
        self.num_steps += 1
        self.num_graphed_steps += graphed
        self._gen_window.append((self.clock(), num_generated))
        self.num_generated_tokens += num_generated
        self.last_step_time = forward_time

    def metrics(self) -> dict[str, float | int]:
        """The counters and the ratios derived from them (cache hit rate, generation throughput, accept ratios)."""
        now = self.clock()
        while self._gen_window and self._gen_window[0][0] < now - self.window_s:
            self._gen_window.popleft()
        span = min(self.window_s, now - self.start_time)
        gen_tokens = sum(n for _, n in self._gen_window)
        prompt = self.num_prompt_tokens
        return {
            "cache_hit_rate": self.num_cached_prompt_tokens / prompt if prompt else 0.0,
            "gen_throughput": gen_tokens / span if span > 0 else 0.0,
            "last_step_time": self.last_step_time,
            "num_preemptions": self.num_preemptions,
            "num_failed_steps": self.num_failed_steps,
            "num_steps": self.num_steps,
            "num_graphed_steps": self.num_graphed_steps,
            **spec_metrics(self.num_verify_rows, self.num_verify_tokens, self.num_draft_tokens, self.num_accepted_drafts),
        }


def spec_metrics(verify_rows: int, verify_tokens: int, draft_tokens: int, accepted_drafts: int) -> dict[str, float | int]:
    """Speculative decoding's counters and ratios: the accept length (tokens committed per verify row, SGLang's
    spec_accept_length) and the accept rate (accepted drafts / drafts checked); 0 before any verify row."""
    return {
        "num_verify_rows": verify_rows,
        "num_verify_tokens": verify_tokens,
        "num_draft_tokens": draft_tokens,
        "num_accepted_drafts": accepted_drafts,
        "spec_accept_length": verify_tokens / verify_rows if verify_rows else 0.0,
        "spec_accept_rate": accepted_drafts / draft_tokens if draft_tokens else 0.0,
    }

