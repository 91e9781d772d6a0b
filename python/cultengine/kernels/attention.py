"""Attention kernels: paged prefill (flash attention), paged decode (flash decoding), vision encoder.

All three share one online-softmax tile update. Scores are kept in the log2 domain (the softmax scale
is pre-multiplied by log2(e)) so the kernels use `exp2`; accumulation is fp32 whatever the input dtype.
Head dims that are not a power of two (80, 96) are padded to the next one and masked.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:  # the kernels never import ops at run time: ops binds them, not the reverse
    from ..attention_metadata import AttentionMetadata


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


# ---------------------------------------------------------------------------------------------
# Decode: flash decoding (split-KV) with all query heads of one KV head in one program
# ---------------------------------------------------------------------------------------------
@triton.jit
def _attend_paged_keys(
    q,
    k_base,
    v_base,
    bt_row,
    kv_start,
    kv_end,
    acc,
    m_i,
    l_i,
    qk_scale,
    offs_d,
    mask_d,
    stride_kb,
    stride_ko,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Fold the paged keys `kv_start..kv_end-1` (one KV head) into the running softmax of the rows `q`."""
    for start_n in range(kv_start, kv_end, BLOCK_N):
        _, mask_n, k, v = _paged_tile(k_base, v_base, bt_row, start_n, kv_end, offs_d, mask_d, stride_kb,
                                      stride_ko, BLOCK_SIZE, BLOCK_N)  # fmt: skip
        acc, m_i, l_i = _softmax_tile(q, k, v, acc, m_i, l_i, qk_scale, mask_n[None, :], True, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    qsl_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    prefix_lens_ptr,
    qk_scale,
    tiles_per_split,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ko,
    stride_kh,
    stride_bt,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    QUERIES_PER_KV: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(qsl_ptr + seq)
    seq_len = tl.load(seq_lens_ptr + seq)

    # GROUP >= 16 rows (tl.dot's minimum); rows past QUERIES_PER_KV are zero queries, never stored.
    offs_g = tl.arange(0, GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_q = (offs_g < QUERIES_PER_KV)[:, None] & mask_d[None, :]
    heads = kv_head * QUERIES_PER_KV + offs_g
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_q, other=0.0)

    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_kh
    bt_row = block_tables_ptr + seq * stride_bt
    acc = tl.zeros([GROUP, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([GROUP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP], dtype=tl.float32)

    # The one query sits at position seq_len - 1 and sees every key of its window: the splits cut the
    # window, and only the end needs a mask. Keys a cascade group shares are read by the prefix kernel.
    first_key = tl.maximum(seq_len - window, 0)
    if HAS_PREFIX:
        first_key = tl.maximum(first_key, tl.load(prefix_lens_ptr + seq))
    kv_start = first_key + split * tiles_per_split * BLOCK_N
    kv_end = tl.minimum(seq_len, kv_start + tiles_per_split * BLOCK_N)
    acc, m_i, l_i = _attend_paged_keys(
        q,
        k_base,
        v_base,
        bt_row,
        kv_start,
        kv_end,
        acc,
        m_i,
        l_i,
        qk_scale,
        offs_d,
        mask_d,
        stride_kb,
        stride_ko,
        BLOCK_SIZE,
        BLOCK_N,
        PRECISION,
    )

    if not SPLIT:
        tl.store(
            out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
            mask=mask_q,
        )
    else:
        # A split past a short sequence's end is empty: it stores 0 with log-sum-exp -inf (weight 0).
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        part = part_out_ptr + seq * stride_pb + heads[:, None] * stride_ph + split * stride_ps
        tl.store(part + offs_d[None, :], acc / l_safe[:, None], mask=mask_q)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + seq * stride_lb + heads * stride_lh + split, lse, mask=offs_g < QUERIES_PER_KV)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    qsl_ptr,
    prefix_lens_ptr,
    out_ptr,
    num_splits,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    if HAS_PREFIX:  # slot num_splits holds the shared-prefix part of a sequence in a cascade group
        mask_s |= (offs_s == num_splits) & ((offs_s * 0 + tl.load(prefix_lens_ptr + seq)) > 0)
    lse = tl.load(part_lse_ptr + seq * stride_lb + head * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # split 0 is never empty, so the max is finite
    w = w / tl.sum(w, 0)
    part = tl.load(
        part_out_ptr + seq * stride_pb + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
        mask=mask_s[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )
    out = tl.sum(part * w[:, None], 0)
    row = tl.load(qsl_ptr + seq)
    tl.store(
        out_ptr + row * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM
    )


@triton.jit
def _cascade_prefix_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    part_out_ptr,
    part_lse_ptr,
    qsl_ptr,
    block_tables_ptr,
    tile_seqs_ptr,
    tile_prefix_lens_ptr,
    slot,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ko,
    stride_kh,
    stride_bt,
    stride_ts,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    QUERIES_PER_KV: tl.constexpr,
    HEADS_P2: tl.constexpr,
    TILE_SEQS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The keys a tile of sequences shares, read once for all its queries: rows are (member, query head
    of this KV head); each row's partial result goes to its sequence's extra split `slot`."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    prefix_len = tl.load(tile_prefix_lens_ptr + tile)  # 0: a padding tile, whose loop runs no key

    offs_r = tl.arange(0, TILE_SEQS * HEADS_P2)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    seq = tl.load(tile_seqs_ptr + tile * stride_ts + offs_r // HEADS_P2)
    heads = kv_head * QUERIES_PER_KV + offs_r % HEADS_P2
    # (The tile's length joins the mask as a vector: the interpreter refuses a scalar in a mask.)
    valid = (seq >= 0) & ((offs_r % HEADS_P2) < QUERIES_PER_KV) & ((offs_r * 0 + prefix_len) > 0)
    row = tl.load(qsl_ptr + seq, mask=valid, other=0)
    mask_q = valid[:, None] & mask_d[None, :]
    q = tl.load(q_ptr + row[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_q, other=0.0)

    leader = tl.load(tile_seqs_ptr + tile * stride_ts)
    bt_row = block_tables_ptr + leader * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_kh
    acc = tl.zeros([TILE_SEQS * HEADS_P2, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([TILE_SEQS * HEADS_P2], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TILE_SEQS * HEADS_P2], dtype=tl.float32)
    acc, m_i, l_i = _attend_paged_keys(
        q,
        k_base,
        v_base,
        bt_row,
        0,
        prefix_len,
        acc,
        m_i,
        l_i,
        qk_scale,
        offs_d,
        mask_d,
        stride_kb,
        stride_ko,
        BLOCK_SIZE,
        BLOCK_N,
        PRECISION,
    )

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    seq_safe = tl.where(valid, seq, 0)
    part = part_out_ptr + seq_safe[:, None] * stride_pb + heads[:, None] * stride_ph + slot * stride_ps
    tl.store(part + offs_d[None, :], acc / l_safe[:, None], mask=mask_q)
    tl.store(part_lse_ptr + seq_safe * stride_lb + heads * stride_lh + slot, m_i + tl.log2(l_safe), mask=valid)


@functools.lru_cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small count
    return torch.cuda.get_device_properties(device).multi_processor_count


_DECODE_BLOCK_N = 64
_MAX_SPLITS = 64


def decode_num_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device, block_n: int = _DECODE_BLOCK_N
) -> tuple[int, int]:
    """(splits, key tiles per split) for a decode batch whose queries see at most `max_seq_len` keys.

    One split when batch x KV heads already fills the GPU twice over; otherwise as many splits as
    there are key tiles (up to 64). A split costs one fp32 partial row per head (1 KB at d = 128)
    against 32 KB of keys and values per tile, so fine splits are nearly free, and they keep a CUDA
    graph captured for the model's longest sequence parallel on the short ones it mostly runs.
    """
    tiles = triton.cdiv(max_seq_len, block_n)
    if batch * num_kv_heads >= 2 * _num_sms(device):
        return 1, tiles
    tiles_per_split = triton.cdiv(tiles, min(_MAX_SPLITS, tiles))
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    num_splits: int | None = None,
    block_n: int = _DECODE_BLOCK_N,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """One query per sequence, over its last `window` keys (all keys without a window). The range is cut
    into `num_splits` pieces (default: see `decode_num_splits`) whose partial results a second kernel
    merges by log-sum-exp.

    Nothing here reads the device, so a CUDA graph can capture it: a graph captured with `max_seq_len`
    at the model's limit stays right for any shorter sequences (their trailing splits are empty).
    Tiles: 64 keys, 4 warps, 3 stages, from the sweep in benches/bench_kernels.py on an H100 (4 warps
    beat 8 by 5-20 % at batch >= 64; all variants within noise at batch 1)."""
    _check_cache(q, k_cache, v_cache)
    t, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    batch = meta.seq_lens.numel()
    keys = min(meta.max_seq_len, window or NO_WINDOW)
    if num_splits is None:
        num_splits, tiles_per_split = decode_num_splits(batch, hkv, keys, q.device, block_n)
    else:
        tiles = triton.cdiv(keys, block_n)
        tiles_per_split = triton.cdiv(tiles, max(1, min(num_splits, tiles)))
        num_splits = triton.cdiv(tiles, tiles_per_split)

    out = torch.empty_like(q)
    block_d = triton.next_power_of_2(d)
    shared = meta.shared_prefixes if window is None else None  # a sliding window reads its own keys alone
    slots = num_splits + (shared is not None)  # the shared part merges as one more split
    part_out = part_lse = out  # unused by the kernel when there is one split
    if slots > 1:
        part_out = torch.empty((batch, hq, slots, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, hq, slots), dtype=torch.float32, device=q.device)
    prefix_lens = meta.seq_lens if shared is None else shared.prefix_lens  # unread without a cascade
    qpk = hq // hkv
    # The split count is a run-time argument, so varying batch sizes do not compile new kernels.
    _decode_split_kernel[(batch, hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        part_out,
        part_lse,
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables,
        prefix_lens,
        scale * LOG2E,
        tiles_per_split,
        window or NO_WINDOW,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        meta.block_tables.stride(0),
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        QUERIES_PER_KV=qpk,
        GROUP=max(16, triton.next_power_of_2(qpk)),
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        SPLIT=slots > 1,
        HAS_PREFIX=shared is not None,
        PRECISION=_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if shared is not None:
        tiles, tile_seqs = shared.tile_seqs.shape
        _cascade_prefix_kernel[(tiles, hkv)](
            q,
            k_cache,
            v_cache,
            part_out,
            part_lse,
            meta.query_start_loc,
            meta.block_tables,
            shared.tile_seqs,
            shared.tile_prefix_lens,
            num_splits,
            scale * LOG2E,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            meta.block_tables.stride(0),
            shared.tile_seqs.stride(0),
            part_out.stride(0),
            part_out.stride(1),
            part_out.stride(2),
            part_lse.stride(0),
            part_lse.stride(1),
            QUERIES_PER_KV=qpk,
            HEADS_P2=triton.next_power_of_2(qpk),
            TILE_SEQS=tile_seqs,
            HEAD_DIM=d,
            BLOCK_D=block_d,
            BLOCK_SIZE=block_size,
            BLOCK_N=block_n,
            PRECISION=_precision(q.dtype),
            num_warps=num_warps,
            num_stages=num_stages,
        )
    if slots > 1:
        _decode_reduce_kernel[(batch, hq)](
            part_out,
            part_lse,
            meta.query_start_loc,
            prefix_lens,
            out,
            num_splits,
            part_out.stride(0),
            part_out.stride(1),
            part_out.stride(2),
            part_lse.stride(0),
            part_lse.stride(1),
            out.stride(0),
            out.stride(1),
            HEAD_DIM=d,
            BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(slots),
            HAS_PREFIX=shared is not None,
            num_warps=4,
        )
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """`ops.paged_attention`: the decode kernel for decode-only steps, the prefill kernel otherwise."""
    if meta.max_query_len == 1:
        return paged_decode_attention(q, k_cache, v_cache, meta, scale, window)
    return paged_prefill_attention(q, k_cache, v_cache, meta, scale, window)


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
