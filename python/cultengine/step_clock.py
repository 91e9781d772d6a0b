"""Profiling a run (`Engine(profile=True)`): the seconds each phase of a step takes and each request's
latencies. The device is waited for around each phase, so asynchronous launches are charged to the phase
that ran them; off, a phase costs one attribute read."""

from __future__ import annotations

import time

import numpy as np
import torch

PHASES = ("scheduler", "vision_encoder", "prefill", "decode", "sampling", "update")


class StepClock:
    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.reset()

    def reset(self) -> None:
        self.phase_seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.latencies: dict[str, list[float]] = {"ttft": [], "tpot": []}

    def tick(self, phase: str | None, since: float) -> float:
        """Charge the time since `since` to a phase (None: only read the clock); returns now."""
        if not self.enabled:
            return since
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if phase:
            self.phase_seconds[phase] += now - since
        return now

    def forward(self, since: float, vision_seconds: float, prefill: bool) -> float:
        """Charge a forward pass: its image encoders' seconds to the vision phase, the rest to prefill or
        decode; returns now."""
        now = self.tick(None, since)
        if self.enabled:
            self.phase_seconds["vision_encoder"] += vision_seconds
            self.phase_seconds["prefill" if prefill else "decode"] += now - since - vision_seconds
        return now

    def first_tokens(self, num_ids: int) -> np.ndarray | None:
        """For a run: the time of each sequence's first sampled token (NaN: none yet), by dense sequence id."""
        return np.full(num_ids, np.nan) if self.enabled else None

    def record_latency(self, seq, first: float, end: float) -> None:
        if np.isnan(first):  # scored sequences produce no token
            return
        self.latencies["ttft"].append(float(first))
        if len(seq.output_token_ids) > 1:
            self.latencies["tpot"].append((end - float(first)) / (len(seq.output_token_ids) - 1))
