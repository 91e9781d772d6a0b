"""Attention kernels' shared pieces, and the vision encoder's attention.

The paged prefill (`prefill_attention.py`), paged decode (`decode_attention.py`), vision and varlen-vision
kernels share one online-softmax tile update, defined here. Scores are kept in the log2 domain (the softmax
scale is pre-multiplied by log2(e)) so the kernels use `exp2`; accumulation is fp32 whatever the input dtype.
Head dims that are not a power of two (80, 96) are padded to the next one and masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _attention_tiles(block_d: int) -> tuple[int, int]:
    """(query tile, key tile) of the prefill and vision kernels, run with 8 warps.

    128 x 32 at d = 128: 128 x 64 spills registers on sm_90 (the paged gather keeps a pointer per
    element). On an H100 (bf16, seq 4096, benches/bench_kernels.py --sweep) it ran within noise of the
    best of ten variants (342 vs 347 TFLOP/s).
    """
    if block_d <= 64:
        return 128, 64
    return (128, 32) if block_d <= 128 else (64, 32)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32 on the GPU: they are the exact path the tests compare.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _softmax_tile(q, k, v, acc, m_i, l_i, qk_scale, mask, APPLY_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one key/value tile into the running (acc, row max, row sum) of flash attention."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if APPLY_MASK:
        s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = m_new
    if APPLY_MASK:  # a row that has seen no visible key yet (a window, a span) keeps acc = l = 0, not NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_contiguous(
    q,
    k_base,
    v_base,
    stride_k,
    stride_v,
    seq_len,
    mask_d,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Non-causal attention of a query tile over `seq_len` contiguous keys/values (the vision kernels): full
    key tiles unmasked, then the ragged tail (577 = 24*24 + 1 tokens for CLIP at 336px). fp32 output."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    full_end = (seq_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[:, None] * stride_k, mask=mask_d[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_v, mask=mask_d[None, :], other=0.0)
        acc, m_i, l_i = _softmax_tile(q, k, v, acc, m_i, l_i, qk_scale, None, False, PRECISION)
    if full_end < seq_len:
        offs_n = full_end + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seq_len
        mask_kv = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_k, mask=mask_kv, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_v, mask=mask_kv, other=0.0)
        acc, m_i, l_i = _softmax_tile(q, k, v, acc, m_i, l_i, qk_scale, mask_n[None, :], True, PRECISION)
    return acc / l_i[:, None]


@triton.jit
def _paged_tile(k_base, v_base, bt_row, start_n, kv_end, offs_d, mask_d, stride_kb, stride_ko,
                BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """One tile of paged keys and values from `start_n` (one KV head), zero past `kv_end`; with its key
    indices and their mask."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < kv_end
    blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)  # physical block of each key
    kv_off = (blk * stride_kb + (offs_n % BLOCK_SIZE) * stride_ko)[:, None] + offs_d[None, :]
    mask_kv = mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_base + kv_off, mask=mask_kv, other=0.0)
    v = tl.load(v_base + kv_off, mask=mask_kv, other=0.0)
    return offs_n, mask_n, k, v


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.stride() == v_cache.stride(), "key and value caches must share one layout"
    assert k_cache.stride(-1) == 1 and q.stride(-1) == 1, "head_dim must be contiguous"
    assert q.shape[1] % k_cache.shape[2] == 0, "query heads must be a multiple of KV heads"


# "No window": wider than any context, small enough that `position - window` stays an int32.
NO_WINDOW = 1 << 30


# ---------------------------------------------------------------------------------------------
# Vision encoder: fixed length, non-causal
# ---------------------------------------------------------------------------------------------
@triton.jit
def _vision_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    qk_scale,
    seq_len,
    num_heads,
    stride_qn,
    stride_qs,
    stride_qh,
    stride_kn,
    stride_ks,
    stride_kh,
    stride_vn,
    stride_vs,
    stride_vh,
    stride_on,
    stride_os,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    n = tl.program_id(1) // num_heads
    h = tl.program_id(1) % num_heads
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_q = (offs_m < seq_len)[:, None] & mask_d[None, :]
    q = tl.load(
        q_ptr + n * stride_qn + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :], mask=mask_q, other=0.0
    )
    k_base = k_ptr + n * stride_kn + h * stride_kh + offs_d[None, :]
    v_base = v_ptr + n * stride_vn + h * stride_vh + offs_d[None, :]

    out = _attend_contiguous(
        q, k_base, v_base, stride_ks, stride_vs, seq_len, mask_d, qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION
    )
    tl.store(
        out_ptr + n * stride_on + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_q,
    )


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """`ops.vision_attention`: `[N, S, H, D]` in and out; q, k, v may be strided views of one qkv."""
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "head_dim must be contiguous"
    n, s, h, d = q.shape
    out = torch.empty((n, s, h, d), dtype=q.dtype, device=q.device)
    block_d = triton.next_power_of_2(d)
    block_m, block_n = _attention_tiles(block_d)
    _vision_kernel[(triton.cdiv(s, block_m), n * h)](
        q,
        k,
        v,
        out,
        scale * LOG2E,
        s,
        h,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PRECISION=_precision(q.dtype),
        num_warps=8,
        num_stages=2,
    )
    return out
