"""Gemma 3 (`Gemma3ForConditionalGeneration`, and the text-only `Gemma3ForCausalLM`).

The decoder is the shared one with Gemma's hooks: embeddings scaled by sqrt(hidden), RMSNorm with `(1 + w)`
computed in fp32, q/k norms, four norms per layer (input, post-attention, pre- and post-feedforward), GeGLU
with tanh GELU, `query_pre_attn_scalar`, and `layer_types` mixing sliding-window layers (local RoPE base) with
full ones (global base and its scaling), and `final_logit_softcapping` in the text-only model (transformers
applies it there only). Images: a SigLIP tower's last hidden state, average-pooled to
`mm_tokens_per_image`, Gemma-normed and projected; the processor writes each `<start_of_image>` as
`\\n\\n<start_of_image>` + soft tokens + `<end_of_image>\\n\\n`, and the soft tokens of one image attend to
each other both ways during prefill (so an image's run is never split across prefill chunks).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image

from .. import ops as ops_module
from ..attention_metadata import AttentionMetadata
from ..checkpoint import Checkpoint
from ..errors import CheckpointError, config_float, config_int
from ..image import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, ImageProcessor
from ..presets import Preset, Published
from .decoder import Decoder, RotaryTables, SplicedDecoder, _rope
from .family import Capabilities, Family, ImageFeatures
from .text import TextOnly
from .vision import VisionConfig, VisionTower, activation

# Gemma3TextConfig's defaults for fields a config.json may leave out (hub configs give only what differs).
_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=262_208,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=131_072,
    rms_norm_eps=1e-6,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    sliding_window_pattern=6,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
    tie_word_embeddings=True,
)
_GEMMA3_DEFAULTS: dict[str, Any] = dict(
    mm_tokens_per_image=256, boi_token_index=255_999, eoi_token_index=256_000, image_token_index=262_144
)
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class GemmaTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    query_scale: float  # query_pre_attn_scalar ** -0.5
    sliding_window: int
    layer_types: list[str]
    rope: dict[str, tuple[float, dict | None]]  # layer type -> (theta, scaling)
    max_position_embeddings: int
    hidden_act: str
    final_logit_softcapping: float | None
    tie_word_embeddings: bool

    @classmethod
    def parse(cls, cfg: dict, where: str) -> GemmaTextConfig:
        """A Gemma 3 text config (transformers 4 or 5 layout), every field checked."""
        c = {**_TEXT_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
        # attn_logit_softcapping is read and never applied by transformers' Gemma 3 (nor here).
        if c.get("use_bidirectional_attention"):
            raise CheckpointError(f"{where}: use_bidirectional_attention (an encoder) is not supported")
        if c.get("attention_bias"):
            raise CheckpointError(f"{where}: attention_bias is not supported for Gemma 3")
        heads, kv_heads = config_int(c, "num_attention_heads", where), config_int(c, "num_key_value_heads", where)
        if heads % kv_heads:
            raise CheckpointError(
                f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        num_layers = config_int(c, "num_hidden_layers", where)
        pattern = config_int(c, "sliding_window_pattern", where)
        types = c.get("layer_types") or [LAYER_TYPES[(i + 1) % pattern == 0] for i in range(num_layers)]
        if len(types) != num_layers or not set(types) <= set(LAYER_TYPES):
            raise CheckpointError(f"{where}: layer_types must list {num_layers} of {', '.join(LAYER_TYPES)}")
        params = c.get("rope_parameters")
        if params and set(params) <= set(LAYER_TYPES):  # transformers 5: one set per layer type
            rope = {kind: _rope({"rope_parameters": params[kind]}, where) for kind in params}
        else:  # transformers 4: the global base and scaling, and a local base
            rope = {
                "full_attention": _rope({"rope_theta": c["rope_theta"], "rope_scaling": c.get("rope_scaling")}, where),
                "sliding_attention": _rope({"rope_theta": c["rope_local_base_freq"]}, where),
            }
        if not set(types) <= set(rope):
            raise CheckpointError(f"{where}: rope_parameters has no entry for every layer type")
        activation(c["hidden_activation"])
        cap = c.get("final_logit_softcapping")
        return cls(
            vocab_size=config_int(c, "vocab_size", where),
            hidden_size=config_int(c, "hidden_size", where),
            intermediate_size=config_int(c, "intermediate_size", where),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=config_int(c, "head_dim", where),
            rms_norm_eps=config_float(c, "rms_norm_eps", where),
            query_scale=config_float(c, "query_pre_attn_scalar", where) ** -0.5,
            sliding_window=config_int(c, "sliding_window", where),
            layer_types=list(types),
            rope=rope,
            max_position_embeddings=config_int(c, "max_position_embeddings", where),
            hidden_act=c["hidden_activation"],
            final_logit_softcapping=None if cap is None else float(cap),
            tie_word_embeddings=bool(c["tie_word_embeddings"]),
        )


def gemma_rms_norm(x: torch.Tensor, weight_plus_one: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: normalised and scaled by `(1 + w)` in fp32, then rounded once to x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight_plus_one).to(x.dtype)


class GemmaDecoder(Decoder):
    """Gemma 3's decoder: the shared `Decoder` with Gemma's norms (`1 + w` in fp32, four per layer, on q and k
    too), sandwich layers, scaled embeddings, a RoPE table pair per layer type and soft-capped logits."""

    def __init__(self, ckpt: Checkpoint, text: GemmaTextConfig, ops, prefix: str, max_positions: int | None = None):
        super().__init__(ckpt, text, ops, prefix, max_positions)
        self.scale = text.query_scale
        # transformers rounds sqrt(hidden) to the weights' dtype (55.4256 becomes 55.5 in bf16).
        self.embed_scale = torch.tensor(
            text.hidden_size**0.5, dtype=self.embed_tokens.dtype, device=self.embed_tokens.device
        )

    def norm_weight(self, name: str, dim: int) -> torch.Tensor:
        return 1.0 + self.tensor(name, (dim,)).float()  # kept as 1 + w in fp32, as transformers computes it

    def layer_weights(self, lp: str, i: int) -> dict[str, Any]:
        c, h = self.cfg, self.cfg.hidden_size
        kind = c.layer_types[i]
        return dict(
            input_norm=self.norm_weight(lp + "input_layernorm.weight", h),
            post_attn_norm=self.norm_weight(lp + "post_attention_layernorm.weight", h),
            pre_ff_norm=self.norm_weight(lp + "pre_feedforward_layernorm.weight", h),
            post_ff_norm=self.norm_weight(lp + "post_feedforward_layernorm.weight", h),
            q_norm=self.norm_weight(lp + "self_attn.q_norm.weight", c.head_dim),
            k_norm=self.norm_weight(lp + "self_attn.k_norm.weight", c.head_dim),
            kind=kind,
            window=c.sliding_window if kind == "sliding_attention" else None,
            **self.attention_weights(lp, qkv_bias=False, o_bias=False),
            **self.mlp_weights(lp, bias=False),
        )

    def build_rope(self, positions: int, device: torch.device, mrope_rows: list[int] | None) -> None:
        # One pair of RoPE tables per layer type: the local base for sliding layers, the global one for full.
        c = self.cfg
        self.rope = {
            kind: ops_module.rotary_cos_sin(c.head_dim, positions, theta, device, scaling)
            for kind, (theta, scaling) in c.rope.items()
            if kind in c.layer_types
        }

    def rotary_tables(self, positions: torch.Tensor) -> dict[str, RotaryTables]:
        return {kind: (positions, cos, sin) for kind, (cos, sin) in self.rope.items()}

    def layer_step(
        self,
        layer: dict[str, Any],
        x: torch.Tensor,
        residual: torch.Tensor | None,
        tables: dict[str, RotaryTables],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, None]:
        # Sandwich norms around attention and the MLP, each added to the stream (no carried residual).
        eps = self.cfg.rms_norm_eps
        q, k, v = self.project_qkv(layer, gemma_rms_norm(x, layer["input_norm"], eps))
        q, k = gemma_rms_norm(q, layer["q_norm"], eps), gemma_rms_norm(k, layer["k_norm"], eps)
        a = self.attend(layer, q, k, v, tables[layer["kind"]], kv_cache, meta)
        x = x + gemma_rms_norm(a, layer["post_attn_norm"], eps)
        h = self.mlp(layer, gemma_rms_norm(x, layer["pre_ff_norm"], eps))
        return x + gemma_rms_norm(h, layer["post_ff_norm"], eps), None

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return gemma_rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().embed(input_ids) * self.embed_scale

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[N, H]` hidden rows -> fp32 logits `[N, vocab]`, soft-capped where the config says so."""
        logits = super().compute_logits(hidden)
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma3ImageProcessor(ImageProcessor):
    """transformers' `Gemma3ImageProcessor` (torchvision) / `Gemma3ImageProcessorPil`: resize to the exact
    square size, bilinear, mean and std 0.5; pan-and-scan crops when the config enables them."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": 224, "width": 224},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_STANDARD_MEAN,
        "image_std": IMAGENET_STANDARD_STD,
        # Gemma3Processor's defaults for what preprocessor_config.json leaves null.
        "do_pan_and_scan": False,
        "pan_and_scan_min_crop_size": 256,
        "pan_and_scan_max_num_crops": 4,
        "pan_and_scan_min_ratio_to_activate": 1.2,
    }
    DEFAULT_TO_SQUARE: ClassVar[bool] = True

    def __init__(self, config: dict | None = None, backend: str | None = None):
        super().__init__(config, backend)
        c = {**self.DEFAULTS, **{k: v for k, v in (config or {}).items() if v is not None}}
        self.pan_and_scan = bool(c["do_pan_and_scan"])
        self.min_crop = int(c["pan_and_scan_min_crop_size"])
        self.max_crops = int(c["pan_and_scan_max_num_crops"])
        self.min_ratio = float(c["pan_and_scan_min_ratio_to_activate"])

    def tiles(self, image: Image.Image) -> torch.Tensor:
        """`[1 + crops, 3, S, S]`: the whole image, then its pan-and-scan crops (none when disabled)."""
        x = self.channels_first(image)
        return torch.stack([self.finish(self.geometry(t)) for t in [x, *self.crops(x)]])

    def crops(self, x) -> list:
        """transformers' `pan_and_scan`: 2..max crops along the long side of an elongated image."""
        if not self.pan_and_scan:
            return []
        h, w = x.shape[-2:]
        long, short = max(h, w), min(h, w)
        if long / short < self.min_ratio:
            return []
        n = min(self.max_crops, max(2, min(int(math.floor(long / self.min_crop)), int(math.floor(long / short + 0.5)))))
        rows, cols = (1, n) if w >= h else (n, 1)
        ch, cw = math.ceil(h / rows), math.ceil(w / cols)
        if min(ch, cw) < self.min_crop:
            return []
        return [x[..., i * ch : (i + 1) * ch, j * cw : (j + 1) * cw] for i in range(rows) for j in range(cols)]


class Gemma3(Family):
    """Config of a Gemma 3 VLM, and its host-side image processing."""

    capabilities = Capabilities(atomic_images=True, bidirectional_images=True)

    def __init__(self, checkpoint: Checkpoint, image_backend: str | None = None):
        super().__init__(checkpoint, image_backend)
        config = checkpoint.config
        c = {**_GEMMA3_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
        text = dict(config.get("text_config") or {})
        if "tie_word_embeddings" in config:
            text.setdefault("tie_word_embeddings", config["tie_word_embeddings"])
        self.text = GemmaTextConfig.parse(text, self.where)
        self.text.final_logit_softcapping = None  # Gemma3ForConditionalGeneration never soft-caps its logits
        self.vision = VisionConfig.parse(
            config.get("vision_config") or {}, self.where, {"model_type": "siglip_vision_model"}
        )
        if self.vision.has_class_token:
            raise CheckpointError(f"{self.where}: Gemma 3 takes a SigLIP vision tower")
        self.mm_tokens = config_int(c, "mm_tokens_per_image", self.where)
        self.tokens_per_side = math.isqrt(self.mm_tokens)
        side = self.vision.image_size // self.vision.patch_size
        if self.tokens_per_side**2 != self.mm_tokens or side % self.tokens_per_side:
            raise CheckpointError(
                f"{self.where}: mm_tokens_per_image {self.mm_tokens} is not a square that pools "
                f"the tower's {side}x{side} patches evenly"
            )
        self.placeholder_id = config_int(c, "boi_token_index", self.where)
        self.eoi_id = config_int(c, "eoi_token_index", self.where)
        self.image_token_id = config_int(c, "image_token_index", self.where)
        self.image_processor = self._image_processor()

    def _image_processor(self) -> Gemma3ImageProcessor:
        path = self.checkpoint.path
        pre = path / "preprocessor_config.json"
        processor_file = path / "processor_config.json"
        processor = json.loads(processor_file.read_text()) if processor_file.is_file() else {}
        if not pre.is_file() and processor_file.is_file():  # transformers 5 saves the processor whole
            pre = processor_file
        seq = processor.get("image_seq_length")
        if seq is not None and seq != self.mm_tokens:
            raise CheckpointError(
                f"{processor_file}: image_seq_length {seq} differs from config.json's mm_tokens_per_image "
                f"{self.mm_tokens} (the prompt would hold another number of image tokens than the model makes)"
            )
        try:
            proc = Gemma3ImageProcessor.for_config(
                self.checkpoint.preprocessor_config, self.vision.image_size, self.image_backend
            )
        except ValueError as e:
            raise CheckpointError(f"{pre}: {e}") from e
        s = self.vision.image_size
        if not proc.do_resize or (proc.size.get("height"), proc.size.get("width")) != (s, s):
            raise CheckpointError(f"{pre}: size {proc.size} does not make the {s}x{s} images the vision tower takes")
        return proc

    @property
    def max_context(self) -> int:
        return self.text.max_position_embeddings

    @property
    def tokenizer(self):
        return self.checkpoint.tokenizer()

    def process_image(self, image: Image.Image, options: dict[str, Any]) -> ImageFeatures:
        pixels = self.image_processor.tiles(image)
        image_run = [self.placeholder_id] + [self.image_token_id] * self.mm_tokens + [self.eoi_id]
        token_ids, runs = list(image_run), [(1, self.mm_tokens)]
        # Pan-and-scan: Gemma3Processor's text between the whole image and its crops, tokenized as it is
        # (between special tokens, so on its own).
        for i in range(1, pixels.shape[0]):
            token_ids += self.tokenizer.encode(
                "\n\n and here are some crops to help you see better \n\n" if i == 1 else "\n\n \n\n",
                add_special_tokens=False,
            )
            runs.append((len(token_ids) + 1, self.mm_tokens))
            token_ids += image_run
        return ImageFeatures(pixels=pixels, token_ids=token_ids, embedding_runs=runs)

    def expand_text(self, text: str, images: list[ImageFeatures]) -> str:
        # Gemma3Processor writes "\n\n" on both sides of each image (and, with crops, a sentence before it):
        # in the text, so that they merge with the prompt's own newlines as they do there.
        if not images:
            return text
        boi = self.tokenizer.id_to_token(self.placeholder_id)
        parts = text.split(boi)
        out = parts[0]
        for i, part in enumerate(parts[1:]):
            if i >= len(images):
                out += boi + part
                continue
            lead = "Here is the original image " if images[i].pixels.shape[0] > 1 else ""
            out += f"{lead}\n\n{boi}\n\n{part}"
        return out

    def dummy_image(self) -> Image.Image:
        return Image.new("RGB", (self.vision.image_size, self.vision.image_size))

    def build_model(self, ops, max_positions: int | None = None) -> Gemma3Model:
        return Gemma3Model(self, ops, max_positions)


class Gemma3Model(SplicedDecoder):
    """SigLIP tower -> average pool -> Gemma RMSNorm -> projection; embeddings spliced into Gemma's decoder."""

    def __init__(self, family: Gemma3, ops, max_positions: int | None = None):
        ckpt = family.checkpoint
        super().__init__(
            GemmaDecoder(ckpt, family.text, ops, "model.language_model.", max_positions),
            family.text,
            family.image_token_id,
        )
        self.family = family
        self.vision = VisionTower(ckpt, family.vision, ops, [-1], post_layernorm=True)
        e, h = family.vision.hidden_size, family.text.hidden_size
        p = "model.multi_modal_projector."
        self.soft_emb_norm = 1.0 + ckpt.tensor(p + "mm_soft_emb_norm.weight", (e,)).float()
        self.projection = ckpt.tensor(p + "mm_input_projection_weight", (e, h))
        self.patches_per_side = family.vision.image_size // family.vision.patch_size
        self.pool = self.patches_per_side // family.tokens_per_side

    @torch.inference_mode()
    def encode_images(self, images: list[ImageFeatures]) -> list[torch.Tensor]:
        # Every tile (image or crop) has the tower's size: one batched call, then split per image.
        x = self.vision.forward(torch.cat([im.pixels for im in images]))[0]
        n, _, e = x.shape
        grid = x.transpose(1, 2).reshape(n, e, self.patches_per_side, self.patches_per_side)
        pooled = F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)
        normed = gemma_rms_norm(pooled, self.soft_emb_norm, self.family.vision.layer_norm_eps)
        features = torch.matmul(normed, self.projection).type_as(x)
        return list(features.flatten(0, 1).split([im.num_embeddings for im in images]))


class Gemma3Text(TextOnly):
    """`Gemma3ForCausalLM`: Gemma 3's decoder alone (config.json is the text config), no images."""

    config_class = GemmaTextConfig

    def build_model(self, ops, max_positions: int | None = None) -> SplicedDecoder:
        return SplicedDecoder(GemmaDecoder(self.checkpoint, self.text, ops, "model.", max_positions), self.text, None)


# Shape presets (cultengine.presets): gemma-3-4b-it's own files (SigLIP-so400m/14-896 pooled to 256 tokens;
# 5 sliding layers per full one), and the 12B: the same files with its decoder's sizes.
PRESETS: dict[str, Preset] = {
    "gemma-3-4b": Published("gemma-3-4b-it"),
    "gemma-3-12b": Published(
        "gemma-3-4b-it",
        {
            "text_config": {
                "hidden_size": 3840,
                "intermediate_size": 15360,
                "num_hidden_layers": 48,
                "num_attention_heads": 16,
                "num_key_value_heads": 8,
            }
        },
    ),
}
