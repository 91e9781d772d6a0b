"""Idefics3 (`Idefics3ForConditionalGeneration`) and SmolVLM / SmolVLM2 (`SmolVLMForConditionalGeneration`):
image splitting, a SigLIP tower and a pixel-shuffle connector in front of a Llama / SmolLM2 decoder.

An image's longest edge is resized to `size`, then both sides up to multiples of the tile side
(`max_image_size`); an image larger than one tile is cut into rows x columns tiles, followed by the whole
image resized to one tile (the global image). Each tile's patches are pixel-shuffled by `scale_factor` and
projected. In the prompt every tile is `<fake_token_around_image><row_r_col_c>` and its image tokens, rows
end in a newline, and the global image comes last as `<fake_token_around_image><global-img>` + tokens +
`<fake_token_around_image>`: embeddings are one run per tile, with marker tokens between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image

from ..checkpoint import Checkpoint, _read_json
from ..errors import CheckpointError, config_int
from ..image import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, Array, ImageProcessor, resize, size_dict
from ..presets import SIGLIP_SO400M_384, Composed, Preset, PresetTokens, Published, published
from .decoder import Decoder, SplicedDecoder, TextConfig, tied_embeddings
from .family import Family, ImageFeatures, marker_token_ids
from .vision import VisionConfig, VisionTower

MAX_IMAGE_SIDE = 4096  # transformers' cap on a resized image's side
# Idefics3VisionConfig's defaults (a SigLIP tower whose config is named idefics3_vision / smolvlm_vision).
_VISION_DEFAULTS = dict(
    hidden_size=1152,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=16,
    image_size=224,
    patch_size=32,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)


def longest_edge_size(hw: tuple[int, int], longest: int) -> tuple[int, int]:
    """The longest edge resized to `longest` (up or down), the other side kept even, then both capped at
    4096 (transformers' `get_resize_output_image_size` for Idefics3)."""
    h, w = hw
    aspect = w / h
    if w >= h:
        w, h = longest, int(longest / aspect)
        h += h % 2
    else:
        h, w = longest, int(longest * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > MAX_IMAGE_SIDE:
        w, h = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE / aspect)
    elif h > w and h > MAX_IMAGE_SIDE:
        h, w = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE * aspect)
    return max(h, 1), max(w, 1)


def tile_multiple_size(hw: tuple[int, int], tile: int) -> tuple[int, int]:
    """Both sides rounded up to multiples of `tile`, the shorter one through the aspect ratio
    (transformers' `resize_for_vision_encoder`)."""
    h, w = hw
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    return h, w


class Idefics3ImageProcessor(ImageProcessor):
    """transformers' `Idefics3ImageProcessor` / `SmolVLMImageProcessor` (and their Pil twins): Lanczos resizes to
    the longest edge and to tile multiples, the split into tiles + the global image, mean and std 0.5."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"longest_edge": 4 * 364},
        "resample": 1,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_STANDARD_MEAN,
        "image_std": IMAGENET_STANDARD_STD,
        "do_image_splitting": True,
        "max_image_size": {"longest_edge": 364},
    }

    def __init__(self, config: dict | None = None, backend: str | None = None):
        c = {**self.DEFAULTS, **{k: v for k, v in (config or {}).items() if v is not None}}
        # The base class does colour, rescale and normalisation; the geometry is this processor's own.
        # (Its padding only aligns a batch's tiles, which are all one size here: nothing to pad.)
        super().__init__({**c, "do_resize": False, "do_pad": False}, backend)
        # The first resize: the longest edge to `size["longest_edge"]`, or exactly to height x width.
        self.first_size = size_dict(c["size"], False) if c["do_resize"] else None
        if self.first_size is not None and set(self.first_size) not in ({"longest_edge"}, {"height", "width"}):
            raise ValueError(f"size must be {{'longest_edge': N}} or {{'height': H, 'width': W}}, got {c['size']}")
        self.tile = size_dict(c["max_image_size"], False).get("longest_edge")
        if not isinstance(self.tile, int) or self.tile < 1:
            raise ValueError(f"max_image_size must be {{'longest_edge': N}}, got {c['max_image_size']}")
        self.do_image_splitting = bool(c["do_image_splitting"])

    def tiles(self, x: Array) -> tuple[list[Array], tuple[int, int]]:
        """uint8 tiles in prompt order (rows x columns, then the global image) and the (rows, columns) of the
        split ((0, 0): one tile, the image itself)."""
        if self.first_size is not None:
            size = self.first_size
            hw = (
                longest_edge_size(tuple(x.shape[-2:]), size["longest_edge"])
                if "longest_edge" in size
                else (size["height"], size["width"])
            )
            x = resize(x, hw, self.resample)
        t = self.tile
        if not self.do_image_splitting:
            return [resize(x, (t, t), self.resample)], (0, 0)
        x = resize(x, tile_multiple_size(tuple(x.shape[-2:]), t), self.resample)
        h, w = x.shape[-2:]
        if h <= t and w <= t:
            return [x], (0, 0)
        rows, cols = h // t, w // t
        grid = [x[:, r * t : (r + 1) * t, c * t : (c + 1) * t] for r in range(rows) for c in range(cols)]
        return [*grid, resize(x, (t, t), self.resample)], (rows, cols)


def idefics3_position_ids(patches_per_side: int, num_positions_per_side: int) -> torch.Tensor:
    """The position-embedding row of each patch of a full tile: transformers buckets fractional coordinates
    in float32, which for some grid sizes (19, 25, 29, ...) is not simply 0..n-1."""
    n = torch.tensor([patches_per_side])
    boundaries = torch.arange(1 / num_positions_per_side, 1.0, 1 / num_positions_per_side)
    coords = torch.clamp(torch.arange(patches_per_side, dtype=torch.float32)[None] * (1.0 / n)[:, None], max=1.0 - 1e-6)
    buckets = torch.bucketize(coords, boundaries, right=True)[0]
    return (buckets[:, None] * num_positions_per_side + buckets[None, :]).flatten()


@dataclass(frozen=True)
class TileGrid:
    """How an image was split: rows x columns of tiles before the global image (0 x 0: not split)."""

    rows: int
    cols: int


class Idefics3(Family):
    """Config, image splitting and prompt layout of an Idefics3 checkpoint."""

    markers_from_tokenizer: ClassVar[bool] = False

    def __init__(self, checkpoint: Checkpoint, image_backend: str | None = None):
        super().__init__(checkpoint, image_backend)
        config = checkpoint.config
        # Idefics3Config's text default: a Llama with rms_norm_eps 1e-5.
        self.text = TextConfig.parse(
            {"model_type": "llama", "rms_norm_eps": 1e-5, **(config.get("text_config") or {})},
            self.where,
            tie_word_embeddings=tied_embeddings(config),
        )
        self.vision = VisionConfig.parse(
            {**_VISION_DEFAULTS, **(config.get("vision_config") or {}), "model_type": "siglip_vision_model"}, self.where
        )
        self.scale = config_int({"scale_factor": config.get("scale_factor", 2)}, "scale_factor", self.where)
        side = self.vision.image_size // self.vision.patch_size
        if side % self.scale:
            raise CheckpointError(
                f"{self.where}: scale_factor {self.scale} does not divide the tower's {side} x {side} patch grid"
            )
        self.tokens_per_tile = (side // self.scale) ** 2
        self.placeholder_id = config_int(
            {"image_token_id": config.get("image_token_id", 128257)}, "image_token_id", self.where
        )
        pre = checkpoint.preprocessor_file
        if not checkpoint.preprocessor_config:
            raise CheckpointError(
                f"{checkpoint.path}: no preprocessor_config.json or processor_config.json "
                "(an image splitting model needs its image processor's settings)"
            )
        try:
            self.image_processor = Idefics3ImageProcessor(checkpoint.preprocessor_config, image_backend)
        except ValueError as e:
            raise CheckpointError(f"{pre}: {e}") from e
        if self.image_processor.tile != self.vision.image_size:
            raise CheckpointError(
                f"{pre}: max_image_size {self.image_processor.tile} is not the vision tower's "
                f"image_size {self.vision.image_size}"
            )
        processor = _read_json(checkpoint.path / "processor_config.json", required=False) or {}
        seq_len = processor.get("image_seq_len", self.tokens_per_tile)
        if seq_len != self.tokens_per_tile:
            raise CheckpointError(
                f"{checkpoint.path / 'processor_config.json'}: image_seq_len {seq_len} is not "
                f"the {self.tokens_per_tile} tokens a tile makes ((image_size // patch_size)^2 "
                f"/ scale_factor^2 in config.json)"
            )
        self._markers(checkpoint)

    def _markers(self, checkpoint: Checkpoint) -> None:
        """The ids of the prompt's image markers and of the newlines between rows."""
        tok = checkpoint.tokenizer()
        # SmolVLM's processor takes these two names from the tokenizer's settings; Idefics3's has them fixed.
        named = {"fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>"}
        self.fake_id, self.global_id = marker_token_ids(tok, checkpoint, named, self.markers_from_tokenizer)
        grid = {f"<row_{r}_col_{c}>": f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)}
        ids = marker_token_ids(tok, checkpoint, grid, named=False)
        self.row_col_ids = [ids[r * 6 : (r + 1) * 6] for r in range(6)]
        # The newlines sit between special tokens, so they are tokenized on their own.
        self.newline, self.row_gap = tok.encode("\n"), tok.encode("\n\n")

    @property
    def max_context(self) -> int:
        return self.text.max_position_embeddings

    def process_image(self, image: Image.Image, options: dict[str, Any]) -> ImageFeatures:
        proc = self.image_processor
        tiles, (rows, cols) = proc.tiles(proc.channels_first(image))
        if rows > 6 or cols > 6:
            raise ValueError(
                f"the image splits into {rows} x {cols} tiles; the prompt has markers for 6 x 6 "
                "(a size / max_image_size ratio above 6)"
            )
        ids: list[int] = []
        runs: list[tuple[int, int]] = []

        def tile(marker: int) -> None:
            ids.extend((self.fake_id, marker))
            runs.append((len(ids), self.tokens_per_tile))
            ids.extend([self.placeholder_id] * self.tokens_per_tile)

        for r in range(rows):
            for c in range(cols):
                tile(self.row_col_ids[r][c])
            ids.extend(self.newline if r < rows - 1 else self.row_gap)
        tile(self.global_id)
        ids.append(self.fake_id)
        pixels = torch.stack([proc.finish(t) for t in tiles])
        return ImageFeatures(pixels=pixels, token_ids=ids, embedding_runs=runs, meta=TileGrid(rows, cols))

    def dummy_image(self) -> Image.Image:
        return Image.new("RGB", (self.vision.image_size, self.vision.image_size))

    def build_model(self, ops, max_positions: int | None = None) -> Idefics3Model:
        return Idefics3Model(self, ops, max_positions)


class SmolVLM(Idefics3):
    """SmolVLM / SmolVLM2: Idefics3's layout and processor (a SmolLM2 decoder); its processor takes the marker
    tokens' names from the tokenizer's settings."""

    markers_from_tokenizer = True


class Idefics3Model(SplicedDecoder):
    """SigLIP tower (its post-LayerNorm output) -> pixel shuffle -> projection, per tile; Llama decoder."""

    def __init__(self, family: Idefics3, ops, max_positions: int | None = None):
        ckpt = family.checkpoint
        super().__init__(
            Decoder(ckpt, family.text, ops, prefix="model.text_model.", max_positions=max_positions),
            family.text,
            family.placeholder_id,
        )
        self.ops = ops
        v = family.vision
        self.vision = VisionTower(ckpt, v, ops, [-1], prefix="model.vision_model.", post_layernorm=True)
        side = v.image_size // v.patch_size
        self.vision.position_embedding = self.vision.position_embedding[idefics3_position_ids(side, side)]
        self.scale = family.scale
        self.projection = ckpt.tensor(
            "model.connector.modality_projection.proj.weight", (family.text.hidden_size, v.hidden_size * self.scale**2)
        )

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, side^2, E]` -> `[N, side^2 / s^2, E * s^2]`, transformers' Idefics3 connector order."""
        n, seq, e = x.shape
        side, s = math.isqrt(seq), self.scale
        x = x.view(n, side, side // s, e * s).permute(0, 2, 1, 3)
        x = x.reshape(n, side // s, side // s, e * s * s).permute(0, 2, 1, 3)
        return x.reshape(n, seq // (s * s), e * s * s)

    @torch.inference_mode()
    def encode_images(self, images: list[ImageFeatures]) -> list[torch.Tensor]:
        # Every tile of every image has the tower's size: one batched call, then each image's tiles in order.
        states = self.vision.forward(torch.cat([im.pixels for im in images]))[0]
        features = F.linear(self.pixel_shuffle(states), self.projection)
        return [f.flatten(0, 1) for f in features.split([im.pixels.shape[0] for im in images])]


# The markers Idefics3 / SmolVLM prompts carry around tiles (up to 6 x 6), for the presets' demo tokenizer.
_MARKERS = (
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)

# Shape presets (cultengine.presets): SmolVLM-256M-Instruct's own files (Idefics3 layout: 512-px tiles of 16-px
# patches, scale_factor 4, 64 tokens a tile); SmolVLM2-2.2B-Instruct, SigLIP-so400m/14 on 384-px tiles,
# scale_factor 3 (81 tokens a tile), SmolLM2-1.7B.
PRESETS: dict[str, Preset] = {
    "smolvlm-256m": Published(
        "SmolVLM-256M-Instruct",
        tokens=PresetTokens(_MARKERS, "<image>", published("SmolVLM-256M-Instruct", "processor_config.json")),
    ),
    "smolvlm2-2.2b": Composed(
        {
            "architectures": ["SmolVLMForConditionalGeneration"],
            "scale_factor": 3,
            "text_config": {
                "model_type": "llama",
                "hidden_size": 2048,
                "intermediate_size": 8192,
                "num_hidden_layers": 24,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "vocab_size": 49280,
                "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5,
                "rope_theta": 130000.0,
            },
            "vision_config": {**SIGLIP_SO400M_384, "model_type": "smolvlm_vision", "num_hidden_layers": 27},
        },
        {
            "image_processor_type": "SmolVLMImageProcessor",
            "do_resize": True,
            "size": {"longest_edge": 1536},
            "max_image_size": {"longest_edge": 384},
            "do_image_splitting": True,
            "resample": 1,
            "do_rescale": True,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
        PresetTokens(_MARKERS, "<image>", {"processor_class": "SmolVLMProcessor", "image_seq_len": 81}),
    ),
}
