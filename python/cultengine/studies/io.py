"""Study inputs and run directories.

`iter_records` streams records from CSV / TSV / JSONL / JSON / parquet (parquet in record batches), so a
file of millions of rows is never held in memory. `ResultLog` is an append-only JSONL file keyed by `id`:
re-opening it gives the ids already written, so a re-run resumes where the last one stopped (a line cut
short by a kill is ignored and recomputed).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any


def iter_records(path: str | Path) -> Iterator[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()
    elif suffix in (".csv", ".tsv"):
        csv.field_size_limit(sys.maxsize)
        with path.open(encoding="utf-8", newline="") as f:
            yield from csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        yield from (data if isinstance(data, list) else data.get("rows", []))
    else:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        raise ValueError(f"{path}:{n}: not a JSON object")
                    yield rec


def chunks(it: Iterable, size: int) -> Iterator[list]:
    it = iter(it)
    while chunk := list(islice(it, size)):
        yield chunk


def as_list(value: Any, sep: str = "|") -> list:
    """A list field: a list, a JSON list in a string, or `sep`-separated text (CSV)."""
    if value is None or value == "":
        return []
    if isinstance(value, list | tuple):
        return list(value)
    text = str(value).strip()
    if text.startswith("["):
        return list(json.loads(text))
    return [s.strip() for s in text.split(sep)]


class ResultLog:
    """Append-only JSONL of finished records, one per `id`, flushed as written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = {r["id"] for r in self.read()}
        self._f = None

    def read(self) -> Iterator[dict]:
        if not self.path.is_file():
            return
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if isinstance(rec, dict) and "id" in rec:
                    yield rec

    def write(self, records: Iterable[dict]) -> None:
        if self._f is None:
            # a kill may have left a partial last line: start ours on a fresh one
            needs_newline = False
            if self.path.is_file() and self.path.stat().st_size > 0:
                with self.path.open("rb") as f:
                    f.seek(-1, 2)
                    needs_newline = f.read(1) != b"\n"
            self._f = self.path.open("a", encoding="utf-8")
            if needs_newline:
                self._f.write("\n")
        for rec in records:
            self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.done.add(rec["id"])
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> ResultLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_json(path: str | Path, data: Any) -> None:
    Path(path).write_text(
        json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
    )
