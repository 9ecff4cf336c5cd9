"""Speculative decoding with DeepSeek's MTP (NextN) layer as the drafter (`--speculative-algorithm EAGLE|NEXTN`).

A request that speculates gets verify rows from the scheduler: `SeqRow(extend_len=1 + k)` with no input ids. A
step then runs, for those rows:

1. **Draft** (`MtpDrafter.draft`): the slot holds its first draft d1 and the MTP hidden state that drafted it
   (left by the previous step). The MTP layer runs k - 1 more one-token steps on its own output
   (`eh_proj([enorm(embed(d_s)); hnorm(g_s)])`, the MTP block, `shared_head.norm`) for d2 .. dk, greedily. A
   grammar request's drafts, d1 included, are the argmax over the tokens its grammar allows there (`draft`'s walk).
2. **Verify**: one target forward over [t, d1 .. dk] at positions L .. L + k (t: the slot's last token, L: the
   latents cached), in the same flat batch as every other row of the step (prefill chunks, plain decode rows).
   Every one of the k + 1 rows is sampled as the request's token number n, n + 1, ... would be (`Sampler.sample`
   with `Ahead`: row j comes after d1 .. dj: its seeded noise, min_new_tokens and penalties count them).
3. **Accept** (`accept`): row j's sample s_j is committed while every earlier row's sample equalled the draft it
   checks (s_i == d_{i+1} for i < j); so 1 .. k + 1 tokens: the accepted drafts and the sample after them.
4. **Draft-extend** (`MtpDrafter.extend`): the MTP layer runs over every token of the step (its own latent layer
   of the KV cache, the step's attention plan), each fed the token that follows it (the sample, for sampled rows)
   and the target's hidden state there. The row of each sequence's last committed token drafts the next d1.

Why this is exact (lossless), for every sampling setting: the sampler draws token number i of a request as
argmax(processed logits + Gumbel noise(seed, i)), a deterministic function of the logits and i. Row j of a verify
step holds the target's logits after the context [..., t, d1 .. dj]; while the drafts so far were accepted, that
context IS the request's output so far, so s_j is exactly the token plain decoding would draw next, with the same
noise; the first mismatch is such a token too, and nothing after it is kept. So a speculating request produces
token for token what it would without speculation (greedy or sampled, with a seed, top-k/top-p/min-p,
penalties), given equal logits; the drafts only decide how many tokens one step commits. For one deterministic
draft token this is rejection sampling with q = one-hot(d): d is kept with probability p(d), and on rejection the
token is drawn from p restricted to the other tokens, renormalised.

The drafter's latents live in the KV cache's MTP layer, in the same pages as the target's (its slots mirror the
target's), so the scheduler's page accounting covers both. NOTE: the latent of the last token of a prefill chunk
that is not the prompt's last is drafted from the next chunk's first token, unknown then; it stays stale (and
prefix-cache hits carry whatever MTP latents their pages got). A stale drafter latent only lowers the accept rate.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import torch

from baleen.kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_ref
from baleen.messages import PREFIX_ON_DEVICE, StepPlan
from baleen.model.batch import ForwardBatch
from baleen.model.sampler import Ahead, row_argmax
from baleen.model.step import to_host

if TYPE_CHECKING:
    from baleen.model.attention import AttentionBackend
    from baleen.model.deepseek import DeepseekMTP
    from baleen.model.grammar import DraftWalk
    from baleen.model.kv_cache import KVCache


@dataclass(frozen=True)
class VerifyLayout:
    """Where each sampled plan row's logits rows are: a plain row has one, a verify row 1 + k (host + device)."""

    starts: np.ndarray  # [num_sampled] first logits row of each sampled plan row
    counts: np.ndarray  # [num_sampled] logits rows of each (1 + drafts)
    ahead: Ahead  # per logits row: the drafts before it
    next_draft: torch.Tensor  # [num_logits] int64: the draft the row's sample is checked against, -1 for none
    segment: torch.Tensor  # [num_logits] int64: the sampled plan row of each logits row
    starts_d: torch.Tensor  # `starts` on the device

    @property
    def has_drafts(self) -> bool:
        return bool((self.counts > 1).any())


def verify_layout(plan: StepPlan, drafts: torch.Tensor, device: torch.device,
                  never_accept: Container[int] = ()) -> VerifyLayout:  # fmt: skip
    """The logits rows of the plan's sampled rows; `drafts` [num_slots + 1, k] the slots' draft tokens. The verify rows
    of the slots in `never_accept` (a custom processor's: it sees each token before the next) check no draft, so
    they commit their first token only."""
    sampled = [r for r in plan.rows if r.sample]
    counts = np.fromiter((r.extend_len if not r.input_ids else 1 for r in sampled), dtype=np.int64, count=len(sampled))
    checked = np.fromiter((0 if r.slot in never_accept else c for r, c in zip(sampled, counts)), dtype=np.int64,
                          count=len(sampled)) if never_accept else counts  # fmt: skip
    starts = np.zeros(len(sampled), dtype=np.int64)
    if len(sampled) > 1:
        np.cumsum(counts[:-1], out=starts[1:])
    total = int(counts.sum())
    segment = np.repeat(np.arange(len(sampled), dtype=np.int64), counts)
    j = np.arange(total, dtype=np.int64) - starts[segment]  # row j of its verify row: after j drafts
    slots = np.fromiter((r.slot for r in sampled), dtype=np.int64, count=len(sampled))[segment]
    kmax = int(counts.max(initial=1)) - 1
    host = torch.from_numpy(np.concatenate([j, slots, segment, checked[segment], starts]))
    j_d, slots_d, seg_d, checked_d, starts_d = host.to(device, non_blocking=True).split([total] * 4 + [len(starts)])
    cols = torch.arange(kmax, device=device)
    ahead_tokens = drafts[slots_d, :kmax] if kmax else torch.zeros(total, 0, dtype=torch.int64, device=device)
    ahead_tokens = ahead_tokens.masked_fill(cols[None, :] >= j_d[:, None], -1)
    # row j checks draft d_{j+1} (column j); the row after the last draft checks none
    nxt = drafts[slots_d, j_d.clamp(max=max(kmax - 1, 0))] if kmax else torch.full_like(j_d, -1)
    next_draft = torch.where(j_d + 1 < checked_d, nxt, -1)
    return VerifyLayout(starts, counts, Ahead(j_d, ahead_tokens), next_draft, seg_d, starts_d)


def accept(tokens: torch.Tensor, layout: VerifyLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which logits rows are committed: row j while rows 0 .. j-1 sampled the drafts they check.

    tokens [num_logits] the samples. Returns (keep [num_logits] bool, num_tokens [num_sampled] int64,
    last [num_sampled] int64: the logits row of each sampled row's last committed token). No host sync.
    """
    miss = (tokens.to(torch.int64) != layout.next_draft).to(torch.int64)
    before = miss.cumsum(0) - miss  # misses strictly before each row, over the whole flat array
    starts = layout.starts_d
    keep = (before - before[starts][layout.segment]) == 0
    num_tokens = torch.zeros(len(layout.starts), dtype=torch.int64, device=tokens.device)
    num_tokens.index_add_(0, layout.segment, keep.to(torch.int64))
    return keep, num_tokens, starts + num_tokens - 1


def committed_rows(
    host: dict[str, np.ndarray], slots: list[int], errors: list[tuple[int, str]]
) -> tuple[list[int], list[tuple[int, str]]]:
    """A finished speculative step's host arrays cut to its committed tokens, in place (`host["keep"]` [logits
    rows] goes); returns the committed tokens' slots and the errors moved from logits rows to sampled plan rows."""
    keep = host.pop("keep").astype(bool)
    row_of = np.repeat(np.arange(len(host["num_tokens"])), host["num_tokens"])  # committed token -> plan row
    first_of = np.cumsum(keep) - 1  # logits row -> its committed index (where kept)
    for name in ("token_ids", "logprobs", "top_ids", "top_logprobs"):
        if name in host:
            host[name] = host[name][keep]
    return [s for s, k in zip(slots, keep) if k], [(int(row_of[first_of[j]]), m) for j, m in errors if keep[j]]


class MtpDrafter:
    """The MTP layer as a chain drafter (topk 1) of `num_steps` tokens, with its per-slot state on the device."""

    def __init__(self, mtp: DeepseekMTP, num_steps: int, num_slots: int, device: torch.device) -> None:
        if num_steps < 1:
            raise ValueError(f"speculative_num_steps must be >= 1, got {num_steps}")
        self.mtp = mtp
        self.num_steps = num_steps
        hidden = mtp.config.hidden_size
        dtype = mtp.eh_proj.weight.dtype
        # slot -> its drafts d1 .. dk (d1 from the last draft-extend, the rest from `draft`); the extra row is
        # the runner's scratch slot
        self.tokens = torch.zeros(num_slots + 1, num_steps, dtype=torch.int64, device=device)
        self.hidden = torch.zeros(num_slots + 1, hidden, dtype=dtype, device=device)  # MTP output that drafted
        # slot -> latents of its committed tokens after its last sampled row: what a verify row planned behind one
        # in flight (SeqRow.prefix_len PREFIX_ON_DEVICE) starts at; written by every speculative step's commit
        self.lens = torch.zeros(num_slots + 1, dtype=torch.int64, device=device)
        # a grammar's bitmask on the drafts: the Triton kernel on CUDA, its torch twin elsewhere (chosen once)
        self.apply_mask = apply_token_bitmask if device.type == "cuda" else apply_token_bitmask_ref

    def resolve(self, plan: StepPlan) -> StepPlan:
        """`plan` with every PREFIX_ON_DEVICE row's prefix read from `lens` (a host sync, when there is one)."""
        unknown = [i for i, r in enumerate(plan.rows) if r.prefix_len == PREFIX_ON_DEVICE]
        if not unknown:
            return plan
        slots = torch.tensor([plan.rows[i].slot for i in unknown], device=self.lens.device)
        rows = list(plan.rows)
        for i, length in zip(unknown, self.lens[slots].tolist()):
            rows[i] = msgspec.structs.replace(rows[i], prefix_len=length)
        return msgspec.structs.replace(plan, rows=rows)

    def draft(self, plan: StepPlan, page_table: torch.Tensor, kv_cache: KVCache, attn: AttentionBackend,
              walk: DraftWalk | None = None) -> None:  # fmt: skip
        """d2 .. dk of every verify row of `plan` (row with extend_len 1 + k and no input ids): k - 1 one-token
        MTP steps, step s at position prefix_len + s - 1, on the MTP's own hidden state.

        With `walk`, the drafts of its slots (grammar requests) are taken under their grammar's mask (model/grammar.py
        `DraftWalk`): d1 again, from the hidden state that drafted it, then each later one. Eager by choice: a mask
        depends on the drafts before it, which only the host's matcher can walk (xgrammar), so each draft step of
        such a row reads its last drafts to the host and uploads a bitmask. The read is queued before the step's MTP
        forward and the fill runs while it runs; only the masking and the argmax wait for it. Steps without grammar
        rows are unchanged: no read, no mask (their verify graphs, `SpecGraphs`, hold no grammar rows at all).

        Under DP attention every rank runs the step count the plan says (`dp_draft_rows`), with no rows if it has
        none there: the MTP layer's MoE exchanges tokens between the DP ranks."""
        rows = [(r.slot, r.prefix_len, r.extend_len - 1) for r in plan.rows if not r.input_ids and r.extend_len > 2]
        steps = len(plan.dp_draft_rows) if plan.dp_num_tokens else max((k for _, _, k in rows), default=1) - 1
        device = self.tokens.device
        ps = kv_cache.page_size
        if walk is not None:
            first = [r.slot for r in plan.rows if not r.input_ids and r.extend_len > 1 and r.slot in walk]
            if first:
                first_d = torch.tensor(first, device=device)
                logits = self.mtp.compute_logits(self.hidden[first_d])  # what the last draft-extend drafted d1 from
                self._mask(logits, walk, first, list(range(len(first))), None)
                self.tokens[first_d, 0] = row_argmax(logits)
        for s in range(1, steps + 1):
            live = [(slot, prefix) for slot, prefix, k in rows if k > s]
            n = len(live)
            slots = np.fromiter((slot for slot, _ in live), dtype=np.int64, count=n)
            pos = np.fromiter((prefix + s - 1 for _, prefix in live), dtype=np.int64, count=n)
            host = torch.from_numpy(np.concatenate([slots, pos, np.arange(n + 1, dtype=np.int64)]))
            slots_d, pos_d, qo_d = host.to(device, non_blocking=True).split([n, n, n + 1])
            constrained = [i for i, (slot, _) in enumerate(live) if slot in walk] if walk is not None else []
            # the grammar rows' drafts d_s, on their way to the host while this step's MTP forward runs
            last = _HostRead(self.tokens[slots_d[constrained], s - 1]) if constrained else None
            max_pages = int(pos.max(initial=0)) // ps + 1
            table = page_table[slots_d, :max_pages]
            out_loc = table[torch.arange(n, device=device), pos_d // ps].to(torch.int64) * ps + pos_d % ps
            seq_lens = (pos + 1).tolist()
            batch = ForwardBatch(
                input_ids=self.tokens[slots_d, s - 1], positions=pos_d, out_loc=out_loc, qo_indptr=qo_d.to(torch.int32),
                seq_lens=(pos_d + 1).to(torch.int32), prefix_lens=pos_d.to(torch.int32), page_table=table,
                logits_indices=qo_d[:n], seq_lens_cpu=seq_lens, extend_lens_cpu=[1] * n, page_size=ps,
                dp_num_tokens=list(plan.dp_draft_rows[s - 1]) if plan.dp_num_tokens else None,
            )  # fmt: skip
            if n:
                attn.plan(batch)
            g = self.mtp(batch, self.hidden[slots_d], kv_cache, attn)
            if n:
                logits = self.mtp.compute_logits(g)
                if last is not None:
                    assert walk is not None
                    self._mask(logits, walk, [live[i][0] for i in constrained], constrained, last.tolist())
                self.tokens[slots_d, s] = row_argmax(logits)
                self.hidden[slots_d] = g

    def _mask(self, logits: torch.Tensor, walk: DraftWalk, slots: list[int], rows: list[int],
              drafts: list[int] | None) -> None:  # fmt: skip
        """-inf in `logits` [n, vocab] rows `rows` wherever the grammar of the slot there forbids the next draft,
        its matcher first advanced over `drafts` (`DraftWalk.mask`)."""
        bitmask = walk.mask(slots, drafts)
        device = logits.device
        if device.type != "cpu":
            bitmask = bitmask.to(device, non_blocking=True)
        self.apply_mask(logits, bitmask, torch.tensor(rows, dtype=torch.int64, device=device))

    def extend(
        self, batch: ForwardBatch, hidden: torch.Tensor, samples: torch.Tensor, last: torch.Tensor,
        sampled_slots: torch.Tensor, kv_cache: KVCache, attn: AttentionBackend,
    ) -> None:  # fmt: skip
        """Run the MTP layer over the step's tokens (the batch the target ran, its attention plan still current).

        hidden [T, H] the target's output; samples [num_logits] the samples at batch.logits_indices; last
        [num_sampled] the logits row of each sampled row's last committed token; sampled_slots [num_sampled].
        Token t is fed the token after it: the next input of its row, or the sample where there is one.
        """
        next_ids = torch.roll(batch.input_ids, -1)  # within a row: the next input; a row's last: overwritten below
        if samples.numel():
            next_ids[batch.logits_indices] = samples.to(torch.int64)
        g = self.mtp(replace(batch, input_ids=next_ids), hidden, kv_cache, attn)
        if not sampled_slots.numel():
            return
        picked = g[batch.logits_indices[last]]
        self.tokens[sampled_slots, 0] = row_argmax(self.mtp.compute_logits(picked))
        self.hidden[sampled_slots] = picked


class _HostRead:
    """A device tensor's copy to the host, started now; `tolist` waits for it (a CPU tensor is read as it is)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.host = to_host(t)
        self.event: torch.cuda.Event | None = None
        if t.device.type != "cpu":
            self.event = torch.cuda.Event()
            self.event.record()

    def tolist(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
