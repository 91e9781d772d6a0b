"""Prometheus text exposition for `GET /metrics`: counters, gauges and latency histograms."""

from __future__ import annotations

import bisect
import threading
from collections import deque

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """A cumulative Prometheus histogram (bucket upper bounds in seconds); `recent` keeps the latest
    observations themselves, for exact percentiles (benchmarks)."""

    def __init__(self, bounds: tuple[float, ...], keep: int = 10_000):
        self.bounds = bounds
        self.recent: deque[float] = deque(maxlen=keep)
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.sum += value
            self.recent.append(value)

    def lines(self, name: str, help_text: str) -> list[str]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        running = 0
        for bound, c in zip((*self.bounds, float("inf")), counts, strict=True):
            running += c
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f"{name}_sum {total}", f"{name}_count {running}"]
        return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(stats: dict, http_counts: dict[tuple[str, int], int], histograms: dict[str, tuple[Histogram, str]]) -> str:
    """The exposition text from the engine loop's stats snapshot and the HTTP layer's request counts."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, value: float) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"])

    lines += [
        "# HELP cultengine_http_requests_total HTTP requests answered, by endpoint and status code.",
        "# TYPE cultengine_http_requests_total counter",
    ]
    for (path, status), n in sorted(http_counts.items()):
        lines.append(f'cultengine_http_requests_total{{endpoint="{_escape(path)}",status="{status}"}} {n}')
    used = stats["num_blocks"] - stats["num_free_blocks"]
    queried = stats["prefix_cache_queried_tokens"]
    for name, kind, help_text, value in (
        (
            "cultengine_requests_admitted_total",
            "counter",
            "Requests admitted to the engine.",
            stats["requests_admitted"],
        ),
        (
            "cultengine_requests_aborted_total",
            "counter",
            "Requests aborted because their client went away.",
            stats["requests_aborted"],
        ),
        ("cultengine_requests_running", "gauge", "Admitted requests not yet finished.", stats["requests_running"]),
        ("cultengine_sequences_running", "gauge", "Sequences the scheduler is running.", stats["num_running"]),
        ("cultengine_sequences_waiting", "gauge", "Sequences queued in the scheduler.", stats["num_waiting"]),
        (
            "cultengine_engine_commands_queued",
            "gauge",
            "Admissions and aborts waiting for the next step.",
            stats["inbox"],
        ),
        (
            "cultengine_prompt_tokens_total",
            "counter",
            "Prompt tokens admitted (images expanded).",
            stats["prompt_tokens"],
        ),
        ("cultengine_generation_tokens_total", "counter", "Tokens generated.", stats["generation_tokens"]),
        ("cultengine_kv_blocks_total", "gauge", "KV-cache blocks.", stats["num_blocks"]),
        ("cultengine_kv_blocks_used", "gauge", "KV-cache blocks held by sequences.", used),
        (
            "cultengine_kv_cache_usage_ratio",
            "gauge",
            "Share of KV-cache blocks held by sequences.",
            used / max(stats["num_blocks"], 1),
        ),
        (
            "cultengine_prefix_cache_queried_tokens_total",
            "counter",
            "Prompt tokens looked up in the prefix cache.",
            queried,
        ),
        (
            "cultengine_prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens served by the prefix cache.",
            stats["prefix_cache_hit_tokens"],
        ),
        (
            "cultengine_prefix_cache_hit_rate",
            "gauge",
            "Prefix-cache hits over lookups, since start.",
            stats["prefix_cache_hit_tokens"] / max(queried, 1),
        ),
        (
            "cultengine_preemptions_total",
            "counter",
            "Sequences preempted (recomputed later).",
            stats["num_preemptions"],
        ),
        (
            "cultengine_images_encoded_total",
            "counter",
            "Images run through the vision encoder.",
            stats["images_encoded"],
        ),
        ("cultengine_engine_step_errors_total", "counter", "Engine steps that raised.", stats["step_errors"]),
        (
            "cultengine_image_memory_bytes",
            "gauge",
            "Image data held by the requests in flight (--max-image-memory caps it).",
            stats["image_memory_bytes"],
        ),
        ("cultengine_image_memory_capacity_bytes", "gauge", "--max-image-memory.", stats["image_memory_capacity"]),
    ):
        metric(name, kind, help_text, value)
    for name, (hist, help_text) in histograms.items():
        lines += hist.lines(name, help_text)
    return "\n".join(lines) + "\n"
