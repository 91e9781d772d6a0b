"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): Qwen2-VL with a windowed vision tower.

The tower's blocks use RMSNorm and SwiGLU MLPs, and most attend only within windows of
`window_size` pixels (square groups of merged patches): the patches are reordered window by window
before the first block, every block but those at `fullatt_block_indexes` attends within each window
(`ops.varlen_vision_attention` over the windows' offsets), those attend over whole images, and the
merged embeddings are put back in image order at the end. Image processing, M-RoPE and the Qwen2
decoder are Qwen2-VL's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, config_int
from ..presets import Preset, Published
from .qwen2_vl import Qwen2VL, QwenVisionConfig, QwenVisionTower


@dataclass
class Qwen2_5_VisionConfig(QwenVisionConfig):
    window_size: int = 112  # pixels per window side
    fullatt_block_indexes: tuple[int, ...] = ()

    @classmethod
    def parse(cls, cfg: dict, where: str) -> Qwen2_5_VisionConfig:
        c = {
            "depth": 32,
            "hidden_size": 3584,
            "hidden_act": "silu",
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "out_hidden_size": 3584,
            "fullatt_block_indexes": [7, 15, 23, 31],
            **{k: v for k, v in cfg.items() if v is not None},
        }
        fields = cls.fields(c, where)
        window, factor = config_int(c, "window_size", where), fields["patch_size"] * fields["merge_size"]
        if window % factor:
            raise CheckpointError(
                f"{where}: vision window_size {window} is not a multiple of patch_size x spatial_merge_size = {factor}"
            )
        full, depth = c["fullatt_block_indexes"], fields["depth"]
        if not isinstance(full, list) or not all(isinstance(i, int) and 0 <= i < depth for i in full):
            raise CheckpointError(f"{where}: vision fullatt_block_indexes {full!r} must list blocks 0..{depth - 1}")
        return cls(**fields, window_size=window, fullatt_block_indexes=tuple(full))


def window_layout(grids: list[tuple[int, int, int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Merged patches ordered window by window (`window` merged patches a side; windows by rows, patches
    within a window by rows; image after image) and the windows' lengths in patches (transformers'
    `get_vision_window_index`, whose empty padding windows carry no tokens)."""
    order, lengths, offset = [], [], 0
    for t, h, w in grids:
        lh, lw = h // merge, w // merge
        index = torch.arange(t * lh * lw).reshape(t, lh, lw) + offset
        for frame in index:
            for i in range(0, lh, window):
                for j in range(0, lw, window):
                    block = frame[i : i + window, j : j + window].flatten()
                    order.append(block)
                    lengths.append(block.numel() * merge * merge)
        offset += t * lh * lw
    return torch.cat(order), lengths


class Qwen2_5_VisionTower(QwenVisionTower):
    """RMSNorm, SwiGLU MLPs with biases, window attention but in `fullatt_block_indexes`; RMSNorm merger."""

    cfg: Qwen2_5_VisionConfig

    def load_norm(self, name: str, n: int) -> tuple[torch.Tensor, None]:
        return self.ckpt.tensor(name + ".weight", (n,)), None

    def norm(self, x: torch.Tensor, weights: tuple[torch.Tensor, None]) -> torch.Tensor:
        return self.ops.rms_norm(x, weights[0], 1e-6)[0]

    def load_mlp(self, lp: str) -> dict[str, Any]:
        c = self.cfg
        gate, up = (
            self.linear(lp + "gate_proj", c.intermediate_size, c.hidden_size),
            self.linear(lp + "up_proj", c.intermediate_size, c.hidden_size),
        )
        # gate and up fused into one matmul.
        return dict(
            gate_up=(torch.cat([gate[0], up[0]]), torch.cat([gate[1], up[1]])),
            down=self.linear(lp + "down_proj", c.hidden_size, c.intermediate_size),
        )

    def mlp(self, layer: dict, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, *layer["gate_up"]).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, *layer["down"])

    def layout(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, list[list[int]]]:
        c = self.cfg
        order, windows = window_layout(grids, c.merge_size, c.window_size // (c.merge_size * c.patch_size))
        images = self.image_segments(grids)  # window order keeps each image's patches together
        return order, [images if i in c.fullatt_block_indexes else windows for i in range(c.depth)]


class Qwen2_5_VL(Qwen2VL):
    """Qwen2-VL's processing, positions and decoder with Qwen2.5-VL's windowed tower."""

    vision_config_class = Qwen2_5_VisionConfig

    def build_vision_tower(self, ops, prefix: str) -> Qwen2_5_VisionTower:
        return Qwen2_5_VisionTower(self.checkpoint, self.vision, ops, prefix)


# Shape presets (cultengine.presets): Qwen2.5-VL-7B-Instruct's own files, and the 72B: the 7B's files (the same
# tower, processor, rope) with its decoder's sizes.
PRESETS: dict[str, Preset] = {
    "qwen2.5-vl-7b": Published("Qwen2.5-VL-7B-Instruct"),
    "qwen2.5-vl-72b": Published(
        "Qwen2.5-VL-7B-Instruct",
        {
            "hidden_size": 8192,
            "intermediate_size": 29568,
            "num_hidden_layers": 80,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "max_window_layers": 80,
            "vision_config": {"out_hidden_size": 8192},
        },
    ),
}
