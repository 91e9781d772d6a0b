"""Sampling parameters and the batched, batch-invariant sampler.

Randomness is a pure function of (seed, output index, vocabulary index): Gumbel-max sampling with
noise from a counter-based hash. So a request with a seed produces the same text whatever else runs
in its batch, and a sequence preempted and recomputed samples exactly what it sampled before.
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .console import MAX_SEED
from .errors import CheckpointError

INT32_MAX = 2**31 - 1  # the scheduler keeps token counts, top-k and token ids as 32-bit integers
MAX_TOP_LOGPROBS = 20  # alternatives per position (OpenAI's limit)


def checked_int(name: str, value, low: int, high: int = INT32_MAX) -> int:
    """`value` as a plain int in [low, high]; bools and floats (even 2.0) are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _real(name: str, value) -> float:
    """`value` as a finite float (ints are fine, NaN and infinity are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def _list(name: str, value) -> list:
    """None -> [], a list or tuple -> a new list (so later edits of the caller's list change nothing)."""
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise ValueError(f"{name} must be a list, got {value!r} ({type(value).__name__})")
    return list(value)


@dataclass
class SamplingParams:
    """How to sample one request; every field is checked (type and range) when the object is built.

    `stop` takes one string or a list of non-empty strings; `stop` and `stop_token_ids` may be None
    (no stops). Numbers must be of the right kind: `max_tokens=2.5`, `seed=1.5` or `top_k=True` are
    refused, as are NaN or infinite temperatures.
    """

    max_tokens: int = 64
    # None: the checkpoint's generation_config.json default (Engine(generation_config="auto")), else the
    # fallback in FALLBACKS: greedy, no nucleus, no top-k. A value given here always wins.
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None  # -1 = off
    seed: int | None = None  # None = a fresh random seed per request
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # k: the k most likely tokens (id -> log-prob) at each generated position
    prompt_logprobs: int | None = None  # k: each prompt token's log-prob and the k most likely there
    # vLLM's (and transformers') penalties. repetition: a logit of a token already in the prompt or the output
    # is divided by it (multiplied where negative); None = the checkpoint's default, else 1 (off).
    # presence / frequency (OpenAI's): subtracted once / per occurrence in the output, 0 = off.
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        self.max_tokens = checked_int("max_tokens", self.max_tokens, 1)
        if self.temperature is not None:
            self.temperature = _real("temperature", self.temperature)
            if self.temperature < 0:
                raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None:
            self.top_p = _real("top_p", self.top_p)
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None:
            self.top_k = checked_int("top_k", self.top_k, -1)
            if self.top_k == 0:
                raise ValueError("top_k must be -1 (off) or >= 1, got 0")
        if self.seed is not None:  # 64-bit seeds: a negative or larger one would wrap onto another seed
            self.seed = checked_int("seed", self.seed, 0, MAX_SEED)
        self.n = checked_int("n", self.n, 1)
        stop = [self.stop] if isinstance(self.stop, str) else _list("stop", self.stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r} in stop={self.stop!r}")
        self.stop = stop
        self.stop_token_ids = [
            checked_int("stop_token_ids[]", t, 0) for t in _list("stop_token_ids", self.stop_token_ids)
        ]
        self.ignore_eos = _flag("ignore_eos", self.ignore_eos)
        self.skip_special_tokens = _flag("skip_special_tokens", self.skip_special_tokens)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, checked_int(name, getattr(self, name), 0, MAX_TOP_LOGPROBS))
        if self.repetition_penalty is not None:
            self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty)
            if self.repetition_penalty <= 0:
                raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _real(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
            setattr(self, name, value)

    def with_defaults(self, defaults: dict) -> SamplingParams:
        """A copy whose unset (None) fields take `defaults`' values (e.g. the checkpoint's sampling defaults)."""
        unset = {k: v for k, v in defaults.items() if k in DEFAULTABLE and getattr(self, k) is None}
        return replace(self, **unset) if unset else self

    def scheduler_kwargs(self, seed: int) -> dict:
        """What the Rust scheduler takes of these parameters for one sample with `seed`."""
        resolved = self.with_defaults(FALLBACKS)
        return dict(
            temperature=resolved.temperature,
            top_p=resolved.top_p,
            top_k=resolved.top_k,
            seed=seed,
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            repetition_penalty=resolved.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )

    def sample_seeds(self) -> list[int]:
        """One seed per sample: sample i of a seeded request is reproducible on its own."""
        base = self.seed if self.seed is not None else secrets.randbits(63)
        return [_mix64(base + i) for i in range(self.n)]


# unset and no checkpoint default
FALLBACKS = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0}
DEFAULTABLE = tuple(FALLBACKS)
# generation_config.json fields that change sampling and that this sampler does not implement
_UNFOLLOWED = {"min_p": 0.0}


def generation_defaults(generation_config: dict, where: str, mode: str = "auto") -> tuple[dict, dict]:
    """(sampling defaults taken from a checkpoint's generation_config.json, fields it sets that cultengine
    cannot follow), as vLLM's `generation_config="auto"` takes them: temperature, top_p, top_k (0 = off),
    repetition_penalty, whatever `do_sample` says (transformers' greedy `generate` applies a repetition
    penalty too); `mode="none"` takes nothing. A value of the wrong type is a CheckpointError naming the file
    and field."""
    if mode not in ("auto", "none"):
        raise ValueError(f"generation_config must be 'auto' or 'none', got {mode!r}")
    if mode == "none":
        return {}, {}
    taken = {}
    for name in DEFAULTABLE:
        value = generation_config.get(name)
        if value is None:
            continue
        if name == "top_k" and value == 0:
            value = -1  # transformers' "no top-k"
        try:
            SamplingParams(**{name: value})
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
        taken[name] = value
    unfollowed = {
        k: generation_config[k]
        for k, off in _UNFOLLOWED.items()
        if generation_config.get(k) is not None and generation_config[k] != off
    }
    return taken, unfollowed


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


def penalized(logits: torch.Tensor, plan, pending_tokens: torch.Tensor | None) -> torch.Tensor | None:
    """The sampled rows' logits `[S, V]` after the plan's penalties (None: no row has one), as vLLM applies
    them: repetition over every token of the prompt and the output (a positive logit divided, a negative one
    multiplied: transformers' rule), then presence and frequency over the output's token counts.

    A row's known tokens come from the plan (`penalty_tokens`); a token still pending on the device (its
    sample row is one of `prev_input_rows`) is `pending_tokens[prev_sample_index]`, the previous step's pick.
    """
    rows = np.asarray(plan.penalty_rows)
    if not len(rows):
        return None
    device = logits.device
    loc, tokens, prompt_lens = (
        np.asarray(a) for a in (plan.penalty_token_loc, plan.penalty_tokens, plan.penalty_prompt_lens)
    )
    counts = np.diff(loc)
    owner = np.repeat(np.arange(len(rows)), counts)
    in_output = np.arange(len(tokens)) - np.repeat(loc[:-1], counts) >= np.repeat(prompt_lens, counts)
    owner_t = torch.from_numpy(owner).to(device)
    tokens_t = torch.from_numpy(tokens).to(device)
    output_t = torch.from_numpy(in_output).to(device)
    # The pending token (overlapped scheduling) of a row whose sample row takes the previous step's pick.
    sample_rows = np.asarray(plan.sample_indices)[rows]
    prev_rows, prev_index = np.asarray(plan.prev_input_rows), np.asarray(plan.prev_sample_index)
    hit = np.isin(prev_rows, sample_rows)
    if hit.any() and pending_tokens is not None:
        which = np.searchsorted(sample_rows, prev_rows[hit])  # a plan's sample rows increase
        owner_t = torch.cat([owner_t, torch.from_numpy(which).to(device)])
        tokens_t = torch.cat([tokens_t, pending_tokens.index_select(0, torch.from_numpy(prev_index[hit]).to(device))])
        output_t = torch.cat([output_t, torch.ones(int(hit.sum()), dtype=torch.bool, device=device)])
    picked = torch.from_numpy(rows).to(device)
    out = logits.float().clone()
    sub = out.index_select(0, picked)
    rep = torch.from_numpy(np.asarray(plan.repetition_penalty)).to(device)
    seen = sub[owner_t, tokens_t]
    factor = rep[owner_t]
    sub[owner_t, tokens_t] = torch.where(seen > 0, seen / factor, seen * factor)  # repeats write one value
    occurrences = torch.zeros_like(sub).index_put_(
        (owner_t[output_t], tokens_t[output_t]), torch.ones_like(tokens_t[output_t], dtype=sub.dtype), accumulate=True
    )
    presence = torch.from_numpy(np.asarray(plan.presence_penalty)).to(device)[:, None]
    frequency = torch.from_numpy(np.asarray(plan.frequency_penalty)).to(device)[:, None]
    sub -= frequency * occurrences + presence * (occurrences > 0)
    out[picked] = sub
    return out


def sample(
    logits: torch.Tensor, temperature, top_p, top_k, seed, output_index, adjusted: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of `logits [S, V]` (of `adjusted`, the penalized logits, where given); return
    (token ids, their log-probabilities in `logits`).

    The per-row parameters are host arrays (numpy, as the step plan gives them, or CPU tensors):
    which rows sample and whether any truncates is decided on the host, so a greedy step never
    waits for the device and copies no parameters to it. Log-probabilities are of the model's raw
    distribution (before temperature and truncation).
    """
    raw = logits.float()
    logprobs = torch.log_softmax(raw, dim=-1)
    logits = raw if adjusted is None else adjusted
    tokens = logits.argmax(dim=-1)
    temperature, top_p, top_k = np.asarray(temperature), np.asarray(top_p), np.asarray(top_k)
    seed, output_index = np.asarray(seed), np.asarray(output_index)
    sampled = np.flatnonzero(temperature > 0)
    # Row chunks bound the int64 noise temporaries (~8M elements each) for large vocabularies.
    chunk = max(1, (1 << 23) // logits.shape[1])
    for start in range(0, len(sampled), chunk):
        picked = sampled[start : start + chunk]

        def rows_of(a: np.ndarray, picked=picked) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a[picked])).to(logits.device, non_blocking=True)

        rows = torch.from_numpy(picked).to(logits.device, non_blocking=True)
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
    top_k = torch.from_numpy(np.ascontiguousarray(top_k)).to(scaled.device, non_blocking=True)
    top_p = torch.from_numpy(np.ascontiguousarray(top_p)).to(scaled.device, non_blocking=True)
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
