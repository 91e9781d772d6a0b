"""Paged prefill attention (flash attention over the paged KV cache), for prefill and mixed prefill/decode
steps: causal within each sequence, sliding windows, bidirectional image spans, cascade shared prefixes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from .attention import LOG2E, NO_WINDOW, _attention_tiles, _check_cache, _paged_tile, _precision, _softmax_tile

if TYPE_CHECKING:  # the kernels never import ops at run time: ops binds them, not the reverse
    from ..attention_metadata import AttentionMetadata


# ---------------------------------------------------------------------------------------------
# Prefill (and mixed prefill/decode) over the paged cache
# ---------------------------------------------------------------------------------------------
@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    qsl_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    spans_ptr,
    span_loc_ptr,
    qk_scale,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ko,
    stride_kh,
    stride_bt,
    QUERIES_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_SPANS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    # The grid is sized for the longest query of the batch; shorter ones leave idle tiles.
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len + tile * BLOCK_M  # absolute position of the tile's first query
    last_pos = tl.minimum(first_pos + BLOCK_M, seq_len) - 1  # and of its last real one

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_q = (offs_m < q_len)[:, None] & mask_d[None, :]
    q_rows = (q_start + offs_m)[:, None]
    q = tl.load(q_ptr + q_rows * stride_qt + head * stride_qh + offs_d[None, :], mask=mask_q, other=0.0)
    q_pos = first_pos - tile * BLOCK_M + offs_m

    # Each query's image span (first, end), (-1, -1) outside one: it also sees the keys ahead in its span.
    span_lo = tl.full([BLOCK_M], -1, dtype=tl.int32)
    span_hi = tl.full([BLOCK_M], -1, dtype=tl.int32)
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_M)
    if HAS_SPANS:
        for i in range(tl.load(span_loc_ptr + seq), tl.load(span_loc_ptr + seq + 1)):
            first = tl.load(spans_ptr + 2 * i)
            end = tl.load(spans_ptr + 2 * i + 1)
            inside = (q_pos >= first) & (q_pos < end)
            span_lo = tl.where(inside, first, span_lo)
            span_hi = tl.where(inside, end, span_hi)
        kv_end = tl.maximum(kv_end, tl.max(span_hi, 0))

    kv_head = head // QUERIES_PER_KV
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_kh
    bt_row = block_tables_ptr + seq * stride_bt

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Key tiles: [kv_start, full_lo) masked (the window's edge), [full_lo, full_hi) visible to every row
    # (before the first query, inside the last query's window), [full_hi, kv_end) masked (the diagonal,
    # image spans, the sequence's end). A window narrower than the tile leaves no unmasked part.
    kv_start = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
    full_lo = (tl.maximum(last_pos - window + 1, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    full_hi = (first_pos // BLOCK_N) * BLOCK_N
    has_full = full_lo < full_hi
    full_lo = tl.where(has_full, full_lo, kv_start)
    full_hi = tl.where(has_full, full_hi, kv_start)
    # fmt: off
    acc, m_i, l_i = _prefill_keys(q, k_base, v_base, bt_row, kv_start, full_lo, kv_end, q_pos, span_lo, span_hi,
                                  window, acc, m_i, l_i, qk_scale, offs_d, mask_d, stride_kb, stride_ko, BLOCK_SIZE,
                                  BLOCK_N, True, PRECISION)
    acc, m_i, l_i = _prefill_keys(q, k_base, v_base, bt_row, full_lo, full_hi, kv_end, q_pos, span_lo, span_hi,
                                  window, acc, m_i, l_i, qk_scale, offs_d, mask_d, stride_kb, stride_ko, BLOCK_SIZE,
                                  BLOCK_N, False, PRECISION)
    acc, m_i, l_i = _prefill_keys(q, k_base, v_base, bt_row, full_hi, kv_end, kv_end, q_pos, span_lo, span_hi,
                                  window, acc, m_i, l_i, qk_scale, offs_d, mask_d, stride_kb, stride_ko, BLOCK_SIZE,
                                  BLOCK_N, True, PRECISION)
    # fmt: on

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l = 0 only in idle rows past the sequence's end
    tl.store(
        out_ptr + q_rows * stride_ot + head * stride_oh + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask_q
    )


@triton.jit
def _prefill_keys(q, k_base, v_base, bt_row, first_n, last_n, kv_end, q_pos, span_lo, span_hi, window, acc, m_i,
                  l_i, qk_scale, offs_d, mask_d, stride_kb, stride_ko, BLOCK_SIZE: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """The prefill kernel's key tiles `first_n..last_n`; `MASKED` applies causality, image spans, the window
    and the end."""
    for start_n in range(first_n, last_n, BLOCK_N):
        offs_n, mask_n, k, v = _paged_tile(k_base, v_base, bt_row, start_n, kv_end, offs_d, mask_d, stride_kb,
                                           stride_ko, BLOCK_SIZE, BLOCK_N)  # fmt: skip
        k_pos, rows = offs_n[None, :], q_pos[:, None]
        visible = (k_pos <= rows) | ((k_pos >= span_lo[:, None]) & (k_pos < span_hi[:, None]))
        visible = visible & (k_pos > rows - window) & mask_n[None, :]
        acc, m_i, l_i = _softmax_tile(q, k, v, acc, m_i, l_i, qk_scale, visible, MASKED, PRECISION)
    return acc, m_i, l_i


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 8,
    num_stages: int = 2,
) -> torch.Tensor:
    """Causal varlen attention of packed queries over the paged cache (any query lengths), with the
    metadata's image spans and an optional sliding `window` (semantics: `ops.paged_attention`).

    The tile and launch arguments exist for the tuning sweep in benches/bench_kernels.py."""
    _check_cache(q, k_cache, v_cache)
    t, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    out = torch.empty_like(q)
    block_d = triton.next_power_of_2(d)
    default_m, default_n = _attention_tiles(block_d)
    block_m, block_n = block_m or default_m, block_n or default_n
    batch = meta.query_start_loc.numel() - 1
    grid = (triton.cdiv(meta.max_query_len, block_m), batch, hq)
    has_spans = meta.image_spans is not None and meta.image_spans.numel() > 0
    spans = meta.image_spans.contiguous() if has_spans else meta.seq_lens  # unread without spans
    span_loc = meta.image_span_loc if has_spans else meta.seq_lens
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables,
        spans,
        span_loc,
        scale * LOG2E,
        window or NO_WINDOW,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        meta.block_tables.stride(0),
        QUERIES_PER_KV=hq // hkv,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_SPANS=has_spans,
        PRECISION=_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
