"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`; Pangea-7B is one, with a Qwen2 decoder): any-resolution
tiling. An image is resized to fit the best of `image_grid_pinpoints`, zero-padded to it and cut into
tower-sized tiles, after a base tile of the whole image. The tiles' features are laid back out as one
grid, the padding cut away (unpadding to the original aspect ratio) and an `image_newline` embedding
appended to every row: base features, then rows x (columns + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..checkpoint import Checkpoint
from ..errors import CheckpointError
from ..image import ClipImageProcessor, ImageProcessor, pad_centered, resize, resize_output_size
from ..presets import CLIP_336_PREPROCESSOR, CLIP_L14_336, QWEN2_7B, Composed, Preset
from .family import ImageFeatures
from .llava import Llava, LlavaModel

NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LlavaNextConfig's default


def best_resolution(hw: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int]:
    """The pinpoint (height, width) that keeps the most of the image's resolution, then wastes the least
    (transformers' `select_best_resolution`)."""
    h, w = hw
    best, most_kept, least_wasted = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        kept = min(int(w * scale) * int(h * scale), w * h)
        wasted = ph * pw - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            best, most_kept, least_wasted = (ph, pw), kept, wasted
    return best


def fit_size(hw: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The size that fits `hw` into `target` keeping its aspect ratio (transformers' `get_patch_output_size`)."""
    (h, w), (th, tw) = hw, target
    if tw / w < th / h:
        return min(math.ceil(h * (tw / w)), th), tw
    return th, min(math.ceil(w * (th / h)), tw)


def unpadded_region(hw: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a feature grid that the image covers, the padding cut away
    (transformers' `unpad_image`, float arithmetic included)."""
    (h, w), (gh, gw) = hw, grid_hw
    if w / h > gw / gh:
        pad = (gh - int(round(h * (gw / w), 7))) // 2
        return pad, gh - pad, 0, gw
    pad = (gw - int(round(w * (gh / h), 7))) // 2
    return 0, gh, pad, gw - pad


@dataclass(frozen=True)
class TileLayout:
    """How an image was tiled: the grid of tiles after the base tile (rows, columns) and the unpadded region of its
    patch grid (top, bottom, left, right); neither for a lone tile (OneVision's multi-image prompts). `shrink`:
    OneVision's (rows, columns) after it shrinks a large grid."""

    grid: tuple[int, int] | None = None
    crop: tuple[int, int, int, int] | None = None
    shrink: tuple[int, int] | None = None


class LlavaNext(Llava):
    """Any-resolution LLaVA: tiles chosen per image, an `image_newline` closing each row of features."""

    default_pinpoints = NEXT_PINPOINTS
    processor_class: type[ImageProcessor] = ClipImageProcessor

    def __init__(self, checkpoint: Checkpoint, image_backend: str | None = None):
        super().__init__(checkpoint, image_backend)
        tile = self.vision.image_size
        self.pinpoints = self._pinpoints(checkpoint.config.get("image_grid_pinpoints"), self.where)
        pre = checkpoint.path / "preprocessor_config.json"
        proc_pinpoints = checkpoint.preprocessor_config.get("image_grid_pinpoints")
        if proc_pinpoints is not None and self._pinpoints(proc_pinpoints, str(pre)) != self.pinpoints:
            raise CheckpointError(
                f"{pre}: image_grid_pinpoints differ from config.json's (the processor would "
                "tile images differently from how the model lays their features out)"
            )
        self.patches_per_side = tile // self.vision.patch_size
        if self.tokens_per_tile != self.patches_per_side**2:
            raise CheckpointError(
                f"{self.where}: vision_feature_select_strategy {self.select_strategy!r} leaves "
                f"{self.tokens_per_tile} features per tile, not the {self.patches_per_side}^2 "
                "grid any-resolution tiling lays out"
            )
        proc = self.image_processor
        size = proc.size or {}
        # The processor's tile side and the size of the base tile, as transformers' LLaVA-NeXT processor.
        self.tile_side = (proc.crop_size or {}).get("height") or size.get("height") or size.get("shortest_edge")
        self.base_size = (
            (size["height"], size["width"])
            if "height" in size
            else (size.get("shortest_edge"), size.get("shortest_edge"))
        )
        out = self._tile_output_size()
        if out != (tile, tile):
            raise CheckpointError(
                f"{pre}: a {self.tile_side}-pixel tile (crop_size/size) becomes {out[0]}x{out[1]} "
                f"pixels, but the vision tower takes {tile}x{tile}"
            )

    def _image_processor(self) -> ImageProcessor:
        # Tiling depends on the processor's sizes and pinpoints: without its file, refuse rather than guess.
        if not self.checkpoint.preprocessor_config:
            raise CheckpointError(
                f"{self.checkpoint.path}: preprocessor_config.json (or processor_config.json with "
                "an 'image_processor') not found; this family's image tiling needs it"
            )
        try:
            return self.processor_class.for_config(
                self.checkpoint.preprocessor_config, self.vision.image_size, self.image_backend
            )
        except ValueError as e:
            raise CheckpointError(f"{self.checkpoint.path / 'preprocessor_config.json'}: {e}") from e

    def _pinpoints(self, raw: Any, where: str) -> list[list[int]]:
        pinpoints = self.default_pinpoints if raw is None else raw
        tile = self.vision.image_size
        ok = (
            isinstance(pinpoints, list)
            and pinpoints
            and all(
                isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(v, int) and v > 0 for v in p)
                for p in pinpoints
            )
        )
        if not ok:
            raise CheckpointError(f"{where}: image_grid_pinpoints must be a list of [height, width] pairs, got {raw!r}")
        bad = [list(p) for p in pinpoints if p[0] % tile or p[1] % tile]
        if bad:
            raise CheckpointError(
                f"{where}: image_grid_pinpoints {bad} are not multiples of the vision tower's {tile}-pixel tiles"
            )
        return [list(p) for p in pinpoints]

    def _tile_output_size(self) -> tuple[int, int]:
        proc, hw = self.image_processor, (self.tile_side, self.tile_side)
        if proc.do_resize:
            hw = resize_output_size(proc.size, hw)
        if proc.do_center_crop:
            hw = (proc.crop_size["height"], proc.crop_size["width"])
        return hw

    def process_image(self, image: Image.Image, options: dict[str, Any]) -> ImageFeatures:
        proc = self.image_processor
        x = proc.channels_first(image)
        tiles, meta = self._tiles(x, options)
        pixels = torch.stack([proc.finish(proc.geometry(t)) for t in tiles])
        n = self.tokens_per_tile + self._grid_tokens(meta)
        return ImageFeatures(pixels=pixels, token_ids=[self.placeholder_id] * n, embedding_runs=[(0, n)], meta=meta)

    def _tiles(self, x, options: dict[str, Any]) -> tuple[list, TileLayout]:
        """The base tile and the grid's tiles (uint8, on the processor's path), and the grid's layout."""
        hw, proc, side = tuple(x.shape[-2:]), self.image_processor, self.tile_side
        target = best_resolution(hw, self.pinpoints)
        padded = pad_centered(resize(x, fit_size(hw, target), proc.resample), target)
        grid = [
            padded[:, i : i + side, j : j + side] for i in range(0, target[0], side) for j in range(0, target[1], side)
        ]
        base = resize(x, self.base_size, proc.resample)
        rows, cols = target[0] // self.vision.image_size, target[1] // self.vision.image_size
        p = self.patches_per_side
        return [base, *grid], TileLayout((rows, cols), unpadded_region(hw, (rows * p, cols * p)))

    def _grid_tokens(self, meta: TileLayout) -> int:
        """Features after the base tile: the unpadded grid's rows, each closed by a newline."""
        top, bottom, left, right = meta.crop
        return (bottom - top) * (right - left + 1)

    def build_model(self, ops, max_positions: int | None = None) -> LlavaNextModel:
        return LlavaNextModel(self, ops, max_positions)


class LlavaNextModel(LlavaModel):
    """LLaVA's tower and projector over every tile, then each image's features packed as its processor laid out."""

    def __init__(self, family: LlavaNext, ops, max_positions: int | None = None):
        super().__init__(family, ops, max_positions)
        self.image_newline = family.checkpoint.tensor("model.image_newline", (family.text.hidden_size,))
        self.patches_per_side = family.patches_per_side

    def encode_images(self, images: list[ImageFeatures]) -> list[torch.Tensor]:
        # Every tile of every image has the tower's size: one batched call, then split per image.
        features = self.tile_features(torch.cat([im.pixels for im in images]))
        out, first = [], 0
        for im in images:
            n = im.pixels.shape[0]
            out.append(self.pack(features[first : first + n], im.meta))
            first += n
        return out

    def pack(self, features: torch.Tensor, meta: TileLayout) -> torch.Tensor:
        """`[tiles, tokens_per_tile, H]` -> `[num_embeddings, H]`: base tile, then the unpadded grid by rows."""
        newline = self.image_newline.to(features.dtype)
        if meta.grid is None:  # one tile: its features and one newline
            return torch.cat([features[0], newline[None]])
        (rows, cols), p = meta.grid, self.patches_per_side
        top, bottom, left, right = meta.crop
        grid = features[1:].view(rows, cols, p, p, -1).permute(4, 0, 2, 1, 3).reshape(-1, rows * p, cols * p)
        grid = self.resize_grid(grid[:, top:bottom, left:right], meta)
        grid = torch.cat([grid, newline[:, None, None].expand(-1, grid.shape[1], 1)], dim=-1)
        return torch.cat([features[0], grid.flatten(1, 2).T])

    def resize_grid(self, grid: torch.Tensor, meta: TileLayout) -> torch.Tensor:
        """LLaVA-NeXT keeps the unpadded grid as it is (LLaVA-OneVision shrinks large ones)."""
        return grid


_MISTRAL_7B = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32064,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "sliding_window": None,
}


def _llava_next_preset(text_config: dict) -> Composed:
    config = {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "text_config": text_config,
        "vision_config": CLIP_L14_336,
    }
    processor = {
        **CLIP_336_PREPROCESSOR,
        "image_processor_type": "LlavaNextImageProcessor",
        "processor_class": "LlavaNextProcessor",
    }
    return Composed(config, processor)


# Shape presets (cultengine.presets): llava-v1.6-mistral-7b (up to 4 tiles of 336 + the base tile), and
# Pangea-7B-hf (LLaVA-NeXT with a Qwen2-7B decoder and the same CLIP-L/14-336 tower).
PRESETS: dict[str, Preset] = {
    "llava-next-7b": _llava_next_preset(_MISTRAL_7B),
    "pangea-7b": _llava_next_preset(QWEN2_7B),
}
