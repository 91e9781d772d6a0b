"""The varlen vision attention kernel against its torch reference (Triton's interpreter without CUDA), and
M-RoPE's per-token tables against transformers' own recomposition.

Segments are ragged (lengths on both sides of the 128-query and 32/64-key tiles, a one-token image),
head dims 64, 80 (padded to 128 and masked) and 128; tolerances as in test_kernels.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from cultengine import kernels, ops  # noqa: E402  (after TRITON_INTERPRET is set)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
NEEDS_CUDA = pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter's bf16 dot is wrong")


def _packed(lengths: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q, k, v = (torch.randn(n, h, d, generator=g).to(DEVICE, dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return q, k, v, cu


def _per_segment(q, k, v, cu, scale):
    """The definition: each segment's own full attention, one SDPA call each."""
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (x[a:b].transpose(0, 1).float() for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        out.append(o.transpose(0, 1))
    return torch.cat(out).to(q.dtype)


@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=NEEDS_CUDA)])
def test_varlen_kernel_matches_reference(d, dtype):
    lengths = [5, 130, 1, 64, 33] if d != 128 else [70, 1, 129]
    q, k, v, cu = _packed(lengths, 2, 2, d, dtype, seed=d)
    scale = d**-0.5
    ref = ops.varlen_vision_attention(q, k, v, cu, max(lengths), scale)
    torch.testing.assert_close(ref.float(), _per_segment(q, k, v, cu, scale).float(), atol=TOL[dtype], rtol=TOL[dtype])
    out = kernels.varlen_vision_attention(q, k, v, cu, max(lengths), scale)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_varlen_kernel_grouped_query_heads_and_strided_views():
    # GQA (4 query heads on 2 KV heads), and q/k/v as views of one fused qkv projection.
    lengths = [40, 7, 90]
    n, d = sum(lengths), 64
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(n, 3, 4, d, generator=g).to(DEVICE)
    q, k, v = qkv.unbind(1)
    k, v = k[:, :2], v[:, :2]
    cu = torch.tensor([0, 40, 47, 137], dtype=torch.int32, device=DEVICE)
    ref = ops.varlen_vision_attention(q, k, v, cu, 90, 0.125)
    torch.testing.assert_close(ref, _per_segment(q, k, v, cu, 0.125), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(kernels.varlen_vision_attention(q, k, v, cu, 90, 0.125), ref, atol=2e-5, rtol=2e-5)


def test_segments_do_not_see_each_other():
    q, k, v, cu = _packed([6, 9], 2, 2, 64, torch.float32, seed=1)
    base = kernels.varlen_vision_attention(q, k, v, cu, 9, 0.125)
    k2, v2 = k.clone(), v.clone()
    k2[6:], v2[6:] = k2[6:] * 3 + 1, -v2[6:]  # change only the second image's keys and values
    other = kernels.varlen_vision_attention(q, k2, v2, cu, 9, 0.125)
    torch.testing.assert_close(other[:6], base[:6], atol=0, rtol=0)
    assert not torch.allclose(other[6:], base[6:])


def test_bind_includes_varlen():
    assert ops.Ops("torch").varlen_vision_attention is ops.varlen_vision_attention
    assert ops.Ops("triton").varlen_vision_attention is kernels.varlen_vision_attention


@pytest.mark.parametrize("interleaved", [False, True])
def test_mrope_tables_match_transformers_recomposition(interleaved):
    """Per-token tables, applied as plain rotate-half RoPE at 0..T-1, equal transformers' M-RoPE."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

    head_dim, section, t = 16, [2, 3, 3], 11
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 40, (3, t), generator=g)
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions[..., None].float() * inv_freq  # [3, T, D/2]
    if interleaved:  # Qwen3-VL: T everywhere, then every third frequency from H (offset 1) and W (offset 2)
        mixed = freqs[0].clone()
        for row, offset in ((1, 1), (2, 2)):
            mixed[..., offset : section[row] * 3 : 3] = freqs[row, ..., offset : section[row] * 3 : 3]
        rows = torch.zeros(head_dim // 2, dtype=torch.long)
        for row in (1, 2):
            rows[row : section[row] * 3 : 3] = row
    else:  # Qwen2/2.5-VL: contiguous chunks
        mixed = torch.cat([m[i % 3] for i, m in enumerate(freqs.split(section, dim=-1))], dim=-1)
        rows = torch.repeat_interleave(torch.arange(3), torch.tensor(section))
    emb = torch.cat((mixed, mixed), dim=-1)
    q, k = torch.randn(1, 4, t, head_dim, generator=g), torch.randn(1, 2, t, head_dim, generator=g)
    want_q, want_k = apply_rotary_pos_emb(q, k, emb.cos()[None], emb.sin()[None])

    cos, sin = ops.rotary_cos_sin(head_dim, 64, 1e4, torch.device("cpu"))
    c, s = ops.mrope_cos_sin(positions, cos, sin, rows)
    got_q, got_k = ops.rotary_embedding(q[0].transpose(0, 1), k[0].transpose(0, 1), torch.arange(t), c, s)
    torch.testing.assert_close(got_q, want_q[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_k, want_k[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
