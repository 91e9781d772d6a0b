"""Shared-prefix (cascade) decode attention: the grouping, the torch reference and the Triton kernel.

Decode sequences that share leading KV blocks (one image asked many ways) read those keys once per
tile of their group and merge with their own keys by log-sum-exp. Everything here is checked against
the plain per-sequence decode attention, which the model-parity tests tie to transformers.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from cultengine import attention_metadata, kernels, ops  # noqa: E402  (after TRITON_INTERPRET is set)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 16
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def grouped_batch(groups, hq, hkv, d, dtype=torch.float32, seed=0):
    """A decode step of sequences in groups. `groups` is a list of (shared blocks, [seq_len of each member]):
    a group's members start with the same physical blocks; everything else is private and shuffled."""
    gen = torch.Generator().manual_seed(seed)
    lens = [n for _, members in groups for n in members]
    n_blk = [-(-n // BLOCK_SIZE) for n in lens]
    pool = torch.randperm(sum(n_blk) + 5, generator=gen).tolist()
    tables = torch.zeros(len(lens), max(n_blk) + 1, dtype=torch.int32)  # a padding column, as the scheduler's
    row = 0
    for shared, members in groups:
        common = [pool.pop() for _ in range(shared)]
        for n in members:
            blocks = -(-n // BLOCK_SIZE)
            assert n > shared * BLOCK_SIZE, "a member writes its new token into a block of its own"
            tables[row, :blocks] = torch.tensor(common + [pool.pop() for _ in range(blocks - shared)])
            row += 1
    num_blocks = sum(n_blk) + 5
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=gen).to(DEVICE, dtype)
    q = torch.randn(len(lens), hq + 2 * hkv, d, generator=gen).to(DEVICE, dtype)[:, :hq]  # a strided view
    meta = attention_metadata.AttentionMetadata(
        torch.arange(len(lens) + 1, dtype=torch.int32, device=DEVICE),
        torch.tensor(lens, dtype=torch.int32, device=DEVICE),
        tables.to(DEVICE),
        torch.zeros(len(lens), dtype=torch.int64, device=DEVICE),
        1,
        max(lens),
    )
    return q, k_cache, v_cache, meta


def with_groups(meta, hq, hkv, min_saving=0.0):
    """The metadata with the grouping the runner would compute."""
    grouped = attention_metadata.group_shared_prefixes(
        meta.block_tables.cpu().numpy(),
        meta.seq_lens.cpu().numpy(),
        BLOCK_SIZE,
        attention_metadata.cascade_tile_width(hq // hkv),
        min_saving,
    )
    assert grouped is not None
    shared = attention_metadata.SharedPrefixes(*(torch.from_numpy(a).to(DEVICE) for a in grouped[:3]))
    return attention_metadata.AttentionMetadata(
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables,
        meta.slot_mapping,
        meta.max_query_len,
        meta.max_seq_len,
        shared_prefixes=shared,
    ), grouped[3]


def assert_close(actual, expected):
    tol = TOL[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------
# Grouping (host side)
# ---------------------------------------------------------------------------------------------
def test_groups_share_their_common_leading_blocks():
    # Group A: 3 members sharing 2 blocks; B: one sequence alone; C: 5 members sharing 1 block.
    _, _, _, meta = grouped_batch([(2, [40, 33, 60]), (0, [20]), (1, [17, 18, 30, 31, 50])], 4, 2, 16)
    prefix_lens, tile_seqs, tile_prefix, keys = attention_metadata.group_shared_prefixes(
        meta.block_tables.numpy(), meta.seq_lens.numpy(), BLOCK_SIZE, tile_width=2, min_saving=0.0
    )
    assert prefix_lens.tolist() == [32, 32, 32, 0, 16, 16, 16, 16, 16]
    # Tiles of at most 2 members: A -> 2 tiles, C -> 3 tiles; the lone sequence has none.
    members = sorted(sorted(s for s in row if s >= 0) for row in tile_seqs.tolist())
    assert members == [[0, 1], [2], [4, 5], [6, 7], [8]]
    assert sorted(tile_prefix.tolist()) == [16, 16, 16, 32, 32]
    # Keys read: every sequence's own keys, plus each tile's shared keys once.
    own = sum(meta.seq_lens.tolist()) - int(prefix_lens.sum())
    assert keys == own + int(tile_prefix.sum())


def test_no_grouping_when_it_saves_too_little():
    _, _, _, meta = grouped_batch([(1, [200, 210]), (0, [30])], 4, 2, 16)
    tables, lens = meta.block_tables.numpy(), meta.seq_lens.numpy()
    assert attention_metadata.group_shared_prefixes(tables, lens, BLOCK_SIZE, 16) is None  # 16 of 440 keys saved
    assert attention_metadata.group_shared_prefixes(tables, lens, BLOCK_SIZE, 16, min_saving=0.01) is not None
    _, _, _, alone = grouped_batch([(0, [40]), (0, [50]), (0, [60])], 4, 2, 16)
    assert (
        attention_metadata.group_shared_prefixes(
            alone.block_tables.numpy(), alone.seq_lens.numpy(), BLOCK_SIZE, 16, 0.0
        )
        is None
    )


def test_a_member_one_token_past_the_shared_blocks_keeps_its_own_key():
    # 2 shared blocks (32 keys) and a member of length 33: its only own key is its new token.
    _, _, _, meta = grouped_batch([(2, [33, 70, 90])], 4, 2, 16)
    prefix_lens, *_ = attention_metadata.group_shared_prefixes(
        meta.block_tables.numpy(), meta.seq_lens.numpy(), BLOCK_SIZE, 16, 0.0
    )
    assert prefix_lens.tolist() == [32, 32, 32]


# ---------------------------------------------------------------------------------------------
# Torch reference: cascade == plain decode
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [1, 2, 7, 64])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_reference_cascade_equals_plain_decode(group_size, hq, hkv):
    rng = np.random.default_rng(group_size)
    lens = (40 + rng.integers(1, 60, size=group_size)).tolist()
    groups = [(2, lens), (1, [20, 25]), (0, [9])]
    q, k_cache, v_cache, meta = grouped_batch(groups, hq, hkv, 32, seed=group_size)
    cascade, _ = with_groups(meta, hq, hkv)
    assert_close(
        ops.paged_attention(q, k_cache, v_cache, cascade, 0.2), ops.paged_attention(q, k_cache, v_cache, meta, 0.2)
    )


@pytest.mark.parametrize("shared_keys", [1, 21, 37, 48])
def test_reference_cascade_with_prefixes_ending_mid_block(shared_keys):
    """Any split of truly shared keys gives the same attention, also one ending inside a block."""
    q, k_cache, v_cache, meta = grouped_batch([(3, [60, 75, 49, 90])], 8, 2, 32, seed=shared_keys)
    shared = attention_metadata.SharedPrefixes(
        torch.full((4,), shared_keys, dtype=torch.int32),
        torch.tensor([[0, 1, 2, 3]], dtype=torch.int32),
        torch.tensor([shared_keys], dtype=torch.int32),
    )
    cascade = attention_metadata.AttentionMetadata(
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables,
        meta.slot_mapping,
        1,
        meta.max_seq_len,
        shared_prefixes=shared,
    )
    assert_close(
        ops.paged_attention(q, k_cache, v_cache, cascade, 0.2), ops.paged_attention(q, k_cache, v_cache, meta, 0.2)
    )


def test_a_sliding_window_ignores_the_groups():
    q, k_cache, v_cache, meta = grouped_batch([(3, [60, 75, 90])], 4, 2, 32)
    cascade, _ = with_groups(meta, 4, 2)
    for attention in (ops.paged_attention, kernels.paged_attention):
        assert_close(
            attention(q, k_cache, v_cache, cascade, 0.2, window=20),
            ops.paged_attention(q, k_cache, v_cache, meta, 0.2, window=20),
        )


# ---------------------------------------------------------------------------------------------
# Triton kernel against the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hq,hkv,d,dtype",
    [
        (4, 4, 64, torch.float32),
        (8, 2, 64, torch.float32),  # 4 query heads per KV head: 16 members per tile
        (14, 2, 80, torch.float32),  # 7 per KV head (padded to 8), head dim not a power of two
        (8, 2, 64, torch.float16),
    ],
)
def test_kernel_matches_reference(hq, hkv, d, dtype):
    # A group larger than one tile (20 members > 16), a pair, one sequence alone.
    rng = np.random.default_rng(d)
    groups = [(3, (49 + rng.integers(0, 40, size=20)).tolist()), (1, [17, 40]), (0, [30])]
    q, k_cache, v_cache, meta = grouped_batch(groups, hq, hkv, d, dtype, seed=hq)
    cascade, _ = with_groups(meta, hq, hkv)
    assert_close(
        kernels.paged_attention(q, k_cache, v_cache, cascade, d**-0.5),
        ops.paged_attention(q, k_cache, v_cache, meta, d**-0.5),
    )


@pytest.mark.parametrize("num_splits", [1, 3])
def test_kernel_as_a_cuda_graph_runs_it(num_splits):
    """Static buffers: the tile arrays padded with empty tiles, splits sized for a longer limit, and a
    prefix that ends mid-block."""
    q, k_cache, v_cache, meta = grouped_batch([(3, [60, 70, 50]), (0, [12, 50])], 4, 2, 64)
    prefix_lens = torch.tensor([37, 37, 37, 0, 0], dtype=torch.int32)
    tile_seqs = torch.full((5, 16), -1, dtype=torch.int32)
    tile_seqs[0, :3] = torch.tensor([0, 1, 2])
    tile_prefix = torch.tensor([37, 0, 0, 0, 0], dtype=torch.int32)
    shared = attention_metadata.SharedPrefixes(prefix_lens.to(DEVICE), tile_seqs.to(DEVICE), tile_prefix.to(DEVICE))
    captured = attention_metadata.AttentionMetadata(
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables,
        meta.slot_mapping,
        1,
        max_seq_len=1024,
        shared_prefixes=shared,
    )
    out = kernels.paged_decode_attention(q, k_cache, v_cache, captured, 0.125, num_splits=num_splits)
    assert_close(out, ops.paged_attention(q, k_cache, v_cache, meta, 0.125))


# ---------------------------------------------------------------------------------------------
# The engine: outputs identical with cascade on and off
# ---------------------------------------------------------------------------------------------
def test_engine_outputs_identical_with_and_without_cascade(tiny_llama):
    """One prompt prefix asked many ways (the stories workload in small), greedy and seeded sampling."""
    from cultengine import Engine, SamplingParams

    stem = "Tell a long story about the harbour, the market and the festival of the town " * 3
    reqs = [{"prompt": stem + f"as told by person {i}"} for i in range(6)]
    params = [
        SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0 if i % 2 else 0.9, seed=i) for i in range(6)
    ]
    runs = {}
    for backend in ("torch", "triton"):
        for cascade in (False, True):
            engine = Engine(tiny_llama, dtype="float32", attention_backend=backend, cascade_attention=cascade)
            runs[backend, cascade] = engine.generate(reqs, params, use_tqdm=False)
            stats = engine.stats()
            if cascade:
                assert stats["decode_kv_keys_read"] < 0.6 * stats["decode_kv_keys_plain"]
            else:
                assert stats["decode_kv_keys_read"] == stats["decode_kv_keys_plain"]
    want = runs["torch", False]
    for key, outs in runs.items():
        for got, ref in zip(outs, want, strict=True):
            assert got.token_ids == ref.token_ids, key
            torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(ref.logprobs), atol=1e-5, rtol=0)


def test_padded_graph_steps_with_cascade(tiny_llama):
    """The CUDA-graph decode path with shared-prefix tiles in its static buffers (eager on the CPU)."""
    from cultengine import Engine, SamplingParams
    from cultengine.runner import DecodeGraphs

    stem = "The harbour, the market and the festival of the old town by the sea " * 3
    reqs = [{"prompt": stem + f"number {i}"} for i in range(5)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    ref = Engine(tiny_llama, dtype="float32", attention_backend="torch", cascade_attention=False).generate(
        reqs, params, use_tqdm=False
    )
    engine = Engine(tiny_llama, device=DEVICE, dtype="float32", attention_backend="triton", max_num_seqs=8)
    runner = engine.runner
    if runner.decode_graphs is None:
        runner.decode_graphs = DecodeGraphs(
            engine.model, runner.kv_caches, 8, engine.max_model_len, runner.block_size, runner.device, capture=False
        )
    outs = engine.generate(reqs, params, use_tqdm=False)
    assert runner.decode_graphs.replays >= 5
    assert runner.decode_keys_read < runner.decode_keys_plain
    for got, want in zip(outs, ref, strict=True):
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=0)


def test_results_say_which_decode_paths_ran(tiny_llama):
    """The run section of every results file names the settings that chose the kernels and the loop."""
    from cultengine import Engine, provenance

    engine = Engine(tiny_llama, dtype="float32", cascade_attention=True, overlap_scheduling=False)
    run = provenance.collect(engine=engine, argv=["test"])
    assert run["engine_settings"] == {
        "attention_backend": "torch",
        "cuda_graphs": False,
        "cascade_attention": True,
        "overlap_scheduling": False,
        "tensor_parallel_size": 1,
    }
    assert (
        "- engine settings: attention_backend torch, cuda_graphs False, cascade_attention True, "
        "overlap_scheduling False, tensor_parallel_size 1" in provenance.markdown(run)
    )
    assert Engine(tiny_llama, dtype="float32").provenance()["settings"]["cascade_attention"] is False  # CPU default
