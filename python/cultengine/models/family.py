"""The seam every model family implements: host-side processing on one side, the device model on the other.

A family (one file in this package, one line in the registry in `__init__.py`) owns:
- parsing its `config.json` (`__init__`, raising `CheckpointError` naming the field);
- image processing: an image to `ImageFeatures` (pixels of any shape, the token ids that replace one
  placeholder, which runs of those ids take embeddings, and metadata such as a tile grid);
- positions (plain, or several rows for M-RoPE), a dummy image for warm-up, and building its model.

The engine only moves these around: it expands placeholders with the Rust tokenizer, hands the
scheduler the embedding runs, and gives the model's `encode_images` a ragged list of images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from PIL import Image

from ..attention_metadata import AttentionMetadata
from ..checkpoint import Checkpoint
from ..errors import CheckpointError
from ..image import ImageProcessor, content_hash


@dataclass(eq=False)
class ImageFeatures:
    """One image as a family's processor leaves it, ready for the encoder and the prompt."""

    pixels: torch.Tensor  # the encoder's input, any shape (one tile [3, S, S], or [tiles, 3, S, S], ...)
    token_ids: list[int]  # replaces the image's placeholder in the prompt
    embedding_runs: list[tuple[int, int]]  # (offset into token_ids, length) that take embeddings, in order
    # How the family cut the image, typed by the family (LLaVA-NeXT's `TileLayout`, Qwen's `QwenGrid`, ...): what
    # its encoder needs besides the pixels, and part of the image's identity. None when there is nothing to say.
    meta: Any = None

    @property
    def num_embeddings(self) -> int:
        return sum(n for _, n in self.embedding_runs)

    def content_hash(self) -> int:
        """u64 identity for the prefix and encoder caches: pixels, tokens and metadata all count (two
        images with equal pixels but another original size unpad differently in LLaVA-NeXT)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(content_hash(self.pixels).to_bytes(8, "little"))
        h.update(np.asarray(self.token_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(self.embedding_runs, dtype=np.int64).tobytes())
        h.update(repr(self.meta).encode())
        return int.from_bytes(h.digest(), "little")


def marker_token_ids(tokenizer, checkpoint: Checkpoint, markers: dict[str, str], named: bool = True) -> list[int]:
    """Ids of the special tokens a family's prompts put around images: each `attribute: default` of `markers`
    is the token the tokenizer's settings name by that attribute (tokenizer_config.json, top level or in
    `extra_special_tokens`; only when `named`, as the family's processor reads them) or else the default.
    A token missing from the tokenizer is a CheckpointError."""
    config = checkpoint.tokenizer_config
    extra = config.get("extra_special_tokens")
    names = {**config, **(extra if isinstance(extra, dict) else {})} if named else {}
    ids = []
    for attr, default in markers.items():
        text = names.get(attr) if isinstance(names.get(attr), str) else default
        i = tokenizer.token_to_id(text)
        if i is None:
            raise CheckpointError(f"{checkpoint.tokenizer_path}: the image marker token {text!r} is missing")
        ids.append(i)
    return ids


class Model(Protocol):
    """What the runner drives: a packed forward over a paged KV cache, and a ragged image encoder."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def allocate_kv_caches(
        self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]: ...

    def copy_blocks(self, kv_caches: list, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy KV blocks `src` to `dst` in every layer (a forked choice's share of its context's last block)."""
        ...

    def encode_images(self, images: list[ImageFeatures]) -> list[torch.Tensor]:
        """Each image's embeddings `[num_embeddings, hidden]`, in the order of its embedding runs."""
        ...

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list,
        meta: AttentionMetadata,
        image_rows: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits of `hidden`'s rows `rows` (all of them when None)."""
        ...


@dataclass(frozen=True)
class Capabilities:
    """What a family's model asks of the scheduler, the runner and attention, declared once: the engine turns
    it into their settings (`Engine.__init__`), and no family name appears outside `models/`."""

    position_rows: int = 1  # rows of positions per token: 3 for M-RoPE (temporal, height, width)
    atomic_images: bool = False  # an image's embedding runs never split across prefill chunks
    # Each embedding run's tokens attend to the whole run in prefill (Gemma 3); needs atomic runs.
    bidirectional_images: bool = False

    def __post_init__(self):
        if self.position_rows not in (1, 3):
            raise ValueError(f"position_rows is 1 or 3, got {self.position_rows}")
        if self.bidirectional_images and not self.atomic_images:
            raise ValueError("bidirectional image runs must be atomic (a chunk cannot see the rest of its run)")


class Family:
    """Base of the families: the defaults a family overrides only where it differs."""

    capabilities: ClassVar[Capabilities] = Capabilities()
    image_options: ClassVar[tuple[str, ...]] = ()  # request keys passed to process_image (e.g. max_pixels)

    def __init__(self, checkpoint: Checkpoint, image_backend: str | None = None):
        self.checkpoint = checkpoint
        self.where = str(checkpoint.path / "config.json")
        self.image_backend = image_backend

    # -- text ------------------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        """The longest sequence the model can attend over exactly."""
        raise NotImplementedError

    # -- images ----------------------------------------------------------------------------------
    placeholder_id: int | None = None  # the token a prompt marks each image with; None: a text-only family
    image_processor: ImageProcessor | None = None  # its preprocessing path and provenance

    def process_image(self, image: Image.Image, options: dict[str, Any]) -> ImageFeatures:
        raise NotImplementedError

    def expand_text(self, text: str, images: list[ImageFeatures]) -> str:
        """The prompt text before tokenization, given its images in order: where a processor puts text around
        each placeholder (Gemma 3's newlines), it goes here so that it tokenizes with its neighbours as the
        processor's does; the placeholder itself stays, and `token_ids` replaces it after tokenization."""
        return text

    def request_image_options(self, options: dict[str, Any], num_images: int) -> dict[str, Any]:
        """The options each image of a request is processed with: the request's `image_options`, and what a
        family derives from the request itself (OneVision tiles a prompt's image only when it is the only one)."""
        return options

    def dummy_image(self) -> Image.Image:
        """An image the warm-up request can use (a kernel's first launch compiles it)."""
        raise NotImplementedError

    # -- positions -------------------------------------------------------------------------------
    def positions(self, token_ids: list[int], images: list[tuple[int, ImageFeatures]]) -> tuple[np.ndarray, int] | None:
        """`[position_rows, len(token_ids)]` positions and the decode offset, given each image's start;
        None for plain positions `0..n` (every 1-D family)."""
        return None

    # -- the device model ------------------------------------------------------------------------
    def build_model(self, ops, max_positions: int | None = None) -> Model:
        raise NotImplementedError
