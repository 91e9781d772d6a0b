"""ModelRunner: owns the paged KV cache and the vision-encoder cache, and runs one step plan."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .attention_metadata import AttentionMetadata, SharedPrefixes, cascade_tile_width, group_shared_prefixes
from .models.family import ImageFeatures, Model
from .sampling import penalized, sample

GiB = 1 << 30


class EncoderCache:
    """Projected image embeddings by image content hash, least recently used evicted first.

    One image asked with many prompts (42 nationalities, 4 choices, a yes/no filter) is encoded once.
    The processed inputs of images still in flight stay registered so an evicted embedding can be
    recomputed.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.embeddings: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.inputs: dict[int, ImageFeatures] = {}
        self.pending: dict[int, int] = {}  # content hash -> sequences in flight that use it
        self.images_encoded = 0

    def register(self, content_hash: int, image: ImageFeatures) -> None:
        self.inputs.setdefault(content_hash, image)
        self.pending[content_hash] = self.pending.get(content_hash, 0) + 1

    def release(self, content_hash: int) -> None:
        left = self.pending[content_hash] - 1
        if left:
            self.pending[content_hash] = left
        else:
            del self.pending[content_hash]
            del self.inputs[content_hash]

    def get_many(self, hashes: list[int], encode) -> dict[int, torch.Tensor]:
        missing = [h for h in dict.fromkeys(hashes) if h not in self.embeddings]
        if missing:
            # One encoder call for every image this step needs; the model batches what it can.
            encoded = encode([self.inputs[h] for h in missing])
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


def fill_previous_tokens(input_ids: torch.Tensor, plan, previous_tokens: torch.Tensor | None) -> None:
    """Overlapped scheduling: the rows of `input_ids` whose token the previous step sampled take it from that
    step's tokens on the device (the plan holds a placeholder there), so no id makes a round trip to the host."""
    if not len(plan.prev_input_rows):
        return
    rows, index = (
        torch.from_numpy(a).to(input_ids.device, non_blocking=True)
        for a in (plan.prev_input_rows, plan.prev_sample_index)
    )
    input_ids.index_copy_(0, rows, previous_tokens.index_select(0, index))


class DecodeGraphs:
    """CUDA graphs of the decode-only step, one per batch size of a ladder (1, 2, 4, 8, 16, 32, ...).

    A decode step is a few hundred small kernels; at small batches launching them costs more than
    running them. A graph replays them in one launch. Inputs pass through static buffers; a step of B
    sequences replays the smallest captured size >= B, whose padding rows write no KV (slot -1) and
    attend to one key. The graphs are captured with `max_seq_len` at the model's limit, so the decode
    kernel's split of the KV range covers any sequence (see kernels.decode_attention.paged_decode_attention).
    """

    def __init__(
        self,
        model: Model,
        kv_caches,
        max_batch: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        position_rows: int = 1,
        capture: bool = True,
        cascade: bool = True,
    ):
        """`capture=False` runs the same padded static-buffer steps eagerly (how CPU tests check them);
        `cascade` also captures each size with shared-prefix attention (see `attention_metadata.SharedPrefixes`)."""
        self.sizes = sorted(
            {s for s in (1, 2, 4, 8) if s < max_batch} | set(range(16, max_batch + 1, 16)) | {max_batch}
        )
        self.max_blocks = -(-max_model_len // block_size)
        i64 = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(max_batch, **i64)
        self.positions = torch.zeros(position_rows, max_batch, **i64)
        self.slot_mapping = torch.full((max_batch,), -1, **i64)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, self.max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        # Shared-prefix groups: a step has at most one tile per sequence; tiles past the step's are empty.
        self.prefix_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.tile_seqs = torch.full(
            (max_batch, cascade_tile_width(model.num_heads // model.num_kv_heads)), -1, dtype=torch.int32, device=device
        )
        self.tile_prefix_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.hidden: dict[tuple[int, bool], torch.Tensor] = {}  # each graph's output rows, rewritten by its replay
        # Every graph also computes its rows' logits and greedy picks, so a greedy step launches no sampling.
        # One buffer for all graphs (they never run at once), allocated by the first, uncaptured, step.
        self.logits: torch.Tensor | None = None  # fp32 [max_batch, vocab]
        self.greedy = torch.zeros(max_batch, **i64)
        self.greedy_logprobs = torch.zeros(max_batch, dtype=torch.float32, device=device)
        self.replay: dict[tuple[int, bool], Callable[[], object]] = {}  # by (size, cascade): graph.replay or eager
        self.replays = 0
        self._build(model, kv_caches, max_model_len, capture, (False, True) if cascade else (False,))

    @torch.inference_mode()
    def _build(self, model, kv_caches, max_model_len: int, capture: bool, variants: tuple[bool, ...]) -> None:
        pool = None
        # Largest first: the smaller graphs fit in its memory pool.
        for size, cascade in ((s, c) for s in reversed(self.sizes) for c in variants):
            shared = (
                SharedPrefixes(self.prefix_lens[:size], self.tile_seqs[:size], self.tile_prefix_lens[:size])
                if cascade
                else None
            )
            meta = AttentionMetadata(
                self.query_start_loc[: size + 1],
                self.seq_lens[:size],
                self.block_tables[:size],
                self.slot_mapping[:size],
                max_query_len=1,
                max_seq_len=max_model_len,
                shared_prefixes=shared,
            )

            positions = self.positions[:, :size] if len(self.positions) > 1 else self.positions[0, :size]

            def step(key=(size, cascade), meta=meta, positions=positions):
                hidden = self.hidden[key] = model.forward(self.input_ids[: key[0]], positions, kv_caches, meta)
                logits = model.compute_logits(hidden).float()
                if self.logits is None:
                    self.logits = logits.new_empty((len(self.input_ids), logits.shape[1]))
                self.logits[: key[0]].copy_(logits)
                best = logits.argmax(dim=-1)
                self.greedy[: key[0]].copy_(best)
                self.greedy_logprobs[: key[0]].copy_(torch.log_softmax(logits, dim=-1).gather(1, best[:, None])[:, 0])

            if not capture:
                self.replay[size, cascade] = step
                continue
            step()  # compiles and loads every kernel outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                step()
            pool = graph.pool()
            self.replay[size, cascade] = graph.replay
        if capture:
            torch.cuda.synchronize()

    def fits(self, plan) -> bool:
        return (
            plan.max_query_len == 1
            and not len(plan.image_chunks)
            and len(plan.seq_lens) <= self.sizes[-1]
            and plan.block_tables.shape[1] <= self.max_blocks
        )

    def run(
        self,
        plan,
        shared: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
        previous_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Replay the graph of the plan's batch size; `shared` is its shared-prefix grouping, if any;
        `previous_tokens` feed the plan's `prev_input_rows` (see `fill_previous_tokens`)."""
        b = len(plan.seq_lens)
        size = next(s for s in self.sizes if s >= b)
        width = plan.block_tables.shape[1]
        for buf, array in (
            (self.input_ids, plan.input_ids),
            (self.slot_mapping, plan.slot_mapping),
            (self.seq_lens, plan.seq_lens),
        ):
            buf[:b].copy_(torch.from_numpy(array), non_blocking=True)
        fill_previous_tokens(self.input_ids, plan, previous_tokens)
        self.positions[:, :b].copy_(torch.from_numpy(plan.positions), non_blocking=True)
        self.block_tables[:b, :width].copy_(torch.from_numpy(plan.block_tables), non_blocking=True)
        self.slot_mapping[b:size].fill_(-1)
        self.seq_lens[b:size].fill_(1)
        key = (size, shared is not None and (size, True) in self.replay)
        if key[1]:
            prefix_lens, tile_seqs, tile_prefix_lens = shared
            tiles = len(tile_prefix_lens)
            self.prefix_lens[:b].copy_(torch.from_numpy(prefix_lens), non_blocking=True)
            self.prefix_lens[b:size].fill_(0)
            self.tile_seqs[:tiles].copy_(torch.from_numpy(tile_seqs), non_blocking=True)
            self.tile_prefix_lens[:tiles].copy_(torch.from_numpy(tile_prefix_lens), non_blocking=True)
            self.tile_prefix_lens[tiles:size].fill_(0)
        self.replay[key]()
        self.replays += 1
        return self.hidden[key][:b]


@dataclass
class Launched:
    """A step whose device work is queued: its plan, its sampled ids on the device (the next plan's
    deferred rows read them), its logits, and what the host needs back, being copied asynchronously."""

    plan: object  # _core.StepPlan
    tokens: torch.Tensor
    logits: torch.Tensor
    results: torch.Tensor  # host tensor (pinned on CUDA): tokens, their logprobs, prompt logprobs, greedy, finite
    ready: torch.cuda.Event | None  # recorded after the copy; None on the CPU, where the copy is done


class StepResults(NamedTuple):
    """A step's results on the host: sampled tokens and their log-probs (sample order), each scored prompt
    token's log-prob and whether it was the argmax, and the sequences whose logits were not finite."""

    tokens: np.ndarray
    token_logprobs: np.ndarray
    prompt_logprobs: np.ndarray
    prompt_greedy: np.ndarray
    non_finite: set[int]


class ModelRunner:
    """Owns the paged KV cache and the vision-encoder cache; runs step plans and computes their logits."""

    def __init__(
        self,
        model: Model,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int,
        num_blocks: int | None,
        kv_cache_memory: int | None,
        max_num_seqs: int,
        max_model_len: int,
        encoder_cache_size: int = 256,
        cuda_graphs: bool = False,
        position_rows: int = 1,
        bidirectional_images: bool = False,
        cascade: bool = True,
    ):
        """`cuda_graphs` captures decode steps (needs CUDA and a backend whose kernels never read the
        device on the host: the Triton one); `position_rows` > 1 for M-RoPE models;
        `bidirectional_images` passes each step's image runs to attention as bidirectional spans;
        `cascade` lets decode steps whose sequences share leading KV blocks read them once per group."""
        self.model = model
        self.cascade_width = cascade_tile_width(model.num_heads // model.num_kv_heads) if cascade else 0
        # Keys decode attention reads, summed over steps and sequences: as run, and without any grouping.
        self.decode_keys_read = self.decode_keys_plain = 0
        self._graph_rows = 0  # rows of the last step when a decode graph ran it (its logits are computed)
        self.position_rows = position_rows
        self.bidirectional_images = bidirectional_images
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks or self._blocks_for_budget(kv_cache_memory, max_num_seqs, max_model_len)
        self.kv_caches = model.allocate_kv_caches(self.num_blocks, block_size, dtype)
        self.encoder_cache = EncoderCache(encoder_cache_size)
        self.vision_seconds = 0.0  # measured only when execute() is asked to synchronise
        self.decode_graphs = (
            DecodeGraphs(
                model,
                self.kv_caches,
                min(max_num_seqs, 512),
                max_model_len,
                block_size,
                device,
                position_rows,
                cascade=cascade,
            )
            if cuda_graphs
            else None
        )

    # Images in flight: their processed inputs stay until every sequence that uses them is done.
    def pin_images(self, images: dict[int, ImageFeatures]) -> None:
        for content_hash, image in images.items():
            self.encoder_cache.register(content_hash, image)

    def unpin_images(self, hashes) -> None:
        for content_hash in hashes:
            self.encoder_cache.release(content_hash)

    @property
    def images_encoded(self) -> int:
        return self.encoder_cache.images_encoded

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
            raise ValueError(
                f"KV-cache budget of {budget / GiB:.2f} GiB holds {blocks} blocks of "
                f"{self.block_size} tokens, fewer than one sequence of max_model_len "
                f"{max_model_len} needs ({per_seq}); raise kv_cache_memory or lower max_model_len"
            )
        return int(blocks)

    def _sync_time(self, synchronize: bool) -> float:
        if synchronize and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, plan, synchronize: bool = False, previous_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run the plan's packed tokens through the model; returns hidden states `[T, H]`.

        `synchronize` waits for the device around the vision encoder so its time can be measured;
        `previous_tokens` are the ids the previous step sampled, on the device (overlapped scheduling: the
        plan's `prev_input_rows` take them).
        """
        if len(plan.block_copies):  # a forked choice's copy of its context's last, shared block
            src, dst = (self._tensor(np.ascontiguousarray(plan.block_copies[:, i])) for i in (0, 1))
            self.model.copy_blocks(self.kv_caches, src, dst)
        shared = self._shared_prefixes(plan)
        self._graph_rows = 0
        if self.decode_graphs is not None and self.decode_graphs.fits(plan):
            self._graph_rows = len(plan.seq_lens)
            return self.decode_graphs.run(plan, shared, previous_tokens)
        image_rows = image_embeds = spans = None
        chunks = plan.image_chunks  # (dst row, first embedding, length) of each run, and its image's hash
        if len(chunks):
            hashes = plan.image_hashes.tolist()
            started = self._sync_time(synchronize)
            images = self.encoder_cache.get_many(hashes, self.model.encode_images)
            if synchronize:
                self.vision_seconds += self._sync_time(True) - started
            # One index per image token: cheap (images per step), and the copy itself is one op.
            dst = np.concatenate([np.arange(d, d + n) for d, n in zip(chunks[:, 0], chunks[:, 2], strict=True)])
            image_rows = self._tensor(dst)
            image_embeds = torch.cat(
                [images[h][s : s + n] for h, s, n in zip(hashes, chunks[:, 1], chunks[:, 2], strict=True)]
            )
            if self.bidirectional_images:
                spans = self._image_spans(plan)
        meta = AttentionMetadata(
            query_start_loc=self._tensor(plan.query_start_loc),
            seq_lens=self._tensor(plan.seq_lens),
            block_tables=self._tensor(plan.block_tables),
            slot_mapping=self._tensor(plan.slot_mapping),
            max_query_len=int(plan.max_query_len),
            max_seq_len=int(plan.max_seq_len),
            image_spans=None if spans is None else self._tensor(spans[0]),
            image_span_loc=None if spans is None else self._tensor(spans[1]),
            shared_prefixes=None if shared is None else SharedPrefixes(*map(self._tensor, shared)),
        )
        positions = plan.positions if self.position_rows > 1 else plan.positions[0]
        input_ids = self._tensor(plan.input_ids)
        fill_previous_tokens(input_ids, plan, previous_tokens)
        return self.model.forward(input_ids, self._tensor(positions), self.kv_caches, meta, image_rows, image_embeds)

    def _shared_prefixes(self, plan) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """A decode step's shared-prefix grouping, when it pays (`group_shared_prefixes`); counts the keys."""
        if plan.max_query_len != 1:
            return None
        plain = int(plan.seq_lens.sum())
        grouped = (
            group_shared_prefixes(plan.block_tables, plan.seq_lens, self.block_size, self.cascade_width)
            if self.cascade_width
            else None
        )
        self.decode_keys_plain += plain
        self.decode_keys_read += plain if grouped is None else grouped[3]
        return None if grouped is None else grouped[:3]

    @property
    def kv_bytes_per_key(self) -> int:
        """Bytes of keys and values one cached token holds over all layers."""
        return self._bytes_per_block() // self.block_size

    @staticmethod
    def _image_spans(plan) -> tuple[np.ndarray, np.ndarray]:
        """(first, end) positions `[N, 2]` of each image run this step computes, by sequence, and where each
        sequence's runs begin `[B+1]`. A query already sees the keys before it; the span adds the rest of its
        run, which is always in the same step (atomic runs). A run a prefix-cache hit cut into keeps only its
        uncached part here, and loses nothing: its cached part lies before every query."""
        qsl, seq_lens = plan.query_start_loc.astype(np.int64), plan.seq_lens.astype(np.int64)
        dst, n = plan.image_chunks[:, 0].astype(np.int64), plan.image_chunks[:, 2].astype(np.int64)
        seq = np.searchsorted(qsl, dst, side="right") - 1
        first = seq_lens[seq] - (qsl[seq + 1] - qsl[seq]) + (dst - qsl[seq])
        order = np.argsort(seq, kind="stable")
        spans = np.stack([first, first + n], axis=1)[order].astype(np.int32)
        loc = np.concatenate([[0], np.cumsum(np.bincount(seq, minlength=len(seq_lens)))]).astype(np.int32)
        return spans, loc

    def compute_logits(self, hidden: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """fp32 logits of the given rows of a step's hidden states (a copy: the next step may overwrite a
        decode graph's buffers while these are still read)."""
        index = self._tensor(rows)
        if self._graph_rows:  # the graph computed them already
            return self.decode_graphs.logits[index]
        return self.model.compute_logits(hidden, index).float()

    def greedy_picks(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(argmax tokens, their log-probs) of these rows, copied, when the decode graph that ran the last step
        computed them; else None (then sample the logits)."""
        if not self._graph_rows:
            return None
        index = self._tensor(rows)
        return self.decode_graphs.greedy[index], self.decode_graphs.greedy_logprobs[index]

    def forward(self, plan, previous_tokens: torch.Tensor | None, synchronize: bool = False) -> torch.Tensor:
        """Queue the plan's forward pass; the logits of its sampled rows, then of its scored prompt rows."""
        hidden = self.execute(plan, synchronize=synchronize, previous_tokens=previous_tokens)
        return self.compute_logits(hidden, np.concatenate([plan.sample_indices, plan.prompt_lp_indices]))

    def sample(self, plan, logits: torch.Tensor, previous: Launched | None) -> Launched:
        """Queue the plan's sampling (penalties, then greedy picks or `sampling.sample`), its prompt tokens'
        log-probs and the copy of everything the host needs back."""
        num_sampled = len(plan.sample_indices)
        adjusted = penalized(logits[:num_sampled], plan, None if previous is None else previous.tokens)
        # A greedy decode step takes the argmax its CUDA graph computed: no sampling launches at all.
        plain_greedy = adjusted is None and not (plan.temperature > 0).any()
        picked = self.greedy_picks(plan.sample_indices) if plain_greedy else None
        if picked is None:
            picked = sample(
                logits[:num_sampled], plan.temperature, plan.top_p, plan.top_k, plan.seed, plan.output_index, adjusted
            )
        tokens, token_lps = picked
        scored = logits[num_sampled:]
        targets = torch.from_numpy(plan.prompt_lp_targets).to(self.device, non_blocking=True)
        prompt_lps = torch.log_softmax(scored, dim=-1).gather(1, targets[:, None]).squeeze(1)
        greedy = scored.argmax(dim=-1) == targets
        finite = torch.isfinite(logits).all(dim=-1)
        # One device-to-host copy, so one wait, for all the scheduler needs back (ids are exact in fp64).
        results = torch.cat(
            [tokens.double(), token_lps.double(), prompt_lps.double(), greedy.double(), finite.double()]
        )
        ready = None
        if results.is_cuda:  # queued now, so waiting for it later does not wait for the step launched after
            results = torch.empty(results.shape, dtype=results.dtype, pin_memory=True).copy_(results, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        return Launched(plan, tokens, logits, results, ready)

    @staticmethod
    def results(launched: Launched) -> StepResults:
        """Wait for a launched step's results and split them."""
        if launched.ready is not None:
            launched.ready.synchronize()
        plan, host = launched.plan, launched.results.numpy()
        n, m = len(plan.sample_indices), len(plan.prompt_lp_targets)
        return StepResults(
            host[:n].astype(np.int64),
            host[n : 2 * n].astype(np.float32),
            host[2 * n : 2 * n + m].astype(np.float32),
            host[2 * n + m : 2 * n + 2 * m] > 0.5,
            _rows_to_seqs(plan, np.flatnonzero(host[2 * n + 2 * m :] < 0.5)),
        )


def _rows_to_seqs(plan, rows: np.ndarray) -> set[int]:
    """Sequence ids of logits rows (sampled rows first, then prompt-logprob rows)."""
    if not len(rows):
        return set()
    token_rows = np.concatenate([plan.sample_indices, plan.prompt_lp_indices])[rows]
    batch = np.searchsorted(plan.query_start_loc, token_rows, side="right") - 1
    return {int(x) for x in plan.seq_ids[batch]}
