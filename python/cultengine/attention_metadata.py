"""The layout of one packed step, as the runner builds it from the scheduler's plan and every attention
implementation (the torch references in ops.py, the Triton and flash kernels) reads it. Its own module, below
both, so that the kernels need not import the dispatch layer that imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    """Per-step layout of the packed batch, built from the scheduler's step plan.

    All keys and values of a step (cached prefix and the step's new tokens) are in the paged cache
    before attention runs: `write_kv` comes first, so attention reads one uniform source.
    """

    query_start_loc: torch.Tensor  # int32 [B+1]: sequence b's queries are rows qsl[b]:qsl[b+1]
    seq_lens: torch.Tensor  # int32 [B]: KV length of sequence b after this step
    block_tables: torch.Tensor  # int32 [B, max_blocks]: physical block ids, padded with 0
    slot_mapping: torch.Tensor  # int64 [T]: cache slot of each new token
    max_query_len: int
    max_seq_len: int
    # Image runs whose tokens attend to each other both ways in prefill (Gemma 3): sequence b's runs are
    # rows image_span_loc[b]:image_span_loc[b+1] of image_spans, each (first, end) absolute positions.
    image_spans: torch.Tensor | None = None  # int32 [N, 2]
    image_span_loc: torch.Tensor | None = None  # int32 [B+1]
    # Decode only: sequences that share leading KV blocks read them once per group (cascade attention).
    shared_prefixes: SharedPrefixes | None = None
    # What the torch reference derives from this layout (gather indices, masks), by (block size, window): the
    # same for every layer of the step, so it is computed once. The tensors above are one step's: never
    # rewritten in place while this is filled (CUDA-graph buffers are read by the Triton kernels only).
    derived: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass
class SharedPrefixes:
    """Decode sequences grouped by the KV blocks they share at the start of their block tables.

    Keys `0..prefix_lens[b]-1` of sequence b are read once for its whole group, by tiles of up to
    `tile_seqs.shape[1]` member sequences; the rest of its keys it reads alone, and the two partial
    results merge by log-sum-exp. A tile's shared keys live in the blocks of its first member's table.
    """

    prefix_lens: torch.Tensor  # int32 [B]: 0 for a sequence read alone
    tile_seqs: torch.Tensor  # int32 [W, S]: member sequences of each tile, -1 past its members
    tile_prefix_lens: torch.Tensor  # int32 [W]: keys the tile's members share (0: an empty tile)


def cascade_tile_width(queries_per_kv: int) -> int:
    """Member sequences per shared-prefix tile: 64 query rows (a query head group padded to a power of 2)."""
    return max(1, 64 // (1 << (queries_per_kv - 1).bit_length()))


def group_shared_prefixes(
    block_tables: np.ndarray, seq_lens: np.ndarray, block_size: int, tile_width: int, min_saving: float = 0.25
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """Host side of cascade decode: `(prefix_lens [B], tile_seqs [W, tile_width], tile_prefix_lens [W],
    keys read)` for a decode step, or None when grouping would save under `min_saving` of the key reads.

    Sequences are grouped by their first block; a group shares the leading blocks every member's table
    has in common with its first member's, up to one key before its shortest member's end (that last
    key is each sequence's own new token). Vectorised over the batch: no loop per sequence.
    """
    b, width = block_tables.shape
    seq_lens = seq_lens.astype(np.int64)
    if b < 2 or width == 0:
        return None
    order = np.argsort(block_tables[:, 0], kind="stable")
    tables, lens = block_tables[order], seq_lens[order]
    starts = np.flatnonzero(np.r_[True, tables[1:, 0] != tables[:-1, 0]])
    sizes = np.diff(np.r_[starts, b])
    leader = np.repeat(starts, sizes)
    used = -(-lens // block_size)  # blocks each table really holds (the rest is padding)
    same = np.logical_and.accumulate(tables == tables[leader], axis=1).sum(axis=1)
    common = np.minimum.reduceat(np.minimum(same, used), starts)
    shared = np.minimum(common * block_size, np.minimum.reduceat(lens, starts) - 1)
    shared[sizes < 2] = 0  # a group of one is the plain path
    saved = int(((sizes - np.ceil(sizes / tile_width)) * shared).sum())
    plain = int(seq_lens.sum())
    if saved <= 0 or saved < min_saving * plain:
        return None
    prefix_sorted = np.repeat(shared, sizes)
    prefix_lens = np.empty(b, dtype=np.int32)
    prefix_lens[order] = prefix_sorted
    # Tiles: consecutive members of one group, at most tile_width each.
    grouped = np.flatnonzero(prefix_sorted > 0)
    rank = grouped - leader[grouped]  # place in its group: a new tile every tile_width members
    tile_of = np.cumsum(rank % tile_width == 0) - 1
    tiles = int(tile_of[-1]) + 1
    tile_seqs = np.full((tiles, tile_width), -1, dtype=np.int32)
    tile_seqs[tile_of, rank % tile_width] = order[grouped]
    tile_prefix_lens = prefix_sorted[grouped][np.r_[0, np.flatnonzero(np.diff(tile_of)) + 1]].astype(np.int32)
    return prefix_lens, tile_seqs, tile_prefix_lens, plain - saved
