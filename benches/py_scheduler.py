"""A straightforward Python implementation of the engine's scheduling policy: the baseline that
benches/bench_scheduler.py measures the Rust scheduler against.

Same policy as rust/src/scheduler/: one token budget per step, running sequences first (decodes
and unfinished chunked prefills), then waiting ones FCFS; paged blocks with a prefix cache of
chained full-block hashes; preemption by recompute of the newest running sequence when blocks run
out. It builds the same flat step arrays, in the plain per-token Python a first implementation
would have.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PySeq:
    seq_id: int
    tokens: list[int]
    max_tokens: int
    num_prompt: int = 0
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.num_prompt = len(self.tokens)


class PyBlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.ref = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[int, int] = {}

    def _take(self) -> int:
        b, _ = self.free.popitem(last=False)
        h = self.block_hash[b]
        if h is not None and self.cached.get(h) == b:
            del self.cached[h]
        self.block_hash[b] = None
        return b

    def allocate_prompt(self, seq: PySeq) -> bool:
        bs = self.block_size
        parent, hits = 0, []
        for i in range(len(seq.tokens) // bs):
            parent = hash((parent, tuple(seq.tokens[i * bs : (i + 1) * bs])))
            b = self.cached.get(parent)
            if b is None or (i + 1) * bs >= len(seq.tokens):
                break
            hits.append(b)
        need = -(-len(seq.tokens) // bs) - len(hits)
        if need > len(self.free) - sum(1 for b in hits if self.ref[b] == 0):
            return False
        for b in hits:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
        seq.blocks = hits + []
        for _ in range(need):
            b = self._take()
            self.ref[b] = 1
            seq.blocks.append(b)
        seq.num_computed = len(hits) * bs
        return True

    def append_slot(self, seq: PySeq) -> bool:
        if len(seq.tokens) <= len(seq.blocks) * self.block_size:
            return True
        if not self.free:
            return False
        b = self._take()
        self.ref[b] = 1
        seq.blocks.append(b)
        return True

    def commit_full_blocks(self, seq: PySeq) -> None:
        bs, parent = self.block_size, 0
        for i in range(seq.num_computed // bs):
            parent = hash((parent, tuple(seq.tokens[i * bs : (i + 1) * bs])))
            b = seq.blocks[i]
            if self.block_hash[b] is None:
                self.block_hash[b] = parent
                self.cached.setdefault(parent, b)

    def free_seq(self, seq: PySeq) -> None:
        for b in reversed(seq.blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
        seq.blocks = []


class PyScheduler:
    def __init__(
        self, num_blocks: int, block_size: int = 16, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192
    ):
        self.bm = PyBlockManager(num_blocks, block_size)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.waiting: deque[PySeq] = deque()
        self.running: list[PySeq] = []
        self.scheduled: list[tuple[PySeq, int]] = []

    def add_sequence(self, seq_id: int, prompt_ids: list[int], max_tokens: int) -> None:
        self.waiting.append(PySeq(seq_id, list(prompt_ids), max_tokens))

    def _preempt(self, seq: PySeq) -> None:
        self.bm.free_seq(seq)
        seq.num_computed = 0
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def schedule(self) -> dict[str, np.ndarray]:
        budget, scheduled = self.max_tokens, []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:
                continue
            n = min(len(seq.tokens) - seq.num_computed, budget)
            while not self.bm.append_slot(seq):
                self._preempt(self.running[-1])
                if seq not in self.running:
                    break
            if seq in self.running:
                scheduled.append((seq, n))
                budget -= n
        while self.waiting and budget and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.bm.allocate_prompt(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            n = min(len(seq.tokens) - seq.num_computed, budget)
            scheduled.append((seq, n))
            budget -= n
        self.scheduled = scheduled
        return self._plan(scheduled)

    def _plan(self, scheduled) -> dict[str, np.ndarray]:
        bs = self.block_size
        input_ids, positions, slots, qsl, seq_lens, sample_idx = [], [], [], [0], [], []
        width = max((len(s.blocks) for s, _ in scheduled), default=0)
        tables = np.zeros((len(scheduled), width), dtype=np.int32)
        for row, (seq, n) in enumerate(scheduled):
            for pos in range(seq.num_computed, seq.num_computed + n):
                input_ids.append(seq.tokens[pos])
                positions.append(pos)
                slots.append(seq.blocks[pos // bs] * bs + pos % bs)
            qsl.append(qsl[-1] + n)
            seq_lens.append(seq.num_computed + n)
            tables[row, : len(seq.blocks)] = seq.blocks
            if seq.num_computed + n == len(seq.tokens):
                sample_idx.append(qsl[-1] - 1)
        return {
            "input_ids": np.array(input_ids, dtype=np.int64),
            "positions": np.array(positions, dtype=np.int64),
            "slot_mapping": np.array(slots, dtype=np.int64),
            "query_start_loc": np.array(qsl, dtype=np.int32),
            "seq_lens": np.array(seq_lens, dtype=np.int32),
            "block_tables": tables,
            "sample_indices": np.array(sample_idx, dtype=np.int64),
        }

    def update(self, sampled: np.ndarray) -> list[int]:
        finished, k = [], 0
        for seq, n in self.scheduled:
            seq.num_computed += n
            self.bm.commit_full_blocks(seq)
            if seq.num_computed < len(seq.tokens):
                continue
            seq.tokens.append(int(sampled[k]))
            k += 1
            if len(seq.tokens) - seq.num_prompt >= seq.max_tokens:
                self.bm.free_seq(seq)
                self.running.remove(seq)
                finished.append(seq.seq_id)
        return finished

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)
