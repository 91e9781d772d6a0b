"""Vision transformers of the LLaVA families, CLIP and SigLIP, inference only, weights as plain tensors.

The two differ in config only: CLIP has a class token, a pre-LayerNorm and a bias-free patch
projection; SigLIP has none of these and a biased projection. Both are pre-norm encoders whose
hidden states the families select from (`hidden_states[0]` is the embedding output, `[i]` layer i's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..checkpoint import Checkpoint
from ..errors import CheckpointError, config_float, config_int

VISION_MODELS = ("clip_vision_model", "siglip_vision_model")
_VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_vision_model": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_channels=3,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
    "siglip_vision_model": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_channels=3,
        image_size=224,
        patch_size=16,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    ),
}

ACTIVATIONS = {
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise CheckpointError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


@dataclass
class VisionConfig:
    model_type: str  # clip_vision_model | siglip_vision_model
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float

    @property
    def has_class_token(self) -> bool:
        return self.model_type == "clip_vision_model"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def parse(cls, cfg: dict, where: str, defaults: dict | None = None) -> VisionConfig:
        """A VLM's `vision_config`; `defaults` are the VLM config class's own (LlavaConfig's CLIP-L/336)."""
        mt = cfg.get("model_type", "clip_vision_model")
        if mt not in VISION_MODELS:
            raise CheckpointError(
                f"{where}: vision model_type {mt!r} is not supported (supported: {', '.join(VISION_MODELS)})"
            )
        c = {**_VISION_DEFAULTS[mt], **(defaults or {}), **{k: v for k, v in cfg.items() if v is not None}}
        hidden, heads = config_int(c, "hidden_size", where), config_int(c, "num_attention_heads", where)
        if hidden % heads:
            raise CheckpointError(
                f"{where}: vision hidden_size {hidden} is not a multiple of its num_attention_heads {heads}"
            )
        # A ragged edge (SigLIP-so400m: 384 px, 14-px patches) is dropped, as the strided convolution does.
        image, patch = config_int(c, "image_size", where), config_int(c, "patch_size", where)
        if patch > image:
            raise CheckpointError(f"{where}: vision patch_size {patch} is larger than its image_size {image}")
        return cls(
            model_type=mt,
            hidden_size=hidden,
            intermediate_size=config_int(c, "intermediate_size", where),
            num_layers=config_int(c, "num_hidden_layers", where),
            num_heads=heads,
            num_channels=config_int(c, "num_channels", where),
            image_size=image,
            patch_size=patch,
            hidden_act=c["hidden_act"],
            layer_norm_eps=config_float(c, "layer_norm_eps", where),
        )


class VisionTower:
    """Patch embedding, (CLIP) pre-LayerNorm, pre-norm encoder layers; returns selected hidden states.

    `hidden_states[0]` is the (pre-normed) embedding output and `hidden_states[i]` the output of layer i,
    as in transformers; only the layers up to the deepest requested one are loaded and run. The LLaVA
    families select hidden states; families that take the tower's `last_hidden_state` (Gemma 3,
    Idefics3: SigLIP's post-LayerNorm applied to the last layer) pass `post_layernorm=True`.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        config: VisionConfig,
        ops,
        feature_layers: list[int],
        prefix: str = "model.vision_tower.",
        post_layernorm: bool = False,
    ):
        c = config
        self.ops, self.cfg = ops, c
        n_hidden = c.num_layers + 1
        self.feature_layers = [
            i % n_hidden if -n_hidden <= i < n_hidden else _bad_layer(i, c.num_layers) for i in feature_layers
        ]
        e, p = c.hidden_size, c.patch_size
        n_pos = c.num_patches + c.has_class_token
        w = ckpt.tensor
        self.patch_weight = w(prefix + "embeddings.patch_embedding.weight", (e, c.num_channels, p, p))
        self.patch_bias = None if c.has_class_token else w(prefix + "embeddings.patch_embedding.bias", (e,))
        self.class_embedding = w(prefix + "embeddings.class_embedding", (e,)) if c.has_class_token else None
        self.position_embedding = w(prefix + "embeddings.position_embedding.weight", (n_pos, e))
        self.pre_ln = (
            (w(prefix + "pre_layrnorm.weight", (e,)), w(prefix + "pre_layrnorm.bias", (e,)))
            if c.has_class_token
            else None
        )
        self.post_ln = (
            (w(prefix + "post_layernorm.weight", (e,)), w(prefix + "post_layernorm.bias", (e,)))
            if post_layernorm
            else None
        )
        self.num_heads, self.head_dim = c.num_heads, e // c.num_heads
        self.act = activation(c.hidden_act)
        self.layers = []
        for i in range(max(self.feature_layers)):
            lp = f"{prefix}encoder.layers.{i}."

            def wb(n, o, k, lp=lp):  # (weight, bias) of a Linear (k = in features) or a LayerNorm (k = 0)
                return w(lp + n + ".weight", (o, k) if k else (o,)), w(lp + n + ".bias", (o,))

            # q/k/v fused into one matmul.
            q, k, v = wb("self_attn.q_proj", e, e), wb("self_attn.k_proj", e, e), wb("self_attn.v_proj", e, e)
            self.layers.append(
                dict(
                    ln1=wb("layer_norm1", e, 0),
                    ln2=wb("layer_norm2", e, 0),
                    qkv=(torch.cat([q[0], k[0], v[0]]), torch.cat([q[1], k[1], v[1]])),
                    out=wb("self_attn.out_proj", e, e),
                    fc1=wb("mlp.fc1", c.intermediate_size, e),
                    fc2=wb("mlp.fc2", e, c.intermediate_size),
                )
            )

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """`[N, 3, S, S]` pixels -> hidden states `[N, tokens, E]` of each requested feature layer
        (tokens: the patches, after CLIP's class token)."""
        s = self.cfg.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (self.cfg.num_channels, s, s):
            raise ValueError(
                f"pixels must be [N, {self.cfg.num_channels}, {s}, {s}] (the tower's size), got {list(pixels.shape)}"
            )
        eps, (n_img, e) = self.cfg.layer_norm_eps, (pixels.shape[0], self.cfg.hidden_size)
        dtype = self.patch_weight.dtype
        x = self.ops.patch_embed(
            pixels.to(self.patch_weight.device, dtype),
            self.patch_weight,
            self.patch_bias,
            self.class_embedding,
            self.position_embedding,
        )
        if self.pre_ln is not None:
            x = F.layer_norm(x, (e,), *self.pre_ln, eps)
        states = [x]
        for layer in self.layers:
            h = F.layer_norm(x, (e,), *layer["ln1"], eps)
            q, k, v = F.linear(h, *layer["qkv"]).view(n_img, -1, 3, self.num_heads, self.head_dim).unbind(2)
            a = self.ops.vision_attention(q, k, v, self.head_dim**-0.5)
            x = x + F.linear(a.reshape(n_img, -1, e), *layer["out"])
            h = F.layer_norm(x, (e,), *layer["ln2"], eps)
            x = x + F.linear(self.act(F.linear(h, *layer["fc1"])), *layer["fc2"])
            states.append(x)
        if self.post_ln is not None:  # last_hidden_state: the final layer's output, post-normed
            states[-1] = F.layer_norm(states[-1], (e,), *self.post_ln, eps)
        return [states[i] for i in self.feature_layers]


def _bad_layer(i: int, n: int) -> int:
    raise CheckpointError(f"vision_feature_layer {i} is out of range for a {n}-layer vision tower")
