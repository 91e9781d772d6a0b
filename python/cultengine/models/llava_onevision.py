"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's tiling with a SigLIP tower and a
Qwen2 decoder, and two rules of its own. A grid larger than `anyres_max_N` tiles' worth of features is
shrunk (bilinear) to about N tiles; and only a prompt with a single image is tiled: every image of a
multi-image prompt is padded to a square of the mean colour and becomes one tile plus one newline.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..checkpoint import Checkpoint
from ..errors import CheckpointError
from ..image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor, pad_to_square
from ..presets import QWEN2_7B, SIGLIP_SO400M_384, Composed, Preset
from .llava_next import LlavaNext, LlavaNextModel, TileLayout

ONEVISION_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]
_ONEVISION_DEFAULTS = dict(
    image_token_index=151646,
    projector_hidden_act="gelu",
    vision_feature_select_strategy="full",
    vision_feature_layer=-1,
    multimodal_projector_bias=True,
)
_SIGLIP_SO400M_384 = dict(
    model_type="siglip_vision_model",
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=26,
    num_attention_heads=16,
    patch_size=14,
    image_size=384,
)


class OnevisionImageProcessor(ImageProcessor):
    """transformers' `LlavaOnevisionImageProcessor` per tile: exact resize to 384, no crop, CLIP mean and std."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": 384, "width": 384},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
    }

    @classmethod
    def config_for_image_size(cls, size: int) -> dict:
        return {"size": {"height": size, "width": size}}


class LlavaOnevision(LlavaNext):
    """LLaVA-NeXT tiling with OneVision's cap on grid size and its one-tile rule for multi-image prompts."""

    config_defaults = _ONEVISION_DEFAULTS
    vision_defaults = _SIGLIP_SO400M_384
    default_pinpoints = ONEVISION_PINPOINTS
    processor_class = OnevisionImageProcessor

    def __init__(self, checkpoint: Checkpoint, image_backend: str | None = None):
        super().__init__(checkpoint, image_backend)
        aspect = checkpoint.config.get("vision_aspect_ratio", "anyres_max_9")
        match = re.fullmatch(r"anyres_max_(\d+)", str(aspect))
        if not match or int(match.group(1)) < 1:
            raise CheckpointError(f"{self.where}: vision_aspect_ratio {aspect!r} is not 'anyres_max_N'")
        self.max_tiles = int(match.group(1))
        # The square padding's colour: the processor's mean, in 0..255 (as transformers).
        self.background = tuple(int(m * 255) for m in self.image_processor.mean or OPENAI_CLIP_MEAN)

    def request_image_options(self, options: dict[str, Any], num_images: int) -> dict[str, Any]:
        return {**options, "num_images": num_images}

    def _tiles(self, x, options: dict[str, Any]) -> tuple[list, TileLayout]:
        if options.get("num_images", 1) != 1:
            return [pad_to_square(x, self.background)], TileLayout()
        tiles, meta = super()._tiles(x, options)
        top, bottom, left, right = meta.crop
        h, w, p = bottom - top, right - left, self.patches_per_side
        ratio = math.sqrt(h * w / (self.max_tiles * p**2))
        if ratio > 1.1:
            meta = replace(meta, shrink=(int(h // ratio), int(w // ratio)))
        return tiles, meta

    def _grid_tokens(self, meta: TileLayout) -> int:
        if meta.grid is None:
            return 1  # the newline after a lone tile
        if meta.shrink is not None:
            h, w = meta.shrink
            return h * (w + 1)
        return super()._grid_tokens(meta)

    def build_model(self, ops, max_positions: int | None = None) -> LlavaOnevisionModel:
        return LlavaOnevisionModel(self, ops, max_positions)


class LlavaOnevisionModel(LlavaNextModel):
    def resize_grid(self, grid: torch.Tensor, meta: TileLayout) -> torch.Tensor:
        if meta.shrink is None:
            return grid
        return F.interpolate(grid[None], list(meta.shrink), mode="bilinear")[0]


# Shape preset (cultengine.presets): llava-onevision-qwen2-7b-ov-hf, SigLIP-so400m/14-384 and Qwen2-7B,
# anyres_max_9.
PRESETS: dict[str, Preset] = {
    "llava-onevision-7b": Composed(
        {
            "architectures": ["LlavaOnevisionForConditionalGeneration"],
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
            "text_config": QWEN2_7B,
            "vision_config": SIGLIP_SO400M_384,
        },
        {
            "image_processor_type": "LlavaOnevisionImageProcessor",
            "size": {"height": 384, "width": 384},
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "resample": 3,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
    ),
}
