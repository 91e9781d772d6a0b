"""Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1), same signatures as the references in ops.py;
`ops.Ops("triton")` binds the primitives among them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .attention import vision_attention
from .cache import write_kv
from .decode_attention import paged_decode_attention
from .norm import rms_norm
from .patch_embed import patch_embed
from .prefill_attention import paged_prefill_attention
from .rotary import rotary_embedding
from .rotary_kv import rotary_write_kv
from .vision_varlen import varlen_vision_attention

if TYPE_CHECKING:
    import torch

    from ..attention_metadata import AttentionMetadata

__all__ = [
    "paged_attention",
    "paged_decode_attention",
    "paged_prefill_attention",
    "vision_attention",
    "varlen_vision_attention",
    "write_kv",
    "rms_norm",
    "patch_embed",
    "rotary_embedding",
    "rotary_write_kv",
]


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
