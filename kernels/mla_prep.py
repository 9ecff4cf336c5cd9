"""MLA's per-token glue before attention, in one launch: latent norm, rotary of q_pe and k_pe, cache write.

After the kv_a projection a token has latent = [c_kv (kv_lora_rank) | k_pe (rope)] and, after q_b, its query
heads q = [q_nope | q_pe] per head. This kernel, one program per token:
  - normalises c_kv (RMSNorm with the kv_a_layernorm weight, HF rounding),
  - rotates k_pe and every head's q_pe (interleaved pairs) by the token's cos/sin row, q_pe in place,
  - stores [c_kv | k_pe] into the paged cache at the token's flat slot (an FP8 e4m3 cache stores them times
    1 / its per-tensor scale, saturating at +-448; readers multiply by the scale),
  - optionally also into `kv_out` [T, kv_lora_rank + rope] (the expanded form needs c_kv and k_pe): the row as
    the cache holds it, read back (an FP8 cache's entries times its scale), so that a prompt's prefill attends
    to the values every later step reads. A latent made by a decode step and the same latent recomputed in a
    prefill (after a preemption, or another chunking) then agree up to float rounding, not up to FP8's.
Unfused, this is ~25 small torch launches per layer (norm, two rotaries, cat, index_put and their casts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baleen.kernels.rotary import apply_rotary_interleaved_ref


@triton.jit
def mla_prep_kernel(
    latent_ptr,
    norm_w_ptr,
    q_ptr,
    cos_sin_ptr,
    out_loc_ptr,
    cache_ptr,
    kv_out_ptr,
    num_heads,
    eps,
    inv_cache_scale,
    cache_scale,
    stride_latent,
    stride_qt,
    stride_qh,
    stride_cs,
    stride_kv_out,
    D_LATENT: tl.constexpr,
    HALF: tl.constexpr,
    Q_PE_OFFSET: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_KV_OUT: tl.constexpr,
):
    # Program (token, part): part 0 normalises and stores the latent, part p > 0 rotates head block p - 1 of
    # q_pe. Spreading the heads over programs keeps a single decode token from being one long serial program.
    t = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    offs_i = tl.arange(0, HALF)
    # cos/sin row of this token: [cos (HALF) | sin (HALF)], float32.
    cos = tl.load(cos_sin_ptr + t * stride_cs + offs_i)
    sin = tl.load(cos_sin_ptr + t * stride_cs + HALF + offs_i)
    if part == 0:
        offs_c = tl.arange(0, D_LATENT)
        row = latent_ptr + t * stride_latent
        # c_kv: RMSNorm in float32, rounded to the activation dtype before the weight (as HF does).
        c = tl.load(row + offs_c).to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(c * c, axis=0) / D_LATENT + eps)
        w = tl.load(norm_w_ptr + offs_c).to(tl.float32)
        c = (c * inv_rms).to(latent_ptr.dtype.element_ty).to(tl.float32) * w
        c_store = c.to(latent_ptr.dtype.element_ty)  # the activation-dtype value, as the unfused norm returns
        k0 = tl.load(row + D_LATENT + 2 * offs_i).to(tl.float32)
        k1 = tl.load(row + D_LATENT + 2 * offs_i + 1).to(tl.float32)
        r0 = (k0 * cos - k1 * sin).to(latent_ptr.dtype.element_ty)
        r1 = (k1 * cos + k0 * sin).to(latent_ptr.dtype.element_ty)
        slot = tl.load(out_loc_ptr + t).to(tl.int64)
        dst = cache_ptr + slot * (D_LATENT + 2 * HALF)
        # The cache holds value / scale (scale 1 unless the cache is FP8): the activation-dtype value, in float32
        # times the reciprocal, rounded once to the cache dtype (as mla_prep_ref does).
        cache_ty = cache_ptr.dtype.element_ty
        c_cached = (c_store.to(tl.float32) * inv_cache_scale).to(cache_ty)
        r0_cached = (r0.to(tl.float32) * inv_cache_scale).to(cache_ty)
        r1_cached = (r1.to(tl.float32) * inv_cache_scale).to(cache_ty)
        tl.store(dst + offs_c, c_cached)
        tl.store(dst + D_LATENT + 2 * offs_i, r0_cached)
        tl.store(dst + D_LATENT + 2 * offs_i + 1, r1_cached)
        if HAS_KV_OUT:  # what the cache now holds, read back as a reader reads it: entry x scale, in float32
            out = kv_out_ptr + t * stride_kv_out
            act_ty = kv_out_ptr.dtype.element_ty
            tl.store(out + offs_c, (c_cached.to(tl.float32) * cache_scale).to(act_ty))
            tl.store(out + D_LATENT + 2 * offs_i, (r0_cached.to(tl.float32) * cache_scale).to(act_ty))
            tl.store(out + D_LATENT + 2 * offs_i + 1, (r1_cached.to(tl.float32) * cache_scale).to(act_ty))
    else:
        heads = (part - 1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (heads < num_heads)[:, None]
        ptrs = q_ptr + t * stride_qt + heads[:, None] * stride_qh + Q_PE_OFFSET + 2 * offs_i[None, :]
        x0 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(ptrs + 1, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (x0 * cos[None, :] - x1 * sin[None, :]).to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(ptrs + 1, (x1 * cos[None, :] + x0 * sin[None, :]).to(q_ptr.dtype.element_ty), mask=mask)


def mla_prep_unsupported(d_latent: int, rope: int) -> str | None:
    """Why `mla_prep` cannot take a latent of `d_latent` (kv_lora_rank) values and a rope part of `rope`, or
    None when it can: a program holds c_kv and each half of the rope pair as power-of-two blocks.
    `mla_prep_ref` has no such limit."""
    half = rope // 2
    if d_latent < 1 or d_latent & (d_latent - 1):
        return f"kv_lora_rank={d_latent} is not a power of two"
    if half < 1 or half & (half - 1):
        return f"rope/2={half} is not a power of two"
    return None


def _check(
    latent: torch.Tensor, norm_weight: torch.Tensor, q: torch.Tensor, cos_sin: torch.Tensor, out_loc: torch.Tensor,
    cache: torch.Tensor, rope: int, kv_out: torch.Tensor | None,
) -> tuple[int, int]:
    # Layout checks shared by the kernel and the reference (the kernel's own limits: `mla_prep_unsupported`).
    if latent.dim() != 2 or q.dim() != 3 or cache.dim() != 3:
        raise ValueError("latent must be [T, D_LATENT + rope], q [T, H, nope + rope], cache [pages, page_size, D]")
    num_tokens, width = latent.shape
    d_latent = width - rope
    if rope < 2 or rope % 2 or d_latent < 1:
        raise ValueError(f"rope={rope} must be even and leave a latent in the {width} values (rotary pairs)")
    if cache.shape[2] != width:
        raise ValueError(f"cache rows hold {cache.shape[2]} values, the latent {width}")
    if q.shape[0] != num_tokens or out_loc.shape != (num_tokens,) or cos_sin.shape[0] != num_tokens:
        raise ValueError(f"q {tuple(q.shape)}, out_loc {tuple(out_loc.shape)}, cos_sin {tuple(cos_sin.shape)} "
                         f"disagree with {num_tokens} tokens")  # fmt: skip
    if q.shape[2] < rope or cos_sin.reshape(num_tokens, -1).shape[1] != rope:
        raise ValueError(f"q heads of {q.shape[2]} and cos_sin {tuple(cos_sin.shape)} do not fit rope={rope}")
    if latent.stride(1) != 1 or q.stride(2) != 1 or not cache.is_contiguous():
        raise ValueError("latent and q must be contiguous in their last dimension and the cache contiguous")
    if norm_weight.shape != (d_latent,):
        raise ValueError(f"norm_weight must be [{d_latent}], got {tuple(norm_weight.shape)}")
    if kv_out is not None and (kv_out.shape != latent.shape or kv_out.stride(1) != 1):
        raise ValueError(f"kv_out must be {tuple(latent.shape)} with contiguous rows")
    return num_tokens, d_latent


def mla_prep(
    latent: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    q: torch.Tensor,
    cos_sin: torch.Tensor,
    out_loc: torch.Tensor,
    cache: torch.Tensor,
    rope: int,
    kv_out: torch.Tensor | None = None,
    cache_scale: float = 1.0,
) -> None:
    """Normalise c_kv, rotate k_pe and q's q_pe (in place), write [c_kv | k_pe] into `cache` at `out_loc`.

    latent [T, kv_lora_rank + rope] (rows may be strided: a slice of a fused projection), norm_weight
    [kv_lora_rank], q [T, H, nope + rope] (q_pe is its last `rope` values per head), cos_sin [T, 2, rope/2]
    float32 (cos then sin), out_loc [T] flat cache slots, cache [num_pages, page_size, kv_lora_rank + rope].
    `kv_out` [T, kv_lora_rank + rope], if given, also receives the normalised, rotated latent as the cache holds it
    (its entries times `cache_scale`: an FP8 cache's rounding included, the scale taken back out).
    The cache receives the latent times 1 / `cache_scale` (the per-tensor scale of an FP8 cache; 1 otherwise).
    """
    num_tokens, d_latent = _check(latent, norm_weight, q, cos_sin, out_loc, cache, rope, kv_out)
    why = mla_prep_unsupported(d_latent, rope)
    if why is not None:
        raise ValueError(f"the MLA prep kernel cannot take this shape: {why} (mla_prep_ref can)")
    if num_tokens == 0:
        return
    cs = cos_sin.reshape(num_tokens, rope).to(torch.float32)
    block_h = min(16, triton.next_power_of_2(q.shape[1]))
    mla_prep_kernel[(num_tokens, 1 + triton.cdiv(q.shape[1], block_h))](
        latent, norm_weight, q, cs, out_loc, cache, kv_out if kv_out is not None else latent,
        q.shape[1], float(eps), 1.0 / float(cache_scale), float(cache_scale), latent.stride(0), q.stride(0),
        q.stride(1), cs.stride(0), kv_out.stride(0) if kv_out is not None else 0,
        D_LATENT=d_latent, HALF=rope // 2, Q_PE_OFFSET=q.shape[2] - rope,
        BLOCK_H=block_h, HAS_KV_OUT=kv_out is not None, num_warps=2,
    )  # fmt: skip


def mla_prep_ref(
    latent: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    q: torch.Tensor,
    cos_sin: torch.Tensor,
    out_loc: torch.Tensor,
    cache: torch.Tensor,
    rope: int,
    kv_out: torch.Tensor | None = None,
    cache_scale: float = 1.0,
) -> None:
    """Pure-torch twin of `mla_prep` (same in-place effects), for any kv_lora_rank and even rope."""
    num_tokens, d_latent = _check(latent, norm_weight, q, cos_sin, out_loc, cache, rope, kv_out)
    c = latent[:, :d_latent].to(torch.float32)
    c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
    c = (norm_weight * c.to(latent.dtype)).to(latent.dtype)
    # Token t reads row t of a per-token cos/sin table.
    k_pe = latent[:, d_latent:].clone()
    table = cos_sin.reshape(num_tokens, rope).to(torch.float32)
    positions = torch.arange(num_tokens, device=latent.device)
    apply_rotary_interleaved_ref(q[..., q.shape[2] - rope :], k_pe, positions, table)
    row = torch.cat([c, k_pe], dim=-1)
    flat = cache.view(-1, cache.shape[2])
    # value / scale as the kernel computes it: float32 times the float32 reciprocal, one rounding to the cache dtype
    stored = (row.to(torch.float32) * (1.0 / cache_scale)).to(cache.dtype)  # the scalar rounds to float32 too
    if cache.dtype == torch.float8_e4m3fn:  # NOTE: CPU torch cannot index_put into e4m3; move the bytes
        flat.view(torch.uint8)[out_loc.to(torch.int64)] = stored.view(torch.uint8)
    else:
        flat[out_loc.to(torch.int64)] = stored
    if kv_out is not None:  # the row as the cache holds it, read back (entry x scale in float32), as the kernel
        kv_out.copy_(stored.to(torch.float32) * cache_scale)
