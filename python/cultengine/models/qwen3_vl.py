"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): Qwen2-VL's processing with 16-pixel patches, a Qwen3 decoder
(q/k RMSNorm) with interleaved M-RoPE, and DeepStack.

The tower adds learned position embeddings, a square grid bilinearly resampled to each image's patch
grid (align_corners), to the (biased) patch embedding; its LayerNorm blocks run whole-image varlen
attention. After the blocks at `deepstack_visual_indexes` a merger of its own (normalising the
concatenated 2x2 block) projects the hidden states too: those features are added to the image tokens'
hidden states after the decoder's first layers, one set per layer. The model carries them as extra
columns of each image's embeddings, so chunked prefill, the encoder cache and prefix caching treat
them like the embeddings themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, config_int
from ..presets import Preset, Published
from .decoder import LayerHook
from .qwen2_vl import Qwen2VL, Qwen2VLModel, QwenVisionConfig, QwenVisionTower, merge_order_coordinates


@dataclass
class Qwen3VisionConfig(QwenVisionConfig):
    num_position_embeddings: int = 2304  # a square grid
    deepstack_indexes: tuple[int, ...] = ()

    @classmethod
    def parse(cls, cfg: dict, where: str) -> Qwen3VisionConfig:
        c = {
            "depth": 27,
            "hidden_size": 1152,
            "hidden_act": "gelu_pytorch_tanh",
            "intermediate_size": 4304,
            "num_heads": 16,
            "in_channels": 3,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 3584,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [8, 16, 24],
            **{k: v for k, v in cfg.items() if v is not None},
        }
        fields = cls.fields(c, where)
        n_pos = config_int(c, "num_position_embeddings", where)
        if round(n_pos**0.5) ** 2 != n_pos:
            raise CheckpointError(f"{where}: vision num_position_embeddings {n_pos} is not a square grid")
        deep, depth = c["deepstack_visual_indexes"], fields["depth"]
        if not isinstance(deep, list) or not all(isinstance(i, int) and 0 <= i < depth for i in deep):
            raise CheckpointError(f"{where}: vision deepstack_visual_indexes {deep!r} must list blocks 0..{depth - 1}")
        return cls(**fields, num_position_embeddings=n_pos, deepstack_indexes=tuple(deep))


def bilinear_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two taps into a `side`-long axis and their weights for target positions `index` of a `size`-long
    one, as `F.interpolate(mode="bilinear", align_corners=True)` (transformers' own tap arithmetic)."""
    src = index.to(torch.float32) * (side - 1) / max(size - 1, 1)
    floor = torch.floor(src)
    offsets = torch.arange(0, 2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


class Qwen3VisionTower(QwenVisionTower):
    """LayerNorm blocks, GELU MLPs, interpolated learned positions, DeepStack mergers."""

    cfg: Qwen3VisionConfig

    def __init__(self, ckpt, config: Qwen3VisionConfig, ops, prefix: str):
        super().__init__(ckpt, config, ops, prefix)
        self.pos_embed = ckpt.tensor(prefix + "pos_embed.weight", (config.num_position_embeddings, config.hidden_size))
        self.side = round(config.num_position_embeddings**0.5)
        self.deepstack_mergers = [
            self.load_merger(f"{prefix}deepstack_merger_list.{j}.", postshuffle=True)
            for j in range(len(config.deepstack_indexes))
        ]

    def load_patch_bias(self) -> torch.Tensor:
        return self.ckpt.tensor(self.prefix + "patch_embed.proj.bias", (self.cfg.hidden_size,))

    def load_mlp(self, lp: str) -> dict[str, Any]:
        c = self.cfg
        return dict(
            fc1=self.linear(lp + "linear_fc1", c.intermediate_size, c.hidden_size),
            fc2=self.linear(lp + "linear_fc2", c.hidden_size, c.intermediate_size),
        )

    def load_merger(self, mp: str, postshuffle: bool = False) -> dict[str, Any]:
        c = self.cfg
        wide = c.hidden_size * c.merge_size**2
        return dict(
            norm=self.load_norm(mp + "norm", wide if postshuffle else c.hidden_size),
            postshuffle=postshuffle,
            fc1=self.linear(mp + "linear_fc1", wide, wide),
            fc2=self.linear(mp + "linear_fc2", c.out_hidden_size, wide),
        )

    def merge(self, merger: dict, x: torch.Tensor) -> torch.Tensor:
        if not merger["postshuffle"]:
            return super().merge(merger, x)
        x = self.norm(x.reshape(-1, self.cfg.hidden_size * self.cfg.merge_size**2), merger["norm"])
        return F.linear(F.gelu(F.linear(x, *merger["fc1"])), *merger["fc2"])

    def position_embeddings(self, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """The learned grid resampled to each image's patch grid `[N, hidden]`, patches in merge-block order."""
        indices, weights = [], []
        for t, h, w in grids:
            rows, cols = merge_order_coordinates(h, w, self.cfg.merge_size)
            (h_taps, h_w), (w_taps, w_w) = bilinear_taps(rows, h, self.side), bilinear_taps(cols, w, self.side)
            indices.append((h_taps[:, :, None] * self.side + w_taps[:, None, :]).reshape(-1, 4).repeat(t, 1))
            weights.append((h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4).repeat(t, 1))
        device = self.pos_embed.device
        index, weight = torch.cat(indices).to(device), torch.cat(weights).to(device)
        return (F.embedding(index, self.pos_embed) * weight[:, :, None]).sum(1)

    def embed(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        x = super().embed(pixels, grids)
        return x + self.position_embeddings(grids).to(x.dtype)

    def after_layer(self, i: int, x: torch.Tensor, extras: list[torch.Tensor]) -> None:
        if i in self.cfg.deepstack_indexes:
            extras.append(self.merge(self.deepstack_mergers[self.cfg.deepstack_indexes.index(i)], x))


class Qwen3VL(Qwen2VL):
    """Qwen2-VL's processing and positions; a Qwen3 decoder with interleaved M-RoPE; the DeepStack tower."""

    decoder_type = "qwen3"
    mrope_section_default = [24, 20, 20]
    mrope_interleaved = True
    vision_config_class = Qwen3VisionConfig
    # Qwen3VLTextConfig's defaults where they differ from Qwen3's.
    text_defaults: ClassVar[dict[str, Any]] = dict(max_position_embeddings=128000, rope_theta=5e5)

    def build_vision_tower(self, ops, prefix: str) -> Qwen3VisionTower:
        return Qwen3VisionTower(self.checkpoint, self.vision, ops, prefix)

    def build_model(self, ops, max_positions: int | None = None) -> Qwen3VLModel:
        return Qwen3VLModel(self, ops, max_positions)


class Qwen3VLModel(Qwen2VLModel):
    """Qwen2-VL's device model, with DeepStack: an image row's embedding carries the deepstack features as
    extra columns (`[main | layer 0 | layer 1 ...]`, H each); the main part enters the input, and each
    further part is added to the image rows' output of decoder layer 0, 1, ..."""

    def splice(
        self, x: torch.Tensor, image_rows: torch.Tensor, image_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, LayerHook | None]:
        main, *extra = image_embeds.to(x.dtype).split(self.hidden_size, dim=-1)

        def add_deepstack(i: int, h: torch.Tensor) -> torch.Tensor:
            return h.index_add(0, image_rows, extra[i]) if i < len(extra) else h

        return x.index_copy(0, image_rows, main), add_deepstack if extra else None


# Shape preset (cultengine.presets): Qwen3-VL-4B-Instruct's own files.
PRESETS: dict[str, Preset] = {"qwen3-vl-4b": Published("Qwen3-VL-4B-Instruct")}
