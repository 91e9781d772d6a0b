"""The results files of a bench run directory, kept with `cultengine.runlog` (append-only, resumable).

A sharded run writes `results.shard-I-of-N.jsonl`; the merge folds every results file of the run
directory into `results.jsonl`, one line per id in dataset order.
"""

from __future__ import annotations

import json
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
            out.setdefault(rec["id"], rec)
    return out


def merge(run_dir: Path, order: list[str], extra: list[dict] = ()) -> list[dict]:
    """Fold every results file (plus `extra` records) into results.jsonl in `order`; drop shard files."""
    by_id = read_all(run_dir)
    for rec in extra:
        by_id.setdefault(rec["id"], rec)
    merged = [by_id[i] for i in order if i in by_id]
    atomic_write(run_dir / RESULTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
    for p in result_files(run_dir):
        if p.name != RESULTS:
            p.unlink(missing_ok=True)
    return merged
