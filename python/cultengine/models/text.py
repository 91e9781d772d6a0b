"""Text-only decoders (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`): the LLM counterparts of
the VLMs, so a study can run both side by side. No vision part and no image placeholder.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from ..checkpoint import Checkpoint
from .decoder import Decoder, SplicedDecoder, TextConfig
from .family import Family, ImageFeatures


class TextOnly(Family):
    """A causal LM's config.json is its decoder's config, at the top level."""

    config_class: type = TextConfig

    def __init__(self, checkpoint: Checkpoint, image_backend: str | None = None):
        super().__init__(checkpoint, image_backend)
        self.text = self.config_class.parse(checkpoint.config, self.where)

    @property
    def max_context(self) -> int:
        return self.text.max_position_embeddings

    def process_image(self, image: Image.Image, options: dict[str, Any]) -> ImageFeatures:
        raise ValueError(f"{self.checkpoint.architecture} is a text-only model: it takes no images")

    def build_model(self, ops, max_positions: int | None = None) -> SplicedDecoder:
        """The decoder alone (`model.*` weights, `lm_head` or tied embeddings)."""
        decoder = Decoder(self.checkpoint, self.text, ops, prefix="model.", max_positions=max_positions)
        return SplicedDecoder(decoder, self.text, None)
