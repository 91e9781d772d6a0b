"""Variable-length non-causal attention for vision encoders that pack images (Qwen2-VL and successors).

Every image (or attention window) of a packed `[N, H, D]` batch is a segment given by cumulative
offsets; a query tile reads only its own segment's keys. Same online-softmax tile update and fp32
accumulation as the other attention kernels (`attention._attend_contiguous`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import LOG2E, _attend_contiguous, _attention_tiles, _precision


@triton.jit
def _varlen_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    cu_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    QUERIES_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    seg = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_ptr + seg).to(tl.int64)
    seq_len = (tl.load(cu_ptr + seg + 1) - start).to(tl.int32)
    # The grid is sized for the longest segment; shorter ones leave idle tiles.
    if tile * BLOCK_M >= seq_len:
        return
    kv_head = head // QUERIES_PER_KV
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_q = (offs_m < seq_len)[:, None] & mask_d[None, :]
    q = tl.load(
        q_ptr + (start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=mask_q, other=0.0
    )
    k_base = k_ptr + start * stride_kt + kv_head * stride_kh + offs_d[None, :]
    v_base = v_ptr + start * stride_vt + kv_head * stride_vh + offs_d[None, :]

    out = _attend_contiguous(
        q, k_base, v_base, stride_kt, stride_vt, seq_len, mask_d, qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION
    )
    tl.store(
        out_ptr + (start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_q,
    )


def varlen_vision_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """`ops.varlen_vision_attention`: packed `[N, H, D]` in and out; q, k, v may be strided views of one qkv."""
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "head_dim must be contiguous"
    n, hq, d = q.shape
    hkv = k.shape[1]
    assert hq % hkv == 0, "query heads must be a multiple of key/value heads"
    out = torch.empty((n, hq, d), dtype=q.dtype, device=q.device)
    segments = cu_seqlens.numel() - 1
    if n == 0 or segments == 0 or max_seqlen == 0:
        return out
    block_d = triton.next_power_of_2(d)
    block_m, block_n = _attention_tiles(block_d)
    _varlen_kernel[(triton.cdiv(max_seqlen, block_m), segments, hq)](
        q,
        k,
        v,
        out,
        cu_seqlens,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        QUERIES_PER_KV=hq // hkv,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PRECISION=_precision(q.dtype),
        num_warps=8,
        num_stages=2,
    )
    return out
