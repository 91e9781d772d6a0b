"""ViP-LLaVA (`VipLlavaForConditionalGeneration`): LLaVA-1.5 whose projector reads several tower layers (by default
-2, -5, -8, -11 and 6), each without its class token, concatenated and layer-normed before the two linear layers.
The tile, the placeholder run and the decoder are LLaVA-1.5's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..checkpoint import Checkpoint
from ..errors import config_float
from .llava import _LLAVA_DEFAULTS, Llava, LlavaModel

# VipLlavaConfig's defaults: no select strategy (the class token is always dropped), a projector LayerNorm.
_VIPLLAVA_DEFAULTS: dict[str, Any] = {
    **_LLAVA_DEFAULTS,
    "vision_feature_layer": [-2, -5, -8, -11, 6],
    "projector_layernorm_eps": 1e-5,
}


class VipLlava(Llava):
    """LLaVA-1.5's config and processing, with ViP-LLaVA's feature layers and projector norm."""

    config_defaults = _VIPLLAVA_DEFAULTS

    def __init__(self, checkpoint: Checkpoint, image_backend: str | None = None):
        super().__init__(checkpoint, image_backend)
        cfg = checkpoint.config
        c = {**self.config_defaults, **cfg}
        layers = cfg.get("vision_feature_layer", cfg.get("vision_feature_layers", c["vision_feature_layer"]))
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        self.projector_eps = config_float(c, "projector_layernorm_eps", self.where)

    def build_model(self, ops, max_positions: int | None = None) -> VipLlavaModel:
        return VipLlavaModel(self, ops, max_positions)


class VipLlavaModel(LlavaModel):
    """LLaVA's model with the projector LayerNorm over the concatenated feature layers."""

    def __init__(self, family: VipLlava, ops, max_positions: int | None = None):
        super().__init__(family, ops, max_positions)
        width, p = family.vision.hidden_size * len(family.feature_layers), "model.multi_modal_projector."
        ckpt = family.checkpoint
        self.norm = (
            ckpt.tensor(p + "projector_layernorm.weight", (width,)),
            ckpt.tensor(p + "projector_layernorm.bias", (width,)),
        )
        self.eps = family.projector_eps

    @torch.inference_mode()
    def tile_features(self, pixels: torch.Tensor) -> torch.Tensor:
        x = torch.cat([s[:, 1:] for s in self.vision.forward(pixels)], dim=-1)
        x = F.layer_norm(x, (x.shape[-1],), *self.norm, eps=self.eps)
        return F.linear(self.proj_act(F.linear(x, *self.proj1)), *self.proj2)
