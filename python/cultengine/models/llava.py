"""LLaVA: CLIP vision tower -> 2-layer projector -> image embeddings spliced into the decoder's input."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checkpoint import Checkpoint
from ..ops import AttentionMetadata
from .clip import ClipVisionTower, activation
from .decoder import Decoder


class LlavaModel:
    def __init__(self, ckpt: Checkpoint, ops, max_positions: int | None = None):
        self.ops, self.ckpt = ops, ckpt
        layers = ckpt.vision_feature_layer
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        self.keep_cls = ckpt.vision_feature_select_strategy == "full"
        self.vision = ClipVisionTower(ckpt, ops, self.feature_layers)
        self.language_model = Decoder(ckpt, ops, max_positions=max_positions)
        v, h = ckpt.vision.hidden_size * len(self.feature_layers), ckpt.text.hidden_size
        p, bias = "model.multi_modal_projector.", ckpt.projector_bias
        self.proj1 = (ckpt.tensor(p + "linear_1.weight", (h, v)),
                      ckpt.tensor(p + "linear_1.bias", (h,)) if bias else None)
        self.proj2 = (ckpt.tensor(p + "linear_2.weight", (h, h)),
                      ckpt.tensor(p + "linear_2.bias", (h,)) if bias else None)
        self.proj_act = activation(ckpt.projector_hidden_act)
        self.image_token_id = ckpt.image_token_id
        self.image_size = ckpt.vision.image_size
        self.tokens_per_image = (ckpt.vision.image_size // ckpt.vision.patch_size) ** 2 + int(self.keep_cls)
        self.vocab_size = ckpt.text.vocab_size
        self.hidden_size = h
        self.num_layers = ckpt.text.num_layers
        self.num_kv_heads = ckpt.text.num_kv_heads
        self.head_dim = ckpt.text.head_dim
        self.dtype = self.language_model.dtype
        self.device = ckpt.device

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels `[N, 3, S, S]` -> image embeddings `[N, tokens_per_image, H]`."""
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            s = self.image_size
            raise ValueError(f"pixels must be [N, 3, {s}, {s}] (the tower's size), got {list(pixels.shape)}")
        states = self.vision.forward(pixels)
        if not self.keep_cls:  # "default" strategy: the CLS token is not an image token
            states = [s[:, 1:] for s in states]
        x = torch.cat(states, dim=-1) if len(states) > 1 else states[0]
        return F.linear(self.proj_act(F.linear(x, *self.proj1)), *self.proj2)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Placeholder ids may lie beyond the text vocabulary; their rows are overwritten anyway.
        if self.image_token_id >= self.vocab_size:
            input_ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        return self.language_model.embed(input_ids)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                image_rows: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Packed step: `input_ids [T]` -> hidden `[T, H]`.

        Rows `image_rows [R]` (int64 indices into T) take `image_embeds [R, H]` instead of their embedding.
        """
        x = self.embed(input_ids)
        if image_rows is not None and image_rows.numel():
            x = x.index_copy(0, image_rows, image_embeds.to(x.dtype))
        return self.language_model.forward(x, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[N, H]` hidden rows -> fp32 logits `[N, vocab]`."""
        return self.language_model.compute_logits(hidden)

    def allocate_kv_caches(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None):
        return self.language_model.allocate_kv_caches(num_blocks, block_size, dtype)
