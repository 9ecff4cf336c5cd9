"""Building blocks that know how they shard: RMSNorm, the parallel linears, the vocab embedding and LM head.

Every parameter carries a `weight_loader(param, loaded)` that takes the FULL checkpoint tensor (a lazy
`TensorSource`: only the rows and columns it indexes are read), checks its shape and copies this rank's
shard into the parameter. Collectives go through a `Comm` (model/parallel.py), the TP group by default. The math of a linear is a *linear method* chosen at
construction: `UnquantizedLinearMethod` (weight in the compute dtype) or `Fp8BlockLinearMethod` (e4m3 weight
plus one float32 `weight_scale_inv` per block, as DeepSeek's checkpoints store them); each linear swaps its method
for the one of its weights' device (`LinearMethod.for_device`: the FP8 kernels on CUDA, the reference elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from baleen.kernels.norm import rms_norm, rms_norm_quant_fp8, rms_norm_ref
from baleen.model.config import ParallelConfig, QuantConfig
from baleen.model.kernel_choice import KernelModule
from baleen.model.parallel import Comm

if TYPE_CHECKING:
    from baleen.kernels.fp8_gemm import TiledFp8Weight


class TensorSource(Protocol):
    """A checkpoint tensor, read lazily: its FULL shape and dtype; indexing reads only the slice asked for.

    A `torch.Tensor` is one; the loader passes safetensors slices so each rank reads just its shard.
    """

    @property
    def shape(self) -> Sequence[int]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...


WeightLoader = Callable[[nn.Parameter, TensorSource], None]


# ---- parameters and their loaders -------------------------------------------------------------------
def new_param(shape: tuple[int, ...], dtype: torch.dtype, loader: WeightLoader | None = None) -> nn.Parameter:
    """An uninitialised, frozen parameter (on the ambient device, usually meta) with a weight loader."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    param.weight_loader = loader or default_weight_loader  # type: ignore[attr-defined]
    return param


def get_weight_loader(param: nn.Parameter) -> WeightLoader:
    """The loader attached to `param` (the default one for plain parameters)."""
    loader: WeightLoader = getattr(param, "weight_loader", default_weight_loader)
    return loader


def check_shape(loaded: TensorSource, expected: tuple[int, ...]) -> None:
    """Raise a ValueError naming both shapes when a checkpoint tensor does not have the full shape we need."""
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"has shape {list(loaded.shape)}, expected {list(expected)}")


def copy_into(param: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy with a dtype cast; e4m3 goes through uint8 views because CPU torch cannot cast into it in place."""
    if param.dtype == torch.float8_e4m3fn or loaded.dtype == torch.float8_e4m3fn:
        if param.dtype != loaded.dtype:
            raise ValueError(f"has dtype {loaded.dtype}, expected {param.dtype}")
        param.view(torch.uint8).copy_(loaded.view(torch.uint8))
    else:
        param.copy_(loaded)


def default_weight_loader(param: nn.Parameter, loaded: TensorSource) -> None:
    """Replicated parameter: the checkpoint tensor is copied whole."""
    check_shape(loaded, tuple(param.shape))
    copy_into(param.data, loaded[...])


def shard_range(size: int, rank: int, world: int, what: str) -> tuple[int, int]:
    """[start, end) of rank's equal slice of `size`; the split must be exact."""
    if size % world:
        raise ValueError(f"{what}={size} is not divisible by tp_size={world}")
    part = size // world
    return rank * part, (rank + 1) * part


def materialize(module: nn.Module, device: torch.device | str) -> None:
    """Give every meta parameter real (uninitialised) storage on `device`, keeping its weight loader; then every
    KernelModule binds the kernels or references of that device.

    `Module.to_empty` would drop the attributes we hang on parameters, so parameters are re-created here.
    """
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None or not param.is_meta:
                continue
            fresh = nn.Parameter(torch.empty_like(param, device=device), requires_grad=False)
            fresh.__dict__.update(param.__dict__)
            sub._parameters[name] = fresh
    for sub in module.modules():
        if isinstance(sub, KernelModule):
            sub.bind_kernels()


def default_comm(parallel: ParallelConfig) -> Comm:
    """The default process group seen as the TP group of `parallel` (identity collectives at tp_size 1)."""
    return Comm(parallel.tp_size, parallel.tp_rank)


# ---- RMSNorm -------------------------------------------------------------------------------------------
class RMSNorm(KernelModule):
    """x / rms(x) * weight, computed in float32 (one fused Triton launch on CUDA, torch elsewhere).

    `fused=False` keeps the torch reference on CUDA too (KernelChoice.glue: training, the kernel has no backward).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32,
                 fused: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.eps = eps
        self.fused = fused
        self.weight = new_param((hidden_size,), dtype)
        self.bind_kernels()

    def bind_kernels(self) -> None:
        # (x, weight, eps, residual) -> (normed, x + residual); bound per device, see KernelModule
        self.rms_norm = rms_norm if self.fused and self.weight.is_cuda else rms_norm_ref

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rms_norm(x, self.weight, self.eps)[0]

    def then(self, linear: ColumnParallelLinear | ReplicatedLinear, x: torch.Tensor) -> torch.Tensor:
        """linear(self(x)) for a linear without an all-reduce; where that linear would quantize its input for
        the tiled FP8 GEMM, the norm writes the FP8 activations itself (`rms_norm_quant_fp8`: one launch fewer)."""
        method = linear.method
        if isinstance(method, Fp8BlockLinearMethod) and method.takes_quantized(linear, x):
            x_q, x_s = rms_norm_quant_fp8(x.reshape(-1, x.shape[-1]), self.weight, self.eps, method.block_size[1])
            return method.apply_quantized(linear, x_q, x_s, x.shape[:-1], x.dtype)
        return linear(self(x))

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add of a pre-norm block fused into its norm."""
        return self.rms_norm(x, self.weight, self.eps, residual)


# ---- linear methods --------------------------------------------------------------------------------------
class LinearWeights(Protocol):
    """What a linear method reads at run time: the weight (and its block scales when FP8)."""

    @property
    def weight(self) -> torch.Tensor: ...

    @property
    def weight_scale_inv(self) -> torch.Tensor: ...


class LinearMethod(Protocol):
    """How a linear layer stores its weight and computes y = x W^T."""

    def create_weights(self, layer: LinearBase) -> None: ...

    def for_device(self, device: torch.device) -> LinearMethod:
        """The method for weights on `device` (itself when nothing changes); see KernelModule."""
        ...

    def apply(self, layer: LinearWeights, x: torch.Tensor) -> torch.Tensor: ...


class UnquantizedLinearMethod:
    """Weight [out, in] in the compute dtype; F.linear."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def create_weights(self, layer: LinearBase) -> None:
        layer.weight = new_param((layer.out_local, layer.in_local), self.dtype, layer.load_weight)

    def for_device(self, device: torch.device) -> LinearMethod:
        return self

    def apply(self, layer: LinearWeights, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight)


class Fp8BlockLinearMethod:
    """e4m3 weight [out, in] + float32 weight_scale_inv [ceil(out/bn), ceil(in/bk)]: the reference, for weights off
    CUDA (the weight dequantized per call, a float32 GEMM); `for_device` gives weights on CUDA the kernels' method,
    `CudaFp8BlockLinearMethod`.

    The token-count regimes of the CUDA method are class attributes here, so that benchmarks can move them for both.
    """

    CUBLAS_MIN_M = 128
    # From the H100 sweep (docs/PERF.md): the GEMV beats quant + GEMM + split-K reduce at M = 1 on most V3
    # shapes, and loses from M = 2-4 on the large ones. A class attribute so that benchmarks can move it.
    GEMV_MAX_M: ClassVar[int] = 1
    # H100 (docs/PERF.md): at M = 17-32 the W8A8 GEMM runs 64-row MMA tiles half empty and the skinny GEMM is
    # 1.07-1.34x quant + GEMM; at M <= 16 it is 0.8-1.05x of it, so the W8A8 path keeps 2-16.
    SKINNY_MIN_M: ClassVar[int] = 17
    SKINNY_MAX_M: ClassVar[int] = 32
    # H100 (docs/PERF.md, sixth pass): up to 64 tokens, a layer given a tiled copy of its weight (`tile_weight`)
    # runs the W8A8 GEMM over it, whose contiguous 8 KB TMA boxes stream 3-8 points more of HBM than boxes of
    # the row-major weight at 2-16 tokens, 15-20 more than the skinny GEMM at 17-32 and 1-13 more than 64-row
    # tiles at 48-64; the GEMV (M = 1) and prefill (cuBLAS) keep reading the row-major weight.
    TILED_MAX_M: ClassVar[int] = 64

    def __init__(self, block_size: tuple[int, int]) -> None:
        self.block_size = block_size

    def create_weights(self, layer: LinearBase) -> None:
        bn, bk = self.block_size
        # NOTE: a shard boundary inside a block would split one scale over two ranks.
        if layer.out_local != layer.out_features and layer.out_local % bn:
            raise ValueError(
                f"FP8 column shard of {layer.out_local} rows is not a multiple of the block {bn}"
            )
        if layer.in_local != layer.in_features and layer.in_local % bk:
            raise ValueError(f"FP8 row shard of {layer.in_local} columns is not a multiple of the block {bk}")
        layer.weight = new_param((layer.out_local, layer.in_local), torch.float8_e4m3fn, layer.load_weight)
        scale_shape = (-(-layer.out_local // bn), -(-layer.in_local // bk))
        layer.weight_scale_inv = new_param(scale_shape, torch.float32, layer.load_scale)

    def for_device(self, device: torch.device) -> LinearMethod:
        if device.type == "cuda":
            return CudaFp8BlockLinearMethod(self.block_size, device)
        return self if type(self) is Fp8BlockLinearMethod else Fp8BlockLinearMethod(self.block_size)

    def tile_weight(self, layer: LinearBase | FusedLinear) -> int:
        """Give `layer` a tiled copy of its weight for the few-token GEMM (CUDA only); the bytes it adds: none here."""
        return 0

    def takes_quantized(self, layer: LinearWeights, x: torch.Tensor) -> bool:
        """Whether `apply` would quantize x per token group and run the tiled GEMM (never off CUDA)."""
        return False

    def apply_quantized(
        self, layer: LinearWeights, x_q: torch.Tensor, x_s: torch.Tensor, lead: torch.Size, dtype: torch.dtype
    ) -> torch.Tensor:
        raise ValueError("apply_quantized needs FP8 weights on CUDA with a tiled copy (takes_quantized said no)")

    def apply(self, layer: LinearWeights, x: torch.Tensor) -> torch.Tensor:
        from baleen.kernels.fp8_linear import fp8_block_linear  # lazy: only the FP8 path needs the kernels

        return fp8_block_linear(x, layer.weight, layer.weight_scale_inv, self.block_size)


class CudaFp8BlockLinearMethod(Fp8BlockLinearMethod):
    """Block-FP8 weights on CUDA: the GEMM is picked by the token count M (crossovers measured on the H100,
    docs/PERF.md):
    M <= GEMV_MAX_M, the W8A16 GEMV (decode: no activation quantization, no split-K reduction);
    M <= TILED_MAX_M on a layer with a tiled weight copy (`tile_weight`), the W8A8 GEMM over that copy;
    SKINNY_MIN_M <= M <= SKINNY_MAX_M otherwise, the W8A16 tensor-core GEMM (`fp8_skinny`);
    M >= CUBLAS_MIN_M, cuBLASLt's block-scaled FP8 where the device has it (prefill); between, our Triton GEMM.
    """

    def __init__(self, block_size: tuple[int, int], device: torch.device) -> None:
        from baleen.kernels.fp8_cublas import cublas_block_fp8_supported

        super().__init__(block_size)
        self.device = device
        # where M >= it, cuBLAS block scaling (None: the device has none, the Triton GEMM throughout)
        self.cublas_min_m = self.CUBLAS_MIN_M if cublas_block_fp8_supported(device) else None

    def for_device(self, device: torch.device) -> LinearMethod:
        return self if device == self.device else super().for_device(device)

    def tile_weight(self, layer: LinearBase | FusedLinear) -> int:
        """Give `layer` a tiled copy of its weight (`weight_tiled`) for the few-token GEMM; the bytes it adds
        (the weight's size again), 0 where that GEMM cannot read it (K % 16 != 0)."""
        from baleen.kernels.fp8_gemm import TILE_K, tile_fp8_weight

        w = layer.weight
        if w.dtype != torch.float8_e4m3fn or w.shape[1] % 16 or self.block_size[1] != TILE_K:
            return 0
        layer.weight_tiled = tile_fp8_weight(w.data)
        return layer.weight_tiled.num_bytes

    def takes_quantized(self, layer: LinearWeights, x: torch.Tensor) -> bool:
        """Whether `apply` would quantize x per token group and run the tiled GEMM (so a producer that writes
        x may hand over (x_fp8, scales) to `apply_quantized` instead: one launch fewer)."""
        k = x.shape[-1]
        m = x.numel() // max(k, 1)
        return (
            not self._takes_gemv(m, k) and 0 < m <= self.TILED_MAX_M
            and getattr(layer, "weight_tiled", None) is not None
        )  # fmt: skip

    def _takes_gemv(self, m: int, k: int) -> bool:
        return 0 < m <= self.GEMV_MAX_M and k % 16 == 0 and self.block_size[1] % 16 == 0

    def apply_quantized(
        self, layer: LinearWeights, x_q: torch.Tensor, x_s: torch.Tensor, lead: torch.Size, dtype: torch.dtype
    ) -> torch.Tensor:
        """y [*lead, N] in dtype from activations quantized per token per 128 columns (x_q [M, K] e4m3, x_s
        [M, K/128]), over the layer's tiled weight copy; where `takes_quantized` said yes."""
        from baleen.kernels.fp8_gemm import w8a8_block_fp8_matmul_tiled

        tiled = getattr(layer, "weight_tiled", None)
        if tiled is None:
            raise ValueError("apply_quantized needs the layer's tiled weight copy (Fp8BlockLinearMethod.tile_weight)")
        y = w8a8_block_fp8_matmul_tiled(x_q, x_s, tiled, layer.weight_scale_inv, self.block_size, dtype)
        return y.reshape(*lead, y.shape[-1])

    def apply(self, layer: LinearWeights, x: torch.Tensor) -> torch.Tensor:
        from baleen.kernels.fp8_linear import fp8_block_linear  # lazy: only the FP8 path needs the kernels

        k = x.shape[-1]
        m = x.numel() // max(k, 1)
        if self._takes_gemv(m, k):
            from baleen.kernels.fp8_gemv import fp8_block_gemv

            y = fp8_block_gemv(x.reshape(m, k), layer.weight, layer.weight_scale_inv, self.block_size)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        if self.takes_quantized(layer, x):
            from baleen.kernels.act_quant import per_token_group_quant_fp8

            x_q, x_s = per_token_group_quant_fp8(x.reshape(m, k), self.block_size[1])
            return self.apply_quantized(layer, x_q, x_s, x.shape[:-1], x.dtype)
        if self.SKINNY_MIN_M <= m <= self.SKINNY_MAX_M and x.dtype in (torch.bfloat16, torch.float16):
            from baleen.kernels.fp8_skinny import fp8_skinny_gemm

            y = fp8_skinny_gemm(x.reshape(m, k), layer.weight, layer.weight_scale_inv, self.block_size)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return fp8_block_linear(
            x, layer.weight, layer.weight_scale_inv, self.block_size, cublas_min_m=self.cublas_min_m
        )


def make_linear_method(quant: QuantConfig | None, dtype: torch.dtype) -> LinearMethod:
    """The one place that turns the checkpoint's quantization into a linear method."""
    if quant is None:
        return UnquantizedLinearMethod(dtype)
    return Fp8BlockLinearMethod(quant.weight_block_size)


# ---- linear layers -----------------------------------------------------------------------------------
class LinearBase(KernelModule):
    """A bias-free linear whose weight is this rank's [out_local, in_local] slice of [out, in]."""

    weight: nn.Parameter
    weight_scale_inv: nn.Parameter
    weight_tiled: TiledFp8Weight | None = None  # `Fp8BlockLinearMethod.tile_weight`

    def __init__(
        self,
        in_features: int,
        out_features: int,
        method: LinearMethod,
        parallel: ParallelConfig,
        out_split: int = 1,
        in_split: int = 1,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.parallel = parallel
        self.out_start, out_end = shard_range(
            out_features, parallel.tp_rank % out_split, out_split, "out_features"
        )
        self.in_start, in_end = shard_range(in_features, parallel.tp_rank % in_split, in_split, "in_features")
        self.out_local = out_end - self.out_start
        self.in_local = in_end - self.in_start
        self.method = method
        method.create_weights(self)
        self.bind_kernels()

    def bind_kernels(self) -> None:
        self.method = self.method.for_device(self.weight.device)

    @property
    def block_size(self) -> tuple[int, int] | None:
        return self.method.block_size if isinstance(self.method, Fp8BlockLinearMethod) else None

    def load_weight(self, param: nn.Parameter, loaded: TensorSource) -> None:
        """Full [out, in] checkpoint weight -> this rank's slice (only that slice is read)."""
        check_shape(loaded, (self.out_features, self.in_features))
        shard = loaded[
            self.out_start : self.out_start + self.out_local, self.in_start : self.in_start + self.in_local
        ]
        copy_into(param.data, shard)

    def load_scale(self, param: nn.Parameter, loaded: TensorSource) -> None:
        """Full [ceil(out/bn), ceil(in/bk)] block scales -> the blocks of this rank's slice."""
        block = self.block_size
        assert block is not None
        bn, bk = block
        check_shape(loaded, (-(-self.out_features // bn), -(-self.in_features // bk)))
        r0, c0 = self.out_start // bn, self.in_start // bk
        copy_into(param.data, loaded[r0 : r0 + param.shape[0], c0 : c0 + param.shape[1]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""

    def __init__(
        self, in_features: int, out_features: int, method: LinearMethod, parallel: ParallelConfig
    ) -> None:
        super().__init__(in_features, out_features, method, parallel)


class ColumnParallelLinear(LinearBase):
    """Output features split over the TP ranks; each rank returns its slice of y."""

    def __init__(
        self, in_features: int, out_features: int, method: LinearMethod, parallel: ParallelConfig
    ) -> None:
        super().__init__(in_features, out_features, method, parallel, out_split=parallel.tp_size)


class RowParallelLinear(LinearBase):
    """Input features split over the TP ranks; partial outputs are all-reduced over `comm` (or left partial)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        method: LinearMethod,
        parallel: ParallelConfig,
        reduce_results: bool = True,
        comm: Comm | None = None,
    ) -> None:
        super().__init__(in_features, out_features, method, parallel, in_split=parallel.tp_size)
        self.reduce_results = reduce_results
        self.comm = comm or default_comm(parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x)
        return self.comm.all_reduce(y) if self.reduce_results else y


class FusedLinear:
    """Linears that read the same input, concatenated along their outputs so that one GEMM serves them all.

    Made after loading (`fuse_linears`); the originals' weights become views into the concatenation, so
    no memory is added. Deliberately not an nn.Module: its tensors are already the originals' parameters.
    """

    def __init__(
        self, layers: Sequence[LinearBase], into: tuple[torch.Tensor, torch.Tensor | None] | None = None
    ) -> None:
        """`into` (weight, weight_scale_inv): where the concatenation goes (e.g. a slot of a stacked tensor)."""
        self.method = layers[0].method
        self.weight_tiled: TiledFp8Weight | None = None  # `Fp8BlockLinearMethod.tile_weight`
        self.widths = [layer.out_local for layer in layers]
        weights = [layer.weight.data for layer in layers]
        # [sum(out_local), in_local]
        self.weight = torch.cat(weights) if into is None else torch.cat(weights, out=into[0])
        for layer, part in zip(layers, self.weight.split(self.widths)):
            layer.weight.data = part
        if layers[0].block_size is not None:
            scales = [layer.weight_scale_inv.data for layer in layers]
            dst = None if into is None else into[1]
            self.weight_scale_inv = torch.cat(scales) if dst is None else torch.cat(scales, out=dst)
            rows = [layer.weight_scale_inv.shape[0] for layer in layers]
            for layer, part in zip(layers, self.weight_scale_inv.split(rows)):
                layer.weight_scale_inv.data = part

    def joint(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., sum(out_local)]: the outputs side by side, in the order fused."""
        return self.method.apply(self, x)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [..., in] -> one output per fused linear, [..., out_local] each (views of one GEMM's output)."""
        return list(self.joint(x).split(self.widths, dim=-1))


def fuse_linears(
    layers: Sequence[LinearBase], into: tuple[torch.Tensor, torch.Tensor | None] | None = None
) -> FusedLinear | None:
    """A FusedLinear over `layers` (its weights written `into` if given), or None when they cannot share a GEMM.

    They must be plain (no all-reduce), read the same input slice, use the same kind of weights, and with
    FP8 blocks every part but the last must end on a block boundary (so the block scales concatenate).
    """
    first = layers[0]
    block = first.block_size
    for layer in layers:
        if isinstance(layer, RowParallelLinear) or type(layer.method) is not type(first.method):
            return None
        if (layer.in_start, layer.in_local, layer.block_size) != (first.in_start, first.in_local, block):
            return None
        if layer.weight.dtype != first.weight.dtype or layer.weight.device != first.weight.device:
            return None
    if block is not None and any(layer.out_local % block[0] for layer in layers[:-1]):
        return None
    return FusedLinear(layers, into)


# ---- vocabulary ---------------------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over the TP ranks (the last rank's slice padded); looked up then all-reduced.

    `comm` is the group `parallel` describes (default: the default group); DP attention passes its own
    DP group, whose ranks all see the same tokens.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        parallel: ParallelConfig,
        dtype: torch.dtype,
        comm: Comm | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.parallel = parallel
        self.comm = comm or default_comm(parallel)
        self.vocab_local = -(-vocab_size // parallel.tp_size)
        self.vocab_start = parallel.tp_rank * self.vocab_local
        self.weight = new_param((self.vocab_local, hidden_size), dtype, self.load_weight)

    def load_weight(self, param: nn.Parameter, loaded: TensorSource) -> None:
        """Full [vocab, hidden] -> this rank's rows, zero padding past the vocabulary."""
        check_shape(loaded, (self.vocab_size, self.hidden_size))
        rows = loaded[self.vocab_start : self.vocab_start + self.vocab_local]
        param.data[: rows.shape[0]].copy_(rows)
        param.data[rows.shape[0] :].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        valid = (local >= 0) & (local < self.vocab_local)
        out = F.embedding(local.clamp(0, self.vocab_local - 1), self.weight) * valid.unsqueeze(-1).to(
            self.weight.dtype
        )
        return self.comm.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, vocabulary split like the embedding; logits gathered from all ranks."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, H] -> float32 logits [n, vocab]."""
        logits = F.linear(hidden, self.weight)  # [n, vocab_local]
        logits = self.comm.all_gather(logits, dim=-1)
        return logits[:, : self.vocab_size].float()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        raise TypeError("ParallelLMHead is not an embedding: call compute_logits(hidden)")
