"""Study inputs.

`iter_records` streams records from CSV / TSV / JSONL / JSON / parquet (parquet in record batches), so a
file of millions of rows is never held in memory. Results go to a `cultengine.runlog.ResultLog`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from .. import datafiles


def iter_records(path: str | Path) -> Iterator[dict]:
    """Each record of a study input; a line or row that cannot be read is skipped with a warning naming the
    file and line (one bad row of millions does not end the run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: not valid JSON ({getattr(e, 'msg', e)})") from None
        rows = data.get("rows") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise ValueError(f'{path}: a .json input holds a list of objects (or {{"rows": [...]}})')
        yield from rows
    else:
        rows = (
            datafiles.csv_rows(path, "\t" if suffix == ".tsv" else ",")
            if suffix in (".csv", ".tsv")
            else datafiles.json_lines(path)
        )
        for n, rec in rows:
            if isinstance(rec, datafiles.BadLine):
                warnings.warn(f"{path}:{n}: skipped: {rec}", stacklevel=2)
            else:
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
