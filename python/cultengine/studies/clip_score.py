"""CLIP embeddings for CLIPScore and cross-modal retrieval, from a Hugging Face `CLIPModel` checkpoint
(`config.json` with `text_config`/`vision_config`, `*.safetensors`, `tokenizer.json`,
`preprocessor_config.json`).

The image side reuses the engine's checkpoint loader, vision tower (`cultengine.models.vision.VisionTower`)
and image preprocessing; this module adds the small text tower (token + position embeddings, causal pre-norm
encoder layers, final LayerNorm, pooled at the end-of-text token) and both projections.
CLIPScore itself is `stats.clip_score`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import load_checkpoint
from ..errors import CheckpointError
from ..image import ClipImageProcessor
from ..models.vision import VisionConfig, VisionTower, activation
from ..ops import Ops, resolve_backend

# transformers' CLIPTextConfig defaults, for fields a saved config leaves out.
_TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


class ClipModel:
    """`encode_text(texts)` / `encode_images(images)` -> L2-normalised embeddings (numpy float32)."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from .. import _core

        path = Path(path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: config.json not found (a CLIPModel checkpoint directory is needed)")
        w = load_checkpoint(path, dtype="float32", device=device)
        cfg = w.config
        if w.architecture not in ("CLIPModel", "clip"):
            raise CheckpointError(f"{path / 'config.json'}: architecture {w.architecture!r} is not a CLIPModel")
        self.device = torch.device(device)
        t = {**_TEXT_DEFAULTS, **{k: v for k, v in (cfg.get("text_config") or {}).items() if v is not None}}
        vision = VisionConfig.parse(
            {"model_type": "clip_vision_model", **(cfg.get("vision_config") or {})}, str(path / "config.json")
        )
        self.vision_tower = VisionTower(
            w, vision, Ops(resolve_backend(self.device, None)), [-1], prefix="vision_model."
        )
        e = vision.hidden_size
        self.post_ln = (
            w.tensor("vision_model.post_layernorm.weight", (e,)),
            w.tensor("vision_model.post_layernorm.bias", (e,)),
        )
        self.vision_eps = vision.layer_norm_eps
        self.visual_projection = w.tensor("visual_projection.weight")
        self.processor = ClipImageProcessor.from_pretrained(path)

        self.tokenizer = _core.Tokenizer.from_file(str(path / "tokenizer.json"))
        self.max_len = int(t["max_position_embeddings"])
        self.eos_id = self.tokenizer.token_to_id("<|endoftext|>")
        self.text_eps, self.num_heads = float(t["layer_norm_eps"]), int(t["num_attention_heads"])
        self.text_act = activation(t["hidden_act"])
        d = int(t["hidden_size"])
        p = "text_model."
        self.token_embedding = w.tensor(p + "embeddings.token_embedding.weight")
        self.position_embedding = w.tensor(p + "embeddings.position_embedding.weight", (self.max_len, d))
        wb = lambda n: (w.tensor(n + ".weight"), w.tensor(n + ".bias"))  # noqa: E731
        self.text_layers = []
        for i in range(int(t["num_hidden_layers"])):
            lp = f"{p}encoder.layers.{i}."
            self.text_layers.append(
                {
                    n: wb(lp + n)
                    for n in (
                        "layer_norm1",
                        "layer_norm2",
                        "self_attn.q_proj",
                        "self_attn.k_proj",
                        "self_attn.v_proj",
                        "self_attn.out_proj",
                        "mlp.fc1",
                        "mlp.fc2",
                    )
                }
            )
        self.final_ln = wb(p + "final_layer_norm")
        self.text_projection = w.tensor("text_projection.weight")

    # ------------------------------------------------------------------ text
    def tokenize(self, text: str) -> list[int]:
        """Token ids with start/end tokens, truncated to the context so they still end in end-of-text."""
        ids = list(self.tokenizer.encode(text, True))
        if len(ids) > self.max_len:
            ids = ids[: self.max_len - 1] + [ids[-1]]
        return ids

    @torch.inference_mode()
    def text_features(self, ids: list[list[int]]) -> torch.Tensor:
        """Projected (not normalised) text embeddings of token-id lists (right-padded; the causal mask
        keeps padding out of the end-of-text position, where each sequence is pooled)."""
        lens = torch.tensor([len(x) for x in ids])
        n, L = len(ids), int(lens.max())
        tok = torch.zeros((n, L), dtype=torch.long)
        for i, x in enumerate(ids):
            tok[i, : len(x)] = torch.tensor(x)
        x = self.token_embedding[tok.to(self.device)] + self.position_embedding[:L]
        d = x.shape[-1]
        hd = d // self.num_heads
        for layer in self.text_layers:
            h = F.layer_norm(x, (d,), *layer["layer_norm1"], self.text_eps)
            q, k, v = (
                F.linear(h, *layer[f"self_attn.{m}_proj"]).view(n, L, self.num_heads, hd).transpose(1, 2) for m in "qkv"
            )
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, L, d)
            x = x + F.linear(a, *layer["self_attn.out_proj"])
            h = F.layer_norm(x, (d,), *layer["layer_norm2"], self.text_eps)
            x = x + F.linear(self.text_act(F.linear(h, *layer["mlp.fc1"])), *layer["mlp.fc2"])
        x = F.layer_norm(x, (d,), *self.final_ln, self.text_eps)
        pooled = x[torch.arange(n), (lens - 1).to(self.device)]
        return pooled @ self.text_projection.T

    def encode_text(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = [
            self.text_features([self.tokenize(t) for t in texts[i : i + batch_size]])
            for i in range(0, len(texts), batch_size)
        ]
        return _unit(torch.cat(out)) if out else np.zeros((0, self.text_projection.shape[0]), np.float32)

    # ------------------------------------------------------------------ images
    @torch.inference_mode()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        (last,) = self.vision_tower.forward(pixels)
        e = last.shape[-1]
        pooled = F.layer_norm(last[:, 0].float(), (e,), *self.post_ln, self.vision_eps)
        return pooled @ self.visual_projection.T

    def encode_images(self, images: list, batch_size: int = 32) -> np.ndarray:
        out = [
            self.image_features(torch.stack(self.processor.preprocess(images[i : i + batch_size])))
            for i in range(0, len(images), batch_size)
        ]
        return _unit(torch.cat(out)) if out else np.zeros((0, self.visual_projection.shape[0]), np.float32)


def _unit(x: torch.Tensor) -> np.ndarray:
    return F.normalize(x.float(), dim=-1).cpu().numpy()
