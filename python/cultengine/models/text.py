"""Text-only decoders (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`): the LLM counterparts of
the VLMs, so a study can run both side by side. No vision part and no image placeholder.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from ..checkpoint import Checkpoint
from ..ops import AttentionMetadata
from .decoder import Decoder, TextConfig
from .family import Family, ImageFeatures


class TextOnly(Family):
    """A causal LM's config.json is its decoder's config, at the top level."""

    def __init__(self, checkpoint: Checkpoint, image_backend: str | None = None):
        super().__init__(checkpoint, image_backend)
        self.text = TextConfig.parse(checkpoint.config, self.where)

    @property
    def max_context(self) -> int:
        return self.text.max_position_embeddings

    def process_image(self, image: Image.Image, options: dict[str, Any]) -> ImageFeatures:
        raise ValueError(f"{self.checkpoint.architecture} is a text-only model: it takes no images")

    def build_model(self, ops, max_positions: int | None = None) -> TextModel:
        return TextModel(self, ops, max_positions)


class TextModel:
    """The decoder alone (`model.*` weights, `lm_head` or tied embeddings)."""

    def __init__(self, family: TextOnly, ops, max_positions: int | None = None):
        self.decoder = Decoder(family.checkpoint, family.text, ops, prefix="model.", max_positions=max_positions)
        self.num_layers = family.text.num_layers
        self.num_kv_heads = family.text.num_kv_heads
        self.head_dim = family.text.head_dim
        self.dtype = self.decoder.dtype

    def encode_images(self, images: list[ImageFeatures]) -> list[torch.Tensor]:
        raise ValueError("a text-only model encodes no images")

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list,
        meta: AttentionMetadata,
        image_rows: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.decoder.forward(self.decoder.embed(input_ids), positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.compute_logits(hidden)

    def allocate_kv_caches(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None):
        return self.decoder.allocate_kv_caches(num_blocks, block_size, dtype)
