"""Model registry: the one list of supported architectures, each naming its family's module and class.

Adding a family is one file in this package (a `Family` subclass and its model, and its shape presets if it
has any; see docs/ARCHITECTURE.md) and one line below.
"""

from __future__ import annotations

import importlib

from ..checkpoint import Checkpoint
from ..errors import unsupported_architecture
from ..presets import Preset
from .family import Capabilities, Family, ImageFeatures, Model

FAMILIES: dict[str, str] = {
    "LlavaForConditionalGeneration": "llava.Llava",
    "LlavaNextForConditionalGeneration": "llava_next.LlavaNext",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision.LlavaOnevision",
    "Qwen2VLForConditionalGeneration": "qwen2_vl.Qwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl.Qwen2_5_VL",
    "Qwen3VLForConditionalGeneration": "qwen3_vl.Qwen3VL",
    "Idefics3ForConditionalGeneration": "idefics3.Idefics3",
    "SmolVLMForConditionalGeneration": "idefics3.SmolVLM",
    "InternVLForConditionalGeneration": "internvl.InternVL",
    "VipLlavaForConditionalGeneration": "vipllava.VipLlava",
    "Gemma3ForConditionalGeneration": "gemma3.Gemma3",
    "Gemma3ForCausalLM": "gemma3.Gemma3Text",
    "LlamaForCausalLM": "text.TextOnly",
    "MistralForCausalLM": "text.TextOnly",
    "Qwen2ForCausalLM": "text.TextOnly",
    "Qwen3ForCausalLM": "text.TextOnly",
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)

__all__ = [
    "FAMILIES",
    "SUPPORTED_ARCHITECTURES",
    "Capabilities",
    "Family",
    "ImageFeatures",
    "Model",
    "build_model",
    "family_for",
    "presets",
]


def family_for(checkpoint: Checkpoint, image_backend: str | None = None) -> Family:
    """The family of `checkpoint`'s architecture, its config parsed (CheckpointError if unsupported or bad)."""
    entry = FAMILIES.get(checkpoint.architecture)
    if entry is None:
        raise unsupported_architecture(
            str(checkpoint.path / "config.json"), checkpoint.architecture, SUPPORTED_ARCHITECTURES
        )
    module, cls = entry.rsplit(".", 1)
    return getattr(importlib.import_module(f".{module}", __package__), cls)(checkpoint, image_backend)


def build_model(checkpoint: Checkpoint, ops, max_positions: int | None = None) -> Model:
    """Read the weights of `checkpoint` and build its model; `max_positions` sizes the RoPE tables."""
    return family_for(checkpoint).build_model(ops, max_positions)


def presets() -> dict[str, Preset]:
    """Every family's shape presets (its module's `PRESETS`), by name, in registry order."""
    out: dict[str, Preset] = {}
    for module in dict.fromkeys(entry.rsplit(".", 1)[0] for entry in FAMILIES.values()):
        out.update(getattr(importlib.import_module(f".{module}", __package__), "PRESETS", {}))
    return out
