"""ModelRunner: owns the paged KV cache and the vision-encoder cache, and runs one step plan."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch

from .ops import AttentionMetadata

GiB = 1 << 30


class EncoderCache:
    """Projected image embeddings by image content hash, least recently used evicted first.

    One image asked with many prompts (42 nationalities, 4 choices, a yes/no filter) is encoded once.
    Pixels of images still in flight stay registered so an evicted embedding can be recomputed.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.embeddings: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.pixels: dict[int, torch.Tensor] = {}
        self.pending: dict[int, int] = {}  # content hash -> sequences in flight that use it
        self.images_encoded = 0

    def register(self, content_hash: int, pixels: torch.Tensor) -> None:
        self.pixels.setdefault(content_hash, pixels)
        self.pending[content_hash] = self.pending.get(content_hash, 0) + 1

    def release(self, content_hash: int) -> None:
        left = self.pending[content_hash] - 1
        if left:
            self.pending[content_hash] = left
        else:
            del self.pending[content_hash]
            del self.pixels[content_hash]

    def get_many(self, hashes: list[int], encode) -> dict[int, torch.Tensor]:
        missing = [h for h in dict.fromkeys(hashes) if h not in self.embeddings]
        if missing:
            # CLIP preprocessing gives every image the same size, so one batched encoder call.
            encoded = encode(torch.stack([self.pixels[h] for h in missing]))
            self.images_encoded += len(missing)
            for h, emb in zip(missing, encoded, strict=True):
                self.embeddings[h] = emb
        found = {}
        for h in hashes:
            self.embeddings.move_to_end(h)
            found[h] = self.embeddings[h]
        while len(self.embeddings) > max(self.capacity, len(found)):
            self.embeddings.popitem(last=False)
        return found


class ModelRunner:
    def __init__(self, model, device: torch.device, dtype: torch.dtype, block_size: int,
                 num_blocks: int | None, kv_cache_memory: int | None, max_num_seqs: int,
                 max_model_len: int, encoder_cache_size: int = 256):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks or self._blocks_for_budget(kv_cache_memory, max_num_seqs, max_model_len)
        self.kv_caches = model.allocate_kv_caches(self.num_blocks, block_size, dtype)
        self.encoder_cache = EncoderCache(encoder_cache_size)
        self.vision_seconds = 0.0  # measured only when execute() is asked to synchronise

    def _bytes_per_block(self) -> int:
        m = self.model
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * elem

    def _blocks_for_budget(self, budget: int | None, max_num_seqs: int, max_model_len: int) -> int:
        """Blocks that fit the budget: by default 90% of free GPU memory, or up to 2 GiB on the CPU,
        never more than the engine could ever use (every sequence at full length)."""
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.9) - GiB  # headroom for activations of the largest step
            else:
                budget = 2 * GiB
        per_seq = -(-max_model_len // self.block_size)
        blocks = min(budget // self._bytes_per_block(), per_seq * max_num_seqs)
        if blocks < per_seq:
            raise ValueError(f"KV-cache budget of {budget / GiB:.2f} GiB holds {blocks} blocks of "
                             f"{self.block_size} tokens, fewer than one sequence of max_model_len "
                             f"{max_model_len} needs ({per_seq}); raise kv_cache_memory or lower max_model_len")
        return int(blocks)

    def _sync_time(self, synchronize: bool) -> float:
        if synchronize and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, plan, synchronize: bool = False) -> torch.Tensor:
        """Run the plan's packed tokens through the model; returns hidden states `[T, H]`.

        `synchronize` waits for the device around the vision encoder so its time can be measured.
        """
        image_rows = image_embeds = None
        chunks = plan.image_chunks
        if len(chunks):
            hashes = [int(h) & ((1 << 64) - 1) for h in chunks[:, 0]]  # back from int64 bits to u64
            started = self._sync_time(synchronize)
            images = self.encoder_cache.get_many(hashes, self.model.encode_images)
            if synchronize:
                self.vision_seconds += self._sync_time(True) - started
            # One index per image token: cheap (images per step), and the copy itself is one op.
            dst = np.concatenate([np.arange(d, d + n) for d, n in zip(chunks[:, 1], chunks[:, 3], strict=True)])
            image_rows = self._tensor(dst)
            image_embeds = torch.cat([images[h][s:s + n] for h, s, n in zip(hashes, chunks[:, 2], chunks[:, 3],
                                                                            strict=True)])
        meta = AttentionMetadata(
            query_start_loc=self._tensor(plan.query_start_loc),
            seq_lens=self._tensor(plan.seq_lens),
            block_tables=self._tensor(plan.block_tables),
            slot_mapping=self._tensor(plan.slot_mapping),
            max_query_len=int(plan.max_query_len),
            max_seq_len=int(plan.max_seq_len),
        )
        return self.model.forward(self._tensor(plan.input_ids), self._tensor(plan.positions), self.kv_caches, meta,
                                  image_rows, image_embeds)
