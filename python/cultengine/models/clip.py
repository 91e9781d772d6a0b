"""CLIP vision transformer (the LLaVA vision tower), inference only, weights as plain tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checkpoint import Checkpoint, CheckpointError

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


class ClipVisionTower:
    """Patch embedding, pre-LayerNorm, pre-norm encoder layers; returns selected hidden states.

    `hidden_states[0]` is the (pre-normed) embedding output and `hidden_states[i]` the output of layer i,
    as in transformers; only the layers up to the deepest requested one are loaded and run.
    """

    def __init__(self, ckpt: Checkpoint, ops, feature_layers: list[int], prefix: str = "model.vision_tower."):
        c = ckpt.vision
        self.ops, self.cfg = ops, c
        n_hidden = c.num_layers + 1
        self.feature_layers = [i % n_hidden if -n_hidden <= i < n_hidden else _bad_layer(i, c.num_layers)
                               for i in feature_layers]
        e, p, n_pos = c.hidden_size, c.patch_size, (c.image_size // c.patch_size) ** 2 + 1
        w = ckpt.tensor
        self.patch_weight = w(prefix + "embeddings.patch_embedding.weight", (e, c.num_channels, p, p))
        self.class_embedding = w(prefix + "embeddings.class_embedding", (e,))
        self.position_embedding = w(prefix + "embeddings.position_embedding.weight", (n_pos, e))
        self.pre_ln = (w(prefix + "pre_layrnorm.weight", (e,)), w(prefix + "pre_layrnorm.bias", (e,)))
        self.num_heads, self.head_dim = c.num_heads, e // c.num_heads
        self.act = activation(c.hidden_act)
        self.layers = []
        for i in range(max(self.feature_layers)):
            lp = f"{prefix}encoder.layers.{i}."

            def wb(n, o, k, lp=lp):  # (weight, bias) of a Linear (k = in features) or a LayerNorm (k = 0)
                return w(lp + n + ".weight", (o, k) if k else (o,)), w(lp + n + ".bias", (o,))

            # q/k/v fused into one matmul.
            q, k, v = wb("self_attn.q_proj", e, e), wb("self_attn.k_proj", e, e), wb("self_attn.v_proj", e, e)
            self.layers.append(dict(
                ln1=wb("layer_norm1", e, 0), ln2=wb("layer_norm2", e, 0),
                qkv=(torch.cat([q[0], k[0], v[0]]), torch.cat([q[1], k[1], v[1]])),
                out=wb("self_attn.out_proj", e, e),
                fc1=wb("mlp.fc1", c.intermediate_size, e), fc2=wb("mlp.fc2", e, c.intermediate_size)))

    def image_size(self) -> int:
        return self.cfg.image_size

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """`[N, 3, H, W]` pixels -> hidden states `[N, 1 + patches, E]` of each requested feature layer."""
        eps, (n_img, e) = self.cfg.layer_norm_eps, (pixels.shape[0], self.cfg.hidden_size)
        dtype = self.patch_weight.dtype
        x = self.ops.patch_embed(pixels.to(self.patch_weight.device, dtype), self.patch_weight,
                                 self.class_embedding, self.position_embedding)
        x = F.layer_norm(x, (e,), *self.pre_ln, eps)
        states = [x]
        for layer in self.layers:
            h = F.layer_norm(x, (e,), *layer["ln1"], eps)
            q, k, v = F.linear(h, *layer["qkv"]).view(n_img, -1, 3, self.num_heads, self.head_dim).unbind(2)
            a = self.ops.vision_attention(q, k, v, self.head_dim ** -0.5)
            x = x + F.linear(a.reshape(n_img, -1, e), *layer["out"])
            h = F.layer_norm(x, (e,), *layer["ln2"], eps)
            x = x + F.linear(self.act(F.linear(h, *layer["fc1"])), *layer["fc2"])
            states.append(x)
        return [states[i] for i in self.feature_layers]


def _bad_layer(i: int, n: int) -> int:
    raise CheckpointError(f"vision_feature_layer {i} is out of range for a {n}-layer vision tower")
