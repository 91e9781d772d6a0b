"""Rotary embedding fused with the KV-cache write: one launch rotates q into its output and stores the
rotated k, with v, straight into the paged cache, so the rotated keys never round-trip through memory."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cache import _slot_offset
from .rotary import _cos_sin, _rotate_heads, _rotated_halves


@triton.jit
def _rotary_write_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    slot_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_qot,
    stride_qoh,
    stride_cos,
    stride_sin,
    stride_cb,
    stride_co,
    stride_ch,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    c, s = _cos_sin(pos_ptr, cos_ptr, sin_ptr, token, stride_cos, stride_sin, HALF, BLOCK_HALF)
    # Every row's q is rotated, padding rows' too: their attention still runs (over one key).
    _rotate_heads(
        q_ptr,
        q_out_ptr,
        token,
        c,
        s,
        stride_qt,
        stride_qh,
        stride_qot,
        stride_qoh,
        NUM_Q_HEADS,
        HALF,
        BLOCK_QH,
        BLOCK_HALF,
    )
    slot = tl.load(slot_ptr + token).to(tl.int64)  # int64: slot * stride overflows int32 in big caches
    if slot >= 0:  # a negative slot is a padding row of a CUDA-graph batch: nothing to write
        offs_h = tl.arange(0, BLOCK_KH)[:, None]
        offs_d = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (offs_h < NUM_KV_HEADS) & (offs_d < HALF)
        dst = _slot_offset(slot, stride_cb, stride_co, BLOCK_SIZE) + offs_h * stride_ch + offs_d
        k1, k2 = _rotated_halves(k_ptr + token * stride_kt + offs_h * stride_kh + offs_d, c, s, mask, HALF)
        # Rounded to k's dtype before the cache's, as rotary_embedding then write_kv round: the same bits.
        k1 = k1.to(k_ptr.dtype.element_ty).to(k_cache_ptr.dtype.element_ty)
        k2 = k2.to(k_ptr.dtype.element_ty).to(k_cache_ptr.dtype.element_ty)
        tl.store(k_cache_ptr + dst, k1, mask=mask)
        tl.store(k_cache_ptr + dst + HALF, k2, mask=mask)
        v_src = v_ptr + token * stride_vt + offs_h * stride_vh + offs_d
        tl.store(v_cache_ptr + dst, tl.load(v_src, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst + HALF, tl.load(v_src + HALF, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """`ops.rotary_write_kv`: the rotated `q [T, Hq, D]` (a new tensor); rotated `k` and `v [T, Hkv, D]` go into
    the cache in place. Inputs may be strided views; tokens whose slot is negative write nothing."""
    assert k_cache.stride() == v_cache.stride(), "key and value caches must share one layout"
    assert all(x.stride(-1) == 1 for x in (q, k, v, cos, sin, k_cache))
    t, hq, d = q.shape
    hkv = k.shape[1]
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    if t:
        _rotary_write_kv_kernel[(t,)](
            q,
            k,
            v,
            q_out,
            k_cache,
            v_cache,
            positions,
            cos,
            sin,
            slot_mapping,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            cos.stride(0),
            sin.stride(0),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            NUM_Q_HEADS=hq,
            NUM_KV_HEADS=hkv,
            HALF=d // 2,
            BLOCK_QH=triton.next_power_of_2(hq),
            BLOCK_KH=triton.next_power_of_2(hkv),
            BLOCK_HALF=triton.next_power_of_2(d // 2),
            BLOCK_SIZE=k_cache.shape[1],
            num_warps=4,
        )
    return q_out
