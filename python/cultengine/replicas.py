"""Engine replicas over Ray Data: a list of work items answered by N actors, each one `Engine` (tensor-parallel
where its kwargs say), on this machine or a Ray cluster. `bench --ray-replicas` and `ground --ray-replicas`
map their batches through it; only the caller (the driver) writes results, as they come back, so a run keeps
each item's result once and a killed driver resumes from what it wrote. Ray Data re-runs the batch of an actor
that dies on a restarted one (its results reach the driver once).
"""

from __future__ import annotations

import json
import pickle
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

Work = Callable[[Any, list], list]  # (engine, items) -> one result per item; picklable (module-level or partial)


class _Replica:
    """One actor's engine, answering batches of item indices."""

    def __init__(self, model: str, items, work: Work, engine_kwargs: dict):
        import ray

        from .engine import Engine

        self.items = ray.get(items) if isinstance(items, ray.ObjectRef) else items
        self.work = work
        self.engine = Engine(model, **engine_kwargs)
        self.session = uuid.uuid4().hex  # this replica's engine, in engine_stats.jsonl
        self.provenance: dict | None = self.engine.provenance()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.work(self.engine, [self.items[int(i)] for i in batch["id"]])
        meta = json.dumps({"session": self.session, "stats": self.engine.stats(), "provenance": self.provenance})
        self.provenance = None  # once per replica
        return {
            "result": np.array([pickle.dumps(r) for r in results], dtype=object),
            "meta": np.array([meta] + [""] * (len(results) - 1), dtype=object),
        }


@dataclass
class Replicas:
    """`replicas` engines of `model` (Engine keyword arguments `engine_kwargs`) on the Ray cluster at `address`
    (None: a local one, started for the call and stopped after)."""

    model: str
    engine_kwargs: dict
    replicas: int
    address: str | None = None

    def map(self, items: list, work: Work, batch_size: int) -> Iterator[tuple[list, list[dict]]]:
        """`work` over `items` in batches of `batch_size`: yields the results of each block of batches (in no
        set order) with what their replicas reported (`session`, cumulative `stats`; `provenance`, None after a
        replica's first)."""
        import ray

        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        try:
            on_cuda = str(self.engine_kwargs.get("device", "")).startswith("cuda")
            answered = (
                ray.data.range(len(items))
                .materialize()
                .map_batches(
                    _Replica,
                    fn_constructor_kwargs=dict(
                        model=self.model, items=ray.put(items), work=work, engine_kwargs=self.engine_kwargs
                    ),
                    batch_size=batch_size,
                    concurrency=self.replicas,
                    num_cpus=1,
                    # a replica's GPUs: one per tensor-parallel rank
                    num_gpus=self.engine_kwargs.get("tensor_parallel_size", 1) if on_cuda else 0,
                    batch_format="numpy",
                )
            )
            for out in answered.iter_batches(batch_size=None, batch_format="numpy"):
                yield [pickle.loads(r) for r in out["result"]], [json.loads(m) for m in out["meta"] if m]
        finally:
            if started:
                ray.shutdown()
