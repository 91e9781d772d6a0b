"""Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1), same signatures as the references in ops.py;
`ops.Ops("triton")` binds the primitives among them."""

from __future__ import annotations

from .attention import paged_attention, paged_decode_attention, paged_prefill_attention, vision_attention
from .cache import write_kv
from .norm import rms_norm
from .patch_embed import patch_embed
from .rotary import rotary_embedding
from .rotary_kv import rotary_write_kv
from .vision_varlen import varlen_vision_attention

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
