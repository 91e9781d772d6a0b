"""Sliding-window and bidirectional-image-span paged attention against a dense masked reference.

The reference builds each sequence's keys from its block table and its `[q, k]` mask element by
element, from transformers' definitions: a query at position p sees key k when `k > p - window`
(sliding layers) and either `k <= p` or both lie in one image span (Gemma 3's blockwise overlay, ANDed
with the window on sliding layers). Both the torch reference in ops.py and the Triton kernels (the CPU
interpreter without CUDA) are checked: windows narrower than a KV block (16 here) and wider than
several, windows narrower than a query tile (128), chunks that resume across the window's edge, prefix-cache
hits inside and outside the window, and spans wider than the window.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from cultengine import attention_metadata, kernels, ops  # noqa: E402  (after TRITON_INTERPRET is set)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 16
HQ, HKV, D = 4, 2, 32


def _batch(q_lens, seq_lens, spans=(), seed=0, shared_prefix_blocks=0):
    """A step: shuffled block tables (the first blocks shared when asked: a prefix-cache hit), random
    cached keys/values, the step's queries; `spans` are (sequence, first, end) image runs."""
    gen = torch.Generator().manual_seed(seed)
    n_blk = [-(-s // BLOCK) for s in seq_lens]
    pool = torch.randperm(sum(n_blk) + 5, generator=gen).tolist()
    shared, fresh = pool[:shared_prefix_blocks], pool[shared_prefix_blocks:]
    tables = torch.zeros(len(q_lens), max(n_blk) + 1, dtype=torch.int32)
    for i, n in enumerate(n_blk):
        tables[i, :n] = torch.tensor(shared + [fresh.pop() for _ in range(n - shared_prefix_blocks)])
    k_cache = torch.randn(len(pool), BLOCK, HKV, D, generator=gen)
    v_cache = torch.randn(len(pool), BLOCK, HKV, D, generator=gen)
    q = torch.randn(sum(q_lens), HQ, D, generator=gen)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    by_seq = sorted(spans)
    loc = [0] + [sum(1 for s in by_seq if s[0] <= b) for b in range(len(q_lens))]
    meta = attention_metadata.AttentionMetadata(
        qsl.to(DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        tables.to(DEVICE),
        torch.zeros(sum(q_lens), dtype=torch.int64, device=DEVICE),
        max(q_lens),
        max(seq_lens),
        image_spans=torch.tensor([s[1:] for s in by_seq], dtype=torch.int32, device=DEVICE).view(-1, 2)
        if by_seq
        else None,
        image_span_loc=torch.tensor(loc, dtype=torch.int32, device=DEVICE) if by_seq else None,
    )
    return q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), meta, by_seq


def _dense(q, k_cache, v_cache, meta, spans, window):
    """Attention of every query row over its sequence's keys with an explicitly built mask."""
    out = torch.empty_like(q)
    qsl, seq_lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
    for b, n in enumerate(seq_lens):
        slots = [int(meta.block_tables[b, p // BLOCK]) * BLOCK + p % BLOCK for p in range(n)]
        k = k_cache.view(-1, HKV, D)[slots].repeat_interleave(HQ // HKV, dim=1)
        v = v_cache.view(-1, HKV, D)[slots].repeat_interleave(HQ // HKV, dim=1)
        rows = range(qsl[b], qsl[b + 1])
        mask = torch.zeros(len(rows), n, dtype=torch.bool)
        for i, _ in enumerate(rows):
            p = n - len(rows) + i
            for key in range(n):
                same_span = any(s == b and lo <= p < hi and lo <= key < hi for s, lo, hi in spans)
                mask[i, key] = (key <= p or same_span) and (window is None or key > p - window)
        scores = torch.einsum("qhd,khd->hqk", q[qsl[b] : qsl[b + 1]].cpu(), k.cpu()) * D**-0.5
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out[qsl[b] : qsl[b + 1]] = torch.einsum("hqk,khd->qhd", probs, v.cpu()).to(q.device)
    return out


def _check(q, k_cache, v_cache, meta, spans, window):
    expected = _dense(q, k_cache, v_cache, meta, spans, window)
    for impl in (ops.paged_attention, kernels.paged_attention):
        torch.testing.assert_close(
            impl(q, k_cache, v_cache, meta, D**-0.5, window=window), expected, atol=2e-5, rtol=2e-5
        )


@pytest.mark.parametrize("window", [5, 16, 40, None])
def test_prefill_windows_narrower_than_a_block_and_wider_than_several(window):
    # A fresh prompt across two query tiles, a chunk resuming mid-block beyond the window's edge, a
    # one-token prompt and a decode row riding along.
    _check(*_batch([150, 40, 1, 1], [150, 97, 1, 90]), window)


@pytest.mark.parametrize("window", [3, 21, 70])
def test_decode_windows(window):
    q, k_cache, v_cache, meta, spans = _batch([1, 1, 1, 1], [1, 20, 77, 200], seed=1)
    _check(q, k_cache, v_cache, meta, spans, window)
    for splits in (1, 3):
        torch.testing.assert_close(
            kernels.paged_decode_attention(q, k_cache, v_cache, meta, D**-0.5, window=window, num_splits=splits),
            _dense(q, k_cache, v_cache, meta, spans, window),
            atol=2e-5,
            rtol=2e-5,
        )


@pytest.mark.parametrize("window", [10, 48])
def test_chunked_prefill_across_the_window_edge_equals_one_pass(window):
    """A prompt computed in three chunks gives, row for row, what one pass gives."""
    q, k_cache, v_cache, meta, _ = _batch([90], [90], seed=2)
    whole = kernels.paged_attention(q, k_cache, v_cache, meta, D**-0.5, window=window)
    for first, end in ((0, 30), (30, 61), (61, 90)):
        chunk = attention_metadata.AttentionMetadata(
            torch.tensor([0, end - first], dtype=torch.int32, device=DEVICE),
            torch.tensor([end], dtype=torch.int32, device=DEVICE),
            meta.block_tables,
            meta.slot_mapping[first:end],
            end - first,
            end,
        )
        for impl in (ops.paged_attention, kernels.paged_attention):
            torch.testing.assert_close(
                impl(q[first:end], k_cache, v_cache, chunk, D**-0.5, window=window),
                whole[first:end],
                atol=2e-5,
                rtol=2e-5,
            )


@pytest.mark.parametrize("window", [8, 40, 200])
def test_prefix_cache_hit_inside_and_outside_the_window(window):
    # 5 shared blocks (80 tokens) cached; suffixes start at 85, 100 and 130: with window 8 the cached
    # prefix lies wholly outside every query's window, with 40 partly inside, with 200 wholly inside.
    _check(*_batch([20, 70, 3], [105, 170, 133], seed=3, shared_prefix_blocks=5), window)


@pytest.mark.parametrize("window", [None, 12, 64])
def test_bidirectional_image_spans(window):
    # Sequence 0: two images (one wider than the 12 window, one crossing the 128-query tile edge);
    # sequence 1: an image in a chunk resumed after cached context; sequence 2 has none; a decode row.
    spans = [(0, 5, 30), (0, 110, 140), (1, 52, 60)]
    _check(*_batch([150, 30, 20, 1], [150, 70, 20, 33], spans=spans, seed=4), window)


def test_spans_of_one_sequence_do_not_leak_into_another():
    # Two sequences with the same positions: only the first has a span there.
    spans = [(0, 2, 9)]
    q, k_cache, v_cache, meta, spans = _batch([12, 12], [12, 12], spans=spans, seed=5)
    _check(q, k_cache, v_cache, meta, spans, None)
    plain = attention_metadata.AttentionMetadata(
        meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.slot_mapping, 12, 12
    )
    torch.testing.assert_close(
        kernels.paged_attention(q, k_cache, v_cache, meta, D**-0.5)[12:],
        ops.paged_attention(q, k_cache, v_cache, plain, D**-0.5)[12:],
    )
