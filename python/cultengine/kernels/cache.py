"""KV-cache write: scatter the step's keys and values into their paged slots."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _slot_offset(slot, stride_cb, stride_co, BLOCK_SIZE: tl.constexpr):
    """Element offset of cache slot `slot` (int64): block `slot // BLOCK_SIZE`, row `slot % BLOCK_SIZE`."""
    return (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_co,
    stride_ch,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)  # int64: slot * stride overflows int32 in big caches
    if slot < 0:  # a padding row of a CUDA-graph batch: nothing to write
        return
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < NUM_HEADS) & (offs_d < HEAD_DIM)
    dst = _slot_offset(slot, stride_cb, stride_co, BLOCK_SIZE) + offs_h * stride_ch + offs_d
    k = tl.load(key_ptr + token * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """`ops.write_kv`: keys/values `[T, Hkv, D]` (strided views allowed) into the cache, in place.

    Tokens whose slot is negative are skipped (the padding rows of a replayed CUDA graph)."""
    assert k_cache.stride() == v_cache.stride(), "key and value caches must share one layout"
    assert key.stride(-1) == 1 and value.stride(-1) == 1 and k_cache.stride(-1) == 1
    t, hkv, d = key.shape
    if t == 0:
        return
    _write_kv_kernel[(t,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_HEADS=hkv,
        HEAD_DIM=d,
        BLOCK_H=triton.next_power_of_2(hkv),
        BLOCK_D=triton.next_power_of_2(d),
        BLOCK_SIZE=k_cache.shape[1],
        num_warps=4,
    )
