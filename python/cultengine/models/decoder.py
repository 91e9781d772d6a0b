"""Llama / Qwen2 / Mistral decoder over a packed batch with a paged KV cache.

The three differ only in config: Qwen2 has q/k/v biases, Mistral may set head_dim explicitly,
all use RMSNorm, rotate-half RoPE, grouped-query attention and a SwiGLU MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops as ops_module
from ..checkpoint import Checkpoint
from ..ops import AttentionMetadata
from .clip import activation


class Decoder:
    def __init__(self, ckpt: Checkpoint, ops, prefix: str = "model.language_model.",
                 max_positions: int | None = None):
        c = ckpt.text
        self.ops, self.cfg = ops, c
        h, hd, nq, nkv = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads
        self.q_size, self.kv_size, self.scale = nq * hd, nkv * hd, hd ** -0.5
        w = ckpt.tensor
        self.embed_tokens = w(prefix + "embed_tokens.weight", (c.vocab_size, h))
        if ckpt.tie_word_embeddings:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = w("lm_head.weight", (c.vocab_size, h))
        self.norm = w(prefix + "norm.weight", (h,))
        self.act = activation(c.hidden_act)
        self.layers = []
        for i in range(c.num_layers):
            lp = f"{prefix}layers.{i}."
            qkv = [w(f"{lp}self_attn.{n}_proj.weight", (o, h))
                   for n, o in (("q", self.q_size), ("k", self.kv_size), ("v", self.kv_size))]
            qkv_b = ([w(f"{lp}self_attn.{n}_proj.bias", (o,))
                      for n, o in (("q", self.q_size), ("k", self.kv_size), ("v", self.kv_size))]
                     if c.attention_bias else None)
            mlp_b = c.mlp_bias
            self.layers.append(dict(
                input_norm=w(lp + "input_layernorm.weight", (h,)),
                post_norm=w(lp + "post_attention_layernorm.weight", (h,)),
                # q/k/v and gate/up fused: one matmul each instead of three and two.
                qkv=torch.cat(qkv), qkv_bias=torch.cat(qkv_b) if qkv_b else None,
                o=w(lp + "self_attn.o_proj.weight", (h, self.q_size)),
                o_bias=w(lp + "self_attn.o_proj.bias", (h,)) if c.o_bias else None,
                gate_up=torch.cat([w(lp + "mlp.gate_proj.weight", (c.intermediate_size, h)),
                                   w(lp + "mlp.up_proj.weight", (c.intermediate_size, h))]),
                gate_up_bias=(torch.cat([w(lp + "mlp.gate_proj.bias", (c.intermediate_size,)),
                                         w(lp + "mlp.up_proj.bias", (c.intermediate_size,))])
                              if mlp_b else None),
                down=w(lp + "mlp.down_proj.weight", (h, c.intermediate_size)),
                down_bias=w(lp + "mlp.down_proj.bias", (h,)) if mlp_b else None))
        # RoPE tables are built once, in fp32, for every position the model may see.
        self.cos, self.sin = ops_module.rotary_cos_sin(hd, max_positions or c.max_position_embeddings,
                                                       c.rope_theta, ckpt.device, c.rope_scaling)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
        return (num_blocks, block_size, self.cfg.num_kv_heads, self.cfg.head_dim)

    def allocate_kv_caches(self, num_blocks: int, block_size: int,
                           dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = self.kv_cache_shape(num_blocks, block_size)
        kw = dict(dtype=dtype or self.dtype, device=self.embed_tokens.device)
        return [(torch.zeros(shape, **kw), torch.zeros(shape, **kw)) for _ in self.layers]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_tokens)

    @torch.inference_mode()
    def forward(self, input_embeds: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        """Packed `[T, H]` embeddings -> final-normed hidden states `[T, H]`; writes this step's KV."""
        ops, c, t = self.ops, self.cfg, input_embeds.shape[0]
        x, residual = input_embeds, None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            h, residual = ops.rms_norm(x, layer["input_norm"], c.rms_norm_eps, residual)
            qkv = F.linear(h, layer["qkv"], layer["qkv_bias"])
            q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
            q = q.view(t, c.num_heads, c.head_dim)
            k = k.view(t, c.num_kv_heads, c.head_dim)
            q, k = ops.rotary_embedding(q, k, positions, self.cos, self.sin)
            ops.write_kv(k, v.view(t, c.num_kv_heads, c.head_dim), k_cache, v_cache, meta.slot_mapping)
            a = ops.paged_attention(q, k_cache, v_cache, meta, self.scale)
            x = F.linear(a.reshape(t, self.q_size), layer["o"], layer["o_bias"])
            h, residual = ops.rms_norm(x, layer["post_norm"], c.rms_norm_eps, residual)
            gate, up = F.linear(h, layer["gate_up"], layer["gate_up_bias"]).chunk(2, dim=-1)
            x = F.linear(self.act(gate) * up, layer["down"], layer["down_bias"])
        return ops.rms_norm(x, self.norm, c.rms_norm_eps, residual)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[N, H]` hidden rows -> fp32 logits `[N, vocab]`."""
        return F.linear(hidden, self.lm_head).float()
