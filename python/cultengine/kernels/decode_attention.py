"""Paged decode attention: flash decoding (split-KV, then a reduce), all query heads of one KV head in one
program, and the cascade kernel that reads a shared prefix once for the sequences that share it."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from .attention import LOG2E, NO_WINDOW, _check_cache, _paged_tile, _precision, _softmax_tile

if TYPE_CHECKING:  # the kernels never import ops at run time: ops binds them, not the reverse
    from ..attention_metadata import AttentionMetadata


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
