"""What the model runner keeps of a step between its launch and its result, and the sizes of its per-slot state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from baleen.model.grammar import SlotGrammar
    from baleen.model.sampler import BatchFlags


@dataclass(frozen=True)
class RunnerConfig:
    """Sizes of the per-slot device state."""

    num_slots: int
    page_size: int
    max_context_len: int

    @property
    def max_pages_per_seq(self) -> int:
        return -(-self.max_context_len // self.page_size)


@dataclass
class DeferredSample:
    """A launched step's sampling, waiting for the previous step's tokens: its grammar mask depends on them."""

    logits: torch.Tensor  # [num_sampled, vocab]
    sample_slots: torch.Tensor  # [num_sampled] device
    flags: BatchFlags


@dataclass
class PendingStep:
    """A launched step whose sampled ids are on their way to the host."""

    step_id: int
    num_sampled: int
    host: dict[str, torch.Tensor]  # name -> host tensor being filled by a non-blocking copy
    event: Any  # torch.cuda.Event | None
    top_k: int
    started: float
    sampled_slots: list[int] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (sampled row, message)
    failed: str | None = None  # the step could not run (out of memory): every request in it fails
    # (sampled row, matcher) of its grammar-constrained rows; the matchers accept the step's tokens once
    grammar_rows: list[tuple[int, SlotGrammar]] = field(default_factory=list)
    grammar_accepted: bool = False
    deferred: DeferredSample | None = None  # set: forward queued, sampling waits for `ModelRunner.complete`
    prompt_top_k: int = 0  # width of the prompt logprobs' top tables (host["prompt_top_ids"]), 0: none
    graphed: bool = False  # it replayed the captured graphs (decode or speculative), not an eager forward


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of `t`: on a GPU a pinned buffer the copy is queued into (valid once the stream reaches it), on the
    CPU a clone."""
    if t.device.type == "cpu":
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out
