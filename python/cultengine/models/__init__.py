"""Model registry: the one list of supported architectures, each naming its family's module and class.

Adding a family is one file in this package (a `Family` subclass and its model; see
docs/ARCHITECTURE.md) and one line below.
"""

from __future__ import annotations

import importlib

from ..checkpoint import Checkpoint
from ..errors import CheckpointError
from .family import Family, ImageFeatures, Model

FAMILIES: dict[str, str] = {
    "LlavaForConditionalGeneration": "llava.Llava",
    "LlavaNextForConditionalGeneration": "llava_next.LlavaNext",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision.LlavaOnevision",
    "Idefics3ForConditionalGeneration": "idefics3.Idefics3",
    "SmolVLMForConditionalGeneration": "idefics3.SmolVLM",
    "InternVLForConditionalGeneration": "internvl.InternVL",
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
# Architectures published in a remote-code layout (their own modelling code, `auto_map`, `trust_remote_code`),
# whose weights cultengine reads in another family's layout: the error names the checkpoint to use instead.
REMOTE_CODE_LAYOUTS: dict[str, str] = {
    "InternVLChatModel": "InternVL's remote-code layout; use the transformers-native `-hf` checkpoint of the same "
                         "model (e.g. OpenGVLab/InternVL3-8B-hf, architecture InternVLForConditionalGeneration)",
}

__all__ = ["FAMILIES", "SUPPORTED_ARCHITECTURES", "Family", "ImageFeatures", "Model", "build_model", "family_for"]


def family_for(checkpoint: Checkpoint, image_backend: str | None = None) -> Family:
    """The family of `checkpoint`'s architecture, its config parsed (CheckpointError if unsupported or bad)."""
    entry = FAMILIES.get(checkpoint.architecture)
    if checkpoint.architecture in REMOTE_CODE_LAYOUTS:
        raise CheckpointError(f"{checkpoint.path / 'config.json'}: architecture {checkpoint.architecture!r} is "
                              f"{REMOTE_CODE_LAYOUTS[checkpoint.architecture]}; cultengine never runs checkpoint code")
    if entry is None:
        raise CheckpointError(f"{checkpoint.path / 'config.json'}: architecture {checkpoint.architecture!r} is not "
                              f"supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    module, cls = entry.rsplit(".", 1)
    return getattr(importlib.import_module(f".{module}", __package__), cls)(checkpoint, image_backend)


def build_model(checkpoint: Checkpoint, ops, max_positions: int | None = None) -> Model:
    """Read the weights of `checkpoint` and build its model; `max_positions` sizes the RoPE tables."""
    return family_for(checkpoint).build_model(ops, max_positions)
