"""MLA decode over an FP8 (e4m3) latent cache with FP8 MMAs: Hopper (sm_90a), Gluon, warp-specialised.

`mla_decode_gluon` over an e4m3 cache converts every tile to bf16 and keeps bf16 wgmmas: exact, but at 128 heads
the MMAs bound the kernel, so halving the bytes left it 0.66-0.91x the bf16 cache's speed (docs/PERF.md). Here
both products run as e4m3 x e4m3 wgmmas (fp32 accumulators), twice the bf16 rate, on half the shared-memory
bytes. What that changes in the numerics (measured on the trained model by `loadtest/probe_fp8_qk.py`, variant
q8p8: greedy answers unchanged, per-layer error about half of what the FP8 cache itself costs):
- q is rounded to e4m3 with one scale per (token, head) row, amax / 448 over the row's 576 values; the scores
  are multiplied back by it (and by the softmax scale and the cache's kv_scale) in fp32;
- P = exp2(s - m) in [0, 1] (m the split's running max) is rounded to e4m3 after a multiply by 256 (a power of
  two, exact), which keeps probabilities down to 2^-17 instead of e4m3's 2^-9; the row sum l adds the unrounded
  P, and the output is divided by 256 l (as FlashAttention-3's and FlashMLA's FP8 paths do).

Layout of one CTA (sequence b, 64-head block, KV split), as the bf16 kernel's where not said otherwise:
- loader (1 warp): TMA of the e4m3 tile ([64, 512] latent + [64, 64] rope boxes) into a 4-deep ring (36 KB a
  stage; with Q in e4m3, 36 KB, and two 4 KB P buffers, 205 of the 227 KB);
- warpgroup 0 (softmax only): per tile S = Q K^T (m64 n64 k576, both operands from shared memory, K-major as an
  FP8 wgmma needs), the online softmax, P and the row rescale into one of two P buffers; it releases the stage
  after its QK and never waits for a P V, only for a P buffer both P V warpgroups are done with;
- warpgroups 1 and 2: O^T[:256] and O^T[256:] += V^T P^T, each loading its V^T half into registers and releasing
  the stage before its wgmma; warpgroup 1 first quantizes Q (its registers are free then). Each stores its half.
P V is computed transposed, O^T[c, h] += V^T[c, t] P^T[t, h]: an FP8 wgmma reads its shared-memory operands
K-major only, and V (the latent rows, [t, c] with c contiguous) is N-major as a B operand. As the A operand it
comes from registers instead, loaded from the stage's tile in 8-byte pieces and reordered within each thread
(`_load_vt`), while P^T is a K-major view of P [h, t]. Each P V warpgroup holds its O^T half as 256 x 64 fp32
(128 registers a thread) and stores it through a layout whose lanes run along the latent (`_store_o_half`).
Splits write what the bf16 kernel writes (float32 partials + log2-domain LSE), merged by the same kernel.
Measured (H100, 2026-12-07, docs/PERF.md): 1.29x the bf16 cache's attention at 32 x 8k, 1.29-1.38x at batch
32-128, 0.94-1.14x at batch 1; a tile takes ~3k cycles where its MMAs need ~1.1k (next: Q as a register operand,
halving QK's shared-memory reads; 128-token tiles).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from baleen.kernels.mla_decode import _LOG2E
from baleen.kernels.mla_decode_gluon import (
    _GLUON_IMPORT_ERROR,
    BLOCK_H,
    BLOCK_N,
    LOADER_REGS,
    NUM_WARPS,
    mla_decode_gluon,
)

if _GLUON_IMPORT_ERROR is None:
    from baleen.kernels.mla_decode_gluon import (
        GluonTensorDescriptor,
        _mla_load_partition,
        _program_keys,
        fence_async_shared,
        gl,
        gluon,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

NUM_STAGES = 4  # 4 x 36 KB e4m3 tiles + Q 36 KB + P 4 KB
# Registers: 16 warps at launch (the loader's 1 warp padded to a warpgroup) x 128 = 64K; the P V warpgroups take
# 192 (128 of accumulator, 32 of V^T and their reordering), the loader 24, the softmax warpgroup the 104 left.
MAX_REGS = 128
PV_REGS = 192
E4M3_MAX = 448.0
P_SCALE = 256.0  # P in [0, 1] goes into e4m3 as 256 P: exact scaling, probabilities down to 2^-17 kept


@dataclass(frozen=True)
class Fp8MmaVariant:
    """Kernel variants the benchmark compares side by side (issue 20); the default is the measured kernel.

    lazy_rescale: a row's running max m moves only when a tile's max passes it by more than rescale_tau (log2
    domain; 0 moves it whenever it grows, the default kernel's numerics), and the P V warpgroups skip a tile's
    accumulator rescale when no row's m moved. P = exp2(s - m) then reaches 2^rescale_tau, and P * p_scale must
    stay within e4m3's 448: p_scale * 2^rescale_tau <= 448 (256 with 0.8, 128 with 1.8, 64 with 2.8; a smaller
    p_scale keeps fewer small probabilities: e4m3's least subnormal 2^-9 is P = 2^-9 / p_scale).
    pipeline_qk: warpgroup 0 issues tile i + 1's QK before tile i's softmax (numerics unchanged)."""

    lazy_rescale: bool = False
    rescale_tau: float = 0.0
    p_scale: float = P_SCALE
    pipeline_qk: bool = False

    def __post_init__(self) -> None:
        if self.p_scale <= 0 or math.frexp(self.p_scale)[0] != 0.5:
            raise ValueError(f"p_scale must be a power of two (an exact scaling), got {self.p_scale}")
        if self.rescale_tau < 0 or (self.rescale_tau > 0 and not self.lazy_rescale):
            raise ValueError(f"rescale_tau {self.rescale_tau}: a threshold >= 0, and only with lazy_rescale")
        if self.p_scale * 2.0**self.rescale_tau > E4M3_MAX:
            raise ValueError(
                f"p_scale {self.p_scale} x 2^{self.rescale_tau} > {E4M3_MAX}: P x p_scale would leave e4m3's range"
            )


DEFAULT_VARIANT = Fp8MmaVariant()
# The candidates `bench_mla_gluon.py --section fp8-variants` times against the default (and compile_offline.py
# compiles): lazy rescale at threshold 0 (the default's numerics), 0.8 and 2.8; the pipelined QK alone and with them.
FP8_MMA_VARIANTS = {
    "mma": DEFAULT_VARIANT,
    "skip": Fp8MmaVariant(lazy_rescale=True),
    "lazy0.8": Fp8MmaVariant(lazy_rescale=True, rescale_tau=0.8),
    "lazy2.8": Fp8MmaVariant(lazy_rescale=True, rescale_tau=2.8, p_scale=64.0),
    "pipe": Fp8MmaVariant(pipeline_qk=True),
    "pipe+skip": Fp8MmaVariant(lazy_rescale=True, pipeline_qk=True),
    "pipe+lazy2.8": Fp8MmaVariant(lazy_rescale=True, rescale_tau=2.8, p_scale=64.0, pipeline_qk=True),
}


def vt_column(m: int) -> int:
    """The latent column (within a P V warpgroup's half) that V^T's row m holds, and its output row m stores: a
    permutation of m's bits (`_VT_LOAD_LAYOUT`; `_load_vt` and `_store_o_half` apply it by reshape / permute)."""
    return 64 * ((m // 16) % 4) + 8 * (m % 8) + 2 * (m // 64) + (m // 8) % 2


if _GLUON_IMPORT_ERROR is None:
    _E4M3_MAX = gl.constexpr(E4M3_MAX)  # a jit function reads only constexpr globals

    @gluon.jit
    def _quantize_q(q_nope_ptr, q_pe_ptr, stride_qn_h, stride_qp_h, q_smem, qpe_smem, BLOCK_H: gl.constexpr,
                    D_LATENT: gl.constexpr, D_ROPE: gl.constexpr):  # fmt: skip
        # Q block -> e4m3 in shared memory with one scale a head row (amax / 448 over latent and rope); returns the
        # scales. One pass: the block is loaded whole (bf16, 136 registers a thread, before the loop needs any).
        CHUNK: gl.constexpr = 128
        gl.static_assert(D_LATENT == 4 * CHUNK, "Q is loaded as four 128-column chunks")
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        offs_h = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, blk)).to(gl.int64)  # x a head stride of T * D
        offs_c = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, blk))
        offs_r = gl.arange(0, D_ROPE, layout=gl.SliceLayout(0, blk))
        q_rows = q_nope_ptr + offs_h[:, None] * stride_qn_h + offs_c[None, :]
        q0 = gl.load(q_rows)
        q1 = gl.load(q_rows + CHUNK)
        q2 = gl.load(q_rows + 2 * CHUNK)
        q3 = gl.load(q_rows + 3 * CHUNK)
        qpe = gl.load(q_pe_ptr + offs_h[:, None] * stride_qp_h + offs_r[None, :])
        amax = gl.maximum(gl.max(gl.abs(q0), axis=1), gl.max(gl.abs(q1), axis=1))
        amax = gl.maximum(amax, gl.maximum(gl.max(gl.abs(q2), axis=1), gl.max(gl.abs(q3), axis=1)))
        amax = gl.maximum(amax, gl.max(gl.abs(qpe), axis=1)).to(gl.float32)  # max is exact in bf16
        q_scale = gl.where(amax > 0, amax / _E4M3_MAX, 1.0)  # a zero row: any scale, its e4m3 values are 0
        inv = (1.0 / q_scale)[:, None]
        q_smem.slice(0, CHUNK, dim=1).store((q0.to(gl.float32) * inv).to(gl.float8e4nv))
        q_smem.slice(CHUNK, CHUNK, dim=1).store((q1.to(gl.float32) * inv).to(gl.float8e4nv))
        q_smem.slice(2 * CHUNK, CHUNK, dim=1).store((q2.to(gl.float32) * inv).to(gl.float8e4nv))
        q_smem.slice(3 * CHUNK, CHUNK, dim=1).store((q3.to(gl.float32) * inv).to(gl.float8e4nv))
        qpe_smem.store((qpe.to(gl.float32) * inv).to(gl.float8e4nv))
        fence_async_shared()  # generic-proxy stores -> async-proxy (wgmma) reads
        gl.thread_barrier()  # Q is read by this warpgroup's wgmmas only
        return q_scale

    # V^T as the wgmma's A operand (registers), [256 output rows, 64 tokens] for one warpgroup's half. The
    # register layout wgmma wants (`DotOperandLayout(0, o_layout, 4)`) gives a thread rows {m, m + 8, m + 64,
    # m + 128, ...} and 4 consecutive tokens a register: loaded as it stands that is 128 byte loads a thread. Output
    # row m of the half is latent column c(m) instead, a permutation of m's bits chosen so that a thread's 8 rows
    # are 8 consecutive columns: with m = 64 j + 16 w + 8 a + g (g < 8, a < 2, w < 4, j < 4),
    # c(m) = 64 w + 8 g + 2 j + a. Then the tile is loaded as [c, t] in _VT_LOAD_LAYOUT (the wgmma layout's lanes
    # and warps with c in place of m, its registers c-first: one 8-byte load a token), relabelled [c, t] -> [m, t]
    # (reshape / permute, no data movement) and converted to the wgmma layout, which only reorders bytes within
    # each thread. The epilogues store row m at column c(m) (`vt_column`).
    _VT_LOAD_LAYOUT = gl.constexpr(
        gl.DistributedLinearLayout(
            reg_bases=[[1, 0], [2, 0], [4, 0], [0, 1], [0, 2], [0, 16], [0, 32]],
            lane_bases=[[0, 4], [0, 8], [8, 0], [16, 0], [32, 0]],
            warp_bases=[[64, 0], [128, 0]],
            block_bases=[],
            shape=[256, 64],
        )
    )

    @gluon.jit
    def _load_vt(v_half, vt_layout: gl.constexpr):
        # v_half: the stage's [BLOCK_N, 256] e4m3 columns of this warpgroup -> V^T rows in the order c(m)
        x = v_half.permute((1, 0)).load(_VT_LOAD_LAYOUT)  # [256 c, 64 t]
        x = x.reshape([4, 8, 4, 2, 64])  # c = 64 w + 8 g + 2 j + a
        x = x.permute((2, 0, 3, 1, 4))  # [j, w, a, g, t]
        x = x.reshape([256, 64])  # m = 64 j + 16 w + 8 a + g
        return gl.convert_layout(x, vt_layout)

    @gluon.jit
    def _store_o_half(acc, factor, o_base, stride_o_h, c0, BLOCK_H: gl.constexpr, HALF: gl.constexpr):
        # acc [HALF rows m, BLOCK_H heads] in the wgmma layout, row m holding latent column c0 + c(m); factor
        # [BLOCK_H] per head. Relabelled to [c, h] (reshape / permute, as _load_vt) and converted to a layout
        # whose lanes run along c (16-byte stores, whole sectors) before the store: stored as it stands, a lane
        # writes 4 bytes to a sector of its own (c(m) puts 8 columns between lanes).
        out = acc * factor[None, :]
        out = out.reshape([4, 4, 2, 8, BLOCK_H])  # m = 64 j + 16 w + 8 a + g
        out = out.permute((1, 3, 0, 2, 4))  # [w, g, j, a, h]: c = 64 w + 8 g + 2 j + a
        out = out.reshape([HALF, BLOCK_H])
        st: gl.constexpr = gl.BlockedLayout([4, 1], [32, 1], [1, 4], [0, 1])
        out = gl.convert_layout(out, st)
        offs_c = c0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, st))
        offs_h = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, st))
        gl.store(o_base + offs_h[None, :] * stride_o_h + offs_c[:, None], out.to(o_base.dtype.element_ty))

    @gluon.jit
    def _qk_issue(q_smem, qpe_smem, kv_bufs, pe_bufs, full_bars, t, acc, NUM_STAGES: gl.constexpr):
        # S of tile t = Q K^T into acc (its values unused), issued async once the tile has landed
        stage = t % NUM_STAGES
        mbarrier.wait(full_bars.index(stage), (t // NUM_STAGES) & 1)
        acc = warpgroup_mma(q_smem, kv_bufs.index(stage).permute((1, 0)), acc, use_acc=False, is_async=True)
        return warpgroup_mma(qpe_smem, pe_bufs.index(stage).permute((1, 0)), acc, is_async=True)

    @gluon.jit
    def _qk_wait(s, q_smem, qpe_smem, kv_bufs, pe_bufs, empty_bars, t, NUM_STAGES: gl.constexpr):
        # S of tile t done in every warp: this warpgroup's share of the stage is released
        s, _, _, _, _ = warpgroup_mma_wait(0, deps=(s, q_smem, qpe_smem, kv_bufs, pe_bufs))
        gl.thread_barrier()
        mbarrier.arrive(empty_bars.index(t % NUM_STAGES), count=1)
        return s

    @gluon.jit
    def _softmax_tile(s, i, m_i, l_i, row_scale, offs_n, start, end, p_bufs, a_bufs, p_full, p_empty,
                      BLOCK_N: gl.constexpr, P_SCALE: gl.constexpr, LAZY_RESCALE: gl.constexpr,
                      RESCALE_TAU: gl.constexpr):  # fmt: skip
        # Tile i's online-softmax step on its raw scores s: P and the row factors into P buffer i % 2; returns
        # (the scaled scores, m_i, l_i): the caller may pass the former back as a dead accumulator, as the first cut did.
        buf = i % 2
        valid = (start + i * BLOCK_N + offs_n) < end
        s = gl.where(valid[None, :], s * row_scale[:, None], float("-inf"))
        if LAZY_RESCALE:
            tile_max = gl.max(s, axis=1)
            m_new = gl.where(tile_max > m_i + RESCALE_TAU, tile_max, m_i)  # m_i = -inf: always moves
            alpha = gl.where(m_new == m_i, 1.0, gl.exp2(m_i - m_new))  # exactly 1 where m stayed
        else:
            m_new = gl.maximum(m_i, gl.max(s, axis=1))
            alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        # buffer `buf` is free once both P V warpgroups finished tile i - 2 (fresh barriers pass round 0)
        mbarrier.wait(p_empty.index(buf), ((i // 2) & 1) ^ 1)
        p_bufs.index(buf).store((p * P_SCALE).to(gl.float8e4nv))
        a_bufs.index(buf).store(alpha)
        fence_async_shared()  # generic-proxy P stores -> the wgmmas' reads
        gl.thread_barrier()
        mbarrier.arrive(p_full.index(buf), count=1)
        return s, m_new, l_i

    @gluon.jit
    def _mla_fp8_softmax_partition(
        q_smem, qpe_smem, qs_smem, q_bar, kv_bufs, pe_bufs, p_bufs, a_bufs, full_bars, empty_bars, p_full, p_empty,
        start, end, num_tiles, sm_scale_log2, out_scale, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
        NUM_STAGES: gl.constexpr, P_SCALE: gl.constexpr, LAZY_RESCALE: gl.constexpr, RESCALE_TAU: gl.constexpr,
        PIPELINE_QK: gl.constexpr,
    ):  # fmt: skip
        # Warpgroup 0: per tile S = Q K^T, the online softmax, P (e4m3, x P_SCALE) and the row rescale into one of two
        # P buffers; never waits for a P V, only for a P buffer both P V warpgroups have finished with.
        # LAZY_RESCALE: a row's max m moves only when the tile's max passes it by more than RESCALE_TAU (log2
        # domain), so P = exp2(s - m) <= 2^RESCALE_TAU (P_SCALE * 2^RESCALE_TAU <= 448, `Fp8MmaVariant`), and a
        # row's rescale factor is exactly 1 when m did not move: the P V warpgroups skip tiles where all are 1.
        # PIPELINE_QK: tile i + 1's QK is issued before tile i's softmax, so the tensor cores run it meanwhile. Two
        # S accumulators (32 registers each) that alternate, so the loop takes tiles in pairs: a loop-carried
        # accumulator that changed registers each round would be copied while its wgmma runs, which makes ptxas
        # serialise the wgmmas (C7514). A pair past the last tile re-issues that tile's QK (its stage is not
        # reloaded) and drains it unused.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
        )
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_H], gl.float32, layout=gl.SliceLayout(1, s_layout))
        s = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=s_layout)
        mbarrier.wait(q_bar, 0)  # warpgroup 1 quantized Q
        row_scale = qs_smem.load(gl.SliceLayout(1, s_layout)) * sm_scale_log2
        if PIPELINE_QK:
            s = _qk_issue(q_smem, qpe_smem, kv_bufs, pe_bufs, full_bars, 0, s, NUM_STAGES)
            last = num_tiles - 1
            for i in range(0, num_tiles, 2):
                s = _qk_wait(s, q_smem, qpe_smem, kv_bufs, pe_bufs, empty_bars, i, NUM_STAGES)
                s2 = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=s_layout)
                s2 = _qk_issue(q_smem, qpe_smem, kv_bufs, pe_bufs, full_bars, gl.minimum(i + 1, last), s2, NUM_STAGES)
                _s1, m_i, l_i = _softmax_tile(s, i, m_i, l_i, row_scale, offs_n, start, end, p_bufs, a_bufs,
                                                   p_full, p_empty, BLOCK_N, P_SCALE, LAZY_RESCALE,
                                                   RESCALE_TAU)  # fmt: skip
                s2, _, _, _, _ = warpgroup_mma_wait(0, deps=(s2, q_smem, qpe_smem, kv_bufs, pe_bufs))
                if i + 1 < num_tiles:
                    gl.thread_barrier()
                    mbarrier.arrive(empty_bars.index((i + 1) % NUM_STAGES), count=1)
                s = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=s_layout)
                s = _qk_issue(q_smem, qpe_smem, kv_bufs, pe_bufs, full_bars, gl.minimum(i + 2, last), s, NUM_STAGES)
                if i + 1 < num_tiles:
                    _s2, m_i, l_i = _softmax_tile(s2, i + 1, m_i, l_i, row_scale, offs_n, start, end, p_bufs,
                                                        a_bufs, p_full, p_empty, BLOCK_N, P_SCALE, LAZY_RESCALE,
                                                        RESCALE_TAU)  # fmt: skip
            s, _, _, _, _ = warpgroup_mma_wait(0, deps=(s, q_smem, qpe_smem, kv_bufs, pe_bufs))  # the spare QK
        else:
            for i in range(num_tiles):
                s = _qk_issue(q_smem, qpe_smem, kv_bufs, pe_bufs, full_bars, i, s, NUM_STAGES)
                s = _qk_wait(s, q_smem, qpe_smem, kv_bufs, pe_bufs, empty_bars, i, NUM_STAGES)
                s, m_i, l_i = _softmax_tile(s, i, m_i, l_i, row_scale, offs_n, start, end, p_bufs, a_bufs, p_full,
                                            p_empty, BLOCK_N, P_SCALE, LAZY_RESCALE, RESCALE_TAU)  # fmt: skip
        # One more round: the output factor out_scale / (P_SCALE * row sum) (l_i >= 1) in the next buffer.
        buf = num_tiles % 2
        mbarrier.wait(p_empty.index(buf), ((num_tiles // 2) & 1) ^ 1)
        a_bufs.index(buf).store(out_scale / (P_SCALE * l_i))
        gl.thread_barrier()
        mbarrier.arrive(p_full.index(buf), count=1)
        return m_i, l_i

    @gluon.jit
    def _mla_fp8_pv_partition(
        q_nope_ptr, q_pe_ptr, stride_qn_h, stride_qp_h, q_smem, qpe_smem, qs_smem, q_bar, kv_bufs, p_bufs, a_bufs,
        full_bars, empty_bars, p_full, p_empty, o_base, stride_o_h, num_tiles, C0: gl.constexpr,
        QUANTIZE_Q: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, D_LATENT: gl.constexpr,
        D_ROPE: gl.constexpr, NUM_STAGES: gl.constexpr, LAZY_RESCALE: gl.constexpr,
    ):  # fmt: skip
        # Warpgroups 1 and 2: O^T[C0:C0 + D_LATENT / 2] += V^T P^T; warpgroup 1 (QUANTIZE_Q) first quantizes Q for
        # warpgroup 0 (its registers are free then; warpgroup 0's are not many). Each stores its half of O.
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_H, 32]
        )
        vt_layout: gl.constexpr = gl.DotOperandLayout(0, o_layout, 4)
        heads: gl.constexpr = gl.SliceLayout(0, o_layout)
        if QUANTIZE_Q:
            q_scale = _quantize_q(q_nope_ptr, q_pe_ptr, stride_qn_h, stride_qp_h, q_smem, qpe_smem, BLOCK_H,
                                  D_LATENT, D_ROPE)  # fmt: skip
            qs_smem.store(q_scale)
            gl.thread_barrier()
            mbarrier.arrive(q_bar, count=1)
        acc = gl.zeros([D_LATENT // 2, BLOCK_H], gl.float32, layout=o_layout)
        for i in range(num_tiles):
            stage = i % NUM_STAGES
            buf = i % 2
            mbarrier.wait(full_bars.index(stage), (i // NUM_STAGES) & 1)
            vt = _load_vt(kv_bufs.index(stage).slice(C0, D_LATENT // 2, dim=1), vt_layout)
            gl.thread_barrier()  # V^T is in every warp's registers: this warpgroup's share of the stage is released
            mbarrier.arrive(empty_bars.index(stage), count=1)
            mbarrier.wait(p_full.index(buf), (i // 2) & 1)
            alpha = a_bufs.index(buf).load(heads)
            if LAZY_RESCALE:
                # skip the 128 multiplies a thread when no row's max moved (every alpha exactly 1, and alpha <= 1); a
                # warp holds all 64 heads' factors, so this min stays in the warp and the branch is warp-uniform
                if gl.min(alpha, axis=0) != 1.0:
                    acc = acc * alpha[None, :]
            else:
                acc = acc * alpha[None, :]
            p_t = p_bufs.index(buf).permute((1, 0))
            acc = warpgroup_mma(vt, p_t, acc, is_async=True)
            acc, _ = warpgroup_mma_wait(0, deps=(acc, p_t))
            gl.thread_barrier()  # every warp read alpha and finished its P V
            mbarrier.arrive(p_empty.index(buf), count=1)
        buf = num_tiles % 2
        mbarrier.wait(p_full.index(buf), (num_tiles // 2) & 1)
        _store_o_half(acc, a_bufs.index(buf).load(heads), o_base, stride_o_h, C0, BLOCK_H, D_LATENT // 2)

    @gluon.jit
    def mla_decode_gluon_fp8_kernel(
        q_nope_ptr, q_pe_ptr, kv_desc, pe_desc, page_table_ptr, seq_lens_ptr, seq_idx_ptr, o_ptr, lse_ptr,
        sm_scale_log2, out_scale, stride_qn_b, stride_qn_h, stride_qp_b, stride_qp_h, stride_pt_b, stride_o_b,
        stride_o_h, stride_o_s, stride_lse_b, stride_lse_h, num_splits, num_head_blocks,
        PAGE_SIZE: gl.constexpr, D_LATENT: gl.constexpr, D_ROPE: gl.constexpr, BLOCK_H: gl.constexpr,
        BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, STORE_LSE: gl.constexpr, LOADER_REGS: gl.constexpr,
        PV_REGS: gl.constexpr, HAS_SEQ_IDX: gl.constexpr, P_SCALE: gl.constexpr, LAZY_RESCALE: gl.constexpr,
        RESCALE_TAU: gl.constexpr, PIPELINE_QK: gl.constexpr,
    ):  # fmt: skip
        # The grid and the contract of mla_decode_gluon_kernel; partitions: warpgroup 0 (S, softmax), two P V
        # warpgroups (output columns [0, 256) and [256, 512)), the TMA loader warp.
        b, h0, split, seq_len, start, end = _program_keys(seq_lens_ptr, num_splits, num_head_blocks, BLOCK_H, BLOCK_N)
        if start >= seq_len:
            return  # an empty split: writes nothing; the merge reads only the non-empty ones
        num_tiles = gl.cdiv(end - start, BLOCK_N)

        fp8: gl.constexpr = gl.float8e4nv
        q_smem = gl.allocate_shared_memory(
            fp8, [BLOCK_H, D_LATENT], gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_LATENT], fp8)
        )
        qpe_smem = gl.allocate_shared_memory(
            fp8, [BLOCK_H, D_ROPE], gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_ROPE], fp8)
        )
        kv_bufs = gl.allocate_shared_memory(
            fp8, [NUM_STAGES, BLOCK_N, D_LATENT], gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_LATENT], fp8)
        )
        pe_bufs = gl.allocate_shared_memory(
            fp8, [NUM_STAGES, BLOCK_N, D_ROPE], gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_ROPE], fp8)
        )
        p_bufs = gl.allocate_shared_memory(
            fp8, [2, BLOCK_H, BLOCK_N], gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N], fp8)
        )
        flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        a_bufs = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], flat)  # a layout of rank 1: buffers of [BLOCK_H]
        qs_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_H], flat)
        full_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        p_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        p_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(NUM_STAGES):
            mbarrier.init(full_bars.index(st), count=1)
            mbarrier.init(empty_bars.index(st), count=3)  # warpgroup 0 after its QK, 1 and 2 after loading V^T
        for j in gl.static_range(2):
            mbarrier.init(p_full.index(j), count=1)
            mbarrier.init(p_empty.index(j), count=2)  # both P V warpgroups
        mbarrier.init(q_bar.index(0), count=1)
        fence_async_shared()

        if HAS_SEQ_IDX:
            pt_row_off = gl.load(seq_idx_ptr + b).to(gl.int64) * stride_pt_b
        else:
            pt_row_off = b.to(gl.int64) * stride_pt_b
        o_base = o_ptr + b.to(gl.int64) * stride_o_b + split * stride_o_s + h0 * stride_o_h
        q_nope_base = q_nope_ptr + b.to(gl.int64) * stride_qn_b + h0.to(gl.int64) * stride_qn_h  # int64: see the
        q_pe_base = q_pe_ptr + b.to(gl.int64) * stride_qp_b + h0.to(gl.int64) * stride_qp_h  # bf16 kernel's q bases
        m_i, l_i = gl.warp_specialize(
            [
                (
                    _mla_fp8_softmax_partition,
                    (q_smem, qpe_smem, qs_smem, q_bar.index(0), kv_bufs, pe_bufs, p_bufs, a_bufs, full_bars,
                     empty_bars, p_full, p_empty, start, end, num_tiles, sm_scale_log2, out_scale, BLOCK_H, BLOCK_N,
                     NUM_STAGES, P_SCALE, LAZY_RESCALE, RESCALE_TAU, PIPELINE_QK),
                ),
                (
                    _mla_fp8_pv_partition,
                    (q_nope_base, q_pe_base, stride_qn_h, stride_qp_h, q_smem, qpe_smem, qs_smem, q_bar.index(0),
                     kv_bufs, p_bufs, a_bufs, full_bars, empty_bars, p_full, p_empty, o_base, stride_o_h,
                     num_tiles, 0, True, BLOCK_H, BLOCK_N, D_LATENT, D_ROPE, NUM_STAGES, LAZY_RESCALE),
                ),
                (
                    _mla_fp8_pv_partition,
                    (q_nope_base, q_pe_base, stride_qn_h, stride_qp_h, q_smem, qpe_smem, qs_smem, q_bar.index(0),
                     kv_bufs, p_bufs, a_bufs, full_bars, empty_bars, p_full, p_empty, o_base, stride_o_h,
                     num_tiles, D_LATENT // 2, False, BLOCK_H, BLOCK_N, D_LATENT, D_ROPE, NUM_STAGES,
                     LAZY_RESCALE),
                ),
                (
                    _mla_load_partition,
                    (kv_desc, pe_desc, page_table_ptr, pt_row_off, start, num_tiles, kv_bufs, pe_bufs, full_bars,
                     empty_bars, PAGE_SIZE, BLOCK_N, NUM_STAGES),
                ),
            ],
            [4, 4, 1],
            [PV_REGS, PV_REGS, LOADER_REGS],
        )  # fmt: skip
        if STORE_LSE:
            rows: gl.constexpr = l_i.type.layout
            lse = m_i + gl.log2(l_i)
            offs_r = gl.arange(0, BLOCK_H, layout=rows)
            gl.store(lse_ptr + b.to(gl.int64) * stride_lse_b + split + (h0 + offs_r) * stride_lse_h, lse)


def fp8_descriptors(cache: torch.Tensor, d_latent: int) -> tuple[Any, Any]:
    """TMA descriptors over an e4m3 cache's latent and rope columns, as [num_pages * page_size, D] matrices."""
    fp8 = gl.float8e4nv
    rows, row_stride = cache.shape[0] * cache.shape[1], cache.stride(1)
    d_rope = cache.shape[2] - d_latent
    lat_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, d_latent], fp8)
    pe_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, d_rope], fp8)
    rope = cache[..., d_latent:]  # starts d_latent bytes into each row (512: 16-byte aligned)
    kv_desc = GluonTensorDescriptor(cache, [rows, d_latent], [row_stride, 1], [BLOCK_N, d_latent], lat_layout)
    pe_desc = GluonTensorDescriptor(rope, [rows, d_rope], [row_stride, 1], [BLOCK_N, d_rope], pe_layout)
    return kv_desc, pe_desc


def fp8_kernel_launch_args(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_idx: torch.Tensor | None,
    o_part: torch.Tensor,
    lse: torch.Tensor,
    o_strides: tuple[int, ...],
    splits: int,
    sm_scale: float,
    kv_scale: float,
    variant: Fp8MmaVariant = DEFAULT_VARIANT,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(positional args, keyword args) of `mla_decode_gluon_fp8_kernel` for checked inputs (its launch minus the
    grid): kv_scale folded into the score scale and the output scale."""
    kv_desc, pe_desc = fp8_descriptors(cache, q_nope.shape[2])
    args = (
        q_nope, q_pe, kv_desc, pe_desc, page_table, seq_lens, seq_idx if seq_idx is not None else seq_lens, o_part,
        lse, float(sm_scale) * float(kv_scale) * _LOG2E, float(kv_scale), q_nope.stride(0), q_nope.stride(1),
        q_pe.stride(0), q_pe.stride(1), page_table.stride(0), *o_strides, splits, q_nope.shape[1] // BLOCK_H,
    )  # fmt: skip
    kwargs = dict(
        PAGE_SIZE=cache.shape[1], D_LATENT=q_nope.shape[2], D_ROPE=q_pe.shape[2], BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N,
        NUM_STAGES=NUM_STAGES, STORE_LSE=splits > 1, LOADER_REGS=LOADER_REGS, PV_REGS=PV_REGS,
        HAS_SEQ_IDX=seq_idx is not None, P_SCALE=float(variant.p_scale), LAZY_RESCALE=variant.lazy_rescale,
        RESCALE_TAU=float(variant.rescale_tau), PIPELINE_QK=variant.pipeline_qk, num_warps=NUM_WARPS,
        maxnreg=MAX_REGS,
    )  # fmt: skip
    return args, kwargs


def mla_decode_gluon_fp8(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    num_kv_splits: int | None = None,
    max_seq_len: int | None = None,
    seq_idx: torch.Tensor | None = None,
    kv_scale: float = 1.0,
    variant: Fp8MmaVariant = DEFAULT_VARIANT,
) -> torch.Tensor:
    """Absorbed-MLA decode with FP8 MMAs over a float8_e4m3fn cache holding latent / `kv_scale`: `mla_decode_gluon`
    with `fp8_mma` (its contract: q bf16, out bf16; the numerics of this module's docstring, and `variant`'s)."""
    if cache.dtype != torch.float8_e4m3fn:
        raise ValueError(f"the FP8-MMA kernel takes a float8_e4m3fn cache, got {cache.dtype}")
    return mla_decode_gluon(q_nope, q_pe, cache, page_table, seq_lens, sm_scale, num_kv_splits, max_seq_len, seq_idx,
                            kv_scale, fp8_mma=True, fp8_variant=variant)  # fmt: skip


def mla_decode_fp8_math_ref(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    num_kv_splits: int = 1,
    kv_scale: float = 1.0,
    seq_idx: torch.Tensor | None = None,
    variant: Fp8MmaVariant = DEFAULT_VARIANT,
) -> torch.Tensor:
    """What `mla_decode_gluon_fp8` computes (with `variant`), in float32 torch on any device (a test oracle, slow).

    The kernel's steps in its order: q rounded to e4m3 a row; per split (cut as the kernel cuts it) and per
    BLOCK_N-token tile, log2-domain scores, the running max m (lazy: moved only when the tile's max passes it by
    more than rescale_tau), P = exp2(s - m) rounded to e4m3 after x p_scale, the rescale of what came before; the
    splits merged by their LSE. It differs from the kernel only in fp32
    summation order (and where that flips an e4m3 rounding of P), not in any rounding the kernel makes."""
    batch, num_heads, d_latent = q_nope.shape
    fp8 = torch.float8_e4m3fn
    p_scale = float(variant.p_scale)
    out = torch.empty(batch, num_heads, d_latent, dtype=torch.float32, device=q_nope.device)
    page_size = cache.shape[1]
    q = torch.cat([q_nope.float(), q_pe.float()], dim=-1)  # [B, H, 576]
    amax = q.abs().amax(dim=-1, keepdim=True)
    q_scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q8 = (q / q_scale).to(fp8).float()
    row_scale = q_scale[..., 0] * (float(sm_scale) * float(kv_scale) * _LOG2E)  # [B, H]
    for b in range(batch):
        n = int(seq_lens[b])
        row = int(seq_idx[b]) if seq_idx is not None else b
        pos = torch.arange(n, device=cache.device)
        pages = page_table[row, pos // page_size].long()
        kv = cache[pages, pos % page_size].float()  # [n, 576] as stored (latent / kv_scale)
        per_split = -(-n // num_kv_splits)
        chunk = -(-per_split // BLOCK_N) * BLOCK_N  # whole tiles, as the kernel cuts them
        parts, lses = [], []
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            m = torch.full((num_heads,), float("-inf"), device=q.device)
            l_sum = torch.zeros(num_heads, device=q.device)
            acc = torch.zeros(num_heads, d_latent, device=q.device)
            for t0 in range(start, end, BLOCK_N):
                k = kv[t0 : min(t0 + BLOCK_N, end)]
                s = (q8[b] @ k.T) * row_scale[b][:, None]
                tile_max = s.amax(dim=1)
                if variant.lazy_rescale:
                    m_new = torch.where(tile_max > m + variant.rescale_tau, tile_max, m)
                else:
                    m_new = torch.maximum(m, tile_max)
                alpha = torch.exp2(m - m_new)
                p = torch.exp2(s - m_new[:, None])
                l_sum = l_sum * alpha + p.sum(dim=1)
                p8 = (p * p_scale).to(fp8).float()
                acc = acc * alpha[:, None] + p8 @ k[:, :d_latent]
                m = m_new
            parts.append(acc * (float(kv_scale) / (p_scale * l_sum))[:, None])
            lses.append(m + torch.log2(l_sum))
        lse = torch.stack(lses)  # [splits, H]
        w = torch.exp2(lse - lse.amax(dim=0))
        out[b] = (torch.stack(parts) * (w / w.sum(dim=0))[..., None]).sum(dim=0)
    return out.to(q_nope.dtype)
