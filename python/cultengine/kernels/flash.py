"""Attention through flash-attn 2 (the "flash" backend), falling back to the Triton kernels where it can't.

flash-attn reads a paged cache only when pages are multiples of 256 tokens, and only in fp16/bf16.
Its causal mask is aligned bottom-right, i.e. query i of a sequence sits at seq_len - q_len + i, as ours;
its `window_size=(w - 1, 0)` is our sliding window `w`. It has no bidirectional image spans: steps with
them run on the Triton kernel.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

from . import attention, vision_varlen

if TYPE_CHECKING:  # the kernels never import ops at run time: ops binds them, not the reverse
    from ..attention_metadata import AttentionMetadata

_HALF = (torch.float16, torch.bfloat16)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    if k_cache.shape[1] % 256 or q.dtype not in _HALF:
        warnings.warn(
            "flash-attn needs fp16/bf16 and KV blocks of a multiple of 256 tokens; "
            "using the Triton attention kernels instead",
            stacklevel=2,
        )
        return attention.paged_attention(q, k_cache, v_cache, meta, scale, window)
    if meta.image_spans is not None and meta.image_spans.numel():
        return attention.paged_attention(q, k_cache, v_cache, meta, scale, window)
    if meta.shared_prefixes is not None and meta.max_query_len == 1 and not window:  # cascade: the Triton kernel
        return attention.paged_attention(q, k_cache, v_cache, meta, scale, window)
    window_size = (window - 1, 0) if window else (-1, -1)
    if meta.max_query_len == 1:  # decode-only: one row per sequence, in sequence order
        out = flash_attn_with_kvcache(
            q.unsqueeze(1),
            k_cache,
            v_cache,
            cache_seqlens=meta.seq_lens,
            block_table=meta.block_tables,
            softmax_scale=scale,
            causal=True,
            window_size=window_size,
        )
        return out.squeeze(1)
    cu_seqlens_k = F.pad(meta.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
    return flash_attn_varlen_func(
        q,
        k_cache,
        v_cache,
        meta.query_start_loc,
        cu_seqlens_k,
        meta.max_query_len,
        meta.max_seq_len,
        softmax_scale=scale,
        causal=True,
        block_table=meta.block_tables,
        window_size=window_size,
    )


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    if q.dtype not in _HALF:
        return attention.vision_attention(q, k, v, scale)
    return flash_attn_func(q, k, v, softmax_scale=scale)


def varlen_vision_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    if q.dtype not in _HALF:
        return vision_varlen.varlen_vision_attention(q, k, v, cu_seqlens, max_seqlen, scale)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=False
    )
