"""Llama / Qwen2 / Mistral / Qwen3 decoder over a packed batch with a paged KV cache.

The four differ only in config: Qwen2 has q/k/v biases, Mistral may set head_dim explicitly, Qwen3
RMS-normalises each query and key head before RoPE (`q_norm`, `k_norm`); all use RMSNorm, rotate-half
RoPE (or Qwen2-VL's multimodal M-RoPE, `mrope_rows`), grouped-query attention and a SwiGLU MLP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .. import ops as ops_module
from ..attention_metadata import AttentionMetadata
from ..checkpoint import Checkpoint
from ..errors import CheckpointError, config_float, config_int
from .vision import activation

LayerHook = Callable[[int, torch.Tensor], torch.Tensor]  # (layer index, its output) -> its output, amended

TEXT_MODELS = ("llama", "qwen2", "mistral", "qwen3")
# transformers' config defaults for the fields a Hub config.json may leave out (real checkpoints
# often give only the fields that differ from these).
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=False,
    ),
    "mistral": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096 * 32,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=False,
    ),
    "qwen3": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        attention_bias=False,
        hidden_act="silu",
        tie_word_embeddings=False,
    ),
}
# RoPE tables are [max_positions, head_dim / 2] fp32 cos and sin: refuse sizes that cannot be allocated.
MAX_ROPE_POSITIONS = 1 << 24


@dataclass
class TextConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2 always)
    o_bias: bool
    mlp_bias: bool
    hidden_act: str
    sliding_window: int | None
    tie_word_embeddings: bool
    qk_norm: bool = False  # Qwen3: RMSNorm over each query and key head (head_dim) before RoPE
    windowed_layers: tuple[int, ...] = ()  # the layers that attend over the last `sliding_window` keys only

    def window(self, layer: int) -> int | None:
        """Layer `layer`'s sliding window, None where it attends over every key."""
        return self.sliding_window if layer in self.windowed_layers else None

    @classmethod
    def parse(cls, cfg: dict, where: str, tie_word_embeddings: bool | None = None) -> TextConfig:
        """A decoder's config (a VLM's `text_config`), transformers 4 or 5 layout, every field checked."""
        mt = cfg.get("model_type", "llama")
        if mt not in TEXT_MODELS:
            raise CheckpointError(
                f"{where}: text model_type {mt!r} is not supported (supported: {', '.join(TEXT_MODELS)})"
            )
        c = {**_TEXT_DEFAULTS[mt], **{k: v for k, v in cfg.items() if v is not None}}
        heads = config_int(c, "num_attention_heads", where)
        kv_heads = config_int(
            {**c, "num_key_value_heads": c.get("num_key_value_heads") or heads}, "num_key_value_heads", where
        )
        if heads % kv_heads:
            raise CheckpointError(
                f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        hidden = config_int(c, "hidden_size", where)
        head_dim = config_int({"head_dim": c.get("head_dim") or hidden // heads}, "head_dim", where)
        max_pos = config_int(c, "max_position_embeddings", where)
        theta, scaling = _rope(c, where)
        # Qwen configs carry a sliding_window that only `use_sliding_window` turns on.
        sliding = c.get("sliding_window") if (mt not in ("qwen2", "qwen3") or c.get("use_sliding_window")) else None
        tie = c.get("tie_word_embeddings") if tie_word_embeddings is None else tie_word_embeddings
        num_layers = config_int(c, "num_hidden_layers", where)
        return cls(
            model_type=mt,
            vocab_size=config_int(c, "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=config_int(c, "intermediate_size", where),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=config_float(c, "rms_norm_eps", where),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            attention_bias=True if mt == "qwen2" else bool(c.get("attention_bias", False)),
            o_bias=False if mt == "qwen2" else bool(c.get("attention_bias", False)),
            mlp_bias=bool(c.get("mlp_bias", False)),
            hidden_act=c["hidden_act"],
            sliding_window=config_int(c, "sliding_window", where) if sliding is not None else None,
            tie_word_embeddings=bool(tie),
            qk_norm=mt == "qwen3",
            windowed_layers=_windowed_layers(c, mt, num_layers) if sliding else (),
        )


def _windowed_layers(cfg: dict, model_type: str, num_layers: int) -> tuple[int, ...]:
    # transformers 5 lists `layer_types`; before it, Qwen2 and Qwen3 windowed the layers from
    # `max_window_layers` on, and Mistral every layer.
    if cfg.get("layer_types"):
        return tuple(i for i, kind in enumerate(cfg["layer_types"]) if kind == "sliding_attention")
    first = int(cfg.get("max_window_layers", 28)) if model_type in ("qwen2", "qwen3") else 0  # their default
    return tuple(range(first, num_layers))


def _rope(cfg: dict, where: str) -> tuple[float, dict | None]:
    # transformers 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
    params = cfg.get("rope_parameters") or {}
    theta = config_float({"rope_theta": params.get("rope_theta", cfg.get("rope_theta", 10000.0))}, "rope_theta", where)
    scaling = cfg.get("rope_scaling") or (params if params else None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "linear"):
            raise CheckpointError(f"{where}: RoPE scaling {kind!r} is not supported (only default, linear)")
        if kind == "default":
            scaling = None
        else:
            config_float(scaling, "factor", where)
    return theta, scaling


def tied_embeddings(config: dict) -> bool:
    """Whether a VLM's config ties the decoder's lm_head to its embeddings: the top level's setting where it has
    one (transformers follows it over text_config's: a top-level false with a text_config true is untied),
    else text_config's."""
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    return bool((config.get("text_config") or {}).get("tie_word_embeddings"))


class Decoder:
    """The decoder stack. `mrope_rows` (one position stream per rotary frequency, `[head_dim // 2]`) makes
    its RoPE multimodal: `forward` then takes `[3, T]` positions (Qwen2-VL and successors)."""

    def __init__(
        self,
        ckpt: Checkpoint,
        text: TextConfig,
        ops,
        prefix: str = "model.language_model.",
        max_positions: int | None = None,
        mrope_rows: list[int] | None = None,
    ):
        c = text
        self.ops, self.cfg = ops, c
        h, hd, nq, nkv = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads
        self.q_size, self.kv_size, self.scale = nq * hd, nkv * hd, hd**-0.5
        w = ckpt.tensor
        self.embed_tokens = w(prefix + "embed_tokens.weight", (c.vocab_size, h))
        if c.tie_word_embeddings:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = w("lm_head.weight", (c.vocab_size, h))
        self.norm = w(prefix + "norm.weight", (h,))
        self.act = activation(c.hidden_act)
        self.layers = []
        for i in range(c.num_layers):
            lp = f"{prefix}layers.{i}."
            qkv = [
                w(f"{lp}self_attn.{n}_proj.weight", (o, h))
                for n, o in (("q", self.q_size), ("k", self.kv_size), ("v", self.kv_size))
            ]
            qkv_b = (
                [
                    w(f"{lp}self_attn.{n}_proj.bias", (o,))
                    for n, o in (("q", self.q_size), ("k", self.kv_size), ("v", self.kv_size))
                ]
                if c.attention_bias
                else None
            )
            mlp_b = c.mlp_bias
            self.layers.append(
                dict(
                    input_norm=w(lp + "input_layernorm.weight", (h,)),
                    post_norm=w(lp + "post_attention_layernorm.weight", (h,)),
                    # q/k/v and gate/up fused: one matmul each instead of three and two.
                    qkv=torch.cat(qkv),
                    qkv_bias=torch.cat(qkv_b) if qkv_b else None,
                    o=w(lp + "self_attn.o_proj.weight", (h, self.q_size)),
                    o_bias=w(lp + "self_attn.o_proj.bias", (h,)) if c.o_bias else None,
                    gate_up=torch.cat(
                        [
                            w(lp + "mlp.gate_proj.weight", (c.intermediate_size, h)),
                            w(lp + "mlp.up_proj.weight", (c.intermediate_size, h)),
                        ]
                    ),
                    gate_up_bias=(
                        torch.cat(
                            [
                                w(lp + "mlp.gate_proj.bias", (c.intermediate_size,)),
                                w(lp + "mlp.up_proj.bias", (c.intermediate_size,)),
                            ]
                        )
                        if mlp_b
                        else None
                    ),
                    down=w(lp + "mlp.down_proj.weight", (h, c.intermediate_size)),
                    down_bias=w(lp + "mlp.down_proj.bias", (h,)) if mlp_b else None,
                    q_norm=w(lp + "self_attn.q_norm.weight", (hd,)) if c.qk_norm else None,
                    k_norm=w(lp + "self_attn.k_norm.weight", (hd,)) if c.qk_norm else None,
                )
            )
        # RoPE tables are built once, in fp32, for every position the model may see.
        positions = max_positions or c.max_position_embeddings
        if positions > MAX_ROPE_POSITIONS:
            raise CheckpointError(
                f"config.json: max_position_embeddings {positions} is too large to allocate "
                f"RoPE tables for (limit {MAX_ROPE_POSITIONS}); pass a smaller max_model_len"
            )
        self.cos, self.sin = ops_module.rotary_cos_sin(hd, positions, c.rope_theta, ckpt.device, c.rope_scaling)
        if mrope_rows is not None and len(mrope_rows) != hd // 2:
            raise CheckpointError(
                f"config.json: mrope_section covers {len(mrope_rows)} rotary frequencies, "
                f"but head_dim {hd} has {hd // 2}"
            )
        self.mrope_rows = (
            None if mrope_rows is None else torch.tensor(mrope_rows, dtype=torch.int64, device=ckpt.device)
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
        return (num_blocks, block_size, self.cfg.num_kv_heads, self.cfg.head_dim)

    def allocate_kv_caches(
        self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = self.kv_cache_shape(num_blocks, block_size)
        kw = dict(dtype=dtype or self.dtype, device=self.embed_tokens.device)
        return [(torch.zeros(shape, **kw), torch.zeros(shape, **kw)) for _ in self.layers]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_tokens)

    def rotary_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions, cos, sin) for `ops.rotary_write_kv`: the shared tables, or for M-RoPE each token's own
        (its frequencies turned by their position streams) at positions 0..T-1."""
        if self.mrope_rows is None:
            return positions, self.cos, self.sin
        cos, sin = ops_module.mrope_cos_sin(positions, self.cos, self.sin, self.mrope_rows)
        return torch.arange(positions.shape[1], device=positions.device), cos, sin

    @torch.inference_mode()
    def forward(
        self,
        input_embeds: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        after_layer: LayerHook | None = None,
    ) -> torch.Tensor:
        """Packed `[T, H]` embeddings -> final-normed hidden states `[T, H]`; writes this step's KV.

        `positions` is `[T]`, or `[3, T]` with M-RoPE. `after_layer(i, x)`, when given, returns layer i's
        output with what a family adds there (Qwen3-VL's DeepStack features); the output is `x + residual`,
        so adding to `x` adds to it.
        """
        ops, c, t = self.ops, self.cfg, input_embeds.shape[0]
        rope_positions, cos, sin = self.rotary_tables(positions)
        x, residual = input_embeds, None
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches, strict=True)):
            h, residual = ops.rms_norm(x, layer["input_norm"], c.rms_norm_eps, residual)
            qkv = F.linear(h, layer["qkv"], layer["qkv_bias"])
            q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
            q = q.view(t, c.num_heads, c.head_dim)
            k = k.view(t, c.num_kv_heads, c.head_dim)
            v = v.view(t, c.num_kv_heads, c.head_dim)
            if c.qk_norm:
                q = ops.rms_norm(q, layer["q_norm"], c.rms_norm_eps)[0]
                k = ops.rms_norm(k, layer["k_norm"], c.rms_norm_eps)[0]
            q = ops.rotary_write_kv(q, k, v, rope_positions, cos, sin, k_cache, v_cache, meta.slot_mapping)
            a = ops.paged_attention(q, k_cache, v_cache, meta, self.scale, c.window(i))
            x = F.linear(a.reshape(t, self.q_size), layer["o"], layer["o_bias"])
            h, residual = ops.rms_norm(x, layer["post_norm"], c.rms_norm_eps, residual)
            gate, up = F.linear(h, layer["gate_up"], layer["gate_up_bias"]).chunk(2, dim=-1)
            x = F.linear(self.act(gate) * up, layer["down"], layer["down_bias"])
            if after_layer is not None:
                x = after_layer(i, x)
        return ops.rms_norm(x, self.norm, c.rms_norm_eps, residual)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[N, H]` hidden rows -> fp32 logits `[N, vocab]`."""
        return F.linear(hidden, self.lm_head).float()


class SplicedDecoder:
    """A decoder whose input embeddings take image embeddings at the rows the runner names: the device
    side of every VLM family bar its tower (families add `encode_images`), and of text-only ones
    (`image_token_id` None)."""

    def __init__(self, language_model, text: TextConfig, image_token_id: int | None):
        self.language_model = language_model
        self.image_token_id = image_token_id
        self.vocab_size = text.vocab_size
        self.hidden_size = text.hidden_size
        self.num_layers = text.num_layers
        self.num_heads, self.num_kv_heads = text.num_heads, text.num_kv_heads
        self.head_dim = text.head_dim
        self.dtype = language_model.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Placeholder ids may lie beyond the text vocabulary; their rows are overwritten anyway.
        if self.image_token_id is not None and self.image_token_id >= self.vocab_size:
            input_ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        return self.language_model.embed(input_ids)

    def encode_images(self, images: list) -> list[torch.Tensor]:
        raise ValueError("a text-only model encodes no images")

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        image_rows: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed step: `input_ids [T]` -> hidden `[T, H]`.

        Rows `image_rows [R]` (int64 indices into T) take `image_embeds [R, H]` instead of their embedding.
        """
        x = self.embed(input_ids)
        hook = None
        if image_rows is not None and image_rows.numel():
            x, hook = self.splice(x, image_rows, image_embeds)
        return self.language_model.forward(x, positions, kv_caches, meta, after_layer=hook)

    def splice(
        self, x: torch.Tensor, image_rows: torch.Tensor, image_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, LayerHook | None]:
        """The step's embeddings with the image rows replaced, and a per-layer hook for the decoder (None:
        the images enter at the input only)."""
        return x.index_copy(0, image_rows, image_embeds.to(x.dtype)), None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[N, H]` hidden rows -> fp32 logits `[N, vocab]`."""
        return self.language_model.compute_logits(hidden)

    def allocate_kv_caches(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None):
        return self.language_model.allocate_kv_caches(num_blocks, block_size, dtype)
