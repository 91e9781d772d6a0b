"""Model registry: a loaded `Checkpoint` + an `Ops` instance -> a ready model."""

from __future__ import annotations

from ..checkpoint import SUPPORTED_ARCHITECTURES, Checkpoint, CheckpointError
from .llava import LlavaModel

_MODELS = {"LlavaForConditionalGeneration": LlavaModel}
assert set(_MODELS) == set(SUPPORTED_ARCHITECTURES)

__all__ = ["SUPPORTED_ARCHITECTURES", "LlavaModel", "build_model"]


def build_model(checkpoint: Checkpoint, ops, max_positions: int | None = None) -> LlavaModel:
    """Read the weights of `checkpoint` and build its model; `max_positions` sizes the RoPE tables."""
    if checkpoint.architecture not in _MODELS:
        raise CheckpointError(f"architecture {checkpoint.architecture!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return _MODELS[checkpoint.architecture](checkpoint, ops, max_positions=max_positions)
