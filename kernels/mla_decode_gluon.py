"""MLA decode at 64-head blocks as a warp-specialised Gluon kernel for Hopper (sm_90a): TMA loads + async wgmma.

Same problem and contract as `mla_decode.mla_decode` (absorbed MLA: every head attends to the same latent
rows; key = [latent 512 | rope 64], value = latent), written in Gluon, Triton's explicit dialect, so that the
KV loads overlap the MMAs and the two warpgroups do different jobs at the same time.

One CTA = (sequence b, 64-head block, KV split); the head blocks of one (b, split) are adjacent in the grid,
so the second reads the rows from L2. Shared memory: Q (64 x 576, loaded once), a ring of NUM_STAGES KV
tiles (64 rows x 576), P (64 x 64 bf16) and a 64-float row buffer. Partitions, split by role:
- loader (1 warp; an FP8 cache's is 4, see below): waits `empty[s]`, TMA-loads the next 64-row tile (one page holds it whole, so it is one
  [64, 512] + one [64, 64] box pair at row page * page_size + offset) and arms `full[s]` with its bytes;
- warpgroup 0 (default, 4 warps): the whole S = Q K^T tile by wgmma (m64 n64 k576, both operands in shared
  memory: 128 B/clk of shared reads, what the wgmma rate needs), the online softmax in the log2 domain with
  in-warp row reductions only, hands P and the row rescale to warpgroup 1 through shared memory and an
  mbarrier pair, then O[:, :256] += P V with P from its registers;
- warpgroup 1 (worker, 4 warps): only O[:, 256:] += P V, which runs under warpgroup 0's next QK; it
  normalises and stores its half of O itself. Both warpgroups release a KV stage (`empty` counts 2).
Measured slower on the H100 at batch >= 32 and removed (docs/PERF.md): both warpgroups computing S for 32
tokens each (n32 wgmmas need 192 B/clk of shared reads and stall; 5 CTA barriers a tile), 8-12%; warpgroup 0's
P V reading P from shared memory instead of registers, 0-1.5%; queuing tile i + 1's QK behind tile i's P V,
9-14% (why was not established).
Splits write float32 partials and a log2-domain LSE that `mla_decode_merge_kernel` combines, the merge
the Triton kernel uses (empty splits write nothing; the merge reads only the splits that hold tokens).
Handled: bf16 or float8_e4m3fn caches (q bf16), D_LATENT 512 + D_ROPE 64, heads a multiple of 64, page_size a
multiple of 64 (64, 128, ...). Page 1 needs a row gather that Hopper TMA lacks: `gluon_mla_decode_supported`
says False and the caller keeps the Triton kernel. Gluon is imported guarded: on CPU or a Triton without it this
module still imports.
NOTE: TMA reads whole 64-row tiles, so cache rows past a sequence's end must be finite (the cache is
zero-initialised); their scores are masked to -inf, so finite junk contributes exactly 0.

FP8 (e4m3) cache, holding latent / kv_scale: `KV_FP8`, a constexpr branch that changes only the loader. The cache
is read as e4m3 (half the HBM bytes) and converted to bf16 on the way into the same bf16 ring, so the softmax and
P V partitions, their bf16 wgmmas and their numerics are the bf16 kernel's: e4m3 -> bf16 is exact, and the result
equals the bf16 kernel's over the cache upcast to bf16 (the tests check it bit for bit). kv_scale folds as in
the Triton kernel: into the softmax scale (q . (k s) = s q . k) and into each split's output (P (v s) = s P v),
here as the row factor v_scale / l_i, so the LSE and the merge are unchanged.
Why this design, (a) convert to bf16, and not (b) an FP8 wgmma with q (and P) quantized to e4m3:
- (b) changes the numerics the model sees: q would lose all but 3 mantissa bits on top of the cache's own
  rounding (about twice the score error), and P in e4m3 loses every weight below 2^-9; the FP8 MLA path of
  FlashMLA accepts that, we keep the bf16 kernel's accuracy. (b) also needs V transposed in shared memory: an
  FP8 wgmma reads its B operand K-major only, and V = the latent rows is N-major.
- no room for an e4m3 TMA ring: Q (72 KB) + 2 bf16 stages (144 KB) + P (8 KB) are 224 of the 227 KB, and one
  e4m3 stage is 36 KB (with one bf16 stage, tile i + 1's QK would wait for tile i's P V). So the loader
  partition grows to 4 warps (`_mla_convert_partition`) that load the e4m3 tile into registers (16-byte
  loads, the whole tile in flight while it waits for the stage), convert with integer ops and one bf16
  multiply a pair (`_E4M3_TO_BF16_PTX`; Triton's cast would go through the quarter-rate F2F), store bf16 into
  the swizzled stage (conflict-free layout) and fence before arriving. Shared-memory traffic a tile is the
  bf16 kernel's (the converter's stores replace TMA's writes); registers move 240/240/24 -> 232/168/104.
  Rows past the sequence's end are loaded as 0, so this path needs no finite junk there.
What it cannot change: the tile's FLOPs (bf16 wgmmas, 4.7 + 4.2 MFLOP a 64-head tile) and the softmax. At batch
32 x 8k the bf16 kernel moves ~2.0 TB/s at ~480 TFLOP/s; halving the bytes helps as far as the loads, not the MMAs,
bound it. Measured (H100, 2026-12-07, docs/PERF.md): the FP8 path runs at 0.66-0.91x the bf16 kernel (0.74x at
32 x 8k, ~800 GB/s of e4m3), 1.3-2.2x the Triton FP8 kernel: it is correct and holds twice the tokens, but slower.
(b) is `mla_decode_gluon_fp8.py` (the default over an FP8 cache since 2026-12-07, after `loadtest/probe_fp8_qk.py`
measured its accuracy cost); this path stays for `--kv-cache-fp8-math bf16`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from baleen.kernels.device import sm_count
from baleen.kernels.mla_decode import (
    _LOG2E,
    check_mla_decode_inputs,
    merge_splits,
    pick_num_kv_splits,
    split_buffers,
)

if TYPE_CHECKING:
    from baleen.kernels.mla_decode_gluon_fp8 import Fp8MmaVariant

try:  # Gluon exists from Triton 3.4; the API below is the one of Triton 3.6 (the GPU box's)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor

    _GLUON_IMPORT_ERROR: str | None = None
except Exception as e:  # pragma: no cover - depends on the installed Triton
    _GLUON_IMPORT_ERROR = f"{type(e).__name__}: {e}"

BLOCK_H = 64  # heads per CTA: the wgmma M of one warpgroup
BLOCK_N = 64  # KV rows per tile (a page of 64 or 128 rows holds whole tiles)
NUM_STAGES = 2  # KV ring depth: 2 x 72 KB + Q 72 KB + P 8 KB fill the 227 KB of shared memory
NUM_WARPS = 4  # the launch's warps: warpgroup 0 (the default partition)
LOADER_REGS = 24  # the loader only does scalar address math and TMA issues
MAX_REGS = 168  # per thread at launch: 12 warps (3 warpgroups, the loader's padded) x 168 <= 64K registers
PV_REGS = 240  # warpgroup 1's budget (its O half: 128 fp32 registers a thread)
# FP8 cache: the loader is a 4-warp converter holding a whole e4m3 tile in flight (72 registers of data), so the
# others give up registers: 232 + 168 + 104 = the 504 a thread slot that 240 + 240 + 24 is (ptxas for sm_90a,
# triton 3.6: no spills; the converter spills 48 bytes at 96, warpgroup 1 336 bytes at 152).
FP8_LOADER_WARPS = 4
FP8_LOADER_REGS = 104
FP8_PV_REGS = 168

# e4m3 -> bf16, four values (one 32-bit register) at a time, exactly: a byte x = s eeee mmm moved to s 0000eeee mmm0000
# as bf16 bits is x's value times 2^-120 (the exponent biases are 7 and 127; an e4m3 subnormal lands on a bf16
# subnormal of the same mantissa, 0 on 0), and one bf16 multiply by 2^120 (0x7B80) restores it. Integer ops and
# one HFMA2 a pair, where Triton's cast goes e4m3x2 -> f16x2 -> two f16 -> bf16 conversions, the latter at the
# conversion pipe's quarter rate: 36,864 of them a tile would take the converter warps ~2,300 cycles a tile.
_E4M3_TO_BF16_PTX = """
{
.reg .b32 lo, hi, sgn, mag, two120, nzero;
mov.b32 two120, 0x7B807B80;
mov.b32 nzero, 0x80008000;
prmt.b32 lo, $2, 0, 0x1404;
prmt.b32 hi, $2, 0, 0x3424;
and.b32 sgn, lo, 0x80008000;
shr.b32 mag, lo, 4;
and.b32 mag, mag, 0x07F007F0;
or.b32 lo, sgn, mag;
fma.rn.bf16x2 $0, lo, two120, nzero;
and.b32 sgn, hi, 0x80008000;
shr.b32 mag, hi, 4;
and.b32 mag, mag, 0x07F007F0;
or.b32 hi, sgn, mag;
fma.rn.bf16x2 $1, hi, two120, nzero;
}
"""

if _GLUON_IMPORT_ERROR is None:
    _E4M3_TO_BF16_ASM = gl.constexpr(_E4M3_TO_BF16_PTX)  # a jit function reads only constexpr globals

    @gluon.jit
    def _e4m3_to_bf16(x):
        # x: e4m3 values, each thread's in runs of 4 (16-byte loads); exact (see _E4M3_TO_BF16_PTX)
        return gl.inline_asm_elementwise(
            _E4M3_TO_BF16_ASM, "=r,=r,r", [x], dtype=gl.bfloat16, is_pure=True, pack=4
        )

    @gluon.jit
    def _mla_load_partition(
        kv_desc, pe_desc, page_table_ptr, pt_row_off, start, num_tiles, kv_bufs, pe_bufs, full_bars, empty_bars,
        PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    ):  # fmt: skip
        # Loader warp: tile i of this split is rows [t0, t0 + BLOCK_N) of one page (PAGE_SIZE % BLOCK_N == 0).
        tile_bytes: gl.constexpr = kv_desc.block_type.nbytes + pe_desc.block_type.nbytes
        for i in range(num_tiles):
            stage = i % NUM_STAGES
            phase = (i // NUM_STAGES) & 1
            # A fresh mbarrier counts as having completed the phase before 0, so round 0 passes at once.
            mbarrier.wait(empty_bars.index(stage), phase ^ 1)
            t0 = start + i * BLOCK_N
            page = gl.load(page_table_ptr + pt_row_off + t0 // PAGE_SIZE)
            row0 = page * PAGE_SIZE + t0 % PAGE_SIZE
            bar = full_bars.index(stage)
            mbarrier.expect(bar, tile_bytes)
            tma.async_copy_global_to_shared(kv_desc, [row0, 0], bar, kv_bufs.index(stage))
            tma.async_copy_global_to_shared(pe_desc, [row0, 0], bar, pe_bufs.index(stage))

    @gluon.jit
    def _mla_convert_partition(
        cache_ptr, stride_row, page_table_ptr, pt_row_off, start, end, num_tiles, kv_bufs, pe_bufs, full_bars,
        empty_bars, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, D_LATENT: gl.constexpr, D_ROPE: gl.constexpr,
        NUM_STAGES: gl.constexpr,
    ):  # fmt: skip
        # FP8 cache, 4 warps: tile i (rows [t0, t0 + BLOCK_N) of one page) is loaded as e4m3 into registers
        # (16-byte loads), converted to bf16 (exact: e4m3 is a subset of bf16) and stored into the bf16 ring
        # the wgmmas read, in place of the loader's TMA. A thread holds 16 consecutive values of a row and a
        # warp 8 rows x 64 columns, so each 16-byte bf16 store of a warp lands in 8 distinct 16-byte bank groups
        # of the 128-byte-swizzled buffer (4 wavefronts for 512 bytes, no conflicts beyond those).
        CHUNK: gl.constexpr = 128  # latent columns a load covers: 16 registers of e4m3 a thread
        ld: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [4, 1], [1, 0])
        rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld))
        offs = rows[:, None] * stride_row + gl.arange(0, CHUNK, layout=gl.SliceLayout(0, ld))[None, :]
        offs_pe = (
            rows[:, None] * stride_row
            + D_LATENT
            + gl.arange(0, D_ROPE, layout=gl.SliceLayout(0, ld))[None, :]
        )
        gl.static_assert(D_LATENT == 4 * CHUNK, "the converter splits the latent into four 128-column loads")
        for i in range(num_tiles):
            stage = i % NUM_STAGES
            t0 = start + i * BLOCK_N
            page = gl.load(page_table_ptr + pt_row_off + t0 // PAGE_SIZE)
            base = cache_ptr + (page.to(gl.int64) * PAGE_SIZE + t0 % PAGE_SIZE) * stride_row
            # Rows past the sequence's end read as 0 (unlike TMA's whole tiles, whatever the cache holds there).
            live = ((t0 + rows) < end)[:, None]  # [BLOCK_N, 1]
            # The whole tile is loaded before waiting for its stage: the loads fly while the stage is in use.
            x0 = gl.load(base + offs, mask=live, other=0.0)  # [BLOCK_N, CHUNK] e4m3
            x1 = gl.load(base + CHUNK + offs, mask=live, other=0.0)
            x2 = gl.load(base + 2 * CHUNK + offs, mask=live, other=0.0)
            x3 = gl.load(base + 3 * CHUNK + offs, mask=live, other=0.0)
            xp = gl.load(base + offs_pe, mask=live, other=0.0)  # [BLOCK_N, D_ROPE] e4m3
            # A fresh mbarrier counts as having completed the phase before 0, so round 0 passes at once.
            mbarrier.wait(empty_bars.index(stage), ((i // NUM_STAGES) & 1) ^ 1)
            kv = kv_bufs.index(stage)  # [BLOCK_N, D_LATENT] bf16
            kv.slice(0, CHUNK, dim=1).store(_e4m3_to_bf16(x0))
            kv.slice(CHUNK, CHUNK, dim=1).store(_e4m3_to_bf16(x1))
            kv.slice(2 * CHUNK, CHUNK, dim=1).store(_e4m3_to_bf16(x2))
            kv.slice(3 * CHUNK, CHUNK, dim=1).store(_e4m3_to_bf16(x3))
            pe_bufs.index(stage).store(_e4m3_to_bf16(xp))
            fence_async_shared()  # generic-proxy stores -> the wgmmas' async-proxy reads
            gl.thread_barrier()  # all 4 warps stored and fenced before the one arrival
            mbarrier.arrive(full_bars.index(stage), count=1)

    @gluon.jit
    def _mla_softmax_partition(
        q_nope_ptr, q_pe_ptr, stride_qn_h, stride_qp_h, q_smem, qpe_smem, kv_bufs, pe_bufs, p_smem, a_smem,
        full_bars, empty_bars, p_full, p_empty, start, end, num_tiles, sm_scale_log2, v_scale,
        BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, D_LATENT: gl.constexpr, D_ROPE: gl.constexpr,
        NUM_STAGES: gl.constexpr,
    ):  # fmt: skip
        # Warpgroup 0: the whole S tile, the softmax, P and the row rescale out to warpgroup 1, then
        # O[:, :D_LATENT / 2] += P V with P as a register operand.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D_LATENT // 2, 16]
        )
        # Q rows of this head block -> shared memory, once (16-byte vectors, coalesced along D).
        q_blk: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        offs_qh = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, q_blk)).to(gl.int64)  # x a head stride of T * D
        offs_qd = gl.arange(0, D_LATENT, layout=gl.SliceLayout(0, q_blk))
        offs_qr = gl.arange(0, D_ROPE, layout=gl.SliceLayout(0, q_blk))
        q = gl.load(q_nope_ptr + offs_qh[:, None] * stride_qn_h + offs_qd[None, :])  # [BLOCK_H, D_LATENT]
        q_smem.store(q)
        qpe = gl.load(q_pe_ptr + offs_qh[:, None] * stride_qp_h + offs_qr[None, :])  # [BLOCK_H, D_ROPE]
        qpe_smem.store(qpe)
        fence_async_shared()  # generic-proxy stores -> async-proxy (wgmma) reads
        gl.thread_barrier()  # Q is read by this warpgroup's wgmmas only

        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_H], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_H, D_LATENT // 2], gl.float32, layout=o_layout)
        s = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=s_layout)
        for i in range(num_tiles):
            stage = i % NUM_STAGES
            kv = kv_bufs.index(stage)  # [BLOCK_N, D_LATENT]: K's latent part and V
            pe = pe_bufs.index(stage)  # [BLOCK_N, D_ROPE]
            mbarrier.wait(full_bars.index(stage), (i // NUM_STAGES) & 1)
            s = warpgroup_mma(q_smem, kv.permute((1, 0)), s, use_acc=False, is_async=True)
            s = warpgroup_mma(qpe_smem, pe.permute((1, 0)), s, is_async=True)
            s, _, _, _, _ = warpgroup_mma_wait(0, deps=(s, q_smem, qpe_smem, kv, pe_bufs))
            # s: [BLOCK_H, BLOCK_N] scores of tile i
            valid = (start + i * BLOCK_N + offs_n) < end
            s = gl.where(valid[None, :], s * sm_scale_log2, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=1))  # a row lives in one warp: shuffles, no barrier
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + gl.sum(p, axis=1)
            # P / alpha are free once warpgroup 1 finished tile i - 1 (a fresh barrier passes round 0).
            mbarrier.wait(p_empty, (i & 1) ^ 1)
            p_smem.store(p.to(gl.bfloat16))
            a_smem.store(alpha)
            fence_async_shared()  # generic-proxy P stores -> warpgroup 1's wgmma reads
            gl.thread_barrier()
            mbarrier.arrive(p_full, count=1)
            # alpha back in O's row layout: the same registers, but a convert_layout would go through scratch
            # shared memory with two more barriers; this buffer was fenced by the barrier above.
            acc = acc * a_smem.load(gl.SliceLayout(1, o_layout))[:, None]
            v = kv.slice(0, D_LATENT // 2, dim=1)  # [BLOCK_N, D_LATENT / 2]
            # A operand from registers: 8 KB less shared-memory reading a tile than P from p_smem.
            p_op = gl.convert_layout(p.to(gl.bfloat16), gl.DotOperandLayout(0, o_layout, 2))
            acc = warpgroup_mma(p_op, v, acc, is_async=True)
            acc, _, _ = warpgroup_mma_wait(0, deps=(acc, p_smem, kv))
            gl.thread_barrier()  # all 4 warps' PV done: the stage may be released
            mbarrier.arrive(empty_bars.index(stage), count=1)
            m_i = m_new
        # One more round through the same buffer: warpgroup 1's output factor v_scale / row sum (l_i >= 1:
        # the row maximum's own term is exp2(0)).
        mbarrier.wait(p_empty, (num_tiles & 1) ^ 1)
        a_smem.store(v_scale / l_i)
        gl.thread_barrier()
        mbarrier.arrive(p_full, count=1)
        return m_i, l_i, acc

    @gluon.jit
    def _mla_pv_partition(
        kv_bufs, p_smem, a_smem, full_bars, empty_bars, p_full, p_empty, o_base, stride_o_h, num_tiles,
        BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, D_LATENT: gl.constexpr, NUM_STAGES: gl.constexpr,
    ):  # fmt: skip
        # Warpgroup 1 (worker, 4 warps): O[:, D_LATENT / 2:] += P V with warpgroup 0's P and rescale;
        # normalises and stores its half of O itself (workers return nothing).
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D_LATENT // 2, 16]
        )
        rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        acc = gl.zeros([BLOCK_H, D_LATENT // 2], gl.float32, layout=o_layout)
        for i in range(num_tiles):
            stage = i % NUM_STAGES
            mbarrier.wait(full_bars.index(stage), (i // NUM_STAGES) & 1)
            mbarrier.wait(p_full, i & 1)
            alpha = a_smem.load(rows)  # [BLOCK_H]
            acc = acc * alpha[:, None]
            kv = kv_bufs.index(stage)
            acc = warpgroup_mma(p_smem, kv.slice(D_LATENT // 2, D_LATENT // 2, dim=1), acc, is_async=True)
            acc, _, _ = warpgroup_mma_wait(0, deps=(acc, p_smem, kv))
            gl.thread_barrier()  # every warp read alpha and finished its PV
            mbarrier.arrive(p_empty, count=1)
            mbarrier.arrive(empty_bars.index(stage), count=1)
        mbarrier.wait(p_full, num_tiles & 1)
        out = acc * a_smem.load(rows)[:, None]  # v_scale / l_i
        offs_h = gl.arange(0, BLOCK_H, layout=rows)
        offs_c = D_LATENT // 2 + gl.arange(0, D_LATENT // 2, layout=gl.SliceLayout(0, o_layout))
        gl.store(o_base + offs_h[:, None] * stride_o_h + offs_c[None, :], out.to(o_base.dtype.element_ty))

    @gluon.jit
    def _program_keys(seq_lens_ptr, num_splits, num_head_blocks, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr):
        # This program's sequence b, first head h0, KV split, the sequence's length and the split's keys
        # [start, end) (start >= seq_len: an empty split). Head blocks vary fastest in program_id(0) (L2 sharing of
        # the KV rows); chunks are whole tiles (the merge kernel cuts seq_len the same way, with BLOCK_N).
        b = gl.program_id(0) // num_head_blocks
        h0 = (gl.program_id(0) % num_head_blocks) * BLOCK_H
        split = gl.program_id(1)
        seq_len = gl.load(seq_lens_ptr + b)
        chunk = gl.cdiv(gl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        start = split * chunk
        return b, h0, split, seq_len, start, gl.minimum(start + chunk, seq_len)

    @gluon.jit
    def mla_decode_gluon_kernel(
        q_nope_ptr, q_pe_ptr, kv_desc, pe_desc, cache_ptr, page_table_ptr, seq_lens_ptr, seq_idx_ptr, o_ptr,
        lse_ptr, sm_scale_log2, v_scale, stride_qn_b, stride_qn_h, stride_qp_b, stride_qp_h, stride_cache_row,
        stride_pt_b, stride_o_b, stride_o_h, stride_o_s, stride_lse_b, stride_lse_h, num_splits, num_head_blocks,
        PAGE_SIZE: gl.constexpr, D_LATENT: gl.constexpr, D_ROPE: gl.constexpr, BLOCK_H: gl.constexpr,
        BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, STORE_LSE: gl.constexpr, LOADER_WARPS: gl.constexpr,
        LOADER_REGS: gl.constexpr, PV_REGS: gl.constexpr, HAS_SEQ_IDX: gl.constexpr, KV_FP8: gl.constexpr,
    ):  # fmt: skip
        # Program (b x head block, split); head blocks vary fastest (L2 sharing of the KV rows). Launched with
        # num_warps=4: warpgroup 0; warp_specialize adds warpgroup 1 and the loader (bf16: 1 warp of TMA; FP8:
        # 4 warps converting e4m3 to bf16, with kv_desc / pe_desc None). sm_scale_log2 holds the cache's scale
        # (keys are cache * v_scale), and each split's output is multiplied by v_scale.
        b, h0, split, seq_len, start, end = _program_keys(seq_lens_ptr, num_splits, num_head_blocks, BLOCK_H, BLOCK_N)
        if start >= seq_len:
            return  # an empty split: writes nothing; the merge reads only the non-empty ones
        num_tiles = gl.cdiv(end - start, BLOCK_N)

        smem_q: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_LATENT], gl.bfloat16)
        smem_qpe: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_ROPE], gl.bfloat16)
        smem_p: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N], gl.bfloat16)
        smem_a: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        q_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, D_LATENT], smem_q)
        qpe_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, D_ROPE], smem_qpe)
        # The KV ring's layouts: those of `gluon_descriptors` (a bf16 cache's TMA writes them; an FP8 cache's
        # converter warps store bf16 into the same layout).
        smem_kv: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_LATENT], gl.bfloat16)
        smem_pe: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_ROPE], gl.bfloat16)
        kv_bufs = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BLOCK_N, D_LATENT], smem_kv)
        pe_bufs = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BLOCK_N, D_ROPE], smem_pe)
        p_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, BLOCK_N], smem_p)
        a_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_H], smem_a)  # row rescale, then row sums
        full_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        p_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # full, empty
        for st in gl.static_range(NUM_STAGES):
            mbarrier.init(full_bars.index(st), count=1)
            mbarrier.init(empty_bars.index(st), count=2)  # both warpgroups release a stage
        mbarrier.init(p_bars.index(0), count=1)
        mbarrier.init(p_bars.index(1), count=1)
        fence_async_shared()

        # int64 products: an extend step's q is [T, H, D] with a head stride of T * D when it comes from the
        # absorption einsum (layout [H, T, D]): h0 * stride passes 2^31 at 64k tokens (the 65.6k-token crash)
        q_row_off_n = b.to(gl.int64) * stride_qn_b + h0.to(gl.int64) * stride_qn_h
        q_row_off_p = b.to(gl.int64) * stride_qp_b + h0.to(gl.int64) * stride_qp_h
        if HAS_SEQ_IDX:  # extend: query row b is one new token of sequence seq_idx[b] (its page-table row)
            pt_row_off = gl.load(seq_idx_ptr + b).to(gl.int64) * stride_pt_b
        else:
            pt_row_off = b.to(gl.int64) * stride_pt_b
        o_base = o_ptr + b.to(gl.int64) * stride_o_b + split * stride_o_s + h0 * stride_o_h
        # The softmax and P V partitions are the same for both caches; only the loader differs (Gluon takes
        # no jit functions in variables, hence the two spelled-out calls).
        if KV_FP8:
            m_i, l_i, acc = gl.warp_specialize(
                [
                    (
                        _mla_softmax_partition,
                        (q_nope_ptr + q_row_off_n, q_pe_ptr + q_row_off_p, stride_qn_h, stride_qp_h, q_smem,
                         qpe_smem, kv_bufs, pe_bufs, p_smem, a_smem, full_bars, empty_bars, p_bars.index(0),
                         p_bars.index(1), start, end, num_tiles, sm_scale_log2, v_scale, BLOCK_H, BLOCK_N,
                         D_LATENT, D_ROPE, NUM_STAGES),
                    ),
                    (
                        _mla_pv_partition,
                        (kv_bufs, p_smem, a_smem, full_bars, empty_bars, p_bars.index(0), p_bars.index(1),
                         o_base, stride_o_h, num_tiles, BLOCK_H, BLOCK_N, D_LATENT, NUM_STAGES),
                    ),
                    (
                        _mla_convert_partition,
                        (cache_ptr, stride_cache_row, page_table_ptr, pt_row_off, start, end, num_tiles, kv_bufs,
                         pe_bufs, full_bars, empty_bars, PAGE_SIZE, BLOCK_N, D_LATENT, D_ROPE, NUM_STAGES),
                    ),
                ],
                [4, LOADER_WARPS],
                [PV_REGS, LOADER_REGS],
            )  # fmt: skip
        else:
            m_i, l_i, acc = gl.warp_specialize(
                [
                    (
                        _mla_softmax_partition,
                        (q_nope_ptr + q_row_off_n, q_pe_ptr + q_row_off_p, stride_qn_h, stride_qp_h, q_smem,
                         qpe_smem, kv_bufs, pe_bufs, p_smem, a_smem, full_bars, empty_bars, p_bars.index(0),
                         p_bars.index(1), start, end, num_tiles, sm_scale_log2, v_scale, BLOCK_H, BLOCK_N,
                         D_LATENT, D_ROPE, NUM_STAGES),
                    ),
                    (
                        _mla_pv_partition,
                        (kv_bufs, p_smem, a_smem, full_bars, empty_bars, p_bars.index(0), p_bars.index(1),
                         o_base, stride_o_h, num_tiles, BLOCK_H, BLOCK_N, D_LATENT, NUM_STAGES),
                    ),
                    (
                        _mla_load_partition,
                        (kv_desc, pe_desc, page_table_ptr, pt_row_off, start, num_tiles, kv_bufs, pe_bufs,
                         full_bars, empty_bars, PAGE_SIZE, BLOCK_N, NUM_STAGES),
                    ),
                ],
                [4, LOADER_WARPS],
                [PV_REGS, LOADER_REGS],
            )  # fmt: skip

        # Epilogue (warpgroup 0): its half of O; the LSE (log2 domain) when there are splits.
        o_layout: gl.constexpr = acc.type.layout
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        l_o = gl.convert_layout(l_i, o_rows)
        out = acc * (v_scale / l_o)[:, None]  # l_i >= 1: the row maximum's own term is exp2(0)
        offs_h = gl.arange(0, BLOCK_H, layout=o_rows)
        offs_c = gl.arange(0, D_LATENT // 2, layout=gl.SliceLayout(0, o_layout))
        gl.store(o_base + offs_h[:, None] * stride_o_h + offs_c[None, :], out.to(o_ptr.dtype.element_ty))
        if STORE_LSE:
            lse = gl.convert_layout(m_i, o_rows) + gl.log2(l_o)
            gl.store(lse_ptr + b.to(gl.int64) * stride_lse_b + split + (h0 + offs_h) * stride_lse_h, lse)


def _gluon_ready() -> bool:
    """True when the Gluon API this file is written against (Triton 3.6's) is importable.

    Names move between releases (3.9 has no `gl.thread_barrier`): a Triton without them is unsupported.
    """
    if _GLUON_IMPORT_ERROR is not None:
        return False
    return (
        hasattr(tma, "async_copy_global_to_shared")
        and hasattr(gl, "thread_barrier")
        and hasattr(gl, "warp_specialize")
    )


def gluon_mla_decode_supported(
    device: torch.device | str,
    num_heads: int,
    d_latent: int,
    d_rope: int,
    page_size: int,
    cache_dtype: torch.dtype = torch.bfloat16,
) -> bool:
    """True when `mla_decode_gluon` handles this device, shape and cache dtype (sm_90 CUDA, 64-multiple heads,
    512 + 64, page % 64 == 0, a bf16 or float8_e4m3fn cache; q is bf16 either way)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not _gluon_ready():
        return False
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False
    return (
        num_heads % BLOCK_H == 0
        and num_heads > 0
        and d_latent == 512
        and d_rope == 64
        and page_size % BLOCK_N == 0
        and cache_dtype in (torch.bfloat16, torch.float8_e4m3fn)
    )


def gluon_descriptors(cache: torch.Tensor, d_latent: int) -> tuple[Any, Any]:
    """TMA descriptors over a bf16 cache's latent and rope columns, as [num_pages * page_size, D] matrices."""
    rows, row_stride = cache.shape[0] * cache.shape[1], cache.stride(1)
    lat_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, d_latent], gl.bfloat16)
    pe_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, cache.shape[2] - d_latent], gl.bfloat16)
    rope = cache[..., d_latent:]  # starts d_latent values into each row (1 KB: 16-byte aligned)
    kv_desc = GluonTensorDescriptor(cache, [rows, d_latent], [row_stride, 1], [BLOCK_N, d_latent], lat_layout)
    pe_desc = GluonTensorDescriptor(
        rope, [rows, rope.shape[2]], [row_stride, 1], [BLOCK_N, rope.shape[2]], pe_layout
    )
    return kv_desc, pe_desc


def kernel_launch_args(
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
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(positional args, keyword args) of `mla_decode_gluon_kernel` for checked inputs (its launch minus the grid).

    A bf16 cache goes in as TMA descriptors; an e4m3 one as the plain pointer its converter warps load from.
    """
    d_latent, page_size = q_nope.shape[2], cache.shape[1]
    fp8 = cache.dtype == torch.float8_e4m3fn
    kv_desc, pe_desc = (None, None) if fp8 else gluon_descriptors(cache, d_latent)
    args = (
        q_nope, q_pe, kv_desc, pe_desc, cache, page_table, seq_lens, seq_idx if seq_idx is not None else seq_lens,
        o_part, lse, float(sm_scale) * float(kv_scale) * _LOG2E, float(kv_scale),  # keys are cache * kv_scale
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), cache.stride(1), page_table.stride(0),
        *o_strides, splits, q_nope.shape[1] // BLOCK_H,
    )  # fmt: skip
    kwargs = dict(
        PAGE_SIZE=page_size, D_LATENT=d_latent, D_ROPE=q_pe.shape[2], BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N,
        NUM_STAGES=NUM_STAGES, STORE_LSE=splits > 1, LOADER_WARPS=FP8_LOADER_WARPS if fp8 else 1,
        LOADER_REGS=FP8_LOADER_REGS if fp8 else LOADER_REGS, PV_REGS=FP8_PV_REGS if fp8 else PV_REGS,
        HAS_SEQ_IDX=seq_idx is not None, KV_FP8=fp8, num_warps=NUM_WARPS, maxnreg=MAX_REGS,
    )  # fmt: skip
    return args, kwargs


def mla_decode_gluon(
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
    fp8_mma: bool = False,
    fp8_variant: Fp8MmaVariant | None = None,
) -> torch.Tensor:
    """Absorbed-MLA decode on Hopper, same contract as `mla_decode.mla_decode` (without tiles).

    q_nope [B, H, 512] bf16 (already multiplied by W_UK), q_pe [B, H, 64] bf16 (rotated), cache
    [num_pages, page_size, 576] (latent then rope; page_size a multiple of 64) bf16, or float8_e4m3fn holding
    latent / `kv_scale` (one scale for the whole tensor), page_table [B, max_pages] int32, seq_lens [B] int32
    (>= 1). With `seq_idx` [B] int32 (extend: every new token is a row), row b reads page-table row seq_idx[b]
    and sees seq_lens[b] keys. Returns out [B, H, 512] bf16. `num_kv_splits` fixes the split count (default:
    `pick_num_kv_splits` from the batch shape and `max_seq_len`, else the page table's capacity).
    Raises ValueError where `gluon_mla_decode_supported` would say False. `fp8_mma` with an e4m3 cache: FP8 MMAs
    (`mla_decode_gluon_fp8.py`: q and P rounded to e4m3) instead of the cache converted to bf16; `fp8_variant` picks
    one of that kernel's variants (default: `DEFAULT_VARIANT`).
    """
    batch, num_heads, d_latent, d_rope = check_mla_decode_inputs(
        q_nope, q_pe, cache, page_table, seq_lens, seq_idx
    )
    page_size = cache.shape[1]
    if q_nope.dtype != torch.bfloat16 or cache.dtype not in (torch.bfloat16, torch.float8_e4m3fn):
        raise ValueError(
            f"the Gluon kernel takes bf16 q and a bf16 or float8_e4m3fn cache, got {q_nope.dtype} and {cache.dtype}"
        )
    if (cache.stride(1) * cache.element_size()) % 16 or cache.data_ptr() % 16:
        raise ValueError("the Gluon kernel needs the cache base and row stride 16-byte aligned")
    if not gluon_mla_decode_supported(q_nope.device, num_heads, d_latent, d_rope, page_size, cache.dtype):
        raise ValueError(
            f"the Gluon MLA kernel does not handle heads={num_heads}, D={d_latent}+{d_rope}, page_size={page_size} "
            f"on {q_nope.device} (needs sm_90, heads % 64 == 0, 512 + 64, page_size % 64 == 0): use mla_decode"
        )
    page_table = page_table.contiguous()
    out = torch.empty((batch, num_heads, d_latent), dtype=q_nope.dtype, device=q_nope.device)
    if batch == 0:
        return out
    num_head_blocks = num_heads // BLOCK_H
    if num_kv_splits is None:
        cap = max_seq_len if max_seq_len is not None else page_table.shape[1] * page_size
        num_kv_splits = pick_num_kv_splits(batch, num_head_blocks, cap, sm_count(q_nope.device), BLOCK_H)
    splits = int(num_kv_splits)
    # NOTE: bf16 partials (half the bytes) measured slower on the H100 (b32 x 4k 0.1006 -> 0.1032 ms, b1 x 4k
    # 0.0222 -> 0.0256): stored from the wgmma register layout they go out 4 bytes a thread. float32 it is.
    o_part, lse, o_strides = split_buffers(out, splits)
    launch = (q_nope, q_pe, cache, page_table, seq_lens, seq_idx, o_part, lse, o_strides, splits, sm_scale, kv_scale)
    if fp8_mma and cache.dtype == torch.float8_e4m3fn:
        from baleen.kernels.mla_decode_gluon_fp8 import (
            DEFAULT_VARIANT,
            fp8_kernel_launch_args,
            mla_decode_gluon_fp8_kernel,
        )

        args, kwargs = fp8_kernel_launch_args(*launch, fp8_variant or DEFAULT_VARIANT)
        mla_decode_gluon_fp8_kernel[(batch * num_head_blocks, splits)](*args, **kwargs)
    else:
        args, kwargs = kernel_launch_args(*launch)
        mla_decode_gluon_kernel[(batch * num_head_blocks, splits)](*args, **kwargs)
    merge_splits(o_part, lse, out, seq_lens, splits, BLOCK_N)
    return out
