"""Canonical rows (.jsonl / .json / .parquet / .csv): the canonical names (`rows.Row`); `image` (one) or `images`
(list), each a path relative to the file, `{"bytes": ...}` or a `data:` URI, or a URL found under `--image-root`.
Any file no other format claims is read as this."""

from __future__ import annotations

from ..formats import Source, local_images
from ..rows import Row, _canonical

SUMMARY = "canonical JSONL/JSON/parquet/CSV"
ID_KEYS = ("id",)


def detect(cols: set[str]) -> bool:
    return False  # the registry's fallback


def to_row(rec: dict, line: int, src: Source) -> Row:
    return _canonical(local_images(rec, src.base, src.opts), src.base, line, src.stem)
