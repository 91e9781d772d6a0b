"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP (or SigLIP) tower, a 2-layer projector, and a
Llama / Qwen2 / Mistral decoder; every image is one tile whose projected patches fill one run of
placeholder tokens. Pangea-style configs of this class with other decoders load the same way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..checkpoint import Checkpoint
from ..errors import CheckpointError
from ..image import ImageProcessor, image_processor_for_checkpoint
from ..presets import CLIP_336_PREPROCESSOR, CLIP_L14_336, QWEN2_7B, Composed, Preset, Published
from .decoder import Decoder, SplicedDecoder, TextConfig, tied_embeddings
from .family import Family, ImageFeatures
from .vision import VisionConfig, VisionTower, activation

# LlavaConfig's defaults for fields a Hub config.json may leave out, and its CLIP-L/336 tower defaults.
_LLAVA_DEFAULTS: dict[str, Any] = dict(
    image_token_index=32000,
    projector_hidden_act="gelu",
    vision_feature_select_strategy="default",
    vision_feature_layer=-2,
    multimodal_projector_bias=True,
)
_CLIP_L_336 = dict(
    intermediate_size=4096,
    hidden_size=1024,
    patch_size=14,
    image_size=336,
    num_hidden_layers=24,
    num_attention_heads=16,
)


class Llava(Family):
    """Config of a LLaVA checkpoint, and its host-side image processing (one CLIP-preprocessed tile)."""

    config_defaults: dict[str, Any] = _LLAVA_DEFAULTS
    vision_defaults: dict[str, Any] = _CLIP_L_336

    def __init__(self, checkpoint: Checkpoint, image_backend: str | None = None):
        super().__init__(checkpoint, image_backend)
        config = checkpoint.config
        c = {**self.config_defaults, **config}
        self.text = TextConfig.parse(
            config.get("text_config") or {}, self.where, tie_word_embeddings=tied_embeddings(config)
        )
        self.vision = VisionConfig.parse(config.get("vision_config") or {}, self.where, self.vision_defaults)
        self.placeholder_id = int(config.get("image_token_index", config.get("image_token_id", c["image_token_index"])))
        layers = c["vision_feature_layer"]
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        self.select_strategy = c["vision_feature_select_strategy"]
        if self.select_strategy not in ("default", "full"):
            raise CheckpointError(
                f"{self.where}: vision_feature_select_strategy {self.select_strategy!r} is not default/full"
            )
        self.projector_act = c["projector_hidden_act"]
        activation(self.projector_act)
        self.projector_bias = bool(c["multimodal_projector_bias"])
        # "default" drops the first token of the tower's output (CLIP's class token), "full" keeps it.
        self.tokens_per_tile = (
            self.vision.num_patches + self.vision.has_class_token - (self.select_strategy == "default")
        )
        self.image_processor = self._image_processor()

    def _image_processor(self) -> ImageProcessor:
        """The checkpoint's preprocessor_config.json (CLIP or SigLIP); without one, the tower's size."""
        try:
            return image_processor_for_checkpoint(
                self.checkpoint.preprocessor_config, self.vision.image_size, self.image_backend
            )
        except ValueError as e:
            raise CheckpointError(f"{self.checkpoint.path / 'preprocessor_config.json'}: {e}") from e

    @property
    def max_context(self) -> int:
        return self.text.max_position_embeddings

    def process_image(self, image: Image.Image, options: dict[str, Any]) -> ImageFeatures:
        n = self.tokens_per_tile
        return ImageFeatures(
            pixels=self.image_processor(image), token_ids=[self.placeholder_id] * n, embedding_runs=[(0, n)]
        )

    def dummy_image(self) -> Image.Image:
        return Image.new("RGB", (self.vision.image_size, self.vision.image_size))

    def build_model(self, ops, max_positions: int | None = None) -> LlavaModel:
        return LlavaModel(self, ops, max_positions)


class LlavaModel(SplicedDecoder):
    """Vision tower -> selected hidden states -> projector; embeddings spliced into the decoder's input."""

    def __init__(self, family: Llava, ops, max_positions: int | None = None):
        ckpt = family.checkpoint
        super().__init__(
            Decoder(ckpt, family.text, ops, max_positions=max_positions), family.text, family.placeholder_id
        )
        self.ops = ops
        self.family = family
        self.vision = VisionTower(ckpt, family.vision, ops, family.feature_layers)
        v, h = family.vision.hidden_size * len(family.feature_layers), family.text.hidden_size
        p, bias = "model.multi_modal_projector.", family.projector_bias
        self.proj1 = (
            ckpt.tensor(p + "linear_1.weight", (h, v)),
            ckpt.tensor(p + "linear_1.bias", (h,)) if bias else None,
        )
        self.proj2 = (
            ckpt.tensor(p + "linear_2.weight", (h, h)),
            ckpt.tensor(p + "linear_2.bias", (h,)) if bias else None,
        )
        self.proj_act = activation(family.projector_act)
        self.drop_first = family.select_strategy == "default"

    @torch.inference_mode()
    def tile_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed tiles `[N, 3, S, S]` -> projected features `[N, tokens_per_tile, H]`."""
        states = self.vision.forward(pixels)
        if self.drop_first:
            states = [s[:, 1:] for s in states]
        x = torch.cat(states, dim=-1) if len(states) > 1 else states[0]
        return F.linear(self.proj_act(F.linear(x, *self.proj1)), *self.proj2)

    def encode_images(self, images: list[ImageFeatures]) -> list[torch.Tensor]:
        # Every image is one tile of the tower's size: one batched call.
        return list(self.tile_features(torch.stack([im.pixels for im in images])))


# Shape presets (cultengine.presets): llava-1.5-7b-hf's own files, and a Qwen2-7B decoder behind CLIP-L/14-336
# in the LLaVA-1.5 layout.
PRESETS: dict[str, Preset] = {
    "llava-1.5-7b": Published("llava-1.5-7b-hf"),
    "qwen2-7b": Composed(
        {
            "architectures": ["LlavaForConditionalGeneration"],
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "text_config": QWEN2_7B,
            "vision_config": CLIP_L14_336,
        },
        CLIP_336_PREPROCESSOR,
    ),
}
