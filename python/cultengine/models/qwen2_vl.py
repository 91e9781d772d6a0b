"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): native dynamic resolution and M-RoPE.

An image is smart-resized to multiples of patch x merge size (its pixel count kept within
`min_pixels`..`max_pixels`) and cut into 14-pixel patches, each flattened with a temporal patch of two
identical frames. The vision tower embeds the patches of all images packed together (every image attends
only to itself: `ops.varlen_vision_attention`), with 2-D rotary embeddings over the patch grid; a 2x2
merger then gives `t*h*w / merge^2` embeddings per image, which replace the image's `<|image_pad|>`
tokens. The Qwen2 decoder turns its rotary frequencies by three position streams (temporal, height,
width; `mrope_section`): image tokens take their grid coordinates, text continues after the largest.

Qwen2.5-VL (`qwen2_5_vl.py`) and Qwen3-VL (`qwen3_vl.py`) specialise the tower and the decoder here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..checkpoint import Checkpoint
from ..errors import CheckpointError, config_int
from ..image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor, rescale_and_normalize, resize, to_tensor
from ..presets import Preset, Published
from .decoder import Decoder, SplicedDecoder, TextConfig, tied_embeddings
from .family import Capabilities, Family, ImageFeatures
from .vision import activation


# ---------------------------------------------------------------------------------------------
# Image processing: transformers' Qwen2VLImageProcessor (torchvision) / Qwen2VLImageProcessorPil
# ---------------------------------------------------------------------------------------------
def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width), both multiples of `factor`, about the image's aspect ratio, with a pixel count within
    `min_pixels`..`max_pixels` (transformers' `smart_resize`, float arithmetic included)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"a {width}x{height} image has an aspect ratio over 200, which the Qwen processors refuse")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class QwenImageProcessor(ImageProcessor):
    """Smart resize, rescale and normalise on the processor's path, then flattened patches
    `[h * w, channels * temporal_patch * patch^2]` in merge-block order (each 2x2 block's patches together)."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 1280,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }

    def __init__(self, config: dict | None = None, backend: str | None = None):
        c = {**self.DEFAULTS, **{k: v for k, v in (config or {}).items() if v is not None}}
        where = "image processor"
        # Pixel bounds: `size` (shortest_edge/longest_edge, or min_pixels/max_pixels), then the top-level keys.
        size = c.get("size") if isinstance(c.get("size"), dict) else {}
        given = {k: v for k, v in (config or {}).items() if v is not None}
        for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            value = next(v for v in (given.get(key), size.get(edge), size.get(key), c[key]) if v is not None)
            setattr(self, key, config_int({key: value}, key, where))
        self.patch_size = config_int(c, "patch_size", where)
        self.temporal_patch_size = config_int(c, "temporal_patch_size", where)
        self.merge_size = config_int(c, "merge_size", where)
        super().__init__({**c, "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}, backend)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def process(
        self, image: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Flattened patches and the `(t, h, w)` patch grid of one image (pixel bounds as given, else the config's)."""
        x = self.channels_first(image)
        if self.do_resize:
            hw = smart_resize(*x.shape[-2:], self.factor, min_pixels or self.min_pixels, max_pixels or self.max_pixels)
            x = resize(x, hw, self.resample)
        pixels = to_tensor(rescale_and_normalize(x, self.rescale_factor, self.mean, self.std))
        c, height, width = pixels.shape
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = height // p, width // p
        if gh % m or gw % m:
            raise ValueError(
                f"a {width}x{height} image is not a multiple of the {p * m}-pixel merged patch (do_resize is off)"
            )
        patches = pixels.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        patches = patches.unsqueeze(5).expand(-1, -1, -1, -1, -1, tp, -1, -1)  # a still image: tp equal frames
        return patches.reshape(gh * gw, c * tp * p * p).contiguous(), (1, gh, gw)


# ---------------------------------------------------------------------------------------------
# M-RoPE positions: transformers' `get_rope_index` for text and images
# ---------------------------------------------------------------------------------------------
def mrope_positions(
    num_tokens: int, images: list[tuple[int, tuple[int, int, int]]], merge_size: int
) -> tuple[np.ndarray, int]:
    """`[3, num_tokens]` (temporal, height, width) positions and the decode offset, given each image's first
    token and its patch grid. Text runs count up in all three rows; an image's tokens take the grid
    coordinates of their merged patch, offset by where the image starts; text after an image resumes at
    its largest coordinate + 1. Decode tokens sit at `position + offset` in every row."""
    pos = np.empty((3, num_tokens), dtype=np.int64)
    current = previous = 0
    for start, (t, h, w) in sorted(images):
        pos[:, previous:start] = current + np.arange(start - previous)
        current += start - previous
        h, w = h // merge_size, w // merge_size
        grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")).reshape(3, -1)
        pos[:, start : start + grid.shape[1]] = current + grid
        current += max(h, w)
        previous = start + grid.shape[1]
    pos[:, previous:] = current + np.arange(num_tokens - previous)
    return pos, int(pos.max()) + 1 - num_tokens if num_tokens else 0


def mrope_rows(section: list[int], interleaved: bool = False) -> list[int]:
    """The position stream (0 temporal, 1 height, 2 width) of each rotary frequency: contiguous chunks of
    `mrope_section` (Qwen2/2.5-VL), or Qwen3-VL's interleaving (T H W T H W ..., T for the rest)."""
    if not interleaved:
        return [row for row, n in enumerate(section) for _ in range(n)]
    rows = [0] * sum(section)
    for row in (1, 2):
        picked = range(sum(section))[row : section[row] * 3 : 3]  # clipped to the frequencies there are
        rows[picked.start : picked.stop : picked.step] = [row] * len(picked)
    return rows


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------
@dataclass
class QwenVisionConfig:
    depth: int
    hidden_size: int  # the tower's width
    intermediate_size: int
    num_heads: int
    out_hidden_size: int  # the merger's output: the decoder's hidden size
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    in_channels: int
    hidden_act: str
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def fields(cls, c: dict, where: str) -> dict[str, Any]:
        """The fields every Qwen tower shares, from a vision_config with its family's defaults merged in."""
        hidden, heads = config_int(c, "hidden_size", where), config_int(c, "num_heads", where)
        if hidden % heads or (hidden // heads) % 4:
            raise CheckpointError(
                f"{where}: vision hidden_size {hidden} / num_heads {heads} must be a head size "
                "divisible by 4 (2-D rotary embeddings)"
            )
        activation(c["hidden_act"])
        theta = (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return dict(
            depth=config_int(c, "depth", where),
            hidden_size=hidden,
            num_heads=heads,
            intermediate_size=config_int(c, "intermediate_size", where),
            out_hidden_size=config_int(c, "out_hidden_size", where),
            patch_size=config_int(c, "patch_size", where),
            temporal_patch_size=config_int(c, "temporal_patch_size", where),
            merge_size=config_int(c, "spatial_merge_size", where),
            in_channels=config_int(c, "in_channels", where),
            hidden_act=c["hidden_act"],
            rope_theta=float(theta),
        )

    @classmethod
    def parse(cls, cfg: dict, where: str) -> QwenVisionConfig:
        """Qwen2-VL's vision_config: `embed_dim` wide, `hidden_size` out, an MLP `mlp_ratio` times wider."""
        c = {
            "depth": 32,
            "embed_dim": 1280,
            "hidden_size": 3584,
            "hidden_act": "quick_gelu",
            "mlp_ratio": 4,
            "num_heads": 16,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            **{k: v for k, v in cfg.items() if v is not None},
        }
        embed = config_int(c, "embed_dim", where)
        return cls(
            **cls.fields(
                {
                    **c,
                    "hidden_size": embed,
                    "out_hidden_size": c["hidden_size"],
                    "intermediate_size": int(embed * c["mlp_ratio"]),
                },
                where,
            )
        )


def merge_order_coordinates(h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of each patch of an h x w grid in the processor's merge-block order."""
    within = torch.arange(h * w)
    in_col, in_row = within % merge, (within // merge) % merge
    blocks_w = w // merge
    block_col, block_row = (within // (merge * merge)) % blocks_w, within // (merge * merge * blocks_w)
    return block_row * merge + in_row, block_col * merge + in_col


class QwenVisionTower:
    """Qwen2-VL's tower: patch embedding (a Conv3d written as one matmul), pre-LayerNorm blocks with 2-D RoPE
    and varlen attention over the packed images, GELU MLPs, and the LayerNorm + MLP 2x2 patch merger.

    Subclasses (Qwen2.5-VL, Qwen3-VL) change the norms, the MLP, which segments each layer attends within,
    position embeddings and extra outputs through the hooks below.
    """

    def __init__(self, ckpt: Checkpoint, config: QwenVisionConfig, ops, prefix: str):
        c, w = config, ckpt.tensor
        self.ops, self.cfg, self.prefix, self.ckpt = ops, c, prefix, ckpt
        e = c.hidden_size
        self.patch_weight = w(
            prefix + "patch_embed.proj.weight", (e, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        ).reshape(e, -1)
        self.patch_bias = self.load_patch_bias()
        self.act = activation(c.hidden_act)
        self.layers = []
        for i in range(c.depth):
            lp = f"{prefix}blocks.{i}."
            self.layers.append(
                dict(
                    norm1=self.load_norm(lp + "norm1", e),
                    norm2=self.load_norm(lp + "norm2", e),
                    qkv=self.linear(lp + "attn.qkv", 3 * e, e),
                    proj=self.linear(lp + "attn.proj", e, e),
                    **self.load_mlp(lp + "mlp."),
                )
            )
        self.merger = self.load_merger(prefix + "merger.")
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim // 2, 2, dtype=torch.float) / (c.head_dim // 2)))
        self.inv_freq = inv_freq.to(ckpt.device)

    # -- weights (hooks) -------------------------------------------------------------------------
    def linear(self, name: str, out: int, into: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ckpt.tensor(name + ".weight", (out, into)), self.ckpt.tensor(name + ".bias", (out,))

    def load_patch_bias(self) -> torch.Tensor | None:
        return None

    def load_norm(self, name: str, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.ckpt.tensor(name + ".weight", (n,)), self.ckpt.tensor(name + ".bias", (n,))

    def norm(self, x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), *weights, 1e-6)

    def load_mlp(self, lp: str) -> dict[str, Any]:
        c = self.cfg
        return dict(
            fc1=self.linear(lp + "fc1", c.intermediate_size, c.hidden_size),
            fc2=self.linear(lp + "fc2", c.hidden_size, c.intermediate_size),
        )

    def mlp(self, layer: dict, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(F.linear(x, *layer["fc1"])), *layer["fc2"])

    def load_merger(self, mp: str) -> dict[str, Any]:
        c = self.cfg
        wide = c.hidden_size * c.merge_size**2
        return dict(
            norm=self.load_norm(mp + "ln_q", c.hidden_size),
            fc1=self.linear(mp + "mlp.0", wide, wide),
            fc2=self.linear(mp + "mlp.2", c.out_hidden_size, wide),
        )

    # -- forward ---------------------------------------------------------------------------------
    def merge(self, merger: dict, x: torch.Tensor) -> torch.Tensor:
        """Each 2x2 block of patches (consecutive rows) normed, concatenated and projected."""
        wide = self.cfg.hidden_size * self.cfg.merge_size**2
        x = self.norm(x, merger["norm"]).reshape(-1, wide)
        return F.linear(F.gelu(F.linear(x, *merger["fc1"])), *merger["fc2"])

    def embed(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        return F.linear(
            pixels.to(self.patch_weight.device, self.patch_weight.dtype), self.patch_weight, self.patch_bias
        )

    def rotary_tables(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch cos, sin `[N, head_dim / 2]`: the first half of the frequencies turned by the patch's
        row, the second by its column."""
        m = self.cfg.merge_size
        coords = torch.cat([torch.stack(merge_order_coordinates(h, w, m), dim=-1).repeat(t, 1) for t, h, w in grids])
        freqs = coords.to(self.inv_freq.device)[..., None].float() * self.inv_freq  # [N, 2, head_dim / 4]
        freqs = freqs.flatten(1)
        return freqs.cos(), freqs.sin()

    @staticmethod
    def image_segments(grids: list[tuple[int, int, int]]) -> list[int]:
        """Lengths of the attention segments of full-attention layers: every frame of every image."""
        return [h * w for t, h, w in grids for _ in range(t)]

    def layout(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor | None, list[list[int]]]:
        """The order the tower processes merged patches in (None: as packed) and each layer's attention
        segments in that order. Qwen2-VL: packed order, whole images in every layer."""
        return None, [self.image_segments(grids)] * self.cfg.depth

    def after_layer(self, i: int, x: torch.Tensor, extras: list[torch.Tensor]) -> None:
        """Collect intermediate outputs (Qwen3-VL's DeepStack features)."""

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Packed patches `[N, channels * temporal_patch * patch^2]` of images with patch grids `grids` ->
        merged embeddings `[N / merge^2, out_hidden_size * (1 + extra outputs)]` (DeepStack's after the main)."""
        c, ops = self.cfg, self.ops
        unit = c.merge_size**2
        x = self.embed(pixels, grids)
        cos, sin = self.rotary_tables(grids)
        order, segments = self.layout(grids)
        if order is not None:  # reorder whole merged patches, keeping each 2x2 block together
            rows = (order.to(x.device)[:, None] * unit + torch.arange(unit, device=x.device)).flatten()
            x, cos, sin = x[rows], cos[rows], sin[rows]
        n, heads, d = x.shape[0], c.num_heads, c.head_dim
        positions = torch.arange(n, device=x.device)
        cu = {}
        extras: list[torch.Tensor] = []
        for i, (layer, lengths) in enumerate(zip(self.layers, segments, strict=True)):
            key = tuple(lengths)
            if key not in cu:
                cu[key] = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device=x.device)
            q, k, v = F.linear(self.norm(x, layer["norm1"]), *layer["qkv"]).view(n, 3, heads, d).unbind(1)
            q, k = ops.rotary_embedding(q, k, positions, cos, sin)
            a = ops.varlen_vision_attention(q, k, v, cu[key], max(lengths), d**-0.5)
            x = x + F.linear(a.reshape(n, -1), *layer["proj"])
            x = x + self.mlp(layer, self.norm(x, layer["norm2"]))
            self.after_layer(i, x, extras)
        out = torch.cat([self.merge(self.merger, x), *extras], dim=-1) if extras else self.merge(self.merger, x)
        if order is not None:
            out = out[torch.argsort(order.to(out.device))]
        return out


# ---------------------------------------------------------------------------------------------
# The family and its model
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QwenGrid:
    """An image's patch grid: (frames, rows, columns) of 14- (or 16-) pixel patches, before the 2x2 merge."""

    thw: tuple[int, int, int]


class Qwen2VL(Family):
    """Config of a Qwen2-VL checkpoint (transformers 4's flat or 5's nested layout) and its image processing."""

    capabilities = Capabilities(position_rows=3)
    image_options = ("min_pixels", "max_pixels")
    decoder_type = "qwen2"
    mrope_section_default = [16, 24, 24]
    mrope_interleaved = False
    vision_config_class: type[QwenVisionConfig] = QwenVisionConfig
    # Qwen2VLTextConfig's defaults where they differ from Qwen2's.
    text_defaults: ClassVar[dict[str, Any]] = dict(
        vocab_size=152064,
        hidden_size=8192,
        intermediate_size=29568,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
    )

    def __init__(self, checkpoint: Checkpoint, image_backend: str | None = None):
        super().__init__(checkpoint, image_backend)
        config = checkpoint.config
        text, section = self._text_config(config)
        self.text = TextConfig.parse(text, self.where, tie_word_embeddings=tied_embeddings(config))
        if (
            len(section) != 3
            or not all(isinstance(s, int) and s >= 0 for s in section)
            or sum(section) != self.text.head_dim // 2
        ):
            raise CheckpointError(
                f"{self.where}: mrope_section {section!r} must be three counts adding up to "
                f"head_dim / 2 = {self.text.head_dim // 2}"
            )
        self.mrope_rows = mrope_rows(section, self.mrope_interleaved)
        self.vision = self.vision_config_class.parse(config.get("vision_config") or {}, self.where)
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise CheckpointError(
                f"{self.where}: the vision merger's output size {self.vision.out_hidden_size} "
                f"is not the decoder's hidden_size {self.text.hidden_size}"
            )
        self.placeholder_id = config_int({**{"image_token_id": 151655}, **config}, "image_token_id", self.where, 0)
        self.video_token_id = config.get("video_token_id", 151656)
        pre = str(checkpoint.path / "preprocessor_config.json")
        try:
            self.image_processor = QwenImageProcessor(checkpoint.preprocessor_config or None, image_backend)
        except (ValueError, CheckpointError) as e:
            raise CheckpointError(f"{pre}: {e}") from e
        proc, v = self.image_processor, self.vision
        for key, mine, tower in (
            ("patch_size", proc.patch_size, v.patch_size),
            ("merge_size", proc.merge_size, v.merge_size),
            ("temporal_patch_size", proc.temporal_patch_size, v.temporal_patch_size),
        ):
            if mine != tower:
                raise CheckpointError(f"{pre}: {key} {mine} differs from the vision tower's {tower} (config.json)")

    def _text_config(self, config: dict) -> tuple[dict, list[int]]:
        """The decoder's config and its mrope_section. transformers 4 wrote the decoder's fields at the top
        level and M-RoPE as `rope_scaling: {"type": "mrope", ...}`; 5 nests `text_config` with
        `rope_parameters`. M-RoPE is plain RoPE per position stream, so the decoder sees default RoPE."""
        nested = config.get("text_config")
        text = dict(nested) if nested else {k: v for k, v in config.items() if k != "vision_config"}
        section = self.mrope_section_default
        for key in ("rope_parameters", "rope_scaling"):
            rope = text.get(key)
            if isinstance(rope, dict):
                section = rope.get("mrope_section", section)
                rope = {k: v for k, v in rope.items() if k not in ("mrope_section", "mrope_interleaved")}
                if rope.get("type") == "mrope":
                    del rope["type"]
                text[key] = rope or None
        return {
            **self.text_defaults,
            **{k: v for k, v in text.items() if v is not None},
            "model_type": self.decoder_type,
        }, list(section)

    @property
    def max_context(self) -> int:
        return min(self.text.max_position_embeddings, self.text.sliding_window or 1 << 62)

    def process_image(self, image: Image.Image, options: dict[str, Any]) -> ImageFeatures:
        bounds = {}
        for key in self.image_options:
            if options.get(key) is not None:
                bounds[key] = config_int(options, key, "request")
        pixels, grid = self.image_processor.process(image, **bounds)
        n = grid[0] * grid[1] * grid[2] // self.vision.merge_size**2
        return ImageFeatures(
            pixels=pixels, token_ids=[self.placeholder_id] * n, embedding_runs=[(0, n)], meta=QwenGrid(grid)
        )

    def positions(self, token_ids: list[int], images: list[tuple[int, ImageFeatures]]) -> tuple[np.ndarray, int]:
        if self.video_token_id in token_ids:
            raise ValueError(
                "video inputs are not supported: the prompt holds a video placeholder "
                f"(token {self.video_token_id}); pass video frames as images"
            )
        return mrope_positions(len(token_ids), [(s, f.meta.thw) for s, f in images], self.vision.merge_size)

    def dummy_image(self) -> Image.Image:
        side = self.image_processor.factor * 2
        return Image.new("RGB", (side, side))

    def weight_prefixes(self) -> tuple[str, str]:
        """(decoder, vision tower) weight prefixes: transformers 5's `model.language_model.` / `model.visual.`,
        or 4's `model.` / `visual.`."""
        if self.checkpoint.random_init or self.checkpoint.has("model.language_model.embed_tokens.weight"):
            return "model.language_model.", "model.visual."
        return "model.", "visual."

    def build_vision_tower(self, ops, prefix: str) -> QwenVisionTower:
        return QwenVisionTower(self.checkpoint, self.vision, ops, prefix)

    def build_model(self, ops, max_positions: int | None = None) -> Qwen2VLModel:
        return Qwen2VLModel(self, ops, max_positions)


class Qwen2VLModel(SplicedDecoder):
    """The vision tower over each step's new images, packed; the M-RoPE decoder over the packed tokens."""

    def __init__(self, family: Qwen2VL, ops, max_positions: int | None = None):
        text_prefix, vision_prefix = family.weight_prefixes()
        self.family, self.ops = family, ops
        self.vision = family.build_vision_tower(ops, vision_prefix)
        decoder = Decoder(
            family.checkpoint,
            family.text,
            ops,
            prefix=text_prefix,
            max_positions=max_positions,
            mrope_rows=family.mrope_rows,
        )
        super().__init__(decoder, family.text, family.placeholder_id)

    def encode_images(self, images: list[ImageFeatures]) -> list[torch.Tensor]:
        # All images in one packed tower call: each attends only to itself.
        grids = [im.meta.thw for im in images]
        features = self.vision.forward(torch.cat([im.pixels for im in images]), grids)
        return list(features.split([im.num_embeddings for im in images]))


# Shape preset (cultengine.presets): Qwen2-VL-2B-Instruct's own files.
PRESETS: dict[str, Preset] = {"qwen2-vl-2b": Published("Qwen2-VL-2B-Instruct")}
