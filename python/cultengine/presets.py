"""Shape presets: the config files of real model sizes, for `profile`, the benches and memory plans, with weights
drawn at load time (nothing downloaded).

Each family declares its own presets (a module-level `PRESETS` in its file under `models/`; `models.presets()`
gathers them); this module holds what they are made of: a public checkpoint's own config files shipped in
`published/` (`Published`), or a combination of parts (`Composed`), and the parts more than one family shares.
It imports neither torch nor a family, so the CLI's `--help` stays light.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

PUBLISHED = Path(__file__).resolve().parent / "published"  # config files as public checkpoints publish them


def published(folder: str, file: str = "config.json") -> dict:
    """A file of `published/<folder>/` (published/SOURCES.md names their sources)."""
    return json.loads((PUBLISHED / folder / file).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class PresetTokens:
    """What a family whose prompts carry image markers adds to the demo tokenizer: its special tokens, the
    placeholder its chat template writes, and processor_config.json's fields."""

    special: tuple[str, ...]
    image_token: str
    processor: dict


@dataclass(frozen=True)
class Published:
    """A preset that is a public checkpoint's own config files (`published/<folder>/`), with `changes` (nested
    config.json fields) for a larger size of the same model whose files this package does not ship, and the
    family's tokens where its prompts need them."""

    folder: str
    changes: dict = field(default_factory=dict)
    tokens: PresetTokens | None = None


@dataclass(frozen=True)
class Composed:
    """A preset put together from parts (published ones where this package has their files): config.json fields
    over the demo checkpoint's, preprocessor_config.json, and the family's tokens where its prompts need them."""

    config: dict
    preprocessor: dict
    tokens: PresetTokens | None = None


Preset = Published | Composed

# Parts more than one family's presets use. Read from published files where this package ships them, typed here
# (config.json fields) for the towers and decoders whose files it does not.
CLIP_L14_336 = published("llava-1.5-7b-hf")["vision_config"]
CLIP_336_PREPROCESSOR = published("llava-1.5-7b-hf", "preprocessor_config.json")
# Qwen2.5-7B-Instruct's decoder: the Qwen2-7B shape (Pangea-7B, LLaVA-OneVision-7B, InternVL3-8B build on it).
QWEN2_7B = {
    k: v
    for k, v in published("Qwen2.5-7B-Instruct").items()
    if k not in ("architectures", "torch_dtype", "use_cache", "bos_token_id", "eos_token_id", "transformers_version")
}
SIGLIP_SO400M_384 = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied, nested dicts field by field."""
    out = dict(base)
    for k, v in changes.items():
        out[k] = merged(base.get(k) or {}, v) if isinstance(v, dict) else v
    return out
