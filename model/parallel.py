"""Ranks, process groups and the collectives of a model spread over several ranks (torch.distributed).

Layout: `tp_size` ranks over all nodes run one model; global rank r is tp_rank r, node r // ranks_per_node,
local rank (GPU) r % ranks_per_node. Without DP attention every rank sees every token: attention heads, MLP
and MoE widths (or experts, with EP) and the vocabulary are split over all ranks and partial sums are
all-reduced. With DP attention (dp_size > 1) the ranks form dp_size consecutive DP groups of
attn_tp_size = tp_size // dp_size ranks. A DP group runs attention for its own requests only, heads split
over its ranks, with its own KV cache; every MLP/MoE block runs over ALL ranks on the tokens of all DP
groups: hidden states are gathered before it and its partial sums reduce-scattered back after it.

NCCL on GPU, gloo on CPU. The collectives below are identities on a group of one rank, so the single-GPU
path never touches torch.distributed.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

from baleen.model.config import ModelConfig, ParallelConfig

log = logging.getLogger("baleen.parallel")

DEFAULT_DIST_TIMEOUT_S = 1800.0  # long enough for a slow first load of 700 GB of weights

# torch >= 2.13 renamed the single-tensor collectives (the old names warn); the GPU box runs 2.11.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


# ---- joining the other ranks ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInit:
    """Where and how long the ranks meet: rank 0's rendezvous address (--dist-init-addr), --dist-timeout."""

    host: str
    port: int
    timeout_s: float = DEFAULT_DIST_TIMEOUT_S
    nnodes: int = 1

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_dist_addr(addr: str) -> tuple[str, int]:
    """'10.0.0.1:5000' (or '[::1]:5000') -> (host, port), with an error a user can act on."""
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--dist-init-addr must be HOST:PORT (rank 0's node and a free port), got {addr!r}")
    return host, int(port)


def rank_layout(
    model: ModelConfig,
    *,
    tp_size: int,
    dp_size: int = 1,
    ep_size: int = 1,
    nnodes: int = 1,
    node_rank: int = 0,
    enable_dp_attention: bool = False,
    pad_uneven: bool = False,
) -> ParallelConfig:
    """Rank 0's ParallelConfig from --tp/--dp/--ep-size/--nnodes, checked with messages that name the flags.

    `pad_uneven` (CPU serving, as SGLang): attention heads and MLP widths that the ranks do not divide are
    zero-padded (`ModelConfig.padded_for_tp`) instead of refused."""
    tp, dp, ep = tp_size, dp_size, ep_size
    if min(tp, dp, ep, nnodes) < 1:
        raise ValueError(f"--tp, --dp, --ep-size and --nnodes must be >= 1, got {tp}, {dp}, {ep}, {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank {node_rank} must be in 0..{nnodes - 1} (--nnodes {nnodes})")
    if tp % nnodes:
        raise ValueError(f"--tp {tp} counts the GPUs of all nodes: it must be a multiple of --nnodes {nnodes}")
    if dp > 1 and not enable_dp_attention:
        raise ValueError(
            f"--dp {dp} without --enable-dp-attention (independent model replicas) is not supported: add "
            "--enable-dp-attention, or run one server per replica behind a load balancer"
        )
    if tp % dp:
        raise ValueError(f"--enable-dp-attention needs --tp ({tp}) to be a multiple of --dp ({dp})")
    if tp % ep:
        raise ValueError(f"--ep-size {ep} must divide --tp {tp}")
    uneven = "; choose sizes that divide it (on CPU such splits are zero-padded, as SGLang does)"
    if model.num_attention_heads % (tp // dp) and not pad_uneven:
        raise ValueError(
            f"the model's {model.num_attention_heads} attention heads cannot be split over {tp // dp} ranks "
            f"(--tp {tp} / --dp {dp}){uneven}"
        )
    if model.n_routed_experts is not None and model.n_routed_experts % ep:
        raise ValueError(f"the model's {model.n_routed_experts} routed experts cannot be split over --ep-size {ep}")
    # The MLP widths split over every rank (MoE experts over the tp / ep ranks that share an expert set).
    widths: list[tuple[str, int, int]] = []
    if any(not model.is_moe_layer(i) for i in range(model.num_hidden_layers)):
        widths.append(("intermediate_size", model.intermediate_size, tp))
    if model.n_routed_experts is not None:
        widths.append(("moe_intermediate_size", model.moe_intermediate_size, tp // ep))
        if model.n_shared_experts:
            widths.append(("n_shared_experts x moe_intermediate_size", model.n_shared_experts * model.moe_intermediate_size, tp))
    for field, size, ranks in widths:
        if size % ranks and not pad_uneven:
            raise ValueError(
                f"the model's {field}={size} cannot be split over {ranks} ranks (--tp {tp}, --ep-size {ep}){uneven}"
            )
    parallel = ParallelConfig(tp_size=tp, ep_size=ep, dp_size=dp)
    padded = model.padded_for_tp(parallel) if pad_uneven else model
    if padded is not model:
        log.info("--tp %d: attention heads %d -> %d, intermediate sizes %d -> %d (dense), %d -> %d (MoE), zero-padded "
                 "so that every rank gets an equal share", tp, model.num_attention_heads, padded.num_attention_heads,
                 model.intermediate_size, padded.intermediate_size, model.moe_intermediate_size,
                 padded.moe_intermediate_size)  # fmt: skip
        per_rank = padded.num_attention_heads // (tp // dp)
        if padded.num_attention_heads - model.num_attention_heads >= per_rank:
            log.warning("--tp %d: some ranks hold only zero-padded attention heads (%d real heads, %d a rank): their "
                        "attention work is wasted; a --tp that divides the heads, or fewer ranks, serves faster",
                        tp, model.num_attention_heads, per_rank)  # fmt: skip
    return parallel


def dist_init(addr: str | None, timeout_s: float | None, nnodes: int = 1) -> DistInit:
    """Where the ranks meet: --dist-init-addr, or a free loopback port when all ranks are on this node."""
    if addr is not None:
        host, port = parse_dist_addr(addr)
    elif nnodes > 1:
        raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address, the same on every node)")
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            host, port = sock.getsockname()
    return DistInit(host, port, timeout_s or DEFAULT_DIST_TIMEOUT_S, nnodes)


def init_distributed(init: DistInit, rank: int, world_size: int, device: torch.device) -> Any:
    """Join the process group (NCCL on CUDA, gloo on CPU); returns the rendezvous TCPStore (a c10d Store)."""
    timeout = timedelta(seconds=init.timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        store = dist.TCPStore(init.host, init.port, world_size, is_master=rank == 0, timeout=timeout)
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    except (RuntimeError, dist.DistError) as e:  # DistStoreError / DistNetworkError on a missing peer
        raise TimeoutError(
            f"rank {rank} of {world_size} could not meet the other ranks at {init.address} within "
            f"--dist-timeout {init.timeout_s:g} s ({type(e).__name__}: {str(e).strip().splitlines()[0]}). "
            f"Start all {init.nnodes} node(s) with the same --dist-init-addr (node 0's address), --nnodes and "
            "--tp, each with its own --node-rank; raise --dist-timeout if start-up is slow"
        ) from e
    return store


def destroy_distributed() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- one group's collectives ---------------------------------------------------------------------------
class Comm:
    """Collectives over one process group of `size` ranks (`group` None: the default group)."""

    def __init__(self, size: int = 1, rank: int = 0, group: Any = None) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in a group of {size}")
        self.size = size
        self.rank = rank
        self.group = group

    def __repr__(self) -> str:
        return f"Comm(size={self.size}, rank={self.rank})"

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or "max"/"min") over the ranks, in place; returns x."""
        if self.size > 1:
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            dist.all_reduce(x, op=ops[op], group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's equally shaped x, concatenated along `dim` in rank order."""
        if self.size == 1:
            return x
        return torch.cat(self.all_gather_stack(x).unbind(0), dim=dim)

    def all_gather_stack(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, *s] from every rank -> [size, N, *s]."""
        if self.size == 1:
            return x.unsqueeze(0)
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))  # gloo wants the concatenated form
        _all_gather_single(out, x.contiguous(), group=self.group)
        return out.view(self.size, *x.shape)

    def reduce_scatter_stack(self, x: torch.Tensor) -> torch.Tensor:
        """x [size, N, *s] on every rank -> [N, *s]: the sum over ranks of block `rank`."""
        if self.size == 1:
            return x[0]
        out = x.new_empty(x.shape[1:])
        _reduce_scatter_single(out, x.reshape(-1, *x.shape[2:]).contiguous(), group=self.group)
        return out

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest `value` over the ranks (start-up agreements such as the KV pool size)."""
        t = torch.tensor([value], dtype=torch.int64, device=device)
        return int(self.all_reduce(t, "min").item())


@dataclass(frozen=True)
class ParallelGroups:
    """The groups one rank's model talks over: `tp` (all ranks) and `attn` (its DP group, or all ranks)."""

    parallel: ParallelConfig
    tp: Comm
    attn: Comm

    @property
    def dp_attention(self) -> bool:
        return self.parallel.dp_size > 1

    @property
    def attn_tp_size(self) -> int:
        return self.parallel.tp_size // self.parallel.dp_size

    @property
    def dp_rank(self) -> int:
        """This rank's DP group (0 without DP attention)."""
        return self.parallel.tp_rank // self.attn_tp_size

    @property
    def attn_parallel(self) -> ParallelConfig:
        """Where this rank sits among the ranks that split one DP group's attention heads."""
        return ParallelConfig(tp_rank=self.attn.rank, tp_size=self.attn.size)

    @classmethod
    def default(cls, parallel: ParallelConfig) -> ParallelGroups:
        """Groups that need no dist.new_group: all ranks share the default group (or attention is local)."""
        a = parallel.tp_size // parallel.dp_size
        if parallel.dp_size > 1 and a > 1:
            raise ValueError(
                f"DP attention with {a} ranks per DP group needs its own process groups: build the model "
                "with ParallelGroups.create() after init_distributed()"
            )
        tp = Comm(parallel.tp_size, parallel.tp_rank)
        return cls(parallel, tp, tp if parallel.dp_size == 1 else Comm())

    @classmethod
    def create(cls, parallel: ParallelConfig) -> ParallelGroups:
        """The groups of this rank; collective: every rank calls it, in the same order, after init."""
        a = parallel.tp_size // parallel.dp_size
        if parallel.dp_size == 1 or a == 1:
            return cls.default(parallel)
        mine = None
        for d in range(parallel.dp_size):  # NOTE: new_group is collective even for ranks outside it
            group = dist.new_group(list(range(d * a, (d + 1) * a)))
            if d == parallel.tp_rank // a:
                mine = group
        tp = Comm(parallel.tp_size, parallel.tp_rank)
        return cls(parallel, tp, Comm(a, parallel.tp_rank % a, mine))


# ---- around each MLP / MoE block -------------------------------------------------------------------------
class MlpExchange(Protocol):
    """How tokens reach a tensor-parallel MLP/MoE block and how its partial sums come back."""

    def gather(self, x: torch.Tensor, dp_num_tokens: list[int] | None) -> torch.Tensor:
        """This rank's tokens [T, H] -> the block's input rows."""
        ...

    def combine(self, y: torch.Tensor, dp_num_tokens: list[int] | None) -> torch.Tensor:
        """The block's partial output (this rank's shard of the sum) -> this rank's finished rows [T, H]."""
        ...


class TensorParallelExchange:
    """Every rank holds the same tokens: nothing to gather; partial sums are all-reduced."""

    def __init__(self, tp: Comm) -> None:
        self.tp = tp

    def gather(self, x: torch.Tensor, dp_num_tokens: list[int] | None) -> torch.Tensor:
        return x

    def combine(self, y: torch.Tensor, dp_num_tokens: list[int] | None) -> torch.Tensor:
        return self.tp.all_reduce(y)


class DataParallelExchange:
    """DP attention: gather every DP group's tokens before the block, reduce-scatter the sums back after.

    Shapes are padded to the step's largest DP batch (`dp_num_tokens`, the same list on every rank, sent in
    the plan), so a rank with no tokens still joins each collective and none of them can hang.
    """

    def __init__(self, groups: ParallelGroups) -> None:
        self.tp = groups.tp
        self.num_dp = groups.parallel.dp_size
        self.attn_tp_size = groups.attn_tp_size
        self.dp_rank = groups.dp_rank

    def _counts(self, dp_num_tokens: list[int] | None) -> list[int]:
        if dp_num_tokens is None or len(dp_num_tokens) != self.num_dp:
            raise ValueError(
                f"DP attention needs the step's token count of each of the {self.num_dp} DP ranks, got "
                f"{dp_num_tokens!r}"
            )
        return dp_num_tokens

    def gather(self, x: torch.Tensor, dp_num_tokens: list[int] | None) -> torch.Tensor:
        counts = self._counts(dp_num_tokens)
        if x.shape[0] != counts[self.dp_rank]:
            raise ValueError(f"DP rank {self.dp_rank} holds {x.shape[0]} tokens but the plan says {counts}")
        padded = x.new_zeros((max(max(counts), 1), *x.shape[1:]))  # [M, H]
        padded[: x.shape[0]] = x
        stacked = self.tp.all_gather_stack(padded)[:: self.attn_tp_size]  # [num_dp, M, H], one per DP group
        return torch.cat([stacked[d, :n] for d, n in enumerate(counts)])  # [sum(counts), H]

    def combine(self, y: torch.Tensor, dp_num_tokens: list[int] | None) -> torch.Tensor:
        counts = self._counts(dp_num_tokens)
        padded = y.new_zeros((self.num_dp, max(max(counts), 1), *y.shape[1:]))  # [num_dp, M, H]
        start = 0
        for d, n in enumerate(counts):
            padded[d, :n] = y[start : start + n]
            start += n
        # Each rank of a DP group receives that group's block: repeat it once per rank of the group.
        blocks = padded.repeat_interleave(self.attn_tp_size, dim=0) if self.attn_tp_size > 1 else padded
        return self.tp.reduce_scatter_stack(blocks)[: counts[self.dp_rank]]


def make_exchange(groups: ParallelGroups) -> MlpExchange:
    """The exchange this rank's layers use around MLP/MoE blocks (chosen once, at construction)."""
    if groups.dp_attention:
        return DataParallelExchange(groups)
    return TensorParallelExchange(groups.tp)
