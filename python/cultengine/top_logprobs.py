"""The k most likely tokens at each position, for the sequences that ask (`SamplingParams(logprobs=k,
prompt_logprobs=k)`): opt-in, so a step gathers them only for those sequences' logits rows, in one
device-to-host copy."""

from __future__ import annotations

import numpy as np
import torch

from .outputs import Logprob


class TopLogprobs:
    """Which sequences want top-k log-probs, and what has been gathered for them so far."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._k: dict[int, int] = {}  # sequence -> k at each generated position
        self._top: dict[int, list[dict[int, float]]] = {}
        self._prompt_k: dict[int, int] = {}  # sequence -> k at each prompt position
        self._prompt_top: dict[int, dict[int, dict[int, float]]] = {}  # sequence -> prompt position -> top-k

    def want(self, seq_id: int, k: int) -> None:
        self._k[seq_id], self._top[seq_id] = k, []

    def want_prompt(self, seq_id: int, k: int) -> None:
        self._prompt_k[seq_id], self._prompt_top[seq_id] = k, {}

    def __bool__(self) -> bool:
        return bool(self._k or self._prompt_k)

    def drop(self, seq_id: int) -> None:
        for gathered in (self._k, self._top, self._prompt_k, self._prompt_top):
            gathered.pop(seq_id, None)

    def clear(self) -> None:
        for gathered in (self._k, self._top, self._prompt_k, self._prompt_top):
            gathered.clear()

    def take(self, seq) -> list[dict[int, Logprob]] | None:
        """A finished sequence's top-k per generated position, each with the token sampled there."""
        self._k.pop(seq.seq_id, None)
        top = self._top.pop(seq.seq_id, None)
        if top is not None:
            for d, t, lp in zip(top, seq.output_token_ids, seq.output_logprobs, strict=True):
                d.setdefault(int(t), float(lp))
        return self._decoded(top)

    def take_prompt(self, seq) -> tuple[list[float | None], list[dict[int, Logprob]]] | None:
        """A finished sequence's prompt log-probs and top-k per prompt position (each with the prompt's own
        token), or None when it did not ask; the first position has nothing before it."""
        self._prompt_k.pop(seq.seq_id, None)
        at = self._prompt_top.pop(seq.seq_id, None)
        if at is None:
            return None
        ids = seq.prompt_token_ids
        lps = [None, *map(float, seq.prompt_logprobs)]
        top = [{}] + [{**at.get(p, {}), int(ids[p]): lp} for p, lp in zip(range(1, len(ids)), lps[1:], strict=True)]
        return lps, self._decoded(top)

    def _decoded(self, top: list[dict[int, float]] | None) -> list[dict[int, Logprob]] | None:
        """Each position's {token id: log-prob} with each token's own text (special tokens included)."""
        if top is None:
            return None
        ids = sorted({t for d in top for t in d})
        text = dict(zip(ids, (self.tokenizer.decode([t], skip_special_tokens=False) for t in ids), strict=True))
        return [{t: Logprob(lp, text[t]) for t, lp in d.items()} for d in top]

    def gather(self, plan, logits: torch.Tensor) -> None:
        """The k most likely tokens of the logits rows (sampled rows first, then prompt-logprob rows) whose
        sequences asked for them."""
        wanted: list[tuple[int, int, int, int | None]] = []  # (logits row, k, sequence, prompt position)
        for r, s in enumerate(plan.sample_seq_ids.tolist()):
            if s in self._k:
                wanted.append((r, self._k[s], s, None))
        if self._prompt_k and len(plan.prompt_lp_indices):
            num_sampled, qsl = len(plan.sample_indices), plan.query_start_loc
            token_rows = plan.prompt_lp_indices
            batch = np.searchsorted(qsl, token_rows, side="right") - 1
            for j, (row, b) in enumerate(zip(token_rows.tolist(), batch.tolist(), strict=True)):
                s = int(plan.seq_ids[b])
                if s in self._prompt_k:
                    # the row's token sits at position seq_len - q_len + offset; it scores the next one
                    pos = int(plan.seq_lens[b]) - int(qsl[b + 1] - qsl[b]) + row - int(qsl[b])
                    wanted.append((num_sampled + j, self._prompt_k[s], s, pos + 1))
        width = max((k for _, k, _, _ in wanted), default=0)
        found = ([[]] * len(wanted), [[]] * len(wanted))
        if width:
            rows = torch.tensor([r for r, _, _, _ in wanted], device=logits.device)
            values, ids = torch.log_softmax(logits[rows], -1).topk(width, dim=-1)
            found = (values.cpu().tolist(), ids.cpu().tolist())
        for (_, k, s, pos), v, t in zip(wanted, *found, strict=True):
            top = {int(a): float(b) for a, b in zip(t[:k], v[:k], strict=True)}
            if pos is None:
                self._top[s].append(top)
            else:
                self._prompt_top[s][pos] = top
