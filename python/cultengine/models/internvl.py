"""InternVL 2.5 / 3 in transformers' native layout (`InternVLForConditionalGeneration`, the `-hf` checkpoints):
dynamic tiling, an InternViT tower, a pixel shuffle and a LayerNorm + MLP projector, a Qwen2 / Qwen2.5 decoder.

An image is resized to the grid of 1..`max_patches` tiles whose aspect ratio is closest to its own and cut
into those tiles, with a thumbnail of the whole image after them when there is more than one. Each tile's
patch features (the CLS token dropped) are pixel-shuffled by `1 / downsample_ratio` and projected; in the
prompt the image is `<img>`, one `<IMG_CONTEXT>` per embedding (all tiles in one run), `</img>`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image

from ..checkpoint import Checkpoint, _read_json
from ..errors import CheckpointError, config_float, config_int
from ..image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Array, ImageProcessor, resize, size_dict
from ..presets import QWEN2_7B, Composed, Preset, PresetTokens
from .decoder import Decoder, SplicedDecoder, TextConfig
from .family import Family, ImageFeatures, marker_token_ids
from .vision import activation

# InternVLVisionConfig's defaults (InternViT-300M at 448 px).
_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    hidden_act="gelu",
    norm_type="layer_norm",
    layer_norm_eps=1e-6,
    image_size=448,
    patch_size=14,
    num_channels=3,
    attention_bias=False,
    use_qk_norm=False,
    use_mean_pooling=True,
    use_absolute_position_embeddings=True,
)
_QK_NORM_EPS = 1e-6  # InternVLVisionRMSNorm's default: the q/k norms do not take layer_norm_eps
_PROJECTOR_NORM_EPS = 1e-5  # nn.LayerNorm's default, which the projector uses


@lru_cache(maxsize=64)
def tile_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Every (columns, rows) with min..max tiles, fewest tiles first (transformers' order)."""
    grids = [
        (w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1) if min_tiles <= w * h <= max_tiles
    ]
    return sorted(grids, key=lambda g: g[0] * g[1])


def best_grid(hw: tuple[int, int], tile: tuple[int, int], min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) whose aspect ratio is closest to the image's; on a tie the one with more tiles while the
    image covers more than half of them (transformers' `get_optimal_tiled_canvas`)."""
    (h, w), (th, tw) = hw, tile
    aspect, area = w / h, w * h
    best, best_diff = (1, 1), float("inf")
    for grid in tile_grids(min_tiles, max_tiles):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * th * tw * grid[0] * grid[1]:
            best = grid
    return best


class GotOcr2ImageProcessor(ImageProcessor):
    """transformers' `GotOcr2ImageProcessor` (and its Pil twin) as `InternVLProcessor` drives it (always cropping
    to tiles): bicubic resize to the best grid, the tiles row by row, a thumbnail when there are several."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "do_convert_rgb": True,
        "size": {"height": 384, "width": 384},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "min_patches": 1,
        "max_patches": 12,
    }

    def __init__(self, config: dict | None = None, backend: str | None = None):
        c = {**self.DEFAULTS, **{k: v for k, v in (config or {}).items() if v is not None}}
        # Cropping resizes every tile to `size` itself; the base class does colour, rescale and normalisation.
        super().__init__({**c, "do_resize": False}, backend)
        size = size_dict(c["size"], True)
        if set(size) != {"height", "width"}:
            raise ValueError(f"size must be {{'height': H, 'width': W}}, got {c['size']}")
        self.tile = (size["height"], size["width"])
        self.min_tiles, self.max_tiles = int(c["min_patches"]), int(c["max_patches"])
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"min_patches {self.min_tiles} / max_patches {self.max_tiles} are not 1 <= min <= max")

    def tiles(self, x: Array) -> list[Array]:
        """uint8 tiles in prompt order: the grid row by row, then the thumbnail (only with several tiles)."""
        (th, tw), hw = self.tile, tuple(x.shape[-2:])
        cols, rows = best_grid(hw, self.tile, self.min_tiles, self.max_tiles)
        resized = resize(x, (th * rows, tw * cols), self.resample)
        grid = [resized[:, r * th : (r + 1) * th, c * tw : (c + 1) * tw] for r in range(rows) for c in range(cols)]
        return grid if len(grid) == 1 else [*grid, resize(x, self.tile, self.resample)]


def _square(value: Any, name: str, where: str) -> int:
    sides = value if isinstance(value, list | tuple) else [value, value]
    if len(sides) != 2 or sides[0] != sides[1]:
        raise CheckpointError(f"{where}: vision {name} {value!r} is not square (one int, or [n, n])")
    return config_int({name: sides[0]}, name, where)


@dataclass
class InternViTConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    norm_type: str  # layer_norm | rms_norm, for the layers' two norms
    layer_norm_eps: float
    attention_bias: bool
    qk_norm: bool
    mean_pooling: bool  # no final LayerNorm on last_hidden_state
    absolute_positions: bool

    @classmethod
    def parse(cls, cfg: dict, where: str) -> InternViTConfig:
        c = {**_VISION_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
        hidden, heads = config_int(c, "hidden_size", where), config_int(c, "num_attention_heads", where)
        if hidden % heads:
            raise CheckpointError(
                f"{where}: vision hidden_size {hidden} is not a multiple of its num_attention_heads {heads}"
            )
        if c["norm_type"] not in ("layer_norm", "rms_norm"):
            raise CheckpointError(f"{where}: vision norm_type {c['norm_type']!r} is not layer_norm / rms_norm")
        activation(c["hidden_act"])
        return cls(
            hidden_size=hidden,
            intermediate_size=config_int(c, "intermediate_size", where),
            num_layers=config_int(c, "num_hidden_layers", where),
            num_heads=heads,
            num_channels=config_int(c, "num_channels", where),
            image_size=_square(c["image_size"], "image_size", where),
            patch_size=_square(c["patch_size"], "patch_size", where),
            hidden_act=c["hidden_act"],
            norm_type=c["norm_type"],
            layer_norm_eps=config_float(c, "layer_norm_eps", where),
            attention_bias=bool(c["attention_bias"]),
            qk_norm=bool(c["use_qk_norm"]),
            mean_pooling=bool(c["use_mean_pooling"]),
            absolute_positions=bool(c["use_absolute_position_embeddings"]),
        )


class InternViT:
    """InternViT: CLS token + absolute positions, pre-norm layers with layer scale (`lambda_1`, `lambda_2`),
    optional q/k RMSNorms; returns the hidden state transformers' `vision_feature_layer` selects."""

    def __init__(
        self, ckpt: Checkpoint, config: InternViTConfig, ops, feature_layer: int, prefix: str = "model.vision_tower."
    ):
        c, w = config, ckpt.tensor
        self.ops, self.cfg = ops, c
        e, p, n_pos = c.hidden_size, c.patch_size, (c.image_size // c.patch_size) ** 2 + 1
        if not -(c.num_layers + 1) <= feature_layer <= c.num_layers:
            raise CheckpointError(
                f"vision_feature_layer {feature_layer} is out of range for a {c.num_layers}-layer vision tower"
            )
        # -1 is transformers' last_hidden_state (final norm included); others index hidden_states (0: embeddings).
        self.last = feature_layer == -1
        depth = c.num_layers if self.last else feature_layer % (c.num_layers + 1)
        pe = prefix + "embeddings."
        self.patch_weight = w(pe + "patch_embeddings.projection.weight", (e, c.num_channels, p, p))
        self.patch_bias = w(pe + "patch_embeddings.projection.bias", (e,))
        self.cls = w(pe + "cls_token", (1, 1, e)).reshape(e)
        self.positions = (
            w(pe + "position_embeddings", (1, n_pos, e)).reshape(n_pos, e)
            if c.absolute_positions
            else torch.zeros(n_pos, e, dtype=ckpt.dtype, device=ckpt.device)
        )
        self.final_norm = (
            (w(prefix + "layernorm.weight", (e,)), w(prefix + "layernorm.bias", (e,)))
            if self.last and not c.mean_pooling
            else None
        )
        self.num_heads, self.head_dim = c.num_heads, e // c.num_heads
        self.act = activation(c.hidden_act)
        self.layers = []
        for i in range(depth):
            lp = f"{prefix}encoder.layer.{i}."

            def norm(name: str, lp=lp):
                return (
                    w(lp + name + ".weight", (e,)),
                    w(lp + name + ".bias", (e,)) if c.norm_type == "layer_norm" else None,
                )

            qkv = [w(f"{lp}attention.{n}_proj.weight", (e, e)) for n in "qkv"]
            self.layers.append(
                dict(
                    norm1=norm("layernorm_before"),
                    norm2=norm("layernorm_after"),
                    qkv=torch.cat(qkv),  # fused: one matmul instead of three
                    qkv_bias=torch.cat([w(f"{lp}attention.{n}_proj.bias", (e,)) for n in "qkv"])
                    if c.attention_bias
                    else None,
                    q_norm=w(lp + "attention.q_norm.weight", (e,)) if c.qk_norm else None,
                    k_norm=w(lp + "attention.k_norm.weight", (e,)) if c.qk_norm else None,
                    out=(
                        w(lp + "attention.projection_layer.weight", (e, e)),
                        w(lp + "attention.projection_layer.bias", (e,)),
                    ),
                    scale1=w(lp + "lambda_1", (e,)),
                    scale2=w(lp + "lambda_2", (e,)),
                    fc1=(
                        w(lp + "mlp.fc1.weight", (c.intermediate_size, e)),
                        w(lp + "mlp.fc1.bias", (c.intermediate_size,)),
                    ),
                    fc2=(w(lp + "mlp.fc2.weight", (e, c.intermediate_size)), w(lp + "mlp.fc2.bias", (e,))),
                )
            )

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is None:  # rms_norm
            return self.ops.rms_norm(x, weight, self.cfg.layer_norm_eps)[0]
        return F.layer_norm(x, (self.cfg.hidden_size,), weight, bias, self.cfg.layer_norm_eps)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[N, 3, S, S]` tiles -> the selected hidden state `[N, 1 + patches, E]` (CLS first)."""
        s, e = self.cfg.image_size, self.cfg.hidden_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (self.cfg.num_channels, s, s):
            raise ValueError(
                f"pixels must be [N, {self.cfg.num_channels}, {s}, {s}] (the tower's size), got {list(pixels.shape)}"
            )
        n = pixels.shape[0]
        x = self.ops.patch_embed(
            pixels.to(self.patch_weight.device, self.patch_weight.dtype),
            self.patch_weight,
            self.patch_bias,
            self.cls,
            self.positions,
        )
        for layer in self.layers:
            h = self._norm(x, *layer["norm1"])
            q, k, v = F.linear(h, layer["qkv"], layer["qkv_bias"]).chunk(3, dim=-1)
            if layer["q_norm"] is not None:
                q = self.ops.rms_norm(q, layer["q_norm"], _QK_NORM_EPS)[0]
                k = self.ops.rms_norm(k, layer["k_norm"], _QK_NORM_EPS)[0]
            q, k, v = (t.reshape(n, -1, self.num_heads, self.head_dim) for t in (q, k, v))
            a = self.ops.vision_attention(q, k, v, self.head_dim**-0.5)
            x = x + layer["scale1"] * F.linear(a.reshape(n, -1, e), *layer["out"])
            h = self._norm(x, *layer["norm2"])
            x = x + layer["scale2"] * F.linear(self.act(F.linear(h, *layer["fc1"])), *layer["fc2"])
        if self.final_norm is not None:
            x = F.layer_norm(x, (e,), *self.final_norm, self.cfg.layer_norm_eps)
        return x


def _tie_word_embeddings(config: dict) -> bool:
    # transformers 5 ties on the top-level flag (InternVLConfig's default: tied); older configs set it in text_config.
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    return bool((config.get("text_config") or {}).get("tie_word_embeddings", True))


class InternVL(Family):
    """Config, tiling and prompt layout of an InternVL checkpoint in transformers' layout."""

    def __init__(self, checkpoint: Checkpoint, image_backend: str | None = None):
        super().__init__(checkpoint, image_backend)
        config = checkpoint.config
        self.text = TextConfig.parse(
            {"model_type": "qwen2", **(config.get("text_config") or {})},
            self.where,
            tie_word_embeddings=_tie_word_embeddings(config),
        )
        self.vision = InternViTConfig.parse(config.get("vision_config") or {}, self.where)
        self.feature_layer = config.get("vision_feature_layer", -1)
        if not isinstance(self.feature_layer, int):
            raise CheckpointError(
                f"{self.where}: vision_feature_layer must be one int for InternVL, got {self.feature_layer!r}"
            )
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy != "default":
            raise CheckpointError(
                f"{self.where}: vision_feature_select_strategy {strategy!r} is not 'default' "
                "(InternVL drops the CLS token before the pixel shuffle)"
            )
        self.projector_act = config.get("projector_hidden_act", "gelu")
        activation(self.projector_act)
        ratio = config_float({"downsample_ratio": config.get("downsample_ratio", 0.5)}, "downsample_ratio", self.where)
        side = self.vision.image_size // self.vision.patch_size
        self.scale = round(1 / ratio)
        if abs(self.scale * ratio - 1) > 1e-9 or side % self.scale:
            raise CheckpointError(
                f"{self.where}: downsample_ratio {ratio} must be 1/n with n dividing the tower's "
                f"{side} x {side} patch grid"
            )
        self.tokens_per_tile = (side // self.scale) ** 2
        self.placeholder_id = config_int(
            {"image_token_id": config.get("image_token_id", 151667)}, "image_token_id", self.where
        )
        self._image_processor()
        self._markers(checkpoint)

    def _image_processor(self) -> None:
        ckpt = self.checkpoint
        pre = ckpt.preprocessor_file
        if not ckpt.preprocessor_config:
            raise CheckpointError(
                f"{ckpt.path}: no preprocessor_config.json or processor_config.json "
                "(a tiling model needs its image processor's settings)"
            )
        try:
            self.image_processor = GotOcr2ImageProcessor(ckpt.preprocessor_config, self.image_backend)
        except ValueError as e:
            raise CheckpointError(f"{pre}: {e}") from e
        s = self.vision.image_size
        if self.image_processor.tile != (s, s):
            raise CheckpointError(f"{pre}: size {self.image_processor.tile} is not the vision tower's {s} x {s}")
        processor = _read_json(ckpt.path / "processor_config.json", required=False) or {}
        seq_len = processor.get("image_seq_length", self.tokens_per_tile)
        if seq_len != self.tokens_per_tile:
            raise CheckpointError(
                f"{ckpt.path / 'processor_config.json'}: image_seq_length {seq_len} is not the "
                f"{self.tokens_per_tile} tokens a tile makes ((image_size // patch_size * "
                "downsample_ratio)^2 in config.json)"
            )

    def _markers(self, checkpoint: Checkpoint) -> None:
        tok = checkpoint.tokenizer()
        markers = {"start_image_token": "<img>", "end_image_token": "</img>"}
        self.start_id, self.end_id = marker_token_ids(tok, checkpoint, markers)

    @property
    def max_context(self) -> int:
        return min(self.text.max_position_embeddings, self.text.sliding_window or 1 << 62)

    def process_image(self, image: Image.Image, options: dict[str, Any]) -> ImageFeatures:
        proc = self.image_processor
        tiles = proc.tiles(proc.channels_first(image))
        n = self.tokens_per_tile * len(tiles)
        return ImageFeatures(
            pixels=torch.stack([proc.finish(t) for t in tiles]),
            token_ids=[self.start_id, *[self.placeholder_id] * n, self.end_id],
            embedding_runs=[(1, n)],
        )

    def dummy_image(self) -> Image.Image:
        return Image.new("RGB", (self.vision.image_size, self.vision.image_size))

    def build_model(self, ops, max_positions: int | None = None) -> InternVLModel:
        return InternVLModel(self, ops, max_positions)


class InternVLModel(SplicedDecoder):
    """InternViT -> patch features (CLS dropped) -> pixel shuffle -> LayerNorm + MLP, per tile; Qwen2 / Qwen3."""

    def __init__(self, family: InternVL, ops, max_positions: int | None = None):
        ckpt = family.checkpoint
        super().__init__(
            Decoder(ckpt, family.text, ops, max_positions=max_positions), family.text, family.placeholder_id
        )
        self.ops = ops
        self.vision = InternViT(ckpt, family.vision, ops, family.feature_layer)
        self.scale = family.scale
        v, h, p = family.vision.hidden_size * self.scale**2, family.text.hidden_size, "model.multi_modal_projector."
        self.norm = (ckpt.tensor(p + "layer_norm.weight", (v,)), ckpt.tensor(p + "layer_norm.bias", (v,)))
        self.proj1 = (ckpt.tensor(p + "linear_1.weight", (h, v)), ckpt.tensor(p + "linear_1.bias", (h,)))
        self.proj2 = (ckpt.tensor(p + "linear_2.weight", (h, h)), ckpt.tensor(p + "linear_2.bias", (h,)))
        self.proj_act = activation(family.projector_act)

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, side, side, E]` -> `[N, side^2 / s^2, E * s^2]` in transformers' InternVL order."""
        n, side, _, e = x.shape
        s = self.scale
        x = x.view(n, side, side // s, e * s).permute(0, 2, 1, 3).contiguous()
        x = x.view(n, side // s, side // s, e * s * s).permute(0, 2, 1, 3)
        return x.reshape(n, -1, e * s * s)

    @torch.inference_mode()
    def encode_images(self, images: list[ImageFeatures]) -> list[torch.Tensor]:
        # Every tile of every image has the tower's size: one batched call, then each image's tiles in order.
        states = self.vision.forward(torch.cat([im.pixels for im in images]))[:, 1:]
        n, patches, e = states.shape
        side = math.isqrt(patches)
        x = self.pixel_shuffle(states.reshape(n, side, side, e))
        x = F.layer_norm(x, (x.shape[-1],), *self.norm, _PROJECTOR_NORM_EPS)
        x = F.linear(self.proj_act(F.linear(x, *self.proj1)), *self.proj2)
        return [f.flatten(0, 1) for f in x.split([im.pixels.shape[0] for im in images])]


# Shape preset (cultengine.presets): InternVL3-8B-hf, InternViT-300M-448px (256 tokens a tile, up to 12 tiles
# + thumbnail) and Qwen2.5-7B.
PRESETS: dict[str, Preset] = {
    "internvl3-8b": Composed(
        {
            "architectures": ["InternVLForConditionalGeneration"],
            "downsample_ratio": 0.5,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
            "tie_word_embeddings": False,
            "text_config": {**QWEN2_7B, "vocab_size": 151674},
            "vision_config": {
                "model_type": "internvl_vision",
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "image_size": 448,
                "patch_size": 14,
                "hidden_act": "gelu",
                "norm_type": "layer_norm",
                "layer_scale_init_value": 0.1,
                "use_mean_pooling": True,
            },
        },
        {
            "image_processor_type": "GotOcr2ImageProcessor",
            "size": {"height": 448, "width": 448},
            "min_patches": 1,
            "max_patches": 12,
            "resample": 3,
            "do_rescale": True,
            "do_normalize": True,
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
        },
        PresetTokens(
            ("<img>", "</img>", "<IMG_CONTEXT>"),
            "<IMG_CONTEXT>",
            {"processor_class": "InternVLProcessor", "image_seq_length": 256},
        ),
    ),
}
