"""Sampling parameters and the batched, batch-invariant sampler.

Randomness is a pure function of (seed, output index, vocabulary index): Gumbel-max sampling with
noise from a counter-based hash. So a request with a seed produces the same text whatever else runs
in its batch, and a sequence preempted and recomputed samples exactly what it sampled before.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    seed: int | None = None  # None = a fresh random seed per request
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    def sample_seeds(self) -> list[int]:
        """One seed per sample: sample i of a seeded request is reproducible on its own."""
        base = self.seed if self.seed is not None else secrets.randbits(63)
        return [_mix64(base + i) for i in range(self.n)]


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser on a Python int, folded to a non-negative int63."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_C_GOLDEN, _C_MIX1, _C_MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift on int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_noise(seed: torch.Tensor, output_index: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) noise `[S, V]` from splitmix64 of (seed, output_index, vocab index); int64 wraps."""
    v = torch.arange(vocab_size, device=seed.device, dtype=torch.int64)
    x = seed[:, None] * _C_GOLDEN + output_index[:, None] * _C_MIX2 + v[None, :] * _C_MIX1
    for _ in range(2):  # two rounds decorrelate neighbouring counters
        x = x + _C_GOLDEN
        x = (x ^ _shr(x, 30)) * _C_MIX1
        x = (x ^ _shr(x, 27)) * _C_MIX2
        x = x ^ _shr(x, 31)
    mantissa = _shr(x, 11).double()  # 53 random bits
    return ((mantissa + 0.5) / float(1 << 53)).float().clamp_(1e-12, 1 - 1e-7)


def sample(logits: torch.Tensor, temperature, top_p, top_k, seed, output_index) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of `logits [S, V]`; return (token ids, their log-probabilities).

    The per-row parameters are host arrays (numpy, as the step plan gives them, or CPU tensors):
    which rows sample and whether any truncates is decided on the host, so a greedy step never
    waits for the device and copies no parameters to it. Log-probabilities are of the model's raw
    distribution (before temperature and truncation).
    """
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    temperature, top_p, top_k = np.asarray(temperature), np.asarray(top_p), np.asarray(top_k)
    seed, output_index = np.asarray(seed), np.asarray(output_index)
    sampled = np.flatnonzero(temperature > 0)
    # Row chunks bound the int64 noise temporaries (~8M elements each) for large vocabularies.
    chunk = max(1, (1 << 23) // logits.shape[1])
    for start in range(0, len(sampled), chunk):
        picked = sampled[start:start + chunk]

        def rows_of(a: np.ndarray, picked=picked) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a[picked])).to(logits.device)

        rows = torch.from_numpy(picked).to(logits.device)
        scaled = logits[rows] / rows_of(temperature)[:, None]
        scaled = _truncate(scaled, top_p[picked], top_k[picked])
        gumbel = -torch.log(-torch.log(uniform_noise(rows_of(seed), rows_of(output_index), logits.shape[1])))
        tokens[rows] = (scaled + gumbel).argmax(dim=-1)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


def _truncate(scaled: torch.Tensor, top_p: np.ndarray, top_k: np.ndarray) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus with -inf (the best token always stays)."""
    needs_k, needs_p = bool((top_k > 0).any()), bool((top_p < 1).any())
    if not (needs_k or needs_p):
        return scaled
    top_k = torch.from_numpy(np.ascontiguousarray(top_k)).to(scaled.device)
    top_p = torch.from_numpy(np.ascontiguousarray(top_p)).to(scaled.device)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(scaled.shape[1], device=scaled.device)[None, :]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if needs_k:
        drop |= (top_k[:, None] > 0) & (rank >= top_k[:, None])
    if needs_p:
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    return scaled.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
