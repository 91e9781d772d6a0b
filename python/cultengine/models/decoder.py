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
import torch.distributed as dist
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


RotaryTables = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (positions, cos, sin) for ops.rotary_write_kv


class Decoder:
    """The decoder stack. `mrope_rows` (one position stream per rotary frequency, `[head_dim // 2]`) makes
    its RoPE multimodal: `forward` then takes `[3, T]` positions (Qwen2-VL and successors).

    A decoder that differs in its norms, layer body or RoPE (Gemma 3) subclasses this and overrides the hooks
    `norm_weight`, `layer_weights`, `build_rope`, `rotary_tables`, `layer_step` and `final_norm`; the weight
    loading of attention and MLP, the attention step itself, the KV caches and the layer loop stay here.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        text: TextConfig | Any,  # a variant passes its own config (GemmaTextConfig)
        ops,
        prefix: str = "model.language_model.",
        max_positions: int | None = None,
        mrope_rows: list[int] | None = None,
    ):
        c = text
        self.ops, self.cfg = ops, c
        h, hd = c.hidden_size, c.head_dim
        self.tensor = ckpt.tensor
        # Tensor parallelism (the checkpoint carries this rank's place): this rank's query heads, and the KV
        # heads they read (split across ranks, or replicated where there are fewer KV heads than ranks).
        self.tp = ckpt.tensor_parallel
        world, rank = (self.tp.world, self.tp.rank) if self.tp else (1, 0)
        where = str(ckpt.path / "config.json")
        if c.num_heads % world or (c.num_kv_heads % world and world % c.num_kv_heads):
            raise CheckpointError(
                f"{where}: {c.num_heads} attention heads and {c.num_kv_heads} KV heads do not split over {world} "
                "ranks (heads must divide evenly; KV heads too, or the ranks evenly among them)"
            )
        if c.intermediate_size % world:
            raise CheckpointError(f"{where}: intermediate_size {c.intermediate_size} does not split over {world} ranks")
        self.num_heads, self.num_kv_heads = c.num_heads // world, max(1, c.num_kv_heads // world)
        self.q_start = rank * self.num_heads
        self.kv_start = self.q_start // (c.num_heads // c.num_kv_heads)
        self.intermediate = c.intermediate_size // world
        self.intermediate_start = rank * self.intermediate
        self.q_size, self.kv_size, self.scale = self.num_heads * hd, self.num_kv_heads * hd, hd**-0.5
        # Vocabulary-parallel embeddings and lm_head: this rank's rows of the vocabulary (the last share shorter).
        self.vocab_share = -(-c.vocab_size // world)
        self.vocab_start = rank * self.vocab_share
        self.vocab_rows = max(0, min(self.vocab_share, c.vocab_size - self.vocab_start))
        vocab = (0, self.vocab_start, self.vocab_rows)
        self.embed_tokens = self.part(prefix + "embed_tokens.weight", (c.vocab_size, h), *vocab)
        if c.tie_word_embeddings:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = self.part("lm_head.weight", (c.vocab_size, h), *vocab)
        self.norm = self.norm_weight(prefix + "norm.weight", h)
        self.act = activation(c.hidden_act)
        self.layers = [self.layer_weights(f"{prefix}layers.{i}.", i) for i in range(c.num_layers)]
        # RoPE tables are built once, in fp32, for every position the model may see.
        positions = max_positions or c.max_position_embeddings
        if positions > MAX_ROPE_POSITIONS:
            raise CheckpointError(
                f"config.json: max_position_embeddings {positions} is too large to allocate "
                f"RoPE tables for (limit {MAX_ROPE_POSITIONS}); pass a smaller max_model_len"
            )
        self.build_rope(positions, ckpt.device, mrope_rows)

    # -- hooks a decoder variant overrides -------------------------------------------------------------

    def norm_weight(self, name: str, dim: int) -> torch.Tensor:
        return self.tensor(name, (dim,))

    def layer_weights(self, lp: str, i: int) -> dict[str, Any]:
        """Layer `i`'s weights (`lp` its name prefix) as `layer_step` reads them."""
        c = self.cfg
        return dict(
            input_norm=self.norm_weight(lp + "input_layernorm.weight", c.hidden_size),
            post_norm=self.norm_weight(lp + "post_attention_layernorm.weight", c.hidden_size),
            q_norm=self.norm_weight(lp + "self_attn.q_norm.weight", c.head_dim) if c.qk_norm else None,
            k_norm=self.norm_weight(lp + "self_attn.k_norm.weight", c.head_dim) if c.qk_norm else None,
            window=c.window(i),
            **self.attention_weights(lp, c.attention_bias, c.o_bias),
            **self.mlp_weights(lp, c.mlp_bias),
        )

    def build_rope(self, positions: int, device: torch.device, mrope_rows: list[int] | None) -> None:
        c, hd = self.cfg, self.cfg.head_dim
        self.cos, self.sin = ops_module.rotary_cos_sin(hd, positions, c.rope_theta, device, c.rope_scaling)
        if mrope_rows is not None and len(mrope_rows) != hd // 2:
            raise CheckpointError(
                f"config.json: mrope_section covers {len(mrope_rows)} rotary frequencies, "
                f"but head_dim {hd} has {hd // 2}"
            )
        self.mrope_rows = None if mrope_rows is None else torch.tensor(mrope_rows, dtype=torch.int64, device=device)

    def rotary_tables(self, positions: torch.Tensor) -> Any:
        """What `layer_step` rotates with this step: (positions, cos, sin) for `ops.rotary_write_kv`, the
        shared tables, or for M-RoPE each token's own (its frequencies turned by their position streams) at
        positions 0..T-1."""
        if self.mrope_rows is None:
            return positions, self.cos, self.sin
        cos, sin = ops_module.mrope_cos_sin(positions, self.cos, self.sin, self.mrope_rows)
        return torch.arange(positions.shape[1], device=positions.device), cos, sin

    def layer_step(
        self,
        layer: dict[str, Any],
        x: torch.Tensor,
        residual: torch.Tensor | None,
        tables: Any,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One layer, pre-norm with the residual carried beside `x` (the fused add + RMSNorm): its output is
        `x + residual`."""
        ops, c = self.ops, self.cfg
        h, residual = ops.rms_norm(x, layer["input_norm"], c.rms_norm_eps, residual)
        q, k, v = self.project_qkv(layer, h)
        if c.qk_norm:
            q = ops.rms_norm(q, layer["q_norm"], c.rms_norm_eps)[0]
            k = ops.rms_norm(k, layer["k_norm"], c.rms_norm_eps)[0]
        x = self.attend(layer, q, k, v, tables, kv_cache, meta)
        h, residual = ops.rms_norm(x, layer["post_norm"], c.rms_norm_eps, residual)
        return self.mlp(layer, h), residual

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self.ops.rms_norm(x, self.norm, self.cfg.rms_norm_eps, residual)[0]

    # -- shared pieces ---------------------------------------------------------------------------------

    def part(self, name: str, shape: tuple[int, ...], dim: int, start: int, length: int) -> torch.Tensor:
        """This rank's rows (`dim` 0) or columns (`dim` 1) `start : start + length` of a weight of `shape` (all
        of it without tensor parallelism); only those are read from the safetensors."""
        if self.tp is None:
            return self.tensor(name, shape)
        return self.tensor(name, shape, part=(dim, start, length))

    def attention_weights(self, lp: str, qkv_bias: bool, o_bias: bool) -> dict[str, Any]:
        c, h, hd = self.cfg, self.cfg.hidden_size, self.cfg.head_dim
        q_rows, kv_rows = (self.q_start * hd, self.q_size), (self.kv_start * hd, self.kv_size)
        names = (
            ("q", c.num_heads * hd, q_rows),
            ("k", c.num_kv_heads * hd, kv_rows),
            ("v", c.num_kv_heads * hd, kv_rows),
        )
        part = self.part
        return dict(
            # q/k/v fused (column-parallel: this rank's heads): one matmul instead of three.
            qkv=torch.cat([part(f"{lp}self_attn.{n}_proj.weight", (o, h), 0, *rows) for n, o, rows in names]),
            qkv_bias=(
                torch.cat([part(f"{lp}self_attn.{n}_proj.bias", (o,), 0, *rows) for n, o, rows in names])
                if qkv_bias
                else None
            ),
            o=part(lp + "self_attn.o_proj.weight", (h, c.num_heads * hd), 1, *q_rows),  # row-parallel
            o_bias=self.tensor(lp + "self_attn.o_proj.bias", (h,)) if o_bias else None,
        )

    def mlp_weights(self, lp: str, bias: bool) -> dict[str, Any]:
        h, i, part = self.cfg.hidden_size, self.cfg.intermediate_size, self.part
        rows = (self.intermediate_start, self.intermediate)
        return dict(
            # gate/up fused (column-parallel): one matmul instead of two.
            gate_up=torch.cat([part(lp + f"mlp.{n}_proj.weight", (i, h), 0, *rows) for n in ("gate", "up")]),
            gate_up_bias=(
                torch.cat([part(lp + f"mlp.{n}_proj.bias", (i,), 0, *rows) for n in ("gate", "up")]) if bias else None
            ),
            down=part(lp + "mlp.down_proj.weight", (h, i), 1, *rows),  # row-parallel
            down_bias=self.tensor(lp + "mlp.down_proj.bias", (h,)) if bias else None,
        )

    def row_parallel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """A row-parallel projection: each rank's partial product summed over the ranks, then the bias once."""
        if self.tp is None:
            return F.linear(x, weight, bias)
        y = self.tp.all_reduce(F.linear(x, weight))
        return y if bias is None else y + bias

    def project_qkv(self, layer: dict[str, Any], h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`[T, H]` -> q `[T, heads, head_dim]`, k and v `[T, kv_heads, head_dim]`."""
        hd, t = self.cfg.head_dim, h.shape[0]
        q, k, v = F.linear(h, layer["qkv"], layer["qkv_bias"]).split((self.q_size, self.kv_size, self.kv_size), -1)
        return q.view(t, self.num_heads, hd), k.view(t, self.num_kv_heads, hd), v.view(t, self.num_kv_heads, hd)

    def attend(
        self,
        layer: dict[str, Any],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: RotaryTables,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """RoPE, this step's K and V written to the paged cache, attention over it, the output projection."""
        k_cache, v_cache = kv_cache
        q = self.ops.rotary_write_kv(q, k, v, *rope, k_cache, v_cache, meta.slot_mapping)
        a = self.ops.paged_attention(q, k_cache, v_cache, meta, self.scale, layer["window"])
        return self.row_parallel(a.reshape(q.shape[0], self.q_size), layer["o"], layer["o_bias"])

    def mlp(self, layer: dict[str, Any], h: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(h, layer["gate_up"], layer["gate_up_bias"]).chunk(2, dim=-1)
        return self.row_parallel(self.act(gate) * up, layer["down"], layer["down_bias"])

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
        return (num_blocks, block_size, self.num_kv_heads, self.cfg.head_dim)

    def allocate_kv_caches(
        self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = self.kv_cache_shape(num_blocks, block_size)
        kw = dict(dtype=dtype or self.dtype, device=self.embed_tokens.device)
        return [(torch.zeros(shape, **kw), torch.zeros(shape, **kw)) for _ in self.layers]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return F.embedding(input_ids, self.embed_tokens)
        # Each rank looks up the ids in its share of the vocabulary (zeros elsewhere); the sum is every row.
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_rows)
        x = F.embedding(local.masked_fill(outside, 0), self.embed_tokens).masked_fill(outside[:, None], 0)
        return self.tp.all_reduce(x)

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
        tables = self.rotary_tables(positions)
        x, residual = input_embeds, None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x, residual = self.layer_step(layer, x, residual, tables, kv_cache, meta)
            if after_layer is not None:
                x = after_layer(i, x)
        return self.final_norm(x, residual)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[N, H]` hidden rows -> fp32 logits `[N, vocab]` (every rank's share of the vocabulary gathered)."""
        logits = F.linear(hidden, self.lm_head).float()
        if self.tp is None:
            return logits
        padded = F.pad(logits, (0, self.vocab_share - logits.shape[-1]))
        parts = [torch.empty_like(padded) for _ in range(self.tp.world)]
        dist.all_gather(parts, padded.contiguous(), group=self.tp.group)
        return torch.cat(parts, dim=-1)[:, : self.cfg.vocab_size]


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
        self.num_heads, self.num_kv_heads = language_model.num_heads, language_model.num_kv_heads  # this rank's
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

    def compute_logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`[N, H]` hidden rows (or those of `rows`) -> fp32 logits `[N, vocab]`."""
        return self.language_model.compute_logits(hidden if rows is None else hidden[rows])

    def allocate_kv_caches(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None):
        return self.language_model.allocate_kv_caches(num_blocks, block_size, dtype)

    def copy_blocks(self, kv_caches: list, src: torch.Tensor, dst: torch.Tensor) -> None:
        for cache in (c for pair in kv_caches for c in pair):
            cache.index_copy_(0, dst, cache.index_select(0, src))
