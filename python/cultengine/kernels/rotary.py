"""Rotary position embedding (rotate-half / NeoX convention) of q and k in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _cos_sin(pos_ptr, cos_ptr, sin_ptr, token, stride_cos, stride_sin, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The fp32 `cos, sin` rows `[1, BLOCK_HALF]` of the token's position (zero past HALF)."""
    pos = tl.load(pos_ptr + token)
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]
    c = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_sin + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
    return c, s


@triton.jit
def _rotated_halves(src, c, s, mask, HALF: tl.constexpr):
    """Both halves (fp32) of the rotated head rows whose first halves `src` points at."""
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    token,
    c,
    s,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (offs_h < NUM_HEADS) & (offs_d < HALF)
    y1, y2 = _rotated_halves(x_ptr + token * stride_xt + offs_h * stride_xh + offs_d, c, s, mask, HALF)
    dst = out_ptr + token * stride_ot + offs_h * stride_oh + offs_d
    tl.store(dst, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cos,
    stride_sin,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0)
    c, s = _cos_sin(pos_ptr, cos_ptr, sin_ptr, token, stride_cos, stride_sin, HALF, BLOCK_HALF)
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
    _rotate_heads(
        k_ptr,
        k_out_ptr,
        token,
        c,
        s,
        stride_kt,
        stride_kh,
        stride_kot,
        stride_koh,
        NUM_K_HEADS,
        HALF,
        BLOCK_KH,
        BLOCK_HALF,
    )


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ops.rotary_embedding`: new rotated `q [T, Hq, D]`, `k [T, Hkv, D]` (inputs may be strided views)."""
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1
    t, hq, d = q.shape
    hk = k.shape[1]
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hk, d), dtype=k.dtype, device=k.device)
    if t:
        _rotary_kernel[(t,)](
            q,
            k,
            q_out,
            k_out,
            positions,
            cos,
            sin,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            k_out.stride(0),
            k_out.stride(1),
            cos.stride(0),
            sin.stride(0),
            NUM_Q_HEADS=hq,
            NUM_K_HEADS=hk,
            HALF=d // 2,
            BLOCK_QH=triton.next_power_of_2(hq),
            BLOCK_KH=triton.next_power_of_2(hk),
            BLOCK_HALF=triton.next_power_of_2(d // 2),
            num_warps=4,
        )
    return q_out, k_out
