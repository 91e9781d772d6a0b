"""The engine's compute primitives: torch reference implementations and backend dispatch.

Every model calls these functions and nothing lower. On CUDA the Triton kernels in the top-level
`kernels/` package replace them (same signatures, same semantics); on the CPU, and whenever
`CULTENGINE_BACKEND=torch` (or `Engine(attention_backend="torch")`), the references below run.
The references are the oracle every kernel is tested against.

KV-cache layout: one key and one value tensor per layer, shaped
`[num_blocks, block_size, num_kv_heads, head_dim]`; token slot `s` lives at block `s // block_size`,
offset `s % block_size`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from .attention_metadata import AttentionMetadata

BACKENDS = ("torch", "triton", "flash")


def resolve_backend(device: torch.device, requested: str | None = None) -> str:
    """Pick the compute backend: an explicit request, then $CULTENGINE_BACKEND, then by device."""
    name = requested or os.environ.get("CULTENGINE_BACKEND") or ("triton" if device.type == "cuda" else "torch")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "torch" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend {name!r} needs a CUDA device (or TRITON_INTERPRET=1 for the Triton one)")
    if name == "flash":
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            raise ValueError("backend 'flash' needs flash-attn: pip install cultengine[flash]") from e
    return name


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------
def write_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the step's keys/values `[T, Hkv, D]` into their cache slots (in place)."""
    num_blocks, block_size, hkv, d = k_cache.shape
    k_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries `[T, Hq, D]` over each sequence's paged KV.

    Query row i of sequence b sits at absolute position `p = seq_lens[b] - q_len_b + i` and sees keys
    0..p; a query inside one of the metadata's image spans also sees the rest of its span. With a
    sliding `window`, only keys `k > p - window` are visible at all (transformers' sliding mask, ANDed
    after the image overlay as Gemma 3 does). Grouped-query attention: query head h reads KV head
    `h // (Hq // Hkv)`. Computed in fp32, returned in q's dtype.
    """
    if meta.max_query_len == 1 and meta.shared_prefixes is not None and window is None:
        return _cascade_decode(q, k_cache, v_cache, meta, scale)
    key = (k_cache.shape[1], window)
    groups = meta.derived.get(key)
    if groups is None:
        groups = meta.derived[key] = _groups(meta, k_cache.shape[1], window, q.device)
    if meta.max_query_len == 1:  # decode: one group, no query padding at all
        return _attend(q, k_cache, v_cache, groups[0], scale)
    out = torch.empty_like(q)
    for g in groups:
        out[g.rows] = _attend(q, k_cache, v_cache, g, scale)
    return out


@dataclass
class _Group:
    """Sequences that attend together (similar query lengths), laid out as `_attend` reads them."""

    rows: torch.Tensor  # their packed query rows, in order
    tables: torch.Tensor  # [b, blocks] from the first block any query's window reaches
    keys: int  # keys gathered per sequence (padded to the longest)
    seq_of_row: torch.Tensor  # [rows]: which of the b sequences each row belongs to
    row_in_seq: torch.Tensor  # [rows]: its index among that sequence's queries
    max_q: int
    mask: torch.Tensor  # [b, 1, max_q, keys]: what each query sees


def _groups(meta: AttentionMetadata, block_size: int, window: int | None, device: torch.device) -> list[_Group]:
    """The step's attention groups. Sequences attend in groups of similar query length (powers of two), so a
    decode row or a short choice never pads to a long prefill chunk: padding stays under 2x whatever the mix."""
    qsl = meta.query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]
    if meta.max_query_len == 1:
        everyone = torch.arange(q_lens.numel(), device=device)
        return [_group(meta, block_size, window, everyone, everyone)]
    bucket = torch.log2(q_lens.float()).ceil().long()
    groups = []
    for b in bucket.unique().tolist():
        seqs = (bucket == b).nonzero().squeeze(1)
        groups.append(_group(meta, block_size, window, seqs, _rows_of(qsl, q_lens, seqs)))
    return groups


def _rows_of(qsl: torch.Tensor, q_lens: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """Packed query rows of the given sequences, in order."""
    lens = q_lens[seqs]
    first = torch.repeat_interleave(qsl[seqs] - torch.cumsum(lens, 0) + lens, lens)
    return first + torch.arange(int(lens.sum()), device=qsl.device)


def _group(
    meta: AttentionMetadata, block_size: int, window: int | None, seqs: torch.Tensor, rows: torch.Tensor
) -> _Group:
    device = rows.device
    qsl = meta.query_start_loc.long()
    q_lens = (qsl[1:] - qsl[:-1])[seqs]
    seq_lens = meta.seq_lens.long()[seqs]
    b = seqs.numel()
    max_q, max_kv = int(q_lens.max()), int(seq_lens.max())
    # Keys from the first block any query's window reaches (all of them without a window).
    first_blk = 0 if window is None else max(int((seq_lens - q_lens).min()) - window + 1, 0) // block_size
    first_key, keys = first_blk * block_size, max_kv - first_blk * block_size
    seq_of_row = torch.repeat_interleave(torch.arange(b, device=device), q_lens)
    row_in_seq = torch.arange(rows.numel(), device=device) - (torch.cumsum(q_lens, 0) - q_lens)[seq_of_row]
    # Query i of a sequence sits at absolute position ctx + i, ctx = seq_len - q_len.
    q_pos = (seq_lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]
    k_pos = first_key + torch.arange(keys, device=device)
    k_pos, q_pos = k_pos[None, None, :], q_pos[:, :, None]
    visible = k_pos <= q_pos
    if meta.image_spans is not None and meta.image_spans.numel():
        lo, hi = _span_of_each_query(meta, seqs, q_pos[:, :, 0])
        visible |= (k_pos >= lo[:, :, None]) & (k_pos < hi[:, :, None])
    if window is not None:
        visible &= k_pos > q_pos - window
    mask = (visible & (k_pos < seq_lens[:, None, None]))[:, None]
    return _Group(rows, meta.block_tables[seqs, first_blk:], keys, seq_of_row, row_in_seq, max_q, mask)


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: _Group, scale: float) -> torch.Tensor:
    """Paged attention (see `paged_attention`) of one group's query rows: its sequences' keys and values
    gathered into a padded `[b, Hkv, keys, D]` batch, its queries scattered into `[b, Hq, max_q, D]`."""
    _, hq, d = q.shape
    hkv = k_cache.shape[2]
    k, v = _gather_keys(k_cache, g.tables, g.keys), _gather_keys(v_cache, g.tables, g.keys)
    if g.max_q == 1:
        qp = q[g.rows].float()[:, :, None]
    else:
        qp = q.new_zeros((len(g.tables), g.max_q, hq, d), dtype=torch.float32)
        qp[g.seq_of_row, g.row_in_seq] = q[g.rows].float()
        qp = qp.transpose(1, 2)
    out = F.scaled_dot_product_attention(qp, k, v, attn_mask=g.mask, scale=scale, enable_gqa=hq != hkv)
    return out.transpose(1, 2)[g.seq_of_row, g.row_in_seq].to(q.dtype)


def _cascade_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Decode attention as the cascade computes it: each tile of a group attends once to its shared keys,
    each sequence alone to the rest of its keys, and the two partial softmaxes merge by log-sum-exp.
    Equal to the plain decode (`_attend`) up to rounding."""
    sp = meta.shared_prefixes
    rows = meta.query_start_loc[:-1].long()
    qd = q[rows].float()
    prefix, seq_lens = sp.prefix_lens.long(), meta.seq_lens.long()
    # Each sequence's own keys, from the block its shared prefix ends in: table columns shifted per row.
    block_size = k_cache.shape[1]
    first_col = prefix // block_size
    cols = first_col[:, None] + torch.arange(int((-(-seq_lens // block_size) - first_col).max()), device=q.device)
    tables = meta.block_tables.gather(1, cols.clamp(max=meta.block_tables.shape[1] - 1))
    keys = first_col[:, None] * block_size + torch.arange(cols.shape[1] * block_size, device=q.device)
    own = (keys >= prefix[:, None]) & (keys < seq_lens[:, None])
    k, v = (_gather_keys(c, tables, keys.shape[1]) for c in (k_cache, v_cache))
    out, lse = _partial_attention(qd, k, v, own, scale)
    for tile in (sp.tile_prefix_lens > 0).nonzero().flatten().tolist():
        members = sp.tile_seqs[tile].long()
        members = members[members >= 0]
        n = int(sp.tile_prefix_lens[tile])
        table = meta.block_tables[members[:1]]  # the shared keys, gathered once for the tile
        k, v = (_gather_keys(c, table, n) for c in (k_cache, v_cache))
        shared_out, shared_lse = _partial_attention(
            qd[members], k, v, torch.ones(1, n, dtype=torch.bool, device=q.device), scale
        )
        top = torch.maximum(lse[members], shared_lse)
        w_own, w_shared = torch.exp(lse[members] - top), torch.exp(shared_lse - top)
        out[members] = (out[members] * w_own[..., None] + shared_out * w_shared[..., None]) / (w_own + w_shared)[
            ..., None
        ]
        lse[members] = top + torch.log(w_own + w_shared)
    result = torch.empty_like(q)
    result[rows] = out.to(q.dtype)
    return result


def _gather_keys(cache: torch.Tensor, tables: torch.Tensor, keys: int) -> torch.Tensor:
    """The first `keys` keys (or values) of each block-table row: `[rows, Hkv, keys, D]` in fp32."""
    _, block_size, hkv, d = cache.shape
    n_blk = -(-keys // block_size)
    kv = cache.index_select(0, tables[:, :n_blk].long().flatten())
    return kv.view(len(tables), n_blk * block_size, hkv, d)[:, :keys].transpose(1, 2).float()


def _partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per row `q [n, Hq, D]` over keys `k, v [n or 1, Hkv, keys, D]` where `visible [n or 1, keys]`:
    the softmax-weighted values `[n, Hq, D]` and the log-sum-exp of the scores `[n, Hq]` (-inf, with zero
    values, for a row that sees no key)."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.view(n, hkv, hq // hkv, d)  # the query heads of each KV head as rows: no copy of the keys
    scores = (qg @ k.transpose(-1, -2)) * scale  # [n, Hkv, group, keys]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, -1)
    weights = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return (weights @ v).view(n, hq, d), lse.view(n, hq)


def _span_of_each_query(
    meta: AttentionMetadata, seqs: torch.Tensor, q_pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, end) of the image span each query `q_pos [b, max_q]` of `seqs` lies in; (-1, -1) outside."""
    loc = meta.image_span_loc.long()
    span_seq = torch.repeat_interleave(torch.arange(loc.numel() - 1, device=loc.device), loc[1:] - loc[:-1])
    local = torch.full((loc.numel() - 1,), -1, dtype=torch.long, device=loc.device)
    local[seqs] = torch.arange(seqs.numel(), device=loc.device)
    lo, hi = torch.full_like(q_pos, -1), torch.full_like(q_pos, -1)
    for b, (first, end) in zip(local[span_seq].tolist(), meta.image_spans.long().tolist(), strict=True):
        if b >= 0:
            inside = (q_pos[b] >= first) & (q_pos[b] < end)
            lo[b][inside], hi[b][inside] = first, end
    return lo, hi


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Non-causal attention for the vision encoder: `[N, S, H, D]` in, `[N, S, H, D]` out (fp32 math)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), scale=scale
    )
    return out.transpose(1, 2).to(q.dtype)


def varlen_vision_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """Non-causal attention over packed variable-length segments (the images, or windows, of a vision
    encoder): `q [N, Hq, D]`, `k, v [N, Hkv, D]`; segment b is rows `cu_seqlens[b]:cu_seqlens[b+1]`
    (int32 `[B+1]`, starting at 0) and attends only to itself. `max_seqlen` is the longest segment (a
    host int, so no kernel reads the device to size its grid). Query head h reads KV head
    `h // (Hq // Hkv)`. Computed in fp32, returned in q's dtype.
    """
    n, hq, d = q.shape
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    b = lens.numel()
    seg = torch.repeat_interleave(torch.arange(b, device=q.device), lens, output_size=n)
    row = torch.arange(n, device=q.device) - cu[:-1][seg]

    def padded(x: torch.Tensor) -> torch.Tensor:  # [N, H, D] -> [B, H, max_seqlen, D], zero-padded
        out = x.new_zeros((b, max_seqlen, x.shape[1], d), dtype=torch.float32)
        out[seg, row] = x.float()
        return out.transpose(1, 2)

    keys = torch.arange(max_seqlen, device=q.device)[None, :] < lens[:, None]
    # Segments of one length (one image) need no mask, and SDPA then avoids materialising the scores.
    mask = None if bool(keys.all()) else keys[:, None, None, :]
    out = F.scaled_dot_product_attention(
        padded(q), padded(k), padded(v), attn_mask=mask, scale=scale, enable_gqa=hq != k.shape[1]
    )
    return out.transpose(1, 2)[seg, row].to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Normalisation and position embedding
# ---------------------------------------------------------------------------------------------
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual + x` (when a residual is given) then RMSNorm, as Llama/Qwen2 do it.

    Returns `(normed, new_residual)`; with no residual, `new_residual` is `x` itself.
    """
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x


def rotary_cos_sin(
    head_dim: int, max_positions: int, theta: float, device: torch.device, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `cos, sin` tables `[max_positions, head_dim // 2]` for rotate-half (NeoX-style) RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    freqs = torch.outer(torch.arange(max_positions, device=device, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate `q [T, Hq, D]` and `k [T, Hkv, D]` by their positions (rotate-half convention)."""

    c, s = cos[positions][:, None, :], sin[positions][:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def rotary_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """`rotary_embedding` of q and k, then `write_kv` of the rotated k and v; returns the rotated q.

    One primitive so a backend can fuse the pair (the Triton kernel stores the rotated keys straight into
    the cache). Tokens whose slot is negative (the padding rows of a CUDA-graph batch) write nothing.
    """
    q, k = rotary_embedding(q, k, positions, cos, sin)
    real = slot_mapping >= 0
    write_kv(k[real], v[real], k_cache, v_cache, slot_mapping[real])
    return q


def mrope_cos_sin(
    positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, freq_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rotary tables `[T, head_dim // 2]` for multimodal RoPE (Qwen2-VL's M-RoPE).

    `positions [R, T]` holds R position streams (temporal, height, width); frequency j of token t turns
    by the angle of stream `freq_rows[j]` (int64 `[head_dim // 2]`: contiguous `mrope_section` chunks
    in Qwen2/2.5-VL, interleaved in Qwen3-VL). Rotating with these tables at positions `0..T-1` is then
    ordinary rotate-half RoPE, so `rotary_embedding` (and its kernel) applies M-RoPE unchanged.
    """
    index = freq_rows[None, None, :].expand(1, positions.shape[1], -1)
    return cos[positions].gather(0, index)[0], sin[positions].gather(0, index)[0]


# ---------------------------------------------------------------------------------------------
# Vision
# ---------------------------------------------------------------------------------------------
def patch_embed(
    pixels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    class_embedding: torch.Tensor | None,
    position_embedding: torch.Tensor,
) -> torch.Tensor:
    """ViT patch embedding: `[N, C, H, W]` pixels to `[N, (1 +) H/P * W/P, E]`.

    Patchify + project (what the Conv2d with stride = kernel = P computes, written as a matmul: cuDNN
    would run an fp32 convolution in tf32 by default, and this is the exact reference), add the
    projection's bias (SigLIP), prepend the class token (CLIP), add position embeddings `[tokens, E]`.
    """
    e, c, patch, _ = weight.shape
    n, _, h, w = pixels.shape
    gh, gw = h // patch, w // patch  # a ragged edge is dropped, as the strided convolution does
    x = pixels[:, :, : gh * patch, : gw * patch].reshape(n, c, gh, patch, gw, patch)
    x = x.permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * patch * patch)
    x = F.linear(x.to(weight.dtype), weight.reshape(e, c * patch * patch), bias)
    if class_embedding is not None:
        x = torch.cat([class_embedding.to(x.dtype).expand(n, 1, -1), x], dim=1)
    return x + position_embedding.to(x.dtype)[None]


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------
class Ops:
    """The primitives of one backend, bound once per engine so the hot path does no lookups.

    The class attributes are the torch references, and so each primitive's name and signature, written once.
    A backend's providers (`_providers`) replace them on the instance with their own functions of the same
    signatures (`tests/test_kernels.py` checks every one); a primitive a provider lacks falls through to the
    next, and finally to the reference. `write_kv` is not among them: the models write the cache through
    `rotary_write_kv`, whose reference composes it.
    """

    paged_attention = staticmethod(paged_attention)
    vision_attention = staticmethod(vision_attention)
    varlen_vision_attention = staticmethod(varlen_vision_attention)
    rms_norm = staticmethod(rms_norm)
    rotary_embedding = staticmethod(rotary_embedding)
    patch_embed = staticmethod(patch_embed)
    rotary_write_kv = staticmethod(rotary_write_kv)

    def __init__(self, backend: str):
        self.backend = backend
        providers = _providers(backend)
        for name in PRIMITIVES:
            impl = next((getattr(p, name) for p in providers if hasattr(p, name)), None)
            if impl is not None:
                setattr(self, name, impl)


PRIMITIVES = tuple(name for name, value in vars(Ops).items() if isinstance(value, staticmethod))


def _providers(backend: str) -> list[ModuleType]:
    """The modules whose functions replace the references on `backend`, first choice first."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return []
    from . import kernels

    if backend == "triton":
        return [kernels]
    try:
        from .kernels import flash
    except ImportError as e:
        raise ValueError(f"backend 'flash' needs flash-attn ({e}): pip install cultengine[flash]") from None
    return [flash, kernels]  # flash-attn's attention; the Triton kernels for the rest


def set_cpu_threads(threads: int | None) -> None:
    """torch's CPU threads: as asked, else the cores this process may use (a container or taskset may allow
    fewer than the machine has); OMP_NUM_THREADS, when set, wins over the default."""
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads or available)
