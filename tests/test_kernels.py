"""Every Triton kernel against its torch reference in ops.py.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is
imported), so shapes are small but chosen to cross every tile and block boundary the kernels have:
prefill tiles are 128 queries x 64 keys, decode tiles 64 keys, KV blocks 16 tokens here.

Tolerances, by dtype of the inputs and outputs:
  fp32: 2e-5 abs/rel. Both sides compute in fp32 (the kernels force IEEE fp32 dots, no tf32); only the
        summation order differs (online softmax, tiled GEMM).
  fp16: 2e-3 abs/rel. Outputs are rounded to fp16 (half an ulp is 2.4e-4 near 1) and the softmax
        probabilities are rounded to fp16 before the P@V product, as flash attention does.
  bf16: 2e-2 abs/rel, CUDA only: 8 mantissa bits (ulp 3.9e-3 near 1), same two roundings. The
        interpreter's bf16 tl.dot gives wrong results, so bf16 is not tested on the CPU.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from cultengine import attention_metadata, kernels, ops  # noqa: E402  (after TRITON_INTERPRET is set)
from family_parity import assert_rotary_fusion_changes_nothing, unfused_rotary_write_kv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
NEEDS_CUDA = pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter's bf16 dot is wrong")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=NEEDS_CUDA)]
BLOCK_SIZE = 16


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tol = TOL[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def randn(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def paged_batch(q_lens, seq_lens, hq, hkv, d, dtype, seed=0, shared_prefix_blocks=0):
    """A step of a packed batch whose new keys/values are written by the write_kv kernel first.

    Physical blocks are a random permutation of a larger pool (non-contiguous, shuffled tables). With
    `shared_prefix_blocks`, every sequence's first blocks are the same physical blocks (a prefix-cache
    hit); the cached prefix is filled directly, as an earlier step would have.
    """
    gen = torch.Generator().manual_seed(seed)
    b = len(q_lens)
    n_blk = [-(-s // BLOCK_SIZE) for s in seq_lens]
    pool = torch.randperm(sum(n_blk) + 7, generator=gen)
    tables = torch.zeros(b, max(n_blk) + 1, dtype=torch.int32)  # one padding column, as the scheduler's
    shared, fresh = pool[:shared_prefix_blocks].tolist(), pool[shared_prefix_blocks:].tolist()
    for i, n in enumerate(n_blk):
        own = [fresh.pop() for _ in range(n - shared_prefix_blocks)]
        tables[i, :n] = torch.tensor(shared + own, dtype=torch.int32)
    num_blocks = pool.numel()
    k_cache = randn(num_blocks, BLOCK_SIZE, hkv, d, dtype=dtype, gen=gen)  # stale data everywhere else
    v_cache = randn(num_blocks, BLOCK_SIZE, hkv, d, dtype=dtype, gen=gen)

    slots = [
        tables[i, p // BLOCK_SIZE].item() * BLOCK_SIZE + p % BLOCK_SIZE
        for i, (ql, sl) in enumerate(zip(q_lens, seq_lens, strict=True))
        for p in range(sl - ql, sl)
    ]
    t = len(slots)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    qkv = randn(t, hq + 2 * hkv, d, dtype=dtype, gen=gen)  # strided q/k/v views, as a fused projection gives
    q, k, v = qkv.split([hq, hkv, hkv], dim=1)
    kernels.write_kv(k, v, k_cache, v_cache, slot_mapping)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    meta = attention_metadata.AttentionMetadata(
        qsl,
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        tables.to(DEVICE),
        slot_mapping,
        max(q_lens),
        max(seq_lens),
    )
    return q, k_cache, v_cache, meta


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_write_kv_matches_reference(cache_dtype):
    gen = torch.Generator().manual_seed(1)
    kv = randn(21, 2, 3, 80, gen=gen)  # fp32 keys into an fp16 cache: the cast happens on store
    key, value = kv[:, 0], kv[:, 1]
    slots = torch.randperm(6 * BLOCK_SIZE, generator=gen)[:21].to(DEVICE)
    caches = [randn(6, BLOCK_SIZE, 3, 80, dtype=cache_dtype, gen=gen) for _ in range(2)]
    expected = [c.clone() for c in caches]
    kernels.write_kv(key, value, *caches, slots)
    ops.write_kv(key, value, *expected, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


def test_write_kv_skips_padding_slots():
    """Slot -1 (a padding row of a CUDA-graph batch) writes nothing; the other rows land."""
    gen = torch.Generator().manual_seed(2)
    key, value = randn(5, 2, 64, gen=gen), randn(5, 2, 64, gen=gen)
    slots = torch.tensor([7, -1, 20, -1, 3], device=DEVICE)
    caches = [randn(2, BLOCK_SIZE, 2, 64, gen=gen) for _ in range(2)]
    expected = [c.clone() for c in caches]
    kernels.write_kv(key, value, *caches, slots)
    real = slots >= 0
    ops.write_kv(key[real], value[real], *expected, slots[real])
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


# ---------------------------------------------------------------------------------------------
# Paged attention
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hq,hkv,d,dtype",
    [
        (4, 4, 64, torch.float32),
        (8, 2, 128, torch.float32),
        (8, 1, 96, torch.float16),
        pytest.param(8, 2, 128, torch.bfloat16, marks=NEEDS_CUDA),
    ],
)
def test_prefill_ragged_batch(hq, hkv, d, dtype):
    # A fresh prompt spanning two query tiles and three key tiles, a chunk resuming mid-block (context 27),
    # a one-token prompt, and a decode row riding along in the same step (chunked prefill).
    q_lens, seq_lens = [150, 40, 1, 1], [150, 67, 1, 90]
    q, k_cache, v_cache, meta = paged_batch(q_lens, seq_lens, hq, hkv, d, dtype)
    out = kernels.paged_attention(q, k_cache, v_cache, meta, d**-0.5)
    assert_close(out, ops.paged_attention(q, k_cache, v_cache, meta, d**-0.5))


def test_prefill_prefix_cache_hit():
    # Three sequences share their first 5 physical blocks (80 tokens) and compute only a suffix that
    # starts mid-block (positions 85.., 100.., 130..): queries begin mid-sequence, tables are shuffled.
    q_lens, seq_lens = [20, 70, 3], [105, 170, 133]
    q, k_cache, v_cache, meta = paged_batch(q_lens, seq_lens, 4, 1, 64, torch.float32, seed=3, shared_prefix_blocks=5)
    assert (meta.block_tables[:, :5] == meta.block_tables[0, :5]).all()
    out = kernels.paged_attention(q, k_cache, v_cache, meta, 0.125)
    assert_close(out, ops.paged_attention(q, k_cache, v_cache, meta, 0.125))


@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 128), (8, 2, 64), (16, 2, 80)])
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_decode_split_kv(hq, hkv, d, num_splits):
    # Lengths of 1 and 17 leave the later splits of the 300-token sequence's partition empty.
    seq_lens = [300, 1, 17, 128]
    q, k_cache, v_cache, meta = paged_batch([1] * 4, seq_lens, hq, hkv, d, torch.float32, seed=hq + d)
    out = kernels.paged_decode_attention(q, k_cache, v_cache, meta, d**-0.5, num_splits=num_splits)
    assert_close(out, ops.paged_attention(q, k_cache, v_cache, meta, d**-0.5))


def test_decode_split_for_a_longer_limit_than_the_batch():
    """As a CUDA graph runs it: splits sized for max_seq_len 1024 while the batch is far shorter."""
    q, k_cache, v_cache, meta = paged_batch([1] * 3, [70, 1, 33], 4, 2, 64, torch.float32, seed=9)
    captured = attention_metadata.AttentionMetadata(
        meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.slot_mapping, max_query_len=1, max_seq_len=1024
    )
    out = kernels.paged_decode_attention(q, k_cache, v_cache, captured, 0.125)
    assert_close(out, ops.paged_attention(q, k_cache, v_cache, meta, 0.125))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_dispatch(dtype):
    q, k_cache, v_cache, meta = paged_batch([1, 1, 1], [70, 5, 200], 8, 1, 64, dtype, seed=5, shared_prefix_blocks=1)
    out = kernels.paged_attention(q, k_cache, v_cache, meta, 0.125)  # max_query_len == 1: decode kernel
    assert_close(out, ops.paged_attention(q, k_cache, v_cache, meta, 0.125))


@pytest.mark.parametrize("d,dtype", [(64, torch.float32), (80, torch.float16)])
def test_vision_attention(d, dtype):
    qkv = randn(2, 77, 3, 3, d, dtype=dtype, gen=torch.Generator().manual_seed(2))  # 77: a ragged key tile
    q, k, v = qkv.unbind(2)
    out = kernels.vision_attention(q, k, v, d**-0.5)
    assert_close(out, ops.vision_attention(q, k, v, d**-0.5))


# ---------------------------------------------------------------------------------------------
# Norm, rotary, patch embedding
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    gen = torch.Generator().manual_seed(4)
    x = randn(2, 5, 200, dtype=dtype, gen=gen)  # 200: not a power of two
    weight = 1 + 0.1 * randn(200, dtype=dtype, gen=gen)
    residual = randn(2, 5, 200, dtype=dtype, gen=gen) if with_residual else None
    out, res = kernels.rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_res = ops.rms_norm(x, weight, 1e-6, residual)
    assert_close(out, ref_out)
    assert_close(res, ref_res)
    if not with_residual:
        assert res is x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 96])
def test_rotary_embedding(dtype, d):
    gen = torch.Generator().manual_seed(6)
    cos, sin = ops.rotary_cos_sin(d, 512, 10000.0, torch.device(DEVICE))
    qkv = randn(9, 8 + 2 * 2, d, dtype=dtype, gen=gen)
    q, k, _ = qkv.split([8, 2, 2], dim=1)
    positions = torch.randint(0, 512, (9,), generator=gen).to(DEVICE)
    for actual, expected in zip(
        kernels.rotary_embedding(q, k, positions, cos, sin),
        ops.rotary_embedding(q, k, positions, cos, sin),
        strict=True,
    ):
        assert_close(actual, expected)


def rotary_step(t, hq, hkv, d, dtype, cache_dtype, gen, slots, mrope=False):
    """Strided q/k/v views of one projection, rotary tables (shared, or M-RoPE per-token ones at 0..T-1) and
    caches full of stale data, for `rotary_write_kv`'s arguments."""
    qkv = randn(t, hq + 2 * hkv, d, dtype=dtype, gen=gen)
    q, k, v = qkv.split([hq, hkv, hkv], dim=1)
    cos, sin = ops.rotary_cos_sin(d, 64, 10000.0, torch.device(DEVICE))
    positions = torch.randint(0, 64, (3, t) if mrope else (t,), generator=gen).to(DEVICE)
    if mrope:  # Qwen2-VL's layout: contiguous sections of the frequencies follow the t/h/w streams
        rows = torch.repeat_interleave(torch.arange(3), torch.tensor([d // 4, d // 8, d // 2 - d // 4 - d // 8]))
        cos, sin = ops.mrope_cos_sin(positions, cos, sin, rows.to(DEVICE))
        positions = torch.arange(t, device=DEVICE)
    num_blocks = -(-max(slots) // BLOCK_SIZE) + 1
    caches = [randn(num_blocks, BLOCK_SIZE, hkv, d, dtype=cache_dtype, gen=gen) for _ in range(2)]
    return q, k, v, positions, cos, sin, caches, torch.tensor(slots, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 64), (6, 1, 80), (2, 2, 128)])  # GQA/MQA/MHA; 80: not a power of two
@pytest.mark.parametrize("mrope", [False, True])
def test_rotary_write_kv(dtype, hq, hkv, d, mrope):
    """The fused kernel against the reference, slot -1 rows writing nothing; and bit for bit the unfused pair."""
    gen = torch.Generator().manual_seed(8)
    slots = [17, -1, 3, 40, -1, 0, 22]
    q, k, v, positions, cos, sin, caches, slot_mapping = rotary_step(7, hq, hkv, d, dtype, dtype, gen, slots, mrope)
    expected, unfused = [c.clone() for c in caches], [c.clone() for c in caches]
    out = kernels.rotary_write_kv(q, k, v, positions, cos, sin, *caches, slot_mapping)
    assert_close(out, ops.rotary_write_kv(q, k, v, positions, cos, sin, *expected, slot_mapping))
    assert_close(caches[0], expected[0])
    assert torch.equal(caches[1], expected[1])  # values are copied, not computed
    assert torch.equal(out, unfused_rotary_write_kv(q, k, v, positions, cos, sin, *unfused, slot_mapping))
    assert torch.equal(caches[0], unfused[0]) and torch.equal(caches[1], unfused[1])


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32)])
def test_rotary_write_kv_rounds_as_the_pair_does(dtype, cache_dtype):
    """Rotated keys round to k's dtype, then to the cache's: the same bits as rotary_embedding then write_kv."""
    gen = torch.Generator().manual_seed(9)
    step = rotary_step(5, 4, 2, 64, dtype, cache_dtype, gen, [9, 2, -1, 30, 14])
    q, k, v, positions, cos, sin, caches, slot_mapping = step
    unfused = [c.clone() for c in caches]
    out = kernels.rotary_write_kv(q, k, v, positions, cos, sin, *caches, slot_mapping)
    assert torch.equal(out, unfused_rotary_write_kv(q, k, v, positions, cos, sin, *unfused, slot_mapping))
    assert torch.equal(caches[0], unfused[0]) and torch.equal(caches[1], unfused[1])


def test_rotary_write_kv_reference_is_the_pair():
    """The reference composes the two references, and skips slot -1 rows as the write_kv kernel does."""
    gen = torch.Generator().manual_seed(10)
    step = rotary_step(4, 2, 1, 64, torch.float32, torch.float32, gen, [5, -1, 12, 1])
    q, k, v, positions, cos, sin, caches, slot_mapping = step
    expected = [c.clone() for c in caches]
    out = ops.rotary_write_kv(q, k, v, positions, cos, sin, *caches, slot_mapping)
    real = slot_mapping >= 0
    q_rot, k_rot = ops.rotary_embedding(q, k, positions, cos, sin)
    ops.write_kv(k_rot[real], v[real], *expected, slot_mapping[real])
    assert torch.equal(out, q_rot)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


@pytest.mark.parametrize(
    "shape,patch,dtype,cls,biased",
    [
        ((2, 3, 28, 42), 14, torch.float32, True, False),  # CLIP, odd grid: 2 x 3 patches
        ((1, 3, 30, 45), 14, torch.float16, True, False),  # ragged edge dropped as the strided conv does; fp32 pixels
        ((1, 3, 64, 64), 16, torch.float32, True, False),  # 17 tokens
        ((3, 3, 28, 28), 14, torch.float32, False, True),  # SigLIP: no class token, a biased projection
        ((1, 3, 48, 32), 16, torch.float16, False, True),
        ((2, 3, 28, 28), 7, torch.float32, True, True),  # InternViT: a class token and a biased projection
    ],
)
def test_patch_embed(shape, patch, dtype, cls, biased):
    gen = torch.Generator().manual_seed(7)
    e = 48  # not a multiple of the 128-wide output tile
    pixels = randn(*shape, gen=gen)
    weight = (0.05 * randn(e, shape[1], patch, patch, gen=gen)).to(dtype)
    tokens = cls + (shape[2] // patch) * (shape[3] // patch)
    class_embedding = randn(e, dtype=dtype, gen=gen) if cls else None
    bias = randn(e, dtype=dtype, gen=gen) if biased else None
    pos = randn(tokens, e, dtype=dtype, gen=gen)
    out = kernels.patch_embed(pixels, weight, bias, class_embedding, pos)
    assert out.shape == (shape[0], tokens, e)
    assert_close(out, ops.patch_embed(pixels, weight, bias, class_embedding, pos))


# ---------------------------------------------------------------------------------------------
# Binding
# ---------------------------------------------------------------------------------------------
def test_each_backend_binds_every_primitive_once_with_the_references_signature():
    """The primitives are named once (`Ops`' class attributes, the torch references); the Triton backend
    replaces every one with a kernel, flash its attention ones (the rest fall through to Triton), and every
    replacement takes the reference's parameters."""
    import inspect

    assert ops.PRIMITIVES == (
        "paged_attention",
        "vision_attention",
        "varlen_vision_attention",
        "rms_norm",
        "rotary_embedding",
        "patch_embed",
        "rotary_write_kv",
    )
    reference, triton = ops.Ops("torch"), ops.Ops("triton")
    for name in ops.PRIMITIVES:
        assert getattr(reference, name) is getattr(ops, name)
        assert getattr(triton, name) is getattr(kernels, name)
        assert inspect.signature(getattr(kernels, name)).parameters.keys() == (
            inspect.signature(getattr(ops, name)).parameters.keys()
        ), name
    try:
        from cultengine.kernels import flash
    except ImportError:
        with pytest.raises(ValueError, match="backend 'flash' needs flash-attn"):
            ops.Ops("flash")
    else:
        bound = ops.Ops("flash")
        for name in ("paged_attention", "vision_attention", "varlen_vision_attention"):
            assert getattr(bound, name) is getattr(flash, name)
            assert inspect.signature(getattr(flash, name)).parameters.keys() == (
                inspect.signature(getattr(ops, name)).parameters.keys()
            )
        assert bound.rms_norm is kernels.rms_norm
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.Ops("cuda")


def test_bench_dry_run_writes_tables(tmp_path):
    # The GPU benchmark's plumbing (shapes, FLOP/byte accounting, Markdown and JSON output) on tiny shapes.
    path = Path(__file__).resolve().parents[1] / "benches" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--dry-run", "--out", str(tmp_path)])
    (md,), (js,) = tmp_path.glob("kernels-*.md"), tmp_path.glob("kernels-*.json")
    assert "Prefill attention" in md.read_text() and '"decode"' in js.read_text()
    assert "Rotary + KV write" in md.read_text() and '"rotary_write_kv"' in js.read_text()


def test_engine_on_triton_kernels_matches_the_torch_path(tiny_llama):
    """The whole engine on the Triton backend: greedy tokens identical, logprobs close (fp32)."""
    from PIL import Image

    from cultengine import Engine, SamplingParams

    img = Image.new("RGB", (40, 30), (200, 30, 60))
    reqs = [{"prompt": "<image>\nWhich flag is this?", "images": [img]}, {"prompt": "A festival of lights"}]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    runs = [
        Engine(
            tiny_llama, device=DEVICE, dtype="float32", attention_backend=backend, max_num_batched_tokens=32
        ).generate(reqs, params, use_tqdm=False)  # small budget: chunked prefill + mixed steps
        for backend in ("torch", "triton")
    ]
    for ref, tri in zip(*runs, strict=True):
        assert tri.token_ids == ref.token_ids
        torch.testing.assert_close(torch.tensor(tri.logprobs), torch.tensor(ref.logprobs), atol=1e-4, rtol=0)


def test_padded_decode_batches_match_the_torch_path(tiny_llama, monkeypatch):
    """The CUDA-graph decode path: static buffers, batches padded up the size ladder (5 -> 8, 3 -> 4),
    padding rows writing no KV, greedy picks made inside the graph. On the CPU its steps run eagerly; on
    CUDA they replay captured graphs."""
    from cultengine import Engine, SamplingParams
    from cultengine import runner as runner_module
    from cultengine.runner import DecodeGraphs

    reqs = [{"prompt": f"Story {i} about the harbour"} for i in range(5)]
    params = [SamplingParams(max_tokens=2 + 2 * i, ignore_eos=True) for i in range(5)]
    ref = Engine(tiny_llama, device=DEVICE, dtype="float32", attention_backend="torch").generate(
        reqs, params, use_tqdm=False
    )
    engine = Engine(tiny_llama, device=DEVICE, dtype="float32", attention_backend="triton", max_num_seqs=8)
    runner = engine.runner
    if runner.decode_graphs is None:
        runner.decode_graphs = DecodeGraphs(
            engine.model, runner.kv_caches, 8, engine.max_model_len, runner.block_size, runner.device, capture=False
        )
    assert runner.decode_graphs.sizes == [1, 2, 4, 8]
    sampled = []
    monkeypatch.setattr(runner_module, "sample", lambda *a, real=runner_module.sample: sampled.append(a) or real(*a))
    outs = engine.generate(reqs, params, use_tqdm=False)
    assert runner.decode_graphs.replays >= 9  # every decode step: 10 tokens for the longest, the first is prefill
    assert len(sampled) == 1  # the prefill step; each decode step took its graph's argmax
    for got, want in zip(outs, ref, strict=True):
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-4, rtol=0)


def test_fused_rotary_write_kv_changes_no_output(tiny_llama):
    """Fusion on and off: the same outputs bit for bit, over chunked prefill, mixed steps and decode."""
    reqs = [{"prompt": "A festival of lights"}, {"prompt": "Story about the harbour at night"}]
    assert_rotary_fusion_changes_nothing(tiny_llama, reqs, max_num_batched_tokens=16)
