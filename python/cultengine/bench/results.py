"""The results files of a bench run directory, kept with `cultengine.runlog` (append-only, resumable).

A sharded run writes `results.shard-I-of-N.jsonl`; the merge folds every results file of the run
directory into `results.jsonl`, one line per id in dataset order.

On resume a stored result counts only when its `input_hash` (the prompt, the images' content, options,
answer and groups of its row: `suites.input_hash`) matches the row's today; results of changed rows,
of ids no longer in the data and unreadable lines are dropped and counted (`Stored.dropped`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..runlog import atomic_write, read

RESULTS = "results.jsonl"


def shard_file(run_dir: Path, shard: tuple[int, int] | None) -> Path:
    if shard is None or shard[1] == 1:
        return run_dir / RESULTS
    return run_dir / f"results.shard-{shard[0]}-of-{shard[1]}.jsonl"


def result_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("results*.jsonl") if p.is_file())


def read_all(run_dir: Path) -> dict[str, dict]:
    """id -> result over every results file of the run (the first line for an id wins)."""
    out: dict[str, dict] = {}
    for p in result_files(run_dir):
        for rec in read(p):
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                out.setdefault(rec["id"], rec)
    return out


@dataclass
class Stored:
    records: dict[str, dict]  # id -> the first stored result that is still valid
    dropped: Counter = field(default_factory=Counter)  # why results were dropped -> how many

    def summary(self) -> str:
        return ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items()))


def read_valid(run_dir: Path, expected: dict[str, str]) -> Stored:
    """The stored results whose `input_hash` is `expected[id]`; the others dropped and counted."""
    out = Stored({})
    for p in result_files(run_dir):
        unreadable: list[int] = []
        for rec in read(p, unreadable):
            rid = rec.get("id") if isinstance(rec, dict) else None
            if not isinstance(rid, str):
                out.dropped["unreadable lines"] += 1
            elif rid not in expected:
                out.dropped["with an unknown id"] += 1
            elif rec.get("input_hash") != expected[rid]:
                out.dropped["of changed rows"] += 1
            else:
                out.records.setdefault(rid, rec)
        out.dropped["unreadable lines"] += len(unreadable)
    out.dropped = +out.dropped  # keep the reasons that occurred
    return out


def merge(
    run_dir: Path, order: list[str], extra: list[dict] = (), expected: dict[str, str] | None = None
) -> list[dict]:
    """Fold every results file (plus `extra` records) into results.jsonl in `order`; drop shard files.

    With `expected` (id -> input hash), only the results still valid are kept (`read_valid`)."""
    by_id = read_all(run_dir) if expected is None else read_valid(run_dir, expected).records
    for rec in extra:
        by_id.setdefault(rec["id"], rec)
    merged = [by_id[i] for i in order if i in by_id]
    atomic_write(run_dir / RESULTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
    for p in result_files(run_dir):
        if p.name != RESULTS:
            p.unlink(missing_ok=True)
    return merged
