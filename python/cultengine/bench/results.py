"""Append-only results files and resume.

Each finished sample is one JSON line, flushed and fsync'd before the next batch starts, so a kill loses
at most the batch in flight. A sharded run writes `results.shard-I-of-N.jsonl`; the merge folds every
results file of the run directory into `results.jsonl`, one line per id in dataset order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RESULTS = "results.jsonl"


def shard_file(run_dir: Path, shard: tuple[int, int] | None) -> Path:
    if shard is None or shard[1] == 1:
        return run_dir / RESULTS
    return run_dir / f"results.shard-{shard[0]}-of-{shard[1]}.jsonl"


def result_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("results*.jsonl") if p.is_file())


def read(path: Path, repair: bool = False) -> list[dict]:
    """The complete lines of `path`; a torn last line (from a kill) is dropped, and cut off if `repair`."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records, good_end, pos = [], 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # no newline: the write was cut short
        line = data[pos:nl].strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # only the last line can be torn; treat anything after it as lost
        pos = good_end = nl + 1
    if repair and good_end < len(data):
        with path.open("r+b") as f:
            f.truncate(good_end)
    return records


def read_all(run_dir: Path) -> dict[str, dict]:
    """id -> result over every results file of the run (the first line for an id wins)."""
    out: dict[str, dict] = {}
    for p in result_files(run_dir):
        for rec in read(p):
            out.setdefault(rec["id"], rec)
    return out


class Writer:
    def __init__(self, path: Path):
        read(path, repair=True)  # appends must start on a fresh line
        self.path = path
        self._f = path.open("a", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        self._f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
