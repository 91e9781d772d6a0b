"""Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1), same signatures as the references in ops.py."""

from __future__ import annotations

import warnings

from .attention import paged_attention, paged_decode_attention, paged_prefill_attention, vision_attention
from .cache import write_kv
from .norm import rms_norm
from .patch_embed import patch_embed
from .rotary import rotary_embedding
from .rotary_kv import rotary_write_kv
from .vision_varlen import varlen_vision_attention

__all__ = [
    "bind",
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


def bind(ops, use_flash_attn: bool = False) -> None:
    """Swap the primitives of an `ops.Ops` instance for the kernels (attention via flash-attn if asked)."""
    ops.paged_attention, ops.rms_norm = paged_attention, rms_norm
    ops.vision_attention, ops.varlen_vision_attention = vision_attention, varlen_vision_attention
    ops.rotary_embedding, ops.patch_embed = rotary_embedding, patch_embed
    ops.rotary_write_kv = rotary_write_kv
    if use_flash_attn:
        try:
            from . import flash
        except ImportError as e:
            warnings.warn(f"flash-attn unavailable ({e}); using the Triton attention kernels", stacklevel=2)
            return
        ops.paged_attention = flash.paged_attention
        ops.vision_attention = flash.vision_attention
        ops.varlen_vision_attention = flash.varlen_vision_attention
