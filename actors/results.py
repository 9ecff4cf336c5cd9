"""Reading a StepResult against the plan it answers: how many tokens each sampled row committed (one, or for a
verify row 1 + its accepted drafts), checked against the plan; the committed tokens' arrays; and the KV lengths
the plan's rows leave each request once its rejected drafts are taken off. The scheduler (actors/policy.py) appends
the tokens and decides what stops."""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from baleen.actors.policy_state import InFlight, Req
from baleen.messages import SamplingParams, StepResult


def committed_counts(result: StepResult, step: InFlight, errors: dict[int, str]) -> list[int]:
    """Tokens each sampled row committed (1 + accepted drafts for a verify row); ValueError for a bad result."""
    num_rows = len(step.sampled)
    counts = _unpack("i", result.num_tokens)
    if counts is None:
        counts = array("i", [1] * num_rows)
    elif len(counts) != num_rows:
        raise ValueError(f"step {step.step_id} sampled {num_rows} rows but the result counts {len(counts)}")
    for i, (n, drafts) in enumerate(zip(counts, step.drafts)):
        if not (0 if i in errors else 1) <= n <= drafts + 1:  # a failed row may commit nothing
            raise ValueError(f"row {i} of step {step.step_id} committed {n} tokens with {drafts} drafts")
    if len(result.token_ids) != 4 * sum(counts):
        raise ValueError(f"step {step.step_id} committed {sum(counts)} tokens but the result has "
                         f"{len(result.token_ids) // 4}")
    return counts.tolist()


def settle_lengths(step: InFlight, counts: list[int], errors: dict[int, str]) -> list[Req]:
    """What the step's rows wrote is done: each current request's done_len (and, after a verify row, kv_len,
    planned with every draft) moves to the latents of committed tokens; the requests whose done_len grew."""
    # Latents a verify row wrote beyond its committed tokens: its rejected drafts (a failed row keeps its first)
    rejected = {req: drafts + 1 - (1 if i in errors else counts[i])
                for i, (req, drafts) in enumerate(zip(step.sampled, step.drafts)) if drafts}
    live: list[Req] = []
    for req, seq, end, rejected_then in step.writes:
        if not req.runs_in(seq):
            continue  # already ended, or preempted since: its next admission recomputes everything
        if req in rejected:
            # NOTE: kv_len also counts a later verify row in flight (planned at this row's end, every draft
            # counted); it moves by what this row rejected, and that row's end by everything rejected since it
            # was planned.
            req.kv_len -= rejected[req]
            req.num_rejected += rejected[req]
        end -= req.num_rejected - rejected_then
        if end > req.done_len:
            req.done_len = end
            live.append(req)
    return live


@dataclass(frozen=True)
class Committed:
    """A result's per-token arrays: the committed tokens of every sampled row, one row after the other."""

    tokens: array  # int32 [num_committed]
    logprobs: array | None  # float32 [num_committed]
    top_k: int
    top_ids: array | None  # int32 [num_committed * top_k]
    top_logprobs: array | None  # float32 [num_committed * top_k]

    @classmethod
    def unpack(cls, result: StepResult) -> Committed:
        tokens = _unpack("i", result.token_ids)
        assert tokens is not None
        return cls(tokens, _unpack("f", result.logprobs), result.top_k, _unpack("i", result.top_ids),
                   _unpack("f", result.top_logprobs))

    def logprobs_of(self, first: int, end: int, sampling: SamplingParams
                    ) -> tuple[list[float] | None, list[list[tuple[int, float]]] | None]:
        """The logprobs and top logprobs of tokens first..end-1, as far as `sampling` asks for them (None: not)."""
        k = self.top_k
        lps = self.logprobs[first:end].tolist() if sampling.logprobs and self.logprobs is not None else None
        tops = None
        if sampling.top_logprobs and self.top_ids is not None and self.top_logprobs is not None:
            tops = [[(self.top_ids[t * k + j], self.top_logprobs[t * k + j])
                     for j in range(min(sampling.top_logprobs, k))] for t in range(first, end)]
        return lps, tops


def take_prompt_logprobs(step: InFlight, result: StepResult) -> None:
    """Append the prompt logprobs a step computed (its rows with lp_targets, in row order) to their requests, unless
    a request ended or was preempted since (it recomputes them)."""
    if not step.prompt_rows:
        return
    lps, k = _unpack("f", result.prompt_logprobs), result.prompt_top_k
    ids, tops = _unpack("i", result.prompt_top_ids), _unpack("f", result.prompt_top_logprobs)
    if lps is None or len(lps) != sum(m for _, _, m in step.prompt_rows):
        raise ValueError(f"step {result.step_id}: prompt logprobs for {len(lps or [])} positions, the plan asked for "
                         f"{sum(m for _, _, m in step.prompt_rows)}")
    at = 0
    for req, seq, m in step.prompt_rows:
        if req.runs_in(seq) and not req.output:
            req.prompt_lp += lps[at : at + m].tolist()
            want = min(req.sampling.top_logprobs, k)
            if want and ids is not None and tops is not None:
                req.prompt_top += [[(ids[t * k + j], tops[t * k + j]) for j in range(want)] for t in range(at, at + m)]
        at += m


def _unpack(typecode: str, b: bytes | None) -> array | None:
    """int32 ("i") or float32 ("f") bytes as an array."""
    if b is None:
        return None
    out = array(typecode)
    out.frombytes(b)
    return out
